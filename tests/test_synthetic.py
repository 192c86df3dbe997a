"""The synthetic demo generator: determinism, ground-truth consistency, realism guards."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.dataset import open_dataset
from segscope.analysis.progress import Progress, drive
from segscope.analysis.skeletons import read_precomputed_skeleton
from segscope.analysis.synthetic import CELL_TYPES, GENERATOR_VERSION, generate_dataset, synthesize
from segscope.analysis.synthetic._render import boundary_mask

SMALL = (96, 96, 96)
MID = (128, 128, 128)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return drive(generate_dataset(tmp_path_factory.mktemp("synth") / "a", seed=0, size_vox=SMALL))


@pytest.fixture(scope="module")
def mid_volume():
    return drive(synthesize(seed=0, size_vox=MID))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(small_dataset, tmp_path):
    again = drive(generate_dataset(tmp_path / "b", seed=0, size_vox=SMALL))
    first, second = _files(small_dataset), _files(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_different_seed_gives_different_volume(small_dataset):
    other = drive(synthesize(seed=1, size_vox=SMALL))
    dataset = open_dataset(small_dataset)
    assert not np.array_equal(dataset.image.read_all(), other.image)
    assert set(dataset.segment_ids.tolist()) != set(other.segment_ids.tolist())


def test_every_node_lies_in_its_own_segment(small_dataset):
    dataset = open_dataset(small_dataset)
    seg = dataset.segmentation.read_all()
    nodes = dataset.nodes
    xyz = np.stack([np.asarray(nodes[c]) for c in ("x_nm", "y_nm", "z_nm")], axis=1)
    vox = np.floor(xyz / dataset.voxel_size_nm).astype(np.int64)
    assert np.all(vox >= 0) and np.all(vox < seg.shape)
    under = seg[vox[:, 0], vox[:, 1], vox[:, 2]]
    assert np.array_equal(under, np.asarray(nodes["segment_id"], dtype=np.uint64))
    assert set(np.asarray(nodes["compartment"]).tolist()) <= set(COMPARTMENTS)


def test_segment_table_matches_the_volume(small_dataset):
    dataset = open_dataset(small_dataset)
    seg = dataset.segmentation.read_all()
    ids, counts = np.unique(seg, return_counts=True)
    in_volume = dict(zip(ids.tolist(), counts.tolist()))
    in_volume.pop(0, None)
    table = dataset.segments
    table_ids = np.asarray(table["segment_id"]).tolist()
    assert sorted(table_ids) == sorted(in_volume)
    assert np.asarray(table["n_voxels"]).tolist() == [in_volume[i] for i in table_ids]
    nodes_per = collections.Counter(np.asarray(dataset.nodes["segment_id"]).tolist())
    assert np.asarray(table["n_nodes"]).tolist() == [nodes_per[i] for i in table_ids]
    assert set(np.asarray(table["cell_type"]).tolist()) <= set(CELL_TYPES)
    # Large, non-consecutive uint64 ids exercise 64-bit paths downstream.
    assert max(table_ids) > 2**32
    assert seg.dtype == np.uint64


def test_skeletons_are_connected_trees_matching_precomputed(small_dataset):
    dataset = open_dataset(small_dataset)
    skeleton_dir = small_dataset / "segmentation" / "skeletons"
    for segment_id in dataset.segment_ids[:40]:
        skeleton = dataset.skeleton(int(segment_id))
        n = skeleton.n_nodes
        assert len(skeleton.edges) == n - 1
        reached, frontier = {0}, [0]
        neighbours = collections.defaultdict(list)
        for a, b in skeleton.edges.tolist():
            neighbours[a].append(b)
            neighbours[b].append(a)
        while frontier:
            for m in neighbours[frontier.pop()]:
                if m not in reached:
                    reached.add(m)
                    frontier.append(m)
        assert len(reached) == n
        stored = read_precomputed_skeleton(skeleton_dir, int(segment_id))
        np.testing.assert_allclose(stored.nodes_nm, skeleton.nodes_nm, atol=1e-3)
        np.testing.assert_array_equal(stored.edges, skeleton.edges)
        np.testing.assert_array_equal(stored.compartment, skeleton.compartment)


def test_dataset_metadata_and_neuroglancer_link(small_dataset):
    import json

    meta = json.loads((small_dataset / "dataset.json").read_text())
    assert meta["format"] == "segscope-dataset" and meta["version"] == 1
    assert meta["generator_version"] == GENERATOR_VERSION and meta["seed"] == 0
    assert meta["size_vox"] == list(SMALL) and meta["voxel_size_nm"] == [32.0, 32.0, 40.0]
    assert meta["cell_types"] == list(CELL_TYPES)
    assert meta["compartments"] == list(COMPARTMENTS)
    seg_info = json.loads((small_dataset / "segmentation" / "info").read_text())
    assert seg_info["skeletons"] == "skeletons"
    assert seg_info["scales"][0]["encoding"] == "compressed_segmentation"


def test_all_types_and_compartments_in_a_mid_size_volume(mid_volume):
    types = collections.Counter(mid_volume.cell_types)
    assert set(types) == set(CELL_TYPES)
    compartments = {c for s in mid_volume.skeletons for c in s.compartment_names()}
    assert compartments == set(COMPARTMENTS)


def test_neuropil_is_densely_packed(mid_volume):
    filled = float((mid_volume.segmentation > 0).mean())
    # Like real neuropil: mostly cells, a little extracellular space between them.
    assert 0.8 <= filled < 1.0


def test_no_label_coded_brightness(mid_volume):
    """Cytoplasm brightness must not give the cell type away.

    Compared on plain cytoplasm: membranes are excluded (thin processes are mostly
    membrane, a morphological cue) and so are organelles (vesicle-filled boutons are
    context a model may use, like in real EM).
    """
    seg, image = mid_volume.segmentation, mid_volume.image
    from scipy import ndimage

    cytoplasm = (seg > 0) & ~ndimage.binary_dilation(boundary_mask(seg), iterations=2)
    cytoplasm &= ~ndimage.binary_dilation(mid_volume.organelles > 0)
    ids = np.asarray(mid_volume.segment_ids)
    types = np.asarray(mid_volume.cell_types)
    means = {}
    for name in CELL_TYPES:
        mask = cytoplasm & np.isin(seg, ids[types == name])
        assert mask.sum() > 1000, name
        means[name] = float(image[mask].mean())
    # Each cell has its own small brightness offset (sd 2 grey levels), so a type made of
    # few large cells may sit a few levels off; a type-coded offset would be far larger.
    assert max(means.values()) - min(means.values()) < 6.0, means


def test_image_looks_like_em(mid_volume):
    seg, image = mid_volume.segmentation, mid_volume.image
    membranes = image[boundary_mask(seg)].mean()
    cytoplasm = image[(seg > 0) & ~boundary_mask(seg)].mean()
    extracellular = image[seg == 0].mean()
    assert membranes + 30 < cytoplasm < extracellular
    assert image.std() > 20


def test_progress_is_reported(tmp_path):
    reports: list[Progress] = []
    drive(generate_dataset(tmp_path / "d", seed=3, size_vox=(48, 48, 48)), reports.append)
    assert reports and all(isinstance(r, Progress) for r in reports)
    assert {"painting neurites", "wrote segmentation"} <= {r.message for r in reports}


def test_bad_parameters_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="size_vox"):
        drive(synthesize(size_vox=(8, 8, 8)))
    with pytest.raises(ValueError, match="voxel_size_nm"):
        drive(synthesize(size_vox=SMALL, voxel_size_nm=(32, 0, 40)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("occupied")
    with pytest.raises(FileExistsError, match="full"):
        drive(generate_dataset(tmp_path / "full", size_vox=SMALL))


def test_demo_dataset_is_cached_and_reused(monkeypatch, tmp_path):
    import segscope.analysis.synthetic as synthetic

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(synthetic, "_DEMO_SIZE_VOX", (48, 48, 48))
    first = synthetic.demo_dataset(seed=5)
    assert first == tmp_path / "demo" / f"v{GENERATOR_VERSION}-seed5"
    assert (first / "dataset.json").is_file()
    stamp = (first / "dataset.json").stat().st_mtime_ns
    assert synthetic.demo_dataset(seed=5) == first
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    # No temporary folders left behind.
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [first.name]


@pytest.mark.slow
def test_default_demo_has_hundreds_of_segments_of_four_types():
    volume = drive(synthesize(seed=0))
    types = collections.Counter(volume.cell_types)
    assert set(types) == set(CELL_TYPES)
    assert len(volume.segment_ids) >= 300
    assert types["microglia"] >= 1 and types["astrocyte"] >= 5 and types["inhibitory"] >= 10
    compartments = collections.Counter(c for s in volume.skeletons for c in s.compartment_names())
    assert set(compartments) == set(COMPARTMENTS)
    assert float((volume.segmentation > 0).mean()) >= 0.85
