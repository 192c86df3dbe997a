"""Own data: volumes SegScope did not make (no skeletons, no tables), small and declared-large."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from segscope.analysis.artefacts import read_classifier_folder
from segscope.analysis.progress import drive


def plain_copy(demo_dir, out):
    """Only the image and the segmentation of a demo dataset, without its skeletons."""
    out.mkdir()
    shutil.copytree(demo_dir / "image", out / "image")
    shutil.copytree(demo_dir / "segmentation", out / "segmentation", ignore=shutil.ignore_patterns("skeletons"))
    info_path = out / "segmentation" / "info"
    info = json.loads(info_path.read_text())
    info.pop("skeletons", None)
    info_path.write_text(json.dumps(info))
    return out


def declared_large_segmentation(path, *, size=(40_000, 40_000, 8_000), at=(20_000, 20_000, 4_000)):
    """A precomputed segmentation of 12.8 T voxels (8 x 8 x 40 nm) holding one 2.4 um rod (id 11).

    Only the chunks around the rod are written; everything else is unstored background.
    """
    import tensorstore as ts

    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(path)},
            "multiscale_metadata": {"type": "segmentation", "data_type": "uint64", "num_channels": 1},
            "scale_metadata": {
                "size": list(size),
                "resolution": [8, 8, 40],
                "encoding": "compressed_segmentation",
                "compressed_segmentation_block_size": [8, 8, 8],
                "chunk_size": [64, 64, 64],
            },
            "create": True,
        }
    ).result()
    block = np.zeros((400, 64, 16), np.uint64)
    block[50:350, 28:36, 6:10] = 11  # 300 x 8 x 4 voxels: 2.4 um along x
    x, y, z = at
    store[x : x + 400, y : y + 64, z : z + 16, 0].write(block).result()
    return np.array(at) + np.array([200, 32, 8])


def test_a_declared_large_volume_is_skeletonised_in_a_bounded_box(tmp_path):
    from segscope.analysis.segment_list import enumerate_segments
    from segscope.analysis.skeleton_sources import SegmentSkeletons
    from segscope.analysis.volume import open_volume

    centre = declared_large_segmentation(tmp_path / "seg")
    volume = open_volume(tmp_path / "seg")
    assert np.prod(np.asarray(volume.shape, dtype=float)) > 1e13
    skeletons = SegmentSkeletons(volume, max_box_vox=1024, cache_root=tmp_path / "cache")
    found = drive(skeletons.resolve(11, click_nm=(centre + 0.5) * volume.voxel_size_nm))
    assert found.origin == "skeletonised"
    span_vox = np.ptp(found.skeleton.nodes_nm, axis=0) / volume.voxel_size_nm
    assert span_vox[0] > 280  # the whole rod, though the first box was 2 um around the click
    # A segment list of the region around it, in nm.
    half = np.array([300, 100, 20])
    lo_nm = (centre - half) * volume.voxel_size_nm
    hi_nm = (centre + half) * volume.voxel_size_nm
    from segscope.analysis.segment_list import parse_bbox

    box = parse_bbox(",".join(str(v) for v in [*lo_nm, *hi_nm]) + "nm", volume.voxel_size_nm)
    listed = drive(enumerate_segments(volume, box_vox=box))
    assert listed.ids.tolist() == [11] and listed.voxel_counts.tolist() == [300 * 8 * 4]


def test_the_apps_click_skeletonises_a_segment_of_a_plain_volume(demo96_dir, tmp_path, monkeypatch):
    """DataSource and embed_segment_job (the click path) on image + segmentation only."""
    from segscope.app.controller import DataSource, SegmentCentres, embed_segment_job

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    plain = plain_copy(demo96_dir, tmp_path / "plain")
    source = DataSource.open(str(plain / "image"), str(plain / "segmentation"), skeleton_box_vox=256)
    assert source.skeletons is None and not source.has_ground_truth
    segmentation = source.segmentation.read_all()
    ids, counts = np.unique(segmentation[segmentation > 0], return_counts=True)
    segment_id = int(ids[np.argmax(counts)])
    click_vox = np.argwhere(segmentation == segment_id)[0]
    click_nm = (click_vox + 0.5) * source.segmentation.voxel_size_nm
    assert source.skeleton(segment_id) is None
    reports = []
    assert drive(embed_segment_job(source, None, segment_id, click_nm), reports.append) == 0
    assert any("skeletonising" in r.message for r in reports)
    centres = next(r.payload for r in reports if isinstance(r.payload, SegmentCentres))
    assert len(centres.node_ids) >= 3 and centres.skeleton_node_count > len(centres.node_ids)
    assert "skeletonised" in centres.note
    voxels = source.segmentation.nm_to_voxel(centres.positions_nm)
    assert np.all(segmentation[tuple(voxels.T)] == segment_id)
    assert source.skeleton(segment_id) is not None  # cached for the next click and for export


@pytest.mark.slow  # TensorFlow's start-up and the demo encoder: about 30 s on 2 shared cores
def test_embed_and_export_a_plain_volume_with_no_segscope_files(demo96_dir, tmp_path, monkeypatch):
    from segscope.app.cli import main

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    plain = plain_copy(demo96_dir, tmp_path / "plain")
    out = tmp_path / "emb.parquet"
    argv = ["embed", "--image", str(plain / "image"), "--segmentation", str(plain / "segmentation")]
    argv += ["--segments", "all", "--min-voxels", "3000", "--classifiers", "assets/classifiers", "--out", str(out)]
    assert main(argv) == 0
    import pyarrow.parquet as pq

    nodes = pq.read_table(out)
    segments = pq.read_table(tmp_path / "emb.segments.parquet")
    provenance = json.loads(nodes.schema.metadata[b"segscope_provenance"])
    assert provenance["centres"]["skeletons"] == {"skeletonised": segments.num_rows}
    assert provenance["centres"]["thinned_by_distance"] == 0
    assert "ood" in nodes.column_names and nodes.column_names.index("ood") == nodes.column_names.index("ood_score") + 1
    node_segments = nodes.column("segment_id").to_numpy()
    counts = {s: int((node_segments == s).sum()) for s in segments.column("segment_id").to_pylist()}
    assert segments.column("n_nodes").to_pylist() == list(counts.values())
    assert set(segments.column("skeleton").to_pylist()) == {"skeletonised"}
    assert (segments.column("ood").to_numpy() == (segments.column("ood_score").to_numpy() > 0.3048832361044262)).all()
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                *("export", "--nodes", str(out), "--segments", str(tmp_path / "emb.segments.parquet")),
                *("--voxel-size", "32,32,40", "--out", str(bundle)),
            ]
        )
        == 0
    )
    assert (bundle / "segments.parquet").is_file() and (bundle / "state.json").is_file()

    # A second run finds every skeleton in the cache; --segments-file and --bbox narrow the list.
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(str(s) for s in list(counts)[:2]) + "\n")
    argv = ["embed", "--image", str(plain / "image"), "--segmentation", str(plain / "segmentation")]
    argv += ["--segments-file", str(ids_file), "--bbox", "0,0,0,96,96,96", "--out", str(tmp_path / "two.parquet")]
    assert main(argv) == 0
    again = json.loads(pq.read_schema(tmp_path / "two.parquet").metadata[b"segscope_provenance"])
    assert again["centres"]["skeletons"] == {"cached": 2}


def test_classifiers_of_another_encoder_are_refused_by_embed(tmp_path, capsys):
    from segscope.analysis.artefacts import find_demo_classifiers, find_demo_model
    from segscope.analysis.volume import write_volume
    from segscope.app.cli import main

    other = tmp_path / "other.keras"
    other.write_bytes(find_demo_model().read_bytes() + b"\0")
    write_volume(tmp_path / "img", np.zeros((20, 20, 20), np.uint8), (32, 32, 40))
    write_volume(tmp_path / "seg", np.ones((20, 20, 20), np.uint64), (32, 32, 40), segmentation=True)
    argv = ["embed", "--image", str(tmp_path / "img"), "--segmentation", str(tmp_path / "seg"), "--segments", "1"]
    argv += ["--checkpoint", str(other), "--classifiers", str(find_demo_classifiers())]
    assert main([*argv, "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("segscope embed: error: refusing --classifiers") and "other.keras" in err
    assert "20fefd34a930" in err and not (tmp_path / "e.parquet").exists()


def test_classifiers_whose_encoder_hash_differs_are_refused_by_embed_and_flagged_by_the_app(tmp_path):
    """The manifest's encoder_sha256 against the loaded encoder: one check, used by CLI and app."""
    import shutil

    from segscope.analysis.artefacts import classifier_encoder_mismatch, find_demo_classifiers, find_demo_model
    from segscope.app.service import SessionService
    from segscope.app.session import Session
    from segscope.app.state import ModelSummary

    encoder, shipped = find_demo_model(), find_demo_classifiers()
    assert classifier_encoder_mismatch(read_classifier_folder(shipped), encoder) is None
    other = tmp_path / "other.keras"
    other.write_bytes(encoder.read_bytes() + b"\0")  # another encoder file: another hash
    message = classifier_encoder_mismatch(read_classifier_folder(shipped), other)
    assert message is not None and "other.keras" in message and "20fefd34a930" in message

    controller = SessionService(Session())
    state = controller.state
    try:
        state.set_model(ModelSummary("segscope_lite", str(other), True, 64, (41, 41, 41), (64.0, 64.0, 80.0)))
        from segscope.app.jobs import JobUpdate

        copied = tmp_path / "classifiers"
        shutil.copytree(shipped, copied)
        update = JobUpdate(job=None, event="finished", result=read_classifier_folder(copied))
        controller._on_classifier_update(update)
        assert state.classifiers_message.startswith("WARNING: The classifiers in")
        assert "other.keras" in state.last_error
    finally:
        controller.shutdown()


def test_a_zarr_without_units_needs_a_voxel_size(tmp_path, capsys):
    import tensorstore as ts

    from segscope.app.cli import main

    for name, dtype in (("image", "|u1"), ("segmentation", "<u8")):
        spec = {"shape": [32, 32, 32], "chunks": [32, 32, 32], "dtype": dtype}
        ts.open(
            {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / name)}, "metadata": spec},
            create=True,
        ).result()
    argv = ["embed", "--image", str(tmp_path / "image"), "--segmentation", str(tmp_path / "segmentation")]
    assert main([*argv, "--segments", "all", "--out", str(tmp_path / "e.parquet")]) == 2
    assert "--voxel-size-nm X,Y,Z" in capsys.readouterr().err.strip().splitlines()[-1]
    # With it, the (empty) volume is scanned: the next problem is that it holds no segment.
    assert main([*argv, "--voxel-size-nm", "32,32,40", "--segments", "all", "--out", str(tmp_path / "e.parquet")]) == 2
    assert "no segment with at least 1 voxels" in capsys.readouterr().err.strip().splitlines()[-1]
