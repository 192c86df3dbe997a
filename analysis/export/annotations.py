"""Neuroglancer precomputed point annotations with properties, relationships and indexes.

Writes the format of Neuroglancer's ``src/datasource/precomputed/annotations.md``
(``neuroglancer_annotations_v1``): an ``info`` file, the by-id index (``by_id/``), one
related-object index per relationship (``rel_<name>/``) and a multi-level spatial index
(``spatial<level>/<x>_<y>_<z>``, unsharded). The by-id and relationship indexes are either
one file per key (``by_id/<id>``, ``rel_segment/<segment id>``) or, for large exports,
Neuroglancer's sharded format written through TensorStore.

Why not ``neuroglancer.write_annotations.AnnotationWriter`` (2.41): it writes a single
spatial cell holding every annotation in insertion order, so Neuroglancer downloads all
of them at once and, when it subsamples a crowded cell, draws only the first segments'
nodes; it also writes an exclusive ``upper_bound`` equal to the largest coordinate and
encodes annotations one Python call at a time and cannot shard. This writer follows the
spec's multi-level subsampling, shuffles each cell's list, encodes with numpy, and shards.

Coordinates: the annotation coordinate space is ``x, y, z`` in nanometres (scale 1e-9 m),
so positions are the nodes' ``xyz_nm`` and need no voxel size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis import COMPARTMENTS
from segscope.analysis.export.atomic import atomic_folder
from segscope.analysis.export.model import NodeTable
from segscope.analysis.progress import Progress, RateMeter

log = logging.getLogger(__name__)

#: Property type -> (numpy dtype, alignment group in bytes), from the spec's encoding rules.
PROPERTY_TYPES: dict[str, tuple[str | tuple[str, tuple[int]], int]] = {
    "float32": ("<f4", 4),
    "int32": ("<i4", 4),
    "uint32": ("<u4", 4),
    "int16": ("<i2", 2),
    "uint16": ("<u2", 2),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "rgb": (("u1", (3,)), 1),
    "rgba": (("u1", (4,)), 1),
}
_PROPERTY_ID = re.compile(r"^[a-z][a-zA-Z0-9_]*$")
#: Neuroglancer packs geometry and properties into one GPU vertex stride of at most 255 bytes.
_MAX_RECORD_BYTES = 255
#: Spatial levels at most; the last one takes every remaining annotation (coincident points).
_MAX_SPATIAL_LEVELS = 20
#: Default most annotations per spatial cell: dense enough to look complete when zoomed out,
#: small enough that one cell downloads quickly.
DEFAULT_SPATIAL_LIMIT = 2000
#: Above this many annotations the indexes are sharded by default: one file per annotation
#: gets slow to write, copy and upload (about 10 s per 100k files on a local disk).
SHARD_ABOVE = 20_000
#: Annotation-space dimensions: nanometres.
NM_DIMENSIONS = {"x": [1e-9, "m"], "y": [1e-9, "m"], "z": [1e-9, "m"]}


@dataclass(frozen=True)
class AnnotationProperty:
    """One per-annotation property column.

    Attributes
    ----------
    id : str
        Identifier matching ``^[a-z][a-zA-Z0-9_]*$`` (shader function ``prop_<id>()``).
    type : str
        One of :data:`PROPERTY_TYPES`.
    values : numpy.ndarray
        ``[N]`` (``[N, 3]``/``[N, 4]`` uint8 for rgb/rgba).
    description : str
    enum_values, enum_labels : sequence or None
        Optional value -> label mapping shown by Neuroglancer instead of the number.
    """

    id: str
    type: str
    values: np.ndarray
    description: str = ""
    enum_values: Sequence[int] | None = None
    enum_labels: Sequence[str] | None = None

    def info_json(self) -> dict:
        entry: dict = {"id": self.id, "type": self.type}
        if self.description:
            entry["description"] = self.description
        if self.enum_values is not None:
            entry["enum_values"] = [int(v) if self.type != "float32" else float(v) for v in self.enum_values]
            entry["enum_labels"] = [str(label) for label in self.enum_labels or ()]
        return entry


def property_id(name: str, prefix: str = "") -> str:
    """A valid Neuroglancer property id from a free-form name (``"Layer 2/3"`` -> ``"layer_2_3"``)."""
    text = re.sub(r"[^a-zA-Z0-9_]+", "_", f"{prefix}{name}").strip("_").lower()
    if not text or not text[0].isalpha():
        text = f"p_{text}"
    return text


def _check_properties(properties: Sequence[AnnotationProperty], n: int) -> None:
    seen: set[str] = set()
    for prop in properties:
        if not _PROPERTY_ID.match(prop.id):
            raise ValueError(f"annotation property id {prop.id!r} must match {_PROPERTY_ID.pattern}")
        if prop.id in seen:
            raise ValueError(f"annotation property id {prop.id!r} is used twice")
        seen.add(prop.id)
        if prop.type not in PROPERTY_TYPES:
            raise ValueError(f"property {prop.id!r}: type {prop.type!r} is not one of {sorted(PROPERTY_TYPES)}")
        expected = {"rgb": (n, 3), "rgba": (n, 4)}.get(prop.type, (n,))
        if np.shape(prop.values) != expected:
            raise ValueError(f"property {prop.id!r} has shape {np.shape(prop.values)}, expected {expected}")
        if (prop.enum_values is None) != (prop.enum_labels is None):
            raise ValueError(f"property {prop.id!r}: give both enum_values and enum_labels or neither")
        if prop.enum_values is not None:
            if prop.type in ("rgb", "rgba"):
                raise ValueError(f"property {prop.id!r}: rgb/rgba properties cannot be enums")
            if len(prop.enum_values) != len(prop.enum_labels or ()):
                raise ValueError(f"property {prop.id!r}: enum_values and enum_labels differ in length")
        values = np.asarray(prop.values)
        dtype = np.dtype(PROPERTY_TYPES[prop.type][0]).base
        if dtype.kind in "iu" and values.size:
            if values.dtype.kind not in "iub":
                raise TypeError(f"property {prop.id!r} of type {prop.type} needs integer values, got {values.dtype}")
            info = np.iinfo(dtype)
            if int(values.min()) < info.min or int(values.max()) > info.max:
                raise ValueError(f"property {prop.id!r}: values outside the {prop.type} range")


def ordered_properties(properties: Sequence[AnnotationProperty]) -> list[AnnotationProperty]:
    """Properties in encoding order: 4-byte types, then 2-byte, then 1-byte (stable).

    The spec encodes properties grouped by size; writing the ``info`` list in that same order
    means every reader agrees on the layout, whether it regroups (Neuroglancer's client) or
    reads fields in ``info`` order (neuroglancer's Python reader).
    """
    return sorted(properties, key=lambda p: -PROPERTY_TYPES[p.type][1])


def record_dtype(properties: Sequence[AnnotationProperty], rank: int = 3) -> np.dtype:
    """Structured dtype of one encoded point annotation (geometry, properties, zero padding).

    ``properties`` must already be in :func:`ordered_properties` order.
    """
    names: list[str] = ["geometry"]
    formats: list[str | tuple[str, tuple[int]]] = [("<f4", (rank,))]
    offsets = [0]
    offset = 4 * rank
    for i, prop in enumerate(properties):
        fmt, alignment = PROPERTY_TYPES[prop.type]
        offset += -offset % alignment
        names.append(f"property{i}")
        formats.append(fmt)
        offsets.append(offset)
        offset += np.dtype(fmt).itemsize
    offset += -offset % 4
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})


@dataclass(frozen=True)
class SpatialLevel:
    """One level of the spatial index: cell grid, and each non-empty cell's annotations."""

    chunk_size: np.ndarray  # float64 [rank], nm
    grid_shape: np.ndarray  # int64 [rank]
    limit: int
    cells: list[tuple[tuple[int, ...], np.ndarray]]  # (cell, annotation rows in random order)


def spatial_bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower bound and exclusive upper bound (float64 ``[3]``) enclosing ``points [N, 3]``.

    Whole units, so the float32 positions Neuroglancer reads stay inside the bounds.
    """
    if len(points) == 0:
        return np.zeros(3), np.ones(3)
    stored = points.astype(np.float32).astype(np.float64)
    return np.floor(stored.min(axis=0)), np.floor(stored.max(axis=0)) + 1.0


def build_spatial_index(
    points: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    limit: int,
    rng: np.random.Generator,
) -> list[SpatialLevel]:
    """Multi-level spatial index of ``points [N, 3]`` following the spec's algorithm.

    Level 0 is one cell over ``[lower, upper)``; each finer level halves the chunk sizes
    that are more than half the largest one (keeping cells near-isotropic). At each level
    every cell emits a uniform random subset of its remaining points, of size proportional
    to its count, scaled so the fullest cell emits exactly ``limit``; what is not emitted
    goes down to the child cells. Stops when nothing remains.
    """
    if limit < 1:
        raise ValueError(f"spatial index limit must be >= 1, got {limit}")
    chunk = (upper - lower).astype(np.float64)
    grid = np.ones(len(chunk), dtype=np.int64)
    remaining = np.arange(len(points))
    levels: list[SpatialLevel] = []
    while len(remaining) or not levels:
        if levels:
            halve = chunk > chunk.max() / 2
            chunk = np.where(halve, chunk / 2, chunk)
            grid = np.where(halve, grid * 2, grid)
        cell = np.floor((points[remaining] - lower) / chunk).astype(np.int64)
        cell = np.clip(cell, 0, grid - 1)
        key = np.ravel_multi_index(tuple(cell.T), tuple(grid)) if len(remaining) else np.zeros(0, np.int64)
        order = np.lexsort((rng.random(len(remaining)), key))  # by cell, random within a cell
        _, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
        max_count = int(counts.max()) if len(counts) else 0
        last_level = len(levels) == _MAX_SPATIAL_LEVELS - 1
        if max_count <= limit or last_level:
            take = counts
            level_limit = max(limit, max_count)
        else:
            # Randomised rounding keeps each cell's expected share exactly proportional.
            share = counts * (limit / max_count)
            take = np.floor(share + rng.random(len(counts))).astype(np.int64)
            take = np.minimum(take, limit)
            take[counts == max_count] = limit
            level_limit = limit
        rank_in_cell = np.arange(len(order)) - np.repeat(starts, counts)
        emitted = rank_in_cell < np.repeat(take, counts)
        cells = []
        for start, n_take in zip(starts, take):
            if n_take:
                rows = remaining[order[start : start + n_take]]
                cells.append((tuple(int(c) for c in cell[order[start]]), rows))
        levels.append(SpatialLevel(chunk.copy(), grid.copy(), int(level_limit), cells))
        remaining = remaining[order[~emitted]]
    return levels


def _multiple_annotation_bytes(records: np.ndarray, ids: np.ndarray) -> bytes:
    """The spec's multiple-annotation encoding: count, records (uint8 ``[n, bytes]``), uint64 ids."""
    return struct.pack("<Q", len(records)) + records.tobytes() + ids.astype("<u8").tobytes()


def write_point_annotations(
    path: str | Path,
    points_nm: np.ndarray,
    properties: Sequence[AnnotationProperty] = (),
    relationships: Mapping[str, np.ndarray] | None = None,
    *,
    annotation_ids: np.ndarray | None = None,
    limit: int = DEFAULT_SPATIAL_LIMIT,
    seed: int = 0,
    sharded: bool | None = None,
    force: bool = False,
) -> Generator[Progress, None, dict]:
    """Write point annotations as a Neuroglancer precomputed annotation folder (generator).

    Parameters
    ----------
    path
        Folder to create (atomically; an existing one only with ``force``).
    points_nm
        float ``[N, 3]`` positions, x, y, z nm.
    properties
        Per-annotation property columns (any order; stored grouped by size).
    relationships
        Relationship name -> uint64 ``[N]`` related object id of each annotation (0 = none),
        e.g. ``{"segment": segment_ids}``; written as the ``rel_<name>`` index.
    annotation_ids
        uint64 ``[N]`` unique ids (default: row index).
    limit
        Most annotations per spatial index cell.
    seed
        Seed of the spatial subsampling and shuffling (same input, same files).
    sharded
        Write the by-id and relationship indexes in Neuroglancer's sharded format (a few
        shard files instead of one file per annotation/object, through TensorStore).
        Default: sharded above :data:`SHARD_ABOVE` annotations.
    force
        Replace an existing folder.

    Yields
    ------
    Progress
        :class:`~segscope.analysis.progress.Progress` (unit "entries": index entries written).

    Returns
    -------
    dict
        The layer's ``info``.
    """
    points = np.asarray(points_nm, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points_nm must have shape [N, 3], got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points_nm holds NaN or infinite coordinates")
    n = len(points)
    ids = np.arange(n, dtype=np.uint64) if annotation_ids is None else np.asarray(annotation_ids)
    if ids.shape != (n,) or (n and ids.dtype.kind not in "iu"):
        raise ValueError(f"annotation_ids must be {n} integers, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.uint64)
    if len(np.unique(ids)) != n:
        raise ValueError("annotation_ids must be unique")
    relationships = dict(relationships or {})
    for name, related in relationships.items():
        if not re.match(r"^[A-Za-z0-9_]+$", name):
            raise ValueError(f"relationship name {name!r} must be letters, digits or _")
        if np.shape(related) != (n,):
            raise ValueError(f"relationship {name!r} must give one id per annotation ({n}), got {np.shape(related)}")
    _check_properties(properties, n)
    properties = ordered_properties(properties)
    dtype = record_dtype(properties)
    if dtype.itemsize > _MAX_RECORD_BYTES:
        raise ValueError(
            f"{len(properties)} properties take {dtype.itemsize} bytes per annotation; "
            f"Neuroglancer accepts at most {_MAX_RECORD_BYTES}"
        )

    records = np.zeros(n, dtype=dtype)
    records["geometry"] = points.astype(np.float32)
    for i, prop in enumerate(properties):
        records[f"property{i}"] = np.asarray(prop.values)

    lower, upper = spatial_bounds(points)
    rng = np.random.default_rng(seed)
    # Index the float32 positions that readers see, so cell membership matches theirs.
    levels = build_spatial_index(records["geometry"].astype(np.float64), lower, upper, limit, rng)
    # Select rows from a plain byte view: numpy copies structured rows field by field and
    # leaves padding bytes undefined, while the spec wants them zero.
    record_bytes = records.view(np.uint8).reshape(n, dtype.itemsize)
    related_ids = {name: np.asarray(values).astype(np.uint64) for name, values in relationships.items()}

    if sharded is None:
        sharded = n > SHARD_ABOVE
    relationship_entries = {name: _group_rows(related) for name, related in related_ids.items()}
    by_id_entry: dict = {"key": "by_id"}
    relationship_info = []
    if sharded:
        by_id_entry["sharding"] = sharding_spec(n)
    for name, groups in relationship_entries.items():
        entry: dict[str, Any] = {"id": name, "key": f"rel_{name}"}
        if sharded:
            entry["sharding"] = sharding_spec(len(groups))
        relationship_info.append(entry)
    info = {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": NM_DIMENSIONS,
        "lower_bound": lower.tolist(),
        "upper_bound": upper.tolist(),
        "annotation_type": "POINT",
        "properties": [prop.info_json() for prop in properties],
        "relationships": relationship_info,
        "by_id": by_id_entry,
        "spatial": [
            {
                "key": f"spatial{level_index}",
                "grid_shape": level.grid_shape.tolist(),
                "chunk_size": level.chunk_size.tolist(),
                "limit": level.limit,
            }
            for level_index, level in enumerate(levels)
        ],
    }
    total = n + sum(len(groups) for groups in relationship_entries.values())
    meter = RateMeter()
    written = 0

    def report(message: str) -> Progress:
        return Progress(written, total, "entries", message, meter.rate(written))

    with atomic_folder(path, force=force) as folder:
        (folder / "info").write_text(json.dumps(info, indent=1, allow_nan=False))
        for level_index, level in enumerate(levels):
            level_dir = folder / f"spatial{level_index}"
            level_dir.mkdir()
            for cell, rows in level.cells:
                name = "_".join(str(c) for c in cell)
                _write_file(level_dir / name, _multiple_annotation_bytes(record_bytes[rows], ids[rows]))
        yield report("spatial index")

        for entry, (name, groups) in zip(relationship_info, relationship_entries.items()):
            with _Uint64Index(folder / entry["key"], entry.get("sharding")) as index:
                for value, rows in groups:
                    index.put(value, _multiple_annotation_bytes(record_bytes[rows], ids[rows]))
            written += len(groups)
            yield report(f"relationship index {name!r}")

        # Single-annotation encoding: the record, then per relationship a uint32 count and
        # the related uint64 ids; built for all rows at once, then cut into entries.
        tail_fields = []
        for r in range(len(related_ids)):
            tail_fields += [(f"count{r}", "<u4"), (f"id{r}", "<u8")]
        single = np.zeros(n, dtype=np.dtype([("record", "u1", (dtype.itemsize,)), *tail_fields]))  # packed
        single["record"] = record_bytes
        for r, related in enumerate(related_ids.values()):
            single[f"count{r}"] = (related != 0).astype(np.uint32)
            single[f"id{r}"] = related
        blob = single.tobytes()
        size = single.dtype.itemsize
        any_empty = any((related == 0).any() for related in related_ids.values())
        with _Uint64Index(folder / "by_id", by_id_entry.get("sharding")) as index:
            for row in range(n):
                chunk = blob[row * size : (row + 1) * size]
                if any_empty:
                    chunk = _drop_empty_relationships(chunk, dtype.itemsize, [r[row] for r in related_ids.values()])
                index.put(int(ids[row]), chunk)
                written += 1
                if written % 20_000 == 0:
                    yield report("by-id index")
        yield report("done")
    log.info(
        "wrote %d point annotations (%d spatial levels, %s) to %s",
        n,
        len(levels),
        "sharded" if sharded else "unsharded",
        path,
    )
    return info


def _group_rows(related: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(object id, rows related to it) for every non-zero id, ascending."""
    order = np.argsort(related, kind="stable")
    values, starts = np.unique(related[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return [(int(v), order[a:b]) for v, a, b in zip(values, starts, ends) if v != 0]


def _write_file(path: Path | str, data: bytes) -> None:
    # os.open on a str: creating ~10^5 small files, pathlib's overhead is a third of the time.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def sharding_spec(num_keys: int) -> dict:
    """A ``neuroglancer_uint64_sharded_v1`` spec sized for ``num_keys`` entries.

    About 64 entries per minishard (small minishard index reads) and at most 1024
    minishards per shard (a 16 KiB shard index), so a shard file holds about 64k entries.
    """
    minishards = max(1, math.ceil(num_keys / 64))
    total_bits = math.ceil(math.log2(minishards))
    shard_bits = max(0, total_bits - 10)
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "preshift_bits": 0,
        "hash": "murmurhash3_x86_128",
        "minishard_bits": total_bits - shard_bits,
        "shard_bits": shard_bits,
        "minishard_index_encoding": "gzip",
        "data_encoding": "raw",
    }


class _Uint64Index:
    """Writes a uint64-keyed index: one file per key, or Neuroglancer shards via TensorStore."""

    def __init__(self, folder: Path, sharding: dict | None) -> None:
        self._folder = folder
        self._sharding = sharding
        folder.mkdir()

    def __enter__(self) -> _Uint64Index:
        if self._sharding is not None:
            import tensorstore as ts

            store = ts.KvStore.open(
                {
                    "driver": "neuroglancer_uint64_sharded",
                    "base": self._folder.resolve().as_uri() + "/",
                    "metadata": self._sharding,
                }
            ).result()
            self._transaction = ts.Transaction()
            self._store = store.with_transaction(self._transaction)
        return self

    def put(self, key: int, value: bytes) -> None:
        if self._sharding is None:
            _write_file(os.path.join(self._folder, str(key)), value)
        else:
            # Keys of the sharded format are the uint64 in big-endian byte order.
            self._store.write(struct.pack(">Q", key), value)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._sharding is None:
            return
        if exc_type is None:
            self._transaction.commit_async().result()
        else:
            self._transaction.abort()


def _drop_empty_relationships(chunk: bytes, record_bytes: int, related: list[np.uint64]) -> bytes:
    # The packed encoding reserves one id per relationship; a relationship without an
    # object (id 0) must be written as count 0 with no id.
    if all(value != 0 for value in related):
        return chunk
    parts = [chunk[:record_bytes]]
    for value in related:
        if value != 0:
            parts.append(struct.pack("<IQ", 1, int(value)))
        else:
            parts.append(struct.pack("<I", 0))
    return b"".join(parts)


def node_annotation_properties(nodes: NodeTable) -> list[AnnotationProperty]:
    """The properties SegScope stores with each node annotation.

    ``compartment`` (int8 enum, -1 = "none"), ``p_<compartment>`` (float32 probabilities),
    ``ood_score`` (float32, NaN = none), ``manual_label`` (uint16 enum over the distinct
    labels, 0 = "none") and ``node_id`` (int32 when every id fits, else omitted; the by-id
    annotation id is the node table row).
    """
    properties = [
        AnnotationProperty(
            "compartment",
            "int8",
            nodes.compartment.astype(np.int8),
            "predicted subcompartment",
            enum_values=[-1, *range(len(COMPARTMENTS))],
            enum_labels=["none", *COMPARTMENTS],
        )
    ]
    for code, name in enumerate(COMPARTMENTS):
        properties.append(
            AnnotationProperty(
                property_id(name, "p_"),
                "float32",
                nodes.compartment_probability[:, code],
                f"probability of {name}",
            )
        )
    properties.append(
        AnnotationProperty("ood_score", "float32", nodes.ood_score, "out-of-distribution score (NaN = none)")
    )
    labels = sorted({label for label in nodes.manual_label if label})
    if len(labels) >= 2**16 - 1:
        raise ValueError(f"{len(labels)} distinct manual labels; at most {2**16 - 2} fit a uint16 enum")
    code_of = {label: code for code, label in enumerate(labels, start=1)}
    properties.append(
        AnnotationProperty(
            "manual_label",
            "uint16",
            np.array([code_of.get(label, 0) for label in nodes.manual_label], dtype=np.uint16),
            "label given by hand",
            enum_values=list(range(len(labels) + 1)),
            enum_labels=["none", *labels],
        )
    )
    int32 = np.iinfo(np.int32)
    if len(nodes) == 0 or (nodes.node_id.min() >= int32.min and nodes.node_id.max() <= int32.max):
        properties.append(AnnotationProperty("node_id", "int32", nodes.node_id.astype(np.int32), "skeleton node id"))
    else:
        log.warning("node ids exceed int32; the node_id annotation property is omitted")
    return properties


def write_node_annotations(
    path: str | Path,
    nodes: NodeTable,
    *,
    limit: int = DEFAULT_SPATIAL_LIMIT,
    seed: int = 0,
    sharded: bool | None = None,
    force: bool = False,
) -> Generator[Progress, None, dict]:
    """Write one point annotation per node, related to its segment (generator).

    Annotation ids are the node table's row indices; the relationship is named
    ``"segment"`` (folder ``rel_segment``). See :func:`node_annotation_properties` for the
    properties; ``sharded`` as in :func:`write_point_annotations`. Returns the ``info`` dict.
    """
    return (
        yield from write_point_annotations(
            path,
            nodes.xyz_nm,
            node_annotation_properties(nodes),
            {"segment": nodes.segment_id},
            limit=limit,
            seed=seed,
            sharded=sharded,
            force=force,
        )
    )
