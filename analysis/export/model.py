"""What an export contains: per-node and per-segment results and where they came from.

Plain dataclasses of numpy arrays, validated on construction so every writer can trust
their shapes, dtypes and values. Positions are nm, ``[N, 3]`` in x, y, z order.
Subcompartment codes index :data:`analysis.COMPARTMENTS`; ``-1`` means "not predicted".
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from segscope.analysis import COMPARTMENTS

log = logging.getLogger(__name__)

#: Compartment code of a node whose subcompartment was not predicted.
NOT_PREDICTED = -1


def _segscope_version() -> str:
    from segscope.analysis import __version__

    return __version__


def _utc_now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _integer_array(name: str, values: Any, dtype: type, n: int | None) -> np.ndarray:
    """``values`` as a 1-D ``dtype`` array, refusing non-integers and values that do not fit."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if n is not None and len(array) != n:
        raise ValueError(f"{name} has {len(array)} entries, expected {n}")
    if array.size == 0:
        return np.zeros(0, dtype=dtype)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    info = np.iinfo(dtype)
    # Compare as Python ints: mixed uint64/int64 comparisons in numpy go through float64.
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        raise ValueError(f"{name} values must lie in [{info.min}, {info.max}], got [{low}, {high}]")
    return array.astype(dtype)


def _float_array(name: str, values: Any, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array.astype(dtype)


def _string_array(name: str, values: Any, n: int) -> np.ndarray:
    """``values`` as an object array of ``str`` (``None`` becomes ``""``)."""
    if values is None:
        return np.full(n, "", dtype=object)
    array = np.asarray(values, dtype=object)
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {array.shape}")
    out = np.empty(n, dtype=object)
    for i, value in enumerate(array):
        if value is None:
            out[i] = ""
        elif isinstance(value, (str, np.str_)):
            out[i] = str(value)
        else:
            raise TypeError(f"{name}[{i}] must be a string, got {type(value).__name__} {value!r}")
    return out


def _check_unique(name: str, keys: np.ndarray) -> None:
    unique, counts = np.unique(keys, return_counts=True, axis=0 if keys.ndim > 1 else None)
    if len(unique) != len(keys):
        repeated = unique[counts > 1][:5]
        raise ValueError(f"{name} must be unique; repeated: {repeated.tolist()}")


@dataclass(init=False)
class NodeTable:
    """Per-node results of one or more segments.

    Attributes
    ----------
    segment_id : numpy.ndarray
        uint64 ``[N]``.
    node_id : numpy.ndarray
        int64 ``[N]``: skeleton node id, unique within its segment.
    xyz_nm : numpy.ndarray
        float64 ``[N, 3]`` node position, x, y, z nm. Must be finite.
    compartment : numpy.ndarray
        int16 ``[N]`` index into :data:`analysis.COMPARTMENTS`, ``-1`` = not predicted.
        Defaults to all ``-1``.
    compartment_probability : numpy.ndarray
        float32 ``[N, K]``, ``K = len(COMPARTMENTS)``; NaN where not predicted (default).
    ood_score : numpy.ndarray
        float32 ``[N]`` out-of-distribution score, NaN = none (default).
    manual_label : numpy.ndarray
        object ``[N]`` of ``str``, ``""`` = no label (default).
    """

    segment_id: np.ndarray
    node_id: np.ndarray
    xyz_nm: np.ndarray
    compartment: np.ndarray
    compartment_probability: np.ndarray
    ood_score: np.ndarray
    manual_label: np.ndarray

    # Written out (not generated) so that an optional column may be given as None while the
    # attribute is always an array, which is what the type says to every reader.
    def __init__(
        self,
        segment_id: ArrayLike,
        node_id: ArrayLike,
        xyz_nm: ArrayLike,
        compartment: ArrayLike | None = None,
        compartment_probability: ArrayLike | None = None,
        ood_score: ArrayLike | None = None,
        manual_label: ArrayLike | None = None,
    ) -> None:
        self.segment_id = _integer_array("segment_id", segment_id, np.uint64, None)
        n = len(self.segment_id)
        self.node_id = _integer_array("node_id", node_id, np.int64, n)
        self.xyz_nm = _float_array("xyz_nm", xyz_nm, (n, 3), np.float64)
        if not np.isfinite(self.xyz_nm).all():
            bad = np.flatnonzero(~np.isfinite(self.xyz_nm).all(axis=1))
            raise ValueError(f"xyz_nm has NaN or infinite coordinates at rows {bad[:10].tolist()}")
        k = len(COMPARTMENTS)
        if compartment is None:
            self.compartment = np.full(n, NOT_PREDICTED, dtype=np.int16)
        else:
            self.compartment = _integer_array("compartment", compartment, np.int16, n)
            if n and (self.compartment.min() < NOT_PREDICTED or self.compartment.max() >= k):
                raise ValueError(
                    f"compartment codes must lie in [-1, {k - 1}] (index into {COMPARTMENTS}), "
                    f"got [{self.compartment.min()}, {self.compartment.max()}]"
                )
        if compartment_probability is None:
            self.compartment_probability = np.full((n, k), np.nan, dtype=np.float32)
        else:
            self.compartment_probability = _float_array(
                "compartment_probability", compartment_probability, (n, k), np.float32
            )
        if ood_score is None:
            self.ood_score = np.full(n, np.nan, dtype=np.float32)
        else:
            self.ood_score = _float_array("ood_score", ood_score, (n,), np.float32)
        self.manual_label = _string_array("manual_label", manual_label, n)
        # Bit-cast to int64 so both columns share one dtype; uniqueness is unaffected.
        pairs = np.stack([self.segment_id.view(np.int64), self.node_id], axis=1)
        _check_unique("(segment_id, node_id) pairs", pairs)

    def __len__(self) -> int:
        return len(self.segment_id)

    def segment_ids(self) -> np.ndarray:
        """Distinct segment ids, ascending (uint64 ``[S]``)."""
        return np.unique(self.segment_id)

    def rows_of(self, segment_id: int) -> np.ndarray:
        """Row indices (int64) of one segment's nodes, in table order."""
        return np.flatnonzero(self.segment_id == np.uint64(segment_id))

    def compartment_counts(self, segment_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Nodes per compartment of each segment: int64 ``[S, K]`` (unpredicted nodes not counted)."""
        segment_ids = np.asarray(segment_ids, dtype=np.uint64)
        counts = np.zeros((len(segment_ids), len(COMPARTMENTS)), dtype=np.int64)
        order = np.argsort(segment_ids)
        position = np.searchsorted(segment_ids[order], self.segment_id)
        position = np.clip(position, 0, max(len(segment_ids) - 1, 0))
        known = (len(segment_ids) > 0) & (self.compartment >= 0)
        if len(segment_ids):
            known &= segment_ids[order][position] == self.segment_id
        np.add.at(counts, (order[position[known]], self.compartment[known]), 1)
        return counts


@dataclass(init=False)
class SegmentTable:
    """Per-segment results.

    Attributes
    ----------
    segment_id : numpy.ndarray
        uint64 ``[S]``, unique.
    cell_type_names : tuple of str
        The ``T`` cell-type classes, in the column order of ``cell_type_probability``.
    cell_type : numpy.ndarray
        object ``[S]`` of ``str``, ``""`` = unknown (default).
    cell_type_probability : numpy.ndarray
        float32 ``[S, T]``; NaN where not predicted (default).
    ood_score : numpy.ndarray
        float32 ``[S]``, NaN = none (default).
    ood : numpy.ndarray
        bool ``[S]``: flagged out of distribution (default False).
    compartment_node_counts : numpy.ndarray
        int64 ``[S, K]`` nodes per subcompartment (default zeros).
    manual_label : numpy.ndarray
        object ``[S]`` of ``str``, ``""`` = none (default).
    """

    segment_id: np.ndarray
    cell_type_names: tuple[str, ...]
    cell_type: np.ndarray
    cell_type_probability: np.ndarray
    ood_score: np.ndarray
    ood: np.ndarray
    compartment_node_counts: np.ndarray
    manual_label: np.ndarray

    # Written out for the same reason as NodeTable's: optional columns given as None.
    def __init__(
        self,
        segment_id: ArrayLike,
        cell_type_names: Sequence[str] = (),
        cell_type: ArrayLike | None = None,
        cell_type_probability: ArrayLike | None = None,
        ood_score: ArrayLike | None = None,
        ood: ArrayLike | None = None,
        compartment_node_counts: ArrayLike | None = None,
        manual_label: ArrayLike | None = None,
    ) -> None:
        self.segment_id = _integer_array("segment_id", segment_id, np.uint64, None)
        _check_unique("segment_id", self.segment_id)
        s = len(self.segment_id)
        self.cell_type_names = tuple(str(name) for name in cell_type_names)
        if len(set(self.cell_type_names)) != len(self.cell_type_names):
            raise ValueError(f"cell_type_names must be distinct, got {self.cell_type_names}")
        t = len(self.cell_type_names)
        self.cell_type = _string_array("cell_type", cell_type, s)
        unknown = sorted({c for c in self.cell_type if c and c not in self.cell_type_names})
        if unknown and t:
            raise ValueError(f"cell_type values {unknown} are not in cell_type_names {self.cell_type_names}")
        if cell_type_probability is None:
            self.cell_type_probability = np.full((s, t), np.nan, dtype=np.float32)
        else:
            self.cell_type_probability = _float_array(
                "cell_type_probability", cell_type_probability, (s, t), np.float32
            )
        if ood_score is None:
            self.ood_score = np.full(s, np.nan, dtype=np.float32)
        else:
            self.ood_score = _float_array("ood_score", ood_score, (s,), np.float32)
        if ood is None:
            self.ood = np.zeros(s, dtype=bool)
        else:
            flags = np.asarray(ood)
            if flags.shape != (s,) or flags.dtype.kind not in "biu":
                raise ValueError(f"ood must be a bool array of shape ({s},), got {flags.dtype} {flags.shape}")
            self.ood = flags.astype(bool)
        k = len(COMPARTMENTS)
        if compartment_node_counts is None:
            self.compartment_node_counts = np.zeros((s, k), dtype=np.int64)
        else:
            counts = np.asarray(compartment_node_counts)
            if counts.shape != (s, k) or counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
                raise ValueError(
                    f"compartment_node_counts must be non-negative integers of shape ({s}, {k}), "
                    f"got {counts.dtype} {counts.shape}"
                )
            self.compartment_node_counts = counts.astype(np.int64)
        self.manual_label = _string_array("manual_label", manual_label, s)

    def __len__(self) -> int:
        return len(self.segment_id)

    @classmethod
    def from_nodes(cls, nodes: NodeTable, **columns: Any) -> SegmentTable:
        """One row per segment of ``nodes`` with node counts filled in; other columns as given."""
        segment_ids = nodes.segment_ids()
        return cls(segment_id=segment_ids, compartment_node_counts=nodes.compartment_counts(segment_ids), **columns)


@dataclass(frozen=True)
class Provenance:
    """Where exported results came from; stored with every table and layer.

    Attributes
    ----------
    model_name : str
        Embedding model (and classifier) that produced the results.
    checkpoint_sha256 : str
        SHA-256 of the checkpoint file(s), hex; ``""`` when unknown.
    aggregation_radius_nm : float or None
        Radius of the embedding aggregation used for classification (nm), None = none.
    ood_threshold : float or None
        OOD score above which a segment or node is flagged.
    dataset : str
        Dataset name or URL.
    segscope_version : str
    created : str
        UTC time of the export, ISO 8601.
    """

    model_name: str = ""
    checkpoint_sha256: str = ""
    aggregation_radius_nm: float | None = None
    ood_threshold: float | None = None
    dataset: str = ""
    segscope_version: str = field(default_factory=_segscope_version)
    created: str = field(default_factory=_utc_now_iso)

    def __post_init__(self) -> None:
        sha = self.checkpoint_sha256
        if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ValueError(f"checkpoint_sha256 must be 64 hex digits or empty, got {sha!r}")
        for name in ("aggregation_radius_nm", "ood_threshold"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise ValueError(f"{name} must be finite or None, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            log.warning("ignoring unknown provenance keys %s", sorted(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"provenance is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"provenance must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


#: Compartment names in ground-truth tables that mean "no compartment".
_UNKNOWN_COMPARTMENT_NAMES = {"", "unknown"}


def tables_from_ground_truth(
    nodes_parquet: str | Path,
    segments_parquet: str | Path,
    cell_type_names: Sequence[str] | None = None,
) -> tuple[NodeTable, SegmentTable]:
    """Node and segment tables from the demo dataset's ground-truth Parquet files.

    ``nodes.parquet`` has ``segment_id, node_id, x_nm, y_nm, z_nm, compartment`` (compartment
    names, ``"unknown"`` or null for none); ``segments.parquet`` has ``segment_id, cell_type``
    (and more, ignored). Ground truth is certain, so probabilities are one-hot and OOD scores
    NaN. ``cell_type_names`` fixes the class order (the dataset's ``cell_types``); default:
    the distinct types, sorted.
    """
    import pyarrow.parquet as pq

    for path in (nodes_parquet, segments_parquet):
        if not Path(path).is_file():
            raise FileNotFoundError(f"ground-truth table not found: {path}")
    node_columns = ["segment_id", "node_id", "x_nm", "y_nm", "z_nm", "compartment"]
    nodes = pq.read_table(nodes_parquet)
    missing = [c for c in node_columns if c not in nodes.column_names]
    if missing:
        raise KeyError(f"{nodes_parquet} lacks columns {missing}")
    names = [str(c) if c is not None else "" for c in nodes.column("compartment").to_pylist()]
    lookup = {name: code for code, name in enumerate(COMPARTMENTS)}
    unknown = sorted({n for n in names if n not in _UNKNOWN_COMPARTMENT_NAMES and n not in lookup})
    if unknown:
        raise ValueError(f"{nodes_parquet}: unknown compartments {unknown}; expected {COMPARTMENTS}")
    compartment = np.array([lookup.get(n, NOT_PREDICTED) for n in names], dtype=np.int16)
    probability = np.full((len(names), len(COMPARTMENTS)), np.nan, dtype=np.float32)
    known = compartment >= 0
    probability[known] = np.eye(len(COMPARTMENTS), dtype=np.float32)[compartment[known]]
    node_table = NodeTable(
        segment_id=nodes.column("segment_id").to_numpy().astype(np.uint64),
        node_id=nodes.column("node_id").to_numpy().astype(np.int64),
        xyz_nm=np.stack([nodes.column(c).to_numpy() for c in ("x_nm", "y_nm", "z_nm")], axis=1),
        compartment=compartment,
        compartment_probability=probability,
    )

    segments = pq.read_table(segments_parquet)
    missing = [c for c in ("segment_id", "cell_type") if c not in segments.column_names]
    if missing:
        raise KeyError(f"{segments_parquet} lacks columns {missing}")
    cell_type = np.array(
        [str(c) if c is not None else "" for c in segments.column("cell_type").to_pylist()], dtype=object
    )
    type_names = tuple(cell_type_names) if cell_type_names is not None else tuple(sorted({c for c in cell_type if c}))
    type_probability = np.full((len(cell_type), len(type_names)), np.nan, dtype=np.float32)
    for row, name in enumerate(cell_type):
        if name:
            type_probability[row] = 0.0
            type_probability[row, type_names.index(name)] = 1.0
    segment_ids = segments.column("segment_id").to_numpy().astype(np.uint64)
    segment_table = SegmentTable(
        segment_id=segment_ids,
        cell_type_names=type_names,
        cell_type=cell_type,
        cell_type_probability=type_probability,
        compartment_node_counts=node_table.compartment_counts(segment_ids),
    )
    return node_table, segment_table
