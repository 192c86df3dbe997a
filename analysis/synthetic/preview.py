"""Render xy slices of a dataset with segment outlines to a PNG (no plotting library).

The figure is a grid: the first panel of each row is the plain image slice, the others
show slices with every segment's boundary drawn in that segment's colour; a last row
shows a 2x zoomed crop of the first slice, plain and outlined, so membranes, vesicles and
mitochondria can be judged at pixel level.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write a uint8 ``[height, width, 3]`` RGB array as a PNG file."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an [height, width, 3] array, got shape {rgb.shape}")
    height, width, _ = rgb.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )
    Path(path).write_bytes(png)


def segment_colours(ids: np.ndarray) -> np.ndarray:
    """A bright, stable RGB colour (uint8 ``[..., 3]``) per uint64 segment id."""
    h = np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    hue = (h % np.uint64(3600)).astype(np.float64) / 3600.0
    k = (np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    rgb = 1.0 - 0.85 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def outline_slice(image_xy: np.ndarray, seg_xy: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """Grey slice with segment boundaries in colour; returns uint8 ``[y, x, 3]`` for display.

    Inputs are ``[x, y]`` (SegScope's axis order); the output is transposed so x runs
    left to right and y top to bottom, as Neuroglancer shows an xy section.
    """
    grey = np.repeat(image_xy.T[..., None], 3, axis=2).astype(np.float32)
    seg = seg_xy.T
    edge = np.zeros(seg.shape, bool)
    edge[1:] |= seg[1:] != seg[:-1]
    edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    edge &= seg != 0
    colours = segment_colours(seg[edge]).astype(np.float32)
    grey[edge] = (1 - alpha) * grey[edge] + alpha * colours
    return np.clip(grey, 0, 255).astype(np.uint8)


def _grey(image_xy: np.ndarray) -> np.ndarray:
    return np.repeat(image_xy.T[..., None], 3, axis=2).astype(np.uint8)


def _zoom(rgb: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def render_slices_png(
    dataset_path: str | Path,
    out_png: str | Path,
    z_indices: Sequence[int] | None = None,
    *,
    crop: int = 128,
    gap: int = 6,
) -> Path:
    """Render xy slices of a dataset's image with segment outlines into a PNG.

    Parameters
    ----------
    dataset_path
        A SegScope dataset folder (``segscope.analysis.dataset``).
    out_png
        Output PNG path.
    z_indices
        z sections (voxels) to show; default: three spread through the volume.
    crop
        Edge (voxels) of the zoomed crop taken from the centre of the first section.
    """
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(dataset_path)
    sx, sy, sz = (int(v) for v in dataset.image.shape)
    if z_indices is None:
        z_indices = [sz // 4, sz // 2, (3 * sz) // 4]
    z_indices = [int(z) for z in z_indices]
    bad = [z for z in z_indices if not 0 <= z < sz]
    if bad:
        raise ValueError(f"z sections {bad} are outside the volume (0..{sz - 1})")
    panels = []
    for z in z_indices:
        image = dataset.image.read((0, 0, z), (sx, sy, z + 1))[:, :, 0]
        seg = dataset.segmentation.read((0, 0, z), (sx, sy, z + 1))[:, :, 0]
        panels.append((image, seg))
    image0, seg0 = panels[0]
    top = [_grey(image0)] + [outline_slice(im, sg) for im, sg in panels]
    c = min(crop, sx, sy)
    x0, y0 = (sx - c) // 2, (sy - c) // 2
    factor = max(1, (len(top) * sx) // (2 * c))  # the two crops span the top row
    crop_img = image0[x0 : x0 + c, y0 : y0 + c]
    crop_seg = seg0[x0 : x0 + c, y0 : y0 + c]
    bottom = [_zoom(_grey(crop_img), factor), _zoom(outline_slice(crop_img, crop_seg), factor)]
    rows = [_hstack(top, gap), _hstack(bottom, gap)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    figure = _vstack(rows, gap)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_png(out_png, figure)
    return out_png


def _hstack(panels: list[np.ndarray], gap: int) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def _vstack(rows: list[np.ndarray], gap: int) -> np.ndarray:
    width = rows[0].shape[1]
    spacer = np.full((gap, width, 3), 255, np.uint8)
    parts = []
    for i, r in enumerate(rows):
        if i:
            parts.append(spacer)
        parts.append(r)
    return np.concatenate(parts, axis=0)
