"""SegScope's main window: Neuroglancer in the centre, the segment panel, the job bar.

Threads: the window lives on the Qt main thread and never waits on TensorFlow, disk or
neuroglancer. Neuroglancer's click callbacks arrive on its server thread and come here
through :class:`ClickRelay`'s signal (a queued connection, as the emitter is another
thread); job updates arrive through :class:`MainThreadInvoker`, the ``post`` function of
the :class:`~segscope.app.jobs.JobRunner`. Opening data runs on the job worker too.

Adding views
------------
Other panels (the embedding plot) plug in with :meth:`MainWindow.add_dock` and subscribe
to the session state, for example ``window.state.subscribe("node_batch", on_batch)``: each
:class:`segscope.app.state.NodeBatch` carries the segment id, node ids, positions (nm), embeddings
and predicted compartments of the nodes that just arrived, on the Qt main thread.
"""

from __future__ import annotations

import logging
from typing import Callable

from pathlib import Path

from PyQt6.QtCore import QObject, Qt, QTimer, QUrl, pyqtSignal
from PyQt6.QtGui import QAction, QKeySequence
from PyQt6.QtWebEngineWidgets import QWebEngineView
from PyQt6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from segscope.analysis.progress import Progress
from segscope.app.controller import AppController, DataSource, PrecomputedEmbeddings
from segscope.app.jobs import JobRunner, JobUpdate
from segscope.app.labels import LabelStore
from segscope.app.session_file import JSON_SUFFIX
from segscope.app.neuroglancer_bridge import ClickEvent, NeuroglancerBridge
from segscope.app.state import JobStatus, ModelSummary, SessionState
from segscope.app.views.segment_panel import SegmentPanel
from segscope.app.views.invoker import MainThreadInvoker

log = logging.getLogger(__name__)

OPEN_LANE = "open"
#: Session I/O runs on its own worker so an export or autosave never delays embedding.
EXPORT_LANE = "export"
SESSION_LANE = "session"
AUTOSAVE_LANE = "autosave"
AUTOSAVE_INTERVAL_MS = 60_000


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

    def __init__(
        self,
        state: SessionState,
        controller: AppController,
        bridge: NeuroglancerBridge,
        invoker: MainThreadInvoker,
        relay: ClickRelay,
    ):
        super().__init__()
        self.state = state
        self.controller = controller
        self.bridge = bridge
        self.invoker = invoker
        self.relay = relay
        self._closed = False
        #: Manual labels of this session (undo/redo in the Edit menu).
        self.labels = LabelStore()
        self.plot_dock = None  # the embedding plot (attach_plot)
        #: Whether the plot's projection backend (its UMAP process) ends with this window.
        self.owns_projection_backend = False
        self.export_dialog = None
        self.last_export = None  # segscope.analysis.export.ExportResult of the last finished export
        self.session_path: Path | None = None
        self.autosave = None  # segscope.app.session_file.AutosaveManager (start_autosave)
        self.io_runner = JobRunner(post=invoker.post, name="segscope-session-io")
        self._autosave_timer = QTimer(self)
        self._autosave_timer.timeout.connect(self.autosave_now)
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
        # Scrollable, so the embedding plot below it can take most of the column's height.
        panel_scroll = QScrollArea()
        panel_scroll.setWidgetResizable(True)
        panel_scroll.setWidget(self.panel)
        self.segment_dock = self.add_dock("Segment", panel_scroll, object_name="segmentDock")

        self.model_label = QLabel("")
        self.classifier_label = QLabel("")
        self.statusBar().addPermanentWidget(self.classifier_label)
        self.statusBar().addPermanentWidget(self.model_label)
        self._build_menus()

        state.subscribe("status", self._show_status)
        state.subscribe("error", self._show_error)
        state.subscribe("model", self._show_model)
        state.subscribe("classifiers", self._show_classifiers)
        state.subscribe("dataset", self._on_dataset)
        self.labels.subscribe(lambda change: self._update_undo_actions())
        relay.clicked.connect(self._on_click)
        self._show_model(state.model)
        self._show_classifiers(state.classifiers)

    def add_dock(
        self,
        title: str,
        widget: QWidget,
        area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea,
        *,
        object_name: str | None = None,
    ) -> QDockWidget:
        """Add ``widget`` as a movable dock (for example the embedding plot) and return it.

        Docks added on the right stack under the segment panel; pass another ``area`` to
        place it elsewhere. The widget should take its data from :attr:`state`.
        """
        dock = QDockWidget(title, self)
        dock.setObjectName(object_name or f"{title.lower().replace(' ', '_')}Dock")
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.addDockWidget(area, dock)
        return dock

    def attach_plot(self, *, background=None, **plot_kwargs):
        """Add the embedding plot dock, linked to the 3-D view, labels and session
        (see :func:`segscope.app.views.embedding_plot.attach_embedding_plot`); returns the dock."""
        from segscope.app.views.embedding_plot import attach_embedding_plot

        self.plot_dock = attach_embedding_plot(self, background=background, **plot_kwargs)
        self.resizeDocks(
            [self.segment_dock, self.plot_dock],
            [self.height() * 2 // 5, self.height() * 3 // 5],
            Qt.Orientation.Vertical,
        )
        self.resizeDocks([self.segment_dock], [560], Qt.Orientation.Horizontal)
        return self.plot_dock

    def _on_dataset(self, summary) -> None:
        self.setWindowTitle(f"SegScope: {summary.name}")
        # Segment ids mean nothing in other data: labels and plotted points of the old
        # data go (not undoable).
        self.labels.reset()
        if self.plot_dock is not None:
            self.plot_dock.controller.clear()
        self._update_undo_actions()

    # -- menus and shortcuts -------------------------------------------------------------------

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = QAction("&Open…", self)
        self.open_action.setShortcut(QKeySequence.StandardKey.Open)
        self.open_action.triggered.connect(self._open_dialog)
        self.open_session_action = QAction("Open &session…", self)
        self.open_session_action.setShortcut(QKeySequence("Ctrl+Shift+O"))
        self.open_session_action.triggered.connect(self._open_session_dialog)
        self.save_session_action = QAction("&Save session", self)
        self.save_session_action.setShortcut(QKeySequence.StandardKey.Save)
        self.save_session_action.triggered.connect(lambda: self.save_session(self.session_path))
        self.save_session_as_action = QAction("Save session &as…", self)
        self.save_session_as_action.setShortcut(QKeySequence("Ctrl+Shift+S"))
        self.save_session_as_action.triggered.connect(lambda: self.save_session(None))
        self.export_action = QAction("&Export…", self)
        self.export_action.setShortcut(QKeySequence("Ctrl+E"))
        self.export_action.triggered.connect(self.show_export_dialog)
        self.quit_action = QAction("&Quit", self)
        self.quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        self.quit_action.triggered.connect(self.close)
        for action in (
            self.open_action,
            self.open_session_action,
            self.save_session_action,
            self.save_session_as_action,
            self.export_action,
        ):
            file_menu.addAction(action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)

        edit_menu = self.menuBar().addMenu("&Edit")
        self.undo_action = QAction("&Undo", self)
        self.undo_action.setShortcut(QKeySequence.StandardKey.Undo)
        self.undo_action.triggered.connect(self.undo_label)
        self.redo_action = QAction("&Redo", self)
        self.redo_action.setShortcuts([QKeySequence.StandardKey.Redo, QKeySequence("Ctrl+Shift+Z")])
        self.redo_action.triggered.connect(self.redo_label)
        edit_menu.addAction(self.undo_action)
        edit_menu.addAction(self.redo_action)
        self._update_undo_actions()

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
        for action in (
            self.open_action,
            self.open_session_action,
            self.save_session_action,
            self.save_session_as_action,
            self.export_action,
            self.quit_action,
            self.undo_action,
            self.redo_action,
            self.cancel_action,
            self.reembed_action,
            shortcuts,
        ):
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            self.addAction(action)

    def _show_shortcuts(self) -> None:
        QMessageBox.information(
            self,
            "Keyboard shortcuts",
            (
                "Double-click a segment: select it and embed its nodes\n"
                "Esc: cancel the embedding job\n"
                "Ctrl+R: embed the selected segment again\n"
                "Rect / Lasso in the plot: select nodes and their segments (shown in 3-D)\n"
                "Delete in the plot: hide the selected segments' points (Hide menu: show them again)\n"
                "Ctrl+Z / Ctrl+Shift+Z: undo / redo a manual label\n"
                "Ctrl+S: save the session; Ctrl+Shift+O: open one\n"
                "Ctrl+E: export the session\n"
                "Ctrl+O: open data\n"
                "Ctrl+Q: quit\n"
                "Neuroglancer's own keys work in the view (press h there for its help)."
            ),
        )

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
            tasks = [
                name
                for name, info in (("compartments", summary.compartment), ("cell types", summary.cell_type))
                if info is not None
            ]
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

    def open_sources(
        self,
        image_url: str,
        segmentation_url: str,
        skeletons_url: str | None = None,
        *,
        name: str | None = None,
        precomputed=None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Open data on the worker thread and show it; errors appear in the banner.

        ``precomputed`` describes an embedding store to open with it (an
        :class:`segscope.app.session_file.PrecomputedRef`); ``then`` runs once the data is shown.
        """

        def make():
            yield Progress(0, 1, "steps", f"opening {segmentation_url}")
            source = DataSource.open(image_url, segmentation_url, skeletons_url, name=name)
            store = (
                None
                if precomputed is None
                else PrecomputedEmbeddings.open(
                    precomputed.location,
                    coordinates=precomputed.coordinates,
                    num_shards=precomputed.num_shards,
                    bytewidth=precomputed.bytewidth,
                )
            )
            return source, store

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                source, store = update.result
                self.show_source(source, precomputed=store)
                if then is not None and self.controller.source is source:
                    then()
            elif update.event == "failed":
                self.state.show_error(f"Could not open the data: {update.error}")

        self.state.show_status(f"Opening {segmentation_url}…")
        self.controller.runner.submit(f"opening {segmentation_url}", make, on_update, kind=OPEN_LANE)

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

    # -- manual labels -------------------------------------------------------------------------------

    def _update_undo_actions(self) -> None:
        labels = self.labels
        self.undo_action.setEnabled(labels.can_undo)
        self.undo_action.setText(f"&Undo {labels.undo_text}" if labels.can_undo else "&Undo")
        self.redo_action.setEnabled(labels.can_redo)
        self.redo_action.setText(f"&Redo {labels.redo_text}" if labels.can_redo else "&Redo")

    def undo_label(self) -> bool:
        text = self.labels.undo_text
        done = self.labels.undo()
        self.statusBar().showMessage(f"Undone: {text}" if done else "Nothing to undo.", 5000)
        return done

    def redo_label(self) -> bool:
        text = self.labels.redo_text
        done = self.labels.redo()
        self.statusBar().showMessage(f"Redone: {text}" if done else "Nothing to redo.", 5000)
        return done

    # -- export ---------------------------------------------------------------------------------------

    def show_export_dialog(self):
        """Open the Export dialog (non-modal); its Export button starts :meth:`start_export`."""
        from segscope.app.session_controller import session_records
        from segscope.app.views.export_dialog import ExportDialog

        records = session_records(self.state)
        if not records:
            self.state.show_error("Nothing to export yet: double-click a segment to embed it first.")
            return None
        nodes = sum(record.n_embedded for record in records)
        summary = (
            f"{len(records)} segments, {nodes} embedded nodes; manual labels on "
            f"{self.labels.n_labelled_nodes} nodes and {self.labels.n_labelled_segments} segments."
        )
        base = self.session_path.parent if self.session_path is not None else Path.home()
        name = f"segscope-export-{self.state.dataset.name if self.state.dataset else 'session'}"
        dialog = ExportDialog(base / name, summary, self)
        dialog.accepted.connect(lambda: self.start_export(dialog.request()))
        self.export_dialog = dialog
        dialog.open()
        return dialog

    def start_export(self, request) -> None:
        """Write the export bundle ``request`` (:class:`~segscope.app.views.export_dialog.ExportRequest`)
        on the session worker; on success optionally add its annotation layer to the viewer."""
        from segscope.app.session_export import export_session, skeleton_edges

        from types import SimpleNamespace

        records = self._records_snapshot()
        snapshot = SimpleNamespace(
            records=records,
            dataset=self.state.dataset,
            model=self.state.model,
            classifiers=self.state.classifiers,
            segment=None,
        )
        labels = LabelStore.from_dict(self.labels.to_dict())
        source = self.controller.source

        def make():
            skeletons = skeleton_edges(source, records) if "swc" in request.parts else None
            return (
                yield from export_session(
                    request.folder,
                    snapshot,
                    labels,
                    parts=request.parts,
                    table_formats=request.table_formats,
                    skeletons=skeletons,
                    force=request.force,
                )
            )

        def on_update(update: JobUpdate) -> None:
            if update.event == "progress" and update.progress is not None:
                self.statusBar().showMessage(f"Exporting: {update.progress.message}")
            elif update.event == "finished":
                message = f"Exported to {request.folder}"
                if request.add_layer:
                    try:
                        self.bridge.add_exported_layer(request.folder)
                        message += " (its annotation layer is in the viewer)"
                    except (OSError, ValueError) as exc:
                        message += f"; the layer could not be added: {exc}"
                self.last_export = update.result
                self.state.show_status(message + ".")
            elif update.event == "failed":
                self.state.show_error(f"Export to {request.folder} failed: {update.error}")

        self.state.show_status(f"Exporting to {request.folder}…")
        self.io_runner.submit(f"exporting to {request.folder}", make, on_update, kind=EXPORT_LANE, supersede=False)

    def _records_snapshot(self) -> dict:
        """Copies of the session's analysed records (segment id -> record), which a worker
        can read while the session goes on changing on this thread (numpy copies: ms)."""
        import copy

        from segscope.app.session_controller import session_records

        return {record.segment_id: copy.deepcopy(record) for record in session_records(self.state)}

    # -- sessions -------------------------------------------------------------------------------------

    def session_document(self):
        """The live session as an :class:`segscope.app.session_file.SessionDocument`."""
        from segscope.app.session_controller import build_document

        plot_settings, segments, nodes = {}, (), ()
        if self.plot_dock is not None:
            plot = self.plot_dock.plot
            plot_settings = plot.settings()
            controller = plot.controller
            rows = controller.selected_rows
            segments = controller.selected_segments
            nodes = zip(controller.segment_ids[rows].tolist(), controller.node_ids[rows].tolist())
        return build_document(
            self.state,
            self.controller,
            self.labels,
            plot_settings=plot_settings,
            selected_segments=segments,
            selected_nodes=nodes,
        )

    def save_session(self, path: str | Path | None = None) -> bool:
        """Save the session to ``path`` (None: ask for one) on the session worker."""
        from segscope.app.session_file import save_session

        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save session", str(Path.home() / f"session{JSON_SUFFIX}"), f"SegScope sessions (*{JSON_SUFFIX})"
            )
            if not chosen:
                return False
            path = chosen
        try:
            document = self.session_document()
        except ValueError as exc:
            self.state.show_error(f"Cannot save the session: {exc}")
            return False
        records = list(self._records_snapshot().values())
        target = Path(path)

        def make():
            yield Progress(0, 1, "files", f"saving {target.name}")
            return save_session(target, document, records)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                self.session_path = Path(update.result)
                self.state.show_status(f"Session saved to {update.result}.")
            elif update.event == "failed":
                self.state.show_error(f"Could not save the session to {target}: {update.error}")

        self.io_runner.submit(f"saving {target}", make, on_update, kind=SESSION_LANE, supersede=False)
        return True

    def _open_session_dialog(self) -> None:
        chosen, _ = QFileDialog.getOpenFileName(
            self, "Open session", str(Path.home()), f"SegScope sessions (*{JSON_SUFFIX});;All files (*)"
        )
        if chosen:
            self.open_session(chosen)

    def open_session(self, path: str | Path) -> None:
        """Load a saved session on the session worker and restore it (errors in the banner)."""
        from segscope.app.session_file import load_session

        target = Path(path)

        def make():
            yield Progress(0, 1, "files", f"reading {target.name}")
            return load_session(target)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                document, records = update.result
                self.session_path = target
                self.restore_session(document, records)
            elif update.event == "failed":
                self.state.show_error(f"Could not open the session {target}: {update.error}")

        self.state.show_status(f"Opening session {target}…")
        self.io_runner.submit(f"opening {target}", make, on_update, kind=SESSION_LANE, supersede=False)

    def restore_session(self, document, records) -> None:
        """Show a loaded session: its data (opened first when it differs from what is
        open), model, classifiers, segments with their embeddings and predictions, labels,
        selections and plot settings."""
        from segscope.app.session_controller import same_data

        if same_data(document, self.controller):
            self._restore_loaded(document, records)
            return
        dataset = document.dataset
        self.open_sources(
            dataset.image_url,
            dataset.segmentation_url,
            dataset.skeletons_url,
            name=dataset.name,
            precomputed=document.precomputed,
            then=lambda: self._restore_loaded(document, records),
        )

    def _restore_loaded(self, document, records) -> None:
        from segscope.app.controller import read_classifier_folder
        from segscope.app.session_controller import replay_into_plot, restore_records

        controller = self.controller
        if document.model_path and str(controller.model_path) != document.model_path:
            if Path(document.model_path).exists():
                controller.load_model(Path(document.model_path))
            else:
                self.state.show_error(f"The session's model {document.model_path} is missing; keeping the current one.")
        current = self.state.classifiers.folder if self.state.classifiers is not None else None
        if document.classifiers_folder and document.classifiers_folder != current:
            try:
                controller.load_classifiers(read_classifier_folder(document.classifiers_folder))
            except (OSError, ValueError) as exc:
                self.state.show_error(f"The session's classifiers cannot be read: {exc}")
        restored = restore_records(self.state, records)
        try:
            self.labels.load_dict(document.labels)
        except ValueError as exc:
            self.state.show_error(f"The session's labels are unreadable ({exc}); restored without them.")
        by_id = {record.segment_id: record for record in restored}
        if document.current_segment in by_id:
            self.state.show_record(by_id[document.current_segment])
        if self.plot_dock is not None:
            plot = self.plot_dock.plot
            replay_into_plot(plot.controller, restored)
            plot.apply_settings(document.plot)
            nodes = document.selected_nodes
            if nodes:
                pairs = list(zip(*nodes))
                rows = plot.controller.rows_of(pairs[0], pairs[1])
                plot.controller.select_rows(rows[rows >= 0], origin="session")
            elif document.selected_segments:
                plot.controller.select_segments(document.selected_segments, origin="session")
        if document.selected_segments:
            self.bridge.highlight_segments(document.selected_segments)
        self.state.show_status(
            f"Restored the session: {len(restored)} segments, "
            f"{self.labels.n_labelled_nodes} labelled nodes, "
            f"{self.labels.n_labelled_segments} labelled segments."
        )

    # -- autosave and recovery -------------------------------------------------------------------

    def start_autosave(self, manager, interval_ms: int = AUTOSAVE_INTERVAL_MS) -> None:
        """Autosave every ``interval_ms`` with ``manager`` (an
        :class:`segscope.app.session_file.AutosaveManager`, already started)."""
        self.autosave = manager
        self._autosave_timer.start(interval_ms)

    def autosave_now(self) -> bool:
        """Write an autosave now (on the session worker); False when there is nothing to save."""
        if self.autosave is None or self.controller.source is None:
            return False
        try:
            document = self.session_document()
        except ValueError:
            return False
        records = list(self._records_snapshot().values())
        manager = self.autosave

        def make():
            yield Progress(0, 1, "files", "autosaving")
            return manager.autosave(document, records)

        def on_update(update: JobUpdate) -> None:
            if update.event == "failed":
                log.warning("autosave failed: %s", update.error)
                self.statusBar().showMessage(f"Autosave failed: {update.error}", 8000)

        self.io_runner.submit("autosave", make, on_update, kind=AUTOSAVE_LANE)
        return True

    def offer_recovery(self, ask: Callable | None = None) -> bool:
        """After a crash, offer the last autosave; True if a session is being restored.

        ``ask(candidate) -> "restore" | "discard" | "later"`` (default: a message box).
        """
        if self.autosave is None:
            return False
        manager = self.autosave
        # The newest autosave no other SegScope is offering or restoring right now.
        candidate = next((c for c in manager.recoverable() if manager.claim(c)), None)
        if candidate is None:
            return False
        choice = (ask or self._ask_recovery)(candidate)
        if choice == "discard":
            manager.discard(candidate)
            manager.release(candidate)
            return False
        if choice != "restore":
            manager.release(candidate)
            return False

        def make():
            yield Progress(0, 1, "files", "reading the autosave")
            return manager.adopt(candidate)

        def on_update(update: JobUpdate) -> None:
            if update.terminal:
                manager.release(candidate)
            if update.event == "finished":
                document, records = update.result
                self.restore_session(document, records)
            elif update.event == "failed":
                self.state.show_error(f"Could not restore the autosave {candidate.path}: {update.error}")

        self.io_runner.submit("restoring the autosave", make, on_update, kind=SESSION_LANE, supersede=False)
        return True

    def _ask_recovery(self, candidate) -> str:
        box = QMessageBox(self)
        box.setWindowTitle("Restore the last session?")
        box.setText(f"SegScope did not close cleanly. An autosave from {candidate.saved_at} is available.")
        box.setInformativeText("Restore it, discard it, or decide at the next launch.")
        restore = box.addButton("Restore", QMessageBox.ButtonRole.AcceptRole)
        discard = box.addButton("Discard", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton("Later", QMessageBox.ButtonRole.RejectRole)
        box.exec()
        clicked = box.clickedButton()
        return "restore" if clicked is restore else "discard" if clicked is discard else "later"

    # -- shutdown ------------------------------------------------------------------------------------

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop jobs, the bridge and the web page (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._autosave_timer.stop()
        if self.plot_dock is not None:
            self.plot_dock.shutdown()
            if self.owns_projection_backend:
                self.plot_dock.plot.scheduler.backend.close()  # stops its UMAP process
        self.controller.shutdown()
        self.io_runner.shutdown(wait=True, timeout=30.0)  # a save in flight completes
        if self.autosave is not None:
            self.autosave.finish()  # a clean exit: nothing to recover next time
        self.bridge.close()
        self.web_view.stop()

    def dispose(self) -> None:
        """:meth:`shutdown`, then destroy the window now, while the QApplication exists.

        Qt WebEngine's pages must go before the application and its default profile. Left
        to the interpreter's exit, the order is arbitrary: the screenshot script crashed
        with a segfault after its work was done in 2 of 8 runs. Do not use the window
        afterwards.
        """
        from PyQt6 import sip

        self.shutdown()
        if not sip.isdeleted(self):
            sip.delete(self)
