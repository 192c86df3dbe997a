"""Cutout centres for a segment: skeleton nodes at SegCLR's spacing.

SegCLR embeds cutouts centred on skeleton nodes about 1.5 um apart. This module thins a
skeleton to that spacing (measured along the skeleton path; by straight distance for a
skeleton without edges) and orders centres nearest-first from the point the user clicked.
A segment without a skeleton is skeletonised first (kimimaro, in a bounded box:
:mod:`segscope.analysis.skeletonise`). Positions are nm, ``[N, 3]`` in x, y, z order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segscope.analysis.volume import Volume

log = logging.getLogger(__name__)

#: SegCLR's centre spacing (nm).
SEGCLR_SPACING_NM = 1500.0


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
    thinned_by : str
        ``"path"`` (distance along the skeleton's edges) or ``"distance"`` (a skeleton
        without edges: straight-line distance between kept nodes).
    """

    segment_id: int
    node_ids: np.ndarray
    positions_nm: np.ndarray
    thinned_by: str = "path"

    def __len__(self) -> int:
        return len(self.node_ids)

    def ordered_from(self, point_nm: Sequence[float] | np.ndarray | None) -> Centres:
        """The same centres sorted by distance from ``point_nm`` (nearest first)."""
        if point_nm is None:
            return self
        order = order_by_distance(self.positions_nm, point_nm)
        return Centres(self.segment_id, self.node_ids[order], self.positions_nm[order], self.thinned_by)


def order_by_distance(points_nm: np.ndarray, origin_nm: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that sort ``points_nm [N, 3]`` by Euclidean distance from ``origin_nm`` (stable)."""
    points = np.asarray(points_nm, dtype=np.float64).reshape(-1, 3)
    distance = np.linalg.norm(points - np.asarray(origin_nm, dtype=np.float64), axis=1)
    return np.argsort(distance, kind="stable")


def thin_skeleton(nodes_nm: np.ndarray, edges: np.ndarray, spacing_nm: float = SEGCLR_SPACING_NM) -> np.ndarray:
    """Pick skeleton nodes about ``spacing_nm`` apart along the skeleton path.

    Walks each connected component breadth-first from its first node and keeps a node once
    the path length since the last kept node on its way to the root reaches ``spacing_nm``,
    so every node lies within ``spacing_nm`` (path) of a kept ancestor. A skeleton of more
    than one node with no edges at all (a point cloud: an SWC or table without parents) is
    thinned by straight-line distance instead (:func:`thin_points`), never left unthinned.

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
    if len(edges) == 0 and n > 1:
        return thin_points(nodes, spacing_nm)
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


def thin_points(points_nm: np.ndarray, spacing_nm: float = SEGCLR_SPACING_NM) -> np.ndarray:
    """Pick points at least ``spacing_nm`` apart so every point lies within ``spacing_nm`` of one picked.

    Greedy in the given order (the first point is always kept). For nodes without edges,
    where no path length exists. Returns sorted int64 indices.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points_nm, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    tree = cKDTree(points)
    covered = np.zeros(len(points), dtype=bool)
    keep = []
    for index in range(len(points)):
        if covered[index]:
            continue
        keep.append(index)
        covered[tree.query_ball_point(points[index], spacing_nm * (1 - 1e-9))] = True
    return np.asarray(keep, dtype=np.int64)


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

    Thins the skeleton to ``spacing_nm``. Without a skeleton the segment is skeletonised
    first (in a bounded box around the click, or around the first voxel of it a scan finds;
    see :class:`segscope.analysis.skeleton_sources.SegmentSkeletons`, which callers that
    show progress or cache use directly). ``node_ids`` index the skeleton's nodes.
    """
    if skeleton_nodes_nm is None or not len(skeleton_nodes_nm):
        from segscope.analysis.progress import drive
        from segscope.analysis.skeleton_sources import SegmentSkeletons

        found = drive(SegmentSkeletons(segmentation).resolve(segment_id, click_nm=click_nm))
        log.info("segment %d had no skeleton: %s", segment_id, found.note or found.origin)
        skeleton_nodes_nm, skeleton_edges = found.skeleton.nodes_nm, found.skeleton.edges
    return skeleton_centres(segment_id, skeleton_nodes_nm, skeleton_edges, spacing_nm=spacing_nm, click_nm=click_nm)


def skeleton_centres(
    segment_id: int,
    nodes_nm: np.ndarray,
    edges: np.ndarray | None,
    *,
    spacing_nm: float = SEGCLR_SPACING_NM,
    click_nm: Sequence[float] | np.ndarray | None = None,
) -> Centres:
    """Centres of a skeleton thinned to ``spacing_nm``, nearest ``click_nm`` first.

    ``nodes_nm`` float ``[N, 3]`` nm; ``edges`` int ``[E, 2]`` node indices (None: no edges).
    """
    nodes = np.asarray(nodes_nm, dtype=np.float64).reshape(-1, 3)
    edges = np.zeros((0, 2), np.int64) if edges is None else np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    node_ids = thin_skeleton(nodes, edges, spacing_nm)
    thinned_by = "distance" if len(edges) == 0 and len(nodes) > 1 else "path"
    return Centres(int(segment_id), node_ids.astype(np.int64), nodes[node_ids], thinned_by).ordered_from(click_nm)
