"""Radius aggregation of node embeddings (SegCLR's aggregated_10um / _25um variants)."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.aggregate import (
    SEGCLR_AGGREGATION_RADII_NM,
    AggregationSummary,
    aggregate_embeddings,
    aggregate_store,
)
from segscope.analysis.csvzip import CsvZipStore
from segscope.analysis.progress import Progress, drive


def brute_force_means(xyz_nm: np.ndarray, embeddings: np.ndarray, radius_nm: float) -> np.ndarray:
    distances = np.linalg.norm(xyz_nm[:, None, :] - xyz_nm[None, :, :], axis=-1)
    within = distances <= radius_nm
    return (within @ embeddings.astype(np.float64)) / within.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("radius_nm", [0.0, 500.0, 2_000.0, 10_000.0, 1e9])
def test_matches_brute_force_on_random_skeleton_like_points(radius_nm):
    rng = np.random.default_rng(int(radius_nm) % 97)
    # A random walk with ~1.5 um steps, like SegCLR's skeleton node spacing.
    xyz = np.cumsum(rng.normal(scale=900.0, size=(400, 3)), axis=0)
    embeddings = rng.normal(size=(400, 16)).astype(np.float32)
    got = aggregate_embeddings(xyz, embeddings, radius_nm)
    assert got.dtype == np.float32 and got.shape == (400, 16)
    np.testing.assert_allclose(got, brute_force_means(xyz, embeddings, radius_nm), rtol=1e-5, atol=1e-6)


def test_radius_zero_returns_each_node_itself():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(0, 1e5, size=(50, 3))
    embeddings = rng.normal(size=(50, 64)).astype(np.float32)
    np.testing.assert_array_equal(aggregate_embeddings(xyz, embeddings, 0.0), embeddings)


def test_radius_is_inclusive_and_measured_in_nm():
    xyz = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [100.0, 0.0, 0.0]])
    embeddings = np.array([[0.0], [10.0], [100.0]], dtype=np.float32)
    assert aggregate_embeddings(xyz, embeddings, 5.0)[:, 0].tolist() == [5.0, 5.0, 100.0]
    assert aggregate_embeddings(xyz, embeddings, 4.999)[:, 0].tolist() == [0.0, 10.0, 100.0]


def test_huge_radius_gives_the_segment_mean_everywhere():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(30, 8)).astype(np.float32)
    got = aggregate_embeddings(rng.uniform(0, 1e4, size=(30, 3)), embeddings, 1e7)
    np.testing.assert_allclose(got, np.broadcast_to(embeddings.mean(axis=0), got.shape), rtol=1e-5, atol=1e-6)


def test_empty_segment_and_bad_input():
    assert aggregate_embeddings(np.zeros((0, 3)), np.zeros((0, 64)), 10.0).shape == (0, 64)
    with pytest.raises(ValueError, match="radius_nm"):
        aggregate_embeddings(np.zeros((1, 3)), np.zeros((1, 4)), -1.0)
    with pytest.raises(ValueError, match="radius_nm"):
        aggregate_embeddings(np.zeros((1, 3)), np.zeros((1, 4)), float("nan"))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        aggregate_embeddings(np.zeros((2, 2)), np.zeros((2, 4)), 1.0)
    with pytest.raises(ValueError, match="N=2"):
        aggregate_embeddings(np.zeros((2, 3)), np.zeros((3, 4)), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        aggregate_embeddings(np.array([[0.0, np.nan, 0.0]]), np.zeros((1, 4)), 1.0)


def test_segclr_radii():
    assert SEGCLR_AGGREGATION_RADII_NM == {"aggregated_10um": 10_000.0, "aggregated_25um": 25_000.0}


def overlapping_segments(rng: np.random.Generator, count: int, dim: int = 8):
    """Segments that all occupy the same region, so any mixing would change the means."""
    segments = {}
    for segment_id in range(1000, 1000 + count):
        n = int(rng.integers(1, 25))
        xyz_vox = rng.integers(0, 60, size=(n, 3)).astype(np.float64)
        embeddings = (rng.normal(size=(n, dim)) + segment_id).astype(np.float32)
        segments[segment_id] = (np.arange(n, dtype=np.int64) + 7, xyz_vox, embeddings)
    return segments


def test_aggregate_store_never_mixes_segments_and_scales_voxels(tmp_path):
    rng = np.random.default_rng(3)
    voxel_size = np.array([8.0, 8.0, 40.0])
    src = CsvZipStore(tmp_path / "src", num_shards=4, coordinates="voxels")
    dst = CsvZipStore(tmp_path / "dst", num_shards=4, coordinates="voxels")
    segments = overlapping_segments(rng, 30)
    src.write_many(segments)
    reports = []
    summary = drive(aggregate_store(src, dst, 200.0, voxel_size_nm=voxel_size), reports.append)
    assert summary == AggregationSummary(
        shards=len(src.shards()), segments=30, nodes=sum(len(s[0]) for s in segments.values())
    )
    assert [r.done for r in reports] == list(range(1, len(src.shards()) + 1))
    assert all(isinstance(r, Progress) and r.total == len(src.shards()) and r.unit == "shards" for r in reports)
    assert sorted(dst.segment_ids()) == sorted(segments)
    for segment_id, (node_ids, xyz_vox, embeddings) in segments.items():
        got_ids, got_xyz, got_embeddings = dst.read(segment_id)
        np.testing.assert_array_equal(got_ids, node_ids)
        np.testing.assert_array_equal(got_xyz, xyz_vox)  # coordinates copied unchanged
        expected = brute_force_means(xyz_vox * voxel_size, embeddings, 200.0)
        np.testing.assert_allclose(got_embeddings, expected, rtol=1e-5, atol=1e-5)


def test_anisotropic_voxels_change_who_is_a_neighbour(tmp_path):
    src = CsvZipStore(tmp_path / "src", num_shards=1, coordinates="voxels")
    src.write(1, [1, 2], [[0, 0, 0], [0, 0, 1]], [[0.0], [2.0]])  # one voxel apart in z
    for radius, expected in [(39.0, [0.0, 2.0]), (40.0, [1.0, 1.0])]:
        dst = CsvZipStore(tmp_path / f"dst{radius}", num_shards=1, coordinates="voxels")
        drive(aggregate_store(src, dst, radius, voxel_size_nm=(8, 8, 40)))
        assert dst.read(1)[2][:, 0].tolist() == expected


def test_aggregate_store_nm_coordinates_and_selected_shards(tmp_path):
    rng = np.random.default_rng(4)
    src = CsvZipStore(tmp_path / "src", num_shards=3, coordinates="nm")
    segments = overlapping_segments(rng, 12)
    src.write_many(segments)
    dst = CsvZipStore(tmp_path / "dst", num_shards=3, coordinates="nm")
    chosen = src.shards()[0]
    summary = drive(aggregate_store(src, dst, 25.0, shards=[chosen]))
    expected_ids = [s for s in segments if src.shard_of(s) == chosen]
    assert summary.segments == len(expected_ids)
    assert sorted(dst.segment_ids()) == sorted(expected_ids)
    _node_ids, xyz, embeddings = segments[expected_ids[0]]
    np.testing.assert_allclose(
        dst.read(expected_ids[0])[2], brute_force_means(xyz, embeddings, 25.0), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(FileExistsError):
        drive(aggregate_store(src, dst, 25.0, shards=[chosen]))
    drive(aggregate_store(src, dst, 25.0, shards=[chosen], overwrite=True))


def test_aggregate_store_rejects_inconsistent_arguments(tmp_path):
    voxels = CsvZipStore(tmp_path / "a", coordinates="voxels")
    nm = CsvZipStore(tmp_path / "b", coordinates="nm")
    with pytest.raises(ValueError, match="voxel_size_nm"):
        drive(aggregate_store(voxels, CsvZipStore(tmp_path / "c", coordinates="voxels"), 10.0))
    with pytest.raises(ValueError, match="leave voxel_size_nm as None"):
        drive(aggregate_store(nm, CsvZipStore(tmp_path / "c", coordinates="nm"), 10.0, (8, 8, 40)))
    with pytest.raises(ValueError, match="labels must match"):
        drive(aggregate_store(voxels, nm, 10.0, (8, 8, 40)))
    with pytest.raises(ValueError, match="same store"):
        drive(aggregate_store(voxels, CsvZipStore(tmp_path / "a", coordinates="voxels"), 10.0, (8, 8, 40)))
    with pytest.raises(ValueError, match="3 positive"):
        drive(aggregate_store(voxels, CsvZipStore(tmp_path / "c", coordinates="voxels"), 10.0, (8, 0, 40)))
