"""Segment meshes: zmesh surfaces in nm, the legacy precomputed files, boxes grown around a click."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from segscope.analysis.meshes import (
    MESH_INFO_TYPE,
    Mesh,
    cached_segment_mesh,
    decode_fragment,
    encode_fragment,
    grow_segment_box,
    link_meshes,
    mesh_labels,
    mesh_segment_around,
    mesh_volume,
    named_mesh,
    read_mesh,
    write_mesh_folder,
)
from segscope.analysis.progress import drive
from segscope.analysis.volume import SegmentNotFoundError, open_volume, write_volume

VOXEL = np.array([4.0, 5.0, 6.0])  # anisotropic on purpose


def on_surface(vertices_nm, mask, voxel_nm, offset_vox, reach_vox):
    """For each vertex: do voxels within ``reach_vox`` (per axis) of it hold both inside and outside?"""
    steps = np.linspace(-reach_vox, reach_vox, 5)
    shifts = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    padded = np.pad(mask, 3)  # voxels beyond the block are outside
    vox = np.floor(np.asarray(vertices_nm, float)[:, None, :] / voxel_nm + shifts).astype(int)
    vox = np.clip(vox - np.asarray(offset_vox) + 3, 0, np.array(padded.shape) - 1)
    values = padded[vox[..., 0], vox[..., 1], vox[..., 2]]
    return values.any(axis=1) & ~values.all(axis=1)


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return np.linalg.norm((grid + 0.5 - np.asarray(centre)) * VOXEL / VOXEL.min(), axis=-1) <= radius


def test_box_mesh_lies_on_the_voxel_faces_in_nm():
    labels = np.zeros((12, 14, 16), np.uint64)
    labels[2:6, 3:9, 4:11] = 2**40 + 7  # a uint64 id above 2^32
    offset = np.array([100, 200, 300])
    (mesh,) = mesh_labels(labels, VOXEL, offset_vox=offset, reduction_factor=0)
    assert mesh.segment_id == 2**40 + 7
    assert mesh.vertices_nm.dtype == np.float32 and mesh.faces.dtype == np.uint32
    # Voxel v spans [v, v + 1) * voxel: the box's faces are at its first and one-past-last voxels.
    np.testing.assert_allclose(mesh.vertices_nm.min(axis=0), (offset + np.array([2, 3, 4])) * VOXEL, atol=1e-3)
    np.testing.assert_allclose(mesh.vertices_nm.max(axis=0), (offset + np.array([6, 9, 11])) * VOXEL, atol=1e-3)
    # A closed surface: every edge is shared by exactly two triangles.
    edges = np.sort(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert set(counts.tolist()) == {2}


@pytest.mark.parametrize(("reduction", "reach"), [(0, 0.51), (10, 1.01)])
def test_ball_vertices_lie_on_the_mask_surface(reduction, reach):
    mask = ball((30, 28, 22), (15, 14, 11), 9.0)
    offset = (7, -3, 40)
    (mesh,) = mesh_labels(mask, VOXEL, offset_vox=offset, reduction_factor=reduction)
    # Each vertex is at most half a voxel (marching cubes) or one voxel (simplified, zmesh's
    # default error bound) from voxels both inside and outside the mask.
    assert on_surface(mesh.vertices_nm, mask, VOXEL, offset, reach).all()
    assert not on_surface(mesh.vertices_nm + 2 * VOXEL, mask, VOXEL, offset, reach).all()  # the check can fail
    # and the surface is not a few stray triangles: it reaches every face of the ball's box.
    inside = np.argwhere(mask)
    np.testing.assert_allclose(mesh.vertices_nm.min(axis=0), (inside.min(axis=0) + offset) * VOXEL, atol=VOXEL.max())
    if reduction:
        unsimplified = next(mesh_labels(mask, VOXEL, reduction_factor=0))
        assert mesh.n_faces < unsimplified.n_faces / 4


def test_only_the_asked_segments_are_meshed():
    labels = np.zeros((10, 10, 10), np.uint32)
    labels[1:4, 1:4, 1:4] = 5
    labels[5:9, 5:9, 5:9] = 6
    assert [m.segment_id for m in mesh_labels(labels, VOXEL)] == [5, 6]
    assert [m.segment_id for m in mesh_labels(labels, VOXEL, segment_ids=[6])] == [6]


def test_fragment_bytes_round_trip_and_reject_malformed_data():
    vertices = np.array([[0, 0, 0], [1.5, 0, 0], [0, 2.5, 3]], np.float32)
    faces = np.array([[0, 1, 2]], np.uint32)
    data = encode_fragment(vertices, faces)
    assert len(data) == 4 + 3 * 12 + 12 and data[:4] == (3).to_bytes(4, "little")
    got_vertices, got_faces = decode_fragment(data)
    np.testing.assert_array_equal(got_vertices, vertices)
    np.testing.assert_array_equal(got_faces, faces)
    with pytest.raises(ValueError, match="whole triangles"):
        decode_fragment(data[:-1])
    with pytest.raises(ValueError, match="vertex 3 of 3"):
        decode_fragment(encode_fragment(vertices, [[0, 1, 2]])[:-4] + (3).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="names vertex"):
        encode_fragment(vertices, [[0, 1, 7]])


@pytest.fixture
def labelled_volume(tmp_path):
    """A precomputed uint64 segmentation: two balls and a long tube along x, voxel offset (10, 0, 5)."""
    labels = np.zeros((96, 40, 36), np.uint64)
    labels[ball(labels.shape, (20, 20, 18), 10.0)] = 11
    labels[ball(labels.shape, (60, 20, 18), 8.0)] = 2**35
    labels[4:92, 30:34, 26:30] = 99  # the tube: touches small boxes' faces along x
    path = tmp_path / "segmentation"
    write_volume(path, labels, VOXEL, segmentation=True, chunk_size=(32, 32, 32), voxel_offset=(10, 0, 5))
    info = json.loads((path / "info").read_text())
    info.update(segment_properties="props", skeletons="skeletons")
    (path / "info").write_text(json.dumps(info))
    return path, labels


def test_volume_meshed_in_blocks_writes_valid_manifests_and_fragments(labelled_volume):
    path, labels = labelled_volume
    segmentation = open_volume(path)
    reports = []
    summary = drive(mesh_volume(segmentation, path / "mesh", block_vox=(32, 32, 32)), reports.append)
    assert reports[-1].done == reports[-1].total == 3 * 2 * 2  # blocks
    assert summary.n_segments == 3 and summary.n_fragments > 3  # the tube spans blocks
    assert json.loads((path / "mesh" / "info").read_text()) == {"@type": MESH_INFO_TYPE}
    origin = np.array([10, 0, 5])
    for segment in (11, 2**35, 99):
        manifest = json.loads((path / "mesh" / f"{segment}:0").read_text())
        assert set(manifest) == {"fragments"} and manifest["fragments"]
        assert all((path / "mesh" / name).is_file() for name in manifest["fragments"])
        mesh = read_mesh(path / "mesh", segment)
        inside = np.argwhere(labels == segment) + origin
        # Fragments of all blocks together cover the segment: its box's faces, in nm.
        np.testing.assert_allclose(mesh.vertices_nm.min(axis=0), inside.min(axis=0) * VOXEL, atol=VOXEL.max())
        np.testing.assert_allclose(mesh.vertices_nm.max(axis=0), (inside.max(axis=0) + 1) * VOXEL, atol=VOXEL.max())
        assert on_surface(mesh.vertices_nm, labels == segment, VOXEL, origin, 1.01).all()
    # Naming the meshes keeps the info's other keys (segment properties, skeletons, scales).
    before = json.loads((path / "info").read_text())
    assert link_meshes(path) == {**before, "mesh": "mesh"}
    assert json.loads((path / "info").read_text()) == {**before, "mesh": "mesh"}
    assert named_mesh(str(path)) == "mesh" and named_mesh(f"precomputed://file://{path}") == "mesh"
    assert named_mesh(f"zarr://{path}") is None


def test_volume_without_meshes_names_none(labelled_volume, tmp_path):
    path, _ = labelled_volume
    assert named_mesh(str(path)) is None
    assert named_mesh(str(tmp_path / "missing")) is None
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "info").write_text(json.dumps({"type": "image"}))
    with pytest.raises(ValueError, match="not a precomputed segmentation"):
        link_meshes(tmp_path / "image")


def test_box_grows_while_the_segment_touches_its_faces(labelled_volume):
    path, labels = labelled_volume
    segmentation = open_volume(path)
    origin = np.array([10, 0, 5])
    seed = np.array([50, 31, 27]) + origin  # in the tube's middle
    reports = []
    box = drive(grow_segment_box(segmentation, 99, seed, initial_box_vox=(8, 8, 8)), reports.append)
    assert len(reports) > 1 and all(r.unit == "boxes" for r in reports)
    assert not box.truncated
    # The grown box holds the whole tube.
    assert box.mask.sum() == (labels == 99).sum()
    assert box.lo_vox[0] <= 4 + origin[0] and box.hi_vox[0] >= 92 + origin[0]
    # A limit shorter than the tube: truncated, the box no longer than the limit.
    short = drive(grow_segment_box(segmentation, 99, seed, initial_box_vox=(8, 8, 8), max_box_vox=(32, 64, 64)))
    assert short.truncated and short.hi_vox[0] - short.lo_vox[0] == 32
    # A ball inside the first box needs no growth.
    whole = drive(grow_segment_box(segmentation, 11, np.array([20, 20, 18]) + origin, initial_box_vox=(40, 40, 36)))
    assert not whole.truncated and whole.mask.sum() == (labels == 11).sum()
    with pytest.raises(SegmentNotFoundError, match="segment 12345 has no voxel"):
        drive(grow_segment_box(segmentation, 12345, seed))
    with pytest.raises(ValueError, match="outside the volume"):
        drive(grow_segment_box(segmentation, 99, [0, 0, 0]))


def test_segment_meshed_around_a_click_and_cached(labelled_volume, tmp_path):
    path, labels = labelled_volume
    segmentation = open_volume(path)
    origin = np.array([10, 0, 5])
    click_nm = (np.array([50, 31, 27]) + origin + 0.5) * VOXEL
    folder, result = drive(
        cached_segment_mesh(segmentation, 99, click_nm, tmp_path / "cache", initial_box_vox=(16, 16, 16))
    )
    assert result is not None and not result.truncated and result.seconds >= result.read_seconds > 0
    assert json.loads((folder / "info").read_text())["@type"] == MESH_INFO_TYPE
    mesh = read_mesh(folder, 99)
    inside = np.argwhere(labels == 99) + origin
    np.testing.assert_allclose(mesh.vertices_nm.min(axis=0), inside.min(axis=0) * VOXEL, atol=VOXEL.max())
    np.testing.assert_allclose(mesh.vertices_nm.max(axis=0), (inside.max(axis=0) + 1) * VOXEL, atol=VOXEL.max())
    again = drive(cached_segment_mesh(segmentation, 99, click_nm, tmp_path / "cache"))
    assert again == (folder, None)  # made once
    # Cut by the box limit, the mesh is still closed (capped at the box's faces).
    truncated = drive(
        mesh_segment_around(segmentation, 99, click_nm, initial_box_vox=(8, 8, 8), max_box_vox=(24, 8, 8))
    )
    assert truncated.truncated
    edges = np.sort(truncated.mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    assert set(np.unique(edges, axis=0, return_counts=True)[1].tolist()) == {2}


def test_write_mesh_folder_names_segment_properties(tmp_path):
    mesh = next(mesh_labels(ball((10, 10, 10), (5, 5, 5), 3.0).view(np.uint8), VOXEL))
    mesh = Mesh(42, mesh.vertices_nm, mesh.faces)
    assert write_mesh_folder(tmp_path / "m", [mesh], segment_properties="../props") == 1
    assert json.loads((tmp_path / "m" / "info").read_text()) == {
        "@type": MESH_INFO_TYPE,
        "segment_properties": "../props",
    }
    np.testing.assert_array_equal(read_mesh(tmp_path / "m", 42).faces, mesh.faces)
    with pytest.raises(KeyError, match="no mesh of segment 7"):
        read_mesh(tmp_path / "m", 7)
    with pytest.raises(ValueError, match="two meshes"):
        write_mesh_folder(tmp_path / "n", [mesh, mesh])


def test_demo_dataset_has_a_mesh_for_every_segment(demo96_dir, tmp_path):
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo96_dir)
    assert dataset.meta["meshes"] == "segmentation/mesh" and dataset.meshes == demo96_dir / "segmentation" / "mesh"
    info = json.loads((demo96_dir / "segmentation" / "info").read_text())
    assert info["mesh"] == "mesh" and info["skeletons"] == "skeletons"
    labels = dataset.segmentation.read_all()
    for segment in dataset.segment_ids.tolist():
        assert (dataset.meshes / f"{segment}:0").is_file(), segment
    segment = int(dataset.segment_ids[np.argmax(np.asarray(dataset.segments["n_voxels"]))])
    mesh = read_mesh(dataset.meshes, segment)
    assert on_surface(mesh.vertices_nm, labels == segment, dataset.voxel_size_nm, (0, 0, 0), 1.01).all()
    # A copy of only the image and segmentation, as a user's volume: no meshes named.
    plain = tmp_path / "plain"
    shutil.copytree(demo96_dir / "segmentation", plain / "segmentation", ignore=shutil.ignore_patterns("mesh"))
    info.pop("mesh")
    (plain / "segmentation" / "info").write_text(json.dumps(info))
    assert named_mesh(str(plain / "segmentation")) is None


# -- the bridge: the clicked segment's mesh in 3-D ------------------------------------------------


@pytest.fixture
def plain_copy(demo96_dir, tmp_path):
    """A user's volume: the demo's image and segmentation only (no meshes, skeletons or tables)."""
    plain = tmp_path / "plain"
    shutil.copytree(demo96_dir / "image", plain / "image")
    shutil.copytree(
        demo96_dir / "segmentation", plain / "segmentation", ignore=shutil.ignore_patterns("mesh", "skeletons")
    )
    info = json.loads((plain / "segmentation" / "info").read_text())
    for key in ("mesh", "skeletons"):
        info.pop(key)
    (plain / "segmentation" / "info").write_text(json.dumps(info))
    return plain


def voxel_of(folder, rank=0):
    """A segment (the ``rank``-th largest) and the nm centre of one of its voxels."""
    segmentation = open_volume(folder / "segmentation")
    labels = segmentation.read_all()
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    segment = ids[np.argsort(counts)[::-1][rank]]
    voxels = np.argwhere(labels == segment)
    return int(segment), (voxels[len(voxels) // 2] + 0.5) * segmentation.voxel_size_nm


def open_in_bridge(folder, cache, box=None):
    from segscope.app.controller import DataSource
    from segscope.app.neuroglancer_bridge import NeuroglancerBridge
    from segscope.app.state import SessionState

    source = DataSource.open(str(folder / "image"), str(folder / "segmentation"), skeleton_box_vox=box)
    bridge = NeuroglancerBridge(mesh_cache_root=cache)
    statuses = []
    bridge.events.mesh_status.connect(statuses.append)
    state = SessionState()
    bridge.attach(state)
    bridge.show_source(source)
    return bridge, state, statuses


def wait_for(condition, timeout_s=60.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def segmentation_urls(bridge):
    from segscope.app.neuroglancer_bridge import SEGMENTATION_LAYER

    return [s.url for s in bridge.viewer.state.layers[SEGMENTATION_LAYER].source]


def test_bridge_meshes_the_clicked_segment_of_a_volume_without_meshes(plain_copy, tmp_path):
    import urllib.request

    from segscope.app.neuroglancer_bridge import MESH_OBJECT_ALPHA, SEGMENTATION_LAYER

    bridge, state, statuses = open_in_bridge(plain_copy, tmp_path / "cache")
    try:
        first, click = voxel_of(plain_copy, 0)
        state.select_segment(first, click)
        wait_for(lambda: statuses)
        status = statuses[0]
        assert status.segment_id == first and not status.error and not status.cached and status.seconds > 0
        assert bridge.flush()
        layer = bridge.viewer.state.layers[SEGMENTATION_LAYER]
        assert layer.object_alpha == MESH_OBJECT_ALPHA < 1  # the nodes inside stay visible
        urls = segmentation_urls(bridge)
        assert len(urls) == 2 and urls[1] == status.source
        # The page can fetch the mesh: the info, the manifest and the fragment it names.
        base = status.source[len("precomputed://") :]
        assert json.loads(urllib.request.urlopen(f"{base}/info").read())["@type"] == MESH_INFO_TYPE
        manifest = json.loads(urllib.request.urlopen(f"{base}/{first}:0").read())
        vertices, _ = decode_fragment(urllib.request.urlopen(f"{base}/{manifest['fragments'][0]}").read())
        labels = open_volume(plain_copy / "segmentation").read_all()
        assert on_surface(vertices, labels == first, VOXEL_DEMO, (0, 0, 0), 1.01).all()

        # Another segment: its mesh replaces the first one's source.
        second, click2 = voxel_of(plain_copy, 1)
        state.select_segment(second, click2)
        wait_for(lambda: len(statuses) == 2)
        assert bridge.flush()
        assert segmentation_urls(bridge) == [urls[0], statuses[1].source]
        # Back to the first: from the cache, at once.
        state.select_segment(first, click)
        wait_for(lambda: len(statuses) == 3)
        assert statuses[2].cached and statuses[2].source == status.source
        # No segment: no mesh source.
        state.clear_segment()
        assert bridge.flush()
        assert segmentation_urls(bridge) == [urls[0]]
        # Background under the click: reported, nothing added.
        state.select_segment(12345, click)
        wait_for(lambda: len(statuses) == 4)
        assert statuses[3].source is None and "12345" in statuses[3].error
    finally:
        bridge.close()


def test_bridge_uses_the_volumes_own_meshes(demo96_dir, tmp_path):
    bridge, state, statuses = open_in_bridge(demo96_dir, tmp_path / "cache")
    try:
        segment, click = voxel_of(demo96_dir, 0)
        state.select_segment(segment, click)
        assert bridge.flush()
        assert bridge._mesher.flush(10)
        assert statuses == [] and len(segmentation_urls(bridge)) == 1
        assert not (tmp_path / "cache").exists()
    finally:
        bridge.close()


VOXEL_DEMO = np.array([32.0, 32.0, 40.0])


def test_bridge_meshes_in_the_skeleton_box_limit(plain_copy, tmp_path):
    """One limit (--skeleton-box-vox) for the boxes of skeletons and meshes made on demand."""
    bridge, state, statuses = open_in_bridge(plain_copy, tmp_path / "cache", box=24)
    try:
        assert bridge.mesh_max_box_vox == 24
        segment, click = voxel_of(plain_copy, 0)  # the largest segment: longer than 24 voxels
        state.select_segment(segment, click)
        wait_for(lambda: statuses)
        assert statuses[0].truncated and statuses[0].source is not None
        box = json.loads((tmp_path / "cache").glob(f"*/{segment}/segscope-mesh.json").__next__().read_text())["box_vox"]
        assert max(hi - lo for lo, hi in zip(*box)) <= 24
    finally:
        bridge.close()
