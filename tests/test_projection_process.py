"""UMAP in a child process: fit, transform beside a fit, errors, a killed child, shutdown,
and the scheduler driving the plot from PCA to UMAP through the child.

One child (module fixture) serves the UMAP tests. Its numba cache lives in pytest's cache
folder (``.pytest_cache``), so only the first run on a machine compiles the kernels
(minutes on 2 cores); later runs load them from disk.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.projection import UmapSettings, numba_threadsafe
from segscope.app.plot_controller import PlotController, ProjectionScheduler
from segscope.app.projection_process import (
    FitResult,
    ModelNotFoundError,
    ProcessProjectionBackend,
    ProjectionProcess,
    ProjectionProcessError,
    RemoteUmapModel,
)

from process_checks import pid_running

pytestmark = pytest.mark.timeout(900)  # a cold numba cache compiles for minutes on the first run

#: Parallel kernels, like the app's fits; few epochs keep the fits short.
SETTINGS = UmapSettings(n_epochs=30, seed=None)
DIM = 16


def clustered(n: int, seed: int = 0, n_clusters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[n, DIM]`` points around well-separated centres, and each one's cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 8, size=(n_clusters, DIM))
    labels = rng.integers(0, n_clusters, n)
    return (centres[labels] + rng.normal(size=(n, DIM))).astype(np.float32), labels


@pytest.fixture(scope="module")
def process(request):
    child = ProjectionProcess(numba_cache_dir=request.config.cache.mkdir("segscope-numba"))
    timings = child.warm_up(SETTINGS).result(timeout=900)
    assert {"fit_s", "transform_s"} <= set(timings)
    yield child
    child.shutdown()


@pytest.fixture(scope="module")
def fitted(process) -> FitResult:
    points, _ = clustered(300)
    return process.fit(points, SETTINGS).result(timeout=300)


def test_fit_and_transform_in_the_child(process, fitted):
    assert fitted.n_points == 300 and fitted.dim == DIM
    assert fitted.layout.shape == (300, 2) and np.isfinite(fitted.layout).all()
    new, _ = clustered(40, seed=1)
    placed = process.transform(fitted.model_id, new).result(timeout=120)
    assert placed.shape == (40, 2) and placed.dtype == np.float32 and np.isfinite(placed).all()
    assert process.transform(fitted.model_id, np.zeros((0, DIM))).result(timeout=60).shape == (0, 2)


def test_a_transform_completes_while_a_fit_runs(process, fitted):
    big, _ = clustered(4000, seed=2)
    fit = process.fit(big, UmapSettings(n_epochs=200, seed=None))
    new, _ = clustered(20, seed=3)
    placed = process.transform(fitted.model_id, new).result(timeout=300)
    fit_was_running = not fit.done()
    assert placed.shape == (20, 2) and np.isfinite(placed).all()
    if numba_threadsafe():
        assert fit_was_running, "the transform waited for the fit"
    result = fit.result(timeout=300)
    assert result.layout.shape == (4000, 2) and np.isfinite(result.layout).all()
    process.drop(result.model_id).result(timeout=30)
    with pytest.raises(ModelNotFoundError, match=f"model {result.model_id}"):
        process.transform(result.model_id, new).result(timeout=30)


def test_a_bad_request_fails_clearly_and_the_process_stays_usable(process, fitted):
    pid = process.ping().result(timeout=30)
    with pytest.raises(ValueError, match=f"embeddings are 5-d, the UMAP was fitted on {DIM}-d"):
        process.transform(fitted.model_id, np.zeros((4, 5), np.float32)).result(timeout=60)
    with pytest.raises(ValueError, match="more than n_neighbors"):
        process.fit(np.zeros((3, DIM), np.float32), SETTINGS).result(timeout=60)
    new, _ = clustered(10, seed=4)
    assert process.transform(fitted.model_id, new).result(timeout=60).shape == (10, 2)
    assert process.ping().result(timeout=30) == pid  # the same child, still serving


def test_the_scheduler_drives_the_plot_from_pca_to_umap_through_the_child(process):
    calls: queue.Queue = queue.Queue()

    def run_until(condition, timeout: float) -> None:
        """Run posted updates on this thread (the 'GUI' thread) until ``condition``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"scheduler status: {scheduler.status}")
            try:
                calls.get(timeout=0.2)()
            except queue.Empty:
                pass

    controller = PlotController()
    scheduler = ProjectionScheduler(
        controller,
        calls.put,
        settings=SETTINGS,
        min_points=200,
        refit_growth=100.0,
        warm_up=True,
        backend=ProcessProjectionBackend(process),
    )
    points, labels = clustered(400, seed=5)
    try:
        scheduler.start()
        controller.add_points(1, np.arange(300), np.zeros((300, 3)), points[:300])
        assert controller.layout_kind == "pca" and np.isfinite(controller.layout).all()  # at once
        run_until(lambda: controller.layout_kind == "umap", timeout=300)
        assert isinstance(scheduler.umap, RemoteUmapModel) and scheduler.umap.n_points == 300
        assert scheduler.warm_up_result is not None and "round_trip_s" in scheduler.warm_up_result
        controller.add_points(1, np.arange(300, 400), np.zeros((100, 3)), points[300:])
        run_until(lambda: not scheduler.busy and np.isfinite(controller.layout).all(), timeout=300)
        layout = controller.layout
        centroids = np.stack([layout[:300][labels[:300] == c].mean(axis=0) for c in range(3)])
        nearest = np.linalg.norm(layout[300:, None] - centroids[None], axis=2).argmin(axis=1)
        assert (nearest == labels[300:]).mean() > 0.95  # new points land in their clusters
        assert scheduler.umap.n_points == 300  # placed by transform, not refitted
    finally:
        scheduler.shutdown()
    assert process.alive  # the scheduler does not own a process it was given


class _ForgetfulBackend:
    """A backend without UMAP whose models can be 'lost' (as when the child dies)."""

    concurrent_transforms = True

    def __init__(self):
        self.fits = 0
        self.valid = 0  # the only model id that transform still knows

    def warm_up(self, settings):
        return {}

    def fit(self, embeddings, settings, init=None):
        self.fits += 1
        self.valid = self.fits
        backend, model_id = self, self.fits

        class Model:
            layout = np.asarray(embeddings[:, :2], np.float32)
            n_points = len(embeddings)
            fit_seconds = 0.0

            def transform(self, new):
                if backend.valid != model_id:
                    raise ModelNotFoundError(f"no model {model_id}")
                return np.asarray(new[:, :2], np.float32)

        return Model()


def test_the_scheduler_refits_when_the_backend_lost_its_model():
    calls: queue.Queue = queue.Queue()
    controller = PlotController()
    backend = _ForgetfulBackend()
    scheduler = ProjectionScheduler(
        controller, calls.put, settings=SETTINGS, min_points=50, refit_growth=100.0, warm_up=False, backend=backend
    )

    def run_until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, scheduler.status
            try:
                calls.get(timeout=0.2)()
            except queue.Empty:
                pass

    points, _ = clustered(120, seed=6)
    try:
        controller.add_points(1, np.arange(100), np.zeros((100, 3)), points[:100])
        run_until(lambda: controller.layout_kind == "umap" and not scheduler.busy)
        backend.valid = 0  # the child died: its models are gone
        controller.add_points(1, np.arange(100, 120), np.zeros((20, 3)), points[100:])
        run_until(lambda: backend.fits == 2 and not scheduler.busy and np.isfinite(controller.layout).all())
        assert scheduler.umap.n_points == 120  # refitted on every point, the lost rows included
    finally:
        scheduler.shutdown()


def test_a_child_dying_mid_transform_reads_as_a_lost_model():
    """So the scheduler's one "model lost" path (refit, rows kept) covers a crash too."""
    from concurrent.futures import Future

    from segscope.app.projection_process import RemoteUmapModel

    class DyingProcess:
        def transform(self, model_id, embeddings):
            future = Future()
            future.set_exception(
                ProjectionProcessError("the projection process died (exit code -9); it restarts on the next request")
            )
            return future

    model = RemoteUmapModel(DyingProcess(), 7, np.zeros((3, 2), np.float32), 0.1, 4, SETTINGS)
    with pytest.raises(ModelNotFoundError, match="model 7 was lost: the projection process died"):
        model.transform(np.zeros((2, 4), np.float32))


def test_a_killed_child_fails_pending_requests_and_the_next_request_restarts_it():
    child = ProjectionProcess()
    try:
        first = child.ping().result(timeout=60)
        pending = child.warm_up(SETTINGS)  # importing umap alone takes seconds: still pending
        os.kill(first, signal.SIGKILL)
        with pytest.raises(
            ProjectionProcessError,
            match=r"the projection process died \(exit code -9\); it restarts on the next request",
        ):
            pending.result(timeout=60)
        second = child.ping().result(timeout=60)
        assert second != first and child.restarts == 1 and child.alive
        with pytest.raises(ModelNotFoundError, match="holds no UMAP model"):
            child.transform(12345, np.zeros((2, DIM))).result(timeout=60)
    finally:
        child.shutdown()


def test_shutdown_is_idempotent_and_fails_pending_and_later_requests():
    child = ProjectionProcess(start=False)
    assert not child.alive and child.pid is None
    pid = child.ping().result(timeout=60)  # the first request starts it
    assert child.pid == pid and child.alive
    pending = child.warm_up(SETTINGS)
    child.shutdown()
    child.shutdown()
    assert not child.alive
    with pytest.raises(ProjectionProcessError, match="shut down"):
        pending.result(timeout=30)
    with pytest.raises(ProjectionProcessError, match="shut down"):
        child.ping()


@pytest.mark.parametrize("ending", ["sys.exit(0)", "os._exit(0)"], ids=["exits", "crashes"])
def test_the_child_ends_when_the_parent_exits_without_shutdown(tmp_path, ending):
    """A normal exit runs the exit hook; a crash (``os._exit``: no hooks, no multiprocessing
    clean-up) leaves only the closed pipe to tell the child."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        "from segscope.app.projection_process import ProjectionProcess\n"
        "if __name__ == '__main__':\n"
        "    print(ProjectionProcess().ping().result(timeout=60), flush=True)\n"
        f"    {ending}\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    pid = int(run.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while pid_running(pid):
        assert time.monotonic() < deadline, f"child {pid} outlived its parent"
        time.sleep(0.05)


def test_a_frozen_child_is_killed_by_the_watchdog_and_the_next_request_restarts_it():
    """SIGSTOP freezes the child without ending it, like a deadlock: the pipe stays open,
    so only the watchdog's unanswered pings can tell."""
    child = ProjectionProcess(ping_interval_s=0.2, hang_timeout_s=1.5)
    try:
        first = child.ping().result(timeout=60)
        os.kill(first, signal.SIGSTOP)
        started = time.monotonic()
        pending = child.ping()
        with pytest.raises(ProjectionProcessError, match=r"stopped answering for \d+ s and was killed"):
            pending.result(timeout=60)
        assert time.monotonic() - started >= 1.5
        assert not pid_running(first)
        second = child.ping().result(timeout=60)
        assert second != first and child.restarts == 1 and child.alive
    finally:
        child.shutdown()


def test_a_busy_child_that_answers_pings_is_not_taken_for_hung():
    """A warm-up (importing umap, compiling or loading numba kernels) keeps its worker busy
    for seconds; the child's main thread still answers the watchdog's pings meanwhile."""
    child = ProjectionProcess(ping_interval_s=0.2, hang_timeout_s=1.5)
    try:
        child.ping().result(timeout=60)
        warm_up = child.warm_up(SETTINGS)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and not warm_up.done():
            time.sleep(0.05)
        if warm_up.done():
            warm_up.result()  # done within the window: succeeded, not failed as hung
        assert child.restarts == 0 and child.alive
    finally:
        child.shutdown()


def test_shutdown_is_prompt_for_an_idle_and_a_busy_child(request, caplog):
    """Quitting the app logged "projection process did not stop in 5 s": an idle child with
    umap and numba loaded took 1-2 s to tear its interpreter down (longer under load). A
    child told to stop now exits at once, idle or in the middle of a compile."""
    cache = request.config.cache.mkdir("segscope-numba")
    idle = ProjectionProcess(numba_cache_dir=cache)
    idle.warm_up(SETTINGS).result(timeout=900)  # umap imported, kernels compiled: idle now
    pid = idle.pid
    started = time.perf_counter()
    idle.shutdown(timeout=30.0)
    idle_s = time.perf_counter() - started

    busy = ProjectionProcess(numba_cache_dir=cache)
    busy.ping().result(timeout=60)
    pending = busy.warm_up(SETTINGS)  # importing umap and compiling
    time.sleep(1.0)
    busy_pid = busy.pid
    started = time.perf_counter()
    busy.shutdown(timeout=30.0)
    busy_s = time.perf_counter() - started
    print(f"projection child stopped in {idle_s:.3f} s idle, {busy_s:.3f} s busy")
    assert not pid_running(pid) and not pid_running(busy_pid)
    assert idle_s < 10.0 and busy_s < 10.0
    assert "did not stop" not in caplog.text
    with pytest.raises(ProjectionProcessError, match="shut down"):
        pending.result(timeout=5)
