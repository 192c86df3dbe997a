"""Classification metrics and label subsampling in plain numpy (no scikit-learn).

Labels are integer class codes ``[N]``; scores are floats ``[N]``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _as_label_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {y_true.shape} and {y_pred.shape}")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("no labels given")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class codes, got dtype {y.dtype}")
        if y.min() < 0:
            raise ValueError(f"{name} holds a negative class code {y.min()}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    """Fraction of ``y_pred`` equal to ``y_true`` (both int ``[N]``)."""
    y_true, y_pred = _as_label_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """Counts ``[K, K]`` (int64): row = true class, column = predicted class.

    ``num_classes`` defaults to one more than the largest code seen.
    """
    y_true, y_pred = _as_label_pair(y_true, y_pred)
    seen = int(max(y_true.max(), y_pred.max())) + 1
    if num_classes is None:
        num_classes = seen
    elif seen > num_classes:
        raise ValueError(f"class code {seen - 1} out of range for {num_classes} classes")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_f1(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """F1 score of every class ``[K]``; 0 for a class with no true and no predicted member."""
    counts = confusion_matrix(y_true, y_pred, num_classes)
    true_pos = np.diag(counts).astype(np.float64)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + actual); defined as 0 when both
    # are 0, which is scikit-learn's zero_division=0 convention.
    denominator = counts.sum(axis=0) + counts.sum(axis=1)
    return np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)


def macro_f1(y_true, y_pred, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``.

    This matches scikit-learn's ``f1_score(average="macro")`` with its default label set:
    classes absent from both arrays do not count, so ``num_classes`` only widens the range
    checked.
    """
    counts = confusion_matrix(y_true, y_pred, num_classes)
    present = (counts.sum(axis=0) + counts.sum(axis=1)) > 0
    return float(per_class_f1(y_true, y_pred, num_classes)[present].mean())


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for the boolean ``positive`` ``[N]``.

    Rank-based (Mann-Whitney U): the probability that a random positive scores higher than
    a random negative, ties counting one half (midranks).

    Raises
    ------
    ValueError
        Shapes differ, scores are not finite, or one of the two groups is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive)
    if scores.ndim != 1 or scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be equal 1-D")
    if positive.dtype != bool:
        if not np.isin(positive, (0, 1)).all():
            raise ValueError("positive must be boolean (or 0/1)")
        positive = positive.astype(bool)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {num_pos} and {num_neg}")
    ranks = rankdata(scores)  # average ranks for ties
    u_statistic = ranks[positive].sum() - num_pos * (num_pos + 1) / 2
    return float(u_statistic / (num_pos * num_neg))


def class_guaranteed_subsample(labels, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` distinct examples drawn at random, every class at least once.

    One example of each class present in ``labels`` is drawn first, the rest uniformly
    from the remaining examples: SegCLR's label-efficiency protocol.

    Parameters
    ----------
    labels : array-like, int or str, ``[N]``
    n : int
        Subsample size, from the number of classes up to ``N``.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        int64 ``[n]``, sorted ascending.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    classes, codes = np.unique(labels, return_inverse=True)
    if not classes.size <= n <= labels.size:
        raise ValueError(
            f"subsample size must be between the number of classes "
            f"({classes.size}) and the number of labels ({labels.size}), got {n}"
        )
    # A random permutation, then the first occurrence of each class in it, is a uniform
    # draw of one example per class.
    order = rng.permutation(labels.size)
    _, first = np.unique(codes[order], return_index=True)
    guaranteed = order[first]
    rest = np.setdiff1d(order, guaranteed, assume_unique=True)
    extra = rng.choice(rest, size=n - classes.size, replace=False)
    return np.sort(np.concatenate([guaranteed, extra])).astype(np.int64)
