"""SegScope's session state: plain data plus observer callbacks, no Qt.

The views (Qt panels, the Neuroglancer bridge) subscribe to named events and redraw from
the state; controllers mutate it. The state is not thread-safe on purpose: every mutation
happens on one thread (the Qt main thread in the app), and work done elsewhere reaches it
through :class:`segscope.app.jobs.JobRunner`'s ``post``.

Events and their callback arguments
-----------------------------------
``"dataset"``     (DatasetSummary)          a dataset was opened
``"model"``       (ModelSummary or None)     the encoder changed (None: no encoder)
``"segment"``     (SegmentRecord or None)    a segment was selected (None: cleared)
``"centres"``     (SegmentRecord)            the selected segment's centres are known
``"embeddings"``  (SegmentRecord, indices)   embeddings of centres ``indices`` arrived
``"predictions"`` (SegmentRecord)            classifier outputs changed
``"node_batch"``  (NodeBatch)                a batch of nodes got embeddings (and their
                                             predictions, when classifiers are loaded);
                                             emitted after ``"embeddings"`` and
                                             ``"predictions"`` of that batch. This is the
                                             hook for views that plot embeddings.
``"classifiers"`` (ClassifierSummary or None) the classifiers changed (None: none loaded)
``"job"``         (JobStatus or None)        the embedding job's progress changed
``"status"``      (str)                      a transient message for the status bar
``"error"``       (str)                      an error the user should read
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from psygnal import Signal, SignalGroup

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT
from segscope.analysis.artefacts import ClassifierSummary
from segscope.app.events import connect

log = logging.getLogger(__name__)


class SessionStateEvents(SignalGroup):
    """Typed events of :class:`SessionState` (arguments as in the module docstring)."""

    dataset = Signal(object)
    model = Signal(object)
    classifiers = Signal(object)
    segment = Signal(object)
    centres = Signal(object)
    embeddings = Signal(object, object)
    predictions = Signal(object)
    node_batch = Signal(object)
    job = Signal(object)
    status = Signal(str)
    error = Signal(str)


EVENTS: tuple[str, ...] = tuple(SessionStateEvents().signals)


class Observable:
    """A model whose events are a psygnal group on ``.events`` (see :mod:`segscope.app.events`)."""

    events: SessionStateEvents

    def subscribe(self, event: str, callback: Callable[..., Any]) -> Callable[[], None]:
        """Call ``callback(*args)`` on every ``event``; returns a function that unsubscribes.

        Raises
        ------
        KeyError
            For an event name this object never emits.
        """
        if event not in EVENTS:
            raise KeyError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
        return connect(self.events[event], callback)

    def _emit(self, event: str, *args: Any) -> None:
        self.events[event].emit(*args)


@dataclass(frozen=True)
class DatasetSummary:
    """What is open: sources (as given) and their geometry.

    Attributes
    ----------
    name : str
    image_url, segmentation_url : str
    skeletons_url : str or None
    voxel_size_nm : tuple of float
        ``(x, y, z)`` nm.
    shape_vox : tuple of int
        ``(x, y, z)`` voxels.
    has_ground_truth : bool
        Whether skeletons carry ground-truth compartment labels (the synthetic demo does).
    """

    name: str
    image_url: str
    segmentation_url: str
    skeletons_url: str | None
    voxel_size_nm: tuple[float, float, float]
    shape_vox: tuple[int, int, int]
    has_ground_truth: bool = False


@dataclass(frozen=True)
class ModelSummary:
    """The encoder in use.

    Attributes
    ----------
    name : str
        Architecture name (``"segscope_lite"``...).
    source : str
        Where the weights came from (a path).
    trained : bool
        False for randomly initialised weights (test plumbing only).
    embedding_dim : int
    input_size_vox : tuple of int
        Cutout size ``(x, y, z)`` in model voxels.
    voxel_size_nm : tuple of float
        Model voxel size ``(x, y, z)`` nm.
    precision : str
        What the encoder computes in: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    name: str
    source: str
    trained: bool
    embedding_dim: int
    input_size_vox: tuple[int, int, int]
    voxel_size_nm: tuple[float, float, float]
    precision: str = "float32"


@dataclass(frozen=True)
class NodeBatch:
    """Nodes of the selected segment that just got embeddings (``"node_batch"`` event).

    Arrays of length ``b`` follow ``indices`` (positions in the segment's centre order).

    Attributes
    ----------
    segment_id : int
    indices : numpy.ndarray
        int64 ``[b]``.
    node_ids : numpy.ndarray
        int64 ``[b]`` skeleton (or store) node ids.
    positions_nm : numpy.ndarray
        float64 ``[b, 3]`` xyz nm.
    embeddings : numpy.ndarray
        float32 ``[b, D]``.
    predicted : numpy.ndarray or None
        uint8 ``[b]`` predicted compartment codes (255: none); None without a
        compartment classifier.
    embedding_source : str
        ``"computed"`` or ``"precomputed"``.
    """

    segment_id: int
    indices: np.ndarray
    node_ids: np.ndarray
    positions_nm: np.ndarray
    embeddings: np.ndarray
    predicted: np.ndarray | None
    embedding_source: str


@dataclass
class SegmentRecord:
    """The selected segment and everything known about it so far.

    Centres are ordered nearest to the click first. Arrays of length ``N`` are per centre.

    Attributes
    ----------
    segment_id : int
    click_nm : numpy.ndarray or None
        float64 ``[3]`` xyz nm of the click that selected it.
    node_ids : numpy.ndarray or None
        int64 ``[N]`` skeleton node index of each centre; None until the centres are known.
    positions_nm : numpy.ndarray or None
        float64 ``[N, 3]`` xyz nm.
    skeleton_node_count : int
        Nodes in the full skeleton (before thinning to SegCLR's spacing); 0 without one.
    ground_truth : numpy.ndarray or None
        uint8 ``[N]`` compartment codes the *dataset* carries (the synthetic demo's labels,
        255 unlabelled). Ground truth, never a prediction.
    embeddings : numpy.ndarray or None
        float32 ``[N, D]``; rows not yet embedded are NaN.
    embedded : numpy.ndarray or None
        bool ``[N]``: which rows of ``embeddings`` arrived.
    embedding_source : str
        ``"computed"`` (this session's encoder) or ``"precomputed"`` (a CSV ZIP).
    predicted : numpy.ndarray or None
        uint8 ``[N]`` predicted compartment codes (255 not yet); None without a
        subcompartment classifier.
    predicted_probability, predicted_uncertainty : numpy.ndarray or None
        float32 ``[N]``: probability of the predicted compartment and its Dempster-Shafer
        uncertainty (NaN not yet predicted).
    cell_type, cell_type_probability : str, float or None
        The segment's predicted cell type (highest mean probability over its nodes) and
        that mean probability; None without a cell-type classifier.
    cell_type_probabilities : dict or None
        Mean probability of every cell type over the segment's nodes.
    ood_score, ood_flagged : float, bool or None
        Out-of-distribution score (mean Dempster-Shafer uncertainty of the cell-type
        predictions over the nodes) and whether it exceeds ``ood_threshold``; None
        without a classifier that estimates it.
    ood_threshold : float or None
    prediction_note : str
        Why predictions are missing or partial (empty when all is well).
    """

    segment_id: int
    click_nm: np.ndarray | None = None
    node_ids: np.ndarray | None = None
    positions_nm: np.ndarray | None = None
    skeleton_node_count: int = 0
    ground_truth: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    embedded: np.ndarray | None = None
    embedding_source: str = "computed"
    predicted: np.ndarray | None = None
    predicted_probability: np.ndarray | None = None
    predicted_uncertainty: np.ndarray | None = None
    cell_type: str | None = None
    cell_type_probability: float | None = None
    cell_type_probabilities: dict[str, float] | None = None
    ood_score: float | None = None
    ood_flagged: bool | None = None
    ood_threshold: float | None = None
    prediction_note: str = ""

    @property
    def n_centres(self) -> int:
        """Centres known so far (0 until they are computed)."""
        return 0 if self.node_ids is None else len(self.node_ids)

    @property
    def n_embedded(self) -> int:
        return 0 if self.embedded is None else int(self.embedded.sum())

    @property
    def complete(self) -> bool:
        """True once every centre has an embedding."""
        return self.n_centres > 0 and self.n_embedded == self.n_centres

    def compartment_counts(self, which: str = "ground_truth") -> dict[str, int] | None:
        """Centres per compartment name (plus ``"unlabelled"``), or None without labels.

        ``which`` is ``"ground_truth"`` or ``"predicted"``.
        """
        if which not in ("ground_truth", "predicted"):
            raise ValueError(f"which must be 'ground_truth' or 'predicted', got {which!r}")
        codes = getattr(self, which)
        if codes is None:
            return None
        counts = {name: int(np.count_nonzero(codes == code)) for code, name in enumerate(COMPARTMENTS)}
        counts["unlabelled"] = int(len(codes) - sum(counts.values()))
        return counts


@dataclass(frozen=True)
class JobStatus:
    """Progress of the current embedding job as the job bar shows it.

    ``state`` is ``"queued"``, ``"running"``, ``"cancelling"``, ``"finished"``,
    ``"cancelled"`` or ``"failed"``; ``rate`` is units per second.
    """

    job_id: int
    #: What the job does, as the bar starts its line ("Embedding segment 123").
    name: str
    state: str
    done: int = 0
    total: int = 0
    unit: str = ""
    rate: float | None = None
    message: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "cancelling")


@dataclass(eq=False)
class SessionState(Observable):
    """Everything the app shows, as plain data. Mutate only from one thread.

    ``segment`` is the selected segment's record; ``records`` archives every segment
    selected since the dataset opened (segment id -> record, the selected one included)
    plus records put back with :meth:`restore_record`.
    """

    dataset: DatasetSummary | None = None
    model: ModelSummary | None = None
    model_message: str = ""
    classifiers: ClassifierSummary | None = None
    classifiers_message: str = ""
    segment: SegmentRecord | None = None
    #: Every segment selected since the dataset opened, by id (the selected one included),
    #: so labels and exports can reach segments the user has moved on from.
    records: dict[int, SegmentRecord] = field(default_factory=dict)
    job: JobStatus | None = None
    status_message: str = ""
    last_error: str | None = None
    events: SessionStateEvents = field(default_factory=SessionStateEvents, repr=False, compare=False)

    # -- what is open ------------------------------------------------------------------

    def set_dataset(self, summary: DatasetSummary) -> None:
        self.dataset = summary
        self.segment = None
        self.records.clear()  # segment ids mean nothing in another dataset
        self._emit("dataset", summary)
        self._emit("segment", None)

    def set_model(self, summary: ModelSummary | None, message: str = "") -> None:
        """Record the encoder in use (None: embedding unavailable, ``message`` says why)."""
        self.model = summary
        self.model_message = message
        self._emit("model", summary)

    @property
    def classifiers_loaded(self) -> bool:
        """True while at least one classifier is loaded."""
        return self.classifiers is not None and (
            self.classifiers.compartment is not None or self.classifiers.cell_type is not None
        )

    def set_classifiers(self, summary: ClassifierSummary | None, message: str = "") -> None:
        """Record the classifiers in use (None: no predictions, ``message`` says why)."""
        self.classifiers = summary
        self.classifiers_message = message
        self._emit("classifiers", summary)

    # -- the selected segment ----------------------------------------------------------

    def select_segment(self, segment_id: int, click_nm=None) -> SegmentRecord:
        """Select a segment (replacing the previous selection) and return its record.

        The new record also goes into :attr:`records`, replacing an older record of the
        same id (selecting a segment again recomputes it from scratch).
        """
        segment_id = int(segment_id)
        if not 0 < segment_id < 2**64:
            raise ValueError(f"segment id {segment_id} is not a nonzero uint64")
        click = None if click_nm is None else np.asarray(click_nm, dtype=np.float64).reshape(3)
        self.segment = SegmentRecord(segment_id=segment_id, click_nm=click)
        self.records[segment_id] = self.segment
        self._emit("segment", self.segment)
        return self.segment

    def restore_record(self, record: SegmentRecord) -> None:
        """Put a finished record (from a saved session) into :attr:`records` without selecting it.

        Replaces an archived record of the same id; emits nothing.

        Raises
        ------
        TypeError
            When ``record`` is not a :class:`SegmentRecord`.
        ValueError
            For a segment id that is not a nonzero uint64, or the id of the selected
            segment (its live record is the archived one; replacing it would drop work).
        """
        if not isinstance(record, SegmentRecord):
            raise TypeError(f"restore_record takes a SegmentRecord, got {type(record).__name__}")
        segment_id = int(record.segment_id)
        if not 0 < segment_id < 2**64:
            raise ValueError(f"segment id {segment_id} is not a nonzero uint64")
        if self.segment is not None and self.segment.segment_id == segment_id and self.segment is not record:
            raise ValueError(f"segment {segment_id} is selected; clear the selection before restoring its record")
        self.records[segment_id] = record

    def show_record(self, record: SegmentRecord) -> None:
        """Make a finished record (a restored session's) the selected segment.

        Nothing is embedded: emits ``"segment"``, then ``"centres"``, ``"embeddings"`` (all
        embedded rows) and ``"predictions"`` as a live job would have.
        """
        if not isinstance(record, SegmentRecord):
            raise TypeError(f"show_record takes a SegmentRecord, got {type(record).__name__}")
        self.segment = record
        self.records[int(record.segment_id)] = record
        self._emit("segment", record)
        if record.node_ids is not None:
            self._emit("centres", record)
        if record.embedded is not None and record.embedded.any():
            self._emit("embeddings", record, np.flatnonzero(record.embedded))
        self._emit("predictions", record)

    def clear_segment(self) -> None:
        self.segment = None
        self._emit("segment", None)

    def _current(self, segment_id: int) -> SegmentRecord | None:
        if self.segment is None or self.segment.segment_id != int(segment_id):
            log.debug("ignoring data for segment %s: not selected", segment_id)
            return None
        return self.segment

    def set_centres(
        self,
        segment_id: int,
        node_ids: np.ndarray,
        positions_nm: np.ndarray,
        *,
        skeleton_node_count: int = 0,
        ground_truth: np.ndarray | None = None,
        embedding_source: str = "computed",
    ) -> bool:
        """Give the selected segment its centres (nearest the click first).

        Returns False (and changes nothing) when ``segment_id`` is not the selection.

        Raises
        ------
        ValueError
            When the arrays disagree in length or shape.
        """
        record = self._current(segment_id)
        if record is None:
            return False
        node_ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions_nm, dtype=np.float64)
        if positions.shape != (len(node_ids), 3):
            raise ValueError(f"positions_nm must be [{len(node_ids)}, 3], got {positions.shape}")
        if ground_truth is not None:
            ground_truth = np.asarray(ground_truth, dtype=np.uint8).reshape(-1)
            if len(ground_truth) != len(node_ids):
                raise ValueError(f"{len(ground_truth)} ground-truth codes for {len(node_ids)} centres")
        record.node_ids = node_ids
        record.positions_nm = positions
        record.skeleton_node_count = int(skeleton_node_count)
        record.ground_truth = ground_truth
        record.embedding_source = embedding_source
        record.embeddings = None
        record.embedded = np.zeros(len(node_ids), dtype=bool)
        record.predicted = record.predicted_probability = record.predicted_uncertainty = None
        record.cell_type = record.cell_type_probability = record.cell_type_probabilities = None
        record.ood_score = record.ood_flagged = record.ood_threshold = None
        record.prediction_note = ""
        self._emit("centres", record)
        return True

    def add_embeddings(self, segment_id: int, indices: np.ndarray, embeddings: np.ndarray) -> bool:
        """Store embeddings of centres ``indices`` (positions in the centre order).

        Returns False (and changes nothing) when ``segment_id`` is not the selection.

        Raises
        ------
        ValueError
            Before the centres are known, for indices out of range, or for a shape or
            width that does not match earlier batches.
        """
        record = self._current(segment_id)
        if record is None:
            return False
        if record.node_ids is None or record.embedded is None:
            raise ValueError(f"segment {segment_id}: embeddings arrived before its centres")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.asarray(embeddings, dtype=np.float32)
        if values.ndim != 2 or len(values) != len(indices):
            raise ValueError(f"embeddings must be [{len(indices)}, D], got {values.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= record.n_centres):
            raise ValueError(
                f"centre indices must lie in [0, {record.n_centres}), got [{indices.min()}, {indices.max()}]"
            )
        if record.embeddings is None:
            record.embeddings = np.full((record.n_centres, values.shape[1]), np.nan, dtype=np.float32)
        elif record.embeddings.shape[1] != values.shape[1]:
            raise ValueError(
                f"embedding width {values.shape[1]} differs from earlier batches ({record.embeddings.shape[1]})"
            )
        record.embeddings[indices] = values
        record.embedded[indices] = True
        self._emit("embeddings", record, indices)
        return True

    def set_predictions(
        self,
        segment_id: int,
        *,
        predicted: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        probability: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
        cell_type: str | None = None,
        cell_type_probability: float | None = None,
        cell_type_probabilities: dict[str, float] | None = None,
        ood_score: float | None = None,
        ood_flagged: bool | None = None,
        ood_threshold: float | None = None,
        note: str | None = None,
    ) -> bool:
        """Store classifier outputs for the selected segment.

        Compartments: ``predicted`` holds uint8 codes (indexing ``analysis.COMPARTMENTS``,
        255: not predicted), ``probability`` and ``uncertainty`` the predicted class's
        probability and Dempster-Shafer uncertainty. Without ``indices`` they cover every
        centre (``[N]``); with ``indices`` (int ``[b]``, positions in the centre order)
        only those centres, the others keep what they had. Cell type: its name, mean
        probability over the nodes, every class's mean probability, the OOD score, flag
        and threshold. ``note`` says why predictions are missing. One ``"predictions"``
        event per call. Returns False when ``segment_id`` is not the selection.

        Raises
        ------
        ValueError
            For lengths that do not match the centres or ``indices``, codes outside
            ``analysis.COMPARTMENTS`` (other than 255), indices out of range, or a
            probability outside [0, 1].
        """
        record = self._current(segment_id)
        if record is None:
            return False
        if predicted is not None:
            predicted = np.asarray(predicted, dtype=np.uint8).reshape(-1)
            if indices is None:
                if len(predicted) != record.n_centres:
                    raise ValueError(f"{len(predicted)} predictions for {record.n_centres} centres")
                rows = np.arange(record.n_centres)
            else:
                rows = np.asarray(indices, dtype=np.int64).reshape(-1)
                if len(rows) != len(predicted):
                    raise ValueError(f"{len(predicted)} predictions for {len(rows)} indices")
                if len(rows) and (rows.min() < 0 or rows.max() >= record.n_centres):
                    raise ValueError(
                        f"centre indices must lie in [0, {record.n_centres}), got [{rows.min()}, {rows.max()}]"
                    )
            bad = (predicted >= len(COMPARTMENTS)) & (predicted != UNKNOWN_COMPARTMENT)
            if bad.any():
                raise ValueError(
                    f"compartment codes must index {COMPARTMENTS} or be "
                    f"{UNKNOWN_COMPARTMENT}, got {sorted(set(predicted[bad].tolist()))}"
                )
            extras = {}
            for name, values in (("predicted_probability", probability), ("predicted_uncertainty", uncertainty)):
                if values is not None:
                    values = np.asarray(values, dtype=np.float32).reshape(-1)
                    if len(values) != len(rows):
                        raise ValueError(f"{len(values)} {name.split('_')[1]} values for {len(rows)} predictions")
                    extras[name] = values
            if record.predicted is None:
                record.predicted = np.full(record.n_centres, UNKNOWN_COMPARTMENT, dtype=np.uint8)
            record.predicted[rows] = predicted
            for name, values in extras.items():
                if getattr(record, name) is None:
                    setattr(record, name, np.full(record.n_centres, np.nan, dtype=np.float32))
                getattr(record, name)[rows] = values
        if cell_type_probability is not None and not 0.0 <= cell_type_probability <= 1.0:
            raise ValueError(f"cell-type probability must lie in [0, 1], got {cell_type_probability}")
        if cell_type is not None:
            record.cell_type = cell_type
            record.cell_type_probability = None if cell_type_probability is None else float(cell_type_probability)
            record.cell_type_probabilities = (
                None
                if cell_type_probabilities is None
                else {str(k): float(v) for k, v in cell_type_probabilities.items()}
            )
        if ood_score is not None:
            record.ood_score = float(ood_score)
            record.ood_flagged = bool(ood_flagged)
            record.ood_threshold = None if ood_threshold is None else float(ood_threshold)
        if note is not None:
            record.prediction_note = note
        self._emit("predictions", record)
        return True

    def announce_batch(self, segment_id: int, indices: np.ndarray) -> bool:
        """Emit ``"node_batch"`` for centres ``indices`` of the selected segment.

        Call once a batch's embeddings (and predictions, when any) are stored, so plot
        views receive everything about those nodes in one event. Returns False when
        ``segment_id`` is not the selection or the batch holds no embedded centre.
        """
        record = self._current(segment_id)
        if record is None or record.embeddings is None or record.embedded is None:
            return False
        if record.node_ids is None or record.positions_nm is None:
            return False  # embeddings arrive only after the centres; never true here
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = rows[record.embedded[rows]]
        if not len(rows):
            return False
        batch = NodeBatch(
            segment_id=record.segment_id,
            indices=rows,
            node_ids=record.node_ids[rows].copy(),
            positions_nm=record.positions_nm[rows].copy(),
            embeddings=record.embeddings[rows].copy(),
            predicted=None if record.predicted is None else record.predicted[rows].copy(),
            embedding_source=record.embedding_source,
        )
        self._emit("node_batch", batch)
        return True

    # -- jobs and messages -------------------------------------------------------------

    def set_job(self, status: JobStatus | None) -> None:
        self.job = status
        self._emit("job", status)

    def update_job(self, job_id: int, **changes: Any) -> None:
        """Change fields of the current job's status; ignored for another job."""
        if self.job is None or self.job.job_id != job_id:
            return
        self.set_job(replace(self.job, **changes))

    def show_status(self, message: str) -> None:
        self.status_message = message
        self._emit("status", message)

    def show_error(self, message: str) -> None:
        self.last_error = message
        log.warning("%s", message)
        self._emit("error", message)
