"""Turn cell trees into a dense label volume and per-segment skeletons.

Painting rule: every tube piece (a capsule between a node and its parent, radii linearly
interpolated) covers the voxels with ``distance_to_axis / radius < 1`` and scores them by
that ratio minus a small bonus growing with the log of its calibre above 150 nm; the voxel
goes to the lowest score. Where neurites of similar calibre overlap this splits the space
in proportion to their radii, as in compressed tissue; where a thin neurite crosses a
thick one the thick one keeps its core (a thin process is cut there rather than leaving
an island of itself inside a dendrite or soma). Nodes that end up outside their own
segment are dropped from the skeleton and their neighbours joined.

Segments are the pieces of a cell inside the volume: connected components of the cell's
skeleton restricted to nodes inside the volume (a neurite that leaves and re-enters gives
two segments of one cell, as in a real cutout).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segscope.analysis.progress import Progress
from segscope.analysis.synthetic._morphology import ASTROCYTE, Cell

log = logging.getLogger(__name__)

_CROSS = ndimage.generate_binary_structure(3, 1)
#: Thick objects (above the floor radius) hold their core against thin ones crossing them:
#: without this a thin axon would leave an island of itself inside a dendrite or soma.
_CALIBRE_WEIGHT = 0.6
_CALIBRE_FLOOR_NM = 150.0


@dataclass
class Fragments:
    """All nodes of all cells, flattened, with their segment assignment.

    Arrays are per node unless noted: ``pos`` float64 [N, 3] nm, ``radius`` float64 [N] nm,
    ``parent`` int64 [N] global index (-1 for roots), ``compartment`` uint8, ``kind`` uint8,
    ``cell`` int64 index into the cell list, ``fragment`` int64 (-1 outside the volume).
    ``fragment_cell`` int64 [F]: the cell of each fragment.
    """

    pos: np.ndarray
    radius: np.ndarray
    parent: np.ndarray
    compartment: np.ndarray
    kind: np.ndarray
    cell: np.ndarray
    fragment: np.ndarray
    fragment_cell: np.ndarray
    node_offset: np.ndarray  # [n_cells] global index of each cell's first node


def flatten_cells(cells: list[Cell], extent_nm: np.ndarray) -> Fragments:
    sizes = np.array([len(c.pos) for c in cells], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.concatenate([np.array(c.pos).reshape(-1, 3) for c in cells])
    radius = np.concatenate([np.array(c.radius, dtype=np.float64) for c in cells])
    parent = np.concatenate(
        [np.where(np.array(c.parent) >= 0, np.array(c.parent) + o, -1) for c, o in zip(cells, offset)]
    ).astype(np.int64)
    compartment = np.concatenate([np.array(c.compartment, dtype=np.uint8) for c in cells])
    kind = np.concatenate([np.array(c.kind, dtype=np.uint8) for c in cells])
    cell = np.repeat(np.arange(len(cells)), sizes)

    inside = np.all((pos >= 0) & (pos < extent_nm), axis=1)
    child = np.nonzero((parent >= 0) & inside)[0]
    child = child[inside[parent[child]]]
    n = len(pos)
    graph = coo_matrix((np.ones(len(child)), (child, parent[child])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # Renumber the components of inside nodes 0..F-1 in order of first node.
    inside_comp = comp[inside]
    uniq, first = np.unique(inside_comp, return_index=True)
    order = np.argsort(first)
    remap = np.full(comp.max() + 1, -1, dtype=np.int64)
    remap[uniq[order]] = np.arange(len(uniq))
    fragment = np.where(inside, remap[comp], -1)
    first_nodes = np.nonzero(inside)[0][np.sort(first)]
    fragment_cell = cell[first_nodes]
    return Fragments(pos, radius, parent, compartment, kind, cell, fragment, fragment_cell, offset)


def _primitives(cells: list[Cell], frags: Fragments) -> tuple[np.ndarray, ...]:
    """Capsules to paint: (p0 [P,3], p1 [P,3], r0 [P], r1 [P], label [P] = fragment + 1)."""
    child = np.nonzero(frags.parent >= 0)[0]
    par = frags.parent[child]
    # A tube piece belongs to the segment of whichever end lies inside the volume; pieces
    # with both ends outside are not painted (their slivers would carry no skeleton).
    label = np.where(frags.fragment[child] >= 0, frags.fragment[child], frags.fragment[par])
    keep = label >= 0
    p0, p1 = frags.pos[par[keep]], frags.pos[child[keep]]
    r0, r1 = frags.radius[par[keep]], frags.radius[child[keep]]
    lab = label[keep] + 1
    # Lone roots (no children, e.g. a one-node stub) still need a sphere.
    has_child = np.zeros(len(frags.pos), bool)
    has_child[par] = True
    lone = np.nonzero((frags.parent < 0) & ~has_child & (frags.fragment >= 0))[0]
    body_p0, body_p1, body_r, body_lab = [], [], [], []
    for ci, c in enumerate(cells):
        for node, a, b, r in c.bodies:
            f = frags.fragment[frags.node_offset[ci] + node]
            if f >= 0:
                body_p0.append(a)
                body_p1.append(b)
                body_r.append(r)
                body_lab.append(f + 1)
    bp0 = np.array(body_p0).reshape(-1, 3)
    bp1 = np.array(body_p1).reshape(-1, 3)
    br = np.array(body_r, dtype=np.float64)
    return (
        np.concatenate([bp0, frags.pos[lone], p0]),
        np.concatenate([bp1, frags.pos[lone], p1]),
        np.concatenate([br, frags.radius[lone], r0]),
        np.concatenate([br, frags.radius[lone], r1]),
        np.concatenate([np.array(body_lab, dtype=np.int64), frags.fragment[lone] + 1, lab]),
    )


def capsule_box(p0, p1, rmax, voxel_size_nm, shape) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box [lo, hi) covering a capsule, clipped to the volume (may be empty)."""
    lo = np.floor((np.minimum(p0, p1) - rmax) / voxel_size_nm).astype(np.int64)
    hi = np.ceil((np.maximum(p0, p1) + rmax) / voxel_size_nm).astype(np.int64) + 1
    return np.maximum(lo, 0), np.minimum(hi, shape)


def capsule_fields(p0, p1, r0, r1, lo, hi, voxel_size_nm):
    """Distance, radius and axial parameter of each voxel centre in box [lo, hi) of a capsule.

    Returns the distance to the capsule axis (nm), the interpolated radius there (nm) and
    the axial parameter t in [0, 1]; arrays [x, y, z].
    """
    axes = [((np.arange(lo[a], hi[a]) + 0.5) * voxel_size_nm[a] - p0[a]).astype(np.float32) for a in range(3)]
    dx, dy, dz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    d = (p1 - p0).astype(np.float32)
    length2 = float(np.dot(d, d))
    if length2 > 0:
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / length2, 0.0, 1.0)
        qx, qy, qz = dx - t * d[0], dy - t * d[1], dz - t * d[2]
        dist = np.sqrt(qx * qx + qy * qy + qz * qz)
        radius = r0 + t * (r1 - r0)
    else:
        t = np.zeros((1, 1, 1), np.float32)
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        radius = np.float32(r0)
    return dist, radius, t


def paint(cells: list[Cell], frags: Fragments, shape, voxel_size_nm) -> Generator[Progress, None, np.ndarray]:
    """Paint all cells into an int32 label volume [x, y, z] (0 = free, f + 1 = fragment f)."""
    p0, p1, r0, r1, lab = _primitives(cells, frags)
    shape = np.asarray(shape)
    labels = np.zeros(tuple(shape), dtype=np.int32)
    best = np.full(tuple(shape), np.inf, dtype=np.float32)
    total = len(lab)
    report_every = max(1, total // 20)
    for i in range(total):
        lo, hi = capsule_box(p0[i], p1[i], max(r0[i], r1[i]), voxel_size_nm, shape)
        if np.any(hi <= lo):
            continue
        dist, radius, _ = capsule_fields(p0[i], p1[i], r0[i], r1[i], lo, hi, voxel_size_nm)
        relative = dist / radius
        score = relative - _CALIBRE_WEIGHT * np.log(np.maximum(radius, _CALIBRE_FLOOR_NM) / _CALIBRE_FLOOR_NM)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        sub_best = best[box]
        win = (relative < 1.0) & (score < sub_best)
        sub_best[win] = score[win]
        labels[box][win] = lab[i]
        if (i + 1) % report_every == 0:
            yield Progress(i + 1, total, "tubes", "painting neurites")
    return labels


def keep_nodes_inside(labels: np.ndarray, frags: Fragments, voxel_size_nm) -> np.ndarray:
    """Boolean [N]: inside the volume and in a voxel of its own segment."""
    ok = frags.fragment >= 0
    vox = np.floor(frags.pos[ok] / voxel_size_nm).astype(np.int64)
    vox = np.clip(vox, 0, np.array(labels.shape) - 1)
    own = labels[vox[:, 0], vox[:, 1], vox[:, 2]] == frags.fragment[ok] + 1
    keep = np.zeros(len(frags.pos), bool)
    keep[np.nonzero(ok)[0][own]] = True
    return keep


def grow_glia(labels: np.ndarray, is_astro: np.ndarray, iterations: int) -> int:
    """Let astrocyte segments flood free voxels next to them (geodesic, 6-connected).

    Astrocytic processes fill the gaps neurites leave, which makes them thin, sheet-like
    and concave in section. ``is_astro`` is indexed by label. Returns voxels added.
    """
    grown = np.where(is_astro[labels], labels, 0).astype(np.int32)
    free = labels == 0
    added = 0
    for _ in range(iterations):
        front = ndimage.grey_dilation(grown, footprint=_CROSS)
        take = free & (grown == 0) & (front > 0)
        n = int(take.sum())
        if n == 0:
            break
        grown[take] = front[take]
        added += n
    fill = free & (grown > 0)
    labels[fill] = grown[fill]
    return added


def grow_all(labels: np.ndarray, iterations: int) -> None:
    """Grow every segment into free 6-neighbours (ties go to the larger label)."""
    for _ in range(iterations):
        front = ndimage.grey_dilation(labels, footprint=_CROSS)
        free = labels == 0
        labels[free] = front[free]


def close_cracks(labels: np.ndarray) -> int:
    """Give each free voxel enclosed by one segment on opposite sides to that segment.

    One-voxel cracks inside a neurite appear where two of its own tube pieces meet at an
    angle; real membranes have no such slits.
    """
    free = labels == 0
    fill = np.zeros_like(labels)
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        f = np.moveaxis(free, axis, 0)
        out = np.moveaxis(fill, axis, 0)
        same = (a[:-2] == a[2:]) & (a[:-2] > 0) & f[1:-1] & (np.moveaxis(fill, axis, 0)[1:-1] == 0)
        out[1:-1][same] = a[:-2][same]
    labels[fill > 0] = fill[fill > 0]
    return int((fill > 0).sum())


def astro_lookup(frags: Fragments, cells: list[Cell]) -> np.ndarray:
    """A bool [F + 1] array indexed by label: is the segment a fragment of an astrocyte."""
    types = np.array([c.cell_type for c in cells])
    return np.concatenate([[False], types[frags.fragment_cell] == ASTROCYTE])
