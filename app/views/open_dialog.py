"""The Open dialog: sources, models and embeddings, with browse buttons, recents and drops.

Recent sources are kept as JSON in ``user_cache_dir()/recent_sources.json`` (not QSettings):
the CLI and tests already find SegScope's per-user folder through
:func:`segscope.analysis.paths.user_cache_dir` (``XDG_CACHE_HOME`` moves it), so no Qt
organisation name is needed and the file is readable without Qt.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PyQt6.QtCore import Qt
from PyQt6.QtGui import QDragEnterEvent, QDropEvent
from PyQt6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

log = logging.getLogger(__name__)

RECENT_FILE = "recent_sources.json"
MAX_RECENT = 10


@dataclass(frozen=True)
class OpenRequest:
    """What the user asked to open; empty strings are 'not given'."""

    image: str = ""
    segmentation: str = ""
    skeletons: str = ""
    checkpoint: str = ""
    classifiers: str = ""
    embeddings: str = ""

    def label(self) -> str:
        """A short name for the recent list."""
        return self.segmentation or self.image or "(empty)"


# field name -> (label, picker: "dir", "file" or "any", file filter)
FIELDS: dict[str, tuple[str, str, str]] = {
    "image": ("Image", "dir", ""),
    "segmentation": ("Segmentation", "dir", ""),
    "skeletons": ("Skeletons", "any", "Skeleton tables (*.csv *.parquet *.swc);;All files (*)"),
    "checkpoint": ("Checkpoint", "any", "Encoders (*.keras *.index);;All files (*)"),
    "classifiers": ("Classifiers folder", "dir", ""),
    "embeddings": ("Embeddings", "any", "Embedding tables (*.parquet);;All files (*)"),
}
REQUIRED = ("image", "segmentation")
PLACEHOLDERS = {
    "skeletons": ": precomputed folder, folder of ID.swc, CSV/Parquet node table",
    "checkpoint": ": SegScope .keras encoder or SegCLR TensorFlow checkpoint (empty: keep the loaded one)",
    "classifiers": ": folder with classifiers.json (empty: keep the loaded ones)",
    "embeddings": ": SegCLR CSV ZIP store (folder or URL) or embed Parquet",
}


def _is_remote(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def _local(value: str) -> Path:
    return Path(value[len("file://") :] if value.startswith("file://") else value).expanduser()


def recent_path() -> Path:
    """Where the recent sources are kept (``user_cache_dir()/recent_sources.json``)."""
    from segscope.analysis.paths import user_cache_dir

    return user_cache_dir() / RECENT_FILE


def read_recent() -> list[OpenRequest]:
    """The persisted recent sources, newest first; an unreadable file gives an empty list."""
    path = recent_path()
    try:
        entries = json.loads(path.read_text())
        names = {f.name for f in fields(OpenRequest)}
        return [OpenRequest(**{k: str(v) for k, v in e.items() if k in names}) for e in entries][:MAX_RECENT]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("recent sources %s unreadable (%s): starting an empty list", path, exc)
        return []


def remember(request: OpenRequest) -> None:
    """Put ``request`` first in the recent list (written atomically)."""
    from segscope.analysis.export.atomic import atomic_file

    entries = [request] + [r for r in read_recent() if r != request]
    path = recent_path()
    try:
        with atomic_file(path, force=True) as tmp:
            Path(tmp).write_text(json.dumps([asdict(r) for r in entries[:MAX_RECENT]], indent=1))
    except OSError as exc:
        log.warning("recent sources not saved to %s: %s", path, exc)


def sources_from_folder(folder: Path) -> dict[str, str]:
    """Return the fields a dropped folder fills; empty when the folder is not data.

    A SegScope dataset (``dataset.json``) fills image, segmentation and skeletons; a
    precomputed or zarr volume fills segmentation or image by its type (precomputed
    ``info["type"]``; zarr: integer labels dtype means segmentation).
    """
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return {}
        found = {}
        for key in ("image", "segmentation", "skeletons"):
            if isinstance(meta.get(key), str) and (folder / meta[key]).exists():
                found[key] = str(folder / meta[key])
        return found
    info_path = folder / "info"
    if info_path.is_file():
        try:
            kind = json.loads(info_path.read_text()).get("type")
        except (OSError, ValueError, AttributeError):
            return {}
        return {"segmentation" if kind == "segmentation" else "image": str(folder)}
    for name in (".zarray", "zarr.json", ".zattrs"):
        if (folder / name).is_file():
            dtype = ""
            try:
                meta = json.loads((folder / name).read_text())
                dtype = str(meta.get("dtype") or meta.get("data_type") or "")
            except (OSError, ValueError, AttributeError):
                pass
            is_labels = any(t in dtype for t in ("uint64", "u8", "uint32", "u4"))
            return {"segmentation" if is_labels else "image": str(folder)}
    return {}


def dropped_folders(event) -> list[Path]:
    """The local folders a drag or drop event carries."""
    mime = event.mimeData()
    if mime is None or not mime.hasUrls():
        return []
    return [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile() and Path(u.toLocalFile()).is_dir()]


class OpenDialog(QDialog):
    """Asks for image, segmentation, skeletons, checkpoint, classifiers and embeddings."""

    def __init__(self, parent: QWidget | None = None, *, initial: OpenRequest | None = None):
        super().__init__(parent)
        self.setWindowTitle("Open data")
        self.setAcceptDrops(True)
        grid = QGridLayout(self)
        self.recent = read_recent()
        self.recent_combo = QComboBox()
        self.recent_combo.addItem("Recent sources…" if self.recent else "No recent sources")
        for request in self.recent:
            self.recent_combo.addItem(request.label())
        self.recent_combo.activated.connect(self._pick_recent)
        grid.addWidget(QLabel("Recent:"), 0, 0)
        grid.addWidget(self.recent_combo, 0, 1, 1, 2)
        self.edits: dict[str, QLineEdit] = {}
        self.errors: dict[str, QLabel] = {}
        row = 1
        for name, (label, picker, _filter) in FIELDS.items():
            edit = QLineEdit()
            edit.setMinimumWidth(420)
            edit.setPlaceholderText(
                "path, file://, gs:// or https:// (precomputed, zarr, n5)"
                if name in REQUIRED
                else "optional" + PLACEHOLDERS.get(name, "")
            )
            # "any": a file or a folder (Qt's pickers choose one kind), so one button for each.
            kinds = ("file", "dir") if picker == "any" else (picker,)
            browse = QWidget()
            browse_row = QHBoxLayout(browse)
            browse_row.setContentsMargins(0, 0, 0, 0)
            for kind in kinds:
                text = "Browse…" if len(kinds) == 1 else "Folder…" if kind == "dir" else "File…"
                button = QPushButton(text)
                button.setToolTip(f"Choose the {label.lower()} {'folder' if kind == 'dir' else 'file'}")
                button.clicked.connect(lambda _checked=False, n=name, k=kind: self._browse(n, k))
                browse_row.addWidget(button)
            error = QLabel("")
            error.setStyleSheet("color: #c62828")
            error.setVisible(False)
            grid.addWidget(QLabel(f"{label}:"), row, 0)
            grid.addWidget(edit, row, 1)
            grid.addWidget(browse, row, 2)
            grid.addWidget(error, row + 1, 1, 1, 2)
            self.edits[name] = edit
            self.errors[name] = error
            row += 2
        hint = QLabel("Drop a SegScope dataset, precomputed or zarr folder here to fill the fields.")
        hint.setStyleSheet("color: gray")
        grid.addWidget(hint, row, 0, 1, 3)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        grid.addWidget(self.buttons, row + 1, 0, 1, 3)
        if initial is not None:
            self.set_request(initial)

    # -- values -----------------------------------------------------------------------------

    def request(self) -> OpenRequest:
        return OpenRequest(**{name: edit.text().strip() for name, edit in self.edits.items()})

    def set_request(self, request: OpenRequest) -> None:
        for name, edit in self.edits.items():
            edit.setText(getattr(request, name))

    def values(self) -> tuple[str, str, str | None]:
        """Image, segmentation and skeletons (None when not given)."""
        r = self.request()
        return r.image, r.segmentation, r.skeletons or None

    def fill_from_folder(self, folder: Path) -> bool:
        """Fill fields from a dropped folder; False (and a message) when it is not data."""
        found = sources_from_folder(folder)
        if not found:
            self._set_error("segmentation", f"{folder.name}: not a SegScope dataset, precomputed or zarr folder")
            return False
        for name, value in found.items():
            self.edits[name].setText(value)
            self._set_error(name, "")
        return True

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> bool:
        """Show a message next to each bad field; True when all are acceptable."""
        ok = True
        for name, edit in self.edits.items():
            value = edit.text().strip()
            message = ""
            if not value:
                if name in REQUIRED:
                    message = "required"
            elif not _is_remote(value):
                path = _local(value)
                if name == "checkpoint":  # a SegCLR checkpoint prefix is no file: its own check
                    from segscope.analysis.artefacts import check_checkpoint

                    try:
                        check_checkpoint(str(path))
                    except (OSError, ValueError) as exc:
                        message = str(exc)
                elif not path.exists():
                    message = f"not found: {path}"
                elif name == "classifiers" and not path.is_dir():
                    message = "expected a folder"
                elif name == "embeddings" and not (path.is_dir() or path.suffix.lower() == ".parquet"):
                    message = "expected a CSV ZIP store folder or a .parquet file"
                elif name == "classifiers" and not (path / "classifiers.json").is_file():
                    message = "no classifiers.json in this folder"
            elif name in ("classifiers", "checkpoint"):
                message = "must be a local path"
            self._set_error(name, message)
            ok = ok and not message
        return ok

    def accept(self) -> None:
        if not self.validate():
            return
        remember(self.request())
        super().accept()

    def _set_error(self, name: str, message: str) -> None:
        self.errors[name].setText(message)
        self.errors[name].setVisible(bool(message))

    # -- interaction --------------------------------------------------------------------------

    def _pick_recent(self, index: int) -> None:
        if 1 <= index <= len(self.recent):
            self.set_request(self.recent[index - 1])

    def _browse(self, name: str, kind: str) -> None:
        """Pick a ``kind`` ("file" or "dir") for field ``name``."""
        label, _picker, file_filter = FIELDS[name]
        start = self.edits[name].text().strip()
        start = str(_local(start).parent) if start and not _is_remote(start) else ""
        if kind == "dir":
            chosen = QFileDialog.getExistingDirectory(self, label, start)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, label, start, file_filter)
        if chosen:
            self.edits[name].setText(os.fspath(chosen))
            self._set_error(name, "")

    def dragEnterEvent(self, event: QDragEnterEvent | None) -> None:
        if event is not None and dropped_folders(event):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent | None) -> None:
        if event is None:
            return
        for folder in dropped_folders(event):
            self.fill_from_folder(folder)
        event.setDropAction(Qt.DropAction.CopyAction)
        event.accept()
