"""Skeleton sources (precomputed, SWC, node tables) and skeletons made on demand with kimimaro."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.progress import drive
from segscope.analysis.skeleton_sources import (
    PrecomputedSkeletons,
    SegmentSkeletons,
    SwcSkeletons,
    TableSkeletons,
    open_skeleton_source,
)
from segscope.analysis.skeletons import Skeleton, write_precomputed_skeletons
from segscope.analysis.volume import SegmentNotFoundError, open_volume, write_volume


def y_skeleton(segment_id: int = 7) -> Skeleton:
    """A Y: trunk 0-1-2, branches 2-3 and 2-4; node 0 soma, the rest dendrite/axon."""
    nodes = np.array([[0, 0, 0], [100, 0, 0], [200, 0, 0], [300, 100, 0], [300, -100, 40]], float)
    edges = np.array([[1, 0], [2, 1], [3, 2], [4, 2]])
    compartment = np.array([2, 1, 1, 1, 0], np.uint8)  # soma, dendrite x3, axon
    radius = np.array([50, 20, 20, 10, 10], np.float32)
    return Skeleton(segment_id, nodes, edges, compartment, radius)


def same_graph(a: Skeleton, b: Skeleton) -> bool:
    """Same nodes (as a set of positions) and the same edges between them."""
    order_a = np.lexsort(a.nodes_nm.T[::-1])
    order_b = np.lexsort(b.nodes_nm.T[::-1])
    if not np.allclose(a.nodes_nm[order_a], b.nodes_nm[order_b], atol=1e-3):
        return False
    rank_a, rank_b = np.argsort(order_a), np.argsort(order_b)
    edges_a = {tuple(sorted(rank_a[e])) for e in a.edges.tolist()}
    edges_b = {tuple(sorted(rank_b[e])) for e in b.edges.tolist()}
    return edges_a == edges_b


def test_precomputed_swc_and_table_sources_give_the_same_skeleton(tmp_path):
    from segscope.analysis.export.swc import write_swc

    skeleton = y_skeleton()
    write_precomputed_skeletons(tmp_path / "pre", [skeleton])
    (tmp_path / "swc").mkdir()
    write_swc(
        tmp_path / "swc" / "7.swc",
        np.arange(5),
        skeleton.nodes_nm,
        skeleton.edges,
        skeleton.compartment.astype(np.int64),
        skeleton.radius_nm,
    )
    rows = ["segment_id,node_id,x_nm,y_nm,z_nm,parent"]
    parents = {0: -1, 1: 0, 2: 1, 3: 2, 4: 2}  # a root's parent: -1
    for node, (x, y, z) in enumerate(skeleton.nodes_nm):
        rows.append(f"7,{node + 10},{x},{y},{z},{'' if parents[node] < 0 else parents[node] + 10}")
    rows.append("9,0,5,5,5,")
    (tmp_path / "nodes.csv").write_text("\n".join(rows) + "\n")

    sources = [open_skeleton_source(tmp_path / p) for p in ("pre", "swc", "nodes.csv")]
    assert [type(s) for s in sources] == [PrecomputedSkeletons, SwcSkeletons, TableSkeletons]
    for source in sources:
        found = source.get(7)
        assert found is not None and same_graph(found, skeleton), source
        assert source.get(8) is None
    assert sources[1].get(7).compartment.tolist() == skeleton.compartment.tolist()  # SWC types map back
    assert sources[0].has_compartments and not sources[2].has_compartments
    assert sources[2].segment_ids() == [7, 9] and sources[0].segment_ids() == [7] == sources[1].segment_ids()
    assert sources[2].get(9).n_nodes == 1 and len(sources[2].get(9).edges) == 0


def test_a_parquet_node_table_without_parents_has_no_edges(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 20
    pq.write_table(
        pa.table(
            {
                "segment_id": np.full(n, 3, np.uint64),
                "node_id": np.arange(n),
                "x_nm": np.arange(n) * 200.0,
                "y_nm": np.zeros(n),
                "z_nm": np.zeros(n),
            }
        ),
        tmp_path / "nodes.parquet",
    )
    skeleton = open_skeleton_source(tmp_path / "nodes.parquet").get(3)
    assert skeleton.n_nodes == n and len(skeleton.edges) == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p / "empty").mkdir(), "neither a precomputed skeleton info"),
        (lambda p: (p / "t.csv").write_text("segment_id,x_nm\n1,2\n"), "lacks the node table columns"),
        (lambda p: (p / "t.csv").write_text("segment_id,node_id,x_nm,y_nm,z_nm,parent\n1,0,0,0,0,5\n"), "parent 5"),
        (lambda p: (p / "t.txt").write_text("x"), ".csv or .parquet"),
    ],
)
def test_bad_skeleton_inputs_are_named(tmp_path, make, message):
    make(tmp_path)
    target = next(p for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        open_skeleton_source(target).get(1)
    with pytest.raises(FileNotFoundError):
        open_skeleton_source(tmp_path / "missing")


def rod_volume(tmp_path, length_vox: int = 200):
    """A segmentation with one rod (id 5) along x, length ``length_vox``, and a single voxel (id 9)."""
    seg = np.zeros((length_vox + 20, 24, 24), np.uint64)
    seg[10 : 10 + length_vox, 10:14, 10:14] = 5
    seg[3, 3, 3] = 9  # one voxel
    write_volume(tmp_path / "seg", seg, (16, 16, 16), segmentation=True, chunk_size=(32, 32, 32))
    return open_volume(tmp_path / "seg"), seg


def test_skeletons_on_demand_grow_their_box_and_are_cached(tmp_path):
    volume, seg = rod_volume(tmp_path)
    skeletons = SegmentSkeletons(volume, max_box_vox=512, cache_root=tmp_path / "cache")
    reports = []
    found = drive(skeletons.resolve(5, seed_vox=(100, 12, 12)), reports.append)
    assert found.origin == "skeletonised"
    # The first box (2 um around the seed, 16 nm voxels: 125 voxels each way) is wider than
    # this thin volume in y and z, so it grew along x only, until the rod's ends.
    extent = found.skeleton.nodes_nm[:, 0]
    assert extent.min() < 14 * 16 and extent.max() > 206 * 16
    voxels = volume.nm_to_voxel(found.skeleton.nodes_nm)
    assert np.all(seg[tuple(voxels.T)] == 5)
    assert any("reading" in r.message for r in reports) and any("skeletonising" in r.message for r in reports)
    again = drive(SegmentSkeletons(volume, cache_root=tmp_path / "cache").resolve(5))
    assert again.origin == "cached" and np.allclose(again.skeleton.nodes_nm, found.skeleton.nodes_nm, atol=1e-3)
    tiny = drive(skeletons.resolve(9))  # found by a scan, no seed given
    assert tiny.skeleton.n_nodes == 1 and volume.nm_to_voxel(tiny.skeleton.nodes_nm).tolist() == [[3, 3, 3]]
    with pytest.raises(SegmentNotFoundError, match="segment 4 has no voxels"):
        drive(skeletons.resolve(4))


def test_a_segment_beyond_the_box_limit_is_skeletonised_inside_it_and_not_cached(tmp_path):
    volume, _ = rod_volume(tmp_path)
    skeletons = SegmentSkeletons(volume, max_box_vox=64, cache_root=tmp_path / "cache")
    found = drive(skeletons.resolve(5, seed_vox=(100, 12, 12)))
    assert found.origin == "truncated" and "64x64x64-voxel box" in found.note
    span = np.ptp(found.skeleton.nodes_nm[:, 0]) / 16
    assert 30 < span <= 64
    assert skeletons.cache.get(5) is None
    with pytest.raises(ValueError, match="at least 1 voxel"):
        SegmentSkeletons(volume, max_box_vox=0)


def test_a_given_skeleton_wins_over_skeletonising(tmp_path):
    volume, _ = rod_volume(tmp_path)
    write_precomputed_skeletons(tmp_path / "pre", [y_skeleton(5)])
    skeletons = SegmentSkeletons(volume, open_skeleton_source(tmp_path / "pre"), cache_root=False)
    found = drive(skeletons.resolve(5))
    assert found.origin == "given" and found.skeleton.n_nodes == 5
