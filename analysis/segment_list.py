"""Which segments a segmentation holds: chunked scans with progress, boxes and size filters.

``segscope embed --segments all`` on a volume SegScope did not make has no segment table to
read: :func:`enumerate_segments` scans the segmentation block by block (blocks aligned to its
storage chunks, a few tens of MiB each; blocks with no stored chunk are skipped where the
driver can tell), counts each id's voxels and keeps one voxel of each id, which seeds its
skeletonisation. :func:`find_segment_voxel` scans for one id and stops at the first block
holding it. Boxes are absolute voxels ``[lo, hi)``, xyz.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis.progress import Progress, RateMeter
from segscope.analysis.volume import SegmentNotFoundError, Volume

log = logging.getLogger(__name__)

#: Voxels per scanned block (uint64: 64 MiB).
_BLOCK_VOXELS = 8 * 1024**2


@dataclass(frozen=True)
class SegmentList:
    """Segments found in a region of a segmentation.

    Attributes
    ----------
    ids : numpy.ndarray
        uint64 ``[S]``, ascending, nonzero.
    voxel_counts : numpy.ndarray
        int64 ``[S]`` voxels of each segment in the scanned region.
    seed_vox : numpy.ndarray
        int64 ``[S, 3]`` one voxel (absolute, xyz) of each segment.
    """

    ids: np.ndarray
    voxel_counts: np.ndarray
    seed_vox: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def seed_of(self, segment_id: int) -> np.ndarray | None:
        """A voxel of ``segment_id``, or None when it was not found."""
        index = int(np.searchsorted(self.ids, np.uint64(segment_id)))
        if index < len(self.ids) and int(self.ids[index]) == int(segment_id):
            return self.seed_vox[index]
        return None


def parse_bbox(text: str, voxel_size_nm: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``"x0,y0,z0,x1,y1,z1"`` (voxels) or the same ending in ``nm`` (nanometres) as a voxel box.

    Nanometre boxes are widened to whole voxels (``floor(lo / voxel)``, ``ceil(hi / voxel)``).

    Raises
    ------
    ValueError
        Not six numbers, or a corner not below the other on every axis.
    """
    raw = text.strip().lower()
    in_nm = raw.endswith("nm")
    if in_nm:
        raw = raw[:-2]
    parts = [p for p in re.split(r"[,\s]+", raw) if p]
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise ValueError(
            f"--bbox must be x0,y0,z0,x1,y1,z1 (voxels, or nm with an 'nm' suffix), got {text!r}"
        ) from None
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ValueError(f"--bbox must be six numbers x0,y0,z0,x1,y1,z1, got {text!r}")
    lo, hi = values[:3], values[3:]
    if in_nm:
        voxel = np.asarray(voxel_size_nm, dtype=np.float64)
        lo_vox, hi_vox = np.floor(lo / voxel).astype(np.int64), np.ceil(hi / voxel).astype(np.int64)
    else:
        if np.any(values != np.round(values)):
            raise ValueError(f"--bbox in voxels takes whole numbers (add 'nm' for nanometres), got {text!r}")
        lo_vox, hi_vox = lo.astype(np.int64), hi.astype(np.int64)
    if np.any(hi_vox <= lo_vox):
        raise ValueError(f"--bbox {text!r}: each of x1, y1, z1 must be above x0, y0, z0")
    return lo_vox, hi_vox


def read_segment_ids_file(path: str | Path) -> list[int]:
    """Segment ids from a text file: one or more per line (comma or space separated), ``#`` comments.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A token that is not an id in 1..2^64-1 (its line named), or no id at all.
    """
    path = Path(path)
    ids: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        for token in re.split(r"[,\s]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            try:
                value = int(token)
            except ValueError:
                raise ValueError(f"{path}:{number}: {token!r} is not a segment id") from None
            if not 0 < value < 2**64:
                raise ValueError(f"{path}:{number}: segment id {value} is not in 1..2^64-1")
            ids.append(value)
    if not ids:
        raise ValueError(f"{path} lists no segment ids")
    return list(dict.fromkeys(ids))


def _clip_box(volume: Volume, box_vox) -> tuple[np.ndarray, np.ndarray]:
    vol_lo = np.asarray(volume.origin_vox, dtype=np.int64)
    vol_hi = vol_lo + np.asarray(volume.shape, dtype=np.int64)
    if box_vox is None:
        return vol_lo, vol_hi
    lo = np.maximum(np.asarray(box_vox[0], dtype=np.int64), vol_lo)
    hi = np.minimum(np.asarray(box_vox[1], dtype=np.int64), vol_hi)
    if np.any(hi <= lo):
        raise ValueError(
            f"the box {np.asarray(box_vox[0]).tolist()}..{np.asarray(box_vox[1]).tolist()} voxels "
            f"lies outside {volume.url!r} ({vol_lo.tolist()}..{vol_hi.tolist()})"
        )
    return lo, hi


def _block_shape(volume: Volume, extent: np.ndarray) -> np.ndarray:
    """Block shape: whole storage chunks (grown x, then y, then z) up to about ``_BLOCK_VOXELS``."""
    chunk = np.asarray(volume.chunk_shape or (64, 64, 64), dtype=np.int64)
    block = chunk.copy()
    for axis in range(3):
        while block[axis] < extent[axis] and math.prod(int(v) for v in block) * 2 <= _BLOCK_VOXELS:
            block[axis] *= 2
    return block


def iter_blocks(volume: Volume, lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks ``(lo, hi)`` covering ``[lo, hi)``, aligned to the storage chunk grid, z slowest."""
    block = _block_shape(volume, hi - lo)
    grid_origin = np.asarray(volume.origin_vox, dtype=np.int64)
    start = grid_origin + ((lo - grid_origin) // block) * block
    for z in range(int(start[2]), int(hi[2]), int(block[2])):
        for y in range(int(start[1]), int(hi[1]), int(block[1])):
            for x in range(int(start[0]), int(hi[0]), int(block[0])):
                corner = np.array([x, y, z], dtype=np.int64)
                yield np.maximum(corner, lo), np.minimum(corner + block, hi)


def _count_blocks(volume: Volume, lo: np.ndarray, hi: np.ndarray) -> int:
    block = _block_shape(volume, hi - lo)
    grid_origin = np.asarray(volume.origin_vox, dtype=np.int64)
    start = grid_origin + ((lo - grid_origin) // block) * block
    return math.prod(int(-(-(int(h) - int(s)) // int(b))) for s, h, b in zip(start, hi, block))


def _unique(block: np.ndarray):
    import fastremap

    return fastremap.unique(block, return_index=True, return_counts=True)


def enumerate_segments(
    volume: Volume,
    *,
    box_vox: tuple[Sequence[int], Sequence[int]] | None = None,
    min_voxels: int = 1,
) -> Generator[Progress, None, SegmentList]:
    """Every nonzero id in ``volume`` (or in ``box_vox``) with at least ``min_voxels`` voxels there.

    Yields
    ------
    Progress
        One per block (``unit`` "blocks").

    Returns
    -------
    SegmentList
        Ascending ids, their voxel counts in the region and one voxel of each.

    Raises
    ------
    ValueError
        A box outside the volume, or a segmentation that is not integer.
    """
    if not np.issubdtype(volume.dtype, np.integer):
        raise ValueError(f"{volume.url!r} is {volume.dtype}, not a segmentation of integer ids")
    lo, hi = _clip_box(volume, box_vox)
    total = _count_blocks(volume, lo, hi)
    counts: dict[int, int] = {}
    seeds: dict[int, tuple[int, ...]] = {}
    meter = RateMeter()
    skipped = 0
    for done, (block_lo, block_hi) in enumerate(iter_blocks(volume, lo, hi), start=1):
        if volume.is_stored(block_lo, block_hi) is False:
            skipped += 1
        else:
            block = volume.read(block_lo, block_hi)
            if block.any():
                values, first, block_counts = _unique(block)
                for value, index, count in zip(values.tolist(), first.tolist(), block_counts.tolist()):
                    if value == 0:
                        continue
                    if value not in counts:
                        counts[value] = 0
                        seeds[value] = tuple(int(v) for v in np.unravel_index(index, block.shape) + block_lo)
                    counts[value] += count
        yield Progress(done, total, "blocks", f"{len(counts)} segments found", rate=meter.rate(done))
    if skipped:
        log.info("skipped %d of %d blocks with no stored chunk", skipped, total)
    ids = np.array(sorted(k for k, v in counts.items() if v >= min_voxels), dtype=np.uint64)
    return SegmentList(
        ids,
        np.array([counts[int(i)] for i in ids], dtype=np.int64),
        np.array([seeds[int(i)] for i in ids], dtype=np.int64).reshape(-1, 3),
    )


def find_segment_voxel(
    volume: Volume,
    segment_id: int,
    *,
    box_vox: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """One voxel (absolute, int64 xyz) of ``segment_id``, scanning block by block until found.

    Raises
    ------
    SegmentNotFoundError
        When no block of the region holds the segment.
    """
    lo, hi = _clip_box(volume, box_vox)
    total = _count_blocks(volume, lo, hi)
    value = np.asarray(int(segment_id)).astype(volume.dtype)
    for done, (block_lo, block_hi) in enumerate(iter_blocks(volume, lo, hi), start=1):
        if volume.is_stored(block_lo, block_hi) is not False:
            block = volume.read(block_lo, block_hi)
            hit = np.flatnonzero(block.reshape(-1) == value)
            if len(hit):
                return np.asarray(np.unravel_index(int(hit[0]), block.shape), dtype=np.int64) + block_lo
        yield Progress(done, total, "blocks", f"looking for segment {int(segment_id)}")
    raise SegmentNotFoundError(
        f"segment {int(segment_id)} has no voxels in {volume.url!r} between voxels {lo.tolist()} and {hi.tolist()}"
    )
