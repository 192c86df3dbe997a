"""A Qt-free job runner: one worker thread that drives SegScope's compute generators.

Compute functions in :mod:`analysis` are generators that ``yield Progress`` once per batch
and ``return`` their result. :class:`JobRunner` runs them one at a time on a single worker
thread (one accelerator, one TensorFlow graph: running two jobs at once would only make
both slower), checks a cancel flag between batches, and hands every report to the caller
through ``post``: a function that schedules a zero-argument callable on the consumer's
thread. The Qt app passes a ``post`` that emits a queued signal, so updates run on the Qt
main thread; headless code and tests may pass ``None`` and receive updates on the worker
thread.

Jobs belong to a *lane* (``kind``). Submitting a job with ``supersede=True`` raises its
lane's generation counter and cancels older jobs of that lane, queued or running; any of
their updates still in flight are dropped on delivery because their generation is no
longer current. Jobs of other lanes (for example loading the model) are untouched.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from segscope.analysis.progress import Progress

log = logging.getLogger(__name__)

#: Exceptions that describe bad input or missing data; logged without a traceback.
EXPECTED_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError, LookupError)

Post = Callable[[Callable[[], None]], None]


def _call_now(fn: Callable[[], None]) -> None:
    fn()


@dataclass(frozen=True)
class JobUpdate:
    """One report about a job, delivered on the consumer's thread.

    Attributes
    ----------
    job : Job
        The job reported on.
    event : str
        ``"started"``, ``"progress"``, ``"finished"``, ``"cancelled"`` or ``"failed"``.
    progress : Progress or None
        The generator's report (``"progress"`` events).
    result : Any
        The generator's return value (``"finished"``).
    error : BaseException or None
        What the generator raised (``"failed"``).
    """

    job: Job
    event: str
    progress: Progress | None = None
    result: Any = None
    error: BaseException | None = None

    @property
    def terminal(self) -> bool:
        """True for the last update a job ever gets."""
        return self.event in ("finished", "cancelled", "failed")


class Job:
    """A submitted job: its identity, lane, generation and cancel flag."""

    def __init__(
        self,
        job_id: int,
        kind: str,
        name: str,
        generation: int,
        make_generator: Callable[[], Generator[Progress, None, Any]],
        on_update: Callable[[JobUpdate], None],
    ):
        self.id = job_id
        self.kind = kind
        self.name = name
        self.generation = generation
        self._make_generator = make_generator
        self._on_update = on_update
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Ask the job to stop; it stops before its next batch (or before it starts)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        """True once the worker has finished with the job (any outcome)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has finished with the job; False on timeout."""
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind!r}, name={self.name!r}, generation={self.generation})"


class JobRunner:
    """Runs compute generators on one worker thread, in submission order.

    Parameters
    ----------
    post
        Schedules a zero-argument callable on the thread that should see updates (the Qt
        main thread in the app). ``None`` calls it directly on the worker thread.
    name
        Name of the worker thread (shows up in debuggers and logs).
    """

    def __init__(self, post: Post | None = None, *, name: str = "segscope-worker"):
        self._post = post or _call_now
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._generation: dict[str, int] = {}
        self._active: dict[int, Job] = {}
        self._running: Job | None = None
        self._closed = False
        # Daemon: a TensorFlow call cannot be interrupted, and must not keep the app alive.
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- submitting and cancelling ---------------------------------------------------

    def submit(
        self,
        name: str,
        make_generator: Callable[[], Generator[Progress, None, Any]],
        on_update: Callable[[JobUpdate], None],
        *,
        kind: str = "default",
        supersede: bool = True,
    ) -> Job:
        """Queue a job.

        Parameters
        ----------
        name
            Short description shown to the user (``"embedding segment 12"``).
        make_generator
            Called on the worker thread to create the generator, so even its set-up work
            stays off the caller's thread.
        on_update
            Receives every :class:`JobUpdate` of this job through ``post``; updates of
            superseded jobs are never delivered.
        kind
            The job's lane.
        supersede
            Cancel and silence every older job of the same lane.

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the job runner has been shut down")
            generation = self._generation.get(kind, 0)
            if supersede:
                generation += 1
                self._generation[kind] = generation
                for job in self._active.values():
                    if job.kind == kind:
                        job.cancel()
            job = Job(next(self._ids), kind, name, generation, make_generator, on_update)
            self._active[job.id] = job
        log.debug("submitted %r", job)
        self._queue.put(job)
        return job

    def cancel(self, kind: str | None = None) -> list[Job]:
        """Cancel the queued and running jobs of lane ``kind`` (all lanes when None).

        Cancelled jobs still deliver their ``"cancelled"`` update, so views can settle.
        Returns the jobs asked to stop.
        """
        with self._lock:
            jobs = [job for job in self._active.values() if kind is None or job.kind == kind]
        for job in jobs:
            job.cancel()
        return jobs

    def is_current(self, job: Job) -> bool:
        """True while no newer superseding job of the same lane has been submitted."""
        with self._lock:
            return self._generation.get(job.kind, 0) == job.generation

    @property
    def running(self) -> Job | None:
        """The job on the worker right now, if any."""
        with self._lock:
            return self._running

    @property
    def busy(self) -> bool:
        """True while a job is queued or running."""
        with self._lock:
            return bool(self._active)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job is finished; False on timeout (headless use)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            with self._lock:
                pending = list(self._active.values())
            if not pending:
                return True
            remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not pending[0].wait(remaining) and deadline is not None and time.perf_counter() >= deadline:
                return False

    def shutdown(self, *, wait: bool = True, timeout: float | None = 10.0) -> None:
        """Cancel everything and stop the worker. Idempotent.

        With ``wait`` the call blocks until the worker exits or ``timeout`` seconds pass
        (a TensorFlow call in progress cannot be interrupted; the thread is a daemon).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.cancel()
        self._queue.put(None)
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("job worker still busy %.0f s after shutdown; leaving it", timeout or 0)

    # -- the worker ------------------------------------------------------------------

    def _deliver(self, update: JobUpdate) -> None:
        """Hand an update to its job's consumer on the consumer's thread, unless stale."""

        def deliver() -> None:
            if not self.is_current(update.job):
                log.debug("dropping %s of superseded %r", update.event, update.job)
                return
            try:
                update.job._on_update(update)
            except Exception:  # a broken view must not kill the worker or the event loop
                log.exception("update handler of %r failed on %s", update.job, update.event)

        self._post(deliver)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    self._active.pop(job.id, None)
                job._done.set()

    def _run(self, job: Job) -> None:
        if job.cancel_requested:
            self._deliver(JobUpdate(job, "cancelled"))
            return
        self._deliver(JobUpdate(job, "started"))
        try:
            generator = job._make_generator()
            while True:
                if job.cancel_requested:
                    generator.close()  # runs the generator's finally blocks
                    log.debug("cancelled %r", job)
                    self._deliver(JobUpdate(job, "cancelled"))
                    return
                try:
                    report = next(generator)
                except StopIteration as stop:
                    self._deliver(JobUpdate(job, "finished", result=stop.value))
                    return
                self._deliver(JobUpdate(job, "progress", progress=report))
        except Exception as exc:
            if job.cancel_requested:
                # A generator may stop itself by raising when it sees the cancel flag
                # (segscope.analysis.inference.InferenceCancelled): that is a cancellation.
                log.debug("%r stopped on cancel with %r", job, exc)
                self._deliver(JobUpdate(job, "cancelled"))
                return
            if isinstance(exc, EXPECTED_ERRORS):
                log.warning("%s failed: %s", job.name, exc)
            else:
                log.exception("%s failed", job.name)
            self._deliver(JobUpdate(job, "failed", error=exc))
