"""The segment panel: what SegScope knows about the selected segment, and a legend."""

from __future__ import annotations

from PyQt6.QtCore import Qt
from PyQt6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from segscope.analysis import COMPARTMENTS
from segscope.analysis.artefacts import ClassifierSummary
from segscope.analysis.colours import COMPARTMENT_COLOURS, EMBEDDED_COLOUR, OOD_COLOUR, PENDING_COLOUR, cell_type_colour
from segscope.app.state import SegmentRecord, SessionState

_NO_CLASSIFIER = "— (no classifier loaded)"
_NO_CELL_TYPE_CLASSIFIER = "— (no cell-type classifier loaded)"
_NO_COMPARTMENT_CLASSIFIER = "— (no compartment classifier loaded)"


def _swatch(colour: str) -> str:
    """Rich text of a colour square on a dark chip (as on the 3-D view's black), then a space.

    The cell-type colours are light tints: on a light panel they need the dark chip.
    """
    return f'<span style="color:{colour}; background-color:#202020; font-size:14px">&nbsp;■&nbsp;</span>&nbsp;'


def _swatch_label(colour: str, text: str) -> QWidget:
    """A colour square followed by text, for legends and per-compartment rows."""
    row = QLabel()
    row.setTextFormat(Qt.TextFormat.RichText)
    row.setText(f"{_swatch(colour)}{text}")
    return row


class SegmentPanel(QWidget):
    """Read-only view of the selected segment; redraws from :class:`SessionState` events.

    Shows the id, embedding progress, node counts, the dataset's own compartment labels
    (clearly marked as ground truth), and the classifier outputs (cell type, OOD flag,
    predicted compartments) when classifiers are loaded.
    """

    def __init__(self, state: SessionState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        layout = QVBoxLayout(self)

        segment_box = QGroupBox("Segment")
        form = QFormLayout(segment_box)
        self.segment_id_label = QLabel("none selected")
        self.segment_id_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.source_label = QLabel("—")
        self.nodes_label = QLabel("—")
        self.embedded_label = QLabel("—")
        form.addRow("Segment id:", self.segment_id_label)
        form.addRow("Skeleton nodes:", self.nodes_label)
        form.addRow("Embedded centres:", self.embedded_label)
        form.addRow("Embeddings:", self.source_label)
        layout.addWidget(segment_box)

        prediction_box = QGroupBox("Predictions")
        form = QFormLayout(prediction_box)
        self.cell_type_label = QLabel(_NO_CLASSIFIER)
        self.cell_type_label.setTextFormat(Qt.TextFormat.RichText)
        self.ood_label = QLabel(_NO_CLASSIFIER)
        self.ood_label.setWordWrap(True)
        self.predicted_labels = {name: QLabel("—") for name in COMPARTMENTS}
        form.addRow("Cell type:", self.cell_type_label)
        form.addRow("Out of distribution:", self.ood_label)
        self.predicted_note = QLabel(_NO_CLASSIFIER)
        form.addRow("Compartments:", self.predicted_note)
        for name in COMPARTMENTS:
            form.addRow(_swatch_label(COMPARTMENT_COLOURS[name], name), self.predicted_labels[name])
        self.prediction_note = QLabel("")
        self.prediction_note.setWordWrap(True)
        form.addRow(self.prediction_note)
        layout.addWidget(prediction_box)

        truth_box = QGroupBox("Dataset labels (ground truth, not predictions)")
        form = QFormLayout(truth_box)
        self.truth_note = QLabel("—")
        self.truth_note.setWordWrap(True)
        form.addRow(self.truth_note)
        self.truth_labels = {name: QLabel("—") for name in COMPARTMENTS}
        for name in COMPARTMENTS:
            form.addRow(_swatch_label(COMPARTMENT_COLOURS[name], name), self.truth_labels[name])
        layout.addWidget(truth_box)

        legend_box = QGroupBox("Legend (nodes in 3-D)")
        legend = QVBoxLayout(legend_box)
        legend.addWidget(_swatch_label(PENDING_COLOUR, "embedding pending"))
        legend.addWidget(_swatch_label(EMBEDDED_COLOUR, "embedded, no compartment classifier"))
        for name in COMPARTMENTS:
            legend.addWidget(_swatch_label(COMPARTMENT_COLOURS[name], f"predicted {name}"))
        legend.addWidget(_swatch_label(OOD_COLOUR, "segment out of distribution (and a box with its own layer)"))
        self.cell_type_legend = QLabel("")
        self.cell_type_legend.setTextFormat(Qt.TextFormat.RichText)
        self.cell_type_legend.setWordWrap(True)
        legend.addWidget(self.cell_type_legend)
        hint = QLabel(
            "Double-click a segment in the 2-D or 3-D view to embed it. The layer "
            "'ground truth compartments (dataset)' shows the dataset's labels."
        )
        hint.setWordWrap(True)
        legend.addWidget(hint)
        layout.addWidget(legend_box)
        layout.addStretch(1)

        for event in ("segment", "centres", "predictions"):
            state.subscribe(event, self._refresh)
        state.subscribe("embeddings", lambda record, _indices: self._refresh_progress(record))
        state.subscribe("dataset", lambda _summary: self._refresh(state.segment))
        state.subscribe("classifiers", self._show_classifiers)
        self._show_classifiers(state.classifiers)

    # -- redraw ------------------------------------------------------------------------

    def _show_classifiers(self, summary: ClassifierSummary | None) -> None:
        cell_types = None if summary is None or summary.cell_type is None else summary.cell_type.class_names
        if cell_types:
            swatches = "&nbsp; ".join(f"{_swatch(cell_type_colour(name, cell_types))}{name}" for name in cell_types)
            self.cell_type_legend.setText(f"Segment colour = predicted cell type: {swatches}")
        else:
            self.cell_type_legend.setText("")
        self._refresh(self.state.segment)

    def _refresh(self, record: SegmentRecord | None) -> None:
        if record is None:
            self.segment_id_label.setText("none selected")
            for label in (self.nodes_label, self.embedded_label, self.source_label):
                label.setText("—")
            self._show_truth(None)
            self._show_predictions(None)
            return
        self.segment_id_label.setText(str(record.segment_id))
        if record.node_ids is None:
            self.nodes_label.setText("finding centres…")
        elif record.embedding_source == "precomputed":
            skeleton = f"{record.skeleton_node_count} in the skeleton, " if record.skeleton_node_count else ""
            self.nodes_label.setText(f"{skeleton}{record.n_centres} precomputed nodes")
        else:
            skeleton = (
                f"{record.skeleton_node_count} ({record.n_centres} embedding centres)"
                if record.skeleton_node_count
                else f"no skeleton ({record.n_centres} centres from the mask)"
            )
            self.nodes_label.setText(skeleton)
        self._refresh_progress(record)
        self._show_truth(record)
        self._show_predictions(record)

    def _refresh_progress(self, record: SegmentRecord) -> None:
        if record.node_ids is None:
            self.embedded_label.setText("—")
            self.source_label.setText("—")
            return
        self.embedded_label.setText(f"{record.n_embedded} of {record.n_centres}")
        model = self.state.model
        if record.embedding_source == "precomputed":
            self.source_label.setText("precomputed (CSV ZIP)")
        elif model is None:
            self.source_label.setText("no model loaded")
        else:
            trained = "" if model.trained else ", untrained weights"
            self.source_label.setText(f"computed by {model.name}{trained}")

    def _show_truth(self, record: SegmentRecord | None) -> None:
        counts = None if record is None else record.compartment_counts("ground_truth")
        dataset = self.state.dataset
        if record is None:
            self.truth_note.setText("—")
        elif counts is None:
            self.truth_note.setText(
                "This dataset has no compartment labels." if dataset is None or not dataset.has_ground_truth else "—"
            )
        else:
            unlabelled = counts.get("unlabelled", 0)
            self.truth_note.setText(
                "Centres per compartment as labelled in the dataset"
                + (f" ({unlabelled} unlabelled)" if unlabelled else "")
                + ":"
            )
        for name in COMPARTMENTS:
            self.truth_labels[name].setText("—" if counts is None else str(counts[name]))

    def _show_predictions(self, record: SegmentRecord | None) -> None:
        summary = self.state.classifiers
        has_cell_type = summary is not None and summary.cell_type is not None
        has_compartment = summary is not None and summary.compartment is not None
        if record is None:
            missing = "—" if self.state.classifiers_loaded else _NO_CLASSIFIER
        elif not self.state.classifiers_loaded:
            missing = _NO_CLASSIFIER
        else:
            missing = "—"  # a classifier is there; this segment has no output yet
        if record is None or record.cell_type is None:
            self.cell_type_label.setText(
                missing if has_cell_type or missing == _NO_CLASSIFIER else _NO_CELL_TYPE_CLASSIFIER
            )
        else:
            probability = "" if record.cell_type_probability is None else f" (p = {record.cell_type_probability:.2f})"
            names = () if not has_cell_type else summary.cell_type.class_names
            swatch = _swatch(cell_type_colour(record.cell_type, names))
            self.cell_type_label.setText(f"{swatch}{record.cell_type}{probability}")
        if record is None or record.ood_score is None:
            self.ood_label.setText(missing if has_cell_type or missing == _NO_CLASSIFIER else _NO_CELL_TYPE_CLASSIFIER)
            self.ood_label.setStyleSheet("")
        else:
            threshold = "" if record.ood_threshold is None else f" vs threshold {record.ood_threshold:.2f}"
            flag = "YES, out of distribution" if record.ood_flagged else "no"
            self.ood_label.setText(f"{flag} (score {record.ood_score:.2f}{threshold})")
            self.ood_label.setStyleSheet(f"color: {OOD_COLOUR}; font-weight: bold" if record.ood_flagged else "")
        counts = None if record is None else record.compartment_counts("predicted")
        if counts is not None:
            pending = counts.get("unlabelled", 0)
            self.predicted_note.setText(
                "centres per predicted compartment" + (f" ({pending} not yet)" if pending else "") + ":"
            )
        elif record is not None and self.state.classifiers_loaded and not has_compartment:
            self.predicted_note.setText(_NO_COMPARTMENT_CLASSIFIER)
        else:
            self.predicted_note.setText(missing)
        for name in COMPARTMENTS:
            self.predicted_labels[name].setText("—" if counts is None else str(counts[name]))
        note = "" if record is None else record.prediction_note
        message = self.state.classifiers_message
        if message and (not self.state.classifiers_loaded or message.startswith("WARNING")):
            note = message
        self.prediction_note.setText(note)
        self.prediction_note.setVisible(bool(note))
