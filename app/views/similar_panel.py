"""The Find similar dock: a ranked list of the segments most like a segment or a plot selection.

:class:`SimilarPanel` shows :class:`~segscope.app.find_similar.FindSimilar`'s answers: rank,
segment id, Euclidean distance, nodes (and, at the node level, how many query nodes found
the segment). Clicking a row selects that segment in the plot and in 3-D and moves the 3-D
view to it; double-clicking embeds it (as a double click in 3-D does); "Select all" selects
the query and every answer again. :func:`add_find_similar` puts the dock in the main
window and adds the ways to ask: the plot's right-click menu (its selection), the segment
panel's right-click menu and the Segment menu (the selected segment), shift + right click
on a segment in 3-D.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtGui import QAction, QKeySequence
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDockWidget,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from segscope.app.events import connect
from segscope.app.find_similar import SIMILAR_ORIGIN, FindSimilar, SimilarResults

log = logging.getLogger(__name__)

COLUMNS = ("Rank", "Segment", "Distance", "Nodes", "Hits")
HINT = (
    "Shift + right-click a segment in 3-D, right-click the segment panel or a plot selection "
    "(Rect, Lasso), or Segment ▸ Find similar segments (Ctrl+F)."
)


class SimilarPanel(QWidget):
    """The ranked list of one Find similar answer, with the level and k to ask with.

    Signals
    -------
    segmentClicked(int)
        A row was clicked: select that segment.
    segmentActivated(int)
        A row was double-clicked: embed that segment.
    selectAllRequested()
        "Select all": the query and all its answers again.
    """

    segmentClicked = pyqtSignal(object)  # object: a C int would wrap uint64 ids
    segmentActivated = pyqtSignal(object)
    selectAllRequested = pyqtSignal()

    def __init__(self, finder: FindSimilar, parent: QWidget | None = None):
        super().__init__(parent)
        self.finder = finder
        self.title = QLabel("No query yet.")
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hint = QLabel(HINT)
        self.hint.setWordWrap(True)
        self.level_box = QComboBox()
        self.level_box.addItems(["segment", "node"])
        self.level_box.setCurrentText(finder.level)
        self.level_box.setToolTip(
            "segment: compare per-segment mean embeddings; node: each query node's nearest nodes of other segments"
        )
        self.level_box.currentTextChanged.connect(self._set_level)
        self.k_box = QSpinBox()
        self.k_box.setRange(1, 500)
        self.k_box.setValue(finder.k)
        self.k_box.setToolTip("How many similar segments to list")
        self.k_box.valueChanged.connect(self._set_k)
        self.select_all_button = QPushButton("Select all")
        self.select_all_button.setToolTip("Select the query and every listed segment in 3-D and in the plot")
        self.select_all_button.setEnabled(False)
        self.select_all_button.clicked.connect(self.selectAllRequested.emit)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Level:"))
        controls.addWidget(self.level_box)
        controls.addWidget(QLabel("k:"))
        controls.addWidget(self.k_box)
        controls.addStretch(1)
        controls.addWidget(self.select_all_button)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)  # the segment id column
        self.table.cellClicked.connect(lambda row, _column: self._emit_row(row, self.segmentClicked))
        self.table.cellDoubleClicked.connect(lambda row, _column: self._emit_row(row, self.segmentActivated))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.title)
        layout.addLayout(controls)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.hint)
        self._unsubscribe = [
            connect(finder.events.results, self.show_results),
            connect(finder.events.error, self.show_message),
            connect(finder.events.status, lambda text: text and self.title.setText(text)),
        ]

    def _set_level(self, level: str) -> None:
        self.finder.level = level

    def _set_k(self, k: int) -> None:
        self.finder.k = int(k)

    def _emit_row(self, row: int, signal) -> None:
        item = self.table.item(row, 1)
        if item is not None:
            signal.emit(int(item.data(Qt.ItemDataRole.UserRole)))

    def segment_at(self, row: int) -> int:
        """The segment id listed in ``row``."""
        item = self.table.item(row, 1)
        if item is None:
            raise IndexError(f"no row {row}")
        return int(item.data(Qt.ItemDataRole.UserRole))

    def show_results(self, result: SimilarResults) -> None:
        """List ``result``'s segments, nearest first."""
        kind = "exact search" if result.index_kind == "flat" else "HNSW"
        self.title.setText(
            f"Segments like {result.description}: {len(result.results)} nearest of "
            f"{max(0, result.n_segments - len(result.query_segments)):,} ({result.level} level, "
            f"Euclidean, {kind}, {result.seconds * 1e3:.0f} ms)"
        )
        self.table.setColumnHidden(4, result.level != "node")
        self.table.setRowCount(len(result.results))
        for row, answer in enumerate(result.results):
            values = (answer.rank, answer.segment_id, f"{answer.distance:.4g}", answer.n_nodes, answer.hits)
            for column, value in enumerate(values):
                item = QTableWidgetItem(str(value))
                if column == 1:
                    item.setData(Qt.ItemDataRole.UserRole, answer.segment_id)
                if column != 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, column, item)
        self.select_all_button.setEnabled(bool(result.results))

    def show_message(self, text: str) -> None:
        self.title.setText(text)

    def shutdown(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []


class SimilarDock(QDockWidget):
    """A dock holding a :class:`SimilarPanel` (``.panel``) and its :class:`FindSimilar` (``.finder``).

    Parameters
    ----------
    finder
        The Qt-free search.
    viewer
        The Neuroglancer bridge (or a stand-in with ``highlight_segments`` and
        ``highlight_node``), None without a 3-D view.
    on_activate
        Called with a segment id on a double-clicked row (the service's ``select_segment``).
    """

    def __init__(self, finder: FindSimilar, viewer: Any = None, on_activate=None, parent: QWidget | None = None):
        super().__init__("Similar segments", parent)
        self.setObjectName("similarDock")
        self.finder = finder
        self.viewer = viewer
        self.panel = SimilarPanel(finder)
        self.setWidget(self.panel)
        self.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.panel.segmentClicked.connect(self.select_segment)
        self.panel.selectAllRequested.connect(self.select_all)
        if on_activate is not None:
            self.panel.segmentActivated.connect(on_activate)
        self._unsubscribe = [connect(finder.events.results, lambda _result: self.raise_())]

    def select_segment(self, segment_id: int) -> None:
        """Select one listed segment in the plot and in 3-D, and move the 3-D view to it."""
        plot = self.finder.plot
        plot.select_segments([segment_id], SIMILAR_ORIGIN)
        if self.viewer is None:
            return
        self.viewer.highlight_segments([segment_id])
        rows = plot.segment_rows([segment_id])
        if len(rows):
            # The node nearest the segment's centroid: on the segment, unlike the centroid.
            xyz = plot.xyz_nm[rows]
            row = rows[int(np.argmin(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1)))]
            info = plot.point(int(row))
            self.viewer.highlight_node((info.segment_id, info.node_id, info.xyz_nm), move=True)

    def select_all(self) -> None:
        """Select the last answer's query and segments again (plot and 3-D)."""
        result = self.finder.last
        if result is None:
            return
        segments = [*result.query_segments, *result.segment_ids]
        self.finder.plot.select_segments(segments, SIMILAR_ORIGIN)
        if self.viewer is not None:
            self.viewer.highlight_segments(segments)

    def shutdown(self) -> None:
        """Stop listening (idempotent); the finder stops too."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.panel.shutdown()
        self.finder.shutdown()


def find_like_plot_selection(finder: FindSimilar, current_segment=lambda: None) -> bool:
    """Ask for segments like the plot's selected points, else like the selected segment."""
    rows = finder.plot.selected_rows
    if len(rows):
        return finder.find_like_rows(rows)
    segment = current_segment()
    if segment is None:
        finder.events.error.emit("Find similar: select points in the plot (Rect, Lasso) or a segment first.")
        return False
    return finder.find([segment])


def add_find_similar(window) -> SimilarDock:
    """Add the Find similar dock and its actions to a :class:`~segscope.app.views.main_window.MainWindow`.

    Needs the window's plot dock (:meth:`~segscope.app.views.main_window.MainWindow.attach_plot`):
    the index covers the plot's points. Queries run on the service's ``analysis_runner``.
    """
    from segscope.app.wiring import link_find_similar

    session, service = window.session, window.service
    finder = FindSimilar(session.plot, service.analysis_runner)
    dock = SimilarDock(finder, window.bridge, on_activate=lambda s: service.select_segment(int(s)), parent=window)
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.tabifyDockWidget(window.segment_dock, dock)
    window.segment_dock.raise_()
    link_find_similar(finder, window.bridge, window.invoker.post)
    connect(finder.events.error, lambda text: window.statusBar().showMessage(text, 8000))

    def like_current() -> bool:
        segment = session.current_segment_id()
        if segment is None:
            finder.events.error.emit("Find similar: select a segment first (double-click it in 3-D).")
            return False
        return finder.find([segment])

    segment_action = QAction("Find similar segments", window)
    segment_action.setShortcut(QKeySequence("Ctrl+F"))
    segment_action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
    segment_action.setToolTip("List the segments whose embeddings are nearest to the selected segment's")
    segment_action.triggered.connect(like_current)
    window.addAction(segment_action)
    segment_menu = next((a.menu() for a in window.menuBar().actions() if a.text() == "&Segment"), None)
    if segment_menu is not None:
        segment_menu.addAction(segment_action)
    window.panel.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
    window.panel.addAction(segment_action)
    if window.plot_dock is not None:
        plot = window.plot_dock.plot
        plot_action = QAction("Find similar to selection", plot)
        plot_action.setToolTip("List the segments nearest to the selected points (or the selected segment)")
        plot_action.triggered.connect(lambda: find_like_plot_selection(finder, session.current_segment_id))
        plot.view_box.menu.addAction(plot_action)
        plot.find_similar_action = plot_action
    dock.segment_action = segment_action
    return dock
