"""SegCLR's SNGP embedding classifiers: subcompartments, cell types, out-of-distribution flags.

Public API
----------
* :func:`train_classifier` (a Progress generator returning a :class:`Classifier`),
  :func:`load_classifier`, :meth:`Classifier.save`, :meth:`Classifier.predict` ->
  :class:`Prediction`; :func:`read_classifier_metadata` reads a file's class names and
  config without Keras.
* :data:`CLASSIFIER_CONFIGS` / :func:`get_classifier_config`: SegCLR's named configs
  (``BERT_SNGP_v1``, ``BERT_SMALL_SNGP_v1``, ``WRN_SNGP_v1``, ``linear_v1``).
* Metrics: :func:`accuracy`, :func:`macro_f1`, :func:`per_class_f1`,
  :func:`confusion_matrix`, :func:`auroc`; :func:`class_guaranteed_subsample` for
  label-efficiency curves.
* Uncertainty maths: :func:`mean_field_logits`, :func:`dempster_shafer`,
  :func:`posterior_covariance`, :func:`predictive_variance`.

The Keras layers live in :mod:`segscope.analysis.classify.layers`; importing this package does not
import Keras or TensorFlow.
"""

from .classifier import (
    FORMAT_VERSION,
    Classifier,
    ClassifierFileError,
    Prediction,
    class_balanced_weights,
    load_classifier,
    read_classifier_metadata,
    stratified_split,
    train_classifier,
)
from .configs import (
    BERT_SMALL_SNGP_V1,
    BERT_SNGP_V1,
    CLASSIFIER_CONFIGS,
    LINEAR_V1,
    WRN_SNGP_V1,
    ClassifierConfig,
    get_classifier_config,
)
from .metrics import (
    accuracy,
    auroc,
    class_guaranteed_subsample,
    confusion_matrix,
    macro_f1,
    per_class_f1,
)
from .uncertainty import (
    MEAN_FIELD_LAMBDA,
    class_probabilities,
    dempster_shafer,
    mean_field_logits,
    posterior_covariance,
    predictive_variance,
)

__all__ = [
    "BERT_SMALL_SNGP_V1",
    "BERT_SNGP_V1",
    "CLASSIFIER_CONFIGS",
    "FORMAT_VERSION",
    "LINEAR_V1",
    "MEAN_FIELD_LAMBDA",
    "WRN_SNGP_V1",
    "Classifier",
    "ClassifierConfig",
    "ClassifierFileError",
    "Prediction",
    "accuracy",
    "auroc",
    "class_balanced_weights",
    "class_guaranteed_subsample",
    "class_probabilities",
    "confusion_matrix",
    "dempster_shafer",
    "get_classifier_config",
    "load_classifier",
    "macro_f1",
    "mean_field_logits",
    "per_class_f1",
    "posterior_covariance",
    "predictive_variance",
    "read_classifier_metadata",
    "stratified_split",
    "train_classifier",
]
