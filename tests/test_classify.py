"""SNGP classifiers: layers, training, uncertainty, save/load, metrics (segscope.analysis.classify).

Networks here are tiny (H = 16, M = 64) so the whole module runs in well under a minute;
one trained classifier is shared by the tests that only read it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.classify import (
    BERT_SMALL_SNGP_V1,
    BERT_SNGP_V1,
    CLASSIFIER_CONFIGS,
    LINEAR_V1,
    MEAN_FIELD_LAMBDA,
    WRN_SNGP_V1,
    ClassifierConfig,
    ClassifierFileError,
    accuracy,
    auroc,
    class_balanced_weights,
    class_guaranteed_subsample,
    confusion_matrix,
    dempster_shafer,
    get_classifier_config,
    load_classifier,
    macro_f1,
    mean_field_logits,
    per_class_f1,
    posterior_covariance,
    read_classifier_metadata,
    stratified_split,
    train_classifier,
)
from segscope.analysis.progress import Progress, drive

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_FEATURES = 8
CLASS_NAMES = ("axon", "dendrite", "soma")
TINY_SNGP = BERT_SMALL_SNGP_V1.with_updates(name="tiny_sngp", num_hidden=16, num_inducing=64, batch_size=64)


def toy_embeddings(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian clusters in 8-d: centres 4 units apart on the axes."""
    labels = rng.integers(0, len(CLASS_NAMES), count)
    centres = 4.0 * np.eye(NUM_FEATURES)[: len(CLASS_NAMES)]
    points = centres[labels] + rng.normal(0.0, 0.7, (count, NUM_FEATURES))
    return points.astype(np.float32), labels


def far_embeddings(count: int, distance: float, rng: np.random.Generator) -> np.ndarray:
    """Points ``distance`` from the origin in random directions: away from every cluster."""
    directions = rng.normal(size=(count, NUM_FEATURES))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return (distance * directions).astype(np.float32)


@pytest.fixture(scope="module")
def toy_data():
    rng = np.random.default_rng(11)
    train = toy_embeddings(600, rng)
    test = toy_embeddings(300, rng)
    return train, test


@pytest.fixture(scope="module")
def trained(toy_data):
    """A tiny SNGP fitted on the toy clusters, and the progress reports it yielded."""
    (train_x, train_y), _ = toy_data
    reports = []
    classifier = drive(
        train_classifier(
            train_x,
            train_y,
            class_names=CLASS_NAMES,
            config=TINY_SNGP,
            max_epochs=40,
            patience=5,
            learning_rate=1e-2,
            seed=3,
        ),
        reports.append,
    )
    return classifier, reports


# --- training and prediction ---------------------------------------------------------------


def test_a_few_separable_labels_stop_early_on_the_absolute_floor():
    """A user's label set: 100 examples of two well-separated kinds. The validation loss
    keeps falling by a few % per epoch, so only the absolute floor stops it before the cap."""
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (76, 16)), rng.normal(3, 1, (24, 16))].astype(np.float32)
    y = np.array(["glia"] * 76 + ["neuron"] * 24)
    runs = {
        delta: drive(train_classifier(x, y, config="BERT_SMALL_SNGP_v1", max_epochs=120, min_delta=delta, seed=0))
        for delta in (0.0, 0.01)
    }
    assert not runs[0.0].training_info["stopped_early"]  # the relative rule alone: the cap
    info = runs[0.01].training_info
    assert info["stopped_early"] and info["epochs_run"] < 100 and info["min_delta"] == 0.01
    assert (runs[0.01].predict(x).label_names == y).all()  # nothing lost by stopping
    with pytest.raises(ValueError, match="min_delta"):
        drive(train_classifier(x, y, min_delta=-1.0))


def test_learns_a_separable_problem(trained, toy_data):
    classifier, reports = trained
    _, (test_x, test_y) = toy_data
    prediction = classifier.predict(test_x)
    assert accuracy(test_y, prediction.labels) > 0.95
    assert prediction.probabilities.shape == (300, 3)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert list(prediction.label_names[:5]) == [CLASS_NAMES[c] for c in prediction.labels[:5]]
    # One report per epoch, counting up, with the losses in the payload.
    assert all(isinstance(r, Progress) and r.unit == "epochs" for r in reports)
    assert [r.done for r in reports] == list(range(1, len(reports) + 1))
    assert reports[-1].payload["val_loss"] < reports[0].payload["val_loss"]
    info = classifier.training_info
    assert info["epochs_run"] == len(reports)
    assert info["best_val_loss"] == min(info["history"]["val_loss"])


def test_variance_and_uncertainty_grow_away_from_training_data(trained, toy_data):
    classifier, _ = trained
    (train_x, _), _ = toy_data
    rng = np.random.default_rng(5)
    near = classifier.predict(train_x)
    far = classifier.predict(far_embeddings(300, 12.0, rng))
    # The typical far point is more uncertain than nearly every training point.
    assert np.median(far.variance) > np.quantile(near.variance, 0.95)
    assert np.median(far.uncertainty) > np.quantile(near.uncertainty, 0.95)
    # A class never seen in training (a cluster on a fourth axis) is what OOD flags are
    # for: it separates from the training data and the default threshold flags most of it
    # and few training points.
    unseen = classifier.predict(
        (4.0 * np.eye(NUM_FEATURES)[3] + rng.normal(0.0, 0.7, (300, NUM_FEATURES))).astype(np.float32)
    )
    assert np.median(unseen.variance) > np.quantile(near.variance, 0.95)
    assert (
        auroc(np.concatenate([unseen.uncertainty, near.uncertainty]), np.r_[np.ones(300, bool), np.zeros(600, bool)])
        > 0.95
    )
    assert unseen.ood.mean() > 0.8
    assert near.ood.mean() < 0.1


def test_variance_is_the_ridge_scaled_gp_posterior(trained, toy_data):
    classifier, _ = trained
    _, (test_x, _) = toy_data
    gp = classifier.model.gp_layer
    logits, features = classifier.model.inference_outputs(test_x[:50])
    features = np.asarray(features, dtype=np.float64)
    precision = gp.precision.numpy().astype(np.float64)
    ridge = TINY_SNGP.gp_cov_ridge_penalty
    expected = ridge * np.einsum("nm,mk,nk->n", features, np.linalg.inv(ridge * np.eye(64) + precision), features)
    prediction = classifier.predict(test_x[:50])
    np.testing.assert_allclose(prediction.variance, expected, rtol=2e-3, atol=1e-6)
    np.testing.assert_array_equal(prediction.logits, np.asarray(logits))
    adjusted = prediction.logits / np.sqrt(1 + MEAN_FIELD_LAMBDA * expected)[:, None]
    np.testing.assert_allclose(prediction.uncertainty, 3 / (3 + np.exp(adjusted).sum(axis=1)), rtol=1e-4)


def test_ood_threshold_is_configurable(trained, toy_data):
    classifier, _ = trained
    _, (test_x, _) = toy_data
    original = classifier.ood_threshold
    assert classifier.ood_score_kind == "mahalanobis"
    try:
        prediction = classifier.predict(test_x)
        np.testing.assert_array_equal(prediction.ood, prediction.ood_score > original)
        classifier.ood_threshold = 0.0
        assert classifier.predict(test_x).ood.all()
        classifier.ood_threshold = 1e6
        assert not classifier.predict(test_x).ood.any()
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="threshold"):
                classifier.ood_threshold = bad
    finally:
        classifier.ood_threshold = original


def test_mahalanobis_ood_score_is_the_distance_to_the_nearest_class(trained, toy_data):
    classifier, _ = trained
    _, (test_x, _) = toy_data
    density = classifier.density
    z = (test_x - classifier.standardization_mean) / classifier.standardization_std
    brute = np.sqrt(np.min([np.einsum("nd,de,ne->n", z - m, density.precision, z - m) for m in density.means], axis=0))
    prediction = classifier.predict(test_x)
    np.testing.assert_allclose(prediction.ood_score, brute, rtol=1e-6)
    # Three classes, one mean each, fitted to the standardised training part only.
    assert density.means.shape == (3, NUM_FEATURES)
    # The threshold is the 95th percentile of the validation part's distances, so most
    # held-out in-distribution points stay under it.
    assert 0.8 < (prediction.ood_score <= classifier.ood_threshold).mean() <= 1.0


def test_dempster_shafer_ood_score_stays_available(toy_data):
    (train_x, train_y), (test_x, _) = toy_data
    classifier = drive(
        train_classifier(
            train_x, train_y, config=TINY_SNGP, max_epochs=5, learning_rate=1e-2, seed=3, ood_score="dempster_shafer"
        )
    )
    assert classifier.density is None and classifier.ood_score_kind == "dempster_shafer"
    prediction = classifier.predict(test_x)
    np.testing.assert_array_equal(prediction.ood_score, prediction.uncertainty)
    np.testing.assert_array_equal(prediction.ood, prediction.uncertainty > classifier.ood_threshold)
    with pytest.raises(ValueError, match="threshold"):
        classifier.ood_threshold = 1.5
    with pytest.raises(ValueError, match="ood_score must be one of"):
        drive(train_classifier(train_x, train_y, config=TINY_SNGP, ood_score="entropy"))


def test_predict_changes_no_weight(trained, toy_data):
    classifier, _ = trained
    _, (test_x, _) = toy_data
    before = [w.copy() for w in classifier.model.get_weights()]
    first = classifier.predict(test_x)
    classifier.predict(far_embeddings(100, 20.0, np.random.default_rng(0)))
    second = classifier.predict(test_x)
    for old, new in zip(before, classifier.model.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(first.variance, second.variance)
    np.testing.assert_array_equal(first.logits, second.logits)


def test_standardisation_statistics_come_from_training_data(trained, toy_data):
    classifier, _ = trained
    (train_x, _), _ = toy_data
    info = classifier.training_info
    assert info["num_train"] + info["num_validation"] == len(train_x)
    # The stratified 10 % split keeps 540 training points; their mean is near the full mean.
    np.testing.assert_allclose(classifier.standardization_mean, train_x.mean(axis=0), atol=0.1)
    np.testing.assert_allclose(classifier.standardization_std, train_x.std(axis=0), rtol=0.1)


def test_linear_config_trains_without_gp(toy_data, tmp_path):
    (train_x, train_y), (test_x, test_y) = toy_data
    names = np.asarray(CLASS_NAMES)[train_y]  # labels given as names this time
    classifier = drive(
        train_classifier(
            train_x, names, config="linear_v1", max_epochs=30, learning_rate=3e-2, validation_split=0.0, seed=1
        )
    )
    assert classifier.class_names == tuple(sorted(CLASS_NAMES))
    assert classifier.model.gp_layer is None and not classifier.model.spectral_layers
    assert classifier.training_info["validation_is_training_data"]
    prediction = classifier.predict(test_x)
    assert np.mean(prediction.label_names == np.asarray(CLASS_NAMES)[test_y]) > 0.95
    np.testing.assert_array_equal(prediction.variance, 0.0)
    reloaded = load_classifier(classifier.save(tmp_path / "linear.npz")).predict(test_x)
    np.testing.assert_array_equal(reloaded.logits, prediction.logits)


def test_class_balanced_weights_counter_imbalance():
    codes = np.array([0, 0, 0, 1])
    weights = class_balanced_weights(codes, 2)
    # 1/count is 1/3, 1/3, 1/3, 1 with mean 1/2; scaled to mean 1:
    np.testing.assert_allclose(weights, [2 / 3, 2 / 3, 2 / 3, 2.0], rtol=1e-6)
    assert weights[codes == 0].sum() == pytest.approx(weights[codes == 1].sum())


def test_stratified_split_holds_out_each_class():
    codes = np.repeat([0, 1, 2], [50, 10, 1])
    train, validation = stratified_split(codes, 0.2, np.random.default_rng(0))
    assert np.bincount(codes[validation], minlength=3).tolist() == [10, 2, 0]
    assert sorted(np.r_[train, validation].tolist()) == list(range(61))
    assert 2 in codes[train]


# --- layers --------------------------------------------------------------------------------


def _spectral_norm(matrix) -> float:
    return float(np.linalg.norm(np.asarray(matrix, dtype=np.float64), 2))


def test_spectral_normalisation_bounds_a_large_kernel():
    import keras

    from segscope.analysis.classify.layers import SpectralNormDense

    keras.utils.set_random_seed(0)
    inputs = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    layer = SpectralNormDense(16, 0.95, name="sn")
    layer(inputs)
    layer.kernel.assign(layer.kernel.numpy() * 20.0)
    raw = layer.kernel.numpy()
    assert _spectral_norm(raw) > 10.0
    for _ in range(50):  # one power iteration per training-mode call
        layer(inputs, training=True)
    np.testing.assert_array_equal(layer.kernel.numpy(), raw)  # the stored kernel stays raw
    assert _spectral_norm(layer.normalized_kernel()) == pytest.approx(0.95, abs=1e-3)
    outputs = np.asarray(layer(inputs, training=False))
    np.testing.assert_allclose(
        outputs, inputs @ np.asarray(layer.normalized_kernel()) + layer.bias.numpy(), rtol=1e-5, atol=1e-6
    )


def test_spectral_normalisation_leaves_a_small_kernel_alone():
    import keras

    from segscope.analysis.classify.layers import SpectralNormDense

    keras.utils.set_random_seed(1)
    inputs = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    layer = SpectralNormDense(16, 0.95, name="sn_small")
    layer(inputs)
    layer.kernel.assign(layer.kernel.numpy() * 0.1)
    assert _spectral_norm(layer.kernel.numpy()) < 0.5
    for _ in range(5):
        layer(inputs, training=True)
    np.testing.assert_array_equal(np.asarray(layer.normalized_kernel()), layer.kernel.numpy())


def test_spectral_normalisation_holds_during_gradient_training():
    import keras

    from segscope.analysis.classify.layers import SpectralNormDense

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(512, 8)).astype(np.float32)
    # The target needs a gain of about 5 per direction, so the raw kernel must outgrow the
    # bound of 0.5 and only the normalisation keeps the applied kernel in check.
    targets = (inputs @ rng.normal(size=(8, 8)) * 5).astype(np.float32)
    layer = SpectralNormDense(8, 0.5, name="sn_trained")
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    for _ in range(10):
        for start in range(0, 512, 32):
            model.train_on_batch(inputs[start : start + 32], targets[start : start + 32])
    assert _spectral_norm(layer.kernel.numpy()) > 1.0
    # One power iteration per step lags a kernel that keeps moving; a few % is the
    # known slack of SNGP's single-iteration estimate.
    assert _spectral_norm(layer.normalized_kernel()) < 0.5 * 1.05


def test_trained_network_respects_its_bound(trained):
    classifier, _ = trained
    layers = classifier.model.spectral_layers
    assert len(layers) == 2 * TINY_SNGP.num_layers
    for layer in layers:
        assert _spectral_norm(layer.normalized_kernel()) < TINY_SNGP.spec_norm_bound * 1.05


@pytest.mark.parametrize("momentum", [0.9, -1.0])
def test_precision_update_rule(momentum):
    import keras

    from segscope.analysis.classify.layers import RandomFeatureGP

    keras.utils.set_random_seed(0)
    hidden = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    layer = RandomFeatureGP(3, 64, momentum=momentum, ridge=1e-3, seed=0, name="gp")
    layer(hidden)  # build; inference mode leaves P at zero
    np.testing.assert_array_equal(layer.precision.numpy(), 0.0)
    features = np.asarray(layer.random_features(hidden), dtype=np.float64)
    assert features.shape == (32, 64)
    np.testing.assert_allclose(np.abs(features).max(), math.sqrt(2 / 64), rtol=0.05)
    layer(hidden, training=True)
    layer(hidden, training=True)
    gram = features.T @ features
    if momentum == -1:
        expected = 2 * gram
    else:
        expected = (1 - momentum) * gram / 32
        expected = momentum * expected + (1 - momentum) * gram / 32
    np.testing.assert_allclose(layer.precision.numpy(), expected, rtol=1e-4, atol=1e-6)
    layer.reset_precision()
    np.testing.assert_array_equal(layer.precision.numpy(), 0.0)


def test_random_features_follow_the_formula():
    """phi = sqrt(2/M) cos(LayerNorm(h) W / (r sqrt(H)) + b), checked against numpy."""
    import keras

    from segscope.analysis.classify.layers import RandomFeatureGP

    keras.utils.set_random_seed(0)
    hidden = np.random.default_rng(3).normal(2.0, 3.0, size=(10, 16)).astype(np.float32)
    layer = RandomFeatureGP(3, 48, relative_lengthscale=0.25, seed=4, name="gp_formula")
    layer(hidden)
    assert layer.lengthscale == pytest.approx(0.25 * 4.0)
    centred = hidden - hidden.mean(axis=1, keepdims=True)
    normalized = centred / np.sqrt(centred.var(axis=1, keepdims=True) + 1e-3)  # Keras' eps
    expected = np.sqrt(2 / 48) * np.cos(normalized @ layer.random_kernel.numpy() / 1.0 + layer.random_bias.numpy())
    np.testing.assert_allclose(np.asarray(layer.random_features(hidden)), expected, rtol=1e-4, atol=1e-5)


def test_random_features_are_frozen_and_orthogonal():
    from segscope.analysis.classify.layers import orthogonal_random_features

    frequencies = orthogonal_random_features(16, 40, np.random.default_rng(0))
    assert frequencies.shape == (16, 40)
    block = frequencies[:, :16]
    directions = block / np.linalg.norm(block, axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(16), atol=1e-5)
    classifier_weights = {"random_kernel", "random_bias", "precision"}
    import keras

    from segscope.analysis.classify.layers import RandomFeatureGP

    keras.utils.set_random_seed(0)
    layer = RandomFeatureGP(2, 40, seed=0, name="gp_frozen")
    layer(np.zeros((1, 16), np.float32))
    frozen = {w.name for w in layer.non_trainable_weights}
    assert classifier_weights <= frozen
    assert {w.name for w in layer.trainable_weights} == {"output_kernel", "gamma", "beta"}
    bias = layer.random_bias.numpy()
    assert bias.min() >= 0 and bias.max() <= 2 * math.pi


def test_precision_is_reset_every_epoch_and_training_is_seeded(toy_data):
    """With an exact sum (momentum -1), P after an epoch holds that epoch alone.

    Every example adds |phi|^2 (about 1) to trace(P), so one epoch gives about the number
    of training examples; without the reset three epochs would give three times that.
    Training twice with one seed gives the same classifier bit for bit.
    """
    (train_x, train_y), (test_x, _) = toy_data
    config = TINY_SNGP.with_updates(name="tiny_exact", gp_cov_momentum=-1.0)
    runs = [
        drive(train_classifier(train_x, train_y, config=config, max_epochs=3, patience=10, seed=0)) for _ in range(2)
    ]
    # The kept weights (and P) are from the last epoch, after two resets.
    assert runs[0].training_info["best_epoch"] == 2
    trace = float(np.trace(runs[0].model.gp_layer.precision.numpy()))
    num_train = runs[0].training_info["num_train"]
    assert 0.8 * num_train < trace < 1.2 * num_train
    first, second = (run.predict(test_x) for run in runs)
    np.testing.assert_array_equal(first.logits, second.logits)
    np.testing.assert_array_equal(first.variance, second.variance)


# --- save / load ---------------------------------------------------------------------------


def test_save_load_reproduces_predictions_exactly(trained, toy_data, tmp_path):
    classifier, _ = trained
    _, (test_x, _) = toy_data
    probe = np.concatenate([test_x, far_embeddings(50, 12.0, np.random.default_rng(1))])
    path = classifier.save(tmp_path / "sub" / "toy.npz")
    loaded = load_classifier(path)
    before, after = classifier.predict(probe), loaded.predict(probe)
    for name in ("probabilities", "labels", "logits", "variance", "uncertainty", "ood", "ood_score"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name), err_msg=name)
    assert loaded.ood_score_kind == "mahalanobis"
    assert loaded.class_names == CLASS_NAMES
    assert loaded.ood_threshold == classifier.ood_threshold
    assert loaded.config == TINY_SNGP
    np.testing.assert_array_equal(loaded.standardization_mean, classifier.standardization_mean)
    np.testing.assert_array_equal(loaded.standardization_std, classifier.standardization_std)
    assert loaded.training_info["history"] == classifier.training_info["history"]
    metadata = read_classifier_metadata(path)
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert metadata["config"]["name"] == "tiny_sngp"
    # No pickled objects anywhere: numpy refuses pickles with allow_pickle=False.
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[key].dtype != object for key in archive.files)


def test_load_errors(tmp_path, trained):
    classifier, _ = trained
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(ClassifierFileError):
        load_classifier(garbage)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ClassifierFileError, match="not a SegScope classifier"):
        load_classifier(foreign)
    good = classifier.save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ClassifierFileError):
        load_classifier(truncated)
    # A file from a future format version is refused with a message saying so.
    newer = tmp_path / "newer.npz"
    with np.load(good) as archive:
        arrays = {key: archive[key] for key in archive.files}
    metadata = json.loads(str(arrays["metadata_json"]))
    metadata["format_version"] = 99
    arrays["metadata_json"] = np.array(json.dumps(metadata))
    np.savez(newer, **arrays)
    with pytest.raises(ClassifierFileError, match="version"):
        load_classifier(newer)
    # Weights that do not fit the recorded config.
    mismatched = tmp_path / "mismatched.npz"
    metadata["format_version"] = 1
    metadata["config"]["num_inducing"] = 32
    arrays["metadata_json"] = np.array(json.dumps(metadata))
    np.savez(mismatched, **arrays)
    with pytest.raises(ClassifierFileError, match="shape"):
        load_classifier(mismatched)
    with pytest.raises(ValueError, match=r"\.npz"):
        classifier.save(tmp_path / "wrong.keras")
    assert zipfile.is_zipfile(good)


def test_density_term_on_load(tmp_path, trained, toy_data):
    """A version-1 file (no density) scores OOD by uncertainty; a damaged density is named."""
    classifier, _ = trained
    _, (test_x, _) = toy_data
    good = classifier.save(tmp_path / "good.npz")
    with np.load(good) as archive:
        arrays = {key: archive[key] for key in archive.files}
    metadata = json.loads(str(arrays["metadata_json"]))

    def write(name, meta, **changes):
        out = {k: v for k, v in arrays.items() if k not in changes}
        out.update({k: v for k, v in changes.items() if v is not None})
        out["metadata_json"] = np.array(json.dumps(meta))
        np.savez(tmp_path / name, **out)
        return tmp_path / name

    old = dict(metadata, format_version=1, ood_threshold=0.4)
    del old["ood_score"]
    legacy = load_classifier(write("v1.npz", old, density_means=None, density_precision=None))
    assert legacy.ood_score_kind == "dempster_shafer"
    prediction = legacy.predict(test_x)
    np.testing.assert_array_equal(prediction.ood, prediction.uncertainty > 0.4)
    with pytest.raises(ClassifierFileError, match="density_means"):
        load_classifier(write("no_arrays.npz", metadata, density_means=None))
    with pytest.raises(ClassifierFileError, match="NaN or infinite"):
        load_classifier(write("nan.npz", metadata, density_means=np.full_like(arrays["density_means"], np.nan)))
    with pytest.raises(ClassifierFileError, match="density"):
        load_classifier(write("wide.npz", metadata, density_means=np.zeros((3, 7))))
    with pytest.raises(ClassifierFileError, match="unknown OOD score"):
        load_classifier(write("kind.npz", dict(metadata, ood_score="entropy")))


# --- input errors --------------------------------------------------------------------------


def test_predict_rejects_bad_embeddings(trained):
    classifier, _ = trained
    with pytest.raises(ValueError, match="8-d embeddings, got 5-d"):
        classifier.predict(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        classifier.predict(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        classifier.predict(np.full((2, 8), np.nan, np.float32))
    empty = classifier.predict(np.zeros((0, 8), np.float32))
    assert empty.probabilities.shape == (0, 3) and empty.ood.shape == (0,)


def test_train_rejects_bad_input():
    rng = np.random.default_rng(0)
    x, y = toy_embeddings(40, rng)
    with pytest.raises(KeyError, match="BERT_SNGP_v1"):
        drive(train_classifier(x, y, config="BERT_SNGP_v9"))
    with pytest.raises(ValueError, match="40 embeddings but 39 labels"):
        drive(train_classifier(x, y[:-1], config=TINY_SNGP))
    with pytest.raises(ValueError, match="outside"):
        drive(train_classifier(x, y, class_names=("a", "b"), config=TINY_SNGP))
    with pytest.raises(ValueError, match="only one class"):
        drive(train_classifier(x, np.zeros(40, int), class_names=CLASS_NAMES, config=TINY_SNGP))
    with pytest.raises(ValueError, match="not in class_names"):
        drive(train_classifier(x, np.array(["axon"] * 20 + ["glia"] * 20), class_names=CLASS_NAMES, config=TINY_SNGP))
    bad = x.copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        drive(train_classifier(bad, y, config=TINY_SNGP))
    with pytest.raises(ValueError, match="threshold"):
        drive(train_classifier(x, y, config=TINY_SNGP, ood_threshold=-2.0))
    with pytest.raises(ValueError, match="threshold"):
        drive(train_classifier(x, y, config=TINY_SNGP, ood_threshold=2.0, ood_score="dempster_shafer"))
    with pytest.raises(ValueError, match="validation data"):
        drive(train_classifier(x, y, config=TINY_SNGP, validation_data=(np.zeros((5, 3)), np.zeros(5, int))))


# --- configs -------------------------------------------------------------------------------


def test_named_configs_match_segclr():
    assert set(CLASSIFIER_CONFIGS) == {"BERT_SNGP_v1", "BERT_SMALL_SNGP_v1", "WRN_SNGP_v1", "linear_v1"}

    def as_tuple(c):
        return (
            c.num_hidden,
            c.num_layers,
            c.spec_norm_bound,
            c.num_inducing,
            c.gp_cov_momentum,
            c.gp_cov_ridge_penalty,
            c.l2_reg,
            c.batch_size,
        )

    assert as_tuple(BERT_SNGP_V1) == (128, 2, 0.95, 2048, 0.999, 1e-3, 1e-3, 128)
    assert as_tuple(BERT_SMALL_SNGP_V1) == (64, 2, 0.95, 256, 0.999, 1e-3, 1e-3, 128)
    assert as_tuple(WRN_SNGP_V1) == (128, 2, 6.0, 1024, 0.999, 1e-3, 1e-4, 128)
    assert LINEAR_V1.num_layers == 0 and not LINEAR_V1.uses_gp and LINEAR_V1.l2_reg == 1e-4
    assert get_classifier_config("WRN_SNGP_v1") is WRN_SNGP_V1
    assert ClassifierConfig.from_dict(TINY_SNGP.to_dict()) == TINY_SNGP
    with pytest.raises(ValueError, match="unknown"):
        ClassifierConfig.from_dict({**TINY_SNGP.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="momentum"):
        TINY_SNGP.with_updates(gp_cov_momentum=1.5)
    assert all(c.gp_relative_lengthscale == 0.5 for c in CLASSIFIER_CONFIGS.values())
    with pytest.raises(ValueError, match="lengthscale"):
        TINY_SNGP.with_updates(gp_relative_lengthscale=0.0)


def test_package_import_does_not_load_keras():
    code = (
        "import sys, segscope.analysis.classify; "
        "print(any(m.split('.')[0] in ('keras', 'tensorflow') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- uncertainty maths ---------------------------------------------------------------------


def test_dempster_shafer_hand_cases():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(dempster_shafer(logits), [4 / 8, 4 / 9])
    huge = dempster_shafer(np.array([[1000.0, 0.0]]))  # no overflow, certainly in-domain
    assert np.isfinite(huge).all() and huge[0] < 1e-300


def test_mean_field_logits_hand_case():
    adjusted = mean_field_logits(np.array([[2.0, -1.0]]), np.array([math.pi**2 / 3]))
    np.testing.assert_allclose(adjusted, [[2 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert MEAN_FIELD_LAMBDA == pytest.approx(3 / math.pi**2)


def test_posterior_covariance_matches_explicit_inverse():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 6))
    precision = features.T @ features
    expected = 0.01 * np.linalg.inv(0.01 * np.eye(6) + precision)
    np.testing.assert_allclose(posterior_covariance(precision, 0.01), expected, rtol=1e-8)
    with pytest.raises(ValueError, match="square"):
        posterior_covariance(np.zeros((3, 4)), 0.01)


# --- metrics -------------------------------------------------------------------------------


def test_accuracy_and_confusion_matrix():
    assert accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == 0.75
    np.testing.assert_array_equal(confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2]), [[1, 0, 0], [0, 0, 1], [0, 0, 2]])
    with pytest.raises(ValueError, match="labels"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="integer"):
        accuracy([0.0, 1.0], [0, 1])


def test_macro_f1_hand_case():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: P = R = 1/2 -> F1 1/2; class 1: P 2/3, R 1 -> 4/5; class 2: never right -> 0
    np.testing.assert_allclose(per_class_f1(y_true, y_pred), [0.5, 0.8, 0.0])
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # A class absent from both arrays does not count (scikit-learn's convention).
    assert macro_f1([0, 0, 2], [0, 0, 2], num_classes=4) == 1.0


def test_auroc_hand_cases_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    # positives 0.5 and 0.9 against negatives 0.2 and 0.5: 1 + 1/2 + 1 + 1 out of 4 pairs
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.875
    assert auroc([3.0, 2.0, 1.0], [0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([0.1, 0.2], [1, 1])


def test_class_guaranteed_subsample():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    for seed in range(20):
        picked = class_guaranteed_subsample(labels, 5, np.random.default_rng(seed))
        assert picked.size == 5 and np.unique(picked).size == 5
        assert set(labels[picked]) == {0, 1, 2}
    np.testing.assert_array_equal(
        class_guaranteed_subsample(labels, 7, np.random.default_rng(3)),
        class_guaranteed_subsample(labels, 7, np.random.default_rng(3)),
    )
    np.testing.assert_array_equal(class_guaranteed_subsample(labels, 100, np.random.default_rng(0)), np.arange(100))
    with pytest.raises(ValueError, match="number of classes"):
        class_guaranteed_subsample(labels, 2, np.random.default_rng(0))
    names = np.array(["axon", "soma", "axon", "glia"])
    assert set(names[class_guaranteed_subsample(names, 3, np.random.default_rng(0))]) == {"axon", "soma", "glia"}
