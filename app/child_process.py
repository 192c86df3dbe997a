"""One runner for SegScope's child processes (TensorFlow's, UMAP's): spawn, talk, watch, restart.

Why children at all is told in :mod:`segscope.app.compute_process` (TensorFlow and Qt
WebEngine's Mesa LLVM crash in one process) and :mod:`segscope.app.projection_process`
(numba holds the GIL while it compiles). This module is what both have in common.

Protocol
--------
One pipe, typed messages (frozen dataclasses below). The parent sends :class:`Request`
(a request id and a payload dataclass the child understands), :class:`Cancel`,
:class:`Ping` and :class:`Stop`; the child answers with :class:`Ready` once at start, then
per request any number of :class:`Update` (progress, e.g. a batch of embeddings) and one
:class:`Result` or :class:`Failure` (exception type name and message), and a :class:`Pong`
per ping. In the parent every request has a :class:`Call` (a
:class:`concurrent.futures.Future`) that a reader thread resolves.

In the child (:func:`serve`) the main thread only reads the pipe: it answers pings at
once, marks cancels, and hands requests to worker threads ("lanes"), so a child busy for
minutes still answers pings, and a ping that goes unanswered means the child is frozen.

Failures
--------
- The child dies (killed, crashed, exited): its pipe closes, every pending call fails with
  the runner's ``error_type`` ("the compute process died (exit code -9); it restarts on
  the next request"), and ``on_event`` hears about it.
- The child freezes (a deadlock, SIGSTOP): while calls are pending a watchdog pings it
  every ``ping_interval_s``; after ``hang_timeout_s`` without any message the child is
  killed (SIGKILL) and its calls fail the same way ("stopped answering for 120 s and was
  killed").
- The next request starts a new child. Requests registered with :meth:`ChildProcessRunner.set_init`
  (a loaded model, say) are replayed into it first, so it is in the state its caller expects.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between pings while requests wait, and of silence after which a child is taken
#: for hung and killed. Cold numba compiles and 100k-point fits on a loaded 2-core machine
#: still answer pings within a second or two, since the child's main thread answers them.
PING_INTERVAL_S = 10.0
HANG_TIMEOUT_S = 120.0
#: Silence allowed before a new child's first message: a fresh interpreter imports numpy,
#: numba or TensorFlow's wrappers on a loaded machine before it can answer anything.
STARTUP_TIMEOUT_S = 60.0


class ChildProcessFailure(RuntimeError):
    """A child process died, stopped answering, was shut down, or failed unexpectedly."""


# -- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Parent to child: run ``payload`` (a dataclass the child's handler knows)."""

    request_id: int
    payload: Any


@dataclass(frozen=True)
class Cancel:
    """Parent to child: the caller gave up on request ``request_id``."""

    request_id: int


@dataclass(frozen=True)
class Ping:
    """Parent to child: answer with a :class:`Pong` (the child's main thread does at once)."""

    request_id: int


@dataclass(frozen=True)
class Stop:
    """Parent to child: exit."""


@dataclass(frozen=True)
class Ready:
    """Child to parent, once: the child reads requests now."""

    pid: int


@dataclass(frozen=True)
class Pong:
    """Child to parent: the answer to a :class:`Ping`, with the child's process id."""

    request_id: int
    pid: int


@dataclass(frozen=True)
class Update:
    """Child to parent: progress of request ``request_id`` (any number before its end)."""

    request_id: int
    payload: Any


@dataclass(frozen=True)
class Result:
    """Child to parent: request ``request_id`` returned ``value``."""

    request_id: int
    value: Any


@dataclass(frozen=True)
class Failure:
    """Child to parent: request ``request_id`` raised ``type_name(message)``."""

    request_id: int
    type_name: str
    message: str


# -- errors across the pipe ----------------------------------------------------------------

_ERROR_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "KeyError": KeyError,
    "FileNotFoundError": FileNotFoundError,
    "PermissionError": PermissionError,
    "MemoryError": MemoryError,
    # SegScope's own errors subclass ValueError / KeyError; keep their meaning.
    "VolumeError": ValueError,
    "DatasetError": ValueError,
    "CheckpointMismatchError": ValueError,
    "SegmentNotFoundError": KeyError,
}


def rebuild_error(
    type_name: str,
    message: str,
    *,
    own: dict[str, type[Exception]] | None = None,
    unknown: Callable[[str], Exception] | None = None,
) -> Exception:
    """A child's exception (sent as type name and message) as the nearest built-in type.

    Parameters
    ----------
    type_name, message
        What the child raised.
    own
        A child's own exception names mapped to classes (checked first).
    unknown
        Makes the error for any other type from ``"TypeName: message"`` (default
        :class:`ChildProcessFailure`).

    Returns
    -------
    Exception
        The exception to raise in the parent, its message kept.
    """
    if own and type_name in own:
        return own[type_name](message)
    if type_name in _ERROR_TYPES:
        return _ERROR_TYPES[type_name](message)
    return (unknown or ChildProcessFailure)(f"{type_name}: {message}")


def _message_of(exc: BaseException) -> str:
    # KeyError's str() quotes its message; the parent rebuilds it from the bare text.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


# -- the child side ------------------------------------------------------------------------


class Lane:  # pragma: no cover - runs in the child
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
                log.exception("child request failed outside its handler")
            finally:
                self.queue.task_done()


class RequestContext:  # pragma: no cover - runs in the child
    """What a child's handler gets beside its payload: progress and the cancel flag."""

    def __init__(self, server: _Server, request_id: int):
        self._server = server
        self.request_id = request_id

    def progress(self, payload: Any) -> None:
        """Send ``payload`` to the parent as progress of this request."""
        self._server.send(Update(self.request_id, payload))

    def cancelled(self) -> bool:
        """True once the parent cancelled this request."""
        with self._server.lock:
            return self.request_id in self._server.cancelled


class _Server:  # pragma: no cover - runs in the child
    def __init__(self, conn, handle, lane_of):
        self.conn = conn
        self.handle = handle
        self.lane_of = lane_of
        self.lanes: dict[Hashable, Lane] = {}
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()  # live and cancelled
        self.live: set[int] = set()
        self.cancelled: set[int] = set()

    def send(self, message) -> Exception | None:
        """Send ``message``; the error if it cannot be pickled, else None.

        A gone parent is ignored: the main loop sees EOF and exits.
        """
        try:
            data = ForkingPickler.dumps(message)
        except Exception as exc:  # reported to the caller by run()
            return exc
        with self.send_lock:
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                pass
        return None

    def serve(self) -> None:
        self.send(Ready(os.getpid()))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unreadable request: nothing to answer it with
                log.exception("unreadable request")
                continue
            if isinstance(message, Stop):
                break
            if isinstance(message, Ping):
                self.send(Pong(message.request_id, os.getpid()))
            elif isinstance(message, Cancel):
                with self.lock:
                    if message.request_id in self.live:
                        self.cancelled.add(message.request_id)
            elif isinstance(message, Request):
                with self.lock:
                    self.live.add(message.request_id)
                lane = "worker" if self.lane_of is None else self.lane_of(message.payload)
                if lane is None:
                    self.run(message)  # quick requests, answered between pings
                else:
                    if lane not in self.lanes:
                        self.lanes[lane] = Lane(f"child-{lane}")
                    self.lanes[lane].submit(functools.partial(self.run, message))
            else:
                log.warning("unknown message %r", type(message).__name__)
        # Exit now, without the interpreter's teardown: a numba fit or a TensorFlow batch
        # cannot be interrupted, and even an idle child took 1-2 s to tear down numba's
        # and TensorFlow's modules (longer on a loaded machine, where the parent's 5 s
        # shutdown timeout then ran out on every quit). The child keeps no state that
        # needs saving; only its buffered output is flushed, and multiprocessing's exit
        # finalizers run (they unlink the semaphores numba's thread launch creates, which the
        # resource tracker otherwise reports as leaked when the app quits).
        try:
            from multiprocessing import util

            util._run_finalizers(0)  # type: ignore[attr-defined]  # what multiprocessing's exit runs
        except Exception:  # a finalizer's failure must not keep the child alive
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)

    def run(self, message: Request) -> None:
        request_id = message.request_id
        try:
            value = self.handle(message.payload, RequestContext(self, request_id))
        except Exception as exc:  # every failure goes back to the caller
            self.send(Failure(request_id, type(exc).__name__, _message_of(exc)))
        else:
            problem = self.send(Result(request_id, value))
            if problem is not None:
                self.send(Failure(request_id, "TypeError", f"the result could not be sent back: {problem}"))
        finally:
            with self.lock:
                self.live.discard(request_id)
                self.cancelled.discard(request_id)


def serve(
    conn,
    handle: Callable[[Any, RequestContext], Any],
    *,
    lane_of: Callable[[Any], Hashable | None] | None = None,
) -> None:  # pragma: no cover - runs in the child
    """Serve requests in a child until the parent sends :class:`Stop` or goes away, then exit.

    The process exits with ``os._exit(0)`` at once, busy lanes or not (no interpreter
    teardown), so the parent's :meth:`ChildProcessRunner.shutdown` takes milliseconds.

    Parameters
    ----------
    conn
        The child's end of the pipe (the first argument of a runner's ``target``).
    handle
        ``handle(payload, context)``: the request's result, or raises (the exception's
        type name and message go back). Runs on a lane thread.
    lane_of
        Which lane (worker thread, created on first use) runs a payload; requests on one
        lane run in order. None from it runs the request on the reading thread (only for
        quick ones); without ``lane_of`` every request runs on one lane.
    """
    _Server(conn, handle, lane_of).serve()


# -- the parent side -----------------------------------------------------------------------


class Call(Future):
    """The future of one request; ``request_id`` identifies it to :meth:`ChildProcessRunner.cancel`."""

    def __init__(self, request_id: int):
        super().__init__()
        self.request_id = request_id


@dataclass
class _Pending:
    call: Future
    on_progress: Callable[[Any], None] | None = None


class _Child:
    """One incarnation of the child: its process, pipe end and pending calls."""

    def __init__(self, process, conn, incarnation: int, restored: int):
        self.process = process
        self.conn = conn
        self.incarnation = incarnation
        self.restored = restored  # set-up requests replayed into it
        self.send_lock = threading.Lock()  # per child: a send stuck on a dead one blocks no other
        # Joins (waitpid) one thread at a time: when the reader and shutdown both joined the
        # exiting child, the one that lost the reap saw ECHILD, took the dead child for alive
        # and logged "did not stop in 5 s" (then signalled a reaped pid) at random quits.
        self.reap_lock = threading.Lock()
        # Closes the pipe once. Connection.close is not thread-safe: the reader and shutdown
        # both closing it could close its file descriptor twice, and the second close hit
        # whatever reused the number meanwhile (the next child's pipe: "Bad file
        # descriptor" or a reader reading a closed handle in the Qt and child tests).
        self.close_lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.pending: dict[int, _Pending] = {}
        self.ready = False  # sent Ready
        self.closed = False  # no new requests: it exited, hung or is being stopped
        self.stopping = False
        self.hung_for: float | None = None  # seconds of silence, when the watchdog killed it
        # When the child last spoke, or when requests started waiting on an idle child
        # (time.monotonic); the watchdog measures silence from here.
        self.heard = time.monotonic()
        self.pinged = 0.0

    def close_pipe(self) -> None:
        """Close the parent's end of the pipe (once, whichever thread comes first)."""
        with self.close_lock:
            try:
                self.conn.close()  # a no-op once closed: the handle is then None
            except OSError:
                pass


_live_runners: weakref.WeakSet[ChildProcessRunner] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for runner in list(_live_runners):
        runner.shutdown(timeout=2.0)


class ChildProcessRunner:
    """A ``spawn``-ed child process serving requests, watched and restarted.

    Thread-safe: any thread may send requests; each returns a :class:`Call` at once,
    resolved by a reader thread when the child answers.

    Parameters
    ----------
    name
        What messages call it: "the ``name`` process died ...".
    target
        Module-level function the child runs as ``target(conn, *args)``; it sets up and
        calls :func:`serve`.
    args
        Picklable extra arguments for ``target``.
    start
        Start the child now (its start-up then overlaps the caller's work), rather than at
        the first request.
    ping_interval_s, hang_timeout_s
        The watchdog's ping period and the silence (seconds) after which a child with
        requests waiting is killed as hung; ``hang_timeout_s=None`` turns the watchdog off.
    on_event
        Called with a one-line message when the child died or hung, when a new one has
        started in its place, and when replaying its set-up failed. Runs on the runner's
        reader thread: post to a GUI thread from it, do not block.
    error_type
        The exception for process failures (died, hung, shut down, gone) and for child
        exceptions of unknown type.
    own_errors
        The child's own exception type names mapped to classes, for :func:`rebuild_error`.
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: tuple = (),
        *,
        start: bool = True,
        ping_interval_s: float = PING_INTERVAL_S,
        hang_timeout_s: float | None = HANG_TIMEOUT_S,
        on_event: Callable[[str], None] | None = None,
        error_type: type[Exception] = ChildProcessFailure,
        own_errors: dict[str, type[Exception]] | None = None,
    ):
        self.name = name
        self.target = target
        self.args = tuple(args)
        self.ping_interval_s = float(ping_interval_s)
        self.hang_timeout_s = None if hang_timeout_s is None else float(hang_timeout_s)
        self.on_event = on_event
        self.error_type = error_type
        self.own_errors = dict(own_errors or {})
        self._lock = threading.Lock()  # the child, its pending calls, init requests, counters
        self._ids = itertools.count(1)
        self._incarnations = itertools.count(1)
        self._child: _Child | None = None
        self._init: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._shut = False
        self.restarts = 0  # children started after the first one
        _live_runners.add(self)
        if start:
            with self._lock:
                self._ensure_child()

    # -- state -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while a child runs (False before the first request with ``start=False``)."""
        child = self._child
        if child is None or child.closed:
            return False
        if not child.reap_lock.acquire(blocking=False):
            return True  # being joined right now: not gone yet
        try:
            return child.process.is_alive()
        finally:
            child.reap_lock.release()

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

    def set_init(self, key: Hashable, payload: Any | None) -> None:
        """Replay request ``payload`` into every later child before any other request.

        For requests that set the child's state (load a model): a restarted child then
        answers like the one it replaces. One payload per ``key``, replayed in the order
        the keys were first set; None forgets ``key``. The replay is sent while the
        runner's lock is held, so keep these payloads small (paths, not arrays).
        """
        with self._lock:
            if payload is None:
                self._init.pop(key, None)
            else:
                self._init[key] = payload

    # -- life cycle ------------------------------------------------------------------------

    def _error(self, text: str) -> Exception:
        return self.error_type(text)

    def _ensure_child(self) -> _Child:
        """The running child, started if there is none (call with the lock held)."""
        if self._shut:
            raise self._error(f"the {self.name} process was shut down")
        child = self._child
        if child is not None and not child.closed:
            return child
        if child is not None:
            self.restarts += 1
            log.warning("restarting the %s process", self.name)
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(
            target=self.target, args=(child_conn, *self.args), name=f"segscope-{self.name}", daemon=True
        )
        process.start()
        child_conn.close()  # so the parent's recv sees EOF when the child dies
        child = _Child(process, parent_conn, next(self._incarnations), len(self._init))
        self._child = child
        child.reader = threading.Thread(
            target=self._read, args=(child,), name=f"segscope-{self.name}-reader", daemon=True
        )
        child.reader.start()
        if self.hang_timeout_s is not None:
            threading.Thread(
                target=self._watch, args=(child,), name=f"segscope-{self.name}-watchdog", daemon=True
            ).start()
        # Replayed before the caller's request: the child runs a lane's requests in order.
        for key, payload in self._init.items():
            request_id = next(self._ids)
            call = Call(request_id)
            call.add_done_callback(functools.partial(self._init_done, key))
            child.pending[request_id] = _Pending(call)
            try:
                with child.send_lock:  # a fresh child's lock: never contended for long
                    child.conn.send(Request(request_id, payload))
            except (OSError, ValueError):
                break  # the new child died at once; its reader fails what is pending
        return child

    def _init_done(self, key: Hashable, call: Future) -> None:
        error = None if call.cancelled() else call.exception()
        # A process failure is told by its own event; here only the child's refusals.
        if error is not None and not isinstance(error, self.error_type):
            self._emit(f"the {self.name} process could not restore {key} after a restart: {error}")

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the child (terminate it if it does not exit within ``timeout`` s).

        Idempotent; also runs at interpreter exit. Pending calls fail, and later requests
        raise ``error_type``.
        """
        with self._lock:
            if self._shut:
                return
            self._shut = True
            _live_runners.discard(self)
            child = self._child
            if child is None:
                return
            child.stopping = True
            closed = child.closed
        if not closed:
            self._send_quietly(child, Stop(), timeout)
        with child.reap_lock:
            started = time.monotonic()
            child.process.join(timeout)
            if child.process.is_alive():
                log.warning(
                    "the %s process did not stop in %.1f s; terminating it", self.name, time.monotonic() - started
                )
                child.process.terminate()
                child.process.join(2.0)
                if child.process.is_alive():  # a stopped (SIGSTOP) child ignores SIGTERM
                    child.process.kill()
                    child.process.join(2.0)
        self._fail_pending(child, self._error(f"the {self.name} process was shut down"))
        # The child is gone, so its reader sees the pipe's end at once and closes it; closing
        # it here while the reader is still in recv would pull the handle from under it.
        if child.reader is not None and child.reader is not threading.current_thread():
            child.reader.join(2.0)
        # Under the send lock as the reader does: a send still in progress on another thread
        # must not find its handle gone. The child is joined, so a send cannot be stuck.
        if child.send_lock.acquire(timeout=2.0):
            try:
                child.close_pipe()
            finally:
                child.send_lock.release()

    # -- requests --------------------------------------------------------------------------

    def request(self, payload: Any, *, on_progress: Callable[[Any], None] | None = None) -> Call:
        """Send ``payload`` to the child; its :class:`Call`.

        Parameters
        ----------
        payload
            A picklable object the child's handler knows (a frozen dataclass).
        on_progress
            Called on the reader thread with each progress payload, in order, before the
            call resolves.

        Returns
        -------
        Call
            Resolves to the handler's result, or fails with the child's exception (rebuilt
            by :func:`rebuild_error`) or ``error_type`` when the child died, hung or was
            shut down.

        Raises
        ------
        Exception
            ``error_type`` after :meth:`shutdown`; a pickling error for a payload that
            cannot be sent.
        """
        return self._submit(lambda request_id: Request(request_id, payload), on_progress)

    def ping(self) -> Call:
        """A cheap liveness check: a call resolving to the child's process id."""
        return self._submit(Ping, None)

    def cancel(self, call: Call) -> None:
        """Tell the child that ``call``'s caller gave up (a no-op once it resolved).

        The child's handler sees it through ``context.cancelled()``; the call still
        resolves with whatever the handler then returns or raises.
        """
        with self._lock:
            child = self._child
            live = child is not None and not child.closed and call.request_id in child.pending
        if live and child is not None:
            self._send_quietly(child, Cancel(call.request_id), 1.0)

    def _submit(self, make: Callable[[int], Any], on_progress) -> Call:
        request_id = next(self._ids)
        # Pickled first, outside every lock: big arrays take a while, and a payload that
        # cannot be pickled is the caller's error, not the child's.
        data = ForkingPickler.dumps(make(request_id))
        call = Call(request_id)
        with self._lock:
            child = self._ensure_child()
            if not child.pending:
                child.heard = time.monotonic()  # an idle child's silence does not count
            child.pending[request_id] = _Pending(call, on_progress)
        try:
            # Not under self._lock: a big send waits for the child to read it, and the
            # reader must still be able to resolve other calls meanwhile.
            with child.send_lock:
                child.conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            # The child is gone (its reader fails the others); this one fails here in
            # case the reader has already finished.
            with self._lock:
                mine = child.pending.pop(request_id, None)
                child.closed = True
            if mine is not None:
                self._settle(mine.call, error=self._error(f"the {self.name} process is gone ({exc}); {self._again()}"))
        return call

    def _again(self) -> str:
        return "it restarts on the next request"

    # -- the reader and the watchdog -------------------------------------------------------

    def _read(self, child: _Child) -> None:
        """Resolve ``child``'s calls from its messages until its pipe closes."""
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable message: skip it, the rest go on
                log.exception("unreadable message from the %s process", self.name)
                continue
            entry = None
            with self._lock:
                child.heard = time.monotonic()
                if isinstance(message, Ready):
                    child.ready = True
                elif isinstance(message, Update):
                    entry = child.pending.get(message.request_id)
                else:
                    entry = child.pending.pop(getattr(message, "request_id", -1), None)
            if isinstance(message, Ready) and child.incarnation > 1:
                restored = f"; replaying {child.restored} set-up requests" if child.restored else ""
                self._emit(f"the {self.name} process was restarted (pid {message.pid}){restored}")
            if entry is None:
                continue
            if isinstance(message, Update):
                if entry.on_progress is not None:
                    try:
                        entry.on_progress(message.payload)
                    except Exception:
                        log.exception("a progress callback of the %s process failed", self.name)
            elif isinstance(message, Result):
                self._settle(entry.call, value=message.value)
            elif isinstance(message, Pong):
                self._settle(entry.call, value=message.pid)
            elif isinstance(message, Failure):
                self._settle(entry.call, error=self._rebuild(message.type_name, message.message))
        with child.reap_lock:
            child.process.join(1.0)  # the pipe closes just before the process ends: read its code
        if child.stopping:
            error, event = self._error(f"the {self.name} process was shut down"), None
        else:
            if child.hung_for is not None:
                event = f"the {self.name} process stopped answering for {child.hung_for:.0f} s and was killed"
            else:
                code = child.process.exitcode
                event = f"the {self.name} process died (exit code {'unknown' if code is None else code})"
            error = self._error(f"{event}; {self._again()}")
            log.warning("%s", error)
        with self._lock:
            child.closed = True  # before on_event: a request made from it starts a new child
        if event is not None:
            # Told before the calls fail, so a UI shows why before it shows the failed job.
            self._emit(f"{event}; {self._again()}")
        self._fail_pending(child, error)
        if child.send_lock.acquire(timeout=1.0):
            try:
                child.close_pipe()
            finally:
                child.send_lock.release()

    def _rebuild(self, type_name: str, message: str) -> Exception:
        return rebuild_error(
            type_name,
            message,
            own=self.own_errors,
            unknown=lambda text: self._error(f"{text} (in the {self.name} process)"),
        )

    def _watch(self, child: _Child) -> None:
        """Ping ``child`` while calls wait on it; kill it after ``hang_timeout_s`` of silence."""
        assert self.hang_timeout_s is not None
        while True:
            time.sleep(min(self.ping_interval_s, self.hang_timeout_s) / 2)
            with self._lock:
                if child.closed or child.stopping:
                    return
                if not child.pending:
                    continue
                now = time.monotonic()
                silent = now - child.heard
                limit = self.hang_timeout_s if child.ready else max(self.hang_timeout_s, STARTUP_TIMEOUT_S)
                hung = silent >= limit
                if hung:
                    child.hung_for = silent
                    child.closed = True  # new requests start a new child
                # Before Ready the child reads nothing: a ping would only wait in the pipe.
                ping = (
                    not hung
                    and child.ready
                    and silent >= self.ping_interval_s
                    and now - child.pinged >= self.ping_interval_s
                )
                if ping:
                    request_id = next(self._ids)
                    child.pending[request_id] = _Pending(Future())  # its pong only refreshes child.heard
                    child.pinged = now
            if hung:
                log.warning(
                    "the %s process (pid %s) has not answered for %.0f s; killing it",
                    self.name,
                    child.process.pid,
                    silent,
                )
                child.process.kill()  # SIGKILL: a stopped or deadlocked child ignores SIGTERM
                return  # the reader sees the pipe close and fails the pending calls
            if ping:
                # Unsent (the pipe is gone, or a send is stuck on the child) changes nothing:
                # the reader closes a gone child, and a stuck one stays silent until killed.
                self._send_quietly(child, Ping(request_id), self.ping_interval_s)

    def _send_quietly(self, child: _Child, message, timeout: float) -> bool:
        """Send a control message; True if sent.

        Gives up when ``child``'s send lock stays taken for ``timeout`` s or its pipe is gone.
        """
        if not child.send_lock.acquire(timeout=timeout):
            return False
        try:
            child.conn.send(message)
            return True
        except (OSError, ValueError):
            return False
        finally:
            child.send_lock.release()

    def _fail_pending(self, child: _Child, error: Exception) -> None:
        """Close ``child`` and fail its pending calls.

        The calls are failed outside the lock: their done callbacks may send new requests.
        """
        with self._lock:
            child.closed = True
            pending, child.pending = child.pending, {}
        for entry in pending.values():
            self._settle(entry.call, error=error)

    @staticmethod
    def _settle(call: Future, *, value: Any = None, error: Exception | None = None) -> None:
        if not call.set_running_or_notify_cancel():
            return  # the caller cancelled the future itself
        if error is not None:
            call.set_exception(error)
        else:
            call.set_result(value)

    def _emit(self, text: str) -> None:
        log.info("%s", text)
        if self.on_event is None:
            return
        try:
            self.on_event(text)
        except Exception:
            log.exception("the %s process's on_event callback failed", self.name)
