"""The main window, offscreen, with a real Neuroglancer page rendered by QtWebEngine.

A small demo (96^3 voxels) is generated once per session, and a randomly initialised lite
encoder is saved by a subprocess: TensorFlow must never load in this process, because TF
and the WebGL renderer's LLVM (Mesa llvmpipe) segfault together (see
``app/compute_process.py``). When another test module already imported TensorFlow, the
in-process tests skip and :func:`test_qt_suite_in_a_clean_process` runs this file again in
a fresh interpreter instead.

Waiting is always on signals or state with a deadline (``qtbot.waitUntil``), never sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.progress import drive

# QtWebEngine must be imported before pytest-qt creates the QApplication.
pytest.importorskip("PyQt6.QtWebEngineWidgets")

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.qt


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from analysis.synthetic import generate_dataset

    return drive(generate_dataset(tmp_path_factory.mktemp("demo96") / "demo", seed=0, size_vox=(96, 96, 96)))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A randomly initialised SegScope lite encoder (plumbing only), written by a subprocess."""
    path = tmp_path_factory.mktemp("model") / "random_lite.keras"
    script = ("import sys; from analysis.encoder import build_encoder, save_encoder, SEGCLR_LITE; "
              "save_encoder(build_encoder(SEGCLR_LITE, seed=0), sys.argv[1])")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=REPO, env=env, timeout=180)
    return path


def _largest_segment(demo_dir: Path) -> tuple[int, np.ndarray]:
    """The demo segment with the most skeleton nodes, and one of its nodes (nm)."""
    from analysis.dataset import open_dataset

    dataset = open_dataset(demo_dir)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    segment_id = int(dataset.segment_ids[int(np.argmax(n_nodes))])
    skeleton = dataset.skeleton(segment_id)
    return segment_id, skeleton.nodes_nm[len(skeleton.nodes_nm) // 2]


def _run_until(predicate, timeout_s: float) -> bool:
    """Run the Qt event loop until ``predicate()`` holds or ``timeout_s`` passes."""
    from PyQt6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(20)
    deadline = time.monotonic() + timeout_s
    timer.timeout.connect(lambda: (predicate() or time.monotonic() > deadline) and loop.quit())
    timer.start()
    loop.exec()
    timer.stop()
    return bool(predicate())


@pytest.fixture(scope="module")
def window(demo_dir, random_model, qapp):
    from app.controller import DataSource
    from app.main import build_window

    # Dense centres (300 nm apart) so a segment has enough batches to cancel mid-job.
    win = build_window(DataSource.open_dataset_folder(demo_dir), random_model, model_trained=False,
                       spacing_nm=300.0)
    win.resize(1400, 860)
    win.show()
    loaded = []
    win.web_view.loadFinished.connect(loaded.append)
    _run_until(lambda: loaded and win.state.model is not None, timeout_s=90)
    assert loaded == [True], "the Neuroglancer page did not load"
    assert win.state.model is not None, f"the model did not load: {win.state.model_message}"
    yield win
    win.close()


def _wait_rendered(qtbot, window, timeout_ms: int = 30_000) -> dict:
    """Wait until neuroglancer reports every visible chunk of the view in GPU memory."""
    stats: list[dict] = []

    def on_stats(statistics) -> None:
        total = statistics.total.to_json() if statistics.total is not None else {}
        stats.append(total)

    # The screenshot request makes the client report chunk statistics each frame; its
    # reply itself may never come (the segmentation's skeleton source never reports
    # "ready" in 2.41), so the statistics are the signal.
    window.bridge.viewer.async_screenshot(lambda reply: None, statistics_callback=on_stats)
    qtbot.waitUntil(lambda: any(s.get("visibleChunksTotal", 0) > 0
                                and s.get("visibleChunksGpuMemory") == s.get("visibleChunksTotal")
                                for s in stats), timeout=timeout_ms)
    with window.bridge.viewer.config_state.txn() as s:
        s.screenshot = None  # stop the pending request
    return stats[-1]


def _double_click_view_centre(qtbot, window) -> None:
    """A real double click: through the window system, QtWebEngine, the DOM and neuroglancer."""
    from PyQt6.QtCore import Qt
    from PyQt6.QtTest import QTest

    top = window.window()
    handle = top.windowHandle()
    view = window.web_view
    point = view.mapTo(top, view.rect().center())
    QTest.mouseMove(handle, point)
    qtbot.wait(300)  # let the page pick the segment under the cursor (hover is asynchronous)
    QTest.mouseDClick(handle, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, point)


def test_window_opens_on_the_demo_and_renders(qtbot, window, demo_dir):
    assert window.windowTitle() == "SegScope: segscope-demo"
    assert window.isVisible()
    assert window.bridge.url.startswith("http://127.0.0.1:")
    stats = _wait_rendered(qtbot, window)
    assert stats["visibleChunksTotal"] > 0
    assert window.panel.segment_id_label.text() == "none selected"
    assert "untrained" in window.model_label.text()
    assert not window.export_action.isEnabled()


def test_double_click_selects_streams_and_annotates(qtbot, window, demo_dir, tmp_path):
    from app.neuroglancer_bridge import NODES_LAYER
    from app.state import EMBEDDED_COLOUR

    segment_id, node_nm = _largest_segment(demo_dir)
    window.bridge.set_layout("xy")
    window.bridge.set_view(node_nm, cross_section_scale=0.02)
    assert window.bridge.flush()
    _wait_rendered(qtbot, window)
    batches = []
    window.state.subscribe("embeddings", lambda record, indices: batches.append(len(indices)))
    clicks = []
    window.relay.clicked.connect(clicks.append)
    for _ in range(3):  # a click can land before the page has picked the hovered segment
        _double_click_view_centre(qtbot, window)
        try:
            qtbot.waitUntil(lambda: bool(clicks), timeout=5000)
            break
        except AssertionError:
            continue
    assert clicks and clicks[0].segment_id == segment_id
    np.testing.assert_allclose(clicks[0].position_nm, node_nm, atol=200.0)
    qtbot.waitUntil(lambda: window.state.segment is not None and window.state.segment.complete, timeout=60_000)
    segment = window.state.segment
    assert segment.segment_id == segment_id
    assert len(batches) >= 2, "embeddings should stream in more than one batch"
    assert segment.embeddings.shape == (segment.n_centres, 64) and np.isfinite(segment.embeddings).all()
    # Nearest to the click first.
    distances = np.linalg.norm(segment.positions_nm - segment.click_nm, axis=1)
    assert distances[0] == distances.min()
    qtbot.waitUntil(lambda: window.state.job is not None and window.state.job.state == "finished", timeout=10_000)
    # The panel shows it, and says the compartments are ground truth.
    assert window.panel.segment_id_label.text() == str(segment_id)
    assert window.panel.embedded_label.text() == f"{segment.n_centres} of {segment.n_centres}"
    truth = segment.compartment_counts("ground_truth")
    assert sum(int(window.panel.truth_labels[name].text()) for name in ("axon", "dendrite", "soma", "glia")) \
        == segment.n_centres - truth["unlabelled"]
    assert "no classifier" in window.panel.cell_type_label.text()
    # The annotation layer holds every centre, coloured as embedded.
    assert window.bridge.flush()
    nodes = window.bridge.viewer.state.layers[NODES_LAYER].annotations
    assert len(nodes) == segment.n_centres
    assert {a.props[0] for a in nodes} == {EMBEDDED_COLOUR}
    _save_screenshot(qtbot, window, tmp_path)


def _save_screenshot(qtbot, window, tmp_path: Path) -> None:
    segment = window.state.segment
    window.bridge.set_view(segment.click_nm, cross_section_scale=0.4)
    window.bridge.set_layout("xy-3d")
    assert window.bridge.flush()
    _wait_rendered(qtbot, window)
    qtbot.wait(500)  # one more frame for the 3-D panel to draw the annotations
    image = window.grab()
    target = tmp_path / "screenshot_app.png"
    assert image.save(str(target)) and target.stat().st_size > 10_000
    if os.environ.get("SEGSCOPE_SAVE_SCREENSHOT") == "1":
        docs = REPO / "docs"
        docs.mkdir(exist_ok=True)
        assert image.save(str(docs / "screenshot_app.png"))


def test_main_thread_heartbeat_during_an_embedding_job(qtbot, window, demo_dir):
    from PyQt6.QtCore import QTimer

    segment_id, node_nm = _largest_segment(demo_dir)
    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    try:
        window.controller.select_segment(segment_id, node_nm)
        qtbot.waitUntil(lambda: window.state.job is not None and window.state.job.state == "finished",
                        timeout=60_000)
    finally:
        timer.stop()
    assert window.state.segment.complete
    gaps = np.diff(beats)
    assert len(beats) > 5
    assert gaps.max() < 0.2, f"the Qt thread stalled for {gaps.max() * 1000:.0f} ms"


def test_cancel_mid_job_leaves_a_consistent_state(qtbot, window, demo_dir):
    segment_id, node_nm = _largest_segment(demo_dir)
    first_batch = []

    def cancel_on_first_batch(record, indices) -> None:
        if not first_batch:
            first_batch.append(len(indices))
            window.job_bar.cancel_button.click()  # what the user does

    unsubscribe = window.state.subscribe("embeddings", cancel_on_first_batch)
    try:
        window.controller.select_segment(segment_id, node_nm)
        qtbot.waitUntil(lambda: window.state.job is not None
                        and window.state.job.state in ("cancelled", "finished"), timeout=60_000)
    finally:
        unsubscribe()
    segment = window.state.segment
    assert window.state.job.state == "cancelled"
    assert 0 < segment.n_embedded < segment.n_centres
    # Rows marked embedded hold numbers, the others NaN.
    assert np.isfinite(segment.embeddings[segment.embedded]).all()
    assert np.isnan(segment.embeddings[~segment.embedded]).all()
    assert window.panel.embedded_label.text() == f"{segment.n_embedded} of {segment.n_centres}"
    assert not window.job_bar.cancel_button.isEnabled()
    # The worker is free again: the next click runs to the end.
    window.controller.select_segment(segment_id, node_nm)
    qtbot.waitUntil(lambda: window.state.job.state == "finished" and window.state.segment.complete,
                    timeout=60_000)


def test_bad_url_shows_an_error_in_the_window(qtbot, window, tmp_path):
    before = window.controller.source
    window.open_sources(str(tmp_path / "no-image"), str(tmp_path / "no-segmentation"))
    qtbot.waitUntil(lambda: window.banner.isVisible(), timeout=10_000)
    assert "Could not open" in window.banner.message and "no-image" in window.banner.message
    assert window.controller.source is before  # still showing the previous data


def test_bad_inputs_fail_on_the_console_before_any_window(tmp_path, capsys):
    import argparse

    from app.main import add_open_arguments, run_app

    parser = add_open_arguments(argparse.ArgumentParser())
    cases = [
        ["--image", str(tmp_path / "missing"), "--segmentation", str(tmp_path / "missing")],
        ["--image", str(tmp_path)],
        ["--checkpoint", str(tmp_path / "nothing.keras")],
    ]
    for argv in cases:
        env_platform = os.environ.get("QT_QPA_PLATFORM")
        assert run_app(parser.parse_args(argv)) == 2
        assert os.environ.get("QT_QPA_PLATFORM") == env_platform
        err = capsys.readouterr().err
        assert err.startswith("segscope: error: ") and "Traceback" not in err
