"""UMAP in a child process: numba and umap never share the GUI process's GIL.

Why a process and not a thread
------------------------------
numba compiles UMAP's kernels while holding the GIL, and parts of umap-learn run plain
Python between kernels, so with fits and ``transform`` on :class:`~segscope.app.jobs.JobRunner`
threads the Qt main thread stalled (up to about half a second) during warm-up and fits.
:class:`ProjectionProcess` is a ``spawn``-ed child (a fresh interpreter, like
:mod:`segscope.app.compute_process`'s TensorFlow child) that owns umap and numba; the GUI process
only pickles embeddings to it and layouts back.

Protocol
--------
:class:`segscope.app.child_process.ChildProcessRunner` owns the child, its pipe, the
futures, the watchdog and restarts; this module adds the requests (frozen dataclasses:
:class:`WarmUp`, :class:`Fit`, :class:`Transform`, :class:`Drop`) and the child's handlers.
In the child the main thread only reads requests and hands each to a worker thread: fits
and warm-ups on one, transforms on another, so a minute-long refit never holds back the
placement of new points. Where numba's threading layer is not thread-safe
(:func:`segscope.analysis.projection.numba_threadsafe`) both kinds share one worker instead.

The child keeps fitted models by id, the newest ``keep_models`` of them (older ones are
dropped: the scheduler only ever places points with the newest model, and with the one
before while a placement started before a refit finished).

If the child dies, every pending future fails with :class:`ProjectionProcessError`
("the projection process died (exit code -9); it restarts on the next request"), and the
next request starts a new child. A child that hangs without dying is caught by the
runner's watchdog: while requests wait, it pings the child every ``ping_interval_s``; a
child silent for ``hang_timeout_s`` (no reply of any kind, pings included) is killed, and
its futures fail the same way ("stopped answering for 120 s and was killed"). The child's
main thread answers pings between requests, and numba compiles and runs UMAP's kernels
in stretches of seconds, so only a frozen child stays silent that long.
Models do not survive that: asking a new child about an old model raises
:class:`ModelNotFoundError` (a ``KeyError``), and the caller refits.

:class:`LocalProjectionBackend` (in-process, on the caller's thread: what the scheduler did
before) and :class:`ProcessProjectionBackend` (this child) are the two backends
:class:`segscope.app.plot_controller.ProjectionScheduler` accepts.

Arrays: embeddings float32 ``[N, D]``; layouts float32 ``[N, 2]`` (x, y) in projection units;
``init`` float64 ``[N, 2]``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from segscope.analysis.projection import UmapSettings
from segscope.app.child_process import (
    HANG_TIMEOUT_S,
    PING_INTERVAL_S,
    ChildProcessFailure,
    ChildProcessRunner,
    serve,
)

log = logging.getLogger(__name__)

#: Fitted models the child keeps by default (the newest ones).
KEEP_MODELS = 3


class ProjectionProcessError(ChildProcessFailure):
    """The projection process died, was shut down, or failed in an unexpected way."""


class ModelNotFoundError(KeyError):
    """A model id the projection process does not hold (dropped, or from a child that died)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class FitResult(NamedTuple):
    """What a fit in the child sends back.

    ``layout`` float32 ``[N, 2]`` of the fitted points in fit order; ``fit_seconds`` the
    fit's wall time in the child (excluding the transform preparation); ``dim`` D.
    """

    model_id: int
    layout: np.ndarray
    n_points: int
    fit_seconds: float
    dim: int


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmUp:
    """Compile (or load from numba's cache) the kernels fits with ``settings`` use."""

    settings: UmapSettings


@dataclass(frozen=True)
class Fit:
    """Fit float32 ``[N, D]`` ``embeddings``, optionally from float64 ``[N, 2]`` ``init``; keep it as ``model_id``."""

    model_id: int
    embeddings: np.ndarray
    settings: UmapSettings
    init: np.ndarray | None


@dataclass(frozen=True)
class Transform:
    """Place float32 ``[M, D]`` ``embeddings`` with model ``model_id``."""

    model_id: int
    embeddings: np.ndarray


@dataclass(frozen=True)
class Drop:
    """Forget model ``model_id``."""

    model_id: int


# -- the child -------------------------------------------------------------------------------


def _child_main(conn, numba_cache_dir: str | None, keep_models: int) -> None:  # pragma: no cover - child
    """Serve requests until told to stop or the parent goes away."""
    if numba_cache_dir:
        os.environ["NUMBA_CACHE_DIR"] = numba_cache_dir  # before numba is imported
    logging.basicConfig(level=logging.WARNING, format="projection process: %(levelname)s %(name)s: %(message)s")
    child = _ProjectionChild(keep_models)
    serve(conn, child.handle, lane_of=child.lane_of)


class _ProjectionChild:  # pragma: no cover - runs in the child process
    def __init__(self, keep_models: int):
        self.keep_models = max(1, int(keep_models))
        self.models: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.models_lock = threading.Lock()
        from segscope.analysis.projection import configure_numba_cache, numba_threadsafe

        configure_numba_cache()
        # With numba's workqueue layer two parallel kernels at once abort the process.
        self.threadsafe = numba_threadsafe()

    def lane_of(self, payload) -> str | None:
        """Fits and warm-ups on one worker, transforms on another; drops at once."""
        if isinstance(payload, Drop):
            return None
        if isinstance(payload, Transform) and self.threadsafe:
            return "place"
        return "fit"

    def handle(self, payload, context):
        if isinstance(payload, WarmUp):
            from segscope.analysis.projection import warm_up

            return warm_up(settings=payload.settings)
        if isinstance(payload, Fit):
            return self.fit(payload)
        if isinstance(payload, Transform):
            return self.transform(payload.model_id, payload.embeddings)
        if isinstance(payload, Drop):
            with self.models_lock:
                self.models.pop(payload.model_id, None)
            return None
        raise ValueError(f"unknown projection request {type(payload).__name__}")

    def fit(self, request: Fit) -> FitResult:
        from segscope.analysis.progress import drive
        from segscope.analysis.projection import fit_umap

        model = drive(fit_umap(request.embeddings, request.settings, init=request.init))
        with self.models_lock:
            self.models[request.model_id] = model
            while len(self.models) > self.keep_models:
                self.models.popitem(last=False)
        return FitResult(request.model_id, model.layout, model.n_points, float(model.fit_seconds), model.dim)

    def transform(self, model_id: int, embeddings: np.ndarray) -> np.ndarray:
        with self.models_lock:
            model = self.models.get(model_id)
        if model is None:
            raise ModelNotFoundError(
                f"the projection process holds no UMAP model {model_id} "
                "(dropped, or fitted by a process that has since exited)"
            )
        return model.transform(embeddings)


# -- the parent ----------------------------------------------------------------------------


class ProjectionProcess:
    """A ``spawn``-ed child process that fits UMAP and places points with ``transform``.

    Thread-safe: any thread may send requests; each returns a
    :class:`concurrent.futures.Future` at once, resolved when the child answers. A dead
    or hung child fails its pending futures with :class:`ProjectionProcessError`, and the
    next request starts a new one (see :class:`segscope.app.child_process.ChildProcessRunner`).

    Parameters
    ----------
    keep_models
        How many fitted models the child keeps (the newest).
    numba_cache_dir
        ``NUMBA_CACHE_DIR`` for the child (default: the parent's environment, else
        :func:`segscope.analysis.projection.configure_numba_cache`'s folder in the user cache).
    start
        Start the child now (its interpreter start-up then overlaps the caller's), rather
        than at the first request.
    ping_interval_s, hang_timeout_s
        The watchdog's ping period and the silence (seconds) after which a child with
        requests waiting is killed as hung; ``hang_timeout_s=None`` turns the watchdog off.
    on_event
        Called with a one-line message when the child died or hung and when a new one
        started; from a reader thread (post it to the GUI thread).
    """

    def __init__(
        self,
        *,
        keep_models: int = KEEP_MODELS,
        numba_cache_dir: str | os.PathLike | None = None,
        start: bool = True,
        ping_interval_s: float = PING_INTERVAL_S,
        hang_timeout_s: float | None = HANG_TIMEOUT_S,
        on_event: Callable[[str], None] | None = None,
    ):
        self.keep_models = int(keep_models)
        self.numba_cache_dir = None if numba_cache_dir is None else os.fspath(numba_cache_dir)
        self._model_ids = itertools.count(1)  # unique across restarts: an old id never aliases
        self._runner = ChildProcessRunner(
            "projection",
            _child_main,
            (self.numba_cache_dir, self.keep_models),
            start=start,
            ping_interval_s=ping_interval_s,
            hang_timeout_s=hang_timeout_s,
            on_event=on_event,
            error_type=ProjectionProcessError,
            own_errors={"ModelNotFoundError": ModelNotFoundError},
        )

    @property
    def ping_interval_s(self) -> float:
        return self._runner.ping_interval_s

    @property
    def hang_timeout_s(self) -> float | None:
        return self._runner.hang_timeout_s

    @property
    def alive(self) -> bool:
        """True while a child runs (False before the first request with ``start=False``)."""
        return self._runner.alive

    @property
    def pid(self) -> int | None:
        """The current child's process id (None when there is none)."""
        return self._runner.pid

    @property
    def incarnation(self) -> int:
        """Which child this is (1 for the first; each restart adds one); 0 before any."""
        return self._runner.incarnation

    @property
    def restarts(self) -> int:
        """Children started after the first one."""
        return self._runner.restarts

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the child (terminate it if it does not exit within ``timeout`` s).

        Idempotent; also runs at interpreter exit. Pending futures fail, and later
        requests raise :class:`ProjectionProcessError`.
        """
        self._runner.shutdown(timeout)

    def ping(self) -> Future:
        """Future of the child's process id (a cheap liveness check)."""
        return self._runner.ping()

    def warm_up(
        self,
        settings: UmapSettings = UmapSettings(seed=None),  # noqa: B008 - frozen dataclass, immutable
    ) -> Future:
        """Compile (or load from numba's disk cache) the kernels ``settings`` fits use.

        Future of :func:`segscope.analysis.projection.warm_up`'s timings dict (seconds).
        """
        return self._runner.request(WarmUp(settings))

    def fit(
        self,
        embeddings: Any,
        settings: UmapSettings = UmapSettings(),  # noqa: B008 - frozen dataclass, immutable
        init: Any = None,
    ) -> Future:
        """Fit UMAP on float32 ``[N, D]`` embeddings, optionally from float64 ``[N, 2]`` ``init``.

        Future of a :class:`FitResult`; the model stays in the child under its
        ``model_id`` for :meth:`transform`. Bad input fails the future with ValueError.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        init = None if init is None else np.ascontiguousarray(init, dtype=np.float64)
        return self._runner.request(Fit(next(self._model_ids), embeddings, settings, init))

    def transform(self, model_id: int, embeddings: Any) -> Future:
        """Place float32 ``[M, D]`` embeddings with model ``model_id``: future of float32 ``[M, 2]``.

        Fails with :class:`ModelNotFoundError` for a model the child does not hold, and
        ValueError for embeddings of the wrong width.
        """
        return self._runner.request(Transform(int(model_id), np.ascontiguousarray(embeddings, dtype=np.float32)))

    def drop(self, model_id: int) -> Future:
        """Forget model ``model_id`` in the child (no error if it is not there)."""
        return self._runner.request(Drop(int(model_id)))


# -- backends for the scheduler -----------------------------------------------------------


class LocalProjectionBackend:
    """UMAP in this process, on the calling thread (what the scheduler always did).

    numba's compiler holds the GIL, so a GUI thread in the same process stalls during
    warm-up and fits; :class:`ProcessProjectionBackend` avoids that.
    """

    @property
    def concurrent_transforms(self) -> bool:
        """Whether a transform may run on another thread while a fit runs."""
        from segscope.analysis.projection import numba_threadsafe

        return numba_threadsafe()

    def warm_up(self, settings: UmapSettings) -> dict[str, float]:
        """:func:`segscope.analysis.projection.warm_up` with ``settings``; its timings (seconds)."""
        from segscope.analysis.projection import warm_up

        return warm_up(settings=settings)

    def fit(self, embeddings: np.ndarray, settings: UmapSettings, init: np.ndarray | None = None):
        """A fitted :class:`segscope.analysis.projection.UmapModel` (float32 ``[N, D]`` in)."""
        from segscope.analysis.progress import drive
        from segscope.analysis.projection import fit_umap

        return drive(fit_umap(embeddings, settings, init=init))

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class RemoteUmapModel:
    """A UMAP model living in a :class:`ProjectionProcess`.

    It offers what the scheduler uses of :class:`segscope.analysis.projection.UmapModel`.

    Attributes
    ----------
    layout : numpy.ndarray
        float32 ``[N, 2]``, the fitted points in fit order.
    fit_seconds : float
        Wall time of the fit in the child.
    """

    process: ProjectionProcess
    model_id: int
    layout: np.ndarray
    fit_seconds: float
    dim: int
    settings: UmapSettings

    @property
    def n_points(self) -> int:
        return len(self.layout)

    def transform(self, embeddings: Any) -> np.ndarray:
        """Place float ``[M, D]`` embeddings (blocks on the child); float32 ``[M, 2]``.

        Raises
        ------
        ModelNotFoundError
            When the model is gone: dropped by the child (a refit), or the child that held
            it exited, before or during the call. One signal for "fit again" to the scheduler.
        ValueError
            For embeddings that are not ``[M, dim]`` or not finite.
        """
        try:
            placed = self.process.transform(self.model_id, embeddings).result()
        except ProjectionProcessError as exc:  # the child died mid-call: its models with it
            raise ModelNotFoundError(f"UMAP model {self.model_id} was lost: {exc}") from exc
        return np.asarray(placed, dtype=np.float32)


class ProcessProjectionBackend:
    """UMAP in a child process: the GUI process's threads only wait on a pipe.

    Parameters
    ----------
    process
        The :class:`ProjectionProcess` to use (shared; the caller shuts it down). None
        starts one that :meth:`close` shuts down.
    on_event
        For the process this backend starts: called with a one-line message when the child
        dies, hangs or is restarted (on the runner's reader thread).
    """

    def __init__(self, process: ProjectionProcess | None = None, *, on_event: Callable[[str], None] | None = None):
        self._owned = process is None
        self.process = ProjectionProcess(on_event=on_event) if process is None else process

    @property
    def concurrent_transforms(self) -> bool:
        """Always: the child serialises fits and transforms itself when numba needs it."""
        return True

    def warm_up(self, settings: UmapSettings) -> dict[str, float]:
        """Compile the child's kernels for ``settings``; its timings (seconds)."""
        started = time.perf_counter()
        timings = dict(self.process.warm_up(settings).result())
        timings["round_trip_s"] = time.perf_counter() - started
        return timings

    def fit(self, embeddings: np.ndarray, settings: UmapSettings, init: np.ndarray | None = None) -> RemoteUmapModel:
        """Fit in the child (blocks until done); a :class:`RemoteUmapModel`."""
        result: FitResult = self.process.fit(embeddings, settings, init).result()
        return RemoteUmapModel(
            self.process,
            result.model_id,
            np.asarray(result.layout, np.float32),
            result.fit_seconds,
            result.dim,
            settings,
        )

    def close(self) -> None:
        """Shut the process down if this backend started it."""
        if self._owned:
            self.process.shutdown()
