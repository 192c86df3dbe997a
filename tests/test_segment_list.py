"""Segment lists from a segmentation: chunked scans, boxes, size filters and id files."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.progress import drive
from segscope.analysis.segment_list import (
    enumerate_segments,
    find_segment_voxel,
    parse_bbox,
    read_segment_ids_file,
)
from segscope.analysis.volume import SegmentNotFoundError, open_volume, write_volume


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    seg = np.zeros((96, 80, 40), np.uint64)
    for label in (3, 2**40 + 1, 77, 1000):
        lo = rng.integers(0, (80, 64, 30))
        size = rng.integers(2, 16, 3)
        seg[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = label
    write_volume(tmp_path / "seg", seg, (8, 8, 40), segmentation=True, chunk_size=(32, 32, 16))
    return open_volume(tmp_path / "seg"), seg


def test_enumeration_counts_every_id_and_keeps_a_voxel_of_each(labelled, monkeypatch):
    from segscope.analysis import segment_list

    monkeypatch.setattr(segment_list, "_BLOCK_VOXELS", 32 * 32 * 16)  # one chunk a block: ids span blocks
    volume, seg = labelled
    reports = []
    found = drive(enumerate_segments(volume), reports.append)
    ids, counts = np.unique(seg[seg > 0], return_counts=True)
    assert found.ids.tolist() == ids.tolist() and found.voxel_counts.tolist() == counts.tolist()
    for segment_id, seed in zip(found.ids, found.seed_vox):
        assert seg[tuple(seed)] == segment_id
    assert reports[-1].done == reports[-1].total == 27 and reports[-1].unit == "blocks"
    assert found.seed_of(12345) is None


def test_enumeration_respects_the_box_and_the_size_filter(labelled):
    volume, seg = labelled
    lo, hi = np.array([10, 5, 3]), np.array([70, 60, 33])
    found = drive(enumerate_segments(volume, box_vox=(lo, hi), min_voxels=20))
    part = seg[10:70, 5:60, 3:33]
    ids, counts = np.unique(part[part > 0], return_counts=True)
    assert found.ids.tolist() == ids[counts >= 20].tolist()
    assert np.all((found.seed_vox >= lo) & (found.seed_vox < hi))
    with pytest.raises(ValueError, match="lies outside"):
        drive(enumerate_segments(volume, box_vox=((500, 0, 0), (600, 10, 10))))


def test_unstored_blocks_of_a_zarr_volume_are_skipped_but_counted(tmp_path):
    import tensorstore as ts

    store = ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(tmp_path / "z")},
            "metadata": {"shape": [512, 512, 256], "chunks": [64, 64, 64], "dtype": "<u8"},
            "create": True,
        }
    ).result()
    store[300:310, 20:30, 200:205].write(np.full((10, 10, 5), 12, np.uint64)).result()
    volume = open_volume(tmp_path / "z", voxel_size_nm=(8, 8, 40))
    assert volume.is_stored((0, 0, 0), (64, 64, 64)) is False
    assert volume.is_stored((256, 0, 192), (320, 64, 256)) is True
    found = drive(enumerate_segments(volume))
    assert found.ids.tolist() == [12] and found.voxel_counts.tolist() == [500]
    assert drive(find_segment_voxel(volume, 12)).tolist() == [300, 20, 200]


def test_find_segment_voxel_and_missing_segments(labelled):
    volume, seg = labelled
    assert seg[tuple(drive(find_segment_voxel(volume, 77)))] == 77
    with pytest.raises(SegmentNotFoundError, match="segment 5 has no voxels"):
        drive(find_segment_voxel(volume, 5))


def test_parse_bbox_in_voxels_and_nm():
    lo, hi = parse_bbox("1,2,3,11,12,13", (8, 8, 40))
    assert lo.tolist() == [1, 2, 3] and hi.tolist() == [11, 12, 13]
    lo, hi = parse_bbox("8,16,40,100,100,100nm", (8, 8, 40))
    assert lo.tolist() == [1, 2, 1] and hi.tolist() == [13, 13, 3]  # widened to whole voxels
    for bad in ("1,2,3", "1,2,3,0,5,6", "1.5,2,3,4,5,6", "a,b,c,d,e,f"):
        with pytest.raises(ValueError, match="--bbox"):
            parse_bbox(bad, (8, 8, 40))


def test_segment_ids_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# my cells\n12, 13\n14 12\n\n")
    assert read_segment_ids_file(path) == [12, 13, 14]
    path.write_text("12\nabc\n")
    with pytest.raises(ValueError, match=r"ids\.txt:2: 'abc'"):
        read_segment_ids_file(path)
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="lists no segment ids"):
        read_segment_ids_file(path)


def test_unstored_chunks_of_a_local_precomputed_volume_are_skipped(tmp_path, monkeypatch):
    """TensorStore cannot say which precomputed chunks exist; the chunk file names can."""
    from segscope.analysis.volume import write_volume

    seg = np.zeros((200, 130, 70), np.uint64)  # 4 x 3 x 2 chunks of 64, the last ones clipped
    seg[150:160, 100:110, 66:70] = 12  # in the corner chunk, whose file name is clipped
    write_volume(tmp_path / "p", seg, (8, 8, 40), segmentation=True, voxel_offset=(10, 20, 30))
    volume = open_volume(tmp_path / "p")
    lo = np.array([10, 20, 30])
    assert volume.is_stored(lo, lo + 64) is False
    end = lo + np.array([200, 130, 70])
    assert volume.is_stored(lo + np.array([128, 64, 64]), end) is True
    assert volume.is_stored(lo + np.array([100, 0, 0]), end) is True  # a box over many chunks

    reads = []
    original = volume.read
    monkeypatch.setattr(volume, "read", lambda a, b: reads.append(1) or original(a, b))
    import segscope.analysis.segment_list as segment_list

    monkeypatch.setattr(segment_list, "_BLOCK_VOXELS", 64**3)  # one chunk per block
    import segscope.analysis.segment_list as segment_list

    monkeypatch.setattr(segment_list, "_BLOCK_VOXELS", 64**3)  # one chunk per block
    reports = []
    found = drive(enumerate_segments(volume), reports.append)
    assert found.ids.tolist() == [12] and found.voxel_counts.tolist() == [400]
    assert reports[-1].total == 24 and len(reads) == 1  # only the block with the stored chunk was read
    assert drive(find_segment_voxel(volume, 12)).tolist() == [160, 120, 96]
