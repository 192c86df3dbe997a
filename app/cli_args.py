"""Argument types for the ``segscope`` command line, checked when the command line is parsed.

Every numeric option of every subcommand uses one of these, so a bad value (``0``, ``-100``,
``nan``, ``inf``, ``1e308``, two numbers where three are needed) is refused by argparse with
one line naming the option, before any data is read or any model is loaded. Only the standard
library is imported here (``segscope --help`` stays instant).

Each factory returns a callable for ``add_argument(type=...)``; the callable's ``__name__`` is
what argparse shows in "invalid <name> value" messages.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# The largest physical size (nm) any argument stands for: 1 m. Bigger values are typos or
# attempts to overflow the voxel arithmetic (1e308 nm * voxels -> inf).
MAX_NM = 1e9


def _named(function: Callable, name: str) -> Callable:
    function.__name__ = name
    return function


def _finite_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(maximum: float = MAX_NM, *, allow_zero: bool = False, what: str = "a positive number") -> Callable:
    """A float in ``(0, maximum]`` (``[0, maximum]`` with ``allow_zero``); never nan or inf."""

    def parse(text: str) -> float:
        value = _finite_float(text, what)
        low_ok = value >= 0 if allow_zero else value > 0
        if not low_ok or value > maximum:
            bound = "[0" if allow_zero else "(0"
            raise argparse.ArgumentTypeError(f"expected {what} in {bound}, {maximum:g}], got {text!r}")
        return value

    return _named(parse, "non-negative number" if allow_zero else "positive number")


def fraction(*, allow_zero: bool = True, allow_one: bool = False) -> Callable:
    """A float in ``[0, 1)`` (bounds as given); never nan."""

    def parse(text: str) -> float:
        value = _finite_float(text, "a fraction")
        low_ok = value >= 0 if allow_zero else value > 0
        high_ok = value <= 1 if allow_one else value < 1
        if not (low_ok and high_ok):
            lo = "[0" if allow_zero else "(0"
            hi = "1]" if allow_one else "1)"
            raise argparse.ArgumentTypeError(f"expected a fraction in {lo}, {hi}, got {text!r}")
        return value

    return _named(parse, "fraction")


def integer(minimum: int = 1, maximum: int = 2**31 - 1) -> Callable:
    """An integer in ``[minimum, maximum]`` (default: positive)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum}], got {text!r}")
        return value

    return _named(parse, "integer")


positive_int = integer(1)
non_negative_int = integer(0)
seed = _named(integer(0, 2**32 - 1), "seed")


def xyz_triple(maximum: float = MAX_NM, *, what: str = "X,Y,Z in nm") -> Callable:
    """Three positive finite numbers ``X,Y,Z`` (each at most ``maximum``), as a float tuple."""

    def parse(text: str) -> tuple[float, float, float]:
        parts = text.split(",")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three numbers {what}, got {text!r}")
        values = []
        for part in parts:
            value = _finite_float(part.strip(), f"three positive numbers {what}")
            if not 0 < value <= maximum:
                raise argparse.ArgumentTypeError(
                    f"expected three positive numbers {what} (each at most {maximum:g}), got {text!r}"
                )
            values.append(value)
        return tuple(values)  # type: ignore[return-value]

    return _named(parse, "X,Y,Z")


voxel_size_nm = xyz_triple(1e6, what="X,Y,Z (voxel size in nm)")


def output_path(*, kind: str = "any") -> Callable:
    """An output path whose parent folder exists and is writable (checked at parse time).

    ``kind``: ``"dir"`` refuses an existing file (the output is a folder), ``"file"`` refuses
    an existing folder, ``"any"`` accepts either. Whether an existing output may be replaced
    (``--force``) is the command's decision.
    """

    def parse(text: str) -> str:
        if not text or "\0" in text:
            raise argparse.ArgumentTypeError(f"expected an output path, got {text!r}")
        problem = output_problem(Path(text), kind=kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    return _named(parse, "output path")


def output_problem(path: Path, *, kind: str = "any") -> str | None:
    """Why ``path`` cannot be written as an output (a folder, ``kind="dir"``, or a file), or None.

    Checks what can be known before any work: the nearest existing ancestor is a writable
    folder, the path itself is not a file where a folder is wanted (or the reverse).
    """
    if kind == "dir" and path.is_file():
        return f"{path} is a file, not a folder"
    if kind == "file" and path.is_dir():
        return f"{path} is a folder, not a file"
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is a file"
    if not _can_create_in(ancestor):
        return f"cannot write {path}: {ancestor} is not writable"
    if path.is_dir() and not _can_create_in(path):
        return f"cannot write into {path}: the folder is not writable"
    return None


def _can_create_in(folder: Path) -> bool:
    # A real probe rather than os.access: root passes every permission check but still
    # cannot write to a read-only mount, and os.access says nothing about either for root.
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".segscope-write-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True
