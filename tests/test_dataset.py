"""Opening SegScope dataset folders: accessors on a small demo and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.dataset import DatasetError, open_dataset
from segscope.analysis.progress import drive
from segscope.analysis.skeletons import read_precomputed_skeleton
from segscope.analysis.synthetic import CELL_TYPES, generate_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return drive(generate_dataset(tmp_path_factory.mktemp("ds") / "demo", seed=3, size_vox=(96, 80, 72)))


def test_accessors(dataset_dir):
    ds = open_dataset(dataset_dir)
    assert tuple(ds.image.shape) == (96, 80, 72)
    assert ds.image.dtype == np.uint8
    assert ds.segmentation.dtype == np.uint64
    np.testing.assert_array_equal(ds.voxel_size_nm, [32, 32, 40])
    np.testing.assert_array_equal(ds.segmentation.voxel_size_nm, [32, 32, 40])
    assert ds.cell_types == CELL_TYPES
    assert ds.segment_ids.dtype == np.uint64 and len(ds.segment_ids) > 5
    assert ds.nodes.column_names == ["segment_id", "node_id", "x_nm", "y_nm", "z_nm", "compartment"]
    assert ds.edges.column_names == ["segment_id", "node_a", "node_b"]
    # The demo adds its functional ground truth (segscope.analysis.synthetic._circuit) after the five.
    assert ds.segments.column_names[:5] == ["segment_id", "cell_id", "cell_type", "n_voxels", "n_nodes"]


def test_skeleton_matches_tables_and_precomputed(dataset_dir):
    ds = open_dataset(dataset_dir)
    table = ds.segments.to_pydict()
    for row in range(0, len(table["segment_id"]), 3):
        segment_id = table["segment_id"][row]
        skeleton = ds.skeleton(segment_id)
        assert skeleton.segment_id == segment_id
        assert skeleton.n_nodes == table["n_nodes"][row]
        assert ds.cell_type(segment_id) == table["cell_type"][row]
        stored = read_precomputed_skeleton(dataset_dir / "segmentation" / "skeletons", segment_id)
        np.testing.assert_allclose(stored.nodes_nm, skeleton.nodes_nm, atol=1e-3)
        np.testing.assert_array_equal(stored.compartment, skeleton.compartment)
        np.testing.assert_array_equal(stored.edges, skeleton.edges)


def test_unknown_segment_is_a_key_error_naming_it(dataset_dir):
    ds = open_dataset(dataset_dir)
    with pytest.raises(KeyError, match="4242"):
        ds.skeleton(4242)
    with pytest.raises(KeyError, match="4242"):
        ds.cell_type(4242)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nope")


def test_folder_without_dataset_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset\.json"):
        open_dataset(tmp_path)


def _copy_meta(dataset_dir: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(dataset_dir, target)
    meta = json.loads((target / "dataset.json").read_text())
    meta.update(changes)
    (target / "dataset.json").write_text(json.dumps(meta))
    return target


def test_wrong_format(dataset_dir, tmp_path):
    with pytest.raises(DatasetError, match="format"):
        open_dataset(_copy_meta(dataset_dir, tmp_path, format="zarr"))


def test_unsupported_version(dataset_dir, tmp_path):
    with pytest.raises(DatasetError, match="version 99"):
        open_dataset(_copy_meta(dataset_dir, tmp_path, version=99))


def test_invalid_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="JSON"):
        open_dataset(tmp_path)


def test_missing_image_folder(dataset_dir, tmp_path):
    with pytest.raises(DatasetError, match="image"):
        open_dataset(_copy_meta(dataset_dir, tmp_path, image="gone"))


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)
