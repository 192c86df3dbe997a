"""The job runner: one worker, ordered updates, cancel between batches, superseding."""

from __future__ import annotations

import threading

import pytest

from segscope.analysis.progress import Progress
from segscope.app.jobs import JobRunner


def counting(n: int, gate: threading.Event | None = None, started: threading.Event | None = None):
    """A compute generator: ``n`` batches, waiting on ``gate`` before each after the first."""
    for i in range(n):
        if started is not None and i == 1:
            started.set()
        if gate is not None and i > 0:
            assert gate.wait(5), "test gate never opened"
        yield Progress(i + 1, n, "steps", payload=i)
    return n * 10


@pytest.fixture
def runner():
    r = JobRunner()
    yield r
    r.shutdown()


def test_updates_arrive_in_order_and_result_is_returned(runner):
    seen = []
    job = runner.submit("count", lambda: counting(3), seen.append)
    assert job.wait(5)
    events = [u.event for u in seen]
    assert events == ["started", "progress", "progress", "progress", "finished"]
    assert [u.progress.payload for u in seen if u.event == "progress"] == [0, 1, 2]
    assert seen[-1].result == 30 and seen[-1].terminal


def test_generator_is_created_on_the_worker_thread(runner):
    threads = []

    def make():
        threads.append(threading.current_thread().name)
        return counting(1)

    runner.submit("where", make, lambda u: None).wait(5)
    assert threads == ["segscope-worker"]


def test_cancel_stops_between_batches_and_runs_finally(runner):
    gate, started, closed = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def make():
        def gen():
            try:
                yield from counting(100, gate, started)
            finally:
                closed.set()

        return gen()

    job = runner.submit("long", make, seen.append)
    assert started.wait(5)
    job.cancel()
    gate.set()
    assert job.wait(5)
    assert seen[-1].event == "cancelled"
    assert closed.is_set()
    assert len([u for u in seen if u.event == "progress"]) < 100


def test_superseded_job_is_cancelled_and_silenced(runner):
    gate, started = threading.Event(), threading.Event()
    first, second = [], []
    old = runner.submit("old", lambda: counting(50, gate, started), first.append, kind="embed")
    assert started.wait(5)
    new = runner.submit("new", lambda: counting(2), second.append, kind="embed")
    gate.set()
    assert old.wait(5) and new.wait(5)
    assert old.cancel_requested
    assert not runner.is_current(old) and runner.is_current(new)
    # Nothing of the old job is delivered once the new one exists; the new one completes.
    assert all(u.event in ("started", "progress") for u in first)
    assert [u.event for u in second][-1] == "finished"


def test_other_lanes_are_not_superseded(runner):
    gate, started = threading.Event(), threading.Event()
    model_updates = []
    model = runner.submit("model", lambda: counting(3, gate, started), model_updates.append, kind="model")
    assert started.wait(5)
    runner.submit("click", lambda: counting(1), lambda u: None, kind="embed")
    gate.set()
    assert runner.wait_idle(5)
    assert not model.cancel_requested
    assert model_updates[-1].event == "finished"


def test_errors_are_reported_not_raised(runner):
    def broken():
        yield Progress(0, 1)
        raise ValueError("segment 7 has no voxels")

    seen = []
    runner.submit("broken", broken, seen.append).wait(5)
    assert seen[-1].event == "failed"
    assert isinstance(seen[-1].error, ValueError) and "segment 7" in str(seen[-1].error)


def test_error_after_cancel_counts_as_cancelled(runner):
    gate, started = threading.Event(), threading.Event()

    def stops_by_raising():
        yield Progress(0, 2)
        started.set()
        assert gate.wait(5)
        raise RuntimeError("inference cancelled after 1 of 2 cutouts")
        yield  # pragma: no cover

    seen = []
    job = runner.submit("raises on cancel", stops_by_raising, seen.append)
    assert started.wait(5)
    job.cancel()
    gate.set()
    job.wait(5)
    assert seen[-1].event == "cancelled"


def test_post_carries_updates_to_the_consumer_thread():
    posted = []
    runner = JobRunner(post=posted.append)
    seen = []
    try:
        runner.submit("count", lambda: counting(2), seen.append).wait(5)
        assert seen == []  # nothing runs until the consumer runs the posted callables
        for fn in posted:
            fn()
        assert [u.event for u in seen] == ["started", "progress", "progress", "finished"]
    finally:
        runner.shutdown()


def test_submit_after_shutdown_is_refused():
    runner = JobRunner()
    runner.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit("late", lambda: counting(1), lambda u: None)
