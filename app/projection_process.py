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
One pipe. The parent sends ``(kind, token, *args)`` under a lock; a receiver thread in the
parent reads ``("ok", token, result)`` or ``("error", token, type_name, message)`` and
resolves the :class:`concurrent.futures.Future` of that token. In the child the main
thread only reads requests and hands each to a worker thread: fits and warm-ups on one,
transforms on another, so a minute-long refit never holds back the placement of new
points. Where numba's threading layer is not thread-safe
(:func:`segscope.analysis.projection.numba_threadsafe`) both kinds share one worker instead.

The child keeps fitted models by id, the newest ``keep_models`` of them (older ones are
dropped: the scheduler only ever places points with the newest model, and with the one
before while a placement started before a refit finished).

If the child dies, every pending future fails with :class:`ProjectionProcessError`
("the projection process exited (code N)"), and the next request starts a new child.
A child that hangs without dying is caught by a watchdog thread: while requests wait, it
pings the child every ``ping_interval_s``; a child silent for ``hang_timeout_s`` (no reply
of any kind, pings included) is killed, and its futures fail the same way ("stopped
answering"). The child's main thread answers pings between requests, and numba compiles
and runs UMAP's kernels in stretches of seconds, so only a frozen child stays silent that
long.
Models do not survive that: asking a new child about an old model raises
:class:`ModelNotFoundError` (a ``KeyError``), and the caller refits.

:class:`LocalProjectionBackend` (in-process, on the caller's thread: what the scheduler did
before) and :class:`ProcessProjectionBackend` (this child) are the two backends
:class:`segscope.app.plot_controller.ProjectionScheduler` accepts.

Arrays: embeddings float32 ``[N, D]``; layouts float32 ``[N, 2]`` (x, y) in projection units;
``init`` float64 ``[N, 2]``.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from segscope.analysis.projection import UmapSettings

log = logging.getLogger(__name__)

#: Fitted models the child keeps by default (the newest ones).
KEEP_MODELS = 3
#: Seconds between pings while requests wait, and of silence after which the child is
#: taken for hung and killed. Cold numba compiles and 100k-point fits on a loaded 2-core
#: machine still answer pings within a second or two.
PING_INTERVAL_S = 10.0
HANG_TIMEOUT_S = 120.0


class ProjectionProcessError(RuntimeError):
    """The projection process died, was shut down, or failed in an unexpected way."""


class ModelNotFoundError(KeyError):
    """A model id the projection process does not hold (dropped, or from a child that died)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


def _rebuild_error(type_name: str, message: str) -> Exception:
    """The child's exception as the nearest built-in type, its message kept."""
    from segscope.app.compute_process import rebuild_error  # the same mapping as the TensorFlow child

    return rebuild_error(
        type_name,
        message,
        own={"ModelNotFoundError": ModelNotFoundError},
        unknown=lambda text: ProjectionProcessError(f"{text} (in the projection process)"),
    )


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


# -- the child -------------------------------------------------------------------------------


def _child_main(conn, numba_cache_dir: str | None, keep_models: int) -> None:  # pragma: no cover - child
    """Serve requests until told to stop or the parent goes away."""
    if numba_cache_dir:
        os.environ["NUMBA_CACHE_DIR"] = numba_cache_dir  # before numba is imported
    logging.basicConfig(level=logging.WARNING, format="projection process: %(levelname)s %(name)s: %(message)s")
    _ChildServer(conn, keep_models).serve()


class _Lane:  # pragma: no cover - runs in the child
    """One daemon worker thread running queued calls in order."""

    def __init__(self, name: str):
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.queue.unfinished_tasks > 0

    def submit(self, fn: Callable[[], None]) -> None:
        self.queue.put(fn)

    def _work(self) -> None:
        while True:
            fn = self.queue.get()
            try:
                fn()
            except Exception:  # a bug here must not kill the lane and strand later requests
                logging.getLogger(__name__).exception("projection request failed outside its handler")
            finally:
                self.queue.task_done()


class _ChildServer:  # pragma: no cover - runs in the child process
    def __init__(self, conn, keep_models: int):
        self.conn = conn
        self.keep_models = max(1, int(keep_models))
        self.models: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.models_lock = threading.Lock()
        self.send_lock = threading.Lock()
        from segscope.analysis.projection import configure_numba_cache, numba_threadsafe

        configure_numba_cache()
        fit_lane = _Lane("projection-fit")
        # With numba's workqueue layer two parallel kernels at once abort the process.
        self.lanes = {"fit": fit_lane, "place": _Lane("projection-place") if numba_threadsafe() else fit_lane}

    def send(self, message) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, BrokenPipeError, EOFError):
                pass  # the parent is gone; the main loop sees EOF and exits

    def serve(self) -> None:
        handlers = {"warm_up": ("fit", self.warm_up), "fit": ("fit", self.fit), "transform": ("place", self.transform)}
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind, token, args = message[0], message[1] if len(message) > 1 else None, message[2:]
            if kind == "stop":
                break
            if kind == "ping":
                self.send(("ok", token, os.getpid()))
            elif kind == "drop":
                with self.models_lock:
                    self.models.pop(args[0], None)
                self.send(("ok", token, None))
            elif kind in handlers:
                lane, handler = handlers[kind]
                self.lanes[lane].submit(lambda handler=handler, token=token, args=args: self.run(handler, token, args))
            else:
                self.send(("error", token, "ValueError", f"unknown projection request {kind!r}"))
        if any(lane.busy for lane in self.lanes.values()):
            # A fit in numba cannot be interrupted; do not wait a minute to exit.
            os._exit(0)

    def run(self, handler, token, args) -> None:
        try:
            result = handler(*args)
            self.send(("ok", token, result))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            self.send(("error", token, type(exc).__name__, message))

    def warm_up(self, settings: UmapSettings) -> dict:
        from segscope.analysis.projection import warm_up

        return warm_up(settings=settings)

    def fit(self, model_id: int, embeddings: np.ndarray, settings: UmapSettings, init) -> FitResult:
        from segscope.analysis.progress import drive
        from segscope.analysis.projection import fit_umap

        model = drive(fit_umap(embeddings, settings, init=init))
        with self.models_lock:
            self.models[model_id] = model
            while len(self.models) > self.keep_models:
                self.models.popitem(last=False)
        return FitResult(model_id, model.layout, model.n_points, float(model.fit_seconds), model.dim)

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


_live_processes: "weakref.WeakSet[ProjectionProcess]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for process in list(_live_processes):
        process.shutdown(timeout=2.0)


class _Child:
    """One incarnation of the child: its process, pipe end and pending futures."""

    def __init__(self, process, conn, incarnation: int):
        self.process = process
        self.conn = conn
        self.incarnation = incarnation
        self.pending: dict[int, Future] = {}
        self.closed = False  # no new requests: it exited or is being stopped
        self.stopping = False
        self.hung_for: float | None = None  # seconds of silence, when the watchdog killed it
        # When the child last answered, or when requests started waiting on an idle child
        # (time.monotonic); the watchdog measures silence from here.
        self.heard = time.monotonic()
        self.pinged = 0.0  # when the watchdog last pinged it (time.monotonic)


class ProjectionProcess:
    """A ``spawn``-ed child process that fits UMAP and places points with ``transform``.

    Thread-safe: any thread may send requests; each returns a
    :class:`concurrent.futures.Future` at once, resolved by a receiver thread when the
    child answers. A dead child fails its pending futures with
    :class:`ProjectionProcessError`, and the next request starts a new one.

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
    """

    def __init__(
        self,
        *,
        keep_models: int = KEEP_MODELS,
        numba_cache_dir: str | os.PathLike | None = None,
        start: bool = True,
        ping_interval_s: float = PING_INTERVAL_S,
        hang_timeout_s: float | None = HANG_TIMEOUT_S,
    ):
        self.keep_models = int(keep_models)
        self.ping_interval_s = float(ping_interval_s)
        self.hang_timeout_s = None if hang_timeout_s is None else float(hang_timeout_s)
        self.numba_cache_dir = None if numba_cache_dir is None else os.fspath(numba_cache_dir)
        self._lock = threading.Lock()  # the child, its pending futures, the counters
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._tokens = itertools.count(1)
        self._incarnations = itertools.count(1)
        self._child: _Child | None = None
        self._shut = False
        self.restarts = 0  # children started after the first one
        _live_processes.add(self)
        if start:
            with self._lock:
                self._ensure_child()

    # -- life cycle ------------------------------------------------------------------------

    def _ensure_child(self) -> _Child:
        """The running child, started if there is none (call with the lock held)."""
        if self._shut:
            raise ProjectionProcessError("the projection process was shut down")
        child = self._child
        if child is not None and not child.closed:
            return child
        if child is not None:
            self.restarts += 1
            log.warning("restarting the projection process (the last one exited with code %s)", child.process.exitcode)
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(child_conn, self.numba_cache_dir, self.keep_models),
            name="segscope-projection",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so the parent's recv sees EOF when the child dies
        child = _Child(process, parent_conn, next(self._incarnations))
        threading.Thread(target=self._receive, args=(child,), name="segscope-projection-receiver", daemon=True).start()
        if self.hang_timeout_s is not None:
            threading.Thread(
                target=self._watch, args=(child,), name="segscope-projection-watchdog", daemon=True
            ).start()
        self._child = child
        return child

    @property
    def alive(self) -> bool:
        """True while a child runs (False before the first request with ``start=False``)."""
        child = self._child
        return child is not None and not child.closed and child.process.is_alive()

    @property
    def pid(self) -> int | None:
        """The current child's process id (None when there is none)."""
        child = self._child
        return None if child is None else child.process.pid

    @property
    def incarnation(self) -> int:
        """Which child this is (1 for the first; each restart adds one); 0 before any."""
        child = self._child
        return 0 if child is None else child.incarnation

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the child (terminate it if it does not exit within ``timeout`` s).

        Idempotent; also runs at interpreter exit. Pending futures fail, and later
        requests raise :class:`ProjectionProcessError`.
        """
        with self._lock:
            if self._shut:
                return
            self._shut = True
            child = self._child
            if child is None:
                _live_processes.discard(self)
                return
            child.stopping = True
            closed = child.closed
        # A sender stuck on a hung child holds the send lock: then just terminate.
        if not closed:
            self._send_quietly(child, ("stop", None), timeout)
        child.process.join(timeout)
        if child.process.is_alive():
            log.warning("projection process did not stop in %.0f s; terminating it", timeout)
            child.process.terminate()
            child.process.join(2.0)
        with self._lock:
            self._fail_pending(child, ProjectionProcessError("the projection process was shut down"))
        try:
            child.conn.close()
        except OSError:
            pass
        _live_processes.discard(self)

    # -- requests --------------------------------------------------------------------------

    def _request(self, kind: str, *args) -> Future:
        future: Future = Future()
        with self._lock:
            child = self._ensure_child()
            token = next(self._tokens)
            if not child.pending:
                child.heard = time.monotonic()  # an idle child's silence does not count
            child.pending[token] = future
        try:
            # Not under self._lock: a big send waits for the child to read it, and the
            # receiver must still be able to resolve other futures meanwhile.
            with self._send_lock:
                child.conn.send((kind, token, *args))
        except (OSError, BrokenPipeError, ValueError) as exc:
            # The child is gone (or was stopped); the receiver fails the others. This one
            # fails here in case the receiver has already finished.
            with self._lock:
                mine = child.pending.pop(token, None)
                child.closed = True
            if mine is not None and mine.set_running_or_notify_cancel():
                mine.set_exception(ProjectionProcessError(f"the projection process is gone ({exc})"))
        return future

    def ping(self) -> Future:
        """Future of the child's process id (a cheap liveness check)."""
        return self._request("ping")

    def warm_up(self, settings: UmapSettings = UmapSettings(seed=None)) -> Future:
        """Compile (or load from numba's disk cache) the kernels ``settings`` fits use.

        Future of :func:`segscope.analysis.projection.warm_up`'s timings dict (seconds).
        """
        return self._request("warm_up", settings)

    def fit(self, embeddings: Any, settings: UmapSettings = UmapSettings(), init: Any = None) -> Future:
        """Fit UMAP on float32 ``[N, D]`` embeddings, optionally from float64 ``[N, 2]`` ``init``.

        Future of a :class:`FitResult`; the model stays in the child under its
        ``model_id`` for :meth:`transform`. Bad input fails the future with ValueError.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        init = None if init is None else np.ascontiguousarray(init, dtype=np.float64)
        with self._lock:
            model_id = next(self._tokens)  # unique across restarts: an old id never aliases
        return self._request("fit", model_id, embeddings, settings, init)

    def transform(self, model_id: int, embeddings: Any) -> Future:
        """Place float32 ``[M, D]`` embeddings with model ``model_id``: future of float32 ``[M, 2]``.

        Fails with :class:`ModelNotFoundError` for a model the child does not hold, and
        ValueError for embeddings of the wrong width.
        """
        return self._request("transform", int(model_id), np.ascontiguousarray(embeddings, dtype=np.float32))

    def drop(self, model_id: int) -> Future:
        """Forget model ``model_id`` in the child (no error if it is not there)."""
        return self._request("drop", int(model_id))

    # -- the receiver --------------------------------------------------------------------

    def _receive(self, child: _Child) -> None:
        """Resolve ``child``'s futures from its replies until its pipe closes."""
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # an unpicklable reply: that request fails, the rest go on
                log.exception("unreadable reply from the projection process")
                message = ("error", None, type(exc).__name__, str(exc))
            kind, token = message[0], message[1]
            with self._lock:
                child.heard = time.monotonic()
                future = child.pending.pop(token, None)
            if future is None or not future.set_running_or_notify_cancel():
                continue
            if kind == "ok":
                future.set_result(message[2])
            else:
                future.set_exception(_rebuild_error(message[2], message[3]))
        child.process.join(1.0)  # the pipe closes just before the process ends: read its code
        if child.stopping:
            error = ProjectionProcessError("the projection process was shut down")
        elif child.hung_for is not None:
            error = ProjectionProcessError(
                f"the projection process stopped answering for "
                f"{child.hung_for:.0f} s and was stopped; the next request "
                "starts a new one"
            )
        else:
            code = child.process.exitcode
            error = ProjectionProcessError(f"the projection process exited (code {code})")
            log.warning("%s", error)
        with self._lock:
            self._fail_pending(child, error)

    def _watch(self, child: _Child) -> None:
        """Ping ``child`` while requests wait on it; kill it after ``hang_timeout_s`` of silence."""
        while True:
            time.sleep(min(self.ping_interval_s, self.hang_timeout_s) / 2)
            with self._lock:
                if child.closed or child.stopping:
                    return
                if not child.pending:
                    continue
                silent = time.monotonic() - child.heard
                hung = silent >= self.hang_timeout_s
                if hung:
                    child.hung_for = silent
                    child.closed = True  # new requests start a new child
                now = time.monotonic()
                ping = not hung and silent >= self.ping_interval_s and now - child.pinged >= self.ping_interval_s
                if ping:
                    token = next(self._tokens)
                    child.pending[token] = Future()  # its reply only refreshes child.heard
                    child.pinged = now
            if hung:
                log.warning(
                    "the projection process (pid %s) has not answered for %.0f s; killing it", child.process.pid, silent
                )
                child.process.kill()  # SIGKILL: a stopped or deadlocked child ignores SIGTERM
                return  # the receiver sees the pipe close and fails the pending futures
            if ping:
                # Unsent (the pipe is gone, or a send is stuck on the child) changes nothing:
                # the receiver closes a gone child, and a stuck one stays silent until killed.
                self._send_quietly(child, ("ping", token), self.ping_interval_s)

    def _send_quietly(self, child: _Child, message: tuple, timeout: float) -> bool:
        """Send a control message unless the send lock stays taken for ``timeout`` s or
        the pipe is gone; True if it was sent."""
        if not self._send_lock.acquire(timeout=timeout):
            return False
        try:
            child.conn.send(message)
            return True
        except (OSError, BrokenPipeError, ValueError):
            return False
        finally:
            self._send_lock.release()

    @staticmethod
    def _fail_pending(child: _Child, error: Exception) -> None:
        """Fail every pending future of ``child`` (call with the lock held)."""
        child.closed = True
        pending, child.pending = child.pending, {}
        for future in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(error)


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
    """A UMAP model living in a :class:`ProjectionProcess`: what the scheduler uses of
    :class:`segscope.analysis.projection.UmapModel`.

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
    """

    def __init__(self, process: ProjectionProcess | None = None):
        self._owned = process is None
        self.process = ProjectionProcess() if process is None else process

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
