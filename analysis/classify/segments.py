"""Per-segment predictions from node embeddings as they arrive: compartments and cell type.

:class:`SegmentPredictor` runs the compartment and cell-type classifiers (SNGP, see
:mod:`segscope.analysis.classify`) over one segment's node embeddings batch by batch,
aggregating embeddings over the classifiers' radius (nm) with the nodes seen so far, so a
node is labelled the moment its embedding exists and the segment's cell type and
out-of-distribution score sharpen as more nodes arrive. The app's compute process and
``segscope embed --classifiers`` both use it (the same code, the same numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segscope.analysis import compartment_codes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompartmentCalls:
    """Predicted subcompartments of some centres of a segment.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 ``[b]``: positions in the segment's centre order.
    codes : numpy.ndarray
        uint8 ``[b]``: predicted compartment, indexing ``analysis.COMPARTMENTS``.
    probability : numpy.ndarray
        float32 ``[b]``: the predicted compartment's probability.
    uncertainty : numpy.ndarray
        float32 ``[b]``: Dempster-Shafer uncertainty in (0, 1).
    """

    indices: np.ndarray
    codes: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray


@dataclass(frozen=True)
class CellTypeCall:
    """A segment's cell type from the radius-aggregated embeddings of its nodes so far.

    ``probability`` is the winning class's mean probability over the nodes,
    ``probabilities`` every class's; ``ood_score`` the nodes' mean OOD score (the
    classifier's ``ood_score_kind``: Mahalanobis distance to the training classes, or
    Dempster-Shafer uncertainty for classifiers without a density) and ``ood_flagged``
    whether it exceeds the classifier's ``threshold``.
    """

    name: str
    probability: float
    probabilities: dict[str, float]
    ood_score: float
    ood_flagged: bool
    threshold: float
    n_nodes: int


@dataclass(frozen=True)
class Predictions:
    """Classifier outputs after one batch (either part None when not available)."""

    compartments: CompartmentCalls | None
    cell_type: CellTypeCall | None
    note: str = ""


class SegmentPredictor:
    """Turns a segment's node embeddings, as they arrive, into classifier outputs.

    Parameters
    ----------
    compartment, cell_type
        Objects with ``predict(embeddings [N, D]) -> segscope.analysis.classify.Prediction``,
        ``class_names``, ``num_features`` and ``ood_threshold`` (a
        :class:`segscope.analysis.classify.Classifier`), or None.
    compartment_radius_nm, cell_type_radius_nm
        Aggregation radius (nm) of the embeddings each classifier was trained on: 0 for
        node embeddings (each batch then only needs its own nodes predicted), otherwise
        every node so far is aggregated over its neighbours within the radius and
        predicted again, since new neighbours change old nodes' aggregates.

    Raises
    ------
    ValueError
        When the compartment classifier has a class that is not in
        ``analysis.COMPARTMENTS`` (the app colours nodes by those).
    """

    def __init__(
        self,
        compartment=None,
        cell_type=None,
        *,
        compartment_radius_nm: float = 0.0,
        cell_type_radius_nm: float = 10_000.0,
    ):
        self.compartment = compartment
        self.cell_type = cell_type
        self.compartment_radius_nm = float(compartment_radius_nm)
        self.cell_type_radius_nm = float(cell_type_radius_nm)
        # COMPARTMENTS code of each compartment class (none without a compartment classifier).
        self._codes: np.ndarray = np.zeros(0, dtype=np.uint8)
        if compartment is not None:
            self._codes = compartment_codes(compartment.class_names)
        self.start(np.zeros((0, 3)))

    @property
    def active(self) -> bool:
        return self.compartment is not None or self.cell_type is not None

    #: The segment's cell type is estimated again once its embedded nodes grew by this
    #: factor since the last estimate (and always on the last batch). Each estimate
    #: aggregates every node so far (about 0.4 s at 20k nodes), so estimating after every
    #: batch would cost O(N^2 / batch); geometric steps keep the total O(N log N).
    CELL_TYPE_GROWTH = 1.25

    def start(self, positions_nm: np.ndarray) -> None:
        """Begin a segment whose centres lie at ``positions_nm`` (``[N, 3]`` xyz nm)."""
        self._positions = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
        self._embeddings: np.ndarray | None = None
        self._embedded = np.zeros(len(self._positions), dtype=bool)
        self._typed_at = 0  # embedded nodes at the last cell-type estimate

    def _usable(self, classifier, width: int, what: str, notes: list[str]) -> bool:
        if classifier is None:
            return False
        if classifier.num_features != width:
            notes.append(f"the {what} classifier takes {classifier.num_features}-d embeddings, these are {width}-d")
            return False
        return True

    def _changed_aggregates(
        self, embeddings: np.ndarray, new: np.ndarray, done: np.ndarray, radius_nm: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Centres whose radius aggregate changed with the ``new`` ones, and their aggregates.

        Returns the centres (int ``[m]``) and their aggregates over the embedded centres
        ``done`` (float32 ``[m, D]``; ``embeddings`` holds every centre's row), as
        :func:`segscope.analysis.aggregate.aggregate_embeddings` would give them.
        """
        from scipy.sparse import csr_matrix
        from scipy.spatial import cKDTree

        tree = cKDTree(self._positions[done])
        touched = tree.query_ball_point(self._positions[new], r=radius_nm)
        rows = done[np.unique(np.concatenate([np.asarray(t, dtype=np.intp) for t in touched]))]
        neighbours = tree.query_ball_point(self._positions[rows], r=radius_nm)
        counts = np.fromiter((len(n) for n in neighbours), dtype=np.intp, count=len(rows))
        columns = np.concatenate([np.asarray(n, dtype=np.intp) for n in neighbours])
        matrix = csr_matrix(
            (np.ones(len(columns)), (np.repeat(np.arange(len(rows)), counts), columns)), shape=(len(rows), len(done))
        )
        sums = matrix @ embeddings[done].astype(np.float64)
        return rows, (sums / counts[:, None]).astype(np.float32)

    def add(self, indices: np.ndarray, embeddings: np.ndarray, *, final: bool | None = None) -> Predictions:
        """Record embeddings of centres ``indices`` and return the predictions they change.

        ``indices`` is int ``[b]``, ``embeddings`` float ``[b, D]``.

        The cell type comes back (not None) on the first batch, whenever the embedded nodes
        grew by :attr:`CELL_TYPE_GROWTH` since the last estimate, and on the ``final``
        batch (default: once every centre is embedded).
        """
        from segscope.analysis.aggregate import aggregate_embeddings

        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.asarray(embeddings, dtype=np.float32)
        if self._embeddings is None:
            self._embeddings = np.zeros((len(self._positions), values.shape[1]), dtype=np.float32)
        table = self._embeddings
        table[indices] = values
        self._embedded[indices] = True
        notes: list[str] = []
        compartments = cell_type = None
        done = np.flatnonzero(self._embedded)
        if self._usable(self.compartment, values.shape[1], "compartment", notes):
            if self.compartment_radius_nm > 0:
                # Only nodes within the radius of a new node have new aggregates.
                rows, features = self._changed_aggregates(table, indices, done, self.compartment_radius_nm)
            else:
                rows, features = indices, values
            prediction = self.compartment.predict(features)
            chosen = prediction.probabilities[np.arange(len(rows)), prediction.labels]
            compartments = CompartmentCalls(
                rows.copy(),
                self._codes[prediction.labels],
                chosen.astype(np.float32),
                prediction.uncertainty.astype(np.float32),
            )
        if final is None:
            final = bool(self._embedded.all())
        due = final or self._typed_at == 0 or len(done) >= self.CELL_TYPE_GROWTH * self._typed_at
        if self._usable(self.cell_type, values.shape[1], "cell-type", notes) and len(done) and due:
            self._typed_at = len(done)
            features = table[done]
            if self.cell_type_radius_nm > 0:
                features = aggregate_embeddings(self._positions[done], features, self.cell_type_radius_nm)
            prediction = self.cell_type.predict(features)
            mean = prediction.probabilities.mean(axis=0)
            best = int(np.argmax(mean))
            score = float(prediction.ood_score.mean())
            threshold = float(self.cell_type.ood_threshold)
            cell_type = CellTypeCall(
                name=str(self.cell_type.class_names[best]),
                probability=float(mean[best]),
                probabilities={str(n): float(p) for n, p in zip(self.cell_type.class_names, mean)},
                ood_score=score,
                ood_flagged=score > threshold,
                threshold=threshold,
                n_nodes=len(done),
            )
        return Predictions(compartments, cell_type, "; ".join(notes))


def load_segment_predictor(entries: Sequence[dict]) -> tuple[SegmentPredictor, dict[str, Any]]:
    """Load classifiers and the :class:`SegmentPredictor` that runs them (imports Keras).

    ``entries`` are ``{"task": "compartment" or "cell_type", "path": .npz file,
    "radius_nm": aggregation radius (nm) of the embeddings it takes}``, as
    :func:`segscope.app.controller.load_classifiers_job` sends them. Returns the predictor and the
    loaded classifiers by task. The networks are traced once on dummy input here, so the
    first real prediction does not pay for it. Used by the app's compute process and by
    ``segscope embed --classifiers``, so both label nodes with the same code.

    Raises
    ------
    FileNotFoundError, ValueError
        A classifier file is missing or not a SegScope classifier, or the compartment
        classifier predicts classes SegScope does not know.
    """
    from segscope.analysis.classify import load_classifier

    loaded: dict[str, Any] = {}
    radius: dict[str, float] = {}
    for entry in entries:
        loaded[entry["task"]] = load_classifier(entry["path"])
        radius[entry["task"]] = float(entry["radius_nm"])
    predictor = SegmentPredictor(
        loaded.get("compartment"),
        loaded.get("cell_type"),
        compartment_radius_nm=radius.get("compartment", 0.0),
        cell_type_radius_nm=radius.get("cell_type", 0.0),
    )
    # Trace the networks (and import the aggregation's scipy) now, not on a click.
    for classifier in loaded.values():
        warm = SegmentPredictor(None, classifier, cell_type_radius_nm=1.0)
        warm.start(np.zeros((2, 3)))
        warm.add(np.arange(2), np.zeros((2, classifier.num_features), np.float32))
    return predictor, loaded


def predict_segment(predictor: SegmentPredictor, positions_nm: np.ndarray, embeddings: np.ndarray) -> Predictions:
    """Predictions for a whole segment's node embeddings at once (precomputed ones).

    ``positions_nm`` float ``[N, 3]`` xyz nm, ``embeddings`` float ``[N, D]`` in the same
    order. Gives what streaming the same nodes batch by batch ends with: every node's
    compartment from its final aggregate, the cell type from all ``N`` nodes. Resets
    ``predictor`` to this segment.
    """
    positions = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
    predictor.start(positions)
    return predictor.add(np.arange(len(positions)), embeddings, final=True)


def predict_safely(predictor: SegmentPredictor, indices, embeddings) -> Predictions:
    """Predictions for a batch; a classifier failure becomes a note, and the embeddings still reach the user."""
    try:
        return predictor.add(indices, embeddings)
    except Exception as exc:  # any classifier bug must not lose the embeddings
        log.exception("prediction failed")
        return Predictions(None, None, f"prediction failed: {type(exc).__name__}: {exc}")


def predict_node_rows(predictor: SegmentPredictor, segment_ids: np.ndarray, xyz_nm: np.ndarray, embeddings: np.ndarray):
    """Label every row of a node embeddings table, one segment at a time, as the app does.

    Each segment's rows go through :func:`predict_segment`. ``segscope embed`` and the Beam
    pipeline both write these columns. Yields a Progress per segment.

    Parameters
    ----------
    predictor
        The loaded classifiers (:func:`load_segment_predictor`).
    segment_ids
        uint64 ``[N]`` segment of each row (rows of a segment need not be contiguous).
    xyz_nm
        float ``[N, 3]`` node positions (nm, xyz).
    embeddings
        float32 ``[N, D]``.

    Returns
    -------
    columns : dict
        One entry per row: ``compartment`` (object, name or None), ``compartment_probability``,
        ``cell_type`` (object, name or None), ``cell_type_probability``, ``ood_score``
        (float32, NaN when not predicted), ``ood`` (object, the segment's flag or None).
    segment_calls : dict
        ``{segment id: {"cell_type", "probabilities", "ood_score", "ood",
        "compartment_counts"}}`` (counts: int ``[len(COMPARTMENTS)]``).

    Raises
    ------
    ValueError
        A classifier could not label a segment (its note names why).
    """
    from segscope.analysis import COMPARTMENTS
    from segscope.analysis.arrays import group_rows
    from segscope.analysis.progress import Progress

    n = len(segment_ids)
    names = np.array([*COMPARTMENTS, None], dtype=object)
    codes = np.full(n, len(COMPARTMENTS), np.intp)  # None until predicted
    columns: dict[str, np.ndarray] = {
        "compartment_probability": np.full(n, np.nan, np.float32),
        "cell_type": np.full(n, None, object),
        "cell_type_probability": np.full(n, np.nan, np.float32),
        "ood_score": np.full(n, np.nan, np.float32),
        "ood": np.full(n, None, object),
    }
    segment_calls: dict[int, dict[str, Any]] = {}
    groups = list(group_rows(np.asarray(segment_ids)))
    for done, (segment_id, rows) in enumerate(groups, 1):
        predictions = predict_segment(predictor, xyz_nm[rows], embeddings[rows])
        if predictions.note:
            raise ValueError(f"segment {int(segment_id)}: {predictions.note}")
        calls = predictions.compartments
        if calls is not None:
            codes[rows[calls.indices]] = calls.codes
            columns["compartment_probability"][rows[calls.indices]] = calls.probability
        call = predictions.cell_type
        if call is not None:
            columns["cell_type"][rows] = call.name
            columns["cell_type_probability"][rows] = call.probability
            columns["ood_score"][rows] = call.ood_score
            columns["ood"][rows] = bool(call.ood_flagged)
        segment_calls[int(segment_id)] = {
            "cell_type": None if call is None else call.name,
            "probabilities": {} if call is None else dict(call.probabilities),
            "ood_score": np.nan if call is None else float(call.ood_score),
            "ood": False if call is None else bool(call.ood_flagged),
            "compartment_counts": np.bincount(codes[rows], minlength=len(COMPARTMENTS) + 1)[: len(COMPARTMENTS)],
        }
        yield Progress(done, len(groups), "segments", f"segment {int(segment_id)}")
    columns["compartment"] = names[codes]
    return columns, segment_calls
