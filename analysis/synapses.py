"""Synapse tables: contact sites in a segmentation, reading and writing synapse lists.

A synapse table has one row per synapse: ``pre_segment`` and ``post_segment`` (uint64
segment ids) and its position ``x_nm, y_nm, z_nm`` (float64, nm). It is read from Parquet
or CSV; as a Neuroglancer layer it is a precomputed point annotation layer whose
annotations relate to their ``pre_segment`` and ``post_segment`` (so Neuroglancer lists a
segment's synapses when it is selected).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis.progress import Progress

log = logging.getLogger(__name__)

SYNAPSE_COLUMNS: tuple[str, ...] = ("pre_segment", "post_segment", "x_nm", "y_nm", "z_nm")

__all__ = [
    "SYNAPSE_COLUMNS",
    "ContactSites",
    "SynapseTable",
    "SynapseTableError",
    "contact_sites",
    "read_synapse_table",
    "write_synapse_annotations",
    "write_synapse_table",
]


class SynapseTableError(ValueError):
    """A synapse table is missing columns or holds values that cannot be synapses."""


@dataclass(frozen=True)
class SynapseTable:
    """Synapses: ``pre`` and ``post`` uint64 ``[N]`` segment ids, ``xyz_nm`` float64 ``[N, 3]``."""

    pre: np.ndarray
    post: np.ndarray
    xyz_nm: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.pre)
        if np.shape(self.post) != (n,) or np.shape(self.xyz_nm) != (n, 3):
            raise SynapseTableError(
                f"synapse arrays disagree: pre {np.shape(self.pre)}, post {np.shape(self.post)}, "
                f"xyz_nm {np.shape(self.xyz_nm)} (expected [N], [N], [N, 3])"
            )

    def __len__(self) -> int:
        return len(self.pre)


@dataclass(frozen=True)
class ContactSites:
    """Where segments touch (face-adjacent voxels of two different non-zero segments).

    Attributes
    ----------
    pairs : np.ndarray
        uint64 ``[P, 2]`` touching segment pairs, smaller id first, sorted.
    n_faces : np.ndarray
        int64 ``[P]`` voxel faces each pair shares (a contact area in voxel faces).
    face_xyz_nm : np.ndarray
        float64 ``[F, 3]`` centre of every shared face, nm, grouped by pair.
    face_start : np.ndarray
        int64 ``[P + 1]``: pair ``p``'s faces are rows ``face_start[p]:face_start[p + 1]``.
    """

    pairs: np.ndarray
    n_faces: np.ndarray
    face_xyz_nm: np.ndarray
    face_start: np.ndarray


def contact_sites(segmentation: np.ndarray, voxel_size_nm) -> ContactSites:
    """Contact sites of a uint64 ``[x, y, z]`` segmentation (0 = background).

    A face between voxels ``i`` and ``i + e_axis`` lies at ``(i + 0.5 + 0.5 e_axis) *
    voxel_size_nm`` nm (voxel centres are at ``(i + 0.5) * voxel_size_nm``).
    """
    seg = np.asarray(segmentation)
    voxel = np.asarray(voxel_size_nm, dtype=np.float64).reshape(-1)
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be a 3-D [x, y, z] array, got shape {seg.shape}")
    if voxel.shape != (3,) or np.any(voxel <= 0):
        raise ValueError(f"voxel_size_nm must be three positive sizes, got {voxel_size_nm!r}")
    keys_a, keys_b, positions = [], [], []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        a, b = seg[tuple(lo)], seg[tuple(hi)]
        where = (a != b) & (a != 0) & (b != 0)
        idx = np.nonzero(where)
        va, vb = a[idx], b[idx]
        keys_a.append(np.minimum(va, vb))
        keys_b.append(np.maximum(va, vb))
        centre = np.stack(idx, axis=1).astype(np.float64) + 0.5
        centre[:, axis] += 0.5
        positions.append(centre * voxel)
    first = np.concatenate(keys_a).astype(np.uint64)
    second = np.concatenate(keys_b).astype(np.uint64)
    xyz = np.concatenate(positions) if positions else np.zeros((0, 3))
    order = np.lexsort((second, first))
    first, second, xyz = first[order], second[order], xyz[order]
    if len(first) == 0:
        return ContactSites(np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), xyz, np.zeros(1, np.int64))
    new = np.r_[True, (first[1:] != first[:-1]) | (second[1:] != second[:-1])]
    starts = np.flatnonzero(new)
    face_start = np.r_[starts, len(first)].astype(np.int64)
    pairs = np.stack([first[starts], second[starts]], axis=1)
    return ContactSites(pairs, np.diff(face_start), xyz, face_start)


def _check_ids(name: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise SynapseTableError(f"column {name!r} must hold integer segment ids (found NaN or fractions)")
    elif values.dtype.kind not in "iu":
        raise SynapseTableError(f"column {name!r} must hold integer segment ids, got {values.dtype}")
    if len(values) and (values.min() <= 0 if values.dtype.kind != "u" else values.min() == 0):
        raise SynapseTableError(f"column {name!r} holds 0 or negative ids (segment ids are 1..2^64-1)")
    return values.astype(np.uint64)


def read_synapse_table(path: str | os.PathLike) -> SynapseTable:
    """Read a synapse table from Parquet (``.parquet``) or CSV (any other suffix).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    SynapseTableError
        A column of :data:`SYNAPSE_COLUMNS` is missing, or ids / positions are invalid.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synapse table {path} does not exist")
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            # Ids above 2^63 do not fit int64: read the id columns as uint64.
            options = pacsv.ConvertOptions(column_types={"pre_segment": pa.uint64(), "post_segment": pa.uint64()})
            table = pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SynapseTableError(f"{path} is not a readable synapse table: {exc}") from exc
    missing = [c for c in SYNAPSE_COLUMNS if c not in table.column_names]
    if missing:
        raise SynapseTableError(
            f"synapse table {path} lacks column(s) {', '.join(missing)}; "
            f"expected {', '.join(SYNAPSE_COLUMNS)} (positions in nm)"
        )
    for column in SYNAPSE_COLUMNS:
        if table.column(column).null_count:
            raise SynapseTableError(f"synapse table {path}: column {column!r} has empty values")
    pre = _check_ids("pre_segment", table.column("pre_segment").to_numpy())
    post = _check_ids("post_segment", table.column("post_segment").to_numpy())
    try:
        xyz = np.stack([table.column(c).to_numpy().astype(np.float64) for c in ("x_nm", "y_nm", "z_nm")], axis=1)
    except (ValueError, TypeError) as exc:
        raise SynapseTableError(f"synapse table {path}: positions x_nm, y_nm, z_nm must be numbers") from exc
    if not np.isfinite(xyz).all():
        raise SynapseTableError(f"synapse table {path}: positions hold NaN or infinite values")
    return SynapseTable(pre, post, xyz.reshape(-1, 3))


def synapse_arrow_table(synapses: SynapseTable):
    """``synapses`` as a pyarrow Table with :data:`SYNAPSE_COLUMNS`."""
    import pyarrow as pa

    return pa.table(
        {
            "pre_segment": pa.array(synapses.pre, pa.uint64()),
            "post_segment": pa.array(synapses.post, pa.uint64()),
            "x_nm": pa.array(synapses.xyz_nm[:, 0], pa.float64()),
            "y_nm": pa.array(synapses.xyz_nm[:, 1], pa.float64()),
            "z_nm": pa.array(synapses.xyz_nm[:, 2], pa.float64()),
        }
    )


def write_synapse_table(path: str | os.PathLike, synapses: SynapseTable, *, force: bool = False) -> Path:
    """Write ``synapses`` as Parquet (``.parquet``) or CSV (``.csv``), atomically."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from segscope.analysis.export.atomic import atomic_file

    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise ValueError(f"synapse table {path} must end in .parquet or .csv")
    table = synapse_arrow_table(synapses)
    with atomic_file(path, force=force) as tmp:
        if path.suffix == ".parquet":
            pq.write_table(table, tmp)
        else:
            pacsv.write_csv(table, tmp)
    return path


def write_synapse_annotations(
    path: str | os.PathLike, synapses: SynapseTable, *, force: bool = False
) -> Generator[Progress, None, dict]:
    """Write ``synapses`` as a Neuroglancer precomputed point annotation layer (generator).

    Each point relates to ``pre_segment`` and ``post_segment``; annotation ids are the
    table's row numbers. Returns the layer's ``info``.
    """
    from segscope.analysis.export.annotations import write_point_annotations

    return (
        yield from write_point_annotations(
            Path(path),
            synapses.xyz_nm,
            relationships={"pre_segment": synapses.pre, "post_segment": synapses.post},
            force=force,
        )
    )
