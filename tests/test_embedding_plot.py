"""The embedding plot dock, offscreen: streaming points, rectangle and lasso selection, 3-D linking.

Qt tests: run them in a pytest session without TensorFlow (``pytest -m "qt and not slow"``).
"""

from __future__ import annotations

import numpy as np
import pytest

from plot_gestures import drag_through, lasso_loop

pytestmark = pytest.mark.qt

pytest.importorskip("pytestqt")


@pytest.fixture
def window(qtbot):
    """A main window stand-in with a real Session, the plot dock linked to it (PCA only, no UMAP)."""
    from PyQt6.QtCore import Qt
    from PyQt6.QtWidgets import QMainWindow, QWidget

    from segscope.app.session import Session
    from segscope.app.views.embedding_plot import EmbeddingPlotDock
    from segscope.app.wiring import link_plot_dock

    class Bridge:
        """Records what the plot asks of the 3-D view (the real bridge: tests/test_linked_views.py)."""

        def __init__(self):
            self.views, self.highlighted, self.nodes, self.listeners = [], [], [], []

        def set_view(self, xyz_nm):
            self.views.append(tuple(xyz_nm))

        def highlight_segments(self, segment_ids):
            self.highlighted.append(list(segment_ids))

        def highlight_node(self, point, *, move=False):
            self.nodes.append(point)
            if move and point is not None:
                self.set_view(point[2])

        def on_segments_changed(self, callback):
            self.listeners.append(callback)
            return lambda: self.listeners.remove(callback)

        def show_selected_nodes(self, points):
            self.rings = list(points)

        def show_labels(self, points, label_names):
            self.labels = (list(points), list(label_names))

    main = QMainWindow()
    main.setCentralWidget(QWidget())
    main.session = Session()
    main.state = main.session.state
    main.bridge = Bridge()
    main.resize(900, 700)
    dock = EmbeddingPlotDock(
        main,
        controller=main.session.plot,
        start_warm_up=False,
        scheduler_options={"min_points": 10**9, "warm_up": False},
    )
    main.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    link_plot_dock(main.session, dock, viewer=main.bridge)
    qtbot.addWidget(main)
    main.show()
    qtbot.waitExposed(main)
    main.dock = dock
    yield main
    dock.plot.shutdown()


def clustered_embeddings(n: int, centre: float, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros(dim)
    base[0] = centre
    return (base + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def stream_segment(state, segment_id: int, embeddings: np.ndarray, batch: int = 8, qtbot=None, plot=None):
    """Select a segment and deliver its embeddings batch by batch through the session state."""
    n = len(embeddings)
    state.select_segment(segment_id)
    state.set_centres(segment_id, np.arange(n) * 2, np.arange(n * 3, dtype=float).reshape(n, 3))
    counts = []
    for start in range(0, n, batch):
        indices = np.arange(start, min(n, start + batch))
        state.add_embeddings(segment_id, indices, embeddings[indices])
        state.announce_batch(segment_id, indices)
        if qtbot is not None:
            qtbot.waitUntil(lambda: plot.points.n_points == plot.controller.n_points, timeout=2000)
            counts.append(int(np.isfinite(plot.points._xy).all(axis=1).sum()))
    return counts


def test_points_appear_as_batches_stream_in(window, qtbot):
    plot = window.dock.plot
    counts = stream_segment(window.state, 11, clustered_embeddings(40, 5.0), batch=8, qtbot=qtbot, plot=plot)
    assert counts == [8, 16, 24, 32, 40]  # drawn batch by batch, each placed at once (PCA)
    assert plot.controller.layout_kind == "pca"
    qtbot.waitUntil(lambda: plot.points.paint_count > 0, timeout=2000)
    assert "40 points" in plot.status_label.text()
    # The dock's image is not blank where the points are.
    image = plot.graphics.grab().toImage()
    assert not image.isNull()


def drag(qtbot, plot, start_view, end_view, steps: int = 6):
    """A real left-button drag on the plot's viewport between two points in view units."""
    a, b = np.asarray(start_view, float), np.asarray(end_view, float)
    drag_through(qtbot, plot, [a, *(a + (b - a) * t for t in np.linspace(0, 1, steps)[1:]), b])


def two_segments(window, qtbot):
    plot = window.dock.plot
    stream_segment(window.state, 21, clustered_embeddings(30, -6.0, seed=1))
    stream_segment(window.state, 22, clustered_embeddings(30, 6.0, seed=2))
    qtbot.waitUntil(lambda: plot.points.n_points == 60, timeout=2000)
    plot.view_box.autoRange(padding=0.1)
    qtbot.wait(50)
    return plot


def test_rectangle_selection_emits_the_right_segments(window, qtbot):
    plot = two_segments(window, qtbot)
    layout = plot.controller.layout
    right = plot.controller.segment_rows([22])
    lo, hi = layout[right].min(axis=0), layout[right].max(axis=0)
    pad = 0.05 * (hi - lo + 1e-3)
    window.state.clear_segment()  # streaming left segment 22 selected (from the session)
    assert len(plot.controller.selected_rows) == 0
    plot.set_tool("rectangle")
    with qtbot.waitSignal(plot.selectionChanged, timeout=3000) as blocker:
        drag(qtbot, plot, lo - pad, hi + pad)
    selection = blocker.args[0]
    assert selection.segment_ids == frozenset({22})
    np.testing.assert_array_equal(selection.rows, right)
    qtbot.waitUntil(lambda: plot.selection_item.n_points == 30, timeout=2000)  # highlighted on screen


def test_lasso_selection_emits_the_right_segments(window, qtbot):
    plot = two_segments(window, qtbot)
    left = plot.controller.segment_rows([21])
    loop = lasso_loop(plot.controller.layout[left], margin=1.2)
    plot.set_tool("lasso")
    with qtbot.waitSignal(plot.selectionChanged, timeout=3000) as blocker:
        drag_through(qtbot, plot, loop)  # press at the first vertex, release at the last
    assert blocker.args[0].segment_ids == frozenset({21})
    np.testing.assert_array_equal(blocker.args[0].rows, left)
    assert window.bridge.highlighted[-1] == [21]  # the lasso's segments go to the 3-D view
    assert sorted(node for _, node, _ in window.bridge.rings) == sorted(plot.controller.node_ids[left])  # ringed
    window.state.select_segment(22)  # a 3-D selection: the plot's node rings go
    assert window.bridge.rings == []


def test_a_3d_selection_highlights_its_points_without_echo(window, qtbot):
    plot = two_segments(window, qtbot)
    emitted = []
    plot.selectionChanged.connect(emitted.append)
    # Selecting a segment in 3-D (the session's "segment" event) highlights its points...
    left = plot.controller.segment_rows([21])
    window.state.select_segment(21)
    np.testing.assert_array_equal(plot.controller.selected_rows, left)
    # The highlight overlay is redrawn on the next event-loop turn, at those points.
    qtbot.waitUntil(
        lambda: (
            plot.selection_item.n_points == 30 and np.allclose(plot.selection_item._xy, plot.controller.layout[left])
        ),
        timeout=2000,
    )
    # ...and is not sent back out as a plot selection.
    assert plot.select_segments([22]) is True
    qtbot.waitUntil(lambda: set(plot.controller.selected_rows) == set(plot.controller.segment_rows([22])), timeout=2000)
    qtbot.wait(50)
    assert emitted == []
    # Segments picked in Neuroglancer's own controls (its thread) highlight their points too.
    emitted_3d = []
    plot.selectionChanged.connect(emitted_3d.append)
    import threading

    thread = threading.Thread(target=window.bridge.listeners[0], args=(frozenset({21, 22}),))
    thread.start()
    thread.join()
    qtbot.waitUntil(lambda: len(plot.controller.selected_rows) == 60, timeout=2000)
    assert emitted_3d == [] and window.bridge.highlighted == []


def test_hover_and_click_report_the_node_and_move_the_3d_view(window, qtbot):
    plot = two_segments(window, qtbot)
    row = int(plot.controller.segment_rows([22])[3])
    scene = plot.view_box.mapViewToScene(
        __import__("PyQt6.QtCore", fromlist=["QPointF"]).QPointF(*map(float, plot.controller.layout[row]))
    )
    with qtbot.waitSignal(plot.pointHovered, timeout=2000) as hovered:
        plot._on_mouse_moved(scene)
    info = hovered.args[0]
    assert info is not None and info.segment_id == 22
    assert info.row == plot.controller.hit_test(*plot.controller.layout[row], radius=1e-6)
    assert window.bridge.nodes[-1] == (22, info.node_id, info.xyz_nm)  # marked in 3-D
    plot.controller.activate(info.row, origin="plot")
    assert window.bridge.views[-1] == info.xyz_nm


def test_colour_mode_box_switches_modes_and_shows_the_ood_bar(window, qtbot):
    plot = two_segments(window, qtbot)
    plot.controller.set_segment_labels(21, ood_score=0.2)
    plot.controller.set_segment_labels(22, ood_score=0.8)
    plot.mode_box.setCurrentText("OOD score")
    qtbot.waitUntil(lambda: plot.colour_bar.isVisible(), timeout=2000)
    assert plot.controller.colour_mode == "OOD score"
    assert tuple(plot.colour_bar.levels()) == pytest.approx((0.2, 0.8))
    plot.mode_box.setCurrentText("segment")
    qtbot.waitUntil(lambda: not plot.colour_bar.isVisible(), timeout=2000)
    assert plot.points.n_colours <= 20


def test_session_predictions_colour_the_segments_points(window, qtbot):
    plot = two_segments(window, qtbot)  # segment 22 is the session's selection now
    codes = np.array([0, 1, 2, 3, 255] * 6, np.uint8)
    window.state.set_predictions(22, predicted=codes, cell_type="basket", ood_score=0.7)
    rows = plot.controller.segment_rows([22])
    np.testing.assert_array_equal(plot.controller.compartments[rows], codes)
    assert plot.controller.cell_type_names == ["basket"]
    assert np.allclose(plot.controller.ood_scores[rows], 0.7)
    assert np.isnan(plot.controller.ood_scores[plot.controller.segment_rows([21])]).all()
    plot.mode_box.setCurrentText("cell type")
    qtbot.waitUntil(lambda: "basket" in plot.legend_label.text(), timeout=2000)


def test_context_table_arrives_with_its_predictions(window, qtbot):
    from segscope.analysis.projection import EmbeddingTable

    n = 40
    table = EmbeddingTable(
        segment_ids=np.repeat(np.array([501, 502], np.uint64), n // 2),
        node_ids=np.tile(np.arange(n // 2), 2),
        xyz_nm=np.zeros((n, 3)),
        embeddings=clustered_embeddings(n, 1.0),
        compartments=np.tile(np.array([0, 1], np.uint8), n // 2),
        cell_types=np.array(["microglia"] * (n // 2) + [""] * (n // 2), dtype=object),
        ood_scores=np.r_[np.full(n // 2, 0.6, np.float32), np.full(n // 2, np.nan, np.float32)],
    )
    plot = window.dock.plot
    rows = plot.add_background(table)
    controller = plot.controller
    assert len(rows) == n and controller.background[rows].all()
    np.testing.assert_array_equal(controller.compartments[rows], table.compartments)
    first, second = controller.segment_rows([501]), controller.segment_rows([502])
    assert controller.cell_type_names == ["microglia"]
    assert (controller.cell_type_codes[first] == 0).all() and (controller.cell_type_codes[second] == -1).all()
    assert np.allclose(controller.ood_scores[first], 0.6) and np.isnan(controller.ood_scores[second]).all()
    plot.mode_box.setCurrentText("cell type")
    qtbot.waitUntil(lambda: "microglia" in plot.legend_label.text(), timeout=2000)


@pytest.mark.parametrize("size_px", [1, 3, 4, 6])
def test_sparse_and_dense_rasterising_draw_the_same_image(size_px):
    """Stamping points (sparse views) and shifting the whole image (dense views) must agree
    pixel for pixel, overlaps, image edges and later-rows-on-top included."""
    from segscope.app.views.embedding_plot import rasterise_points

    rng = np.random.default_rng(size_px)
    width, height = 57, 31
    # Many points on few pixels, so centres collide and squares overlap and clip at edges.
    px = rng.integers(0, width, 400)
    py = rng.integers(0, height, 400)
    index = rng.integers(0, 7, 400).astype(np.uint8)
    dense = rasterise_points(px, py, index, width, height, size_px, method="pixels")
    sparse = rasterise_points(px, py, index, width, height, size_px, method="points")
    np.testing.assert_array_equal(dense, sparse)
    # A lone point draws a size_px square of its colour + 1, nothing else.
    lone = rasterise_points(np.array([20]), np.array([10]), np.array([4], np.uint8), width, height, size_px)
    assert (lone == 5).sum() == size_px**2 and (lone[lone != 0] == 5).all()
    # The later of two points on one pixel is on top.
    two = rasterise_points(np.array([5, 5]), np.array([5, 5]), np.array([1, 2], np.uint8), width, height, size_px)
    assert two[5, 5] == 3


def test_hiding_selected_segments_removes_their_points_from_screen_and_3d(window, qtbot):
    from PyQt6.QtCore import Qt

    plot = two_segments(window, qtbot)
    right = plot.controller.segment_rows([22])
    window.state.clear_segment()
    plot.controller.select_rows(right, origin="plot")
    qtbot.waitUntil(lambda: plot.selection_item.n_points == 30, timeout=2000)
    assert not plot.show_hidden_action.isEnabled()
    highlighted_before = len(window.bridge.highlighted)

    # The Delete key in the plot is the hide action's shortcut.
    plot.graphics.setFocus()
    qtbot.keyClick(plot.graphics, Qt.Key.Key_Delete)
    qtbot.waitUntil(lambda: plot.controller.hidden_segments == frozenset({22}), timeout=2000)
    drawn = np.isfinite(plot.points._xy).all(axis=1)
    assert not drawn[right].any() and drawn.sum() == 30  # only segment 21 is drawn
    qtbot.waitUntil(lambda: plot.selection_item.n_points == 0, timeout=2000)
    # The 3-D view is told the selection lost segment 22.
    assert len(window.bridge.highlighted) > highlighted_before and window.bridge.highlighted[-1] == []
    assert "1 segment hidden" in plot.status_label.text()
    assert plot.show_hidden_action.text() == "Show hidden segments (1)"
    # Saved with the session's plot settings, restored by apply_plot_settings.
    settings = window.session.plot_settings()
    assert settings["hidden_segments"] == [22] and settings["tool"] in ("pan", "rectangle", "lasso")

    plot.show_hidden_action.trigger()
    assert np.isfinite(plot.points._xy).all(axis=1).sum() == 60
    assert not plot.show_hidden_action.isEnabled() and "hidden" not in plot.status_label.text()
    window.session.apply_plot_settings(settings)
    assert plot.controller.hidden_segments == frozenset({22})
    assert np.isfinite(plot.points._xy).all(axis=1).sum() == 30


def view_to_viewport(plot, xy):
    from PyQt6.QtCore import QPointF

    return QPointF(plot.graphics.mapFromScene(plot.view_box.mapViewToScene(QPointF(*map(float, xy)))))


def test_hovering_a_point_shows_its_tooltip(window, qtbot):
    from PyQt6.QtCore import QEvent, QPointF, Qt
    from PyQt6.QtGui import QMouseEvent
    from PyQt6.QtWidgets import QApplication, QToolTip

    plot = two_segments(window, qtbot)
    window.state.set_predictions(22, predicted=np.zeros(30, np.uint8), cell_type="basket", ood_score=0.75)
    window.session.labels.assign_nodes(
        "bouton", [22] * 30, plot.controller.node_ids[plot.controller.segment_rows([22])]
    )
    row = int(plot.controller.segment_rows([22])[3])
    viewport = plot.graphics.viewport()

    def move_to(pos: QPointF) -> None:  # a real mouse move over the plot, no button held
        event = QMouseEvent(
            QEvent.Type.MouseMove,
            pos,
            viewport.mapToGlobal(pos),
            Qt.MouseButton.NoButton,
            Qt.MouseButton.NoButton,
            Qt.KeyboardModifier.NoModifier,
        )
        QApplication.sendEvent(viewport, event)

    move_to(view_to_viewport(plot, plot.controller.layout[row]))
    qtbot.waitUntil(lambda: plot.tooltip_text != "", timeout=2000)
    hovered = plot.controller.hovered
    assert plot.controller.segment_ids[hovered] == 22
    lines = plot.tooltip_text.splitlines()
    assert lines[0] == f"segment 22 · node {plot.controller.node_ids[hovered]}"
    assert "cell type: basket" in lines and "OOD score: 0.750" in lines and "manual label: bouton" in lines
    assert any(line.startswith("compartment: ") for line in lines)
    if QToolTip.isVisible():  # the offscreen platform may not show tooltips
        assert QToolTip.text() == plot.tooltip_text
    # Away from every point, the tooltip goes.
    qtbot.wait(50)  # pyqtgraph drops mouse moves closer than ~16 ms apart
    move_to(QPointF(2, 2))
    qtbot.waitUntil(lambda: plot.tooltip_text == "", timeout=2000)


def test_the_clicked_segment_stands_out(window, qtbot):
    from segscope.app.views.embedding_plot import CURRENT_SEGMENT_OUTLINE_RGBA, SELECTION_OUTLINE_RGBA

    plot = two_segments(window, qtbot)
    window.state.select_segment(21)  # a double click in 3-D
    left = plot.controller.segment_rows([21])
    qtbot.waitUntil(lambda: plot.selected_points_item.n_points == 30, timeout=2000)
    # Bigger than the other points, over them, with a bright outline bigger still.
    assert plot.selected_points_item.size_px > plot.points.size_px
    assert plot.selection_item.size_px >= plot.selected_points_item.size_px + 3
    assert plot.selection_item.zValue() > plot.points.zValue()
    assert plot.selected_points_item.zValue() > plot.selection_item.zValue()
    assert tuple(plot.selection_item.palette[0]) == CURRENT_SEGMENT_OUTLINE_RGBA
    # The selected points keep their own colours.
    np.testing.assert_array_equal(plot.selected_points_item._index, plot.points._index[left])
    # On screen, the outline colour covers many pixels (not a 1-px ring).
    image = plot.graphics.grab().toImage()
    r, g, b, _a = CURRENT_SEGMENT_OUTLINE_RGBA
    buffer = np.frombuffer(image.constBits().asarray(image.sizeInBytes()), np.uint8)
    pixels = buffer.reshape(image.height(), image.bytesPerLine())[:, : image.width() * 4].reshape(
        image.height(), image.width(), 4
    )
    outlined = (pixels[..., 2] == r) & (pixels[..., 1] == g) & (pixels[..., 0] == b)  # BGRA in memory
    assert outlined.sum() >= 30 * 12
    # A selection made in the plot gets the white outline.
    plot.controller.select_rows(plot.controller.segment_rows([22]), origin="plot")
    qtbot.waitUntil(lambda: tuple(plot.selection_item.palette[0]) == SELECTION_OUTLINE_RGBA, timeout=2000)


def test_rectangle_and_lasso_say_how_many_points_and_segments_they_selected(window, qtbot):
    plot = two_segments(window, qtbot)
    window.state.clear_segment()
    assert plot.feedback_label.text() == ""
    layout = plot.controller.layout
    right = plot.controller.segment_rows([22])
    lo, hi = layout[right].min(axis=0), layout[right].max(axis=0)
    pad = 0.05 * (hi - lo + 1e-3)
    plot.set_tool("rectangle")
    with qtbot.waitSignal(plot.selectionChanged, timeout=3000):
        drag(qtbot, plot, lo - pad, hi + pad)
    assert plot.feedback_label.text() == "30 points of 1 segment selected"
    plot.set_tool("lasso")
    everything = np.arange(plot.controller.n_points)
    with qtbot.waitSignal(plot.selectionChanged, timeout=3000):
        drag_through(qtbot, plot, lasso_loop(layout[everything], margin=1.1))
    assert plot.feedback_label.text() == "60 points of 2 segments selected"


def test_legend_counts_classes_and_a_click_hides_one(window, qtbot):
    from PyQt6.QtCore import QPoint, Qt

    from segscope.analysis import COMPARTMENTS

    plot = two_segments(window, qtbot)
    window.state.set_predictions(22, predicted=np.array([0, 1] * 15, np.uint8))
    plot.mode_box.setCurrentText("subcompartment")
    first = COMPARTMENTS[0]
    qtbot.waitUntil(lambda: f"{first} (15)" in plot.legend_label.text(), timeout=2000)
    assert "unknown (30)" in plot.legend_label.text()
    rows = plot.controller.legend_rows(first)
    assert len(rows) == 15
    index = plot._legend_labels.index(first)
    assert f'href="class:{index}"' in plot.legend_label.text()
    # A real click on the first entry: scan its first line for the link (no position API).
    label = plot.legend_label
    y = label.contentsRect().top() + label.fontMetrics().height() // 2
    for x in range(label.contentsRect().left() + 2, label.contentsRect().right(), 4):
        qtbot.mouseClick(label, Qt.MouseButton.LeftButton, pos=QPoint(x, y))
        if plot.controller.hidden_classes:
            break
    assert plot.controller.hidden_classes == frozenset({plot._legend_labels[0]})
    plot.controller.show_classes()
    plot.legend_label.linkActivated.emit(f"class:{index}")  # what a click on the entry emits
    assert plot.controller.hidden_classes == frozenset({first})
    qtbot.waitUntil(lambda: "<s" in plot.legend_label.text(), timeout=2000)
    drawn = np.isfinite(plot.points._xy).all(axis=1)
    assert not drawn[rows].any() and drawn.sum() == 45
    plot.legend_label.linkActivated.emit(f"class:{index}")  # and again: back
    assert plot.controller.hidden_classes == frozenset()
    assert np.isfinite(plot.points._xy).all(axis=1).sum() == 60


def test_delete_says_what_it_hid_and_undo_brings_it_back(window, qtbot):
    from PyQt6.QtCore import Qt

    plot = two_segments(window, qtbot)
    window.state.clear_segment()
    messages = []
    plot.message.connect(messages.append)
    assert not plot.undo_hide_action.isEnabled()
    plot.graphics.setFocus()
    qtbot.keyClick(plot.graphics, Qt.Key.Key_Delete)  # nothing selected: says so
    assert messages[-1].startswith("Nothing to hide")
    plot.controller.select_rows(np.arange(plot.controller.n_points), origin="plot")
    qtbot.keyClick(plot.graphics, Qt.Key.Key_Delete)
    qtbot.waitUntil(lambda: plot.controller.hidden_segments == frozenset({21, 22}), timeout=2000)
    assert messages[-1].startswith("Hid 2 segments (60 points)") and "Undo hide" in messages[-1]
    assert plot.feedback_label.text() == messages[-1]
    assert plot.undo_hide_action.isEnabled() and plot.undo_hide_action in plot.view_box.menu.actions()
    plot.undo_hide_action.trigger()
    assert plot.controller.hidden_segments == frozenset()
    assert messages[-1] == "Showing 2 segments (60 points) again"
    assert np.isfinite(plot.points._xy).all(axis=1).sum() == 60 and not plot.undo_hide_action.isEnabled()


def test_the_plot_saves_as_png_and_svg(window, qtbot, tmp_path):
    import xml.etree.ElementTree as ElementTree

    from PyQt6.QtGui import QImage

    plot = two_segments(window, qtbot)
    window.state.select_segment(21)
    qtbot.waitUntil(lambda: plot.selected_points_item.n_points == 30, timeout=2000)
    png = plot.save_image(tmp_path / "plot.png")
    svg = plot.save_image(tmp_path / "plot.svg")
    assert png.stat().st_size > 0 and svg.stat().st_size > 0
    image = QImage(str(png))
    assert not image.isNull() and image.width() > 50
    root = ElementTree.parse(svg).getroot()
    assert root.tag.endswith("svg")
    # The points are in the SVG as vector paths (one per colour), not left out.
    paths = [element for element in root.iter() if element.tag.endswith("path")]
    assert len(paths) >= 3
    assert plot.save_image_action in plot.view_box.menu.actions()
