"""The generic child-process runner with a tiny child (no TensorFlow, no umap): replies,
errors, progress and cancel, a killed child, a frozen child, replayed set-up, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from segscope.app.child_process import (
    Call,
    ChildProcessFailure,
    ChildProcessRunner,
    rebuild_error,
    serve,
)

from process_checks import pid_running

pytestmark = pytest.mark.timeout(120)


class TinyError(RuntimeError):
    """The tiny child's own error type (mapped by name in the parent)."""


@dataclass(frozen=True)
class Echo:
    value: Any


@dataclass(frozen=True)
class Raise:
    type_name: str
    message: str


@dataclass(frozen=True)
class Count:
    """Send ``n`` progress updates ``delay`` s apart; stop with TinyError when cancelled."""

    n: int
    delay: float = 0.0


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class SetState:
    value: Any


@dataclass(frozen=True)
class GetState:
    pass


def _tiny_child(conn, greeting: str) -> None:  # pragma: no cover - runs in the child
    state = {"value": None}
    errors = {"ValueError": ValueError, "KeyError": KeyError, "TinyError": TinyError, "OSError": OSError}

    def handle(payload, context):
        if isinstance(payload, Echo):
            return (greeting, payload.value)
        if isinstance(payload, Raise):
            raise errors[payload.type_name](payload.message)
        if isinstance(payload, Count):
            for i in range(payload.n):
                if context.cancelled():
                    raise TinyError(f"cancelled after {i}")
                context.progress(i)
                time.sleep(payload.delay)
            return payload.n
        if isinstance(payload, Sleep):
            time.sleep(payload.seconds)
            return "slept"
        if isinstance(payload, SetState):
            state["value"] = payload.value
            return None
        if isinstance(payload, GetState):
            return state["value"]
        raise ValueError(f"unknown payload {payload!r}")

    serve(conn, handle)


class Events:
    """Collects on_event messages (from the runner's reader thread)."""

    def __init__(self):
        self.messages: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            self.messages.append(text)

    def wait_for(self, fragment: str, count: int = 1, timeout: float = 30.0) -> str:
        """The ``count``-th message containing ``fragment`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [text for text in self.messages if fragment in text]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no event with {fragment!r} in {self.messages}")


def _runner(events=None, **kwargs) -> ChildProcessRunner:
    return ChildProcessRunner(
        "tiny",
        _tiny_child,
        ("hello",),
        on_event=events,
        own_errors={"TinyError": TinyError},
        **kwargs,
    )


@pytest.fixture
def events():
    return Events()


@pytest.fixture
def runner(events):
    child = _runner(events)
    yield child
    child.shutdown()


def test_request_and_reply(runner):
    call = runner.request(Echo([1, 2]))
    assert isinstance(call, Call)
    assert call.result(timeout=30) == ("hello", [1, 2])
    assert runner.ping().result(timeout=30) == runner.pid
    assert runner.alive and runner.incarnation == 1 and runner.restarts == 0


def test_errors_come_back_as_the_nearest_type(runner):
    with pytest.raises(ValueError, match="bad input"):
        runner.request(Raise("ValueError", "bad input")).result(timeout=30)
    with pytest.raises(KeyError) as info:
        runner.request(Raise("KeyError", "no such model")).result(timeout=30)
    assert info.value.args == ("no such model",)  # the message unquoted
    with pytest.raises(TinyError, match="its own"):
        runner.request(Raise("TinyError", "its own")).result(timeout=30)
    with pytest.raises(ChildProcessFailure, match=r"OSError: disk \(in the tiny process\)"):
        runner.request(Raise("OSError", "disk")).result(timeout=30)
    assert runner.request(Echo(1)).result(timeout=30) == ("hello", 1)  # still serving
    assert runner.restarts == 0


def test_rebuild_error_mapping():
    assert type(rebuild_error("SegmentNotFoundError", "x")) is KeyError
    assert type(rebuild_error("VolumeError", "x")) is ValueError
    assert type(rebuild_error("TinyError", "x", own={"TinyError": TinyError})) is TinyError
    error = rebuild_error("ZeroDivisionError", "x")
    assert isinstance(error, ChildProcessFailure) and str(error) == "ZeroDivisionError: x"
    assert str(rebuild_error("Odd", "y", unknown=RuntimeError)) == "Odd: y"


def test_progress_arrives_in_order_and_cancel_reaches_the_handler(runner):
    seen: list[int] = []
    assert runner.request(Count(5), on_progress=seen.append).result(timeout=30) == 5
    assert seen == [0, 1, 2, 3, 4]
    seen.clear()
    started = threading.Event()

    def on_progress(i):
        seen.append(i)
        started.set()

    call = runner.request(Count(10_000, delay=0.01), on_progress=on_progress)
    assert started.wait(30)
    runner.cancel(call)
    with pytest.raises(TinyError, match="cancelled after"):
        call.result(timeout=30)
    assert seen == list(range(len(seen))) and len(seen) < 10_000
    runner.cancel(call)  # resolved already: nothing to do
    assert runner.request(Echo(2)).result(timeout=30) == ("hello", 2)


def test_a_payload_that_cannot_be_pickled_fails_the_caller_not_the_child(runner):
    with pytest.raises(Exception, match="pickle"):
        runner.request(Echo(lambda: None))
    assert runner.request(Echo(3)).result(timeout=30) == ("hello", 3)
    assert runner.restarts == 0


def test_a_killed_child_fails_pending_calls_and_the_next_request_restarts_it(runner, events):
    first = runner.ping().result(timeout=30)
    pending = runner.request(Sleep(60))
    os.kill(first, signal.SIGKILL)
    with pytest.raises(ChildProcessFailure) as info:
        pending.result(timeout=30)
    assert str(info.value) == "the tiny process died (exit code -9); it restarts on the next request"
    assert events.wait_for("died") == "the tiny process died (exit code -9); it restarts on the next request"
    assert not runner.alive
    assert runner.request(Echo(4)).result(timeout=30) == ("hello", 4)
    second = runner.pid
    assert second != first and runner.restarts == 1 and runner.incarnation == 2 and runner.alive
    assert events.wait_for("restarted") == f"the tiny process was restarted (pid {second})"


def test_set_up_requests_are_replayed_into_a_restarted_child(runner, events):
    runner.request(SetState("model A")).result(timeout=30)
    runner.set_init("state", SetState("model A"))
    os.kill(runner.pid, signal.SIGKILL)
    events.wait_for("died")
    # The first request after the crash already sees the restored state.
    assert runner.request(GetState()).result(timeout=30) == "model A"
    assert "replaying 1 set-up requests" in events.wait_for("restarted")
    runner.set_init("state", None)
    os.kill(runner.pid, signal.SIGKILL)
    events.wait_for("died", count=2)
    assert runner.request(GetState()).result(timeout=30) is None  # forgotten: not replayed
    assert runner.restarts == 2


def test_a_replay_the_child_refuses_is_reported():
    events = Events()
    runner = _runner(events)
    try:
        runner.set_init("model", Raise("ValueError", "the model file is gone"))
        os.kill(runner.ping().result(timeout=30), signal.SIGKILL)
        events.wait_for("died")
        assert runner.request(Echo(5)).result(timeout=30) == ("hello", 5)  # later requests still run
        text = events.wait_for("could not restore")
        assert text == "the tiny process could not restore model after a restart: the model file is gone"
    finally:
        runner.shutdown()


def test_a_frozen_child_is_killed_by_the_watchdog_and_the_next_request_restarts_it(events):
    """SIGSTOP freezes the child like a deadlock: its pipe stays open, only unanswered
    pings tell."""
    runner = _runner(events, ping_interval_s=0.2, hang_timeout_s=1.5)
    try:
        first = runner.ping().result(timeout=30)
        os.kill(first, signal.SIGSTOP)
        started = time.monotonic()
        pending = runner.request(Echo(6))
        with pytest.raises(ChildProcessFailure, match=r"stopped answering for \d+ s and was killed; it restarts"):
            pending.result(timeout=30)
        assert time.monotonic() - started >= 1.5
        assert "stopped answering" in events.wait_for("the tiny process stopped answering")
        deadline = time.monotonic() + 10
        while pid_running(first):
            assert time.monotonic() < deadline, "the frozen child was not killed"
            time.sleep(0.02)
        assert runner.request(Echo(7)).result(timeout=30) == ("hello", 7)
        assert runner.pid != first and runner.restarts == 1
        events.wait_for("restarted")
    finally:
        runner.shutdown()


def test_a_busy_child_that_answers_pings_is_not_taken_for_hung():
    runner = _runner(None, ping_interval_s=0.2, hang_timeout_s=1.0)
    try:
        assert runner.request(Sleep(2.5)).result(timeout=30) == "slept"
        assert runner.restarts == 0 and runner.alive
    finally:
        runner.shutdown()


def test_shutdown_fails_pending_and_later_requests_and_is_idempotent():
    runner = _runner(None, start=False)
    assert not runner.alive and runner.pid is None and runner.incarnation == 0
    pid = runner.ping().result(timeout=30)  # the first request starts it
    assert runner.pid == pid and runner.alive
    pending = runner.request(Sleep(60))
    runner.shutdown(timeout=1.0)
    runner.shutdown()
    assert not runner.alive
    with pytest.raises(ChildProcessFailure, match="the tiny process was shut down"):
        pending.result(timeout=30)
    with pytest.raises(ChildProcessFailure, match="shut down"):
        runner.request(Echo(8))
    assert not pid_running(pid)


def test_a_failing_on_event_callback_does_not_break_the_runner():
    def broken(text):
        raise RuntimeError("callback bug")

    runner = _runner(broken)
    try:
        os.kill(runner.ping().result(timeout=30), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while runner.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert runner.request(Echo(9)).result(timeout=30) == ("hello", 9)
    finally:
        runner.shutdown()


def _slow_exit_child(conn) -> None:  # pragma: no cover - runs in the child
    """The tiny child with a slow interpreter teardown (like numba's and TensorFlow's modules)."""
    import atexit

    atexit.register(time.sleep, 60)
    _tiny_child(conn, "slow exit")


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_shutdown_is_prompt_for_an_idle_and_a_busy_child(busy, caplog):
    """Quitting the app waited for each child's teardown ("did not stop in 5 s"): a child
    told to stop now exits at once, without running its exit hooks."""
    runner = ChildProcessRunner("slow", _slow_exit_child)
    pid = runner.ping().result(timeout=30)
    pending = runner.request(Sleep(60)) if busy else None
    time.sleep(0.2)  # the request has reached its lane
    started = time.perf_counter()
    runner.shutdown(timeout=30.0)  # before: 30 s and a warning, then SIGTERM
    seconds = time.perf_counter() - started
    print(f"{'busy' if busy else 'idle'} child stopped in {seconds:.3f} s")
    assert not runner.alive and not pid_running(pid)
    assert seconds < 10.0
    assert "did not stop" not in caplog.text
    if pending is not None:
        with pytest.raises(ChildProcessFailure, match="shut down"):
            pending.result(timeout=5)


def test_shutdown_never_takes_the_exited_child_for_a_running_one(caplog):
    """The reader thread and shutdown both joined the exiting child; the one that lost the
    reap saw ECHILD and took the dead child for a live one: "did not stop in 5 s" at random
    quits (2 of 30 shutdowns here), and a SIGTERM to a reaped pid."""
    warned = 0
    for _ in range(30):
        runner = _runner(None)
        runner.ping().result(timeout=30)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            runner.shutdown(timeout=5.0)
        warned += "did not stop" in caplog.text
        assert not runner.alive
    assert warned == 0


def test_the_pipe_is_closed_once_when_two_threads_close_it():
    """The reader and shutdown both closed the parent's pipe end; Connection.close is not
    thread-safe, so both could close its descriptor, and the second close hit whatever had
    reused the number meanwhile (the next child's pipe). close_pipe closes it once."""
    import multiprocessing
    import threading
    import time

    from segscope.app.child_process import _Child

    parent, other = multiprocessing.Pipe()
    child = _Child(process=None, conn=parent, incarnation=1, restored=0)
    real_close, closes = parent._close, []

    def slow_close(*args):
        closes.append(1)
        time.sleep(0.05)  # both threads are past Connection.close's "handle is not None"
        real_close(*args)

    parent._close = slow_close
    threads = [threading.Thread(target=child.close_pipe) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(closes) == 1 and parent.closed
    other.close()
