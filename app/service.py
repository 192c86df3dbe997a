"""The application service: everything a SegScope session *does*, without Qt.

:class:`SessionService` turns user intents into jobs and puts their results into the
:class:`~segscope.app.session.Session` model: opening data, loading the encoder and
classifiers, click-to-embed, saving, opening and restoring sessions, autosave and crash
recovery, and exports. Views call it and subscribe to the model; the CLI, tests and scripts
drive it the same way with no Qt (``post`` decides on which thread results land: the Qt
main thread in the app, the worker itself when None).

Threads
-------
Embedding jobs and model loads run on one worker (``runner``, lanes ``"model"``, ``"open"``
and ``"embed"``): one encoder, one GPU. Session I/O (save, open, autosave, export) runs on
a second worker (``io_runner``) so that writing a large export never delays a click. Every
job's results are posted back and applied to the model on the one thread that owns it.
TensorFlow itself runs in the compute child process (:mod:`segscope.app.compute_process`).

Superseding policy
------------------
Clicking another segment **supersedes** the running embedding job instead of queueing
behind it: the user wants the segment they just clicked, and a queue of stale segments
would delay that answer by the full cost of every earlier click. The superseded job stops
before its next batch, and its late updates are dropped (the runner's generation
counter), so the panel and the 3-D view only ever show the segment now selected.

Predictions and precomputed embeddings
--------------------------------------
Classifiers (a folder with ``classifiers.json``, see
:func:`~segscope.app.controller.read_classifier_folder`) load into the compute process after
the encoder; every embedding batch then comes back with its nodes' predicted
subcompartments and the segment's updated cell-type call. With a CSV ZIP store
(:class:`~segscope.app.controller.PrecomputedEmbeddings`), a clicked segment found in the
store uses the store's nodes and embeddings instead of computing (only the classifiers run).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from segscope.analysis.artefacts import ClassifierSummary, read_classifier_folder
from segscope.analysis.progress import Progress
from segscope.app.controller import (
    EMBED_LANE,
    MODEL_LANE,
    DataSource,
    PrecomputedEmbeddings,
    SegmentCentres,
    embed_segment_job,
    load_classifiers_job,
    load_encoder_job,
)
from segscope.app.jobs import Job, JobRunner, JobUpdate, Post
from segscope.app.session import Session
from segscope.app.state import JobStatus, ModelSummary, SegmentRecord, SessionState

if TYPE_CHECKING:
    from segscope.app.compute_process import ComputeProcess
    from segscope.app.session_file import AutosaveManager, PrecomputedRef, SessionDocument

log = logging.getLogger(__name__)

OPEN_LANE = "open"
#: Session I/O lanes on the I/O worker: an export or autosave never delays embedding.
EXPORT_LANE = "export"
SESSION_LANE = "session"
#: Classifier training and active-learning ranking (the compute child runs one request at a time).
TRAIN_LANE = "train"
#: Training folders kept in the user cache (older ones are deleted when training starts).
KEEP_TRAINED_FOLDERS = 10
SUGGEST_LANE = "suggest"
#: Labelled embedded nodes each class needs before *Train classifier* runs, and labelled
#: segments in all: cross-validation keeps a segment's nodes in one fold, so one segment
#: cannot be both trained on and scored.
MIN_NODES_PER_CLASS = 5
MIN_LABELLED_SEGMENTS = 2
#: Default aggregation radius (nm) by task, as the shipped classifiers and segscope classify.
TRAIN_RADIUS_NM = {"compartment": 2500.0, "cell_type": 10_000.0}
AUTOSAVE_LANE = "autosave"

RecoveryChoice = Literal["restore", "discard", "later"]


def prune_trained_folders(root: Path, in_use: set[str], keep: int = KEEP_TRAINED_FOLDERS) -> None:
    """Delete all but the ``keep`` newest training folders under ``root``.

    Folders in ``in_use`` (paths of the loaded classifiers and the Revert stack) are kept
    whatever their age; a folder another SegScope process is using may go, which is why
    ``keep`` is generous and users keep classifiers with *Export classifiers*. Runs on a
    worker (it deletes files).
    """
    import shutil

    if not root.is_dir():
        return
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in folders[keep:]:
        if str(folder) not in in_use:
            shutil.rmtree(folder, ignore_errors=True)


class Viewer(Protocol):
    """What the service needs of the 3-D view (the Neuroglancer bridge); None headless."""

    def show_source(self, source: DataSource) -> None: ...

    def add_exported_layer(self, folder: str | Path) -> Any: ...

    def highlight_segments(self, segment_ids: Iterable[int]) -> None: ...


@dataclass(frozen=True)
class ExportRequest:
    """What to export and where (the Export dialog's answer, or a script's).

    Attributes
    ----------
    folder : Path
        The bundle folder to write (replaced atomically with ``force``).
    parts : tuple of str
        Subset of :data:`segscope.analysis.export.ALL_PARTS`.
    table_formats : tuple of str
        ``"parquet"`` and/or ``"csv"``.
    force : bool
        Replace an existing bundle.
    add_layer : bool
        Add the exported annotation layer to the 3-D view when done.
    """

    folder: Path
    parts: tuple[str, ...]
    table_formats: tuple[str, ...] = ("parquet",)
    force: bool = False
    add_layer: bool = False


class SessionService:
    """Does what the user asks of a :class:`Session` (call from the thread that owns it).

    Parameters
    ----------
    session
        The model it mutates.
    post
        Where job updates run (``post(fn)``): the Qt invoker in the app; None runs them on
        the worker thread (scripts, headless tests that then wait on the jobs).
    viewer
        The 3-D view (:class:`Viewer`), or None headless.
    spacing_nm
        Distance between embedding centres along a skeleton (nm); SegCLR's 1500 when None.
    batch_size
        Cutouts per forward call after a click's first (None: the engine's default for the
        device). Smaller calls fit a small GPU and let a cancel stop sooner.
    """

    def __init__(
        self,
        session: Session,
        *,
        post: Post | None = None,
        viewer: Viewer | None = None,
        spacing_nm: float | None = None,
        batch_size: int | None = None,
    ):
        self.session = session
        self.viewer = viewer
        self.spacing_nm = spacing_nm
        self.batch_size = batch_size
        self._post: Post = post or (lambda fn: fn())
        self.runner = JobRunner(post=post)
        self.io_runner = JobRunner(post=post, name="segscope-session-io")
        #: Interactive analyses (find similar): a third worker, so a query never waits
        #: behind an embedding or an export.
        self.analysis_runner = JobRunner(post=post, name="segscope-analysis")
        #: The compute child (TensorFlow), started by load_model or load_classifiers.
        self.engine: ComputeProcess | None = None
        #: What the encoder computes in (``"auto"``, ``"float32"``, ``"bfloat16"``...), kept
        #: for later loads (a reopened session's model).
        self.precision = "auto"
        #: The autosave manager (:meth:`start_autosave`); None: no autosave.
        self.autosave: AutosaveManager | None = None
        #: The :class:`~segscope.analysis.export.ExportResult` of the last finished export.
        self.last_export = None
        self._model_job: Job | None = None
        self._classifier_job: Job | None = None
        self._embed_job: Job | None = None
        self._train_job: Job | None = None
        #: The report of the last finished training (see train_in_child), until the next one.
        self.last_training: dict | None = None
        #: Classifiers replaced by accepted trainings, newest last (None: there were none).
        self.previous_classifiers: list[ClassifierSummary | None] = []
        #: Nodes *Suggest next* proposes, as (segment id, node id), most useful first.
        self.suggestions: list[tuple[int, int]] = []
        self.suggestion_index = -1
        self._click_times: dict[int, float] = {}
        self._closed = False

    @property
    def state(self) -> SessionState:
        """The session's :class:`SessionState` (short for ``service.session.state``)."""
        return self.session.state

    # -- data ------------------------------------------------------------------------------

    def open_sources(
        self,
        image_url: str,
        segmentation_url: str,
        skeletons_url: str | None = None,
        *,
        name: str | None = None,
        precomputed: PrecomputedRef | None = None,
        then: Callable[[], None] | None = None,
    ) -> Job:
        """Open data on the worker, then adopt it (:meth:`open_source`).

        Errors are reported on ``state.events.error``. ``precomputed`` describes a CSV ZIP
        store to open with it; ``then`` runs once the data is adopted.
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
                if self.open_source(source, precomputed=store) and then is not None:
                    then()
            elif update.event == "failed":
                self.state.show_error(f"Could not open the data: {update.error}")

        self.state.show_status(f"Opening {segmentation_url}…")
        return self.runner.submit(f"opening {segmentation_url}", make, on_update, kind=OPEN_LANE)

    def open_source(self, source: DataSource, *, precomputed: PrecomputedEmbeddings | None = None) -> bool:
        """Adopt opened data: show it in the 3-D view, then make it the session's.

        Cancels work on the previous data. False (and an error) when the view cannot show it.

        ``precomputed`` is a CSV ZIP store of this data's embeddings.
        """
        if self.viewer is not None:
            try:
                self.viewer.show_source(source)
            except (ValueError, OSError) as exc:
                self.state.show_error(f"Neuroglancer cannot show {source.name}: {exc}")
                return False
        self.runner.cancel(EMBED_LANE)
        self.session.set_source(source, precomputed)
        store = f" Precomputed embeddings: {precomputed.location}." if precomputed is not None else ""
        self.state.show_status(f"Opened {source.name}. Double-click a segment to embed it.{store}")
        return True

    def reembed(self) -> bool:
        """Embed the selected segment again; False when none is selected."""
        segment = self.state.segment
        if segment is None:
            self.state.show_status("No segment selected.")
            return False
        self.select_segment(segment.segment_id, segment.click_nm)
        return True

    # -- export ----------------------------------------------------------------------------

    def export_summary(self) -> str | None:
        """One line on what an export would hold; None (and an error) when nothing would."""
        from segscope.app.session_export import ContextNodes

        records = self.session.records()
        # Labelled context points (plotted from a context table, in no record) are exported too.
        context = ContextNodes.from_plot(self.session.plot)
        record_ids = {int(record.segment_id) for record in records}
        context_segments = {int(s) for s in context.segment_id.tolist()} - record_ids
        if not records and not len(context):
            self.state.show_error("Nothing to export yet: double-click a segment to embed it first.")
            return None
        labels = self.session.labels
        nodes = sum(record.n_embedded for record in records)
        text = f"{len(records)} segments, {nodes} embedded nodes"
        if len(context):
            text += f", {len(context)} labelled context nodes of {len(context_segments)} more segments"
        return f"{text}; manual labels on {labels.n_labelled_nodes} nodes and {labels.n_labelled_segments} segments."

    def export(self, request: ExportRequest) -> Job:
        """Write the export bundle ``request`` on the I/O worker.

        It exports a snapshot of the session now (later edits do not leak into it). On
        success it emits ``session.events.exported`` and, with ``add_layer``, adds its
        annotation layer to the 3-D view.
        """
        from segscope.app.labels import LabelStore
        from segscope.app.session_export import ContextNodes, export_session, skeleton_edges

        session = self.session
        records = session.records_snapshot()
        labels = LabelStore.from_dict(session.labels.to_dict())
        # The plot's labelled context points, copied here on the thread that owns the plot.
        context = ContextNodes.from_plot(session.plot)
        state, source = session.state, session.source

        def make():
            skeletons = skeleton_edges(source, records) if "swc" in request.parts else None
            return (
                yield from export_session(
                    request.folder,
                    records,
                    labels,
                    dataset=state.dataset,
                    model=state.model,
                    classifiers=state.classifiers,
                    parts=request.parts,
                    table_formats=request.table_formats,
                    skeletons=skeletons,
                    force=request.force,
                    context=context,
                )
            )

        def on_update(update: JobUpdate) -> None:
            if update.event == "progress" and update.progress is not None:
                self.state.show_status(f"Exporting: {update.progress.message}")
            elif update.event == "finished":
                message = f"Exported to {request.folder}"
                if request.add_layer and self.viewer is not None:
                    try:
                        self.viewer.add_exported_layer(request.folder)
                        message += " (its annotation layer is in the viewer)"
                    except (OSError, ValueError) as exc:
                        message += f"; the layer could not be added: {exc}"
                self.last_export = update.result
                session.events.exported.emit(Path(request.folder), update.result)
                self.state.show_status(message + ".")
            elif update.event == "failed":
                self.state.show_error(f"Export to {request.folder} failed: {update.error}")

        self.state.show_status(f"Exporting to {request.folder}…")
        return self.io_runner.submit(
            f"exporting to {request.folder}", make, on_update, kind=EXPORT_LANE, supersede=False
        )

    # -- sessions --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Job | None:
        """Save the session to ``path`` on the I/O worker; None (and an error) if nothing is open."""
        from segscope.app.session_file import save_session

        try:
            document = self.session.document()
        except ValueError as exc:
            self.state.show_error(f"Cannot save the session: {exc}")
            return None
        records = list(self.session.records_snapshot().values())
        target = Path(path)

        def make():
            yield Progress(0, 1, "files", f"saving {target.name}")
            return save_session(target, document, records)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                self.session.set_path(update.result)
                self.state.show_status(f"Session saved to {update.result}.")
            elif update.event == "failed":
                self.state.show_error(f"Could not save the session to {target}: {update.error}")

        return self.io_runner.submit(f"saving {target}", make, on_update, kind=SESSION_LANE, supersede=False)

    def open_session(self, path: str | Path) -> Job:
        """Load a saved session on the I/O worker and restore it (errors reported)."""
        from segscope.app.session_file import load_session

        target = Path(path)

        def make():
            yield Progress(0, 1, "files", f"reading {target.name}")
            return load_session(target)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                document, records = update.result
                self.session.set_path(target)
                self.restore(document, records)
            elif update.event == "failed":
                self.state.show_error(f"Could not open the session {target}: {update.error}")

        self.state.show_status(f"Opening session {target}…")
        return self.io_runner.submit(f"opening {target}", make, on_update, kind=SESSION_LANE, supersede=False)

    def restore(self, document: SessionDocument, records: list[SegmentRecord]) -> None:
        """Show a loaded session: its data, model, classifiers, records, labels and plot.

        The data is opened first when it differs from what is open.
        """
        if self.session.has_same_data(document):
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

    def _restore_loaded(self, document: SessionDocument, records: list[SegmentRecord]) -> None:
        session = self.session
        if document.model_path and str(session.model_path) != document.model_path:
            if Path(document.model_path).exists():
                self.load_model(Path(document.model_path))
            else:
                self.state.show_error(f"The session's model {document.model_path} is missing; keeping the current one.")
        current = self.state.classifiers.folder if self.state.classifiers is not None else None
        if document.classifiers_folder and document.classifiers_folder != current:
            try:
                self.load_classifiers(read_classifier_folder(document.classifiers_folder))
            except (OSError, ValueError) as exc:
                self.state.show_error(f"The session's classifiers cannot be read: {exc}")
        restored = session.restore(document, records)
        if document.selected_segments and self.viewer is not None:
            self.viewer.highlight_segments(document.selected_segments)
        labels = session.labels
        self.state.show_status(
            f"Restored the session: {len(restored)} segments, "
            f"{labels.n_labelled_nodes} labelled nodes, "
            f"{labels.n_labelled_segments} labelled segments."
        )

    # -- autosave and recovery -------------------------------------------------------------

    def start_autosave(self, manager: AutosaveManager) -> None:
        """Autosave with ``manager`` whenever :meth:`autosave_now` is called (the window's timer).

        ``manager`` is an :class:`~segscope.app.session_file.AutosaveManager`, already started.
        """
        self.autosave = manager

    def autosave_now(self) -> Job | None:
        """Write an autosave on the I/O worker; None when there is nothing to save."""
        if self.autosave is None or self.session.source is None:
            return None
        try:
            document = self.session.document()
        except ValueError:
            return None
        records = list(self.session.records_snapshot().values())
        manager = self.autosave

        def make():
            yield Progress(0, 1, "files", "autosaving")
            return manager.autosave(document, records)

        def on_update(update: JobUpdate) -> None:
            if update.event == "failed":
                log.warning("autosave failed: %s", update.error)
                self.state.show_status(f"Autosave failed: {update.error}")

        return self.io_runner.submit("autosave", make, on_update, kind=AUTOSAVE_LANE)

    def offer_recovery(self, ask: Callable[[Any], RecoveryChoice]) -> bool:
        """After a crash, offer the newest autosave; True if a session is being restored.

        Autosaves another SegScope is offering or restoring are skipped.

        ``ask(candidate)`` answers ``"restore"``, ``"discard"`` or ``"later"`` (the window
        asks with a message box).
        """
        if self.autosave is None:
            return False
        manager = self.autosave
        candidate = next((c for c in manager.recoverable() if manager.claim(c)), None)
        if candidate is None:
            return False
        choice = ask(candidate)
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
                self.restore(document, records)
            elif update.event == "failed":
                self.state.show_error(f"Could not restore the autosave {candidate.path}: {update.error}")

        self.io_runner.submit("restoring the autosave", make, on_update, kind=SESSION_LANE, supersede=False)
        return True

    # -- encoder, classifiers and embedding jobs -------------------------------------------

    def _ensure_engine(self):
        from segscope.app.compute_process import ComputeProcess

        if self.engine is None:
            self.engine = ComputeProcess(on_event=self.report_child_event)
        return self.engine

    def report_child_event(self, message: str) -> None:
        """Tell the user that a child process died, hung or was restarted.

        Safe on any thread (the runner's reader thread calls it). The job that was running
        fails with its own error; this line says what happens next.
        """
        log.warning("%s", message)
        self._post(lambda: self.state.show_status(message[:1].upper() + message[1:] + "."))

    def load_model(self, path: Path | None, *, trained: bool = True, precision: str | None = None) -> None:
        """Load the encoder at ``path`` on the worker; None: embedding unavailable.

        ``precision`` None keeps :attr:`precision`; a value replaces it.
        """
        if precision is not None:
            self.precision = precision
        precision = self.precision
        self.session.model_path = path
        if path is None:
            self.state.set_model(
                None,
                "No trained model found in assets/ and no --checkpoint given: "
                "segments can be selected but not embedded.",
            )
            self.state.show_status(self.state.model_message)
            return
        self.state.set_model(None, f"Loading model {path.name}…")
        self.state.show_status(self.state.model_message)
        engine = self._ensure_engine()
        self._model_job = self.runner.submit(
            f"loading model {path.name}",
            lambda: load_encoder_job(path, engine, trained=trained, precision=precision, batch_size=self.batch_size),
            self._on_model_update,
            kind=MODEL_LANE,
            supersede=False,
        )

    def load_classifiers(self, summary: ClassifierSummary | None, message: str = "") -> None:
        """Load the classifiers ``summary`` describes into the compute process, on the worker.

        ``summary`` comes from :func:`~segscope.analysis.artefacts.read_classifier_folder`;
        None: no predictions, and ``message`` says why.

        Loading queues behind the model on the same worker, so clicks made meanwhile wait
        for both and their first batch already carries predictions.
        """
        if summary is None:
            self.state.set_classifiers(None, message or "No classifiers loaded: nodes are not labelled.")
            return
        self.state.set_classifiers(None, f"Loading classifiers from {summary.folder}…")
        engine = self._ensure_engine()
        self._classifier_job = self.runner.submit(
            "loading classifiers",
            lambda: load_classifiers_job(summary, engine),
            self._on_classifier_update,
            kind=MODEL_LANE,
            supersede=False,
        )

    def _on_classifier_update(self, update: JobUpdate) -> None:
        if update.event == "finished":
            summary: ClassifierSummary = update.result
            tasks = [
                name
                for name, info in (("subcompartments", summary.compartment), ("cell types", summary.cell_type))
                if info is not None
            ]
            self.state.set_classifiers(summary, f"Classifiers: {' and '.join(tasks)} from {summary.folder}")
            mismatch = self._encoder_mismatch()
            if mismatch.startswith(" WARNING"):  # the hashes differ: say so where predictions show
                self.state.set_classifiers(summary, mismatch.strip())
                self.state.show_error(mismatch.strip())
                return
            self.state.show_status(f"Classifiers ready: {' and '.join(tasks)}.{mismatch}")
        elif update.event == "failed":
            self._load_failed("classifiers", update.error, self.state.set_classifiers)

    def _encoder_mismatch(self) -> str:
        """A warning when the classifiers were trained on another encoder's embeddings."""
        summary, model = self.state.classifiers, self.state.model
        if summary is not None and summary.encoder_sha256 and model is not None and Path(model.source).exists():
            from segscope.analysis.artefacts import classifier_encoder_mismatch

            reason = classifier_encoder_mismatch(summary, model.source)
            return "" if reason is None else f" WARNING: {reason[:1].upper()}{reason[1:]}."
        if summary is None or summary.encoder is None or model is None:
            return ""
        if Path(model.source).name == summary.encoder:
            return ""
        return (
            f" Note: the classifiers were trained on embeddings of {summary.encoder}, not of "
            f"{Path(model.source).name}; their predictions may mean little."
        )

    def _on_model_update(self, update: JobUpdate) -> None:
        if update.event == "finished":
            summary: ModelSummary = update.result
            note = "" if summary.trained else " (untrained weights: embeddings are not meaningful)"
            self.state.set_model(summary, f"Model {summary.name} from {Path(summary.source).name}{note}")
            self.state.show_status(f"Model ready: {summary.name}{note}.")
        elif update.event == "failed":
            self._load_failed("model", update.error, self.state.set_model)

    def _load_failed(self, what: str, error: BaseException | None, clear: Callable[[None, str], None]) -> None:
        """A model or classifier load failed: none is in use, and the user reads why."""
        message = f"Could not load the {what}: {error}"
        clear(None, message)
        self.state.show_error(message)

    # -- clicks and jobs -------------------------------------------------------------------

    def handle_click(self, segment_id: int | None, position_nm=None) -> None:
        """A double click in the viewer: select and embed the segment under the cursor."""
        if segment_id is None:
            self.state.show_status("No segment under the cursor.")
            return
        self.select_segment(segment_id, position_nm)

    def select_segment(self, segment_id: int, click_nm=None) -> None:
        """Select ``segment_id`` and start embedding it (superseding any running job)."""
        if self.session.source is None:
            self.state.show_error("Open a dataset first.")
            return
        record = self.state.select_segment(segment_id, click_nm)
        source = self.session.source
        engine = self.engine
        click = None if record.click_nm is None else record.click_nm.copy()
        name = f"segment {record.segment_id}"
        holder: dict[str, Any] = {}

        precomputed = self.session.precomputed

        def make():
            job = holder["job"]
            return embed_segment_job(
                source,
                engine,
                record.segment_id,
                click,
                cancel=lambda: job.cancel_requested,
                spacing_nm=self.spacing_nm,
                batch_size=self.batch_size,
                precomputed=precomputed,
            )

        job = self.runner.submit(name, make, self._on_embed_update, kind=EMBED_LANE, supersede=True)
        holder["job"] = job
        self._embed_job = job
        self._click_times[job.id] = time.perf_counter()
        waiting = any(j is not None and not j.done for j in (self._model_job, self._classifier_job))
        self.state.set_job(
            JobStatus(
                job.id,
                f"Embedding {name}",
                "queued",
                unit="cutouts",
                message="waiting for the model and classifiers to load" if waiting else "",
            )
        )

    def cancel(self) -> bool:
        """Cancel the running embedding job; False when none is running."""
        if self._embed_job is None or self._embed_job.done or self.state.job is None or not self.state.job.active:
            return False
        self._embed_job.cancel()
        self.state.update_job(self._embed_job.id, state="cancelling", message="cancelling…")
        return True

    def _on_embed_update(self, update: JobUpdate) -> None:
        job = update.job
        segment = self.state.segment
        segment_id = None if segment is None else segment.segment_id
        if update.event == "started":
            self.state.update_job(
                job.id, state="cancelling" if job.cancel_requested else "running", message="finding centres"
            )
        elif update.event == "progress" and update.progress is not None:
            report = update.progress
            payload = report.payload
            if isinstance(payload, SegmentCentres):
                self.state.set_centres(
                    payload.segment_id,
                    payload.node_ids,
                    payload.positions_nm,
                    skeleton_node_count=payload.skeleton_node_count,
                    ground_truth=payload.ground_truth,
                    embedding_source=payload.embedding_source,
                )
                if payload.note:
                    self.state.show_status(f"Segment {payload.segment_id}: {payload.note}.")
            elif payload is not None and segment_id is not None:
                self._store_batch(segment_id, payload)
            self._show_progress(job, report)
        elif update.event == "finished":
            elapsed = time.perf_counter() - self._click_times.pop(job.id, time.perf_counter())
            total = segment.n_centres if segment is not None else 0
            if segment is not None and segment.embedding_source == "precomputed":
                self.state.update_job(
                    job.id, state="finished", done=update.result, total=total, message=f"precomputed, {elapsed:.1f} s"
                )
                self.state.show_status(
                    f"Segment {segment_id}: {update.result} precomputed embeddings "
                    f"in {elapsed:.1f} s.{self._prediction_summary(segment)}"
                )
            elif self.state.model is None:
                self.state.update_job(job.id, state="finished", done=0, total=total, message="no model: centres only")
                self.state.show_status(
                    f"Segment {segment_id}: {total} centres. {self.state.model_message or 'No model loaded.'}"
                )
            else:
                self.state.update_job(
                    job.id, state="finished", done=update.result, total=total, message=f"done in {elapsed:.1f} s"
                )
                self.state.show_status(
                    f"Embedded {update.result} centres of segment {segment_id} "
                    f"in {elapsed:.1f} s.{self._prediction_summary(segment)}"
                )
        elif update.event == "cancelled":
            self._click_times.pop(job.id, None)
            done = segment.n_embedded if segment is not None else 0
            self.state.update_job(job.id, state="cancelled", done=done, message=f"cancelled after {done} cutouts")
            self.state.show_status(
                f"Cancelled: {done} of {segment.n_centres if segment else 0} centres of segment {segment_id} embedded."
            )
        elif update.event == "failed":
            self._click_times.pop(job.id, None)
            self.state.update_job(job.id, state="failed", message=str(update.error))
            self.state.show_error(f"Embedding segment {segment_id} failed: {update.error}")

    def _store_batch(self, segment_id: int, batch) -> None:
        """Put one :class:`~segscope.app.compute_process.PredictedBatch` into the state."""
        if not self.state.add_embeddings(segment_id, batch.indices, batch.embeddings):
            return
        predictions = batch.predictions
        if predictions is not None:
            calls, cell = predictions.compartments, predictions.cell_type
            changes: dict[str, Any] = {"note": predictions.note}
            if calls is not None:
                changes.update(
                    predicted=calls.codes,
                    indices=calls.indices,
                    probability=calls.probability,
                    uncertainty=calls.uncertainty,
                )
            if cell is not None:
                changes.update(
                    cell_type=cell.name,
                    cell_type_probability=min(max(cell.probability, 0.0), 1.0),
                    cell_type_probabilities=cell.probabilities,
                    ood_score=cell.ood_score,
                    ood_flagged=cell.ood_flagged,
                    ood_threshold=cell.threshold,
                )
            self.state.set_predictions(segment_id, **changes)
        self.state.announce_batch(segment_id, batch.indices)

    @staticmethod
    def _prediction_summary(segment) -> str:
        if segment is None or segment.cell_type is None:
            return ""
        text = f" Cell type {segment.cell_type} (p = {segment.cell_type_probability:.2f})"
        if segment.ood_flagged:
            text += f", OUT OF DISTRIBUTION (OOD score {segment.ood_score:.2f})"
        return text + "."

    # -- training classifiers from the session's labels ----------------------------------------

    def embedded_nodes(self) -> dict[str, np.ndarray]:
        """Every embedded node of the session and its effective manual label.

        ``segment_ids`` uint64 ``[N]``, ``node_ids`` int64 ``[N]``, ``positions_nm`` float64
        ``[N, 3]`` xyz nm, ``embeddings`` float32 ``[N, D]``, ``labels`` str ``[N]`` (``""``
        unlabelled).
        """
        parts: list[tuple] = []
        for record in self.state.records.values():
            if record.embedded is None or record.node_ids is None or record.positions_nm is None:
                continue
            if record.embeddings is None or not record.embedded.any():
                continue
            rows = np.flatnonzero(record.embedded)
            parts.append(
                (
                    np.full(rows.size, record.segment_id, np.uint64),
                    record.node_ids[rows].astype(np.int64),
                    record.positions_nm[rows].astype(np.float64),
                    record.embeddings[rows].astype(np.float32),
                )
            )
        if not parts:
            raise ValueError("no segment is embedded yet: click segments to embed them, then label their nodes")
        if len({p[3].shape[1] for p in parts}) > 1:
            raise ValueError("the embedded segments have embeddings of different widths (two encoders); re-embed")
        segments, nodes, positions, embeddings = (np.concatenate([p[i] for p in parts]) for i in range(4))
        labels = np.asarray(self.session.labels.effective_node_labels(segments, nodes), dtype=str)
        return {
            "segment_ids": segments,
            "node_ids": nodes,
            "positions_nm": positions,
            "embeddings": embeddings,
            "labels": labels,
        }

    def training_request(self, task: str | None = None, *, max_epochs: int | None = None, folds: int = 5):
        """The :class:`~segscope.app.compute_process.TrainClassifier` the session's labels make.

        ``task`` None: ``"compartment"`` when every label names a compartment, else
        ``"cell_type"``.

        Raises
        ------
        ValueError
            Too few labels (the message says how many each class needs and has).
        """
        from segscope.analysis import COMPARTMENTS
        from segscope.analysis.paths import user_cache_dir
        from segscope.app.compute_process import TrainClassifier

        nodes = self.embedded_nodes()
        labels = nodes["labels"]
        labelled = labels != ""
        names, counts = np.unique(labels[labelled], return_counts=True)
        if task is None:
            task = "compartment" if names.size and set(names.tolist()) <= set(COMPARTMENTS) else "cell_type"
        if task == "compartment":
            unknown = sorted(set(names.tolist()) - set(COMPARTMENTS))
            if unknown:
                raise ValueError(
                    f"compartment labels must be among {', '.join(COMPARTMENTS)}; got {', '.join(unknown)}"
                )
        have = ", ".join(f"{n} {c}" for n, c in zip(names.tolist(), counts.tolist())) or "none"
        n_segments = np.unique(nodes["segment_ids"][labelled]).size
        if names.size < 2 or counts.min() < MIN_NODES_PER_CLASS or n_segments < MIN_LABELLED_SEGMENTS:
            raise ValueError(
                f"Too few labels to train: each class needs at least {MIN_NODES_PER_CLASS} labelled embedded "
                f"nodes, at least 2 classes, from at least {MIN_LABELLED_SEGMENTS} segments "
                f"(labelled embedded nodes now: {have}; {n_segments} segments)"
            )
        current = self.state.classifiers
        info = None if current is None else getattr(current, task)
        model = self.state.model
        trained_root = user_cache_dir() / "trained-classifiers"
        folder = trained_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{task}"
        return TrainClassifier(
            task=task,
            out_folder=str(folder),
            segment_ids=nodes["segment_ids"],
            node_ids=nodes["node_ids"],
            positions_nm=nodes["positions_nm"],
            embeddings=nodes["embeddings"],
            labels=labels,
            radius_nm=TRAIN_RADIUS_NM[task],
            base_folder=None if current is None else current.folder,
            current_path=None if info is None else info.path,
            current_radius_nm=None if info is None else info.radius_nm,
            encoder=None if model is None else Path(model.source).name,
            folds=folds,
            max_epochs=max_epochs,
        )

    def _show_progress(self, job: Job, report: Progress) -> None:
        """A job's progress report in the job bar (cancelling once a cancel was asked for)."""
        self.state.update_job(
            job.id,
            state="cancelling" if job.cancel_requested else "running",
            done=report.done,
            total=report.total,
            unit=report.unit,
            rate=report.rate,
            message=report.message,
        )

    def classifier_folders_in_use(self) -> set[str]:
        """Paths of the loaded classifiers and of those on the Revert stack."""
        return {
            str(Path(summary.folder)) for summary in [self.state.classifiers, *self.previous_classifiers] if summary
        }

    def train_classifier(
        self,
        on_report: Callable[[dict], Any] | None = None,
        *,
        task: str | None = None,
        max_epochs: int | None = None,
        folds: int = 5,
    ) -> Job | None:
        """Train a classifier on the session's labels in the compute child (progress, cancel).

        The job runs grouped cross-validation, trains on every label and writes a new
        classifiers folder under the user cache (the current folder's other task copied
        in). ``on_report`` gets the report (see
        :func:`~segscope.app.compute_process.train_in_child`) on the owning thread; nothing
        is loaded until :meth:`accept_trained`. None (and an error shown) when the labels
        are too few.
        """
        try:
            request = self.training_request(task, max_epochs=max_epochs, folds=folds)
        except ValueError as exc:
            self.state.show_error(str(exc))
            return None
        engine = self._ensure_engine()
        model = self.state.model
        holder: dict[str, Job] = {}
        in_use = self.classifier_folders_in_use()  # read here, on the thread that owns the state

        def make():
            from dataclasses import replace

            from segscope.analysis.provenance import model_sha256

            prune_trained_folders(Path(request.out_folder).parent, in_use)
            train_request = request
            if model is not None and Path(model.source).is_file():
                train_request = replace(request, encoder_sha256=model_sha256(model.source))
            return engine.train_classifier(train_request, cancel=lambda: holder["job"].cancel_requested)

        def on_update(update: JobUpdate) -> None:
            job = update.job
            if update.event == "progress" and update.progress is not None:
                self._show_progress(job, update.progress)
            elif update.event == "finished":
                report = update.result
                self.last_training = report
                self.state.update_job(job.id, state="finished", message="trained")
                score = report["score"]["balanced_accuracy"]
                self.state.show_status(
                    f"Trained a {report['task'].replace('_', '-')} classifier on {report['n_examples']} examples: "
                    f"grouped cross-validated balanced accuracy {score:.3f}. Accept or keep the current one."
                )
                if on_report is not None:
                    on_report(report)
            elif update.event == "cancelled":
                self.state.update_job(job.id, state="cancelled", message="training cancelled")
                self.state.show_status("Training cancelled; the classifiers are unchanged.")
            elif update.event == "failed":
                self.state.update_job(job.id, state="failed", message=str(update.error))
                self.state.show_error(f"Training failed: {update.error}")

        job = self.runner.submit("training classifier", make, on_update, kind=TRAIN_LANE, supersede=True)
        holder["job"] = job
        self._train_job = job
        self.state.set_job(JobStatus(job.id, "Training classifier", "queued", message="training"))
        return job

    def cancel_training(self) -> bool:
        """Ask the running training to stop; False when none runs."""
        if self._train_job is None or self._train_job.done:
            return False
        self._train_job.cancel()
        return True

    def accept_trained(self, report: dict) -> None:
        """Load the trained folder (keeping the current classifiers for :meth:`revert_classifier`)."""
        summary = read_classifier_folder(report["folder"])
        self.previous_classifiers.append(self.state.classifiers)
        self.load_classifiers(summary)
        self.repredict()

    def export_classifiers(
        self,
        destination: str | os.PathLike,
        *,
        force: bool = False,
        on_done: Callable[[Path], Any] | None = None,
    ) -> Job | None:
        """Copy the loaded classifiers (a trained and accepted one included) to ``destination``.

        The copy runs on the I/O worker (a slow or network disk never freezes the window).
        The folder is what ``segscope embed --classifiers`` and ``segscope open
        --classifiers`` read; ``on_done`` gets it on the owning thread. None when no
        classifiers are loaded; a failed copy (the destination exists, a file is gone, disk
        full) fails the job and shows the reason as an error.
        """
        from segscope.analysis.artefacts import copy_classifier_folder

        summary = self.state.classifiers
        if summary is None:
            self.state.show_error("No classifiers are loaded: nothing to export.")
            return None

        def make():
            yield Progress(0, 1, "folders", f"exporting classifiers to {destination}")
            return copy_classifier_folder(summary, destination, force=force)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                self.state.show_status(f"Classifiers exported to {update.result}")
                if on_done is not None:
                    on_done(update.result)
            elif update.event == "failed":
                self.state.show_error(f"Exporting classifiers failed: {update.error}")

        self.state.show_status(f"Exporting classifiers to {destination}…")
        return self.io_runner.submit(
            f"exporting classifiers to {destination}", make, on_update, kind=EXPORT_LANE, supersede=False
        )

    def revert_classifier(self) -> bool:
        """Load the classifiers the last accepted training replaced; False when there are none."""
        if not self.previous_classifiers:
            return False
        previous = self.previous_classifiers.pop()
        self.load_classifiers(previous, "Reverted: no classifiers were loaded before the training.")
        if previous is None:
            # The child still holds the trained classifiers: unload them there too.
            engine = self._ensure_engine()
            self.runner.submit(
                "unloading classifiers",
                lambda: engine.load_classifiers([]),
                lambda _: None,
                kind=MODEL_LANE,
                supersede=False,
            )
        self.repredict()
        return True

    def repredict(self) -> Job:
        """Predict every embedded node and segment again with the loaded classifiers.

        Queued behind the classifier load on the same worker; the new predictions go
        into the records, the plot and (for the selected segment) the 3-D view.
        """
        engine = self._ensure_engine()
        records = [
            r
            for r in self.state.records.values()
            if r.embedded is not None and r.embedded.any() and r.positions_nm is not None and r.embeddings is not None
        ]

        def make():
            results = []
            for index, record in enumerate(records):
                assert record.embedded is not None and record.positions_nm is not None
                assert record.embeddings is not None
                rows = np.flatnonzero(record.embedded)
                predictions = engine.predict(record.positions_nm[rows], record.embeddings[rows])
                results.append((record, rows, predictions))
                yield Progress(index + 1, len(records), "segments", f"segment {record.segment_id}")
            return results

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                for record, rows, predictions in update.result:
                    self._apply_predictions(record, rows, predictions)
                self.session.replay_into_plot([record for record, _, _ in update.result])
                self.state.show_status(f"Predictions refreshed for {len(update.result)} segments.")
            elif update.event == "failed":
                self.state.show_error(f"Predicting again failed: {update.error}")

        return self.runner.submit("predicting again", make, on_update, kind=MODEL_LANE, supersede=False)

    def _apply_predictions(self, record: SegmentRecord, rows: np.ndarray, predictions) -> None:
        n = record.n_centres
        calls = None if predictions is None else predictions.compartments
        cell = None if predictions is None else predictions.cell_type
        record.predicted = record.predicted_probability = record.predicted_uncertainty = None
        if calls is not None:
            # Rows never embedded stay "not predicted" (255, NaN), as during embedding.
            at = rows[np.asarray(calls.indices, dtype=np.int64)]
            predicted = np.full(n, 255, np.uint8)
            probability = np.full(n, np.nan, np.float32)
            uncertainty = np.full(n, np.nan, np.float32)
            predicted[at], probability[at], uncertainty[at] = calls.codes, calls.probability, calls.uncertainty
            record.predicted, record.predicted_probability, record.predicted_uncertainty = (
                predicted,
                probability,
                uncertainty,
            )
        record.cell_type = None if cell is None else cell.name
        record.cell_type_probability = None if cell is None else min(max(cell.probability, 0.0), 1.0)
        record.cell_type_probabilities = None if cell is None else cell.probabilities
        record.ood_score = None if cell is None else cell.ood_score
        record.ood_flagged = None if cell is None else cell.ood_flagged
        record.ood_threshold = None if cell is None else cell.threshold
        record.prediction_note = "" if predictions is None else predictions.note
        if self.state.segment is record:
            # The 3-D view and the info panel follow the selected segment's events.
            self.state.set_predictions(record.segment_id, note=record.prediction_note)
            self.state.announce_batch(record.segment_id, rows)

    # -- active learning -----------------------------------------------------------------------

    def suggest_next(self, on_ready: Callable[[list[tuple[int, int]]], Any] | None = None, *, count: int = 20):
        """Rank unlabelled embedded nodes by the loaded classifier's uncertainty (in the child).

        Uses the compartment classifier when one is loaded, else the cell-type one. The
        ranking lands in :attr:`suggestions`; the first is selected (:meth:`next_suggestion`).
        """
        from segscope.app.compute_process import SuggestNext

        summary = self.state.classifiers
        if summary is None or (summary.compartment is None and summary.cell_type is None):
            self.state.show_error("Suggest next needs a loaded classifier: train or load one first.")
            return None
        try:
            nodes = self.embedded_nodes()
        except ValueError as exc:
            self.state.show_error(str(exc))
            return None
        task = "compartment" if summary.compartment is not None else "cell_type"
        request = SuggestNext(
            task,
            nodes["segment_ids"],
            nodes["positions_nm"],
            nodes["embeddings"],
            nodes["labels"] != "",
            count,
            label_names=nodes["labels"],
        )
        engine = self._ensure_engine()

        def make():
            yield Progress(0, 1, "steps", "ranking by uncertainty")
            return engine.suggest_next(request)

        def on_update(update: JobUpdate) -> None:
            if update.event == "finished":
                picks = update.result
                self.suggestions = [(int(nodes["segment_ids"][i]), int(nodes["node_ids"][i])) for i in picks]
                self.suggestion_index = -1
                if not self.suggestions:
                    self.state.show_status("Nothing to suggest: every embedded node is labelled.")
                else:
                    self.next_suggestion()
                if on_ready is not None:
                    on_ready(self.suggestions)
            elif update.event == "failed":
                self.state.show_error(f"Suggest next failed: {update.error}")

        return self.runner.submit("suggesting nodes", make, on_update, kind=SUGGEST_LANE, supersede=True)

    def next_suggestion(self) -> tuple[int, int] | None:
        """Select the next suggested node in the plot (and so in 3-D); None at the end."""
        plot = self.session.plot
        while self.suggestion_index + 1 < len(self.suggestions):
            self.suggestion_index += 1
            segment_id, node_id = self.suggestions[self.suggestion_index]
            row = int(plot.rows_of(segment_id, [node_id])[0])
            if row < 0:
                continue
            plot.select_rows([row], "plot")
            self.state.show_status(
                f"Suggestion {self.suggestion_index + 1} of {len(self.suggestions)}: node {node_id} of "
                f"segment {segment_id}; label it, then Suggest next again."
            )
            return segment_id, node_id
        self.state.show_status("No more suggestions: run Suggest next again after labelling.")
        return None

    def shutdown(self) -> None:
        """Stop the workers and the compute process (idempotent).

        A save in flight completes, and a clean exit leaves no autosave to recover.
        """
        if self._closed:
            return
        self._closed = True
        self.runner.shutdown(wait=True, timeout=5.0)
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        self.analysis_runner.shutdown(wait=True, timeout=5.0)
        self.io_runner.shutdown(wait=True, timeout=30.0)
        if self.autosave is not None:
            self.autosave.finish()
