"""The plot linked to a real Neuroglancer page, manual labels, export and sessions, offscreen.

The window runs without an encoder: segments come from a precomputed CSV ZIP store (the
app's own "precomputed embeddings" path), one well-separated embedding cluster per
segment, so a lasso around one cluster must select exactly that segment. UMAP is off
(``min_points`` huge) so the layout stays the PCA one while the test draws on it.

Qt tests: run them in a pytest session without TensorFlow (``pytest -m "qt and not slow"``).
Waiting is on state with a deadline, never sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from plot_gestures import drag_through, lasso_loop

pytest.importorskip("PyQt6.QtWebEngineWidgets")
pytestmark = pytest.mark.qt

DIM = 16


def _segments(demo_dir: Path, count: int = 3) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The ``count`` demo segments with most skeleton nodes: (id, node ids, nodes nm)."""
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo_dir)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    picked = []
    for index in np.argsort(-n_nodes, kind="stable")[:count]:
        segment_id = int(dataset.segment_ids[int(index)])
        skeleton = dataset.skeleton(segment_id)
        picked.append((segment_id, np.arange(skeleton.n_nodes, dtype=np.int64), skeleton.nodes_nm))
    return picked


@pytest.fixture(scope="module")
def segments(demo96_dir):
    return _segments(demo96_dir)


@pytest.fixture(scope="module")
def store_dir(segments, tmp_path_factory) -> Path:
    """A CSV ZIP store (nm) of the three segments; segment k's embeddings cluster around
    ``10 * e_k``, far from the others."""
    from segscope.analysis.csvzip import CsvZipStore

    rng = np.random.default_rng(3)
    entries = {}
    for k, (segment_id, node_ids, nodes_nm) in enumerate(segments):
        centre = np.zeros(DIM)
        centre[k] = 10.0
        entries[segment_id] = (node_ids, nodes_nm, (centre + 0.3 * rng.normal(size=(len(node_ids), DIM))))
    folder = tmp_path_factory.mktemp("linked-store")
    CsvZipStore(folder, coordinates="nm").write_many(entries)
    return folder


def open_window(qtbot, demo_dir: Path, store_dir: Path):
    from segscope.app.controller import DataSource, PrecomputedEmbeddings
    from segscope.app.main import build_window

    window = build_window(
        DataSource.open_dataset_folder(demo_dir),
        None,
        precomputed=PrecomputedEmbeddings.open(store_dir, coordinates="nm"),
        plot=False,
    )
    window.attach_plot(start_warm_up=False, scheduler_options={"min_points": 10**9, "warm_up": False})
    window.resize(1400, 900)
    loaded = []
    window.web_view.loadFinished.connect(loaded.append)
    window.show()
    qtbot.waitUntil(lambda: bool(loaded), timeout=60_000)
    assert loaded == [True], "the Neuroglancer page did not load"
    return window


@pytest.fixture(scope="module")
def window(qapp, demo96_dir, store_dir):
    from pytestqt.qtbot import QtBot

    class _Request:  # QtBot wants a request only to register widgets; module scope has none
        node = None

    win = open_window(QtBot(_Request()), demo96_dir, store_dir)
    yield win
    win.close()


def viewer_segments(window) -> set[int]:
    from segscope.app.neuroglancer_bridge import SEGMENTATION_LAYER

    return {int(s) for s in window.bridge.viewer.state.layers[SEGMENTATION_LAYER].segments}


def layer_annotations(window, name: str) -> list:
    layers = window.bridge.viewer.state.layers
    return list(layers[name].annotations) if name in layers else []


def embed_all(qtbot, window, segments) -> None:
    """Select each segment as a double click would; wait until its points are plotted."""
    plot = window.plot_dock.plot
    for segment_id, node_ids, nodes_nm in segments:
        window.service.handle_click(segment_id, nodes_nm[len(nodes_nm) // 2])
        n = len(node_ids)
        qtbot.waitUntil(
            lambda segment_id=segment_id, n=n: len(plot.controller.segment_rows([segment_id])) == n, timeout=30_000
        )
    qtbot.waitUntil(
        lambda: plot.points.n_points == plot.controller.n_points and np.isfinite(plot.points._xy).all(), timeout=5_000
    )
    plot.view_box.autoRange(padding=0.1)
    qtbot.wait(50)


def lasso_around(qtbot, plot, rows: np.ndarray) -> None:
    """Draw a real lasso (mouse press, moves, release) around the points at ``rows``."""
    plot.set_tool("lasso")
    drag_through(qtbot, plot, lasso_loop(plot.controller.layout[rows]))


def test_points_stream_in_and_a_lasso_selects_segments_in_neuroglancer(qtbot, window, segments):
    plot = window.plot_dock.plot
    embed_all(qtbot, window, segments)
    assert plot.controller.n_points == sum(len(nodes) for _, nodes, _ in segments)
    assert window.state.segment.segment_id == segments[-1][0]  # the last double-clicked
    middle = segments[1][0]
    rows = plot.controller.segment_rows([middle])
    with qtbot.waitSignal(plot.selectionChanged, timeout=5_000) as blocker:
        lasso_around(qtbot, plot, rows)
    assert blocker.args[0].segment_ids == frozenset({middle})
    np.testing.assert_array_equal(blocker.args[0].rows, rows)
    # The Neuroglancer page's state now shows exactly the lassoed segment, its nodes ringed.
    from segscope.app.neuroglancer_bridge import SELECTION_LAYER

    qtbot.waitUntil(lambda: viewer_segments(window) == {middle}, timeout=10_000)
    qtbot.waitUntil(lambda: len(layer_annotations(window, SELECTION_LAYER)) == len(rows), timeout=10_000)


def test_segments_selected_in_neuroglancer_highlight_their_points(qtbot, window, segments):
    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    first, last = segments[0][0], segments[2][0]
    emitted = []
    plot.selectionChanged.connect(emitted.append)
    from segscope.app.neuroglancer_bridge import SEGMENTATION_LAYER

    with window.bridge.viewer.txn() as s:  # what a user's picks in the layer panel do
        s.layers[SEGMENTATION_LAYER].segments = {first, last}
    expected = set(plot.controller.segment_rows([first, last]).tolist())
    qtbot.waitUntil(lambda: set(plot.controller.selected_rows.tolist()) == expected, timeout=10_000)
    qtbot.waitUntil(lambda: plot.selection_item.n_points == len(expected), timeout=2_000)
    qtbot.wait(200)
    assert emitted == []  # not echoed back out to 3-D
    assert viewer_segments(window) == {first, last}


def test_label_undo_redo_show_in_plot_and_3d(qtbot, window, segments):
    from PyQt6.QtCore import Qt

    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    bar = window.plot_dock.label_bar
    middle = segments[1][0]
    rows = plot.controller.segment_rows([middle])
    plot.controller.select_rows(rows, origin="plot")
    bar.name_box.setEditText("bouton")
    qtbot.mouseClick(bar.nodes_button, Qt.MouseButton.LeftButton)
    assert window.labels.n_labelled_nodes == len(rows)
    assert (plot.controller.manual_labels[rows] == "bouton").all()
    assert (plot.controller.manual_labels[plot.controller.segment_rows([segments[0][0]])] == "").all()
    qtbot.waitUntil(lambda: len(layer_annotations(window, "manual labels")) == len(rows), timeout=10_000)
    plot.mode_box.setCurrentText("manual label")
    qtbot.waitUntil(lambda: "bouton" in plot.legend_label.text(), timeout=2_000)

    # A segment label on the first segment (selected in 3-D, nothing selected in the plot).
    plot.controller.clear_selection("plot")
    window.state.clear_segment()
    window.service.handle_click(segments[0][0], segments[0][2][0])
    qtbot.waitUntil(lambda: window.state.segment is not None and window.state.segment.complete, timeout=30_000)
    plot.controller.clear_selection("plot")
    bar.name_box.setEditText("glia")
    qtbot.mouseClick(bar.segments_button, Qt.MouseButton.LeftButton)
    assert window.labels.segment_label(segments[0][0]) == "glia"
    first_rows = plot.controller.segment_rows([segments[0][0]])
    assert (plot.controller.manual_labels[first_rows] == "glia").all()

    window.undo_action.trigger()  # the segment label goes
    assert window.labels.segment_label(segments[0][0]) == ""
    assert (plot.controller.manual_labels[first_rows] == "").all()
    window.undo_action.trigger()  # then the node labels
    assert window.labels.n_labelled_nodes == 0 and not window.undo_action.isEnabled()
    qtbot.waitUntil(lambda: len(layer_annotations(window, "manual labels")) == 0, timeout=10_000)
    window.redo_action.trigger()
    assert window.labels.n_labelled_nodes == len(rows)
    assert (plot.controller.manual_labels[rows] == "bouton").all()
    qtbot.waitUntil(lambda: len(layer_annotations(window, "manual labels")) == len(rows), timeout=10_000)
    assert window.redo_action.isEnabled()  # the segment label can come back too


def test_export_dialog_writes_the_bundle_and_adds_its_layer(qtbot, window, segments, tmp_path):
    from PyQt6.QtCore import Qt
    from PyQt6.QtWidgets import QDialogButtonBox

    from segscope.analysis.export import read_node_table, read_segment_table

    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    middle = segments[1][0]
    if window.labels.n_labelled_nodes == 0:
        window.labels.assign_nodes("bouton", [middle] * 3, segments[1][1][:3])
    dialog = window.show_export_dialog()
    assert dialog is not None and dialog.isVisible()
    folder = tmp_path / "bundle"
    dialog.folder_edit.setText(str(folder))
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.StandardButton.Save), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "Exported to" in window.state.status_message, timeout=60_000)
    assert not window.banner.message, window.banner.message
    nodes, provenance = read_node_table(folder / "nodes.parquet")
    assert set(np.unique(nodes.segment_id).tolist()) == {s for s, _, _ in segments}
    labelled = nodes.manual_label[nodes.segment_id == middle]
    assert (labelled == "bouton").sum() == window.labels.n_labelled_nodes
    segments_table, _ = read_segment_table(folder / "segments.parquet")
    assert len(segments_table.segment_id) == 3 and provenance is not None
    assert (folder / "annotations" / "info").is_file() and (folder / "state.json").is_file()
    state = json.loads((folder / "state.json").read_text())
    assert any(layer.get("type") == "annotation" for layer in state["layers"])
    swc = sorted((folder / "skeletons").glob("*.swc"))
    assert len(swc) == 3
    # The exported annotation layer is in the running viewer, served over HTTP.
    layers = window.bridge.viewer.state.layers
    exported = [layer for layer in layers if "export" in layer.name]
    assert exported, [layer.name for layer in layers]
    source = exported[0].layer.source[0].url
    url = source.split("precomputed://", 1)[1].rstrip("/") + "/info"
    info = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert info["@type"] == "neuroglancer_annotations_v1"


def test_save_close_reopen_restores_the_session(qtbot, window, segments, demo96_dir, store_dir, tmp_path):
    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    middle = segments[1][0]
    window.labels.load_dict(
        {
            "version": 1,
            "labels": ["bouton", "glia"],
            "segments": [[segments[0][0], "glia"]],
            "nodes": [[middle, int(n), "bouton"] for n in segments[1][1][:4]],
        }
    )
    rows = plot.controller.segment_rows([middle])
    plot.controller.select_rows(rows, origin="plot")
    plot.mode_box.setCurrentText("manual label")
    path = tmp_path / "linked.segscope.json"
    assert window.save_session(path)
    qtbot.waitUntil(lambda: window.session.path is not None and Path(window.session.path).is_file(), timeout=30_000)
    saved = {
        "points": plot.controller.n_points,
        "labels": window.labels.to_dict(),
        "current": window.state.segment.segment_id,
        "layout_rows": len(rows),
    }

    # A second window, as after a restart, opens the file.
    second = open_window(qtbot, demo96_dir, store_dir)
    try:
        second.service.open_session(path)
        plot2 = second.plot_dock.plot
        qtbot.waitUntil(lambda: plot2.controller.n_points == saved["points"], timeout=30_000)
        assert second.labels.to_dict() == saved["labels"]
        assert second.state.segment is not None and second.state.segment.segment_id == saved["current"]
        assert set(second.state.records) == {s for s, _, _ in segments}
        assert plot2.controller.colour_mode == "manual label"
        assert set(plot2.controller.selected_segments) == {middle}
        assert len(plot2.controller.selected_rows) == saved["layout_rows"]
        assert (plot2.controller.manual_labels[plot2.controller.segment_rows([segments[0][0]])] == "glia").all()
        qtbot.waitUntil(lambda: viewer_segments(second) == {middle}, timeout=10_000)
    finally:
        second.close()


def test_a_crash_leaves_an_autosave_that_the_next_launch_offers(
    qtbot, window, segments, demo96_dir, store_dir, tmp_path
):
    from segscope.app.session_file import AutosaveManager

    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    window.labels.load_dict(
        {
            "version": 1,
            "labels": ["spine"],
            "segments": [],
            "nodes": [[segments[2][0], int(segments[2][1][0]), "spine"]],
        }
    )
    # The "crashed" instance: its pid is a process that has exited.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    crashed = AutosaveManager(tmp_path / "sessions", pid=dead_pid)
    crashed.start()
    window.start_autosave(crashed, interval_ms=3_600_000)
    assert window.autosave_now()
    qtbot.waitUntil(lambda: crashed.autosave_path.is_file(), timeout=30_000)
    window.service.autosave = None  # the crashed instance never calls finish()

    second = open_window(qtbot, demo96_dir, store_dir)
    try:
        manager = AutosaveManager(tmp_path / "sessions", pid=os.getpid())
        manager.start()
        second.start_autosave(manager, interval_ms=3_600_000)
        offered, rival_claims = [], []
        # A third SegScope launching meanwhile sees the autosave but cannot claim it.
        rival = AutosaveManager(tmp_path / "sessions", pid=os.getppid())

        def ask(candidate):
            offered.append(candidate)
            rival_claims.append(rival.claim(candidate))
            return "restore"

        assert second.offer_recovery(ask=ask)
        assert offered and offered[0].pid == dead_pid and rival_claims == [False]
        plot2 = second.plot_dock.plot
        qtbot.waitUntil(lambda: plot2.controller.n_points == plot.controller.n_points, timeout=30_000)
        assert second.labels.node_labels([segments[2][0]], [segments[2][1][0]])[0] == "spine"
        assert manager.recoverable() == []  # adopted: not offered again
    finally:
        second.dispose()  # what the app does at exit
    from PyQt6 import sip

    assert sip.isdeleted(second)  # gone before the QApplication, as Qt WebEngine needs
    assert not manager.autosave_path.exists()  # a clean exit leaves nothing to recover


def test_opening_data_clears_the_plot_and_labels(qtbot, window, segments, demo96_dir):
    from segscope.app.controller import DataSource

    plot = window.plot_dock.plot
    if plot.controller.n_points == 0:
        embed_all(qtbot, window, segments)
    window.labels.assign_segments("glia", [segments[0][0]])
    store = window.session.precomputed
    window.service.open_source(DataSource.open_dataset_folder(demo96_dir), precomputed=store)  # as File > Open does
    assert plot.controller.n_points == 0 and window.labels.n_labelled_segments == 0
    assert window.state.records == {} and window.state.segment is None
    qtbot.waitUntil(lambda: plot.points.n_points == 0 and plot.selection_item.n_points == 0, timeout=2_000)
    # The same segments stream in again, as into a fresh plot.
    embed_all(qtbot, window, segments[:1])
    assert plot.controller.n_points == len(segments[0][1])
