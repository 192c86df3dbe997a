"""Predictions and precomputed embeddings in the app, headless and without TensorFlow.

The classifier logic of the compute process (:class:`segscope.analysis.classify.segments.SegmentPredictor`)
runs here on stand-in classifiers whose outputs are known; the classifier folder reader,
the CSV ZIP path of the embedding job and the launch checks run on real files. The real
classifiers in the real child process are exercised by ``tests/test_main_window.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.artefacts import read_classifier_folder
from segscope.analysis.classify import Prediction
from segscope.analysis.classify.segments import Predictions, SegmentPredictor
from segscope.analysis.progress import drive
from segscope.app.compute_process import PredictedBatch
from segscope.app.controller import DataSource, PrecomputedEmbeddings, SegmentCentres, SourceError, embed_segment_job


class StandIn:
    """A classifier whose class is the argmax of the first K embedding columns and whose
    uncertainty is column 4 (so tests choose both)."""

    def __init__(self, class_names, threshold: float = 0.5, num_features: int = 6):
        self.class_names = tuple(class_names)
        self.ood_threshold = threshold
        self.num_features = num_features
        self.calls: list[np.ndarray] = []

    def predict(self, embeddings):
        embeddings = np.asarray(embeddings, dtype=np.float64)
        self.calls.append(embeddings)
        k = len(self.class_names)
        scores = np.exp(embeddings[:, :k])
        probabilities = scores / scores.sum(axis=1, keepdims=True)
        uncertainty = embeddings[:, 4]
        return Prediction(
            probabilities,
            np.argmax(probabilities, axis=1),
            embeddings[:, :k].astype(np.float32),
            np.zeros(len(embeddings), np.float32),
            uncertainty,
            uncertainty > self.ood_threshold,
            self.class_names,
        )


def _rows(first: float, second: float, uncertainty: float, count: int = 1) -> np.ndarray:
    row = np.array([first, second, 0.0, 0.0, uncertainty, 0.0], np.float32)
    return np.repeat(row[None], count, axis=0)


def test_node_compartments_predict_only_new_nodes_and_map_to_compartment_codes():
    # Class order differs from analysis.COMPARTMENTS on purpose: codes must follow names.
    compartment = StandIn(("dendrite", "axon"))
    predictor = SegmentPredictor(compartment, None, compartment_radius_nm=0.0)
    predictor.start(np.zeros((4, 3)))
    result = predictor.add([3, 1], np.concatenate([_rows(5.0, 0.0, 0.1), _rows(0.0, 5.0, 0.2)]))
    assert result.cell_type is None and result.note == ""
    calls = result.compartments
    assert calls.indices.tolist() == [3, 1]
    assert calls.codes.tolist() == [1, 0]  # dendrite, axon
    np.testing.assert_allclose(calls.probability, 1 / (1 + np.exp(-5.0)), rtol=1e-6)
    np.testing.assert_allclose(calls.uncertainty, [0.1, 0.2], rtol=1e-6)
    second = predictor.add([0], _rows(5.0, 0.0, 0.3))
    assert second.compartments.indices.tolist() == [0]
    assert [len(c) for c in compartment.calls] == [2, 1]


def test_cell_type_is_the_mean_over_aggregated_nodes_and_flags_high_mean_uncertainty():
    cell_type = StandIn(("pyramidal", "basket"), threshold=0.5)
    predictor = SegmentPredictor(None, cell_type, cell_type_radius_nm=10_000.0)
    # Two nodes far apart (no shared neighbourhood) and one 100 nm from the first.
    positions = np.array([[0.0, 0.0, 0.0], [50_000.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    predictor.start(positions)
    first = predictor.add([0], _rows(3.0, 0.0, 0.2)).cell_type
    assert first.name == "pyramidal" and first.n_nodes == 1 and not first.ood_flagged
    assert first.ood_score == pytest.approx(0.2) and first.threshold == 0.5
    result = predictor.add([1, 2], np.concatenate([_rows(0.0, 3.0, 0.9), _rows(0.0, 3.0, 0.9)])).cell_type
    # Aggregated at 10 um: nodes 0 and 2 average to (1.5, 1.5, u 0.55); node 1 stays itself.
    features = cell_type.calls[-1]
    np.testing.assert_allclose(features[[0, 2], 4], 0.55, rtol=1e-6)
    np.testing.assert_allclose(features[1, 4], 0.9, rtol=1e-6)
    assert result.n_nodes == 3
    assert result.name == "basket"
    assert result.probability == pytest.approx(np.mean([0.5, 1 / (1 + np.exp(-3.0)), 0.5]))
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.ood_score == pytest.approx((0.55 + 0.9 + 0.55) / 3)
    assert result.ood_flagged


def test_mismatched_widths_give_a_note_instead_of_a_crash():
    predictor = SegmentPredictor(StandIn(("axon", "soma"), num_features=6), StandIn(("a", "b"), num_features=6))
    predictor.start(np.zeros((2, 3)))
    result = predictor.add([0, 1], np.zeros((2, 8), np.float32))
    assert result.compartments is None and result.cell_type is None
    assert "takes 6-d embeddings, these are 8-d" in result.note


def test_compartment_classifier_with_unknown_classes_is_refused():
    with pytest.raises(ValueError, match="not subcompartments"):
        SegmentPredictor(StandIn(("axon", "spine")), None)


# -- the classifier folder ---------------------------------------------------------------------


def _fake_classifier_file(path: Path, class_names, *, threshold: float = 0.3, num_features: int = 64) -> None:
    """A file with the metadata a saved classifier carries (read without Keras)."""
    metadata = {
        "format": "segscope-classifier",
        "format_version": 1,
        "config": {"name": "linear_v1"},
        "class_names": list(class_names),
        "num_features": num_features,
        "ood_threshold": threshold,
        "mean_field_lambda": 0.3,
        "weight_paths": [],
    }
    with open(path, "wb") as handle:
        np.savez(handle, metadata_json=np.array(json.dumps(metadata)))


def test_classifier_folder_is_read_from_its_manifest(tmp_path):
    _fake_classifier_file(tmp_path / "comp.npz", ("axon", "dendrite", "soma", "glia"), threshold=0.6)
    _fake_classifier_file(tmp_path / "types.npz", ("pyramidal", "basket"), threshold=0.25)
    (tmp_path / "classifiers.json").write_text(
        json.dumps(
            {
                "compartment": {"file": "comp.npz", "radius_nm": 0},
                "cell_type": {"file": "types.npz", "radius_nm": 10000, "classes": ["ignored"]},
            }
        )
    )
    summary = read_classifier_folder(tmp_path)
    assert summary.compartment.class_names == ("axon", "dendrite", "soma", "glia")
    assert summary.compartment.radius_nm == 0.0 and summary.compartment.ood_threshold == 0.6
    assert summary.cell_type.class_names == ("pyramidal", "basket")
    assert summary.cell_type.radius_nm == 10_000.0 and summary.cell_type.num_features == 64
    assert summary.cell_type.path == str(tmp_path / "types.npz")


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (None, "has no classifiers.json"),
        ("not json", "not readable JSON"),
        ({"other": {}}, "names none of the tasks"),
        ({"cell_type": {"file": "types.npz"}}, "needs 'file' and 'radius_nm'"),
        ({"cell_type": {"file": "missing.npz", "radius_nm": 0}}, "no classifier file"),
        ({"cell_type": {"file": "types.npz", "radius_nm": -1}}, "radius_nm must be >= 0"),
        ({"compartment": {"file": "types.npz", "radius_nm": 0}}, "not subcompartments"),
    ],
)
def test_bad_classifier_folders_are_named(tmp_path, manifest, problem):
    _fake_classifier_file(tmp_path / "types.npz", ("pyramidal", "basket"))
    if manifest is not None:
        (tmp_path / "classifiers.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    with pytest.raises((ValueError, FileNotFoundError), match=problem):
        read_classifier_folder(tmp_path)


# -- precomputed embeddings --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.synthetic import generate_dataset

    folder = drive(generate_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=3, size_vox=(96, 80, 72)))
    dataset = open_dataset(folder)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    order = np.argsort(-n_nodes, kind="stable")
    ids = [int(dataset.segment_ids[i]) for i in order[:2]]
    return folder, ids, {i: dataset.skeleton(i) for i in ids}


class FakeEngine:
    """Stands in for the compute process: records calls, predicts a fixed cell type."""

    loaded = True
    classifiers_loaded = True

    def __init__(self):
        self.predicted: list[tuple[np.ndarray, np.ndarray]] = []
        self.embedded: list[int] = []

    def predict(self, positions_nm, embeddings):
        self.predicted.append((positions_nm, embeddings))
        return Predictions(None, None, "fake")

    def embed(
        self, image_url, segmentation_url, segment_id, centres_nm, *, cancel=None, first_batch=2, batch_size=None
    ):
        self.embedded.append(segment_id)
        yield from ()
        return 0


def test_store_segments_are_read_in_nm_or_voxels_nearest_the_click_first(demo, tmp_path):
    from segscope.analysis.csvzip import CsvZipStore

    folder, (in_store, not_in_store), skeletons = demo
    source = DataSource.open_dataset_folder(folder)
    voxel = np.asarray(source.segmentation.voxel_size_nm)
    skeleton = skeletons[in_store]
    node_ids = np.arange(skeleton.n_nodes)
    embeddings = np.random.default_rng(0).normal(size=(skeleton.n_nodes, 8)).astype(np.float32)
    CsvZipStore(tmp_path / "nm", coordinates="nm").write_many({in_store: (node_ids, skeleton.nodes_nm, embeddings)})
    CsvZipStore(tmp_path / "vox", coordinates="voxels").write_many(
        {in_store: (node_ids, skeleton.nodes_nm / voxel, embeddings)}
    )
    click = skeleton.nodes_nm[-1]
    for name in ("nm", "vox"):
        store = PrecomputedEmbeddings.open(tmp_path / name, coordinates="nm" if name == "nm" else "voxels")
        engine = FakeEngine()
        reports = []
        count = drive(embed_segment_job(source, engine, in_store, click, precomputed=store), reports.append)
        centres, batch = (r.payload for r in reports)
        assert count == skeleton.n_nodes and engine.embedded == []
        assert isinstance(centres, SegmentCentres) and centres.embedding_source == "precomputed"
        np.testing.assert_allclose(centres.positions_nm[0], click, atol=1e-3)
        np.testing.assert_allclose(np.sort(centres.positions_nm, axis=0), np.sort(skeleton.nodes_nm, axis=0), atol=1e-3)
        # Node ids are the skeleton's: the dataset's own labels come along.
        np.testing.assert_array_equal(centres.ground_truth, skeleton.compartment[centres.node_ids])
        assert isinstance(batch, PredictedBatch) and batch.predictions.note == "fake"
        np.testing.assert_array_equal(batch.embeddings, embeddings[centres.node_ids])
        np.testing.assert_allclose(engine.predicted[0][0], centres.positions_nm)
    # A segment the store lacks is computed, and the first report says why.
    reports = []
    engine = FakeEngine()
    drive(embed_segment_job(source, engine, not_in_store, None, precomputed=store), reports.append)
    assert reports[0].payload.embedding_source == "computed" and "computing" in reports[0].payload.note
    assert engine.embedded == [not_in_store] and engine.predicted == []


def test_precomputed_store_must_exist(tmp_path):
    with pytest.raises(SourceError, match="no folder"):
        PrecomputedEmbeddings.open(tmp_path / "missing")
    with pytest.raises(SourceError, match="holds no CSV ZIP shards"):
        PrecomputedEmbeddings.open(tmp_path)


def test_launch_plan_accepts_classifiers_and_embeddings(demo, tmp_path):
    from segscope.analysis.csvzip import CsvZipStore
    from segscope.app.main import LaunchError, add_open_arguments, plan_launch

    folder, (segment_id, _), _skeletons = demo
    meta = json.loads((folder / "dataset.json").read_text())
    _fake_classifier_file(tmp_path / "types.npz", ("pyramidal", "basket"))
    (tmp_path / "classifiers.json").write_text(json.dumps({"cell_type": {"file": "types.npz", "radius_nm": 10000}}))
    CsvZipStore(tmp_path / "store").write_many({segment_id: ([0], [[1, 2, 3]], np.zeros((1, 4)))})
    parser = add_open_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--image",
            str(folder / meta["image"]),
            "--segmentation",
            str(folder / meta["segmentation"]),
            "--classifiers",
            str(tmp_path),
            "--embeddings",
            str(tmp_path / "store"),
            "--embeddings-coordinates",
            "voxels",
        ]
    )
    plan = plan_launch(args)
    assert plan.classifiers.cell_type.class_names == ("pyramidal", "basket")
    assert plan.classifiers.compartment is None
    assert plan.precomputed.store.coordinates == "voxels"
    bad = parser.parse_args(
        [
            "--image",
            str(folder / meta["image"]),
            "--segmentation",
            str(folder / meta["segmentation"]),
            "--classifiers",
            str(tmp_path / "store"),
        ]
    )
    with pytest.raises(LaunchError, match=r"--classifiers: .*has no classifiers\.json"):
        plan_launch(bad)


def test_a_failing_classifier_becomes_a_note_not_a_lost_batch():
    from segscope.analysis.classify.segments import predict_safely

    class Broken(StandIn):
        def predict(self, embeddings):
            raise FloatingPointError("NaN logits")

    predictor = SegmentPredictor(None, Broken(("a", "b")))
    predictor.start(np.zeros((1, 3)))
    result = predict_safely(predictor, [0], np.zeros((1, 6), np.float32))
    assert result.compartments is None and result.cell_type is None
    assert result.note == "prediction failed: FloatingPointError: NaN logits"


def test_cell_type_is_estimated_in_geometric_steps_and_on_the_last_batch():
    cell_type = StandIn(("pyramidal", "basket"))
    predictor = SegmentPredictor(None, cell_type, cell_type_radius_nm=0.0)
    predictor.start(np.zeros((20, 3)))
    estimated = []
    for start in range(0, 20, 2):
        result = predictor.add(np.arange(start, start + 2), _rows(1.0, 0.0, 0.1, count=2))
        if result.cell_type is not None:
            estimated.append(result.cell_type.n_nodes)
    # First batch, then each time the nodes grew by a quarter, and the last batch.
    assert estimated == [2, 4, 6, 8, 10, 14, 18, 20]


def test_classifiers_trained_on_another_encoder_are_pointed_out(tmp_path):
    from segscope.app.service import SessionService
    from segscope.app.session import Session
    from segscope.app.state import ModelSummary

    _fake_classifier_file(tmp_path / "types.npz", ("pyramidal", "basket"))
    (tmp_path / "classifiers.json").write_text(
        json.dumps({"cell_type": {"file": "types.npz", "radius_nm": 10000, "encoder": "demo_encoder.keras"}})
    )
    summary = read_classifier_folder(tmp_path)
    assert summary.encoder == "demo_encoder.keras"
    controller = SessionService(Session())
    state = controller.state
    try:
        state.set_classifiers(summary)
        state.set_model(
            ModelSummary("segscope_lite", "/models/demo_encoder.keras", True, 64, (41, 41, 41), (64.0, 64.0, 80.0))
        )
        assert controller._encoder_mismatch() == ""
        state.set_model(ModelSummary("segclr", "/models/model.ckpt-1", True, 64, (129, 129, 129), (32.0, 32.0, 33.0)))
        assert "trained on embeddings of demo_encoder.keras, not of model.ckpt-1" in controller._encoder_mismatch()
    finally:
        controller.shutdown()


def test_aggregated_compartments_update_exactly_the_nodes_whose_neighbourhood_changed():
    from segscope.analysis.aggregate import aggregate_embeddings

    rng = np.random.default_rng(4)
    positions = np.cumsum(rng.normal(0.0, 800.0, (40, 3)), axis=0)
    embeddings = rng.normal(size=(40, 6)).astype(np.float32)
    compartment = StandIn(("axon", "dendrite"))
    predictor = SegmentPredictor(compartment, None, compartment_radius_nm=2500.0)
    predictor.start(positions)
    latest = np.full((40, 6), np.nan, np.float32)
    order = rng.permutation(40)
    for start in range(0, 40, 7):
        batch = order[start : start + 7]
        calls = predictor.add(batch, embeddings[batch]).compartments
        latest[calls.indices] = compartment.calls[-1]
        done = np.sort(order[: start + 7])
        full = aggregate_embeddings(positions[done], embeddings[done], 2500.0)
        # Every node's latest aggregate equals the one over all nodes so far.
        np.testing.assert_allclose(latest[done], full, rtol=1e-5, atol=1e-6)
        assert set(batch) <= set(calls.indices) and len(calls.indices) <= len(done)
