"""Skeletons on demand: kimimaro (TEASAR) on a segment's mask inside a bounded, growing box.

A segment with no skeleton is skeletonised from the segmentation itself. The mask is read in
a box around a seed voxel (the user's click, or a voxel the segment list recorded); while
the segment touches a face of the box that is not the volume's boundary, the box grows on
that side, up to an edge of ``max_box_vox`` voxels per axis. A segment still touching the
box at that size is skeletonised as far as the box reaches (``truncated``), never read whole
from a volume of terabytes.

Results are cached as a Neuroglancer precomputed skeleton folder in the user cache
(:func:`skeleton_cache_dir`), keyed by the segmentation's URL and shape, so a segment is
skeletonised once. Positions are nm, ``[N, 3]`` xyz; boxes are absolute voxels, xyz.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis.progress import Progress
from segscope.analysis.skeletons import Skeleton
from segscope.analysis.volume import SegmentNotFoundError, Volume

log = logging.getLogger(__name__)

#: Largest box edge (voxels, per axis) a segment is skeletonised in, unless the caller
#: says otherwise. 512^3 voxels hold a bool mask of 128 MiB; kimimaro's distance fields
#: take about 8 bytes a voxel on top.
DEFAULT_MAX_BOX_VOX = 512
#: Most voxels a skeleton box may hold (a 2048^3 bool mask: 8 GiB), whatever the limit asks.
_MAX_BOX_VOXELS = 2048**3
#: Half-width (nm) of the first box around the seed.
START_HALF_WIDTH_NM = 2_000.0
#: Smallest first box half-width (voxels), so thin volumes still give kimimaro context.
_MIN_HALF_VOX = 16
#: Voxels read per slab when building a mask (bounds the uint64 read buffer to 32 MiB).
_SLAB_VOXELS = 4 * 1024**2
#: TEASAR parameters (nm): invalidation radius ``scale * DBF + const``. SegScope thins
#: skeletons to 1.5 um afterwards, so coarse, fast skeletons are enough.
TEASAR_PARAMS = {"scale": 4.0, "const": 500.0}
#: Connected pieces smaller than this (voxels) are left out, unless nothing else is left.
DUST_VOXELS = 100
#: Bumped whenever the skeletons written to the cache would change.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class SkeletoniseResult:
    """A skeleton made from a segment's mask.

    Attributes
    ----------
    skeleton : Skeleton
        Nodes in nm (voxel centres), edges, radius (nm) per node.
    box_lo_vox, box_hi_vox : numpy.ndarray
        int64 ``[3]`` the box the mask was read in, ``[lo, hi)`` absolute voxels, xyz.
    voxels : int
        Voxels of the segment in the box.
    truncated : bool
        The segment still touched a face of the box at the size limit: the skeleton
        covers the part inside the box only.
    """

    skeleton: Skeleton
    box_lo_vox: np.ndarray
    box_hi_vox: np.ndarray
    voxels: int
    truncated: bool


def read_segment_mask(segmentation: Volume, segment_id: int, lo_vox, hi_vox) -> np.ndarray:
    """The bool ``[x, y, z]`` mask of ``segment_id`` in ``[lo, hi)`` (absolute voxels).

    Read in z slabs so the segmentation's own dtype (uint64: 8 bytes a voxel) is never held
    for the whole box, only the 1-byte mask.
    """
    lo = np.asarray(lo_vox, dtype=np.int64)
    hi = np.asarray(hi_vox, dtype=np.int64)
    extent = hi - lo
    mask = np.zeros(tuple(int(v) for v in extent), dtype=bool)
    value = np.asarray(int(segment_id)).astype(segmentation.dtype)
    slab = max(1, _SLAB_VOXELS // max(1, int(extent[0] * extent[1])))
    for z in range(0, int(extent[2]), slab):
        z_hi = min(int(extent[2]), z + slab)
        block = segmentation.read((lo[0], lo[1], lo[2] + z), (hi[0], hi[1], lo[2] + z_hi))
        np.equal(block, value, out=mask[:, :, z:z_hi])
    return mask


def _touched_faces(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, vol_lo: np.ndarray, vol_hi: np.ndarray):
    """``[(axis, side)]`` of box faces the mask touches that are not the volume's own faces."""
    touched = []
    for axis in range(3):
        first = np.take(mask, 0, axis=axis)
        last = np.take(mask, mask.shape[axis] - 1, axis=axis)
        if lo[axis] > vol_lo[axis] and first.any():
            touched.append((axis, 0))
        if hi[axis] < vol_hi[axis] and last.any():
            touched.append((axis, 1))
    return touched


def _grown_box(lo, hi, touched, vol_lo, vol_hi, max_edge) -> tuple[np.ndarray, np.ndarray]:
    """The box grown on each touched face by its current edge, within the volume and the limit."""
    new_lo, new_hi = lo.copy(), hi.copy()
    for axis in {a for a, _ in touched}:
        sides = [s for a, s in touched if a == axis]
        edge = int(hi[axis] - lo[axis])
        room = max(0, int(max_edge[axis]) - edge)
        step = min(edge, room) // len(sides) if room else 0
        for side in sides:
            if side == 0:
                new_lo[axis] = max(int(vol_lo[axis]), int(lo[axis]) - step)
            else:
                new_hi[axis] = min(int(vol_hi[axis]), int(hi[axis]) + step)
    return new_lo, new_hi


def mask_skeleton(mask: np.ndarray, origin_vox, voxel_size_nm, segment_id: int) -> Skeleton:
    """Skeletonise a bool ``[x, y, z]`` mask with kimimaro; nodes in nm at voxel centres.

    Pieces under :data:`DUST_VOXELS` voxels are dropped unless nothing else is left. A
    segment too small for TEASAR to give any node (a few voxels) gets one node: the mask
    voxel nearest the mask's centroid, so every segment has at least one centre inside it.

    Raises
    ------
    SegmentNotFoundError
        When the mask is empty.
    """
    import kimimaro

    voxel = np.asarray(voxel_size_nm, dtype=np.float64)
    origin = np.asarray(origin_vox, dtype=np.int64)
    count = int(mask.sum())
    if count == 0:
        raise SegmentNotFoundError(f"segment {segment_id} has no voxels in the box")
    dust = DUST_VOXELS if count > DUST_VOXELS else 0
    skeletons = kimimaro.skeletonize(
        mask.view(np.uint8),
        teasar_params=dict(TEASAR_PARAMS),
        anisotropy=tuple(float(v) for v in voxel),
        dust_threshold=dust,
        fix_branching=True,
        fix_borders=True,
        progress=False,
        parallel=1,
    )
    found = skeletons.get(1)
    if found is None or len(found.vertices) == 0:
        voxels = np.argwhere(mask)
        centroid = voxels.mean(axis=0)
        nearest = voxels[np.argmin(np.linalg.norm((voxels - centroid) * voxel, axis=1))]
        nodes = ((nearest + origin + 0.5) * voxel)[None]
        log.info("segment %d (%d voxels) is too small for TEASAR: one node at its centre", segment_id, count)
        return Skeleton(segment_id, nodes, np.zeros((0, 2), np.int64), radius_nm=np.zeros(1, np.float32))
    # kimimaro places vertex i at index * anisotropy: shift to the box and the voxel centre.
    nodes = np.asarray(found.vertices, dtype=np.float64) + (origin + 0.5) * voxel
    return Skeleton(
        segment_id,
        nodes,
        np.asarray(found.edges, dtype=np.int64),
        radius_nm=np.asarray(found.radius, dtype=np.float32),
    )


@dataclass(frozen=True)
class SegmentBox:
    """The box read around a point and the segment's mask in it.

    Attributes
    ----------
    lo_vox, hi_vox : numpy.ndarray
        int64 ``[3]`` absolute voxel corners (xyz) of the box ``[lo, hi)``.
    mask : numpy.ndarray
        bool ``[x, y, z]`` (shape ``hi - lo``): voxels of the segment.
    truncated : bool
        The segment still touches a face of the box that is not the volume's own, but the
        box reached its size limit: the segment goes on outside it.
    reads : int
        How many boxes were read.
    """

    lo_vox: np.ndarray
    hi_vox: np.ndarray
    mask: np.ndarray
    truncated: bool
    reads: int = 1


def grow_segment_box(
    segmentation,
    segment_id: int,
    centre_vox: Sequence[int] | np.ndarray,
    *,
    initial_box_vox: Sequence[int] | None = None,
    max_box_vox: int | Sequence[int] = DEFAULT_MAX_BOX_VOX,
    start_half_width_nm: float = START_HALF_WIDTH_NM,
) -> Generator[Progress, None, SegmentBox]:
    """Read a segment's mask in a box around ``centre_vox``, growing it while the segment touches its faces.

    One growth rule for skeletons (:func:`skeletonise_segment`) and meshes made on demand
    (``segscope.analysis.meshes``): the box starts ``start_half_width_nm`` (at least 16
    voxels) either side of ``centre_vox`` (absolute voxel), or ``initial_box_vox`` (x, y, z
    voxels) centred on it when given, clipped to the volume; each side the segment touches
    (other than the volume's own faces) grows by the box's edge, until no side is touched
    or the box reaches ``max_box_vox`` (voxels per axis: one number or x, y, z) and the
    segment still touches it (``truncated``). Yields
    progress per box read.

    Raises
    ------
    segscope.analysis.volume.SegmentNotFoundError
        The segment has no voxel in the first box.
    ValueError
        For a centre outside the volume or non-positive box sizes.
    """
    segment_id = int(segment_id)
    origin = np.asarray(segmentation.origin_vox, dtype=np.int64)
    end = origin + np.asarray(segmentation.shape, dtype=np.int64)
    centre = np.asarray(centre_vox, dtype=np.int64).reshape(3)
    limit = np.broadcast_to(np.asarray(max_box_vox, dtype=np.int64), (3,)).copy()
    if np.any(limit < 1):
        raise ValueError(f"the box limit must be at least 1 voxel, got {max_box_vox}")
    if np.any(centre < origin) or np.any(centre >= end):
        raise ValueError(f"voxel {centre.tolist()} is outside the volume [{origin.tolist()}, {end.tolist()})")
    if initial_box_vox is None:
        half = np.maximum(
            np.ceil(start_half_width_nm / np.asarray(segmentation.voxel_size_nm)).astype(np.int64), _MIN_HALF_VOX
        )
        half = np.minimum(half, np.maximum(limit // 2, 1))
        lo, hi = np.maximum(centre - half, origin), np.minimum(centre + half + 1, end)
    else:
        initial = np.minimum(np.asarray(initial_box_vox, dtype=np.int64).reshape(3), limit)
        if np.any(initial < 1):
            raise ValueError(f"initial_box_vox must be positive, got {list(initial_box_vox)}")
        lo = np.maximum(centre - initial // 2, origin)
        hi = np.minimum(lo + initial, end)
    hi = np.minimum(hi, lo + limit)
    reads = 0
    while True:
        reads += 1
        shape = (hi - lo).tolist()
        yield Progress(reads, 0, "boxes", f"segment {segment_id}: reading {shape[0]}x{shape[1]}x{shape[2]} voxels")
        mask = read_segment_mask(segmentation, segment_id, lo, hi)
        if reads == 1 and not mask.any():
            raise SegmentNotFoundError(
                f"segment {segment_id} has no voxels in {segmentation.url!r} between voxels "
                f"{lo.tolist()} and {hi.tolist()} (around {centre.tolist()})"
            )
        touched = _touched_faces(mask, lo, hi, origin, end)
        if not touched:
            return SegmentBox(lo, hi, mask, False, reads)
        new_lo, new_hi = _grown_box(lo, hi, touched, origin, end, limit)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            return SegmentBox(lo, hi, mask, True, reads)
        lo, hi = new_lo, new_hi
        del mask


def skeletonise_segment(
    segmentation: Volume,
    segment_id: int,
    seed_vox: Sequence[int] | np.ndarray,
    *,
    max_box_vox: int | Sequence[int] = DEFAULT_MAX_BOX_VOX,
    start_half_width_nm: float = START_HALF_WIDTH_NM,
) -> Generator[Progress, None, SkeletoniseResult]:
    """Skeletonise ``segment_id`` in a box around ``seed_vox``, growing it while the segment touches its faces.

    Parameters
    ----------
    segmentation
        The segmentation volume.
    segment_id
        The segment.
    seed_vox
        Absolute voxel (xyz) in or near the segment: the click, or a voxel of the segment.
    max_box_vox
        Largest box edge per axis (voxels): one number or ``(x, y, z)``.
    start_half_width_nm
        Half-width of the first box (nm); at least 16 voxels.

    Yields
    ------
    Progress
        One per box read (``unit`` "boxes", total unknown), then one before kimimaro runs.

    Returns
    -------
    SkeletoniseResult

    Raises
    ------
    SegmentNotFoundError
        When the first box holds no voxel of the segment.
    ValueError
        For a seed outside the volume or a limit under 1 voxel.
    """
    seed = np.asarray(seed_vox, dtype=np.int64).reshape(3)
    max_edge = np.broadcast_to(np.asarray(max_box_vox, dtype=np.int64), (3,)).copy()
    if np.any(max_edge < 1):
        raise ValueError(f"the skeleton box limit must be at least 1 voxel, got {max_box_vox}")
    if math.prod(int(v) for v in max_edge) > _MAX_BOX_VOXELS:
        raise ValueError(
            f"a skeleton box limit of {'x'.join(str(int(v)) for v in max_edge)} voxels would need "
            f"more than {_MAX_BOX_VOXELS // 1024**3} GiB for the mask alone; give at most 2048 per axis"
        )
    if not bool(segmentation.contains_voxel(seed)):
        raise ValueError(f"seed voxel {seed.tolist()} lies outside {segmentation.url!r}")
    box = yield from grow_segment_box(
        segmentation, segment_id, seed, max_box_vox=max_box_vox, start_half_width_nm=start_half_width_nm
    )
    lo, hi, mask, truncated = box.lo_vox, box.hi_vox, box.mask, box.truncated
    count = int(mask.sum())
    if truncated:
        log.warning(
            "segment %d reaches beyond the %s-voxel box limit: skeletonised inside voxels %s to %s only",
            segment_id,
            "x".join(str(int(v)) for v in max_edge),
            lo.tolist(),
            hi.tolist(),
        )
    yield Progress(box.reads, 0, "boxes", f"segment {segment_id}: skeletonising {count} voxels")
    skeleton = mask_skeleton(mask, lo, segmentation.voxel_size_nm, segment_id)
    return SkeletoniseResult(skeleton, lo, hi, count, truncated)


# -- the cache ---------------------------------------------------------------------------------


def skeleton_cache_key(segmentation: Volume) -> str:
    """A short key for a segmentation: its URL, shape, origin, voxel size and dtype, and the cache version."""
    text = json.dumps(
        {
            "url": str(segmentation.url),
            "shape": [int(v) for v in segmentation.shape],
            "origin": [int(v) for v in segmentation.origin_vox],
            "voxel_nm": [float(v) for v in segmentation.voxel_size_nm],
            "dtype": str(segmentation.dtype),
            "teasar": TEASAR_PARAMS,
            "version": _CACHE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def skeleton_cache_dir(segmentation: Volume, root: str | os.PathLike | None = None) -> Path:
    """The precomputed skeleton folder caching ``segmentation``'s skeletons (created on first write).

    ``root`` defaults to ``<user cache>/skeletons`` (:func:`segscope.analysis.paths.user_cache_dir`).
    """
    if root is None:
        from segscope.analysis.paths import user_cache_dir

        root = user_cache_dir() / "skeletons"
    return Path(root) / skeleton_cache_key(segmentation)


class SkeletonCache:
    """Skeletons SegScope made for one segmentation, as a precomputed skeleton folder.

    Only complete skeletons are kept (a truncated one depends on where the box started).
    """

    def __init__(self, segmentation: Volume, root: str | os.PathLike | None = None):
        self.folder = skeleton_cache_dir(segmentation, root)
        self.segmentation_url = str(segmentation.url)

    def get(self, segment_id: int) -> Skeleton | None:
        """The cached skeleton of ``segment_id``, or None (also for an unreadable entry, which is logged)."""
        from segscope.analysis.skeletons import read_precomputed_skeleton

        if not (self.folder / str(int(segment_id))).is_file():
            return None
        try:
            return read_precomputed_skeleton(self.folder, segment_id)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring cached skeleton %d in %s: %s", segment_id, self.folder, exc)
            return None

    def put(self, skeleton: Skeleton) -> None:
        """Store ``skeleton`` (atomically; concurrent writers of the same id write the same bytes)."""
        from segscope.analysis.skeletons import write_precomputed_skeleton

        self.folder.mkdir(parents=True, exist_ok=True)
        source = self.folder / "source.json"
        if not source.is_file():
            source.write_text(json.dumps({"segmentation": self.segmentation_url, "teasar": TEASAR_PARAMS}) + "\n")
        write_precomputed_skeleton(self.folder, skeleton)
