"""SegScope's main window: Neuroglancer in the centre, the segment panel, the job bar.

Threads: the window lives on the Qt main thread and never waits on TensorFlow, disk or
neuroglancer. Neuroglancer's click callbacks arrive on its server thread and come here
through :class:`ClickRelay`'s signal (a queued connection, as the emitter is another
thread); job updates arrive through :class:`MainThreadInvoker`, the ``post`` function of
the :class:`~app.jobs.JobRunner`. Opening data runs on the job worker too.

Adding views
------------
Other panels (the embedding plot) plug in with :meth:`MainWindow.add_dock` and subscribe
to the session state, for example ``window.state.subscribe("node_batch", on_batch)``: each
:class:`app.state.NodeBatch` carries the segment id, node ids, positions (nm), embeddings
and predicted compartments of the nodes that just arrived, on the Qt main thread.
"""

from __future__ import annotations

import logging
from typing import Callable

from PyQt6.QtCore import QObject, Qt, QUrl, pyqtSignal
from PyQt6.QtGui import QAction, QKeySequence
from PyQt6.QtWebEngineWidgets import QWebEngineView
from PyQt6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from analysis.progress import Progress
from app.controller import AppController, DataSource, PrecomputedEmbeddings
from app.jobs import JobUpdate
from app.neuroglancer_bridge import ClickEvent, NeuroglancerBridge
from app.state import JobStatus, ModelSummary, SessionState
from app.views.segment_panel import SegmentPanel
from app.views.invoker import MainThreadInvoker

log = logging.getLogger(__name__)

OPEN_LANE = "open"


class ClickRelay(QObject):
    """Carries neuroglancer clicks (server thread) to the main thread as a signal."""

    clicked = pyqtSignal(object)  # ClickEvent

    def forward(self, event: ClickEvent) -> None:
        """Callback for :class:`NeuroglancerBridge`; safe on any thread."""
        self.clicked.emit(event)


class JobBar(QWidget):
    """Name, progress, rate and a cancel button for the current embedding job."""

    def __init__(self, state: SessionState, on_cancel: Callable[[], object], parent: QWidget | None = None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 6, 2)
        self.name_label = QLabel("No job")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m")
        self.rate_label = QLabel("")
        self.rate_label.setMinimumWidth(110)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Cancel the embedding job (Esc)")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(on_cancel)
        layout.addWidget(self.name_label, 2)
        layout.addWidget(self.progress, 3)
        layout.addWidget(self.rate_label)
        layout.addWidget(self.cancel_button)
        state.subscribe("job", self.show_job)

    def show_job(self, job: JobStatus | None) -> None:
        if job is None:
            self.name_label.setText("No job")
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.rate_label.setText("")
            self.cancel_button.setEnabled(False)
            return
        text = f"Embedding {job.name}: {job.state}"
        if job.message:
            text += f" ({job.message})"
        self.name_label.setText(text)
        self.progress.setRange(0, max(job.total, 1))
        self.progress.setValue(min(job.done, max(job.total, 1)))
        self.rate_label.setText("" if job.rate is None else f"{job.rate:.1f} {job.unit}/s")
        self.cancel_button.setEnabled(job.state in ("queued", "running"))


class ErrorBanner(QFrame):
    """A dismissible red banner above the viewer for errors the user should read."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("errorBanner")
        self.setStyleSheet("#errorBanner { background: #7a1f1f; } QLabel { color: white; }")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        dismiss = QPushButton("Dismiss")
        dismiss.clicked.connect(self.hide)
        layout.addWidget(self.label, 1)
        layout.addWidget(dismiss)
        self.hide()

    def show_error(self, message: str) -> None:
        self.label.setText(message)
        self.show()

    @property
    def message(self) -> str:
        return self.label.text() if self.isVisible() else ""


class OpenDialog(QDialog):
    """Asks for image, segmentation and (optional) skeleton sources."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Open data")
        form = QFormLayout(self)
        self.image_edit = QLineEdit()
        self.segmentation_edit = QLineEdit()
        self.skeletons_edit = QLineEdit()
        for edit in (self.image_edit, self.segmentation_edit, self.skeletons_edit):
            edit.setPlaceholderText("path, file://, gs:// or https:// (precomputed, zarr, n5)")
            edit.setMinimumWidth(420)
        self.skeletons_edit.setPlaceholderText("optional: a local precomputed skeleton folder")
        form.addRow("Image:", self.image_edit)
        form.addRow("Segmentation:", self.segmentation_edit)
        form.addRow("Skeletons:", self.skeletons_edit)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def values(self) -> tuple[str, str, str | None]:
        skeletons = self.skeletons_edit.text().strip()
        return self.image_edit.text().strip(), self.segmentation_edit.text().strip(), skeletons or None


class MainWindow(QMainWindow):
    """The SegScope window.

    Parameters
    ----------
    state, controller, bridge
        The session state, its controller, and the neuroglancer bridge (already attached
        to the state).
    invoker, relay
        The main-thread invoker the job runner posts through, and the click relay the
        bridge calls.
    """

    def __init__(self, state: SessionState, controller: AppController, bridge: NeuroglancerBridge,
                 invoker: MainThreadInvoker, relay: ClickRelay):
        super().__init__()
        self.state = state
        self.controller = controller
        self.bridge = bridge
        self.invoker = invoker
        self.relay = relay
        self._closed = False
        self.setWindowTitle("SegScope")
        self.resize(1400, 860)

        self.web_view = QWebEngineView()
        self.web_view.setUrl(QUrl(bridge.url))
        self.banner = ErrorBanner()
        self.job_bar = JobBar(state, self.cancel_job)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.banner)
        layout.addWidget(self.web_view, 1)
        layout.addWidget(self.job_bar)
        self.setCentralWidget(central)

        self.panel = SegmentPanel(state)
        self.segment_dock = self.add_dock("Segment", self.panel, object_name="segmentDock")

        self.model_label = QLabel("")
        self.classifier_label = QLabel("")
        self.statusBar().addPermanentWidget(self.classifier_label)
        self.statusBar().addPermanentWidget(self.model_label)
        self._build_menus()

        state.subscribe("status", self._show_status)
        state.subscribe("error", self._show_error)
        state.subscribe("model", self._show_model)
        state.subscribe("classifiers", self._show_classifiers)
        state.subscribe("dataset", lambda summary: self.setWindowTitle(f"SegScope: {summary.name}"))
        relay.clicked.connect(self._on_click)
        self._show_model(state.model)
        self._show_classifiers(state.classifiers)

    def add_dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea,
                 *, object_name: str | None = None) -> QDockWidget:
        """Add ``widget`` as a movable dock (for example the embedding plot) and return it.

        Docks added on the right stack under the segment panel; pass another ``area`` to
        place it elsewhere. The widget should take its data from :attr:`state`.
        """
        dock = QDockWidget(title, self)
        dock.setObjectName(object_name or f"{title.lower().replace(' ', '_')}Dock")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    # -- menus and shortcuts -------------------------------------------------------------------

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = QAction("&Open…", self)
        self.open_action.setShortcut(QKeySequence.StandardKey.Open)
        self.open_action.triggered.connect(self._open_dialog)
        self.export_action = QAction("&Export…", self)
        self.export_action.setShortcut(QKeySequence("Ctrl+E"))
        self.export_action.setEnabled(False)
        self.export_action.setToolTip("Export arrives with the export feature")
        self.quit_action = QAction("&Quit", self)
        self.quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        self.quit_action.triggered.connect(self.close)
        file_menu.addAction(self.open_action)
        file_menu.addAction(self.export_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)

        segment_menu = self.menuBar().addMenu("&Segment")
        self.cancel_action = QAction("&Cancel embedding", self)
        self.cancel_action.setShortcut(QKeySequence(Qt.Key.Key_Escape))
        self.cancel_action.triggered.connect(self.cancel_job)
        self.reembed_action = QAction("&Embed selected segment again", self)
        self.reembed_action.setShortcut(QKeySequence("Ctrl+R"))
        self.reembed_action.triggered.connect(self._reembed)
        segment_menu.addAction(self.cancel_action)
        segment_menu.addAction(self.reembed_action)

        help_menu = self.menuBar().addMenu("&Help")
        shortcuts = QAction("&Keyboard shortcuts", self)
        shortcuts.setShortcut(QKeySequence.StandardKey.HelpContents)
        shortcuts.triggered.connect(self._show_shortcuts)
        help_menu.addAction(shortcuts)
        # Shortcuts must work while the web view has focus, so they live on the window.
        for action in (self.open_action, self.export_action, self.quit_action, self.cancel_action,
                       self.reembed_action, shortcuts):
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            self.addAction(action)

    def _show_shortcuts(self) -> None:
        QMessageBox.information(self, "Keyboard shortcuts", (
            "Double-click a segment: select it and embed its nodes\n"
            "Esc: cancel the embedding job\n"
            "Ctrl+R: embed the selected segment again\n"
            "Ctrl+O: open data\n"
            "Ctrl+Q: quit\n"
            "Neuroglancer's own keys work in the view (press h there for its help)."))

    # -- state -> widgets ------------------------------------------------------------------------

    def _show_status(self, message: str) -> None:
        self.statusBar().showMessage(message)

    def _show_error(self, message: str) -> None:
        self.banner.show_error(message)
        self.statusBar().showMessage(message)

    def _show_model(self, model: ModelSummary | None) -> None:
        if model is None:
            self.model_label.setText(f"Model: none{'' if not self.state.model_message else ' (see status)'}")
        else:
            self.model_label.setText(f"Model: {model.name}" + ("" if model.trained else " (untrained)"))

    def _show_classifiers(self, summary) -> None:
        if summary is None:
            loading = self.state.classifiers_message.startswith("Loading")
            self.classifier_label.setText("Classifiers: loading…" if loading else "Classifiers: none")
            self.classifier_label.setToolTip(self.state.classifiers_message)
        else:
            tasks = [name for name, info in (("compartments", summary.compartment),
                                             ("cell types", summary.cell_type)) if info is not None]
            self.classifier_label.setText(f"Classifiers: {', '.join(tasks)}")
            self.classifier_label.setToolTip(summary.folder)

    # -- user actions ------------------------------------------------------------------------------

    def _on_click(self, event: ClickEvent) -> None:
        self.controller.handle_click(event.segment_id, event.position_nm)

    def cancel_job(self) -> None:
        if not self.controller.cancel():
            self.statusBar().showMessage("No embedding job to cancel.")

    def _reembed(self) -> None:
        segment = self.state.segment
        if segment is None:
            self.statusBar().showMessage("No segment selected.")
            return
        self.controller.select_segment(segment.segment_id, segment.click_nm)

    def _open_dialog(self) -> None:
        dialog = OpenDialog(self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        image, segmentation, skeletons = dialog.values()
        if not image or not segmentation:
            self.state.show_error("Open: both an image and a segmentation are needed.")
            return
        self.open_sources(image, segmentation, skeletons)

    def open_sources(self, image_url: str, segmentation_url: str, skeletons_url: str | None = None) -> None:
        """Open data on the worker thread; errors appear in the banner."""
        def make():
            yield Progress(0, 1, "steps", f"opening {segmentation_url}")
            return DataSource.open(image_url, segmentation_url, skeletons_url)

        self.state.show_status(f"Opening {segmentation_url}…")
        self.controller.runner.submit(f"opening {segmentation_url}", make, self._on_open_update, kind=OPEN_LANE)

    def _on_open_update(self, update: JobUpdate) -> None:
        if update.event == "finished":
            self.show_source(update.result)
        elif update.event == "failed":
            self.state.show_error(f"Could not open the data: {update.error}")

    def show_source(self, source: DataSource, *, precomputed: PrecomputedEmbeddings | None = None) -> None:
        """Show an opened data source in the viewer and make it the controller's
        (``precomputed``: a CSV ZIP store of its embeddings)."""
        try:
            self.bridge.show_source(source)
        except (ValueError, OSError) as exc:
            self.state.show_error(f"Neuroglancer cannot show {source.name}: {exc}")
            return
        self.banner.hide()
        self.controller.open_source(source, precomputed=precomputed)

    # -- shutdown ------------------------------------------------------------------------------------

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop jobs, the bridge and the web page (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.controller.shutdown()
        self.bridge.close()
        self.web_view.stop()
