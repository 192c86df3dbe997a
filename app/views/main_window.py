"""SegScope's main window: Neuroglancer in the centre, the segment panel, the job bar.

Layout and menus only. The window shows a :class:`~segscope.app.session.Session` (it and
its panels subscribe to the model) and asks a :class:`~segscope.app.service.SessionService`
for everything that changes it (open, embed, save, restore, autosave, export). The Qt-free
parts are linked to each other in :mod:`segscope.app.wiring`.

Threads: the window lives on the Qt main thread and never waits on TensorFlow, disk or
neuroglancer. Neuroglancer's clicks (its server thread) and job updates (the workers) both
arrive through :class:`MainThreadInvoker`, the service's ``post`` (a queued signal).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PyQt6.QtCore import Qt, QTimer, QUrl
from PyQt6.QtGui import QAction, QImage, QKeySequence
from PyQt6.QtWebEngineCore import QWebEnginePage
from PyQt6.QtWebEngineWidgets import QWebEngineView
from PyQt6.QtWidgets import (
    QDialog,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from segscope.app.events import connect
from segscope.app.labels import LabelStore
from segscope.app.neuroglancer_bridge import ClickEvent, NeuroglancerBridge
from segscope.app.service import SessionService
from segscope.app.session import Session
from segscope.app.session_file import JSON_SUFFIX
from segscope.app.state import JobStatus, ModelSummary, SessionState
from segscope.app.views.invoker import MainThreadInvoker
from segscope.app.views.open_dialog import (
    OpenDialog,
    OpenRequest,
    dropped_folders,
    remember,
    sources_from_folder,
)
from segscope.app.views.segment_panel import SegmentPanel

log = logging.getLogger(__name__)

AUTOSAVE_INTERVAL_MS = 60_000

#: Said under the plot while numba compiles UMAP's kernels for the first time (cold cache).
UMAP_COMPILE_NOTE = "UMAP: one-off compile, about 2 min, cached afterwards"
#: After this long the note gives up (a warm-up that failed only logs a warning).
UMAP_COMPILE_NOTE_MAX_S = 900.0

#: How long after the page loaded the WebGL probe runs (neuroglancer reports a failed
#: context in its page by then).
WEBGL_PROBE_DELAY_MS = 2_000

#: Console messages and page text by which Chromium or neuroglancer say WebGL did not start.
WEBGL_FAILURE = re.compile(
    r"WebGL\S* (?:is )?not supported|WebGL\S* (?:is )?(?:unavailable|not available|disabled)"
    r"|(?:error|failed|could not|unable to) (?:creating|to create|create) (?:a )?WebGL",
    re.IGNORECASE,
)

#: Run in the page: can a canvas get a WebGL 2 context (neuroglancer needs WebGL 2), a
#: WebGL 1 one, and does the page say WebGL failed?
WEBGL_PROBE_JS = """(function () {
  function can(kind) {
    try { return !!document.createElement('canvas').getContext(kind); } catch (e) { return false; }
  }
  var text = document.body ? (document.body.innerText || '') : '';
  var line = text.split('\\n').find(function (l) { return /webgl/i.test(l); }) || '';
  return {webgl2: can('webgl2'), webgl: can('webgl'), message: line.slice(0, 300)};
})()"""


def webgl_problem(probe) -> str | None:
    """Why WebGL is missing, from :data:`WEBGL_PROBE_JS`'s result; None when it is there.

    A result that is not the probe's (the page was gone, JavaScript failed) says nothing.
    """
    if not isinstance(probe, dict):
        return None
    message = str(probe.get("message") or "").strip()
    if message and WEBGL_FAILURE.search(message):
        return message
    if probe.get("webgl2") is False:
        webgl1 = "available" if probe.get("webgl") else "not available either"
        return f"the page cannot create a WebGL 2 context, which neuroglancer needs; WebGL 1 is {webgl1}"
    return None


#: The view is checked for a black frame this often after the page loaded, and the
#: problem is reported when it is still black after this many checks (20 s): a healthy
#: neuroglancer page draws its (DOM) top bar at once, while a failing compositor (the GBM
#: path under Xvfb or in a VM) leaves every pixel black, the page's DOM included.
BLACK_VIEW_CHECK_MS = 2_000
BLACK_VIEW_CHECKS = 10


def view_is_black(image: QImage) -> bool:
    """True when every pixel of ``image`` is (near) black; an empty image is not."""
    if image.isNull() or image.width() == 0 or image.height() == 0:
        return False
    rgb = image.convertToFormat(QImage.Format.Format_RGB888)
    bits = rgb.constBits()
    if bits is None:
        return False
    bits.setsize(rgb.sizeInBytes())
    rows = np.frombuffer(bits, np.uint8).reshape(rgb.height(), rgb.bytesPerLine())[:, : rgb.width() * 3]
    return int(rows.max()) < 8


def webgl_help(detail: str) -> str:
    """The banner text for a 3-D view that cannot draw: what happened and how to fix it."""
    return (
        f"The 3-D view cannot draw: {detail}. "
        "Under Xvfb, in a VM or over remote X, start SegScope with QTWEBENGINE_FORCE_USE_GBM=0 "
        "(the default unless you set it), install Mesa's OpenGL (libgl1-mesa-dri libegl-mesa0 libgbm1), "
        "and keep --ignore-gpu-blocklist in QTWEBENGINE_CHROMIUM_FLAGS if you set your own flags. "
        "README: Known constraints."
    )


#: Reloads of the 3-D view after its render process died, before the window stops trying.
MAX_RENDER_RESTARTS = 3


class NeuroglancerPage(QWebEnginePage):
    """The web page of the 3-D view: its console goes to debug logging, WebGL failures to a callback.

    Neuroglancer's page logs dozens of harmless WebGL performance warnings ("READ-usage
    buffer") per launch; they are logged at debug level (``-vv`` shows them) instead of
    on the terminal. A console message saying WebGL did not start calls
    ``on_webgl_problem(message)``.
    """

    def __init__(self, parent=None, on_webgl_problem: Callable[[str], None] | None = None):
        super().__init__(parent)
        self.on_webgl_problem = on_webgl_problem

    def javaScriptConsoleMessage(self, level, message, line, source) -> None:
        log.debug("neuroglancer console (%s) %s:%s: %s", getattr(level, "name", level), source, line, message)
        if self.on_webgl_problem is not None and WEBGL_FAILURE.search(message or ""):
            self.on_webgl_problem(f"WebGL did not start in Qt WebEngine ({message})")


class JobBar(QWidget):
    """Name, progress, rate and a cancel button for the current embedding job."""

    def __init__(self, state: SessionState, on_cancel: Callable[[], object], parent: QWidget | None = None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 6, 2)
        self.name_label = QLabel("No job")
        self.progress = QProgressBar()
        self._idle_progress()
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

    def _idle_progress(self) -> None:
        """An empty bar with no text: "No job" beside a "0 / 1" read as a job of one step."""
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("")

    def show_job(self, job: JobStatus | None) -> None:
        if job is None:
            self.name_label.setText("No job")
            self._idle_progress()
            self.rate_label.setText("")
            self.cancel_button.setEnabled(False)
            return
        text = f"{job.name}: {job.state}"
        if job.message:
            text += f" ({job.message})"
        self.name_label.setText(text)
        self.progress.setFormat("%v / %m")
        self.progress.setRange(0, max(job.total, 1))
        self.progress.setValue(min(job.done, max(job.total, 1)))
        self.rate_label.setText("" if job.rate is None else f"{job.rate:.1f} {job.unit}/s")
        self.cancel_button.setEnabled(job.state in ("queued", "running"))

    def show_task(self, text: str, done: int = 0, total: int = 0) -> None:
        """Show a job that is not an embedding (preparing the demo data): text and progress.

        ``total`` 0 shows a busy bar. :meth:`show_job` (None: "No job") replaces it.
        """
        self.name_label.setText(text)
        if total > 0:
            self.progress.setFormat("%v / %m")
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        else:
            self.progress.setFormat("")
            self.progress.setRange(0, 0)  # busy
        self.rate_label.setText("")
        self.cancel_button.setEnabled(False)


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


class MainWindow(QMainWindow):
    """The SegScope window.

    Parameters
    ----------
    session, service
        The session model it shows and the service it asks for changes.
    bridge
        The neuroglancer bridge (already attached to the session state).
    invoker
        The main-thread invoker the service posts through.
    """

    def __init__(
        self,
        session: Session,
        service: SessionService,
        bridge: NeuroglancerBridge,
        invoker: MainThreadInvoker,
    ):
        super().__init__()
        self.session = session
        self.service = service
        self.bridge = bridge
        self.invoker = invoker
        self._closed = False
        self.plot_dock = None  # the embedding plot (attach_plot)
        self.similar_dock = None  # Find similar's ranked list (attach_plot)
        #: Whether the plot's projection backend (its UMAP process) ends with this window.
        self.owns_projection_backend = False
        self.export_dialog = None
        #: Job runners started for the window (the demo generation); shut down with it.
        self.extra_runners: list = []
        self._compile_timer: QTimer | None = None
        self._autosave_timer = QTimer(self)
        self._autosave_timer.timeout.connect(self.autosave_now)
        self.setWindowTitle("SegScope")
        self.resize(1400, 860)

        #: Why the 3-D view cannot draw (WebGL did not start), once detected; else None.
        self.webgl_problem: str | None = None
        self.web_view = QWebEngineView()
        self.page = NeuroglancerPage(self.web_view, on_webgl_problem=self.report_webgl_problem)
        self.web_view.setPage(self.page)
        self.web_view.loadFinished.connect(self._on_page_loaded)
        self.web_view.setUrl(QUrl(bridge.url))
        # Folders dropped on the view go to the window (Open), not to a page navigation.
        self.web_view.setAcceptDrops(False)
        self.setAcceptDrops(True)
        #: How many times the view's render process died and the view reloaded itself.
        self.render_restarts = 0
        self.page.renderProcessTerminated.connect(self._on_render_process_terminated)
        self.banner = ErrorBanner()
        state = session.state
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
        # Clicks arrive on neuroglancer's server thread: handled on this one.
        connect(bridge.events.clicked, lambda event: invoker.post(lambda: self._on_click(event)))
        # Emitted on the mesher thread: show it from the Qt thread.
        connect(bridge.events.mesh_status, lambda status: invoker.post(lambda: self._show_mesh_status(status)))
        self._show_model(state.model)
        self._show_classifiers(state.classifiers)

    @property
    def state(self) -> SessionState:
        """The session's state (``session.state``)."""
        return self.session.state

    @property
    def labels(self) -> LabelStore:
        """The session's manual labels (``session.labels``)."""
        return self.session.labels

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
        """Add the embedding plot dock on the session's plot model, linked to the 3-D view and labels.

        The links are :func:`segscope.app.wiring.link_plot_dock`'s. Returns the dock.

        ``background`` is an :class:`segscope.analysis.projection.EmbeddingTable` or a path to
        a ``segscope embed`` Parquet, plotted as context from the start (an unreadable one
        raises OSError, ValueError or KeyError before the dock is added). ``plot_kwargs`` go
        to :class:`~segscope.app.views.embedding_plot.EmbeddingPlotDock` (``start_warm_up``,
        ``scheduler_options``...).
        """
        from segscope.app.views.embedding_plot import EmbeddingPlotDock
        from segscope.app.wiring import link_plot_dock

        if background is not None and not hasattr(background, "embeddings"):
            from segscope.analysis.projection import read_embedding_table

            background = read_embedding_table(background)
        self.plot_dock = EmbeddingPlotDock(self, controller=self.session.plot, **plot_kwargs)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.plot_dock)
        link_plot_dock(
            self.session,
            self.plot_dock,
            viewer=self.bridge,
            post=self.invoker.post,
            report=lambda message: self.statusBar().showMessage(message, 8000),
        )
        if background is not None:
            self.plot_dock.plot.add_background(background)
        if plot_kwargs.get("start_warm_up", True) and plot_kwargs.get("scheduler_options", {}).get("warm_up", True):
            from segscope.analysis.projection import numba_cache_is_warm

            if not numba_cache_is_warm():
                self.watch_umap_compile()
        self.resizeDocks(
            [self.segment_dock, self.plot_dock],
            [self.height() * 2 // 5, self.height() * 3 // 5],
            Qt.Orientation.Vertical,
        )
        self.resizeDocks([self.segment_dock], [560], Qt.Orientation.Horizontal)
        from segscope.app.views.similar_panel import add_find_similar

        self.similar_dock = add_find_similar(self)
        from segscope.app.views.connectivity_dock import add_connectivity

        self.connectivity_dock = add_connectivity(self)
        return self.plot_dock

    def watch_umap_compile(self, interval_ms: int = 1000) -> None:
        """Say under the plot, with the seconds so far, that UMAP compiles once (cold numba cache).

        The plot shows the PCA meanwhile; the note goes once the warm-up is done, the
        first UMAP is shown, a fit failed, or after :data:`UMAP_COMPILE_NOTE_MAX_S`.
        """
        if self.plot_dock is None:
            return
        plot = self.plot_dock.plot
        scheduler = plot.scheduler
        started = time.monotonic()
        timer = QTimer(self)
        timer.setInterval(interval_ms)

        def tick() -> None:
            elapsed = time.monotonic() - started
            if (
                self._closed
                or scheduler.warm_up_result is not None
                or scheduler.umap is not None
                or "failed" in scheduler.status
                or elapsed > UMAP_COMPILE_NOTE_MAX_S
            ):
                timer.stop()
                if not self._closed:
                    plot.show_status(scheduler.status)
                return
            # Short: the label sets the dock's minimum width.
            plot.show_status(f"{scheduler.layout_label} · {UMAP_COMPILE_NOTE} ({elapsed:.0f} s)")

        timer.timeout.connect(tick)
        timer.start()
        self._compile_timer = timer
        tick()

    def _on_dataset(self, summary) -> None:
        self.setWindowTitle(f"SegScope: {summary.name}")
        if self.webgl_problem is None:
            self.banner.hide()
        self._update_undo_actions()

    # -- render process faults ------------------------------------------------------------------

    def _on_render_process_terminated(self, status, exit_code: int) -> None:
        """Reload the 3-D view after its render process died; the bridge keeps the state."""
        if self._closed:
            return
        if status == QWebEnginePage.RenderProcessTerminationStatus.NormalTerminationStatus:
            return
        self.render_restarts += 1
        reason = getattr(status, "name", str(status)).replace("TerminationStatus", "").lower()
        ended = f"The 3-D view's render process ended ({reason}, exit code {exit_code})"
        if self.render_restarts > MAX_RENDER_RESTARTS:
            # A renderer that dies on every load (a GPU driver fault) would reload forever.
            message = (
                f"{ended}, {self.render_restarts} times now; it is not reloaded again. Save the session "
                "(File > Save session) and restart SegScope; if it keeps dying, see README: Known constraints."
            )
            log.warning("%s", message)
            self.banner.show_error(message)
            return
        message = f"{ended}; the view was reloaded with its layers, selection and camera kept."
        log.warning("%s (restart %d)", message, self.render_restarts)
        self.banner.show_error(message)
        # Deferred: reloading from inside the termination signal is not safe in Qt WebEngine.
        QTimer.singleShot(0, lambda: None if self._closed else self.web_view.setUrl(QUrl(self.bridge.url)))

    # -- WebGL ------------------------------------------------------------------------------------

    def _on_page_loaded(self, ok: bool) -> None:
        if ok and not self._closed:
            QTimer.singleShot(WEBGL_PROBE_DELAY_MS, self.probe_webgl)
            QTimer.singleShot(BLACK_VIEW_CHECK_MS, lambda: self.check_black_view(BLACK_VIEW_CHECKS - 1))

    def check_black_view(self, remaining: int = 0) -> None:
        """Report a view that stays entirely black (checked again ``remaining`` more times)."""
        if self._closed or self.webgl_problem is not None or not self.web_view.isVisible():
            return
        if not view_is_black(self.web_view.grab().toImage()):
            return  # it draws
        if remaining > 0:
            QTimer.singleShot(BLACK_VIEW_CHECK_MS, lambda: self.check_black_view(remaining - 1))
            return
        self.report_webgl_problem(
            f"the view stayed black for {BLACK_VIEW_CHECKS * BLACK_VIEW_CHECK_MS // 1000} s after the page "
            "loaded (Qt WebEngine's compositor returns no picture, as on its GBM path under Xvfb or in a VM)"
        )

    def probe_webgl(self) -> None:
        """Ask the page whether WebGL works (asynchronous; the answer goes to :meth:`check_webgl_probe`)."""
        if not self._closed:
            self.page.runJavaScript(WEBGL_PROBE_JS, 0, self.check_webgl_probe)

    def check_webgl_probe(self, probe) -> None:
        """Show the WebGL banner when :data:`WEBGL_PROBE_JS`'s result says WebGL is missing."""
        problem = webgl_problem(probe)
        if problem is not None:
            self.report_webgl_problem(f"WebGL did not start in Qt WebEngine ({problem})")

    def report_webgl_problem(self, detail: str) -> None:
        """Say in the window, once, that the 3-D view cannot draw, why, and how to fix it."""
        if self.webgl_problem is not None or self._closed:
            return
        self.webgl_problem = webgl_help(detail.strip() or "no details")
        log.warning("%s", self.webgl_problem)
        self.banner.show_error(self.webgl_problem)

    # -- menus and shortcuts -------------------------------------------------------------------

    def _action(self, menu, text: str, shortcuts, slot) -> QAction:
        """An action in ``menu`` whose shortcuts work while the web view has focus.

        For that the action lives on the window too.
        """
        action = QAction(text, self)
        action.setShortcuts([QKeySequence(s) for s in (shortcuts if isinstance(shortcuts, list) else [shortcuts])])
        # triggered(bool checked): drop the flag, or a slot with an optional first
        # parameter (File > Open's ``initial``) receives False in its place.
        action.triggered.connect(lambda _checked=False: slot())
        action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        menu.addAction(action)
        self.addAction(action)
        return action

    def _build_menus(self) -> None:
        keys = QKeySequence.StandardKey
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = self._action(file_menu, "&Open…", keys.Open, self._open_dialog)
        self.open_session_action = self._action(file_menu, "Open &session…", "Ctrl+Shift+O", self._open_session_dialog)
        self.save_session_action = self._action(
            file_menu, "&Save session", keys.Save, lambda: self.save_session(self.session.path)
        )
        self.save_session_as_action = self._action(
            file_menu, "Save session &as…", "Ctrl+Shift+S", lambda: self.save_session(None)
        )
        self.export_action = self._action(file_menu, "&Export…", "Ctrl+E", self.show_export_dialog)
        file_menu.addSeparator()
        self.quit_action = self._action(file_menu, "&Quit", keys.Quit, self.close)

        edit_menu = self.menuBar().addMenu("&Edit")
        self.undo_action = self._action(edit_menu, "&Undo", keys.Undo, self.undo_label)
        # Ctrl+Y and Ctrl+Shift+Z both redo, each once: the platform's Redo binding is one of
        # them (Ctrl+Shift+Z on Linux desktops), and a key listed twice is an "ambiguous
        # shortcut overload" that Qt ignores.
        redo_keys: list[QKeySequence] = []
        for key in (*QKeySequence.keyBindings(keys.Redo), QKeySequence("Ctrl+Y"), QKeySequence("Ctrl+Shift+Z")):
            if not key.isEmpty() and key not in redo_keys:
                redo_keys.append(key)
        self.redo_action = self._action(edit_menu, "&Redo", redo_keys, self.redo_label)
        self._update_undo_actions()

        segment_menu = self.menuBar().addMenu("&Segment")
        self.cancel_action = self._action(segment_menu, "&Cancel embedding", Qt.Key.Key_Escape, self.cancel_job)
        self.reembed_action = self._action(
            segment_menu, "&Embed selected segment again", "Ctrl+R", self.service.reembed
        )
        segment_menu.addSeparator()
        self.train_action = self._action(segment_menu, "&Train classifier…", "Ctrl+T", self.train_classifier)
        self.revert_classifier_action = self._action(segment_menu, "Re&vert classifier", [], self.revert_classifier)
        self.export_classifiers_action = self._action(
            segment_menu, "E&xport classifiers…", [], self._export_classifiers_dialog
        )
        self.suggest_action = self._action(segment_menu, "Su&ggest next", "Ctrl+G", lambda: self.service.suggest_next())
        self.next_suggestion_action = self._action(
            segment_menu, "&Next suggestion", "Ctrl+Shift+G", lambda: self.service.next_suggestion()
        )

        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "&Keyboard shortcuts", keys.HelpContents, self._show_shortcuts)

    def _show_shortcuts(self) -> None:
        QMessageBox.information(
            self,
            "Keyboard shortcuts",
            (
                "Double-click a segment: select it and embed its nodes\n"
                "Esc: cancel the embedding job\n"
                "Ctrl+R: embed the selected segment again\n"
                "Shift+right-click a segment in 3-D, or Ctrl+F: find similar segments (right-click a plot\n"
                "  selection or the segment panel too); click a listed segment to select it\n"
                "Rect / Lasso in the plot: select nodes and their segments (shown in 3-D)\n"
                "Hover a plot point: its segment, node, predictions and manual label\n"
                "Click a legend entry in the plot: hide or show that class's points\n"
                "Delete in the plot: hide the selected segments' points; undo it with Hide ▸ Undo hide\n"
                "  or right-click the plot (Ctrl+Z stays the label undo); Show hidden segments brings all back\n"
                "Ctrl+Z / Ctrl+Shift+Z or Ctrl+Y: undo / redo a manual label\n"
                "Save (or right-click) in the plot: save it as a PNG or SVG image\n"
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
            notes = [model.precision] + ([] if model.trained else ["untrained"])
            self.model_label.setText(f"Model: {model.name} ({', '.join(notes)})")

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

    def _show_mesh_status(self, status) -> None:
        """Say how a segment meshed on the fly went (:class:`segscope.app.neuroglancer_bridge.MeshStatus`)."""
        if status.error:
            message = f"No mesh for segment {status.segment_id}: {status.error}"
        elif status.cached:
            message = f"Mesh of segment {status.segment_id} from the cache."
        else:
            message = f"Meshed segment {status.segment_id} in {status.seconds:.1f} s."
        if status.truncated:
            message += " It goes on beyond the box limit: the mesh shows the part inside (--skeleton-box-vox)."
        self.statusBar().showMessage(message, 8000)

    def _on_click(self, event: ClickEvent) -> None:
        self.service.handle_click(event.segment_id, event.position_nm)

    def cancel_job(self) -> None:
        if not self.service.cancel() and not self.service.cancel_training():
            self.statusBar().showMessage("No embedding job to cancel.")

    def train_classifier(self) -> None:
        """Train on the session's labels in the compute child; the result dialog follows."""
        self.service.train_classifier(self.show_training_report)

    def show_training_report(self, report: dict) -> None:
        """The new classifier's cross-validation next to the current one's; Accept swaps them."""
        from segscope.app.views.train_dialog import TrainResultDialog

        self.train_dialog = TrainResultDialog(report, self)
        self.train_dialog.accepted.connect(lambda: self.service.accept_trained(report))
        self.train_dialog.rejected.connect(
            lambda: self.statusBar().showMessage("Kept the current classifier; the trained one is discarded.")
        )
        self.train_dialog.open()

    def _export_classifiers_dialog(self) -> None:
        if self.state.classifiers is None:
            self.state.show_error("No classifiers are loaded: nothing to export.")
            return
        chosen = QFileDialog.getExistingDirectory(
            self, "Export classifiers to a folder (an empty one, or a new folder is made inside)"
        )
        if not chosen:
            return
        folder = Path(chosen)
        if not any(folder.iterdir()):
            self.service.export_classifiers(folder, force=True)
            return
        target, number = folder / "segscope-classifiers", 1
        while target.exists():
            number += 1
            target = folder / f"segscope-classifiers-{number}"
        self.service.export_classifiers(target)

    def revert_classifier(self) -> None:
        if not self.service.revert_classifier():
            self.statusBar().showMessage("No accepted training to revert.")

    def _open_dialog(self, initial: OpenRequest | None = None) -> None:
        dialog = OpenDialog(self, initial=initial)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        self.open_request(dialog.request())

    def open_request(self, request: OpenRequest) -> None:
        """Open what the Open dialog asked for, through the service (as ``segscope open`` does).

        The data opens on the worker; an encoder and classifiers given load after it (their
        jobs queue on the model lane). Bad models are reported on the error banner.
        """
        from segscope.analysis.artefacts import check_checkpoint, read_classifier_folder
        from segscope.app.session_file import PrecomputedRef

        if not request.image or not request.segmentation:
            self.state.show_error("Open: both an image and a segmentation are needed.")
            return
        # A Parquet (segscope embed's node table) is plotted as context; anything else is a
        # CSV ZIP store whose segments are then read instead of computed.
        table = request.embeddings if request.embeddings.lower().endswith(".parquet") else ""
        store = request.embeddings if request.embeddings and not table else ""
        precomputed = PrecomputedRef(location=store) if store else None
        model_path = None
        classifiers = None
        try:
            if request.checkpoint:
                model_path = check_checkpoint(request.checkpoint)
            if request.classifiers:
                classifiers = read_classifier_folder(Path(request.classifiers))
        except (OSError, ValueError) as exc:
            self.state.show_error(f"Open: {exc}")
            return

        def load_models() -> None:
            if model_path is not None:
                self.service.load_model(model_path)
            if classifiers is not None:
                self.service.load_classifiers(classifiers)
            if table:
                self.add_context_table(Path(table))

        self.service.open_sources(
            request.image, request.segmentation, request.skeletons or None, precomputed=precomputed, then=load_models
        )

    def add_context_table(self, path: Path) -> None:
        """Read a ``segscope embed`` Parquet on the worker and plot it as context embeddings."""
        from segscope.analysis.progress import Progress
        from segscope.analysis.projection import read_embedding_table
        from segscope.app.service import OPEN_LANE

        if self.plot_dock is None:
            self.state.show_error(f"Embeddings {path.name} not shown: this window has no embedding plot.")
            return

        def make():
            yield Progress(0, 1, "steps", f"reading {path.name}")
            return read_embedding_table(path)

        def on_update(update) -> None:
            if update.event == "finished" and self.plot_dock is not None and not self._closed:
                rows = self.plot_dock.plot.add_background(update.result)
                self.state.show_status(f"Plotted {len(rows)} context embeddings from {path.name}.")
            elif update.event == "failed":
                self.state.show_error(f"Could not read the embeddings {path}: {update.error}")

        self.service.runner.submit(f"reading {path.name}", make, on_update, kind=OPEN_LANE)

    # -- drag and drop of a folder --------------------------------------------------------------

    def dragEnterEvent(self, event) -> None:
        if dropped_folders(event):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        """A dropped dataset folder opens the Open dialog filled from it (the user confirms)."""
        found: dict[str, str] = {}
        for folder in dropped_folders(event):
            found.update(sources_from_folder(folder))
        event.acceptProposedAction()
        if not found:
            self.state.show_error("Drop: not a SegScope dataset, precomputed or zarr folder.")
            return
        request = OpenRequest(**found)
        if request.image and request.segmentation:  # a whole dataset: open it at once
            remember(request)
            self.open_request(request)
            return
        # A lone volume: the dialog asks for the rest. Opened after the drop returns, since a
        # modal dialog inside the drop handler would block the drag source.
        QTimer.singleShot(0, lambda: self._open_dialog(request))

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
        """Open the Export dialog (non-modal); its Export button asks the service to export."""
        from segscope.app.views.export_dialog import ExportDialog

        summary = self.service.export_summary()
        if summary is None:
            return None
        base = self.session.path.parent if self.session.path is not None else Path.home()
        name = f"segscope-export-{self.state.dataset.name if self.state.dataset else 'session'}"
        dialog = ExportDialog(base / name, summary, self)
        dialog.accepted.connect(lambda: self.service.export(dialog.request()))
        self.export_dialog = dialog
        dialog.open()
        return dialog

    # -- sessions -------------------------------------------------------------------------------------

    def save_session(self, path: str | Path | None = None) -> bool:
        """Save the session to ``path`` (None: ask for one) on the session worker."""
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Save session", str(Path.home() / f"session{JSON_SUFFIX}"), f"SegScope sessions (*{JSON_SUFFIX})"
            )
            if not chosen:
                return False
            path = chosen
        return self.service.save(path) is not None

    def _open_session_dialog(self) -> None:
        chosen, _ = QFileDialog.getOpenFileName(
            self, "Open session", str(Path.home()), f"SegScope sessions (*{JSON_SUFFIX});;All files (*)"
        )
        if chosen:
            self.service.open_session(chosen)

    # -- autosave and recovery -------------------------------------------------------------------

    def start_autosave(self, manager, interval_ms: int = AUTOSAVE_INTERVAL_MS) -> None:
        """Autosave every ``interval_ms`` milliseconds with ``manager``.

        ``manager`` is a :class:`segscope.app.session_file.AutosaveManager`, already started.
        """
        self.service.start_autosave(manager)
        self._autosave_timer.start(interval_ms)

    def autosave_now(self) -> bool:
        """Write an autosave now (on the session worker); False when there is nothing to save."""
        return self.service.autosave_now() is not None

    def offer_recovery(self, ask: Callable | None = None) -> bool:
        """After a crash, offer the last autosave; True if a session is being restored.

        ``ask(candidate) -> "restore" | "discard" | "later"`` (default: a message box).
        """
        return self.service.offer_recovery(ask or self._ask_recovery)

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

    def closeEvent(self, event) -> None:
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop jobs, the bridge and the web page (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._autosave_timer.stop()
        if self._compile_timer is not None:
            self._compile_timer.stop()
        for runner in self.extra_runners:
            runner.shutdown(wait=False)
        if self.similar_dock is not None:
            self.similar_dock.shutdown()
        if self.plot_dock is not None:
            self.plot_dock.shutdown()
            if self.owns_projection_backend:
                self.plot_dock.plot.scheduler.backend.close()  # stops its UMAP process
        # The compute child first: a model load or an embedding waiting on it then fails at
        # once, instead of holding the quit for the service's 5 s wait on its worker.
        self.service.runner.cancel()
        if self.service.engine is not None:
            self.service.engine.stop()
        self.service.shutdown()  # a save in flight completes; a clean exit leaves no autosave
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
