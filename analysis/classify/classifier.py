"""Training, prediction, saving and loading of SNGP embedding classifiers.

Keras is imported only when a classifier is trained or loaded (this module itself imports
nothing heavy, so :mod:`segscope.analysis.classify` stays cheap to import).

Differences from SegCLR's ``classification/model_handler.py``, on purpose:

* Prediction runs the network in inference mode. SegCLR's ``predict_data`` calls
  ``model(data)``, whose ``training`` defaults to True, so every prediction folded the
  test data into the GP precision matrix (and ran a power iteration). Here predicting
  never writes a weight: the same input gives the same output before and after.
* The validation split is stratified by class (Keras' ``validation_split`` takes the tail
  of the shuffled data, so a rare class can be missing from validation).
* Probabilities are the softmax of the mean-field adjusted logits (SegCLR's
  ``predict_data`` returned the unadjusted softmax); the predicted label is the same.
* Out-of-distribution scores of newly trained classifiers are the Mahalanobis distance to
  the training classes (:mod:`.density`); the Dempster-Shafer uncertainty is still
  computed and returned. Files without a density (format 1, or trained with
  ``ood_score="dempster_shafer"``) score OOD by the uncertainty, as SegCLR does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import Progress, RateMeter
from .configs import ClassifierConfig, get_classifier_config
from .density import ClassDensity
from .uncertainty import (
    MEAN_FIELD_LAMBDA,
    class_probabilities,
    dempster_shafer,
    mean_field_logits,
    posterior_covariance,
    predictive_variance,
)

if TYPE_CHECKING:  # pragma: no cover
    from .layers import ClassifierNet, RandomFeatureGP

logger = logging.getLogger(__name__)

FORMAT_NAME = "segscope-classifier"
#: 2 added the optional density term (``density_means``, ``density_precision`` and the
#: ``ood_score`` metadata key); version 1 files load unchanged.
FORMAT_VERSION = 2
_METADATA_KEY = "metadata_json"
DEFAULT_OOD_QUANTILE = 0.95
#: Training defaults. SegCLR's 1000 epochs with patience 20 on the raw validation loss
#: rarely stopped: once the loss is small it keeps creeping down by fractions of a percent
#: (8k examples, 4 classes: best epoch 34, 37, 44... each a 0.1-1 % gain) and one fold ran
#: over 8 minutes. An epoch counts as better only when it lowers the best validation loss
#: by ``min_improvement`` of itself and by ``min_delta`` nats; 200 epochs bound the worst
#: case. The absolute floor is for a user's few separable labels: their validation loss
#: falls about 2 % per epoch towards zero (the logits grow, the predictions do not change),
#: so a relative rule alone never stopped them before the cap.
DEFAULT_MAX_EPOCHS = 200
DEFAULT_PATIENCE = 10
DEFAULT_MIN_IMPROVEMENT = 0.01
DEFAULT_MIN_DELTA = 0.01


class ClassifierFileError(ValueError):
    """A classifier file exists but is not a readable SegScope classifier."""


@dataclass(frozen=True)
class Prediction:
    """Classifier output for ``N`` embeddings and ``K`` classes.

    Attributes
    ----------
    probabilities : numpy.ndarray
        float64 ``[N, K]``: softmax of the mean-field adjusted logits.
    labels : numpy.ndarray
        int64 ``[N]``: predicted class codes (index ``class_names``).
    logits : numpy.ndarray
        float32 ``[N, K]``: raw (unadjusted) logits.
    variance : numpy.ndarray
        float32 ``[N]``: GP predictive variance (zeros without a GP output layer).
    uncertainty : numpy.ndarray
        float64 ``[N]`` in (0, 1): Dempster-Shafer uncertainty of the adjusted logits.
    ood : numpy.ndarray
        bool ``[N]``: ``ood_score > threshold`` (flagged out of distribution).
    class_names : tuple of str
    ood_score : numpy.ndarray
        float64 ``[N]``: what the OOD threshold applies to, the classifier's
        ``ood_score_kind``: Mahalanobis distance to the training classes (standardised
        units) or, for classifiers without a density, ``uncertainty`` (the default).
    """

    probabilities: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    variance: np.ndarray
    uncertainty: np.ndarray
    ood: np.ndarray
    class_names: tuple[str, ...] = field(default=())
    ood_score: np.ndarray = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.ood_score is None:  # a classifier without a density scores by uncertainty
            object.__setattr__(self, "ood_score", np.asarray(self.uncertainty, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def label_names(self) -> np.ndarray:
        """Predicted class names ``[N]`` (str)."""
        return np.asarray(self.class_names, dtype=str)[self.labels]


#: The kinds of OOD score a classifier can have (see :attr:`Classifier.ood_score_kind`).
OOD_SCORE_KINDS = ("mahalanobis", "dempster_shafer")


def _check_threshold(threshold: float, kind: str = "dempster_shafer") -> float:
    threshold = float(threshold)
    if kind == "dempster_shafer" and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"OOD threshold must be in [0, 1] (Dempster-Shafer uncertainty), got {threshold}")
    if kind == "mahalanobis" and not (math.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"OOD threshold must be a finite distance >= 0 (Mahalanobis), got {threshold}")
    return threshold


class Classifier:
    """A fitted embedding classifier: network, class names, OOD threshold.

    Build one with :func:`train_classifier` or :func:`load_classifier`.

    Attributes
    ----------
    model : ClassifierNet
        The Keras network (its ``call`` returns logits).
    class_names : tuple of str
    ood_threshold : float
        OOD score (see ``ood_score_kind``) above which :meth:`predict` flags out of
        distribution. Settable; saved with the classifier.
    density : ClassDensity or None
        The training classes' Gaussians in standardised units; when present the OOD score
        is the Mahalanobis distance to them, otherwise the Dempster-Shafer uncertainty.
    training_info : dict
        What training recorded (history, epochs, seed, data sizes); JSON-able.
    """

    def __init__(
        self,
        model: ClassifierNet,
        class_names: Sequence[str],
        *,
        ood_threshold: float,
        mean_field_lambda: float = MEAN_FIELD_LAMBDA,
        training_info: dict[str, Any] | None = None,
        density: ClassDensity | None = None,
    ):
        self.model = model
        self.class_names = tuple(str(name) for name in class_names)
        if len(self.class_names) != model.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model with {model.num_classes} classes")
        if density is not None and density.num_features != model.num_features:
            raise ValueError(f"a {density.num_features}-d density for a {model.num_features}-d classifier")
        self.density = density
        self._ood_threshold = _check_threshold(ood_threshold, self.ood_score_kind)
        self.mean_field_lambda = float(mean_field_lambda)
        self.training_info = dict(training_info or {})
        self._covariance: np.ndarray | None = None

    @property
    def config(self) -> ClassifierConfig:
        return self.model.classifier_config

    @property
    def num_features(self) -> int:
        """Embedding dimension ``D`` the classifier expects."""
        return self.model.num_features

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ood_threshold(self) -> float:
        return self._ood_threshold

    @ood_threshold.setter
    def ood_threshold(self, value: float) -> None:
        self._ood_threshold = _check_threshold(value, self.ood_score_kind)

    @property
    def ood_score_kind(self) -> str:
        """``"mahalanobis"`` with a density, else ``"dempster_shafer"`` (SegCLR's)."""
        return "dempster_shafer" if self.density is None else "mahalanobis"

    def ood_scores(self, embeddings: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
        """The OOD score ``[N]`` float64 of raw embeddings ``[N, D]`` whose uncertainty is known."""
        if self.density is None:
            return np.asarray(uncertainty, dtype=np.float64)
        standardised = (embeddings - self.standardization_mean) / self.standardization_std
        return self.density.distance(standardised)

    @property
    def standardization_mean(self) -> np.ndarray:
        """Per-dimension training mean ``[D]``."""
        return np.asarray(self.model.standardize.mean.numpy())

    @property
    def standardization_std(self) -> np.ndarray:
        """Per-dimension training std ``[D]`` (1 where the training data were constant)."""
        return np.asarray(self.model.standardize.std.numpy())

    def __repr__(self) -> str:
        return (
            f"Classifier({self.config.name}, D={self.num_features}, "
            f"classes={list(self.class_names)}, ood_threshold={self.ood_threshold:.4g})"
        )

    def _posterior_covariance(self, gp: RandomFeatureGP) -> np.ndarray:
        # P is frozen once training is over, so invert once and reuse for every prediction.
        if self._covariance is None:
            self._covariance = posterior_covariance(gp.precision.numpy(), gp.ridge).astype(np.float32)
        return self._covariance

    def predict(self, embeddings, *, batch_size: int = 8192) -> Prediction:
        """Classify embeddings ``[N, D]`` (raw, not standardised: the model does that).

        Runs in inference mode: no weight changes, so repeated calls agree exactly.

        Raises
        ------
        ValueError
            ``embeddings`` is not ``[N, D]`` with this classifier's ``D``, or not finite.
        """
        data = _as_embeddings(embeddings, "embeddings")
        if data.shape[1] != self.num_features:
            raise ValueError(f"this classifier takes {self.num_features}-d embeddings, got {data.shape[1]}-d")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        gp = self.model.gp_layer
        logits_parts, variance_parts = [], []
        for start in range(0, data.shape[0], batch_size):
            logits, features = self.model.inference_outputs(data[start : start + batch_size])
            logits_parts.append(np.asarray(logits))
            if gp is None:
                variance_parts.append(np.zeros(logits_parts[-1].shape[0], np.float32))
            else:
                variance_parts.append(predictive_variance(np.asarray(features), self._posterior_covariance(gp)))
        if logits_parts:
            logits = np.concatenate(logits_parts)
            variance = np.concatenate(variance_parts)
        else:
            logits = np.zeros((0, self.num_classes), np.float32)
            variance = np.zeros(0, np.float32)
        adjusted = mean_field_logits(logits, variance, self.mean_field_lambda)
        uncertainty = dempster_shafer(adjusted)
        ood_score = self.ood_scores(data, uncertainty)
        return Prediction(
            probabilities=class_probabilities(adjusted),
            labels=np.argmax(logits, axis=1).astype(np.int64),
            logits=logits,
            variance=variance,
            uncertainty=uncertainty,
            ood=ood_score > self.ood_threshold,
            class_names=self.class_names,
            ood_score=ood_score,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier to one ``.npz`` file (no pickle; loads with ``allow_pickle=False``).

        The file holds every weight (standardisation statistics, frozen random features,
        precision matrix and power-iteration vectors included) and a JSON metadata record:
        format name and version, config, class names, OOD threshold, mean-field lambda,
        training info and the Keras path of each weight.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"classifier files end in .npz, got {path.name!r}")
        arrays: dict[str, np.ndarray] = {}
        weight_paths = []
        for index, variable in enumerate(self.model.weights):
            arrays[f"weight_{index:04d}"] = np.asarray(variable.numpy())
            weight_paths.append(variable.path)
        import keras

        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "num_features": self.num_features,
            "ood_threshold": self.ood_threshold,
            "ood_score": self.ood_score_kind,
            "mean_field_lambda": self.mean_field_lambda,
            "training_info": self.training_info,
            "weight_paths": weight_paths,
            "keras_version": keras.__version__,
        }
        if self.density is not None:
            arrays["density_means"] = self.density.means
            arrays["density_precision"] = self.density.precision
        arrays[_METADATA_KEY] = np.array(json.dumps(metadata))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as handle:  # a file object stops numpy appending ".npz"
            np.savez(handle, allow_pickle=False, **arrays)
        os.replace(partial, path)
        return path


def read_classifier_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved classifier (class names, config...), without Keras.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ClassifierFileError
        (a ValueError) The file is not a SegScope classifier, is damaged, or is of a newer
        format version.
    """
    metadata, _ = _read_classifier_file(path, with_weights=False)
    return metadata


def _read_classifier_file(path, *, with_weights: bool):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier file {path}")
    try:
        # np.load is given an open file because, given a path, it leaves the file open when
        # the zip turns out to be damaged (numpy 2.4); this `with` closes it either way.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            if _METADATA_KEY not in archive.files:
                raise ClassifierFileError(f"{path} is not a SegScope classifier (no metadata)")
            metadata = json.loads(str(archive[_METADATA_KEY]))
            if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
                raise ClassifierFileError(f"{path} is not a SegScope classifier file")
            version = metadata.get("format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise ClassifierFileError(
                    f"{path} has classifier format version {version!r}; this SegScope reads up to {FORMAT_VERSION}"
                )
            weights = None
            if with_weights:
                count = len(metadata["weight_paths"])
                weights = [archive[f"weight_{i:04d}"] for i in range(count)]
                if metadata.get("ood_score", "dempster_shafer") == "mahalanobis":
                    weights.append((archive["density_means"], archive["density_precision"]))
    except ClassifierFileError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        # numpy reports a non-zip file as OSError/ValueError, a truncated zip as BadZipFile;
        # its "allow_pickle=False" wording for any non-NumPy file means nothing to a user.
        reason: object = exc
        if "Object arrays cannot be loaded" in str(exc):
            reason = "it holds pickled Python objects, which SegScope never loads"
        elif "allow_pickle" in str(exc):
            reason = "not a NumPy .npz archive"
        raise ClassifierFileError(f"{path} is not a readable classifier file: {reason}") from exc
    except RecursionError:
        raise ClassifierFileError(f"{path}: classifier metadata nested too deeply to read") from None
    except MemoryError:
        raise ClassifierFileError(f"{path}: declares arrays too large to hold in memory") from None
    return metadata, weights


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Load a classifier written by :meth:`Classifier.save`.

    Predictions of the loaded classifier equal those of the saved one exactly.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ClassifierFileError
        (a ValueError) Not a SegScope classifier, damaged, or weights that do not fit the
        recorded config.
    """
    metadata, weights = _read_classifier_file(path, with_weights=True)
    try:
        config = ClassifierConfig.from_dict(metadata["config"])
        class_names = [str(name) for name in metadata["class_names"]]
        num_features = int(metadata["num_features"])
        weight_paths = list(metadata["weight_paths"])
        ood_threshold = float(metadata["ood_threshold"])
        mean_field_lambda = float(metadata["mean_field_lambda"])
        ood_score_kind = str(metadata.get("ood_score", "dempster_shafer"))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ClassifierFileError(f"{path}: incomplete classifier metadata: {exc}") from exc
    if ood_score_kind not in OOD_SCORE_KINDS:
        raise ClassifierFileError(f"{path}: unknown OOD score {ood_score_kind!r} (known: {', '.join(OOD_SCORE_KINDS)})")
    density = None
    if ood_score_kind == "mahalanobis":
        means, precision = weights.pop()
        try:
            density = ClassDensity(np.asarray(means, np.float64), np.asarray(precision, np.float64))
        except (ValueError, TypeError) as exc:
            raise ClassifierFileError(f"{path}: invalid density term: {exc}") from None
        if density.num_features != num_features:
            raise ClassifierFileError(f"{path}: a {density.num_features}-d density for {num_features}-d embeddings")
    if math.isnan(ood_threshold) or not math.isfinite(mean_field_lambda) or not 0 < num_features <= 1 << 20:
        raise ClassifierFileError(
            f"{path}: invalid classifier metadata (ood_threshold {ood_threshold}, "
            f"mean_field_lambda {mean_field_lambda}, num_features {num_features})"
        )

    from .layers import ClassifierNet

    model = ClassifierNet(
        config, np.zeros(num_features, np.float32), np.ones(num_features, np.float32), len(class_names), seed=None
    )
    expected = [variable.path for variable in model.weights]
    if expected != weight_paths:
        raise ClassifierFileError(
            f"{path}: stored weights {weight_paths} do not match the network of config {config.name} ({expected})"
        )
    for variable, value in zip(model.weights, weights):
        if tuple(variable.shape) != value.shape:
            raise ClassifierFileError(
                f"{path}: weight {variable.path} has shape {value.shape}, expected {tuple(variable.shape)}"
            )
        if value.dtype.kind not in "fiu" or not np.all(np.isfinite(value)):
            # NaN or inf weights would turn every prediction into NaN without a word.
            raise ClassifierFileError(f"{path}: weight {variable.path} holds NaN, infinite or non-numeric values")
        variable.assign(value)
    try:
        return Classifier(
            model,
            class_names,
            ood_threshold=ood_threshold,
            mean_field_lambda=mean_field_lambda,
            training_info=metadata.get("training_info"),
            density=density,
        )
    except ValueError as exc:
        raise ClassifierFileError(f"{path}: {exc}") from None


def _as_embeddings(embeddings, what: str) -> np.ndarray:
    data = np.asarray(embeddings)
    if data.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D], got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {data.dtype}")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return data


def _label_codes(labels, class_names: Sequence[str], what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind in "USO":
        lookup = {name: code for code, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in labels} - set(lookup))
        if unknown:
            raise ValueError(f"{what} holds names not in class_names: {unknown[:10]}")
        return np.array([lookup[str(v)] for v in labels], dtype=np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be integer class codes or class names, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{what} hold codes outside [0, {len(class_names)}) (min {labels.min()}, max {labels.max()})")
    return labels.astype(np.int64)


def _resolve_class_names(labels, class_names) -> tuple[str, ...]:
    if class_names is not None:
        names = tuple(str(name) for name in class_names)
        if len(set(names)) != len(names):
            raise ValueError(f"class_names has duplicates: {names}")
        return names
    labels = np.asarray(labels)
    if labels.dtype.kind in "USO":
        return tuple(sorted({str(v) for v in labels}))
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be integer class codes or class names")
    return tuple(str(code) for code in range(int(labels.max()) + 1))


def class_balanced_weights(codes: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-example weights ``[N]`` of ``1 / count(class)``, scaled to mean 1 (SegCLR's)."""
    counts = np.bincount(codes, minlength=num_classes).astype(np.float64)
    weights = 1.0 / counts[codes]
    return (weights / weights.mean()).astype(np.float32)


def stratified_split(codes: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (train, validation), ``fraction`` of each class held out.

    Every class keeps at least one training example; a class of one example has none in
    validation. Returns sorted int64 index arrays.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    held_out = []
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        count = min(round(fraction * members.size), members.size - 1)
        held_out.append(members[:count])
    validation = np.sort(np.concatenate(held_out)).astype(np.int64)
    train = np.setdiff1d(np.arange(codes.size), validation).astype(np.int64)
    return train, validation


def _epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split a shuffled index order into batches of one size.

    A short last batch is topped up from the start of the order (those few examples are
    seen twice this epoch) instead of being run short: every distinct batch shape costs
    Keras another trace of the train step, several seconds each on two cores. With fewer
    examples than ``batch_size`` the single batch is all of them.
    """
    batch_size = min(batch_size, order.size)
    count = -(-order.size // batch_size)
    padded = np.concatenate([order, order[: count * batch_size - order.size]])
    return np.split(padded, count)


def validation_loss(
    model: ClassifierNet, embeddings: np.ndarray, codes: np.ndarray, weights: np.ndarray, *, batch_size: int = 8192
) -> float:
    """Weighted mean cross-entropy of the logits plus the L2 penalty, in inference mode.

    The same quantity as Keras' ``val_loss`` (``sum_over_batch_size`` reduction plus
    regularisation losses), computed directly: a Keras ``evaluate`` per epoch costs far
    more than this forward pass on small validation sets. The forward pass is Keras'
    compiled ``predict_on_batch``: an eager call cost 10-30 ms per epoch on 10 rows, most
    of a small label set's epoch, against about 1 ms.
    """
    from scipy.special import logsumexp

    total = 0.0
    for start in range(0, codes.size, batch_size):
        logits = np.asarray(model.predict_on_batch(embeddings[start : start + batch_size]), dtype=np.float64)
        picked = logits[np.arange(logits.shape[0]), codes[start : start + batch_size]]
        total += float(np.sum(weights[start : start + batch_size] * (logsumexp(logits, axis=1) - picked)))
    penalty = sum(float(np.asarray(loss)) for loss in model.losses)
    return total / codes.size + penalty


def _fit_precision(model: ClassifierNet, embeddings: np.ndarray, batches: list[np.ndarray]) -> None:
    """Set the GP precision to what one training epoch over ``batches`` leaves, for the final weights.

    SegCLR folds every training batch into the precision while the weights still change
    and keeps the last epoch's sum. Here the same momentum recursion over one epoch of
    batches is evaluated once with the restored (best) network, in inference mode, so the
    posterior describes the features the classifier will predict with.
    """
    from .layers import accumulated_precision

    gp = model.gp_layer
    assert gp is not None
    order = np.concatenate(batches)
    parts = []
    for start in range(0, order.size, 8192):
        _, features = model.inference_outputs(embeddings[order[start : start + 8192]])
        parts.append(np.asarray(features, dtype=np.float32))
    precision = accumulated_precision(np.concatenate(parts), batches[0].size, gp.momentum)
    gp.precision.assign(precision.astype(np.float32))


def train_classifier(
    embeddings,
    labels,
    *,
    class_names: Sequence[str] | None = None,
    config: str | ClassifierConfig = "BERT_SNGP_v1",
    validation_split: float = 0.1,
    validation_data: tuple[Any, Any] | None = None,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
    min_delta: float = DEFAULT_MIN_DELTA,
    learning_rate: float = 1e-3,
    batch_size: int | None = None,
    balance_classes: bool = True,
    seed: int = 0,
    ood_threshold: float | None = None,
    ood_quantile: float = DEFAULT_OOD_QUANTILE,
    ood_score: str = "mahalanobis",
) -> Generator[Progress, None, Classifier]:
    """Fit a classifier on embeddings; a generator yielding one Progress per epoch.

    Adam, cross-entropy on logits, class-balanced example weights, early stopping on the
    (weighted, regularised) validation loss with ``patience`` epochs and the best epoch's
    weights restored: SegCLR's ``train_model``. The GP precision matrix is SegCLR's
    (one epoch's momentum sum, reset each epoch) but computed once, for the restored
    network, instead of during every epoch (see :func:`_fit_precision`).
    ``drive(train_classifier(...))`` returns the :class:`Classifier`.

    Parameters
    ----------
    embeddings : array-like, ``[N, D]``
        Raw embeddings; standardisation statistics come from the training part.
    labels : array-like, ``[N]``
        Integer codes indexing ``class_names``, or class-name strings.
    class_names : sequence of str, optional
        Default: ``"0".."K-1"`` for codes, the sorted distinct names for strings.
    config : str or ClassifierConfig
        A name from :data:`CLASSIFIER_CONFIGS` or a custom config.
    validation_split : float
        Fraction of each class held out for early stopping when ``validation_data`` is not
        given. With 0 the training data are also the validation data (as in SegCLR).
    validation_data : (embeddings, labels), optional
    max_epochs, patience : int
        Stop after ``max_epochs``, or ``patience`` epochs without an improvement.
    min_improvement : float
        Relative decrease of the best validation loss an epoch must reach to count as an
        improvement (0: any decrease, Keras' ``min_delta=0``).
    min_delta : float
        Absolute decrease (nats of mean cross-entropy) it must also reach (Keras'
        ``min_delta``); 0 and ``min_improvement=0`` give SegCLR's rule.
    learning_rate : float
    batch_size : int, optional
        Default: the config's batch size.
    balance_classes : bool
        Weight every example by ``1 / count(its class)`` (mean weight 1).
    seed : int
        Seeds Keras' global RNG (initial weights), the split, the shuffling and the GP
        random features: the same inputs and seed give the same classifier.
    ood_threshold : float, optional
        Threshold of the OOD score for OOD flags. Default: the ``ood_quantile`` quantile of
        the validation scores (so about 5 % of in-distribution data is flagged).
    ood_score : {"mahalanobis", "dempster_shafer"}
        What scores novelty: the Mahalanobis distance to the training classes (a density
        fitted to the training part, :mod:`.density`) or SegCLR's Dempster-Shafer
        uncertainty alone.

    Yields
    ------
    Progress
        ``done`` epochs of ``max_epochs``; ``payload`` a dict with ``epoch``, ``loss``,
        ``val_loss``, ``accuracy``, ``best_epoch``, ``best_val_loss``.

    Raises
    ------
    ValueError
        Bad shapes, non-finite embeddings, labels outside the classes, fewer than two
        classes, bad hyper-parameters.
    KeyError
        Unknown config name.
    FloatingPointError
        The training loss became NaN or infinite.
    """
    config = get_classifier_config(config)
    data = _as_embeddings(embeddings, "embeddings")
    class_names = _resolve_class_names(labels, class_names)
    codes = _label_codes(labels, class_names, "labels")
    if codes.size != data.shape[0]:
        raise ValueError(f"{data.shape[0]} embeddings but {codes.size} labels")
    if len(class_names) < 2:
        raise ValueError("a classifier needs at least two classes")
    present = np.unique(codes)
    if present.size < 2:
        raise ValueError(f"training labels hold only one class ({class_names[present[0]]})")
    if present.size < len(class_names):
        missing = [class_names[c] for c in sorted(set(range(len(class_names))) - set(present))]
        logger.warning("classes without training examples (never predicted): %s", missing)
    if max_epochs < 1 or patience < 1:
        raise ValueError("max_epochs and patience must be positive")
    if not 0.0 <= min_improvement < 1.0:
        raise ValueError(f"min_improvement must be in [0, 1), got {min_improvement}")
    if not (math.isfinite(min_delta) and min_delta >= 0.0):
        raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    batch_size = config.batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if ood_score not in OOD_SCORE_KINDS:
        raise ValueError(f"ood_score must be one of {', '.join(OOD_SCORE_KINDS)}, got {ood_score!r}")
    if ood_threshold is not None:
        ood_threshold = _check_threshold(ood_threshold, ood_score)
    if not 0.0 < ood_quantile < 1.0:
        raise ValueError(f"ood_quantile must be in (0, 1), got {ood_quantile}")

    rng = np.random.default_rng(seed)
    if validation_data is not None:
        train_x, train_y = data, codes
        val_x = _as_embeddings(validation_data[0], "validation embeddings")
        val_y = _label_codes(validation_data[1], class_names, "validation labels")
        if val_x.shape[1] != data.shape[1] or val_x.shape[0] != val_y.size or not val_y.size:
            raise ValueError(
                f"validation data must be [M, {data.shape[1]}] with M labels, got {val_x.shape} and {val_y.size} labels"
            )
    else:
        train_idx, val_idx = stratified_split(codes, validation_split, rng)
        train_x, train_y = data[train_idx], codes[train_idx]
        if val_idx.size:
            val_x, val_y = data[val_idx], codes[val_idx]
        else:
            if validation_split > 0:
                logger.warning("too few examples for a validation split: validating on the training data")
            val_x, val_y = train_x, train_y

    if balance_classes:
        train_w = class_balanced_weights(train_y, len(class_names))
        val_w = class_balanced_weights(val_y, len(class_names))
    else:
        train_w = np.ones(train_y.size, np.float32)
        val_w = np.ones(val_y.size, np.float32)

    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    # A constant dimension carries no information; dividing by 1 keeps it at 0, not NaN.
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)

    import keras

    from .layers import ClassifierNet

    keras.utils.set_random_seed(seed)
    model = ClassifierNet(config, mean, std, len(class_names), seed=seed)
    gp_layer = model.gp_layer
    if gp_layer is not None:
        # The precision is computed once after training (see _fit_precision).
        gp_layer.accumulate_in_training = False
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    # fit() builds the optimizer before tracing; train_on_batch does not, and a train step
    # that creates variables is traced twice.
    model.optimizer.build(model.trainable_variables)
    logger.info(
        "training %s on %d examples (%d validation), %d classes, %d-d",
        config.name,
        train_y.size,
        val_y.size,
        len(class_names),
        data.shape[1],
    )

    history: dict[str, list[float]] = {"loss": [], "val_loss": [], "accuracy": []}
    best_val_loss, best_epoch, best_weights, waited = math.inf, -1, None, 0
    meter = RateMeter()
    epoch = 0
    for epoch in range(max_epochs):
        # A hand-driven epoch of train_on_batch steps, not model.fit: fit rebuilds its
        # tf.data pipeline on every call (about 0.2 s), several times the cost of a whole
        # epoch on typical label sets, and this generator must return between epochs.
        model.reset_metrics()
        for batch in _epoch_batches(rng.permutation(train_y.size), batch_size):
            logs = model.train_on_batch(train_x[batch], train_y[batch], sample_weight=train_w[batch], return_dict=True)
        loss = float(logs["loss"])  # Keras' running mean over this epoch's batches
        val_loss = validation_loss(model, val_x, val_y, val_w)
        if not (math.isfinite(loss) and math.isfinite(val_loss)):
            raise FloatingPointError(f"training diverged at epoch {epoch}: loss {loss}, validation loss {val_loss}")
        history["loss"].append(loss)
        history["val_loss"].append(val_loss)
        history["accuracy"].append(float(logs["accuracy"]))
        if val_loss < best_val_loss:
            # Keep the best weights on any decrease, but only a real one resets patience.
            needed = max(best_val_loss * min_improvement, min_delta)
            if best_val_loss - val_loss > needed or not math.isfinite(best_val_loss):
                waited = 0
            else:
                waited += 1
            best_val_loss, best_epoch = val_loss, epoch
            best_weights = model.get_weights()
        else:
            waited += 1
        logger.debug("epoch %d: loss %.4f val_loss %.4f", epoch, loss, val_loss)
        yield Progress(
            epoch + 1,
            max_epochs,
            "epochs",
            f"epoch {epoch + 1}: loss {loss:.4f}, validation loss {val_loss:.4f}",
            meter.rate(epoch + 1),
            payload={
                "epoch": epoch,
                "loss": loss,
                "val_loss": val_loss,
                "accuracy": history["accuracy"][-1],
                "best_epoch": best_epoch,
                "best_val_loss": best_val_loss,
            },
        )
        if waited >= patience:
            break
    # Early stopping restores every weight of the best epoch (power-iteration vectors
    # included); the precision is then computed for that network.
    model.set_weights(best_weights)
    if gp_layer is not None:
        _fit_precision(model, train_x, _epoch_batches(rng.permutation(train_y.size), batch_size))

    training_info = {
        "config": config.name,
        "seed": seed,
        "epochs_run": epoch + 1,
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss,
        "num_train": int(train_y.size),
        "num_validation": int(val_y.size),
        "validation_is_training_data": val_x is train_x,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "balance_classes": balance_classes,
        "patience": patience,
        "min_improvement": min_improvement,
        "min_delta": min_delta,
        "stopped_early": epoch + 1 < max_epochs,
        "history": history,
    }
    density = None
    if ood_score == "mahalanobis":
        density = ClassDensity.fit((train_x - mean) / std, train_y)
    classifier = Classifier(model, class_names, ood_threshold=0.5, training_info=training_info, density=density)
    if ood_threshold is None:
        ood_threshold = float(np.quantile(classifier.predict(val_x).ood_score, ood_quantile))
        training_info["ood_threshold_quantile"] = ood_quantile
    classifier.ood_threshold = ood_threshold
    return classifier
