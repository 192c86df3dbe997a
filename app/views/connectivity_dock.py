"""The Connectivity dock: a type-to-type synapse heat map; a click selects that cell's segments.

:class:`ConnectivityPanel` reads a synapse table (pre_segment, post_segment, x_nm, y_nm, z_nm)
and a type table (an embeddings Parquet from ``segscope embed --classifiers``, a segment
table the app exported, manual labels and OOD flags included, or a dataset's
``segments.parquet``) through :mod:`segscope.analysis.connectivity`, draws counts or
normalised values as a pyqtgraph image (rows: presynaptic type), and emits the pre- and
postsynaptic segments of a clicked cell. :func:`add_connectivity` docks it in the main
window; the demo's synapses and ground-truth types load on their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

#: Plot selection origin of a connectivity click.
CONNECTIVITY_ORIGIN = "connectivity"


class ConnectivityPanel(QWidget):
    """Heat map of a :class:`~segscope.analysis.connectivity.ConnectivityMatrix`.

    Signals
    -------
    segmentsRequested(object)
        A cell was clicked: a list of the segment ids (pre then post) of its synapses.
    """

    segmentsRequested = pyqtSignal(object)

    def __init__(self, parent: QWidget | None = None):
        import pyqtgraph as pg

        super().__init__(parent)
        self.matrix: Any = None
        self.synapses_path: Path | None = None
        self.types_path: Path | None = None
        self.status = QLabel("Load a synapse table and a type table.")
        self.status.setWordWrap(True)
        self.norm_box = QComboBox()
        self.norm_box.addItems(["synapses", "row", "pair"])
        self.norm_box.setToolTip(
            "synapses: counts; row: share of the presynaptic type's synapses; pair: per segment pair"
        )
        self.norm_box.currentTextChanged.connect(lambda _text: self._draw())
        synapses_button = QPushButton("Synapses…")
        synapses_button.clicked.connect(self._choose_synapses)
        types_button = QPushButton("Types…")
        types_button.clicked.connect(self._choose_types)
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(self._export)
        self.export_button.setEnabled(False)
        row = QHBoxLayout()
        for widget in (synapses_button, types_button, self.norm_box, self.export_button):
            row.addWidget(widget)
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.invertY(True)
        self.plot.setLabel("left", "presynaptic type")
        self.plot.setLabel("bottom", "postsynaptic type")
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setColorMap(pg.colormap.get("viridis"))
        self.plot.addItem(self.image)
        self.texts: list[Any] = []
        self.plot.scene().sigMouseClicked.connect(self._on_click)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.status)

    def load(self, synapses_path: str | Path, types_path: str | Path) -> bool:
        """Read both tables and draw; a bad table is reported in the status line (False)."""
        from segscope.analysis.connectivity import connectivity_matrix, read_segment_types
        from segscope.analysis.synapses import read_synapse_table

        try:
            synapses = read_synapse_table(synapses_path)
            types = read_segment_types(types_path)
        except (ValueError, KeyError, OSError) as exc:
            self.status.setText(f"Could not load: {exc}")
            return False
        self.synapses_path, self.types_path = Path(synapses_path), Path(types_path)
        order = sorted({t for t in types.cell_type.tolist() if t})
        self.matrix = connectivity_matrix(synapses, types, order)
        self.status.setText(
            f"{len(synapses)} synapses ({self.synapses_path.name}), types from {self.types_path.name}. "
            "Click a cell to select its segments."
        )
        self.export_button.setEnabled(True)
        self._draw()
        return True

    def values(self) -> np.ndarray:
        """The matrix as drawn: counts or the chosen normalisation (float ``[T, T]``)."""
        how = self.norm_box.currentText()
        return self.matrix.synapses.astype(float) if how == "synapses" else self.matrix.normalised(how)

    def _draw(self) -> None:
        import pyqtgraph as pg

        if self.matrix is None:
            return
        values = self.values()
        self.image.setImage(values, autoLevels=False, levels=(0.0, max(float(values.max()), 1e-9)))
        names = list(self.matrix.types)
        ticks = [list(enumerate(names))]
        self.plot.getAxis("bottom").setTicks([[(i + 0.5, n) for i, n in ticks[0]]])
        self.plot.getAxis("left").setTicks([[(i + 0.5, n) for i, n in ticks[0]]])
        for text in self.texts:
            self.plot.removeItem(text)
        self.texts = []
        counts = self.matrix.synapses
        for i in range(len(names)):
            for j in range(len(names)):
                label = str(counts[i, j]) if self.norm_box.currentText() == "synapses" else f"{values[i, j]:.2f}"
                text = pg.TextItem(label, color="w", anchor=(0.5, 0.5))
                text.setPos(j + 0.5, i + 0.5)
                self.plot.addItem(text)
                self.texts.append(text)
        self.plot.setRange(xRange=(0, len(names)), yRange=(0, len(names)), padding=0.02)

    def cell_at(self, x: float, y: float) -> tuple[str, str] | None:
        """(pre type, post type) of the cell under view coordinates ``x`` (column), ``y`` (row)."""
        if self.matrix is None:
            return None
        n = len(self.matrix.types)
        i, j = int(np.floor(y)), int(np.floor(x))
        if not (0 <= i < n and 0 <= j < n):
            return None
        return self.matrix.types[i], self.matrix.types[j]

    def select_cell(self, pre_type: str, post_type: str) -> list[int]:
        """Emit and return the segments (pre, then post) of the synapses from ``pre_type`` onto ``post_type``."""
        pre, post = self.matrix.pair_segments[(pre_type, post_type)]
        segments = list(dict.fromkeys([*pre.tolist(), *post.tolist()]))
        count = int(self.matrix.synapses[self.matrix.types.index(pre_type), self.matrix.types.index(post_type)])
        self.status.setText(
            f"{pre_type} → {post_type}: {count} synapses, {len(pre)} presynaptic and "
            f"{len(post)} postsynaptic segments selected."
        )
        self.segmentsRequested.emit(segments)
        return segments

    def _on_click(self, event) -> None:
        if self.matrix is None or event.button() != Qt.MouseButton.LeftButton:
            return
        point = self.plot.getPlotItem().vb.mapSceneToView(event.scenePos())
        cell = self.cell_at(point.x(), point.y())
        if cell is not None:
            self.select_cell(*cell)

    def _choose_synapses(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Synapse table", "", "Tables (*.parquet *.csv)")
        if path and self.types_path is not None:
            self.load(path, self.types_path)
        elif path:
            self.synapses_path = Path(path)
            self.status.setText(f"Synapses: {Path(path).name}. Now choose a type table.")

    def _choose_types(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Segment types", "", "Tables (*.parquet *.csv)")
        if path and self.synapses_path is not None:
            self.load(self.synapses_path, path)
        elif path:
            self.types_path = Path(path)
            self.status.setText(f"Types: {Path(path).name}. Now choose a synapse table.")

    def export_csv(self, path: str | Path) -> Path:
        """Write the matrix (one row per type pair) with the current normalisation."""
        how = self.norm_box.currentText()
        return self.matrix.write_csv(path, "row" if how == "synapses" else how, force=True)

    def _export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export connectivity", "connectivity.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)
            self.status.setText(f"Wrote {path}")


def demo_tables(segmentation_url: str) -> tuple[Path, Path] | None:
    """The synapse and segment tables beside a local SegScope dataset's segmentation, if any."""
    from segscope.analysis.artefacts import local_folder

    folder = local_folder(segmentation_url)
    if folder is None:
        return None
    root = folder.parent
    if (root / "synapses.parquet").is_file() and (root / "segments.parquet").is_file():
        return root / "synapses.parquet", root / "segments.parquet"
    return None


def add_connectivity(window) -> QDockWidget:
    """Dock a :class:`ConnectivityPanel` in the main window; a click selects in the plot and in 3-D."""
    panel = ConnectivityPanel()
    dock = QDockWidget("Connectivity", window)
    dock.setObjectName("connectivity_dock")
    dock.setWidget(panel)
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    window.tabifyDockWidget(window.segment_dock, dock)
    window.segment_dock.raise_()

    def select(segments: list[int]) -> None:
        if window.plot_dock is not None:
            window.session.plot.select_segments(segments, CONNECTIVITY_ORIGIN)
        if window.bridge is not None:
            window.bridge.highlight_segments(segments)

    panel.segmentsRequested.connect(select)
    dataset = window.session.state.dataset
    tables = None if dataset is None else demo_tables(dataset.segmentation_url)
    if tables is not None and panel.load(*tables):
        panel.status.setText(panel.status.text() + " Types: the demo's ground truth; Types… loads predictions.")
    dock.panel = panel  # type: ignore[attr-defined]
    return dock
