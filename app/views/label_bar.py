"""The manual-label bar under the embedding plot: name a label, give it to the selection.

What gets the label
-------------------
* **Label nodes**: the points selected in the plot (rectangle or lasso), as
  (segment id, node id) pairs.
* **Label segments**: every segment with a selected point; with no plot selection, the
  segment selected in the 3-D view.
* **Remove**: clears node labels of the selected points and the segment labels of their
  segments (one undoable step each).

Every assignment is one command of the session's :class:`segscope.app.labels.LabelStore`, so the
window's Undo/Redo (Ctrl+Z / Ctrl+Shift+Z) reverts it. The bar only calls the store; the
plot and the 3-D view redraw from the store's change events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from PyQt6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QWidget

log = logging.getLogger(__name__)


class LabelBar(QWidget):
    """An editable label name and buttons that label the current selection.

    Parameters
    ----------
    labels
        The session's :class:`segscope.app.labels.LabelStore`.
    controller
        The plot's :class:`segscope.app.plot_controller.PlotController` (its selection).
    current_segment
        Returns the segment id selected in the 3-D view, or None.
    report
        Shows a one-line message (the status bar); errors go there too.
    """

    def __init__(
        self,
        labels,
        controller,
        current_segment: Callable[[], int | None],
        report: Callable[[str], None],
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.labels = labels
        self.controller = controller
        self.current_segment = current_segment
        self.report = report
        self.name_box = QComboBox()
        self.name_box.setEditable(True)
        self.name_box.setMinimumWidth(120)
        self.name_box.lineEdit().setPlaceholderText("label, e.g. axon")
        self.name_box.setToolTip("Name of the manual label (a new name or one already used)")
        self.nodes_button = QPushButton("Label nodes")
        self.nodes_button.setToolTip("Give the label to the points selected in the plot")
        self.segments_button = QPushButton("Label segments")
        self.segments_button.setToolTip(
            "Give the label to the segments of the selected points (or to the segment selected in 3-D)"
        )
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Remove manual labels from the selected points and their segments")
        self.nodes_button.clicked.connect(self.label_nodes)
        self.segments_button.clicked.connect(self.label_segments)
        self.remove_button.clicked.connect(self.remove_labels)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Label:"))
        layout.addWidget(self.name_box, 1)
        for button in (self.nodes_button, self.segments_button, self.remove_button):
            layout.addWidget(button)
        self._unsubscribe = labels.subscribe(lambda change: self._refresh_names())
        self._refresh_names()

    # -- what is selected ------------------------------------------------------------------

    def _selected_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.controller.selected_rows
        return self.controller.segment_ids[rows], self.controller.node_ids[rows]

    def _selected_segments(self) -> list[int]:
        segments = sorted(self.controller.selected_segments)
        if not segments and self.current_segment() is not None:
            segments = [int(self.current_segment())]
        return segments

    def label_name(self) -> str:
        return self.name_box.currentText().strip()

    # -- actions -----------------------------------------------------------------------------

    def _assign(self, what: Callable[[], bool]) -> bool | None:
        """Run one store command; None (and the reason reported) when it was refused."""
        try:
            return what()
        except (ValueError, KeyError) as exc:
            self.report(f"Label not given: {exc}")
            return None

    def _ready(self, name: str, selected: int, nothing_selected: str) -> bool:
        if not name:
            self.report("Type a label name first.")
        elif not selected:
            self.report(nothing_selected)
        return bool(name) and bool(selected)

    def label_nodes(self) -> bool:
        """Give the typed label to the selected points; True if anything changed."""
        name = self.label_name()
        segments, nodes = self._selected_nodes()
        if not self._ready(name, len(nodes), "Select points in the plot first (Rect or Lasso)."):
            return False
        changed = self._assign(lambda: self.labels.assign_nodes(name, segments, nodes))
        if changed is not None:
            self.report(
                f'Labelled {len(nodes)} node{"s" if len(nodes) != 1 else ""} "{name}" (Ctrl+Z undoes).'
                if changed
                else f'Those {len(nodes)} nodes already carry "{name}".'
            )
        return bool(changed)

    def label_segments(self) -> bool:
        """Give the typed label to the selected segments; True if anything changed."""
        name = self.label_name()
        segments = self._selected_segments()
        if not self._ready(name, len(segments), "Select points in the plot or a segment in 3-D first."):
            return False
        changed = self._assign(lambda: self.labels.assign_segments(name, segments))
        if changed is not None:
            self.report(
                f'Labelled {len(segments)} segment{"s" if len(segments) != 1 else ""} "{name}" (Ctrl+Z undoes).'
                if changed
                else f'Those {len(segments)} segments already carry "{name}".'
            )
        return bool(changed)

    def remove_labels(self) -> bool:
        """Remove node labels of the selected points and labels of their segments."""
        segments, nodes = self._selected_nodes()
        segment_ids = self._selected_segments()
        if not len(nodes) and not segment_ids:
            self.report("Nothing selected.")
            return False
        changed = False
        if len(nodes):
            changed |= bool(self._assign(lambda: self.labels.assign_nodes(None, segments, nodes)))
        if segment_ids:
            changed |= bool(self._assign(lambda: self.labels.assign_segments(None, segment_ids)))
        self.report("Removed manual labels." if changed else "The selection carries no manual labels.")
        return changed

    def _refresh_names(self) -> None:
        typed = self.name_box.currentText()
        names = self.labels.labels()
        if [self.name_box.itemText(i) for i in range(self.name_box.count())] != names:
            self.name_box.blockSignals(True)
            self.name_box.clear()
            self.name_box.addItems(names)
            self.name_box.setEditText(typed)
            self.name_box.blockSignals(False)

    def shutdown(self) -> None:
        self._unsubscribe()
