"""The Export dialog: which parts of the session to write, and where.

The dialog only collects an :class:`~segscope.app.service.ExportRequest`; the session service
runs the export on its I/O worker (:func:`segscope.app.session_export.export_session`) and,
when asked, adds the exported annotation layer to the viewer.
"""

from __future__ import annotations

from pathlib import Path

from PyQt6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from segscope.analysis.export import ALL_PARTS
from segscope.app.service import ExportRequest

#: What each part is called in the dialog.
PART_TITLES = {
    "annotations": "Annotated nodes (Neuroglancer precomputed annotations)",
    "segment_properties": "Segment properties (Neuroglancer)",
    "state": "Neuroglancer state JSON",
    "tables": "Node and segment tables",
    "cave": "CAVE-style cell-type table",
    "swc": "SWC skeletons (segments with a skeleton)",
}


class ExportDialog(QDialog):
    """Asks for the bundle folder, the parts and the table formats.

    ``summary`` is a line describing what will be exported (segments, nodes, labels).
    """

    def __init__(self, default_folder: Path, summary: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export session")
        self.folder_edit = QLineEdit(str(default_folder))
        self.folder_edit.setMinimumWidth(420)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(browse)

        self.part_boxes: dict[str, QCheckBox] = {}
        parts = QGroupBox("Write")
        parts_layout = QVBoxLayout(parts)
        for part in ALL_PARTS:
            box = QCheckBox(PART_TITLES.get(part, part))
            box.setChecked(True)
            self.part_boxes[part] = box
            parts_layout.addWidget(box)
        self.format_boxes = {
            fmt: QCheckBox(fmt.upper() if fmt == "csv" else fmt.capitalize()) for fmt in ("parquet", "csv")
        }
        formats_row = QHBoxLayout()
        for box in self.format_boxes.values():
            box.setChecked(True)
            formats_row.addWidget(box)
        formats_row.addStretch(1)
        self.force_box = QCheckBox("Replace the folder if it exists")
        self.layer_box = QCheckBox("Add the exported annotation layer to the viewer")
        self.layer_box.setChecked(True)
        self.error_label = QLabel("")
        self.error_label.setStyleSheet("color: #d33")
        self.error_label.setWordWrap(True)

        form = QFormLayout(self)
        form.addRow(QLabel(summary))
        form.addRow("Folder:", folder_row)
        form.addRow(parts)
        form.addRow("Tables as:", formats_row)
        form.addRow(self.force_box)
        form.addRow(self.layer_box)
        form.addRow(self.error_label)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Save).setText("Export")
        self.buttons.accepted.connect(self._accept_if_valid)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)

    def _browse(self) -> None:
        current = Path(self.folder_edit.text().strip() or ".")
        chosen = QFileDialog.getExistingDirectory(self, "Folder to export into", str(current.parent))
        if chosen:
            self.folder_edit.setText(str(Path(chosen) / current.name))

    def request(self) -> ExportRequest:
        """The request as the dialog stands.

        Raises
        ------
        ValueError
            Without a folder, a part, or a table format where tables are written.
        """
        text = self.folder_edit.text().strip()
        if not text:
            raise ValueError("choose a folder to export into")
        parts = tuple(part for part, box in self.part_boxes.items() if box.isChecked())
        if not parts:
            raise ValueError("choose at least one part to write")
        formats = tuple(fmt for fmt, box in self.format_boxes.items() if box.isChecked())
        if not formats and ({"tables", "cave"} & set(parts)):
            raise ValueError("choose Parquet and/or CSV for the tables")
        folder = Path(text).expanduser()
        if folder.exists() and not self.force_box.isChecked():
            raise ValueError(f"{folder} exists; tick 'Replace the folder' or choose another")
        return ExportRequest(
            folder,
            parts,
            formats or ("parquet",),
            self.force_box.isChecked(),
            self.layer_box.isChecked() and "annotations" in parts,
        )

    def _accept_if_valid(self) -> None:
        try:
            self.request()
        except ValueError as exc:
            self.error_label.setText(str(exc))
            return
        self.accept()
