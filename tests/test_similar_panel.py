"""The Find similar dock, offscreen: asking (3-D, plot, menus), the ranked list, row clicks -> selection.

Qt tests: run them in a pytest session without TensorFlow (``pytest -m "qt and not slow"``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.qt

pytest.importorskip("pytestqt")

N_CLUSTERS = 10
#: Segment ids as large as real ones (MICrONS ids exceed 2^63): Qt's C ints must not wrap them.
BASE = 2**62


def seg(number: int) -> int:
    """The id of the ``number``-th clustered segment (1-based)."""
    return BASE + number


def cluster_of(segment_id: int) -> int:
    return (int(segment_id) - BASE - 1) % N_CLUSTERS


class Bridge:
    """What the window's parts ask of the 3-D view; ``viewer`` is a real neuroglancer viewer state (no server)."""

    def __init__(self):
        from neuroglancer.viewer_base import ViewerBase

        self.viewer = ViewerBase()
        self.highlighted, self.nodes, self.listeners = [], [], []

    def highlight_segments(self, segment_ids):
        self.highlighted.append(list(segment_ids))

    def highlight_node(self, point, *, move=False):
        self.nodes.append((point, move))

    def on_segments_changed(self, callback):
        self.listeners.append(callback)
        return lambda: self.listeners.remove(callback)

    def show_selected_nodes(self, points):
        self.rings = list(points)

    def show_labels(self, points, label_names):
        self.labels = (list(points), list(label_names))


@pytest.fixture
def window(qtbot):
    """A main-window stand-in: a real Session, plot dock and segment panel; the 3-D view recorded."""
    from PyQt6.QtCore import Qt
    from PyQt6.QtWidgets import QDockWidget, QMainWindow, QWidget

    from segscope.app.jobs import JobRunner
    from segscope.app.session import Session
    from segscope.app.views.embedding_plot import EmbeddingPlotDock
    from segscope.app.views.invoker import MainThreadInvoker
    from segscope.app.views.segment_panel import SegmentPanel
    from segscope.app.views.similar_panel import add_find_similar
    from segscope.app.wiring import link_plot_dock

    main = QMainWindow()
    main.setCentralWidget(QWidget())
    main.session = Session()
    main.invoker = MainThreadInvoker(main)
    main.bridge = Bridge()
    runner = JobRunner(post=main.invoker.post, name="test-analysis")
    main.activated = []
    main.service = SimpleNamespace(analysis_runner=runner, select_segment=main.activated.append)
    main.panel = SegmentPanel(main.session.state)
    main.segment_dock = QDockWidget("Segment", main)
    main.segment_dock.setWidget(main.panel)
    main.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, main.segment_dock)
    main.menuBar().addMenu("&Segment")
    main.plot_dock = EmbeddingPlotDock(
        main,
        controller=main.session.plot,
        start_warm_up=False,
        scheduler_options={"min_points": 10**9, "warm_up": False},
    )
    main.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, main.plot_dock)
    link_plot_dock(main.session, main.plot_dock, viewer=main.bridge, post=main.invoker.post)
    main.similar_dock = add_find_similar(main)
    main.resize(1000, 800)
    qtbot.addWidget(main)
    main.show()
    qtbot.waitExposed(main)
    yield main
    main.similar_dock.shutdown()
    main.plot_dock.shutdown()
    runner.shutdown()


def plot_segments(window, n_nodes: int = 1_600, seed: int = 0):
    """Clustered embeddings (16 nodes per segment, segment s in cluster (s - 1) % 10) as plot points."""
    from segscope.analysis.similar import clustered_embeddings

    data = clustered_embeddings(n_nodes, 64, n_clusters=N_CLUSTERS, nodes_per_segment=16, seed=seed)
    xyz = np.random.default_rng(seed).uniform(0, 10_000, (n_nodes, 3))
    window.session.plot.add_points(data.segment_ids + np.uint64(BASE), data.node_ids, xyz, data.embeddings)
    return data


def wait_for_rows(qtbot, window, n: int):
    table = window.similar_dock.panel.table
    qtbot.waitUntil(lambda: table.rowCount() == n and table.item(n - 1, 1) is not None, timeout=10_000)
    return table


def test_shift_right_click_in_3d_lists_selects_and_rows_select_one(window, qtbot):
    from PyQt6.QtCore import Qt

    from segscope.app.find_similar import FIND_SIMILAR_ACTION, FIND_SIMILAR_EVENT, SIMILAR_ORIGIN
    from segscope.app.neuroglancer_bridge import SEGMENTATION_LAYER

    plot_segments(window)  # 100 segments
    viewer = window.bridge.viewer
    assert viewer.config_state.state.input_event_bindings.data_view[FIND_SIMILAR_EVENT] == FIND_SIMILAR_ACTION
    # Neuroglancer's server thread delivers the action; the finder runs on the Qt thread.
    viewer.actions.invoke(
        FIND_SIMILAR_ACTION, {"selectedValues": {SEGMENTATION_LAYER: {"value": str(seg(13))}}, "mousePosition": None}
    )
    table = wait_for_rows(qtbot, window, 20)
    panel = window.similar_dock.panel
    listed = [panel.segment_at(row) for row in range(table.rowCount())]
    assert seg(13) not in listed and {cluster_of(s) for s in listed[:9]} == {cluster_of(seg(13))}  # 9 mates first
    assert f"Segments like segment {seg(13)}" in panel.title.text() and "exact search" in panel.title.text()
    assert [table.item(row, 0).text() for row in range(3)] == ["1", "2", "3"]
    distances = [float(table.item(row, 2).text()) for row in range(table.rowCount())]
    assert distances == sorted(distances)
    # The query and its 20 answers are selected in the plot and in 3-D.
    plot = window.session.plot
    assert plot.selected_segments == {seg(13), *listed} and plot.selection_origin == SIMILAR_ORIGIN
    assert window.bridge.highlighted[-1] == [seg(13), *listed]
    assert window.similar_dock.isVisible()

    # A click on the third row selects that segment alone, in the plot and in 3-D, and moves there.
    rect = table.visualRect(table.model().index(2, 1))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    third = listed[2]
    assert plot.selected_segments == {third}
    assert window.bridge.highlighted[-1] == [third]
    point, move = window.bridge.nodes[-1]
    assert move and point[0] == third
    # Its points are the plot's selection (drawn with the selection outline).
    assert set(plot.segment_ids[plot.selected_rows].tolist()) == {third} and len(plot.selected_rows) == 16
    # Select all brings back the whole answer; a double click embeds the row's segment.
    qtbot.mouseClick(panel.select_all_button, Qt.MouseButton.LeftButton)
    assert plot.selected_segments == {seg(13), *listed}
    qtbot.mouseDClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert window.activated[-1] == third


def test_plot_selection_action_and_level_and_k(window, qtbot):
    plot_segments(window)
    plot = window.session.plot
    panel = window.similar_dock.panel
    panel.level_box.setCurrentText("node")
    panel.k_box.setValue(5)
    rows = plot.segment_rows([seg(4), seg(14)])[::2]  # a lasso over half the nodes of two cluster mates
    plot.select_rows(rows, "plot")
    action = window.plot_dock.plot.find_similar_action
    assert action in window.plot_dock.plot.view_box.menu.actions()
    action.trigger()
    table = wait_for_rows(qtbot, window, 5)
    listed = [panel.segment_at(row) for row in range(5)]
    assert not {seg(4), seg(14)} & set(listed) and {cluster_of(s) for s in listed} == {cluster_of(seg(4))}
    assert not table.isColumnHidden(4)  # node level shows how many query nodes found each
    assert "16 selected nodes of 2 segments" in panel.title.text() and "node level" in panel.title.text()
    assert plot.selected_segments == {seg(4), seg(14), *listed}


def test_segment_menu_and_panel_ask_about_the_current_segment(window, qtbot):
    plot_segments(window)
    action = window.similar_dock.segment_action
    segment_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Segment")
    assert action in segment_menu.actions() and action in window.panel.actions()
    # No segment selected yet: the status bar says why nothing happens.
    action.trigger()
    assert "select a segment first" in window.statusBar().currentMessage()
    window.session.state.select_segment(seg(21))
    action.trigger()
    wait_for_rows(qtbot, window, 20)
    assert f"Segments like segment {seg(21)}" in window.similar_dock.panel.title.text()


def test_a_segment_without_embeddings_is_explained(window, qtbot):
    plot_segments(window)
    window.similar_dock.finder.find([999])
    assert "segment 999 has no embeddings yet" in window.similar_dock.panel.title.text()
    assert "segment 999 has no embeddings yet" in window.statusBar().currentMessage()
