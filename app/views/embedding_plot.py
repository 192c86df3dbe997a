"""The live embedding plot: a pyqtgraph dock linked to the 3-D view and the session.

Every embedded node is a point in a 2-D projection of its SegCLR embedding, coloured by
subcompartment, cell type, OOD score (with a colour bar) or segment. The logic lives in
:class:`segscope.app.plot_controller.PlotController` (Qt-free); this module draws it and turns
mouse input into controller calls.

Drawing: :class:`PointCloudItem` paints points itself, one ``QPainter.drawPoints`` call
per palette colour (at most 20), from numpy arrays mapped to device pixels. pyqtgraph's
``ScatterPlotItem`` builds a record per point (``setData`` about 450 ms at 100k points,
design.md), too slow for per-frame animation and for a million points.

Threads: the UMAP fit and ``transform`` run on the
:class:`~segscope.app.plot_controller.ProjectionScheduler`'s workers; their results come back
through :class:`segscope.app.views.invoker.MainThreadInvoker` (a queued signal), so every controller mutation and redraw
happens on the Qt main thread. Redraws are coalesced: many batches in one event-loop turn
cost one repaint.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
import pyqtgraph.exporters
from PyQt6.QtCore import QPointF, QRectF, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QAction, QColor, QImage, QKeySequence, QPaintEngine, QPainter, QPen
from PyQt6.QtWidgets import (
    QApplication,
    QButtonGroup,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from segscope.analysis.colours import CURRENT_SEGMENT_OUTLINE, SELECTION_OUTLINE, hex_rgba
from segscope.app.plot_controller import (
    COLOUR_MODES,
    PLOT_ORIGIN,
    VIEW_3D_ORIGIN,
    LayoutChange,
    PlotController,
    PointInfo,
    ProjectionScheduler,
    Selection,
)
from segscope.app.views.invoker import MainThreadInvoker

log = logging.getLogger(__name__)

HOVER_RADIUS_PX = 6.0
ANIMATION_MS = 600
ANIMATION_FRAME_MS = 16
#: Label edits and streaming points update the 3-D label layer at most this often.
LABEL_LAYER_DELAY_MS = 150
#: Most labelled nodes drawn in 3-D (beyond it Neuroglancer's inline layer gets slow).
MAX_LABEL_POINTS_3D = 20_000
#: Outline of points selected in the plot, and of the segment selected in 3-D (the clicked
#: one): bright, a few pixels wide, so a segment stands out among thousands of points.
SELECTION_OUTLINE_RGBA = hex_rgba(SELECTION_OUTLINE, 255)
CURRENT_SEGMENT_OUTLINE_RGBA = hex_rgba(CURRENT_SEGMENT_OUTLINE, 255)
#: Selected points are drawn this much bigger than the others, their outline bigger still.
SELECTED_GROWTH_PX = 2
OUTLINE_GROWTH_PX = 6


def rasterise_points(
    px: np.ndarray, py: np.ndarray, index: np.ndarray, width: int, height: int, size_px: int, *, method: str = "auto"
) -> np.ndarray:
    """Rasterise points into a uint8 ``[height, width]`` image of palette index + 1 (0: empty).

    Parameters
    ----------
    px, py : numpy.ndarray
        int64 ``[N]`` pixel column and row of each point's centre, all inside the image.
    index : numpy.ndarray
        uint8 ``[N]`` palette index per point.
    size_px : int
        Side of each point's square, in device pixels.
    method : {"auto", "pixels", "points"}
        "pixels" grows the centre image by one shifted whole-image pass per offset (cost
        ~ pixels x size_px^2, best for dense views); "points" stamps each point at each
        offset (cost ~ points x size_px^2, best for sparse views); "auto" picks the cheaper.
        Both give the same image: a centre pixel shows its last point (later rows on top);
        an empty pixel takes the first offset, in row-major order from the top left, whose
        source pixel is a centre.
    """
    centres = np.zeros(height * width, np.uint8)
    colours = np.asarray(index, np.uint8) + 1
    centres[py * width + px] = colours
    low, high = -((size_px - 1) // 2), size_px // 2
    offsets = [(oy, ox) for oy in range(low, high + 1) for ox in range(low, high + 1) if (oy, ox) != (0, 0)]
    if method == "auto":
        method = "points" if len(px) * 4 < height * width else "pixels"
    if method == "points":
        grown = np.zeros(height * width, np.uint8)
        # Reversed, so the first offset in row-major order writes last and wins.
        for oy, ox in reversed(offsets):
            tx, ty = px + ox, py + oy
            inside = (tx >= 0) & (tx < width) & (ty >= 0) & (ty < height)
            grown[ty[inside] * width + tx[inside]] = colours[inside]
        filled = centres != 0
        grown[filled] = centres[filled]
        return grown.reshape(height, width)
    if method != "pixels":
        raise ValueError(f"unknown rasterising method {method!r}")
    centres = centres.reshape(height, width)
    grown = centres.copy()
    for oy, ox in offsets:
        source = centres[max(0, -oy) : height - max(0, oy), max(0, -ox) : width - max(0, ox)]
        target = grown[max(0, oy) : height - max(0, -oy), max(0, ox) : width - max(0, -ox)]
        empty = target == 0
        target[empty] = source[empty]
    return grown


class PointCloudItem(pg.GraphicsObject):
    """Many fixed-size square points, coloured from a small shared palette.

    Positions are float ``[N, 2]`` in view units (NaN rows are not drawn); colours are a
    uint8 ``[N]`` palette index and a uint8 ``[P, 4]`` RGBA palette (P <= 255).

    Painting rasterises in numpy: each visible point writes its palette index into a
    device-sized index image (later rows on top), the image is grown by the point size
    into empty pixels only, mapped through the palette and drawn with one ``drawImage``.
    That costs about the same per point as pyqtgraph's per-point bookkeeping costs per
    redraw, but no Python object exists per point, so a million points pan smoothly.
    """

    def __init__(self, size_px: int = 4, parent=None):
        super().__init__(parent)
        self.size_px = int(size_px)
        self._xy = np.zeros((0, 2), np.float32)
        self._index = np.zeros(0, np.uint8)
        self._lut = np.zeros(1, np.uint32)  # premultiplied ARGB per palette entry + 1; 0: empty
        self.palette = np.zeros((0, 4), np.uint8)  # the RGBA palette given to set_colours
        self._bounds = QRectF()
        self._image_buffer: np.ndarray | None = None
        self.paint_count = 0

    @property
    def n_points(self) -> int:
        return len(self._xy)

    def set_positions(self, xy: np.ndarray) -> None:
        xy = np.asarray(xy, dtype=np.float32)
        self.prepareGeometryChange()
        self._xy = xy
        finite = xy[np.isfinite(xy).all(axis=1)] if len(xy) else xy
        if len(finite):
            lo, hi = finite.min(axis=0), finite.max(axis=0)
            self._bounds = QRectF(float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))
        else:
            self._bounds = QRectF()
        if len(self._index) != len(xy):
            self._index = np.zeros(len(xy), np.uint8)
        self.informViewBoundsChanged()
        self.update()

    def set_colours(self, index: np.ndarray, palette: np.ndarray) -> None:
        rgba = np.asarray(palette, dtype=np.uint32).reshape(-1, 4)
        alpha = rgba[:, 3]
        premultiplied = (
            (alpha << 24)
            | ((rgba[:, 0] * alpha // 255) << 16)
            | ((rgba[:, 1] * alpha // 255) << 8)
            | (rgba[:, 2] * alpha // 255)
        )
        self._lut = np.concatenate([[0], premultiplied]).astype(np.uint32)
        self.palette = rgba.astype(np.uint8)
        self._index = np.asarray(index, dtype=np.uint8)
        self.update()

    @property
    def n_colours(self) -> int:
        return len(self._lut) - 1

    def boundingRect(self) -> QRectF:
        if self._bounds.isNull() and not len(self._xy):
            return QRectF()
        # Pad by the point size in view units so edge points are not clipped.
        px = self.pixelLength(pg.Point(1, 0)) or 0.0
        py = self.pixelLength(pg.Point(0, 1)) or 0.0
        pad = self.size_px
        return self._bounds.adjusted(-px * pad, -py * pad, px * pad, py * pad)

    def dataBounds(self, ax: int, frac: float = 1.0, orthoRange=None):
        if self._bounds.isNull() and not len(self._xy):
            return None, None
        if ax == 0:
            return self._bounds.left(), self._bounds.right()
        return self._bounds.top(), self._bounds.bottom()

    def pixelPadding(self) -> float:
        return float(self.size_px)

    def paint(self, painter: QPainter, option, widget=None) -> None:
        self.paint_count += 1
        if not len(self._xy) or self.n_colours == 0:
            return
        engine = painter.paintEngine()
        if engine is not None and engine.type() == QPaintEngine.Type.SVG:
            self._paint_vector(painter)  # an SVG export: the generator has no pixels to rasterise into
            return
        # Rasterise in the viewport's own pixels, from the *world* transform: under
        # QWidget.render / grab of an ancestor (screenshots) the painter is redirected and
        # its device is not the viewport, so device size and transform would misplace
        # every point; the world transform and the viewport's size hold in both cases.
        surface = widget if widget is not None else painter.device()
        ratio = surface.devicePixelRatioF() if hasattr(surface, "devicePixelRatioF") else 1.0
        width, height = round(surface.width() * ratio), round(surface.height() * ratio)
        if width <= 0 or height <= 0:
            return
        transform = painter.worldTransform()
        m11, m22 = transform.m11() * ratio, transform.m22() * ratio
        dx, dy = transform.dx() * ratio, transform.dy() * ratio
        # Pixel centre of each point; NaN and off-screen points fail the bounds test.
        px = np.floor(self._xy[:, 0] * m11 + dx)
        py = np.floor(self._xy[:, 1] * m22 + dy)
        visible = np.flatnonzero((px >= 0) & (px < width) & (py >= 0) & (py < height))
        grown = rasterise_points(
            px[visible].astype(np.int64),
            py[visible].astype(np.int64),
            self._index[visible],
            width,
            height,
            self.size_px,
        )
        self._image_buffer = np.ascontiguousarray(self._lut[grown])  # kept alive while Qt reads it
        image = QImage(self._image_buffer.data, width, height, width * 4, QImage.Format.Format_ARGB32_Premultiplied)
        image.setDevicePixelRatio(ratio)
        painter.save()
        painter.resetTransform()
        painter.drawImage(QPointF(0, 0), image)
        painter.restore()

    def _paint_vector(self, painter: QPainter) -> None:
        """Draw the points in view as vector squares, one path per colour (SVG export).

        Each square is a horizontal stroke one point wide and as thick: pyqtgraph's SVG
        exporter rewrites path coordinates and cannot read closed subpaths (``Z``).
        """
        half_x = 0.5 * self.size_px * (self.pixelLength(pg.Point(1, 0)) or 0.0)
        view = self.viewRect()
        x, y = self._xy[:, 0], self._xy[:, 1]
        shown = np.isfinite(x) & np.isfinite(y)
        if view is not None:
            (x0, x1), (y0, y1) = sorted((view.left(), view.right())), sorted((view.top(), view.bottom()))
            shown &= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        painter.save()
        painter.setBrush(Qt.BrushStyle.NoBrush)
        for entry in np.unique(self._index[shown]):
            rows = np.flatnonzero(shown & (self._index == entry))
            xs = np.stack([x[rows] - half_x, x[rows] + half_x], axis=1).reshape(-1)
            ys = np.repeat(y[rows], 2)
            path = pg.arrayToQPath(xs, ys, connect=np.tile(np.array([1, 0], np.int32), len(rows)))
            pen = QPen(QColor(*(int(v) for v in self.palette[int(entry)])))
            pen.setWidthF(float(self.size_px))
            pen.setCosmetic(True)
            pen.setCapStyle(Qt.PenCapStyle.FlatCap)
            painter.setPen(pen)
            painter.drawPath(path)
        painter.restore()


class SelectionViewBox(pg.ViewBox):
    """A ViewBox whose left drag pans, or draws a rectangle or lasso (``mode``)."""

    regionSelected = pyqtSignal(str, object)  # ("rectangle" | "lasso", float [M, 2] view-unit vertices)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode = "pan"
        self._path: list[tuple[float, float]] = []
        self._outline = pg.PlotCurveItem(pen=pg.mkPen("#ffffff", width=1, style=Qt.PenStyle.DashLine))
        self._outline.setZValue(100)
        self.addItem(self._outline, ignoreBounds=True)

    def paint(self, p, opt, widget=None):
        # pyqtgraph draws the border with an invisible pen when there is none: a closed path
        # whose "Z" its own SVG exporter cannot read, so the plot could not be saved as SVG.
        if self.border is not None and self.border.style() != Qt.PenStyle.NoPen:
            super().paint(p, opt, widget)

    def mouseDragEvent(self, ev, axis=None):
        if self.mode == "pan" or ev.button() != Qt.MouseButton.LeftButton:
            super().mouseDragEvent(ev, axis)
            return
        ev.accept()
        point = self.mapSceneToView(ev.scenePos())
        here = (point.x(), point.y())
        if ev.isStart():
            start = self.mapSceneToView(ev.buttonDownScenePos())
            self._path = [(start.x(), start.y())]
        if self.mode == "lasso":
            self._path.append(here)
        else:
            self._path = [self._path[0], here]
        vertices = self._vertices()
        closed = np.vstack([vertices, vertices[:1]])
        self._outline.setData(closed[:, 0], closed[:, 1])
        if ev.isFinish():
            self._outline.setData([], [])
            self._path = []
            self.regionSelected.emit(self.mode, vertices)

    def _vertices(self) -> np.ndarray:
        path = np.asarray(self._path, dtype=np.float64)
        if self.mode == "rectangle":
            (x0, y0), (x1, y1) = path[0], path[-1]
            return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        return path


class EmbeddingPlotWidget(QWidget):
    """The plot, its colour-mode box, selection-tool buttons, legend and colour bar.

    Signals
    -------
    pointHovered(PointInfo or None)
        The point under the cursor changed (for a 3-D highlight).
    pointActivated(PointInfo)
        A point was clicked (the 3-D view can move there).
    selectionChanged(Selection)
        A selection made in this plot (rectangle, lasso, click on empty space clears);
        never emitted for selections that came from outside.
    """

    pointHovered = pyqtSignal(object)
    pointActivated = pyqtSignal(object)
    selectionChanged = pyqtSignal(object)
    viewChanged = pyqtSignal(dict)
    #: (str) a one-line account of what the plot just did ("Hid 3 segments (120 points)...").
    message = pyqtSignal(str)

    def __init__(
        self,
        controller: PlotController | None = None,
        *,
        scheduler_options: dict | None = None,
        point_size_px: int = 3,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.controller = controller or PlotController()
        self.invoker = MainThreadInvoker(self)
        # ProjectionScheduler options: settings (UmapSettings), min_points, refit_growth, warm_up.
        self.scheduler = ProjectionScheduler(self.controller, self.invoker.post, **(scheduler_options or {}))
        self._ranged = False
        self._displayed = np.zeros((0, 2), np.float32)  # positions on screen (mid-animation too)
        self._animation_from: np.ndarray | None = None
        self._animation_step = 0
        self._dirty: set[str] = set()

        self.view_box = SelectionViewBox()
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("#101014")
        self.plot_item = self.graphics.addPlot(row=0, col=0, viewBox=self.view_box)
        self.plot_item.hideAxis("left")
        self.plot_item.hideAxis("bottom")
        self.view_box.setAspectLocked(True)  # hit radius in pixels is the same along x and y
        self.points = PointCloudItem(point_size_px)
        # Selected points stand out: a bright outline over the other points (selection_item),
        # and on it the selected points themselves, bigger, in their own colours.
        self.selection_item = PointCloudItem(point_size_px + OUTLINE_GROWTH_PX)
        self.selection_item.set_colours(np.zeros(0, np.uint8), np.array([SELECTION_OUTLINE_RGBA], np.uint8))
        self.selection_item.setZValue(5)
        self.selected_points_item = PointCloudItem(point_size_px + SELECTED_GROWTH_PX)
        self.selected_points_item.setZValue(6)
        self.hover_item = pg.ScatterPlotItem(size=16, pen=pg.mkPen(CURRENT_SEGMENT_OUTLINE, width=2), brush=None)
        self.hover_item.setZValue(20)
        for item in (self.points, self.selection_item, self.selected_points_item):
            self.view_box.addItem(item)
        #: The last hover tooltip's text ("" when none shows).
        self.tooltip_text = ""
        self._legend_labels: list[str] = []
        self.view_box.addItem(self.hover_item, ignoreBounds=True)
        self.colour_bar = pg.ColorBarItem(
            values=(0, 1), colorMap=pg.colormap.get("viridis"), interactive=False, width=14, label="OOD score"
        )
        self.graphics.addItem(self.colour_bar, row=0, col=1)
        self.colour_bar.hide()

        self.mode_box = QComboBox()
        self.mode_box.addItems(COLOUR_MODES)
        self.mode_box.currentTextChanged.connect(self.controller.set_colour_mode)
        self.tool_buttons = QButtonGroup(self)
        tools = QHBoxLayout()
        tools.addWidget(QLabel("Colour:"))
        tools.addWidget(self.mode_box)
        tools.addStretch(1)
        for mode, text, tip in (
            ("pan", "Pan", "Drag to pan, wheel to zoom"),
            ("rectangle", "Rect", "Drag a rectangle to select nodes and their segments"),
            ("lasso", "Lasso", "Draw around points to select nodes and their segments"),
        ):
            # Tool buttons, not push buttons: the dock is narrow and push buttons are wide.
            button = QToolButton()
            button.setText(text)
            button.setCheckable(True)
            button.setToolTip(tip)
            button.setChecked(mode == "pan")
            button.clicked.connect(lambda _checked, m=mode: self.set_tool(m))
            self.tool_buttons.addButton(button)
            tools.addWidget(button)
        # Hiding declutters the plot without losing anything: see PlotController.hide_segments.
        self.hide_action = QAction("Hide selected segments", self)
        self.hide_action.setShortcut(QKeySequence(Qt.Key.Key_Delete))
        self.hide_action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.hide_action.triggered.connect(self.hide_selected_segments)
        self.show_hidden_action = QAction("Show hidden segments", self)
        self.show_hidden_action.triggered.connect(self.show_hidden_segments)
        # Undo of a hide lives in the menus, without a key: Ctrl+Z is the window's label undo.
        self.undo_hide_action = QAction("Undo hide", self)
        self.undo_hide_action.setToolTip("Show the segments of the last hide again")
        self.undo_hide_action.triggered.connect(self.undo_hide)
        self.save_image_action = QAction("Save plot image (PNG, SVG)…", self)
        self.save_image_action.triggered.connect(self._save_image_dialog)
        hide_actions = [self.hide_action, self.undo_hide_action, self.show_hidden_action]
        self.addActions(hide_actions)
        self.hide_button = QToolButton()
        self.hide_button.setText("Hide")
        self.hide_button.setToolTip(
            "Hide the selected segments' points (Delete); undo the last hide, or show hidden ones again"
        )
        self.hide_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        hide_menu = QMenu(self.hide_button)
        hide_menu.addActions(hide_actions)
        self.hide_button.setMenu(hide_menu)
        tools.addWidget(self.hide_button)
        self.save_button = QToolButton()
        self.save_button.setText("Save")
        self.save_button.setToolTip("Save the plot as a PNG or SVG image")
        self.save_button.clicked.connect(self._save_image_dialog)
        tools.addWidget(self.save_button)
        self.view_box.menu.addSeparator()
        self.view_box.menu.addActions([*hide_actions, self.save_image_action])
        self._update_hide_actions()
        self.status_label = QLabel("No embeddings yet")
        #: What a selection holds, or what a hide did.
        self.feedback_label = QLabel("")
        self.feedback_label.setWordWrap(True)
        self.legend_label = QLabel("")
        self.legend_label.setWordWrap(True)
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setTextInteractionFlags(Qt.TextInteractionFlag.LinksAccessibleByMouse)
        self.legend_label.setToolTip("Click a class to hide or show its points")
        self.legend_label.linkActivated.connect(self._on_legend_link)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(tools)
        layout.addWidget(self.graphics, 1)
        layout.addWidget(self.legend_label)
        layout.addWidget(self.feedback_label)
        layout.addWidget(self.status_label)

        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._refresh)
        self._animation_timer = QTimer(self)
        self._animation_timer.setInterval(ANIMATION_FRAME_MS)
        self._animation_timer.timeout.connect(self._animation_frame)

        self.view_box.regionSelected.connect(self._on_region)
        self.graphics.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.graphics.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        controller = self.controller
        self._unsubscribe = [
            controller.subscribe("points", lambda rows: self._mark("points")),
            controller.subscribe("layout", self._on_layout),
            controller.subscribe("colours", self._on_colours),
            controller.subscribe("selection", self._on_selection),
            controller.subscribe("hover", self._on_hover),
            controller.subscribe("activate", self.pointActivated.emit),
            controller.subscribe("cleared", self._on_cleared),
            controller.subscribe("visibility", self._on_visibility),
        ]
        self.scheduler.on_status(self.show_status)
        self.view_box.sigRangeChanged.connect(self._emit_view)

    # -- controller -> screen --------------------------------------------------------------

    def _on_colours(self) -> None:
        mode = self.controller.colour_mode
        if self.mode_box.currentText() != mode:  # set by the model (a restored session)
            self.mode_box.blockSignals(True)
            self.mode_box.setCurrentText(mode)
            self.mode_box.blockSignals(False)
        self._mark("colours")

    def _mark(self, what: str) -> None:
        self._dirty.add(what)
        if not self._refresh_timer.isActive():
            self._refresh_timer.start(0)

    def _refresh(self) -> None:
        """Apply everything that changed since the last event-loop turn, in one repaint."""
        dirty, self._dirty = self._dirty, set()
        controller = self.controller
        if "points" in dirty or "layout" in dirty:
            if self._animation_timer.isActive():
                # Mid-animation: new rows join at their target; the animation carries on.
                extra = len(controller.layout) - len(self._animation_from)
                if extra > 0:
                    self._animation_from = np.vstack([self._animation_from, controller.layout[-extra:]])
            else:
                self._displayed = controller.layout.copy()
                self._draw_positions()
                self._update_selection_item()
            if controller.n_points and controller.layout_kind != "none":
                self.show_status(self.scheduler.status)
        if "points" in dirty or "colours" in dirty:
            self._apply_colours()
            self._update_selection_item()  # the selected points' own colours
        elif "legend" in dirty:
            self._show_legend()
        if "selection" in dirty:
            self._update_selection_item()
        # Frame the points when they first appear, while they are few (a streaming segment),
        # and after a refit; never while the user explores a large plot.
        placed = bool(np.isfinite(self._displayed).all(axis=1).any()) if len(self._displayed) else False
        if placed and (
            "autorange" in dirty or not self._ranged or ("points" in dirty and self.points.n_points <= 5000)
        ):
            self.view_box.autoRange(padding=0.05)
            self._ranged = True

    def _apply_colours(self) -> None:
        colours = self.controller.colours()
        self.points.set_colours(colours.index, colours.palette)
        if colours.value_range is not None:
            self.colour_bar.setLevels(colours.value_range)
            self.colour_bar.show()
        else:
            self.colour_bar.hide()
        self._show_legend(colours)

    def _show_legend(self, colours=None) -> None:
        """The legend: per class a swatch, its name and point count, a link that hides or shows it."""
        colours = self.controller.colours() if colours is None else colours
        entries = self.controller.legend(colours)
        self._legend_labels = [entry.label for entry in entries]
        if entries:
            swatches = []
            for i, entry in enumerate(entries):
                r, g, b, _a = entry.rgba
                text = f"{html.escape(entry.label)} ({entry.count:,})"
                if entry.hidden:  # greyed and struck through, as in cellxgene
                    text = f'<s style="color: #777">{text}</s>'
                    r, g, b = 90, 90, 90
                swatches.append(
                    f'<a href="class:{i}" style="text-decoration: none; color: palette(window-text)">'
                    f'<span style="color: rgb({r},{g},{b})">&#9632;</span> {text}</a>'
                )
            self.legend_label.setText("&nbsp;&nbsp;".join(swatches))
        elif colours.value_range is not None:
            self.legend_label.setText(f"OOD score {colours.value_range[0]:.3g} to {colours.value_range[1]:.3g}")
        else:
            self.legend_label.setText("")

    def _on_legend_link(self, href: str) -> None:
        """A click on a legend entry hides its class's points, or shows them again."""
        kind, _, index = href.partition(":")
        if kind != "class" or not index.isdigit() or int(index) >= len(self._legend_labels):
            return
        label = self._legend_labels[int(index)]
        hidden = self.controller.toggle_class(label)
        self._say(
            f"Hiding {label} points (click {label} in the legend to show them)"
            if hidden
            else f"Showing {label} points again"
        )

    def _on_layout(self, change: LayoutChange) -> None:
        if change.animate and len(self._displayed):
            start = np.full_like(self.controller.layout, np.nan)
            known = min(len(self._displayed), len(start))
            start[:known] = self._displayed[:known]
            missing = ~np.isfinite(start).all(axis=1)
            start[missing] = self.controller.layout[missing]
            self._animation_from = start
            self._animation_step = 0
            self._animation_timer.start()
            self._dirty.add("autorange")
        self._mark("layout")

    def _on_cleared(self) -> None:
        self._animation_timer.stop()
        self._animation_from = None
        self._displayed = np.zeros((0, 2), np.float32)
        self._draw_positions()
        self._update_hide_actions()
        self.hover_item.setData([], [])
        self._ranged = False
        self._mark("points")
        self._mark("selection")
        self.status_label.setText("No embeddings yet")

    def _animation_frame(self) -> None:
        self._animation_step += 1
        t = min(1.0, self._animation_step * ANIMATION_FRAME_MS / ANIMATION_MS)
        eased = t * t * (3 - 2 * t)
        target = self.controller.layout
        start = self._animation_from
        if start is None or len(start) != len(target):
            start = target if start is None else np.vstack([start, target[len(start) :]])[: len(target)]
        frame = start + (target - start) * eased
        frame = np.where(np.isfinite(frame), frame, target)
        self._displayed = frame.astype(np.float32)
        self._draw_positions()
        self._update_selection_item()
        if t >= 1.0:
            self._animation_timer.stop()
            self._animation_from = None
            self.view_box.autoRange(padding=0.05)

    def _draw_positions(self) -> None:
        """Hand the displayed positions to the point item, hidden rows as NaN (not drawn)."""
        hidden = self.controller.hidden
        shown = self._displayed
        if len(hidden) and hidden.any():
            mask = np.zeros(len(shown), bool)
            known = min(len(shown), len(hidden))
            mask[:known] = hidden[:known]
            shown = np.where(mask[:, None], np.float32(np.nan), shown)
        self.points.set_positions(shown)

    def _on_visibility(self, hidden_segments: frozenset[int]) -> None:
        self._draw_positions()
        self._update_hide_actions()
        self.show_status(self.scheduler.status)
        self._mark("legend")  # counts leave out hidden segments; hidden classes are greyed

    def _update_hide_actions(self) -> None:
        n_hidden = len(self.controller.hidden_segments)
        self.show_hidden_action.setText(f"Show hidden segments ({n_hidden})" if n_hidden else "Show hidden segments")
        self.show_hidden_action.setEnabled(bool(n_hidden))
        self.undo_hide_action.setEnabled(self.controller.can_undo_hide)

    def _say(self, text: str) -> None:
        self.feedback_label.setText(text)
        self.message.emit(text)

    def hide_selected_segments(self) -> int:
        """Hide the points of the selected segments (undoable), saying what went; returns how many segments."""
        segments, points = self.controller.hide_selection()
        if not segments:
            self._say("Nothing to hide: select points (Rect or Lasso) or a segment first.")
            return 0
        self._say(
            f"Hid {segments:,} segment{'s' if segments != 1 else ''} ({points:,} point{'s' if points != 1 else ''})"
            " — undo: Hide ▸ Undo hide (or right-click the plot), or Show hidden segments"
        )
        return segments

    def undo_hide(self) -> int:
        """Show the segments of the last hide again; returns how many."""
        segments, points = self.controller.undo_hide()
        self._say(
            f"Showing {segments:,} segment{'s' if segments != 1 else ''} ({points:,} points) again"
            if segments
            else "No hide to undo."
        )
        return segments

    def show_hidden_segments(self) -> int:
        """Show every hidden segment again; returns how many."""
        segments = self.controller.show_segments()
        if segments:
            self._say(f"Showing {segments:,} hidden segment{'s' if segments != 1 else ''} again")
        return segments

    # -- saving the picture ----------------------------------------------------------------

    def save_image(self, path: str | Path) -> Path:
        """Write the plot as it shows now to ``path``: SVG for ``.svg``, otherwise a PNG (or another raster format).

        pyqtgraph's exporters draw the plot item (points, selection, colour bar hidden or not).
        """
        path = Path(path)
        if path.suffix.lower() != ".svg":
            if not path.suffix:
                path = path.with_suffix(".png")
            pyqtgraph.exporters.ImageExporter(self.plot_item).export(str(path))
        else:
            # pyqtgraph writes a clipping view box's clip path as a closed path ("Z"), which
            # its own SVG exporter then cannot read. The points draw only what is in view
            # (PointCloudItem._paint_vector), so the export goes without the clip.
            clip = pg.GraphicsObject.GraphicsItemFlag.ItemClipsChildrenToShape
            clipped = bool(self.view_box.flags() & clip)
            self.view_box.setFlag(clip, False)
            try:
                pyqtgraph.exporters.SVGExporter(self.plot_item).export(str(path))
            finally:
                self.view_box.setFlag(clip, clipped)
        self._say(f"Saved the plot to {path}")
        return path

    def _save_image_dialog(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(
            self, "Save plot image", "embedding_plot.png", "PNG image (*.png);;SVG image (*.svg)"
        )
        if not path:
            return
        if not Path(path).suffix:
            path += ".svg" if chosen.startswith("SVG") else ".png"
        try:
            self.save_image(path)
        except OSError as exc:
            self._say(f"Could not save the plot image: {exc}")

    @property
    def animating(self) -> bool:
        return self._animation_timer.isActive()

    def _update_selection_item(self) -> None:
        controller = self.controller
        rows = controller.selected_rows
        rows = rows[rows < len(self._displayed)]
        positions = self._displayed[rows] if len(rows) else np.zeros((0, 2), np.float32)
        # The segment clicked in 3-D gets a cyan outline, a selection made here a white one.
        outline = SELECTION_OUTLINE_RGBA if controller.selection_origin == PLOT_ORIGIN else CURRENT_SEGMENT_OUTLINE_RGBA
        self.selection_item.set_positions(positions)
        self.selection_item.set_colours(np.zeros(len(rows), np.uint8), np.array([outline], np.uint8))
        self.selected_points_item.set_positions(positions)
        index, palette = self.points._index, self.points.palette
        if len(index) == len(self._displayed) and len(palette):
            self.selected_points_item.set_colours(index[rows], palette)
        else:
            self.selected_points_item.set_colours(np.zeros(len(rows), np.uint8), np.array([outline], np.uint8))

    def _on_selection(self, selection: Selection) -> None:
        self._mark("selection")
        self.feedback_label.setText(self.controller.describe_selection())
        if selection.origin == PLOT_ORIGIN:
            self.selectionChanged.emit(selection)

    def _on_hover(self, info: PointInfo | None) -> None:
        if info is None or info.row >= len(self._displayed):
            self.hover_item.setData([], [])
        else:
            x, y = self._displayed[info.row]
            self.hover_item.setData([float(x)], [float(y)])
        self.pointHovered.emit(info)

    def show_status(self, text: str) -> None:
        """Show ``text`` after the point count under the plot (the projection's status)."""
        n = self.controller.n_points
        hidden = len(self.controller.hidden_segments)
        suffix = f" · {hidden} segment{'s' if hidden != 1 else ''} hidden" if hidden else ""
        self.status_label.setText(f"{n} points, {text}{suffix}")

    # -- mouse -> controller ---------------------------------------------------------------

    def set_tool(self, mode: str) -> None:
        """Left drag pans (``"pan"``) or selects (``"rectangle"``, ``"lasso"``)."""
        if mode not in ("pan", "rectangle", "lasso"):
            raise ValueError(f"unknown tool {mode!r}")
        self.view_box.mode = mode
        for button in self.tool_buttons.buttons():
            button.setChecked(button.text().lower().startswith(mode[:4]))
        self._emit_view()

    def _hit(self, scene_pos: QPointF) -> int | None:
        if not self.view_box.sceneBoundingRect().contains(scene_pos):
            return None
        point = self.view_box.mapSceneToView(scene_pos)
        pixel = self.view_box.viewPixelSize()[0]
        return self.controller.hit_test(point.x(), point.y(), HOVER_RADIUS_PX * pixel)

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        row = self._hit(scene_pos)
        self.controller.hover(row, origin=PLOT_ORIGIN)
        self._show_tooltip(row, scene_pos)

    def _show_tooltip(self, row: int | None, scene_pos: QPointF) -> None:
        """The hovered point's segment, node, predictions and manual label, at the cursor."""
        if QApplication.mouseButtons() != Qt.MouseButton.NoButton:
            row = None  # not while dragging a rectangle or lasso, or panning
        if row is None:
            if self.tooltip_text:
                QToolTip.hideText()
                self.tooltip_text = ""
            return
        self.tooltip_text = self.controller.describe_point(row)
        viewport = self.graphics.viewport()
        at = viewport.mapToGlobal(self.graphics.mapFromScene(scene_pos))
        QToolTip.showText(at, self.tooltip_text, viewport)

    def _on_mouse_clicked(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton or event.double():
            return
        row = self._hit(event.scenePos())
        if row is None:
            self.controller.clear_selection(PLOT_ORIGIN)
        else:
            self.controller.activate(row, origin=PLOT_ORIGIN)

    def _on_region(self, kind: str, vertices: np.ndarray) -> None:
        if kind == "rectangle":
            (x0, y0), (x1, y1) = vertices[0], vertices[2]
            rows = self.controller.rows_in_rectangle(x0, y0, x1, y1)
        elif len(vertices) >= 3:
            rows = self.controller.rows_in_polygon(vertices)
        else:
            return
        self.controller.select_rows(rows, origin=PLOT_ORIGIN)

    # -- session settings -------------------------------------------------------------------

    def view_settings(self) -> dict:
        """The view's JSON-safe part of a saved session's plot settings.

        That is ``tool`` and ``view_range`` (``[[x0, x1], [y0, y1]]`` in layout units). The
        colour mode and the hidden segments are the model's
        (:meth:`segscope.app.session.Session.plot_settings`).
        """
        (x0, x1), (y0, y1) = self.view_box.viewRange()
        return {"tool": self.view_box.mode, "view_range": [[float(x0), float(x1)], [float(y0), float(y1)]]}

    def _emit_view(self, *_args: Any) -> None:
        self.viewChanged.emit(self.view_settings())

    def apply_view_settings(self, settings: dict) -> None:
        """Restore :meth:`view_settings` from a saved session's plot settings.

        Other keys are the model's and ignored here; bad entries are logged and skipped.
        """
        tool = settings.get("tool")
        if tool in ("pan", "rectangle", "lasso"):
            self.set_tool(tool)
        elif tool is not None:
            log.warning("session plot settings: unknown tool %r ignored", tool)
        view = settings.get("view_range")
        try:
            (x0, x1), (y0, y1) = view
            self.view_box.setRange(xRange=(float(x0), float(x1)), yRange=(float(y0), float(y1)), padding=0)
            self._ranged = True
        except (TypeError, ValueError):
            if view is not None:
                log.warning("session plot settings: bad view range %r ignored", view)

    # -- from outside ----------------------------------------------------------------------

    def select_segments(self, segment_ids: Iterable[int], origin: str = VIEW_3D_ORIGIN) -> bool:
        """Highlight every point of ``segment_ids`` (a selection made in 3-D); no echo."""
        return self.controller.select_segments(segment_ids, origin)

    def add_background(self, table) -> np.ndarray:
        """Add precomputed embeddings as context, with the predictions the table carries; returns the rows added.

        ``table`` is an :class:`segscope.analysis.projection.EmbeddingTable`.
        """
        controller = self.controller
        rows = controller.add_points(
            table.segment_ids,
            table.node_ids,
            table.xyz_nm,
            table.embeddings,
            compartments=table.compartments,
            background=True,
        )
        # Only rows that are new take the table's labels (add_points returns those).
        cell_types, ood_scores = table.cell_types, table.ood_scores
        if len(rows) and (cell_types is not None or ood_scores is not None):
            where = controller.rows_of(table.segment_ids, table.node_ids)
            picked = np.isin(where, rows)
            controller.set_point_predictions(
                where[picked],
                cell_types=None if cell_types is None else cell_types[picked],
                ood_scores=None if ood_scores is None else ood_scores[picked],
            )
        return rows

    def shutdown(self) -> None:
        """Stop the animation, listeners and projection workers (idempotent)."""
        self._animation_timer.stop()
        if self._unsubscribe is None:
            return
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = None
        self.scheduler.shutdown()


class EmbeddingPlotDock(QDockWidget):
    """A dock holding an :class:`EmbeddingPlotWidget` (``.plot``) and, later, a label bar.

    The label bar, a :class:`~segscope.app.views.label_bar.LabelBar` (``.label_bar``), is
    added once :meth:`attach_labels` ran.
    """

    def __init__(self, parent: QWidget | None = None, *, start_warm_up: bool = True, **plot_kwargs: Any):
        super().__init__("Embeddings", parent)
        self.setObjectName("embeddingPlotDock")
        self.plot = EmbeddingPlotWidget(**plot_kwargs)
        self.label_bar = None
        self._labels_unsubscribe: list = []
        self._label_layer_timer: QTimer | None = None
        self._body = QWidget()
        self._layout = QVBoxLayout(self._body)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addWidget(self.plot, 1)
        self.setWidget(self._body)
        self.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        if start_warm_up:
            self.plot.scheduler.start()

    @property
    def controller(self) -> PlotController:
        return self.plot.controller

    def attach_labels(
        self, labels, *, show_labels=None, current_segment=lambda: None, report=lambda message: None
    ) -> None:
        """Add the label bar that edits ``labels`` and show labelled points in 3-D, debounced.

        ``labels`` is the session's :class:`segscope.app.labels.LabelStore` (the plot's points
        already show them); labelled points are shown through ``show_labels(points,
        label_names)`` (the bridge's).
        """
        from segscope.app.views.label_bar import LabelBar

        controller = self.controller
        self.label_bar = LabelBar(labels, controller, current_segment, report)
        self.plot.message.connect(report)  # hides, undone hides, saved images: the status bar too
        self._layout.addWidget(self.label_bar)
        layer_timer = QTimer(self)
        layer_timer.setSingleShot(True)
        layer_timer.setInterval(LABEL_LAYER_DELAY_MS)
        self._label_layer_timer = layer_timer

        def write_layer() -> None:
            if show_labels is None:
                return
            rows = np.flatnonzero(controller.manual_labels != "")[:MAX_LABEL_POINTS_3D]
            points = [
                (
                    int(controller.segment_ids[r]),
                    int(controller.node_ids[r]),
                    tuple(float(v) for v in controller.xyz_nm[r]),
                    str(controller.manual_labels[r]),
                )
                for r in rows
            ]
            show_labels(points, controller.manual_label_names())

        def on_labels(_change) -> None:
            layer_timer.start()

        def on_points(rows) -> None:
            if len(rows) and (controller.manual_labels[rows] != "").any():
                layer_timer.start()

        layer_timer.timeout.connect(write_layer)
        self._labels_unsubscribe = [labels.subscribe(on_labels), controller.subscribe("points", on_points)]
        if controller.n_points:
            layer_timer.start()

    def shutdown(self) -> None:
        """Stop the plot's workers and listeners (idempotent)."""
        for unsubscribe in self._labels_unsubscribe:
            unsubscribe()
        self._labels_unsubscribe = []
        if self._label_layer_timer is not None:
            # A pending label-layer write would call into a 3-D view that is closing (a
            # segfault seen when a Qt test ended within the timer's delay of a label).
            self._label_layer_timer.stop()
            self._label_layer_timer.timeout.disconnect()
            self._label_layer_timer = None
        if self.label_bar is not None:
            self.label_bar.shutdown()
        self.plot.shutdown()
