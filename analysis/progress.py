"""The progress record that every compute generator in SegScope yields.

Compute functions are generators: they ``yield Progress(...)`` once per batch and
``return`` their result, so the Qt app, the CLI progress bar and batch pipelines drive the
same code. ``drive`` runs such a generator to completion and hands back its result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One progress report.

    Attributes
    ----------
    done, total : int
        Units finished so far and units in all (``total`` 0 when unknown).
    unit : str
        What is counted (``"cutouts"``, ``"segments"``, ``"steps"``...).
    message : str
        Short human-readable stage description.
    rate : float or None
        Units per second over the run so far, when the producer measures it.
    payload : Any
        Optional partial result delivered with this report (for example a batch of
        embeddings), so consumers can stream results as they come.
    """

    done: int
    total: int
    unit: str = ""
    message: str = ""
    rate: float | None = None
    payload: Any = field(default=None, compare=False, repr=False)

    @property
    def fraction(self) -> float:
        """Fraction finished in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total else 0.0


class RateMeter:
    """Measures units per second since construction (monotonic clock)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def rate(self, done: int) -> float | None:
        elapsed = time.perf_counter() - self._start
        return done / elapsed if elapsed > 0 and done else None


def drive(gen: Generator[Progress, None, T], on_progress: Callable[[Progress], Any] | None = None) -> T:
    """Run a compute generator to the end, passing each report to ``on_progress``.

    Returns the generator's return value.
    """
    while True:
        try:
            report = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(report)
