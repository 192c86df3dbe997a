"""The session model: one Qt-free object that owns everything a SegScope session is.

:class:`Session` composes the sub-models, as napari's ``ViewerModel`` composes its layers:

* ``state`` (:class:`~segscope.app.state.SessionState`): the dataset summary, encoder and
  classifiers in use, per-segment records (centres, embeddings, predictions; one record per
  analysed segment), the embedding job's progress, status and errors;
* ``labels`` (:class:`~segscope.app.labels.LabelStore`): manual labels with undo/redo;
* ``plot`` (:class:`~segscope.app.plot_controller.PlotController`): the plotted points (the
  context table and the records' embedded nodes), their layout and colours, the plot
  selection, the colour mode and the hidden segments;
* its own fields: the open data ``source`` and its ``precomputed`` embedding store, the
  encoder path asked for (``model_path``), the session file (``path``) and the plot view
  (``plot_view``: tool and view range, kept up to date by the plot view).

The sub-models are linked here, not in the views: records' new node batches and predictions
reach the plot, labels colour the plot's points, new data clears labels and points. Every
change is announced by a typed psygnal event (``session.events.*``, ``session.state.events.*``,
``session.labels.events.changed``, ``session.plot.events.*``); connect through
:func:`segscope.app.events.connect`. Long work (opening data, embedding, saving, exporting)
is done by :class:`segscope.app.service.SessionService`, which mutates this model on one
thread (the Qt main thread in the app).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalGroup

from segscope.analysis.artefacts import local_folder
from segscope.app.events import connect
from segscope.app.labels import LabelStore
from segscope.app.plot_controller import SESSION_ORIGIN, VIEW_3D_ORIGIN, PlotController
from segscope.app.state import SegmentRecord, SessionState

if TYPE_CHECKING:  # imported lazily at run time: both pull in TensorStore-side modules
    from segscope.app.controller import DataSource, PrecomputedEmbeddings
    from segscope.app.session_file import SessionDocument

log = logging.getLogger(__name__)


class SessionEvents(SignalGroup):
    """Typed events of :class:`Session`'s own fields."""

    #: (DataSource) new data was adopted (the dataset summary follows on ``state.events.dataset``).
    source = Signal(object)
    #: (Path or None) the session file changed (saved, opened).
    path = Signal(object)
    #: (dict) saved plot settings to show: ``colour_mode``, ``tool``, ``view_range``, ``hidden_segments``.
    plot_settings = Signal(dict)
    #: (SessionDocument, list of SegmentRecord) a saved session was restored.
    restored = Signal(object, object)
    #: (Path, ExportResult) an export bundle was written.
    exported = Signal(object, object)


def _local_or_url(text: str | None) -> str | None:
    """Absolute path for a local path or ``file://`` URL; other URLs as given.

    Local sources are read as :func:`~segscope.analysis.artefacts.local_folder` reads them
    (a ``precomputed://`` prefix dropped), so one folder named two ways compares equal.
    """
    if text is None:
        return None
    folder = local_folder(str(text))
    return str(text) if folder is None else str(folder.resolve())


class Session:
    """Everything one SegScope session holds (see the module docstring).

    Not thread-safe: mutate from one thread.

    Parameters
    ----------
    plot
        The plot model to use (a fresh :class:`PlotController` by default).
    """

    def __init__(self, *, plot: PlotController | None = None) -> None:
        self.events = SessionEvents()
        self.state = SessionState()
        self.labels = LabelStore()
        self.plot = plot if plot is not None else PlotController()
        self.source: DataSource | None = None
        self.precomputed: PrecomputedEmbeddings | None = None
        #: The encoder asked for last (saved sessions record it); None: no encoder.
        self.model_path: Path | None = None
        #: Where the session was saved or opened from.
        self.path: Path | None = None
        #: The plot view's tool and view range (``{"tool": ..., "view_range": [[x0, x1], [y0, y1]]}``).
        self.plot_view: dict[str, Any] = {}
        self._link()

    # -- links between the sub-models ------------------------------------------------------

    def _link(self) -> None:
        state, plot, labels = self.state, self.plot, self.labels
        plot.label_lookup = labels.effective_node_labels
        connect(state.events.dataset, self._on_dataset)
        connect(state.events.node_batch, self._on_node_batch)
        connect(state.events.predictions, self._on_predictions)
        connect(state.events.classifiers, self._on_classifiers)
        connect(state.events.segment, self._on_segment)
        connect(labels.events.changed, lambda _change: plot.refresh_manual_labels())

    def _on_dataset(self, _summary) -> None:
        # Segment ids mean nothing in other data: labels and points of the old data go
        # (not undoable).
        self.labels.reset()
        self.plot.clear()

    def _on_node_batch(self, batch) -> None:
        new = self.plot.add_points(
            batch.segment_id, batch.node_ids, batch.positions_nm, batch.embeddings, compartments=batch.predicted
        )
        record = self.state.records.get(int(batch.segment_id))
        if len(new) and record is not None and (record.cell_type is not None or record.ood_score is not None):
            # The batch's predictions were announced before its points existed: the new
            # points take the segment's current call too.
            self.plot.set_segment_labels(record.segment_id, cell_type=record.cell_type, ood_score=record.ood_score)

    def _on_predictions(self, record: SegmentRecord | None) -> None:
        if record is None:
            return
        self.plot.set_segment_labels(record.segment_id, cell_type=record.cell_type, ood_score=record.ood_score)
        if record.predicted is not None and record.embedded is not None and record.node_ids is not None:
            # Compartments may be revised for nodes already plotted (smoothing over a segment).
            embedded = record.embedded
            self.plot.set_compartments(record.segment_id, record.node_ids[embedded], record.predicted[embedded])

    def _on_classifiers(self, summary) -> None:
        info = None if summary is None else summary.cell_type
        self.plot.cell_type_class_names = () if info is None else tuple(info.class_names)

    def _on_segment(self, record: SegmentRecord | None) -> None:
        # A segment chosen in 3-D (double click): its points light up in the plot.
        self.plot.select_segments(() if record is None else (record.segment_id,), VIEW_3D_ORIGIN)

    # -- own fields ------------------------------------------------------------------------

    def set_source(self, source: DataSource, precomputed: PrecomputedEmbeddings | None = None) -> None:
        """Adopt opened data: ``source`` and its CSV ZIP store (``precomputed``, or None).

        A store opened with earlier data is dropped, since segment ids mean something only
        within one dataset. Emits ``events.source``, then ``state.events.dataset``.
        """
        self.source = source
        self.precomputed = precomputed
        self.events.source.emit(source)
        self.state.set_dataset(source.summary())
        self.state.set_job(None)

    def set_path(self, path: str | Path | None) -> None:
        """Record where the session is saved (None: not saved yet)."""
        self.path = None if path is None else Path(path)
        self.events.path.emit(self.path)

    def current_segment_id(self) -> int | None:
        """The selected segment's id (None: none selected)."""
        return None if self.state.segment is None else int(self.state.segment.segment_id)

    # -- records ---------------------------------------------------------------------------

    def records(self) -> list[SegmentRecord]:
        """The analysed segments that have at least one embedding, by id."""
        return [record for _, record in sorted(self.state.records.items()) if record.n_embedded]

    def records_snapshot(self) -> dict[int, SegmentRecord]:
        """Copies of :meth:`records` (segment id -> record) for a worker to read.

        The session goes on changing on this thread meanwhile (numpy copies: milliseconds).
        """
        return {record.segment_id: copy.deepcopy(record) for record in self.records()}

    # -- saved sessions --------------------------------------------------------------------

    def plot_settings(self) -> dict[str, Any]:
        """JSON-safe plot settings: colour mode, hidden segments, and the view's tool and range."""
        return {
            **self.plot_view,
            "colour_mode": self.plot.colour_mode,
            "hidden_segments": sorted(self.plot.hidden_segments),
            "hidden_classes": self.plot.hidden_classes_by_mode(),
        }

    def document(self) -> SessionDocument:
        """Describe the session as a :class:`segscope.app.session_file.SessionDocument`.

        Raises
        ------
        ValueError
            When no data is open.
        """
        from segscope.app.session_file import DatasetRef, PrecomputedRef, SessionDocument

        if self.source is None or self.state.dataset is None:
            raise ValueError("no data is open: nothing to save")
        plot = self.plot
        rows = plot.selected_rows
        classifiers = self.state.classifiers
        return SessionDocument(
            dataset=DatasetRef.from_summary(self.state.dataset),
            precomputed=None if self.precomputed is None else PrecomputedRef.from_embeddings(self.precomputed),
            model_path=None if self.model_path is None else str(self.model_path),
            classifiers_folder=None if classifiers is None else str(classifiers.folder),
            current_segment=self.current_segment_id(),
            selected_segments=sorted(int(s) for s in plot.selected_segments),
            selected_nodes=[
                [int(s), int(n)] for s, n in zip(plot.segment_ids[rows].tolist(), plot.node_ids[rows].tolist())
            ],
            labels=self.labels.to_dict(),
            plot=self.plot_settings(),
        )

    def has_same_data(self, document: SessionDocument) -> bool:
        """Whether ``document`` was saved on the data open now (paths compared resolved)."""
        if self.source is None:
            return False
        dataset = document.dataset
        return _local_or_url(dataset.image_url) == _local_or_url(self.source.image_url) and _local_or_url(
            dataset.segmentation_url
        ) == _local_or_url(self.source.segmentation_url)

    def restore(self, document: SessionDocument, records: list[SegmentRecord]) -> list[SegmentRecord]:
        """Show a loaded session on the data open now.

        Its records (plotted with their predictions), labels, current segment, selection
        and plot settings.

        The model and classifiers are the service's business (they load on a worker).
        Unreadable labels are reported on ``state.events.error`` and skipped. Returns the
        restored records; emits ``events.plot_settings`` and ``events.restored``.
        """
        state = self.state
        restored = []
        for record in records:
            if state.segment is not None and state.segment.segment_id == record.segment_id:
                state.clear_segment()  # the saved record replaces the live one of the same segment
            state.restore_record(record)
            restored.append(record)
        try:
            self.labels.load_dict(document.labels)
        except ValueError as exc:
            state.show_error(f"The session's labels are unreadable ({exc}); restored without them.")
        by_id = {record.segment_id: record for record in restored}
        if document.current_segment in by_id:
            state.show_record(by_id[document.current_segment])
        self.replay_into_plot(restored)
        self.apply_plot_settings(document.plot)
        if document.selected_nodes:
            segments, nodes = zip(*document.selected_nodes)
            rows = self.plot.rows_of(segments, nodes)
            self.plot.select_rows(rows[rows >= 0], origin=SESSION_ORIGIN)
        elif document.selected_segments:
            self.plot.select_segments(document.selected_segments, SESSION_ORIGIN)
        self.events.restored.emit(document, restored)
        return restored

    def apply_plot_settings(self, settings: dict[str, Any]) -> None:
        """Apply saved plot settings (:meth:`plot_settings`).

        The colour mode and hidden segments go to the plot model, the tool and view range
        to ``plot_view``; emits ``events.plot_settings`` for the plot view. Bad entries are
        logged and skipped.
        """
        from segscope.app.plot_controller import COLOUR_MODES

        mode = settings.get("colour_mode")
        if mode in COLOUR_MODES:
            self.plot.set_colour_mode(mode)
        elif mode is not None:
            log.warning("session plot settings: unknown colour mode %r ignored", mode)
        hidden = settings.get("hidden_segments")
        if hidden is not None:
            try:
                # Restored state, not an edit of the user's: nothing to undo.
                self.plot.hide_segments([int(s) for s in hidden], undoable=False)
            except (TypeError, ValueError):
                log.warning("session plot settings: bad hidden segment list %r ignored", hidden)
        classes = settings.get("hidden_classes")
        if classes is not None:
            try:
                self.plot.restore_hidden_classes(classes)
            except ValueError as exc:
                log.warning("session plot settings: %s; ignored", exc)
        self.plot_view = {key: settings[key] for key in ("tool", "view_range") if key in settings}
        self.events.plot_settings.emit(dict(settings))

    def replay_into_plot(self, records: list[SegmentRecord]) -> int:
        """Plot the embedded nodes of ``records`` with their predictions; returns points added."""
        added = 0
        for record in records:
            if record.embedded is None or not record.embedded.any():
                continue
            if record.node_ids is None or record.positions_nm is None or record.embeddings is None:
                continue
            rows = np.flatnonzero(record.embedded)
            compartments = None if record.predicted is None else record.predicted[rows]
            new = self.plot.add_points(
                record.segment_id,
                record.node_ids[rows],
                record.positions_nm[rows],
                record.embeddings[rows],
                compartments=compartments,
            )
            added += len(new)
            self.plot.set_segment_labels(record.segment_id, cell_type=record.cell_type, ood_score=record.ood_score)
        return added
