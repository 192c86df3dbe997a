"""Where a segment's skeleton comes from: the user's files, SegScope's cache, or kimimaro.

One abstraction serves ``segscope embed --skeletons`` and the app's click:

* :func:`open_skeleton_source` reads what a user has, all in nm, xyz:

  - a Neuroglancer precomputed skeleton folder (``info`` plus one file per segment);
  - a folder of SWC files named ``<segment id>.swc`` (SegScope's SWC convention:
    coordinates and radius in nm, types 1 soma, 2 axon, 3/4 dendrite, 7 glia);
  - a CSV or Parquet node table with columns ``segment_id, node_id, x_nm, y_nm, z_nm`` and
    optionally ``parent`` (the parent's ``node_id``; empty, negative or absent for a root).

* :class:`SegmentSkeletons` answers "the skeleton of segment S" for any segment: the given
  source's when it has one, else the cached one SegScope made earlier, else it runs
  :func:`segscope.analysis.skeletonise.skeletonise_segment` around a seed voxel (the click,
  a voxel the segment list recorded, or found by a scan) and caches the result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT
from segscope.analysis.progress import Progress
from segscope.analysis.skeletons import Skeleton

log = logging.getLogger(__name__)

#: Columns a node table must have.
NODE_TABLE_COLUMNS = ("segment_id", "node_id", "x_nm", "y_nm", "z_nm")
#: SWC type code -> compartment name (3 basal and 4 apical dendrite are both dendrite).
_COMPARTMENT_OF_SWC_TYPE = {1: "soma", 2: "axon", 3: "dendrite", 4: "dendrite", 7: "glia"}


class SkeletonSource:
    """Skeletons a user supplies. Subclasses read one format.

    Attributes
    ----------
    location : str
        The folder or file, as given.
    kind : str
        ``"precomputed"``, ``"swc"`` or ``"table"``.
    """

    kind = ""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)

    def get(self, segment_id: int) -> Skeleton | None:
        """The skeleton of ``segment_id``, or None when the source has none."""
        raise NotImplementedError

    def segment_ids(self) -> list[int]:
        """Ids of every segment with a skeleton here, ascending."""
        raise NotImplementedError

    @property
    def has_compartments(self) -> bool:
        """Whether the skeletons carry per-node compartment labels."""
        return False

    @property
    def precomputed_folder(self) -> Path | None:
        """A precomputed skeleton folder Neuroglancer can show, when this source is one."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class PrecomputedSkeletons(SkeletonSource):
    """An unsharded Neuroglancer precomputed skeleton folder."""

    kind = "precomputed"

    def __init__(self, folder: str | os.PathLike):
        from segscope.analysis.skeletons import read_skeleton_info

        super().__init__(folder)
        self.folder = Path(folder)
        self.info = read_skeleton_info(self.folder)

    def get(self, segment_id: int) -> Skeleton | None:
        from segscope.analysis.skeletons import read_precomputed_skeleton

        try:
            return read_precomputed_skeleton(self.folder, segment_id, self.info)
        except KeyError:
            return None

    def segment_ids(self) -> list[int]:
        return sorted(int(p.name) for p in self.folder.iterdir() if p.name.isdigit() and p.is_file())

    @property
    def has_compartments(self) -> bool:
        return any(a.get("id") == "compartment" for a in self.info.get("vertex_attributes", []))

    @property
    def precomputed_folder(self) -> Path | None:
        return self.folder


class SwcSkeletons(SkeletonSource):
    """A folder of ``<segment id>.swc`` files (nm; node id = sample number - 1 when they count from 1)."""

    kind = "swc"

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder)
        self.folder = Path(folder)

    def get(self, segment_id: int) -> Skeleton | None:
        from segscope.analysis.export.swc import read_swc

        path = self.folder / f"{int(segment_id)}.swc"
        if not path.is_file():
            return None
        rows = read_swc(path)
        if not len(rows):
            raise ValueError(f"{path} holds no nodes")
        samples = rows[:, 0].astype(np.int64)
        row_of = {int(s): i for i, s in enumerate(samples)}
        if len(row_of) != len(samples):
            raise ValueError(f"{path}: sample numbers repeat")
        edges = []
        for row, parent in enumerate(rows[:, 6].astype(np.int64)):
            if parent < 0:
                continue
            if int(parent) not in row_of:
                raise ValueError(
                    f"{path}: sample {int(samples[row])} names parent {int(parent)}, which is not in the file"
                )
            edges.append((row, row_of[int(parent)]))
        lookup = {name: code for code, name in enumerate(COMPARTMENTS)}
        types = rows[:, 1].astype(np.int64)
        compartment = np.array(
            [lookup.get(_COMPARTMENT_OF_SWC_TYPE.get(int(t), ""), UNKNOWN_COMPARTMENT) for t in types], np.uint8
        )
        labelled = bool((compartment != UNKNOWN_COMPARTMENT).any())
        return Skeleton(
            int(segment_id),
            rows[:, 2:5],
            np.array(edges, dtype=np.int64).reshape(-1, 2),
            compartment=compartment if labelled else None,
            radius_nm=rows[:, 5].astype(np.float32),
        )

    def segment_ids(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.swc") if p.stem.isdigit())


class TableSkeletons(SkeletonSource):
    """A CSV or Parquet node table (``segment_id, node_id, x_nm, y_nm, z_nm[, parent]``), read once."""

    kind = "table"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.path = Path(path)
        table = _read_node_table(self.path)
        missing = [c for c in NODE_TABLE_COLUMNS if c not in table]
        if missing:
            raise ValueError(
                f"{self.path} lacks the node table columns {missing} (needs {', '.join(NODE_TABLE_COLUMNS)})"
            )
        segment = np.asarray(table["segment_id"], dtype=np.uint64)
        order = np.argsort(segment, kind="stable")
        self._segment = segment[order]
        self._node = np.asarray(table["node_id"], dtype=np.int64)[order]
        self._xyz = np.stack([np.asarray(table[c], dtype=np.float64) for c in ("x_nm", "y_nm", "z_nm")], axis=1)[order]
        if not np.all(np.isfinite(self._xyz)):
            raise ValueError(f"{self.path}: node positions must be finite numbers")
        parent = table.get("parent")
        self._parent = None if parent is None else np.asarray(parent, dtype=np.float64)[order]
        self._ids, self._starts = np.unique(self._segment, return_index=True)

    def get(self, segment_id: int) -> Skeleton | None:
        index = int(np.searchsorted(self._ids, np.uint64(segment_id)))
        if index >= len(self._ids) or int(self._ids[index]) != int(segment_id):
            return None
        start = int(self._starts[index])
        end = int(self._starts[index + 1]) if index + 1 < len(self._starts) else len(self._segment)
        nodes = self._node[start:end]
        row_of = {int(n): i for i, n in enumerate(nodes)}
        if len(row_of) != len(nodes):
            raise ValueError(f"{self.path}: segment {int(segment_id)} repeats node ids")
        edges = []
        if self._parent is not None:
            for row, parent in enumerate(self._parent[start:end]):
                if not np.isfinite(parent) or parent < 0:
                    continue
                if int(parent) not in row_of:
                    raise ValueError(
                        f"{self.path}: segment {int(segment_id)} node {int(nodes[row])} names parent "
                        f"{int(parent)}, which is not among its nodes"
                    )
                edges.append((row, row_of[int(parent)]))
        return Skeleton(int(segment_id), self._xyz[start:end], np.array(edges, dtype=np.int64).reshape(-1, 2))

    def segment_ids(self) -> list[int]:
        return [int(i) for i in self._ids]


def _read_node_table(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV or Parquet table as numpy arrays (nulls as NaN in numeric columns)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        else:
            raise ValueError(f"a skeleton node table must be .csv or .parquet, got {path}")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read the node table {path}: {exc}") from exc
    if len(set(table.column_names)) != len(table.column_names):
        raise ValueError(f"{path}: repeated column names in {table.column_names}")
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            if name in ("segment_id", "node_id") and column.null_count:
                raise ValueError(f"{path}: column {name} has empty values")
            columns[name] = column.to_numpy() if not column.null_count else column.cast(pa.float64()).to_numpy()
        elif name in NODE_TABLE_COLUMNS or name == "parent":
            raise ValueError(f"{path}: column {name} must be numeric, got {column.type}")
    return columns


def open_skeleton_source(location: str | os.PathLike) -> SkeletonSource:
    """Open the skeletons at ``location`` (a local folder or file), choosing the reader by content.

    Raises
    ------
    FileNotFoundError
        Nothing at ``location``.
    ValueError
        A remote URL, a folder with neither ``info`` nor ``*.swc`` files, an unreadable
        ``info``, or a table without the needed columns.
    """
    from segscope.analysis.artefacts import local_folder

    path = local_folder(str(location))
    if path is None:
        raise ValueError(f"skeletons must be a local folder or file for now, got {location!r}")
    if not path.exists():
        raise FileNotFoundError(f"no skeletons at {path}")
    if path.is_file():
        return TableSkeletons(path)
    if (path / "info").is_file():
        return PrecomputedSkeletons(path)
    if any(path.glob("*.swc")):
        return SwcSkeletons(path)
    raise ValueError(
        f"{path} holds neither a precomputed skeleton info nor <segment id>.swc files; "
        "give a precomputed skeleton folder, a folder of SWC files or a CSV/Parquet node table"
    )


# -- any segment's skeleton -------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSkeleton:
    """The skeleton of one segment and where it came from.

    Attributes
    ----------
    skeleton : Skeleton
    origin : str
        ``"given"`` (the user's source), ``"cached"`` (made earlier by SegScope),
        ``"skeletonised"`` (made now) or ``"truncated"`` (made now inside the box limit:
        the part of the segment within it).
    note : str
        One line for the user when the origin deserves a word.
    """

    skeleton: Skeleton
    origin: str
    note: str = ""


class SegmentSkeletons:
    """Skeletons of any segment of a segmentation: given, cached, or made with kimimaro.

    Parameters
    ----------
    segmentation
        The segmentation volume.
    given
        The user's skeletons, or None.
    max_box_vox
        Largest box edge (voxels per axis) a segment is skeletonised in.
    cache_root
        Folder of skeleton caches (default ``<user cache>/skeletons``); ``False`` turns the
        cache off.
    """

    def __init__(
        self,
        segmentation,
        given: SkeletonSource | None = None,
        *,
        max_box_vox: int | Sequence[int] | None = None,
        cache_root: str | os.PathLike | bool | None = None,
    ):
        from segscope.analysis.skeletonise import DEFAULT_MAX_BOX_VOX, SkeletonCache

        self.segmentation = segmentation
        self.given = given
        self.max_box_vox = DEFAULT_MAX_BOX_VOX if max_box_vox is None else max_box_vox
        if np.any(np.asarray(self.max_box_vox) < 1):
            raise ValueError(f"the skeleton box limit must be at least 1 voxel, got {self.max_box_vox}")
        self.cache = (
            None
            if cache_root is False
            else SkeletonCache(segmentation, None if cache_root is None or cache_root is True else cache_root)
        )

    def resolve(
        self,
        segment_id: int,
        *,
        seed_vox: Sequence[int] | np.ndarray | None = None,
        click_nm: Sequence[float] | np.ndarray | None = None,
        search_box_vox: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> Generator[Progress, None, SegmentSkeleton]:
        """The skeleton of ``segment_id``; skeletonises it when no source has one.

        The seed of the skeletonisation box is ``seed_vox``, else the voxel of ``click_nm``,
        else the first voxel of the segment a block scan of ``search_box_vox`` (default: the
        whole volume) finds.

        Raises
        ------
        SegmentNotFoundError
            When the segment has no voxel where it is looked for.
        """
        from segscope.analysis.skeletonise import skeletonise_segment

        segment_id = int(segment_id)
        if self.given is not None:
            skeleton = self.given.get(segment_id)
            if skeleton is not None and skeleton.n_nodes:
                return SegmentSkeleton(skeleton, "given")
        if self.cache is not None:
            cached = self.cache.get(segment_id)
            if cached is not None:
                return SegmentSkeleton(cached, "cached")
        if seed_vox is None and click_nm is not None:
            seed_vox = self.segmentation.nm_to_voxel(np.asarray(click_nm, dtype=np.float64))
            if not bool(self.segmentation.contains_voxel(seed_vox)):
                seed_vox = None
        if seed_vox is None:
            from segscope.analysis.segment_list import find_segment_voxel

            seed_vox = yield from find_segment_voxel(self.segmentation, segment_id, box_vox=search_box_vox)
        result = yield from skeletonise_segment(self.segmentation, segment_id, seed_vox, max_box_vox=self.max_box_vox)
        if result.truncated:
            limit = np.broadcast_to(np.asarray(self.max_box_vox), (3,))
            note = (
                f"skeleton covers only the {'x'.join(str(int(v)) for v in limit)}-voxel box around the "
                "click (the segment reaches beyond it; raise the skeleton box limit to cover more)"
            )
            return SegmentSkeleton(result.skeleton, "truncated", note)
        if self.cache is not None:
            try:
                self.cache.put(result.skeleton)
            except OSError as exc:
                log.warning("could not cache the skeleton of segment %d in %s: %s", segment_id, self.cache.folder, exc)
        return SegmentSkeleton(
            result.skeleton, "skeletonised", f"skeletonised from the segmentation ({result.skeleton.n_nodes} nodes)"
        )
