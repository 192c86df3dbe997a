"""SegScope dataset folders: image, segmentation, skeletons and ground-truth tables.

Layout (``DIR`` is the dataset folder)::

    DIR/dataset.json        {"format": "segscope-dataset", "version": 1, "name": str,
                             "seed": int or null, "generator_version": int or null,
                             "size_vox": [x, y, z], "voxel_size_nm": [x, y, z],
                             "image": "image", "segmentation": "segmentation",
                             "skeletons": "segmentation/skeletons",
                             ["meshes": "segmentation/mesh",]
                             "cell_types": [str, ...], "compartments": [str, ...]}
    DIR/image/              Neuroglancer precomputed uint8 image (raw encoding)
    DIR/segmentation/       Neuroglancer precomputed uint64 segmentation
                            (compressed_segmentation encoding); its ``info`` has
                            ``"skeletons": "skeletons"`` so Neuroglancer finds them
    DIR/segmentation/skeletons/
                            Neuroglancer precomputed skeletons (unsharded, positions in nm,
                            vertex attributes "radius" float32 nm and "compartment" uint8
                            indexing "compartments"); see ``segscope.analysis.skeletons``
    DIR/segmentation/mesh/  Neuroglancer precomputed legacy meshes (nm), named by the info's
                            ``"mesh": "mesh"``; see ``segscope.analysis.meshes`` (recorded as
                            ``"meshes"`` in dataset.json when present)
    DIR/nodes.parquet       segment_id uint64, node_id int64 (the vertex index, unique within
                            a segment), x_nm, y_nm, z_nm float64, compartment string
    DIR/edges.parquet       segment_id uint64, node_a int64, node_b int64 (node ids)
    DIR/segments.parquet    segment_id uint64, cell_id int64, cell_type string,
                            n_voxels int64, n_nodes int64
    DIR/synapses.parquet    optional (the demo has one): pre_segment, post_segment uint64,
                            x_nm, y_nm, z_nm float64 (``segscope.analysis.synapses``)

The paths in ``dataset.json`` are relative to ``DIR``. Arrays are ``[x, y, z]``; positions
are nm, ``nm = voxel_index * voxel_size_nm`` (a node at ``p`` nm lies in voxel
``floor(p / voxel_size_nm)``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS
from segscope.analysis.skeletons import UNKNOWN_COMPARTMENT, Skeleton, write_precomputed_skeletons

log = logging.getLogger(__name__)

FORMAT = "segscope-dataset"
FORMAT_VERSION = 1
#: Where a dataset's meshes live, relative to its folder (named in the segmentation's info too).
_MESHES = "segmentation/mesh"


class DatasetError(ValueError):
    """A dataset folder is malformed (wrong format, missing or inconsistent parts)."""


@dataclass(frozen=True)
class SegmentRecord:
    """One row of ``segments.parquet``."""

    segment_id: int
    cell_id: int
    cell_type: str
    n_voxels: int


def write_dataset_metadata(
    directory: Path,
    *,
    name: str,
    size_vox: Sequence[int],
    voxel_size_nm: Sequence[float] | np.ndarray,
    cell_types: Sequence[str],
    seed: int | None = None,
    generator_version: int | None = None,
) -> None:
    """Write ``dataset.json`` (the parts it names are written separately).

    ``"meshes"`` is recorded when ``DIR/segmentation/mesh`` holds a mesh ``info``: write the
    meshes first.
    """
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "seed": seed,
        "generator_version": generator_version,
        "size_vox": [int(v) for v in size_vox],
        "voxel_size_nm": [float(v) for v in voxel_size_nm],
        "image": "image",
        "segmentation": "segmentation",
        "skeletons": "segmentation/skeletons",
        "cell_types": list(cell_types),
        "compartments": list(COMPARTMENTS),
    }
    if (Path(directory) / _MESHES / "info").is_file():
        meta["meshes"] = _MESHES
    (Path(directory) / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_ground_truth(directory: Path, skeletons: Sequence[Skeleton], segments: Iterable[SegmentRecord]) -> None:
    """Write the skeletons (precomputed + Parquet node/edge tables) and the segment table.

    Skeletons go to ``DIR/segmentation/skeletons``; every segment needs a skeleton.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    segments = list(segments)
    by_id = {s.segment_id: s for s in skeletons}
    missing = [r.segment_id for r in segments if r.segment_id not in by_id]
    if missing:
        raise ValueError(f"segments without a skeleton: {missing[:5]}")
    write_precomputed_skeletons(directory / "segmentation" / "skeletons", skeletons)

    names = np.array([*COMPARTMENTS, "unknown"], dtype=object)
    seg_col, node_col, pos_col, comp_col = [], [], [], []
    e_seg, e_a, e_b = [], [], []
    for s in skeletons:
        n = s.n_nodes
        seg_col.append(np.full(n, s.segment_id, dtype=np.uint64))
        node_col.append(np.arange(n, dtype=np.int64))
        pos_col.append(s.nodes_nm)
        codes = np.full(n, UNKNOWN_COMPARTMENT, np.uint8) if s.compartment is None else s.compartment
        comp_col.append(names[np.minimum(codes, len(COMPARTMENTS))])
        e_seg.append(np.full(len(s.edges), s.segment_id, dtype=np.uint64))
        e_a.append(s.edges[:, 0])
        e_b.append(s.edges[:, 1])
    pos = np.concatenate(pos_col) if pos_col else np.zeros((0, 3))
    nodes = pa.table(
        {
            "segment_id": pa.array(np.concatenate(seg_col) if seg_col else [], pa.uint64()),
            "node_id": pa.array(np.concatenate(node_col) if node_col else [], pa.int64()),
            "x_nm": pa.array(pos[:, 0], pa.float64()),
            "y_nm": pa.array(pos[:, 1], pa.float64()),
            "z_nm": pa.array(pos[:, 2], pa.float64()),
            "compartment": pa.array(np.concatenate(comp_col).tolist() if comp_col else [], pa.string()),
        }
    )
    edges = pa.table(
        {
            "segment_id": pa.array(np.concatenate(e_seg) if e_seg else [], pa.uint64()),
            "node_a": pa.array(np.concatenate(e_a) if e_a else [], pa.int64()),
            "node_b": pa.array(np.concatenate(e_b) if e_b else [], pa.int64()),
        }
    )
    table = pa.table(
        {
            "segment_id": pa.array([r.segment_id for r in segments], pa.uint64()),
            "cell_id": pa.array([r.cell_id for r in segments], pa.int64()),
            "cell_type": pa.array([r.cell_type for r in segments], pa.string()),
            "n_voxels": pa.array([r.n_voxels for r in segments], pa.int64()),
            "n_nodes": pa.array([by_id[r.segment_id].n_nodes for r in segments], pa.int64()),
        }
    )
    pq.write_table(nodes, directory / "nodes.parquet")
    pq.write_table(edges, directory / "edges.parquet")
    pq.write_table(table, directory / "segments.parquet")


class Dataset:
    """An opened SegScope dataset folder (see the module docstring for the layout).

    Tables are pyarrow Tables; volumes open on first use through
    ``segscope.analysis.volume.open_volume``.
    """

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.name: str = meta.get("name", path.name)
        self.voxel_size_nm = np.asarray(meta["voxel_size_nm"], dtype=np.float64)
        self.size_vox = np.asarray(meta["size_vox"], dtype=np.int64)
        self.cell_types: tuple[str, ...] = tuple(meta.get("cell_types", ()))
        self.compartments: tuple[str, ...] = tuple(meta.get("compartments", COMPARTMENTS))

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, size_vox={self.size_vox.tolist()})"

    def _part(self, key: str) -> Path:
        return self.path / self.meta[key]

    @property
    def meshes(self) -> Path | None:
        """The dataset's precomputed mesh folder, or None when it has none (older datasets)."""
        name = self.meta.get("meshes")
        return self.path / name if isinstance(name, str) and (self.path / name / "info").is_file() else None

    @cached_property
    def image(self):
        """The EM image as an ``segscope.analysis.volume.Volume`` (uint8, [x, y, z])."""
        from segscope.analysis.volume import open_volume

        return open_volume(self._part("image"))

    @cached_property
    def segmentation(self):
        """The segmentation as an ``segscope.analysis.volume.Volume`` (uint64, [x, y, z])."""
        from segscope.analysis.volume import open_volume

        return open_volume(self._part("segmentation"))

    def _table(self, filename: str):
        import pyarrow.parquet as pq

        path = self.path / filename
        if not path.is_file():
            raise DatasetError(f"dataset {self.path} has no {filename}")
        return pq.read_table(path)

    @cached_property
    def nodes(self):
        """Skeleton nodes (pyarrow Table: segment_id, node_id, x_nm, y_nm, z_nm, compartment)."""
        return self._table("nodes.parquet")

    @cached_property
    def edges(self):
        """Skeleton edges (pyarrow Table: segment_id, node_a, node_b)."""
        return self._table("edges.parquet")

    @cached_property
    def segments(self):
        """Segment table (pyarrow Table: segment_id, cell_id, cell_type, n_voxels, n_nodes)."""
        return self._table("segments.parquet")

    @cached_property
    def segment_ids(self) -> np.ndarray:
        """uint64 [S] ids of all segments, in table order."""
        return np.asarray(self.segments["segment_id"], dtype=np.uint64)

    def cell_type(self, segment_id: int) -> str:
        """Ground-truth cell type of a segment (KeyError naming the id when unknown)."""
        return str(self.segments["cell_type"][self._segment_row(segment_id)])

    def _segment_row(self, segment_id: int) -> int:
        rows = np.nonzero(self.segment_ids == np.uint64(segment_id))[0]
        if len(rows) == 0:
            raise KeyError(f"segment {int(segment_id)} is not in dataset {self.path}")
        return int(rows[0])

    @cached_property
    def _node_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Nodes sorted by (segment, node id): ids, starts, ends of each run, xyz, codes."""
        seg = np.asarray(self.nodes["segment_id"], dtype=np.uint64)
        node_id = np.asarray(self.nodes["node_id"], dtype=np.int64)
        order = np.lexsort((node_id, seg))
        seg = seg[order]
        xyz = np.stack(
            [np.asarray(self.nodes[c], dtype=np.float64)[order] for c in ("x_nm", "y_nm", "z_nm")],
            axis=1,
        )
        lookup = {name: i for i, name in enumerate(self.compartments)}
        names = np.asarray(self.nodes["compartment"].to_numpy(zero_copy_only=False))[order]
        uniq, inverse = np.unique(names, return_inverse=True)
        code_of = np.array([lookup.get(u, UNKNOWN_COMPARTMENT) for u in uniq], dtype=np.uint8)
        codes = code_of[inverse] if len(uniq) else np.zeros(0, np.uint8)
        ids, starts = np.unique(seg, return_index=True)
        ends = np.append(starts[1:], len(seg))
        return ids, starts, ends, xyz, codes

    @cached_property
    def _edge_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        seg = np.asarray(self.edges["segment_id"], dtype=np.uint64)
        order = np.argsort(seg, kind="stable")
        seg = seg[order]
        pairs = np.stack(
            [np.asarray(self.edges[c], dtype=np.int64)[order] for c in ("node_a", "node_b")],
            axis=1,
        )
        ids, starts = np.unique(seg, return_index=True)
        ends = np.append(starts[1:], len(seg))
        return ids, starts, ends, pairs

    def skeleton(self, segment_id: int) -> Skeleton:
        """The ground-truth skeleton of a segment, nodes in nm with compartments.

        Raises KeyError naming the id when the dataset has no such segment.
        """
        segment_id = int(segment_id)
        ids, starts, ends, xyz, codes = self._node_index
        i = int(np.searchsorted(ids, np.uint64(segment_id)))
        if i >= len(ids) or ids[i] != np.uint64(segment_id):
            raise KeyError(f"segment {segment_id} has no skeleton in dataset {self.path}")
        e_ids, e_starts, e_ends, pairs = self._edge_index
        j = int(np.searchsorted(e_ids, np.uint64(segment_id)))
        if j < len(e_ids) and e_ids[j] == np.uint64(segment_id):
            edges = pairs[e_starts[j] : e_ends[j]]
        else:
            edges = np.zeros((0, 2), np.int64)
        return Skeleton(
            segment_id=segment_id,
            nodes_nm=xyz[starts[i] : ends[i]],
            edges=edges,
            compartment=codes[starts[i] : ends[i]],
        )


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a SegScope dataset folder.

    Raises
    ------
    FileNotFoundError
        The folder or its ``dataset.json`` does not exist.
    DatasetError
        ``dataset.json`` is not a SegScope dataset description of a supported version, or a
        part it names is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist")
    meta_path = path / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a SegScope dataset: no dataset.json in it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{meta_path}: dataset format version {meta.get('version')!r} is not supported "
            f"(this SegScope reads version {FORMAT_VERSION})"
        )
    for key in ("size_vox", "voxel_size_nm", "image", "segmentation"):
        if key not in meta:
            raise DatasetError(f"{meta_path} lacks {key!r}")
    for key in ("image", "segmentation"):
        if not (path / meta[key]).is_dir():
            raise DatasetError(f"dataset {path}: its {key} folder {meta[key]!r} is missing")
    return Dataset(path, meta)


def dataset_beside(segmentation_url: str) -> dict | None:
    """``dataset.json`` (plus ``"path"``) of the SegScope dataset whose segmentation this is, or None."""
    from segscope.analysis.artefacts import local_folder

    folder = local_folder(segmentation_url)
    if folder is None or not folder.is_dir():
        return None
    meta_path = folder.resolve().parent / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or (meta_path.parent / str(meta.get("segmentation", ""))).resolve() != folder.resolve()
    ):
        return None
    return dict(meta, path=str(meta_path.parent))
