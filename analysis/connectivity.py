"""Connectivity between cell types: synapse counts from a synapse table and segment types.

Segment types come from predictions (the per-node ``cell_type`` column that ``segscope
embed --classifiers`` writes, one call per segment, or any segment table with
``segment_id`` and ``cell_type``), with manual labels overriding them. A predicted segment
flagged out of distribution gets the type :data:`OOD_TYPE` (its own row and column) unless
a manual label names it; a synapse partner with no type at all is :data:`UNTYPED`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis.synapses import SynapseTable

log = logging.getLogger(__name__)

OOD_TYPE = "OOD"
UNTYPED = "untyped"

__all__ = [
    "OOD_TYPE",
    "UNTYPED",
    "ConnectivityMatrix",
    "SegmentTypes",
    "connection_probability",
    "connectivity_matrix",
    "read_segment_types",
]


@dataclass(frozen=True)
class SegmentTypes:
    """Type of each segment: ``segment_id`` uint64 ``[S]`` and ``cell_type`` str ``[S]``."""

    segment_id: np.ndarray
    cell_type: np.ndarray

    def as_dict(self) -> dict[int, str]:
        return dict(zip(self.segment_id.tolist(), self.cell_type.tolist()))

    def with_labels(self, labels: Mapping[int, str]) -> SegmentTypes:
        """These types with ``labels`` (segment id -> type) overriding them (OOD included)."""
        types = self.as_dict()
        types.update({int(k): str(v) for k, v in labels.items() if v})
        ids = np.array(sorted(types), dtype=np.uint64)
        return SegmentTypes(ids, np.array([types[i] for i in ids.tolist()], dtype=object))


def _strings(column) -> np.ndarray:
    values = column.to_pylist()
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def read_segment_types(
    path: str | os.PathLike, *, ood_threshold: float | None = None, use_manual_labels: bool = True
) -> SegmentTypes:
    """Segment types from an embeddings Parquet (node rows) or a segment table (Parquet/CSV).

    Embeddings tables: each segment's ``cell_type``; OOD when its ``ood_score`` exceeds
    ``ood_threshold`` (default: the cell-type classifier's threshold in the table's
    provenance). Segment tables: ``cell_type``, OOD where the ``ood`` column is true, and
    ``manual_label`` overriding both when ``use_manual_labels``.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"type table {path} does not exist")
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    for column in ("segment_id", "cell_type"):
        if column not in table.column_names:
            raise ValueError(
                f"{path} lacks a {column!r} column: expected an embeddings table written with "
                "'segscope embed --classifiers' or a segment table (segment_id, cell_type)"
            )
    ids = table.column("segment_id").to_numpy().astype(np.uint64)
    types = _strings(table.column("cell_type"))
    ood = np.zeros(len(ids), dtype=bool)
    if "ood" in table.column_names:
        ood = np.asarray(table.column("ood").to_pylist(), dtype=object) == True  # noqa: E712 (None -> False)
    elif "ood_score" in table.column_names:
        threshold = ood_threshold
        if threshold is None:
            threshold = _provenance_ood_threshold(table)
        if threshold is not None:
            scores = np.asarray(table.column("ood_score").to_numpy(zero_copy_only=False), dtype=np.float64)
            ood = np.nan_to_num(scores, nan=-np.inf) > float(threshold)
        else:
            log.warning("%s has ood_score but no threshold in its provenance: no segment is flagged OOD", path)
    types = np.where(ood & (types != ""), OOD_TYPE, types)
    if use_manual_labels and "manual_label" in table.column_names:
        manual = _strings(table.column("manual_label"))
        types = np.where(manual != "", manual, types)
    # One type per segment (an embeddings table repeats it on every node row).
    unique, first = np.unique(ids, return_index=True)
    return SegmentTypes(unique, types[first])


def _provenance_ood_threshold(table) -> float | None:
    from segscope.analysis.provenance import PROVENANCE_KEY

    metadata = table.schema.metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)["classifiers"]["cell_type"]["ood_threshold"]
    except (KeyError, TypeError, ValueError):
        return None
    return None if value is None else float(value)


@dataclass(frozen=True)
class ConnectivityMatrix:
    """Type-to-type synapse counts (rows: presynaptic type, columns: postsynaptic type).

    Attributes
    ----------
    types : tuple of str
        Row and column order.
    synapses : np.ndarray
        int64 ``[T, T]`` synapse counts.
    segments : dict
        type -> uint64 array of the segments of that type that have a synapse.
    pair_segments : dict
        ``(pre type, post type)`` -> (pre ids, post ids) uint64 arrays of the synapses'
        segments (unique), for selecting a cell's segments.
    """

    types: tuple[str, ...]
    synapses: np.ndarray
    segments: dict[str, np.ndarray]
    pair_segments: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]

    def normalised(self, how: str = "row") -> np.ndarray:
        """Counts normalised ``row`` or ``pair``.

        ``row``: fraction of each presynaptic type's synapses onto each type; ``pair``:
        synapses per (pre segment, post segment) pair of the two types.
        """
        counts = self.synapses.astype(np.float64)
        if how == "row":
            total = counts.sum(axis=1, keepdims=True)
            return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
        if how == "pair":
            n = np.array([len(self.segments[t]) for t in self.types], dtype=np.float64)
            pairs = np.outer(n, n)
            return np.divide(counts, pairs, out=np.zeros_like(counts), where=pairs > 0)
        raise ValueError(f"normalisation must be 'row' or 'pair', got {how!r}")

    def rows(self, how: str = "row") -> list[dict]:
        """One dict per (pre type, post type): counts and the normalised value (a table)."""
        norm = self.normalised(how)
        return [
            {
                "pre_type": a,
                "post_type": b,
                "synapses": int(self.synapses[i, j]),
                f"normalised_{how}": float(norm[i, j]),
                "pre_segments": len(self.pair_segments[(a, b)][0]),
                "post_segments": len(self.pair_segments[(a, b)][1]),
            }
            for i, a in enumerate(self.types)
            for j, b in enumerate(self.types)
        ]

    def write_csv(self, path: str | os.PathLike, how: str = "row", *, force: bool = False) -> Path:
        """Write :meth:`rows` as CSV, atomically."""
        import csv

        from segscope.analysis.export.atomic import atomic_file

        rows = self.rows(how)
        with atomic_file(Path(path), force=force) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["pre_type", "post_type"])
            writer.writeheader()
            writer.writerows(rows)
        return Path(path)


def _type_order(present: set[str], preferred: Sequence[str]) -> tuple[str, ...]:
    # Preferred types always appear (a type without synapses is a row of zeros, not absent).
    ordered = [t for t in preferred if t not in (OOD_TYPE, UNTYPED)]
    ordered += sorted(present - set(ordered) - {OOD_TYPE, UNTYPED})
    ordered += [t for t in (OOD_TYPE, UNTYPED) if t in present]
    return tuple(ordered)


def segment_type_array(segment_ids: np.ndarray, types: SegmentTypes) -> np.ndarray:
    """Type of each id in ``segment_ids`` (object array); :data:`UNTYPED` where unknown or empty."""
    lookup = types.as_dict()
    out = [lookup.get(int(s), "") for s in np.asarray(segment_ids).tolist()]
    return np.array([t if t else UNTYPED for t in out], dtype=object)


def connectivity_matrix(
    synapses: SynapseTable, types: SegmentTypes, type_order: Sequence[str] = ()
) -> ConnectivityMatrix:
    """Type-to-type synapse counts.

    Types listed in ``type_order`` come first (even without synapses), then the rest, then
    :data:`OOD_TYPE` and :data:`UNTYPED`.
    """
    pre_t = segment_type_array(synapses.pre, types)
    post_t = segment_type_array(synapses.post, types)
    order = _type_order(set(pre_t.tolist()) | set(post_t.tolist()), type_order)
    index = {t: i for i, t in enumerate(order)}
    counts = np.zeros((len(order), len(order)), dtype=np.int64)
    if len(synapses):
        np.add.at(counts, (np.array([index[t] for t in pre_t]), np.array([index[t] for t in post_t])), 1)
    segments = {
        t: np.unique(np.concatenate([synapses.pre[pre_t == t], synapses.post[post_t == t]])).astype(np.uint64)
        for t in order
    }
    pair_segments = {}
    for a in order:
        for b in order:
            pick = (pre_t == a) & (post_t == b)
            pair_segments[(a, b)] = (np.unique(synapses.pre[pick]), np.unique(synapses.post[pick]))
    return ConnectivityMatrix(order, counts, segments, pair_segments)


def connection_probability(
    synapses: SynapseTable, touching_pairs: np.ndarray, types: SegmentTypes, type_order: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """P(a -> b connected | a and b touch) per type pair, and the number of ordered touching pairs.

    ``touching_pairs`` uint64 ``[P, 2]`` (each unordered pair once, e.g.
    ``segscope.analysis.synapses.contact_sites(...).pairs``). Returns float ``[T, T]``
    (NaN where no pair touches) and int64 ``[T, T]``, in ``type_order``.
    """
    index = {t: i for i, t in enumerate(type_order)}
    t = len(type_order)
    touching = np.zeros((t, t), dtype=np.int64)
    connected = np.zeros((t, t), dtype=np.int64)
    edges = set(zip(synapses.pre.tolist(), synapses.post.tolist()))
    pairs = np.asarray(touching_pairs, dtype=np.uint64).reshape(-1, 2)
    ta = segment_type_array(pairs[:, 0], types)
    tb = segment_type_array(pairs[:, 1], types)
    for (a, b), s, u in zip(pairs.tolist(), ta.tolist(), tb.tolist()):
        for pre, post, tp, tq in ((a, b, s, u), (b, a, u, s)):
            if tp in index and tq in index:
                touching[index[tp], index[tq]] += 1
                connected[index[tp], index[tq]] += (pre, post) in edges
    with np.errstate(invalid="ignore", divide="ignore"):
        probability = np.where(touching > 0, connected / np.maximum(touching, 1), np.nan)
    return probability, touching
