"""Volume access and masked cutouts against plain numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segscope.analysis.volume import (
    SegmentNotFoundError,
    VolumeError,
    cut_masked,
    iter_cutout_batches,
    open_volume,
    write_volume,
)

VOXEL = (32.0, 32.0, 40.0)
SEG_ID = 2**40 + 7


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 70 x 60 x 50 random image and a segmentation with two boxes, as precomputed."""
    root = tmp_path_factory.mktemp("vol")
    rng = np.random.default_rng(1)
    em = rng.integers(1, 256, (70, 60, 50), dtype=np.uint8)
    seg = np.zeros(em.shape, np.uint64)
    seg[5:40, 10:50, 3:30] = SEG_ID
    seg[40:65, 0:30, 20:50] = 3
    write_volume(root / "image", em, VOXEL)
    write_volume(root / "seg", seg, VOXEL, segmentation=True, extra_info={"skeletons": "skeletons"})
    return open_volume(root / "image"), open_volume(f"file://{root / 'seg'}"), em, seg


def numpy_cutout(em, seg, segment_id, centre_vox, size):
    """Reference: pad both arrays generously and slice around the centre voxel."""
    pad = max(size)
    em_p = np.pad(np.where(seg == segment_id, em, 0), pad)
    lo = np.asarray(centre_vox) + pad - np.asarray(size) // 2
    return em_p[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]


def test_readback_equals_written(pair):
    image, seg_volume, em, seg = pair
    assert np.array_equal(image.read_all(), em)
    assert np.array_equal(seg_volume.read_all(), seg)
    assert image.shape == (70, 60, 50) and seg_volume.dtype == np.uint64
    assert np.allclose(image.voxel_size_nm, VOXEL)
    assert json.loads((__import__("pathlib").Path(seg_volume.url[7:]) / "info").read_text())["skeletons"] == "skeletons"


def test_read_outside_is_zero_padded(pair):
    image, _, em, _ = pair
    block = image.read((-3, -2, -1), (4, 5, 6))
    assert block.shape == (7, 7, 7)
    assert np.all(block[:3] == 0) and np.all(block[:, :2] == 0) and np.all(block[:, :, :1] == 0)
    assert np.array_equal(block[3:, 2:, 1:], em[:4, :5, :6])


@pytest.mark.parametrize("shared", [True, False])
def test_cutouts_equal_numpy_slicing_including_borders(pair, shared):
    image, seg_volume, em, seg = pair
    size = (21, 17, 15)
    centres_vox = np.array([[6, 11, 4], [20, 30, 15], [39, 49, 29], [21, 31, 16]])
    centres_nm = (centres_vox + 0.5) * np.asarray(VOXEL)
    cuts = cut_masked(image, seg_volume, SEG_ID, centres_nm, size, shared_reads=shared)
    assert cuts.dtype == np.uint8 and cuts.shape == (4, *size)
    for cut, centre in zip(cuts, centres_vox):
        assert np.array_equal(cut, numpy_cutout(em, seg, SEG_ID, centre, size))
    # The centre voxel of the cutout is the voxel holding the centre point.
    assert cuts[1][10, 8, 7] == em[20, 30, 15]


def test_downsampled_cutout_masks_block_centres(pair):
    image, seg_volume, em, seg = pair
    centre_vox = np.array([20, 30, 15])
    cut = cut_masked(image, seg_volume, SEG_ID, [(centre_vox + 0.5) * VOXEL], (5, 5, 5), downsample=(2, 2, 2))[0]
    # Output voxel (2, 2, 2) spans native [c - 1, c + 1): mean of that 2^3 EM block,
    # rounded half up.
    block = em[19:21, 29:31, 14:16].astype(int)
    assert cut[2, 2, 2] == (block.sum() + 4) // 8
    # Voxels whose block centre is outside the segment are masked.
    inside = (
        seg[::1][
            (centre_vox[0] - 5) : (centre_vox[0] + 5) : 2,
            (centre_vox[1] - 5) : (centre_vox[1] + 5) : 2,
            (centre_vox[2] - 5) : (centre_vox[2] + 5) : 2,
        ]
        == SEG_ID
    )
    assert np.array_equal(cut > 0, inside)


def test_iter_batches_cover_all_centres_in_order(pair):
    image, seg_volume, _em, _seg = pair
    centres = (np.array([[10, 20, 10], [30, 40, 20], [12, 22, 12], [35, 45, 25], [8, 15, 5]]) + 0.5) * VOXEL
    whole = cut_masked(image, seg_volume, SEG_ID, centres, (9, 9, 9))
    seen = []
    for indices, batch in iter_cutout_batches(image, seg_volume, SEG_ID, centres, 2, (9, 9, 9)):
        assert np.array_equal(batch, whole[indices])
        seen.extend(indices.tolist())
    assert seen == [0, 1, 2, 3, 4]


def test_unknown_segment_is_named(pair):
    image, seg_volume, _, _ = pair
    with pytest.raises(SegmentNotFoundError, match="segment 999 has no voxels"):
        cut_masked(image, seg_volume, 999, [(20.5 * 32, 30.5 * 32, 15.5 * 40)], (9, 9, 9))


def test_out_of_bounds_centre_is_named(pair):
    image, seg_volume, _, _ = pair
    with pytest.raises(ValueError, match=r"centre 1 at .* lies outside the volume"):
        cut_masked(image, seg_volume, SEG_ID, [(700, 700, 700), (1e7, 0, 0)], (9, 9, 9))


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        open_volume(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a volume")
    with pytest.raises(VolumeError, match="unsupported or missing volume format"):
        open_volume(tmp_path / "junk")
    with pytest.raises(VolumeError, match="unsupported URL scheme"):
        open_volume("ftp://example.org/vol")


def test_mismatched_voxel_sizes_are_refused(pair, tmp_path):
    image, _, _em, seg = pair
    write_volume(tmp_path / "seg", seg, (16, 16, 40), segmentation=True)
    other = open_volume(tmp_path / "seg")
    with pytest.raises(VolumeError, match="differs from segmentation"):
        cut_masked(image, other, SEG_ID, [(640, 960, 600)], (9, 9, 9))


def test_zarr3_in_zyx_order_is_read_as_xyz(tmp_path):
    import tensorstore as ts

    data_xyz = np.random.default_rng(2).integers(0, 255, (12, 10, 8), dtype=np.uint8)
    store = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(tmp_path / "z.zarr")},
            "create": True,
            "schema": {
                "dtype": "uint8",
                "domain": {"shape": [8, 10, 12], "labels": ["z", "y", "x"]},
                "dimension_units": [[40, "nm"], [32, "nm"], [32, "nm"]],
            },
        }
    ).result()
    store.write(data_xyz.transpose(2, 1, 0)).result()
    volume = open_volume(tmp_path / "z.zarr")
    assert volume.info.driver == "zarr3"
    assert volume.shape == (12, 10, 8)
    assert np.allclose(volume.voxel_size_nm, (32, 32, 40))
    assert np.array_equal(volume.read_all(), data_xyz)


def test_zarr2_needs_a_voxel_size(tmp_path):
    import tensorstore as ts

    ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(tmp_path / "z2")},
            "create": True,
            "schema": {"dtype": "uint8", "domain": {"shape": [4, 5, 6]}},
        }
    ).result()
    with pytest.raises(VolumeError, match="pass voxel_size_nm"):
        open_volume(tmp_path / "z2")
    volume = open_volume(f"zarr://{tmp_path / 'z2'}", voxel_size_nm=(8, 8, 8), axes="xyz")
    assert volume.shape == (4, 5, 6)


def test_em_and_mask_parts_compose_to_the_masked_cutout(pair):
    from segscope.analysis.volume import cut_em_and_mask

    image, seg_volume, em, _seg = pair
    centres = (np.array([[6, 11, 4], [20, 30, 15]]) + 0.5) * VOXEL
    em_cut, mask = cut_em_and_mask(image, seg_volume, SEG_ID, centres, (11, 11, 11))
    assert mask.dtype == bool and em_cut.dtype == np.uint8
    assert np.array_equal(em_cut[1], em[15:26, 25:36, 10:21])
    assert np.array_equal(np.where(mask, em_cut, 0), cut_masked(image, seg_volume, SEG_ID, centres, (11, 11, 11)))


def test_in_memory_copy_reads_the_same(pair):
    image, _, _em, _ = pair
    copy = image.in_memory()
    assert copy.shape == image.shape and np.allclose(copy.voxel_size_nm, VOXEL)
    assert np.array_equal(copy.read((-4, 50, 40), (10, 70, 60)), image.read((-4, 50, 40), (10, 70, 60)))


def test_a_silent_or_absent_server_gives_one_line_within_the_deadline(monkeypatch):
    """A server that accepts and never answers, and a closed port: a clear error, no hang."""
    import socket
    import time

    from segscope.analysis.volume import VolumeError, open_volume

    monkeypatch.setenv("SEGSCOPE_REMOTE_TIMEOUT_S", "2")
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(8)  # accepts connections (the kernel's backlog) and never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for url in (f"http://127.0.0.1:{black_hole.getsockname()[1]}/vol", f"http://127.0.0.1:{closed_port}/vol"):
            started = time.monotonic()
            with pytest.raises(VolumeError, match=r"no answer within 2 s|cannot read|cannot reach"):
                open_volume(url)
            assert time.monotonic() - started < 20
    finally:
        black_hole.close()
