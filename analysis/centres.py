"""Cutout centres for a segment: skeleton nodes at SegCLR's spacing, or mask samples.

SegCLR embeds cutouts centred on skeleton nodes about 1.5 um apart. This module thins a
skeleton to that spacing (measured along the skeleton path), samples centres from the
segment's mask when no skeleton exists, and orders centres nearest-first from the point the
user clicked. Positions are nm, ``[N, 3]`` in x, y, z order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segscope.analysis.volume import SegmentNotFoundError, Volume

log = logging.getLogger(__name__)

#: SegCLR's centre spacing (nm).
SEGCLR_SPACING_NM = 1500.0
#: Largest region (voxels) scanned for a segment's mask when no box is given.
_MAX_SCAN_VOXELS = 512**3


def _voxel_count(extent_vox) -> int:
    """Voxels in a box of ``extent_vox`` ``(x, y, z)``, as an exact Python int.

    numpy's int64 product overflows for declared sizes such as 1e9^3 (wrapping to a small or
    negative number that passed the size guard, then an allocation aborted the process); a
    negative extent counts as empty.
    """
    return math.prod(max(int(v), 0) for v in np.asarray(extent_vox).reshape(-1))


#: Half-width (nm) of the region searched around a click when no box is given.
_CLICK_SEARCH_HALF_WIDTH_NM = 10_000.0


@dataclass(frozen=True)
class Centres:
    """Cutout centres of one segment.

    Attributes
    ----------
    segment_id : int
    node_ids : numpy.ndarray
        int64 ``[N]``: the skeleton node each centre is (index into the skeleton's nodes).
    positions_nm : numpy.ndarray
        float64 ``[N, 3]`` x, y, z nm.
    """

    segment_id: int
    node_ids: np.ndarray
    positions_nm: np.ndarray

    def __len__(self) -> int:
        return len(self.node_ids)

    def ordered_from(self, point_nm: Sequence[float] | np.ndarray | None) -> Centres:
        """The same centres sorted by distance from ``point_nm`` (nearest first)."""
        if point_nm is None:
            return self
        order = order_by_distance(self.positions_nm, point_nm)
        return Centres(self.segment_id, self.node_ids[order], self.positions_nm[order])


def order_by_distance(points_nm: np.ndarray, origin_nm: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that sort ``points_nm [N, 3]`` by Euclidean distance from ``origin_nm`` (stable)."""
    points = np.asarray(points_nm, dtype=np.float64).reshape(-1, 3)
    distance = np.linalg.norm(points - np.asarray(origin_nm, dtype=np.float64), axis=1)
    return np.argsort(distance, kind="stable")


def thin_skeleton(nodes_nm: np.ndarray, edges: np.ndarray, spacing_nm: float = SEGCLR_SPACING_NM) -> np.ndarray:
    """Pick skeleton nodes about ``spacing_nm`` apart along the skeleton path.

    Walks each connected component breadth-first from its first node and keeps a node once
    the path length since the last kept node on its way to the root reaches ``spacing_nm``,
    so every node lies within ``spacing_nm`` (path) of a kept ancestor.

    Parameters
    ----------
    nodes_nm
        float ``[N, 3]`` node positions (nm).
    edges
        int ``[E, 2]`` pairs of node indices.
    spacing_nm
        Target path distance between kept nodes (nm); 0 keeps every node.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices of the kept nodes.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    nodes = np.asarray(nodes_nm, dtype=np.float64).reshape(-1, 3)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    n = len(nodes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"skeleton edges refer to nodes outside 0..{n - 1}")
    if spacing_nm <= 0:
        return np.arange(n, dtype=np.int64)
    lengths = np.linalg.norm(nodes[edges[:, 0]] - nodes[edges[:, 1]], axis=1)
    graph = coo_matrix((lengths + 1e-9, (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    n_components, component = connected_components(graph, directed=False)
    keep = np.zeros(n, dtype=bool)
    since_kept = np.zeros(n, dtype=np.float64)
    undirected = graph.maximum(graph.T).tocsr()
    for label in range(n_components):
        root = int(np.flatnonzero(component == label)[0])
        order, parents = breadth_first_order(undirected, root, directed=False, return_predecessors=True)
        keep[root] = True
        for node in order[1:]:
            parent = parents[node]
            since_kept[node] = since_kept[parent] + np.linalg.norm(nodes[node] - nodes[parent])
            if since_kept[node] >= spacing_nm:
                keep[node] = True
                since_kept[node] = 0.0
    return np.flatnonzero(keep)


def contract_skeleton(n_nodes: int, edges: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Edges of the skeleton reduced to the ``keep`` nodes (the thinned centres).

    Each kept node is joined to its nearest kept ancestor along the skeleton (every
    component rooted at its first kept node), so the result is a forest over the kept
    nodes with the skeleton's branching: what an SWC of the embedded centres needs.

    Parameters
    ----------
    n_nodes
        Nodes in the full skeleton.
    edges
        int ``[E, 2]`` pairs of node indices of the full skeleton.
    keep
        int ``[K]`` indices of the kept nodes.

    Returns
    -------
    numpy.ndarray
        int64 ``[K - C, 2]`` pairs ``(child, parent)`` of kept node indices, C the number
        of components holding a kept node.

    Raises
    ------
    ValueError
        For edges or kept indices outside ``0..n_nodes - 1``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    keep = np.unique(np.asarray(keep, dtype=np.int64).reshape(-1))
    for name, values in (("edges", edges), ("keep", keep)):
        if values.size and (values.min() < 0 or values.max() >= n_nodes):
            raise ValueError(f"skeleton {name} refer to nodes outside 0..{n_nodes - 1}")
    kept = np.zeros(n_nodes, bool)
    kept[keep] = True
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_nodes, n_nodes)).tocsr()
    graph = graph.maximum(graph.T).tocsr()
    nearest_kept = np.full(n_nodes, -1, np.int64)  # nearest kept node on the way to the root
    visited = np.zeros(n_nodes, bool)
    pairs = []
    for root in keep:
        if visited[root]:
            continue
        order, parents = breadth_first_order(graph, int(root), directed=False, return_predecessors=True)
        visited[order] = True
        for node in order:
            parent = parents[node]
            above = nearest_kept[parent] if parent >= 0 else -1
            if kept[node]:
                if above >= 0:
                    pairs.append((node, above))
                nearest_kept[node] = node
            else:
                nearest_kept[node] = above
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def mask_centres(
    segmentation: Volume,
    segment_id: int,
    spacing_nm: float = SEGCLR_SPACING_NM,
    *,
    box_vox: tuple[Sequence[int], Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample centres from a segment's mask when it has no skeleton.

    The mask is binned into cubes of ``spacing_nm``; each occupied cube contributes the
    mask voxel closest to the cube's mask centroid (so every centre lies inside the
    segment), and a Euclidean minimum spanning tree links the centres into a skeleton.

    Parameters
    ----------
    segmentation
        The segmentation volume.
    segment_id
        Segment to sample.
    spacing_nm
        Cube size (nm), about the distance between centres.
    box_vox
        ``(lo, hi)`` absolute voxel box to scan; the whole volume when None (refused above
        512^3 voxels, pass a box around the region of interest instead).

    Returns
    -------
    nodes_nm : numpy.ndarray
        float64 ``[K, 3]`` voxel-centre positions (nm).
    edges : numpy.ndarray
        int64 ``[K - 1, 2]`` minimum-spanning-tree edges.

    Raises
    ------
    SegmentNotFoundError
        When the segment has no voxel in the scanned region.
    """
    if box_vox is None:
        lo = segmentation.origin_vox
        hi = lo + np.asarray(segmentation.shape)
    else:
        lo, hi = (np.asarray(v, dtype=np.int64) for v in box_vox)
    if _voxel_count(hi - lo) > _MAX_SCAN_VOXELS:
        raise ValueError(
            f"scanning {tuple((hi - lo).tolist())} voxels for segment {segment_id} is too large; "
            "give a skeleton or a smaller box"
        )
    value = np.asarray(int(segment_id)).astype(segmentation.dtype)
    voxels = np.argwhere(segmentation.read(lo, hi) == value) + lo
    if len(voxels) == 0:
        raise SegmentNotFoundError(
            f"segment {segment_id} has no voxels in {segmentation.url!r} between voxels "
            f"{np.asarray(lo).tolist()} and {np.asarray(hi).tolist()}"
        )
    positions = (voxels + 0.5) * segmentation.voxel_size_nm
    cells = np.floor(positions / spacing_nm).astype(np.int64)
    _, cell_index = np.unique(cells, axis=0, return_inverse=True)
    cell_index = cell_index.ravel()
    n_cells = int(cell_index.max()) + 1
    counts = np.bincount(cell_index, minlength=n_cells).astype(np.float64)
    centroids = np.stack(
        [np.bincount(cell_index, weights=positions[:, a], minlength=n_cells) / counts for a in range(3)], axis=1
    )
    distance = np.linalg.norm(positions - centroids[cell_index], axis=1)
    # For each cell, the voxel nearest its centroid: sort by (cell, distance), take firsts.
    order = np.lexsort((distance, cell_index))
    first = np.ones(len(order), dtype=bool)
    first[1:] = cell_index[order][1:] != cell_index[order][:-1]
    nodes = positions[order[first]]
    return nodes, _spanning_tree_edges(nodes)


def _spanning_tree_edges(nodes_nm: np.ndarray) -> np.ndarray:
    """Edges ``[K - 1, 2]`` of the Euclidean minimum spanning tree of ``nodes_nm [K, 3]``."""
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial import distance_matrix

    if len(nodes_nm) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    # Tiny offset keeps coincident points connected (zero weights mean "no edge").
    tree = minimum_spanning_tree(distance_matrix(nodes_nm, nodes_nm) + 1e-6).tocoo()
    return np.stack([tree.row, tree.col], axis=1).astype(np.int64)


def segment_centres(
    segmentation: Volume,
    segment_id: int,
    *,
    skeleton_nodes_nm: np.ndarray | None = None,
    skeleton_edges: np.ndarray | None = None,
    spacing_nm: float = SEGCLR_SPACING_NM,
    click_nm: Sequence[float] | np.ndarray | None = None,
) -> Centres:
    """Centres of one segment, nearest to ``click_nm`` first.

    Uses the skeleton (thinned to ``spacing_nm``) when given; otherwise samples the
    segment's mask in the volume, or within 10 um of the click on volumes too large to
    scan. ``node_ids`` index the skeleton's nodes (or the sampled nodes).
    """
    if skeleton_nodes_nm is not None and len(skeleton_nodes_nm):
        edges = np.zeros((0, 2), np.int64) if skeleton_edges is None else skeleton_edges
        node_ids = thin_skeleton(skeleton_nodes_nm, edges, spacing_nm)
        positions = np.asarray(skeleton_nodes_nm, dtype=np.float64)[node_ids]
    else:
        box = None
        if click_nm is not None and _voxel_count(segmentation.shape) > _MAX_SCAN_VOXELS:
            half = np.ceil(_CLICK_SEARCH_HALF_WIDTH_NM / segmentation.voxel_size_nm).astype(np.int64)
            centre = segmentation.nm_to_voxel(np.asarray(click_nm))
            box = (centre - half, centre + half)
        positions, _ = mask_centres(segmentation, segment_id, spacing_nm, box_vox=box)
        node_ids = np.arange(len(positions), dtype=np.int64)
        log.info("segment %d has no skeleton: sampled %d centres from its mask", segment_id, len(positions))
    return Centres(int(segment_id), node_ids.astype(np.int64), positions).ordered_from(click_nm)
