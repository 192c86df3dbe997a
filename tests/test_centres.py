"""Cutout centres: skeleton thinning (along paths, or by distance without edges), nearest-first order."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.centres import order_by_distance, segment_centres, thin_points, thin_skeleton
from segscope.analysis.volume import SegmentNotFoundError, open_volume, write_volume


def line_skeleton(n: int, step_nm: float):
    nodes = np.stack([np.arange(n) * step_nm, np.zeros(n), np.zeros(n)], axis=1)
    return nodes, np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)


def test_thinning_keeps_spacing_along_the_path():
    nodes, edges = line_skeleton(61, 100.0)
    kept = thin_skeleton(nodes, edges, 1500.0)
    assert kept.tolist() == [0, 15, 30, 45, 60]


def test_thinning_covers_every_branch_and_component():
    # A "T": a 3 um trunk, two 2 um branches, plus a separate 1-node fragment.
    trunk, _ = line_skeleton(31, 100.0)
    branch_a = trunk[-1] + np.stack([np.zeros(20), np.arange(1, 21) * 100.0, np.zeros(20)], 1)
    branch_b = trunk[-1] + np.stack([np.zeros(20), -np.arange(1, 21) * 100.0, np.zeros(20)], 1)
    lonely = np.array([[10_000.0, 0, 0]])
    nodes = np.concatenate([trunk, branch_a, branch_b, lonely])
    edges = [(i, i + 1) for i in range(30)]
    edges += [(30, 31)] + [(31 + i, 32 + i) for i in range(19)]
    edges += [(30, 51)] + [(51 + i, 52 + i) for i in range(19)]
    kept = set(thin_skeleton(nodes, np.array(edges), 1500.0).tolist())
    assert 71 in kept  # the lonely node is its own component
    assert {0, 15, 30} <= kept
    assert any(31 <= k <= 50 for k in kept) and any(51 <= k <= 70 for k in kept)


def test_order_by_distance_is_nearest_first():
    points = np.array([[0, 0, 0], [10, 0, 0], [3, 0, 0], [-1, 0, 0]], float)
    assert order_by_distance(points, (2, 0, 0)).tolist() == [2, 0, 3, 1]


def test_a_segment_without_skeleton_is_skeletonised_and_its_centres_lie_inside(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    seg = np.zeros((60, 40, 30), np.uint64)
    seg[5:55, 18:22, 13:17] = 42  # a 1.6 um long rod along x
    seg[30:34, 22:38, 13:17] = 42  # with a side branch along y
    write_volume(tmp_path / "seg", seg, (32, 32, 40), segmentation=True)
    volume = open_volume(tmp_path / "seg")
    click = (50 * 32.0, 20 * 32.0, 15 * 40.0)
    centres = segment_centres(volume, 42, spacing_nm=300.0, click_nm=click)
    voxels = volume.nm_to_voxel(centres.positions_nm)
    assert np.all(seg[tuple(voxels.T)] == 42)
    assert len(centres) >= 5 and centres.thinned_by == "path"
    assert np.linalg.norm(centres.positions_nm[0] - click) < 400  # nearest the click first
    with pytest.raises(SegmentNotFoundError, match="segment 7 has no voxels"):
        segment_centres(volume, 7)


def test_a_skeleton_without_edges_is_thinned_by_distance_not_left_whole():
    # 61 loose nodes 100 nm apart (an SWC or table without parents): not 61 centres.
    nodes, _ = line_skeleton(61, 100.0)
    kept = thin_skeleton(nodes, np.zeros((0, 2), np.int64), 1500.0)
    assert kept.tolist() == thin_points(nodes, 1500.0).tolist() == [0, 15, 30, 45, 60]
    from segscope.analysis.centres import skeleton_centres

    assert skeleton_centres(1, nodes, None).thinned_by == "distance"
    assert skeleton_centres(1, nodes[:1], None).node_ids.tolist() == [0]


def test_segment_centres_from_skeleton_are_ordered_from_click(tmp_path):
    seg = np.ones((8, 8, 8), np.uint64)
    write_volume(tmp_path / "seg", seg, (32, 32, 40), segmentation=True)
    volume = open_volume(tmp_path / "seg")
    nodes, edges = line_skeleton(46, 100.0)
    centres = segment_centres(volume, 1, skeleton_nodes_nm=nodes, skeleton_edges=edges, click_nm=(4500, 0, 0))
    assert centres.node_ids.tolist() == [45, 30, 15, 0]
    assert np.allclose(centres.positions_nm, nodes[centres.node_ids])


def test_contract_skeleton_joins_kept_nodes_to_their_nearest_kept_ancestor():
    from segscope.analysis.centres import contract_skeleton

    # A Y: 0-1-2-3 trunk, 2-4-5 branch; a separate piece 6-7.
    edges = np.array([[0, 1], [1, 2], [2, 3], [2, 4], [4, 5], [6, 7]])
    pairs = contract_skeleton(8, edges, keep=[0, 3, 5, 7])
    assert sorted(map(tuple, pairs.tolist())) == [(3, 0), (5, 0)]
    pairs = contract_skeleton(8, edges, keep=[0, 2, 3, 5, 6, 7])
    assert sorted(map(tuple, pairs.tolist())) == [(2, 0), (3, 2), (5, 2), (7, 6)]
    assert contract_skeleton(8, edges, keep=[]).shape == (0, 2)
    with pytest.raises(ValueError, match="outside"):
        contract_skeleton(8, edges, keep=[9])


def test_a_giant_skeleton_box_limit_is_refused_not_allocated(tmp_path):
    """1e9 voxels a side: the limit is checked as an exact integer before anything is read."""
    from segscope.analysis.progress import drive
    from segscope.analysis.skeletonise import skeletonise_segment

    seg = np.ones((8, 8, 8), np.uint64)
    write_volume(tmp_path / "seg", seg, (32, 32, 40), segmentation=True)
    volume = open_volume(tmp_path / "seg")
    with pytest.raises(ValueError, match="would need"):
        drive(skeletonise_segment(volume, 1, (4, 4, 4), max_box_vox=10**9))
