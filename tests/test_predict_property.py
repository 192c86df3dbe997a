"""Predicting function from structure: the demo's functional ground truth and the CV scorer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.dataset import open_dataset
from segscope.analysis.predict_property import predict_property, read_property
from segscope.analysis.progress import drive


def _morphology_features(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per segment: log node count, compartment fractions, xy extent (real structure, no embedding)."""
    ids = dataset.segment_ids
    rows = []
    for segment_id in ids.tolist():
        skeleton = dataset.skeleton(segment_id)
        fractions = np.bincount(skeleton.compartment, minlength=len(COMPARTMENTS) + 1)[: len(COMPARTMENTS)]
        extent = np.ptp(skeleton.nodes_nm[:, :2], axis=0) if skeleton.n_nodes else np.zeros(2)
        rows.append([np.log1p(skeleton.n_nodes), *(fractions / max(skeleton.n_nodes, 1)), *extent / 1000])
    return ids, np.asarray(rows)


def test_demo_functional_ground_truth_follows_type(demo96_dir):
    dataset = open_dataset(demo96_dir)
    meta = json.loads((demo96_dir / "dataset.json").read_text())
    assert meta["functional_properties"] == ["preferred_orientation_deg", "response_strength"]
    types = np.asarray(dataset.segments["cell_type"].to_pylist())
    strength = np.asarray(dataset.segments["response_strength"].to_pylist(), dtype=float)
    orientation = np.asarray(dataset.segments["preferred_orientation_deg"].to_pylist(), dtype=float)
    glia = np.isin(types, ["astrocyte", "microglia"])
    assert (strength[glia] == 0).all() and np.isnan(orientation[glia]).all()
    assert ((orientation[~glia] >= 0) & (orientation[~glia] < 180)).all()
    assert strength[types == "inhibitory"].mean() > 1.5 * strength[types == "excitatory"].mean()
    cells = np.asarray(dataset.segments["cell_id"].to_pylist())
    for cell in np.unique(cells):  # one value per cell, shared by its segments
        assert len(np.unique(strength[cells == cell])) == 1


def test_structure_predicts_response_strength_above_shuffled_baseline(demo96_dir):
    dataset = open_dataset(demo96_dir)
    ids, features = _morphology_features(dataset)
    property_ids, values = read_property(demo96_dir / "segments.parquet", "response_strength")
    result = drive(predict_property(ids, features, property_ids, values, column="response_strength", n_shuffles=10))
    assert result.task == "regression" and result.metric == "r2"
    assert result.score > 0.3 and result.score > result.baseline_mean + 5 * result.baseline_std
    assert result.p_value == pytest.approx(1 / 11)


def test_classification_drops_rare_classes_and_beats_baseline(demo96_dir):
    dataset = open_dataset(demo96_dir)
    ids, features = _morphology_features(dataset)
    property_ids, values = read_property(demo96_dir / "segments.parquet", "cell_type")
    result = drive(predict_property(ids, features, property_ids, values, column="cell_type", n_shuffles=3))
    assert result.task == "classification"
    assert result.score > result.baseline_mean + 0.1


def test_bad_inputs_are_named(demo96_dir, tmp_path):
    with pytest.raises(ValueError, match="no column 'speed'"):
        read_property(demo96_dir / "segments.parquet", "speed")
    ids = np.arange(1, 4, dtype=np.uint64)
    with pytest.raises(ValueError, match="only 3 segments"):
        drive(predict_property(ids, np.zeros((3, 2)), ids, np.array([1.0, 2.0, 3.0])))


@pytest.mark.slow
def test_cli_predicts_from_real_embeddings(demo96_dir, tmp_path):
    """segscope embed on the demo, then predict-property on its mean embeddings (about a minute)."""
    embeddings = tmp_path / "emb.parquet"
    subprocess.run(
        [sys.executable, "-m", "segscope.app.cli", "embed", "--image", str(demo96_dir / "image"),
         "--segmentation", str(demo96_dir / "segmentation"), "--segments", "all", "--out", str(embeddings)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    out = tmp_path / "score.json"
    run = subprocess.run(
        [sys.executable, "-m", "segscope.app.cli", "predict-property", "--embeddings", str(embeddings),
         "--table", str(demo96_dir / "segments.parquet"), "--column", "response_strength", "--shuffles", "5",
         "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert "shuffled-label baseline" in run.stdout
    score = json.loads(out.read_text())
    assert score["n_segments"] > 20 and np.isfinite(score["score"]) and 0 < score["p_value"] <= 1


def test_orientation_is_scored_as_an_angle(demo96_dir):
    """Each segment's own xy principal axis predicts its cell's preferred orientation.

    As (cos 2a, sin 2a) features the angle is recoverable; the circular score (mean cosine
    of the error) must beat the shuffled baseline, which sits near 0.
    """
    dataset = open_dataset(demo96_dir)
    ids, rows = dataset.segment_ids, []
    for segment_id in ids.tolist():
        xy = dataset.skeleton(segment_id).nodes_nm[:, :2]
        xy = xy - xy.mean(axis=0)
        if len(xy) >= 2:
            _, _, vt = np.linalg.svd(xy, full_matrices=False)
            angle = np.arctan2(vt[0, 1], vt[0, 0])
        else:
            angle = 0.0
        rows.append([np.cos(2 * angle), np.sin(2 * angle)])
    property_ids, values = read_property(demo96_dir / "segments.parquet", "preferred_orientation_deg")
    result = drive(
        predict_property(ids, np.asarray(rows), property_ids, values, period=180.0, n_shuffles=10, column="ori")
    )
    assert result.task == "circular regression" and result.metric == "mean_cos_error"
    assert abs(result.baseline_mean) < 0.2
    assert result.score > 0.3 and result.score > result.baseline_mean + 5 * result.baseline_std
