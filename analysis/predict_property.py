"""Predict a per-segment property (function) from segment embeddings, cross-validated.

Features: each segment's mean node embedding (the segment-level aggregate; SegCLR's
radius aggregation, ``segscope.analysis.aggregate``, averages within a radius instead).
Numeric targets: ridge regression, scored by R^2; text targets: logistic regression, scored
by balanced accuracy. Both are fitted in stratified/shuffled k-fold cross-validation, and
the same folds are scored again with the target shuffled across segments (``n_shuffles``
times): the baseline the real score has to beat.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["PropertyScore", "predict_property", "read_property", "segment_mean_embeddings"]


def segment_mean_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (uint64 ``[S]``) and mean embeddings (float64 ``[S, D]``) of an embeddings Parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings table {path} does not exist")
    table = pq.read_table(path)
    dims = sorted((c for c in table.column_names if c[:1] == "e" and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if "segment_id" not in table.column_names or not dims:
        raise ValueError(f"{path} is not an embeddings table (needs segment_id and e0..e{{D-1}} columns)")
    ids = table.column("segment_id").to_numpy().astype(np.uint64)
    values = np.stack([table.column(c).to_numpy().astype(np.float64) for c in dims], axis=1)
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(unique), len(dims)))
    np.add.at(sums, inverse, values)
    return unique, sums / np.bincount(inverse, minlength=len(unique))[:, None]


def read_property(path: str | os.PathLike, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``segment_id`` (uint64) and ``column`` values of a Parquet/CSV segment table.

    Rows with an empty value (null, NaN, "") are dropped.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    if "segment_id" not in table.column_names:
        raise ValueError(f"{path} lacks a segment_id column")
    if column not in table.column_names:
        raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)})")
    ids = table.column("segment_id").to_numpy().astype(np.uint64)
    values = np.asarray(table.column(column).to_pylist(), dtype=object)
    keep = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) and v != "" for v in values])
    return ids[keep], values[keep]


def _mean_cos_error(estimator, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cosine of the angle between predicted and true (cos, sin) rows (a scorer)."""
    predicted = estimator.predict(x)
    error = np.arctan2(predicted[:, 1], predicted[:, 0]) - np.arctan2(y[:, 1], y[:, 0])
    return float(np.mean(np.cos(error)))


@dataclass(frozen=True)
class PropertyScore:
    """Cross-validated score of a property predictor and its shuffled-label baseline.

    ``metric`` is ``"r2"``, ``"mean_cos_error"`` (circular targets) or
    ``"balanced_accuracy"``; ``score`` the mean over folds;
    ``baseline_mean`` / ``baseline_std`` over ``n_shuffles`` shuffles; ``p_value`` the
    fraction of shuffles scoring at least ``score`` (with the +1 correction).
    """

    column: str
    task: str
    metric: str
    n_segments: int
    folds: int
    score: float
    fold_scores: tuple[float, ...]
    baseline_mean: float
    baseline_std: float
    p_value: float


def predict_property(
    segment_ids: np.ndarray,
    features: np.ndarray,
    property_ids: np.ndarray,
    values: np.ndarray,
    *,
    column: str = "property",
    folds: int = 5,
    n_shuffles: int = 20,
    seed: int = 0,
    period: float | None = None,
) -> Generator[Progress, None, PropertyScore]:
    """Fit and score a cross-validated predictor of ``values`` from ``features`` (generator).

    ``segment_ids`` uint64 ``[S]`` rows of ``features`` ``[S, D]``; ``property_ids`` /
    ``values`` ``[P]`` the targets. Only segments in both are used. ``period`` (numeric
    targets, e.g. 180 for an orientation in degrees): the target is an angle; ridge fits
    its (cos, sin) and the score is the mean cosine of the angular error (1: exact, 0:
    chance), so 179 and 1 degrees count as 2 apart.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    row_of = {int(s): i for i, s in enumerate(np.asarray(segment_ids).tolist())}
    pick = [(row_of[int(s)], v) for s, v in zip(np.asarray(property_ids).tolist(), values) if int(s) in row_of]
    if len(pick) < 2 * folds:
        raise ValueError(
            f"only {len(pick)} segments have both an embedding and a {column!r} value; "
            f"{folds}-fold cross-validation needs at least {2 * folds}"
        )
    x = np.asarray(features, dtype=np.float64)[[r for r, _ in pick]]
    raw = [v for _, v in pick]
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in raw)
    rng = np.random.default_rng(seed)
    scoring: Any = None
    if numeric and period is not None:
        if not period > 0:
            raise ValueError(f"period must be positive, got {period!r}")
        phase = 2 * np.pi * np.asarray(raw, dtype=np.float64) / float(period)
        y = np.stack([np.cos(phase), np.sin(phase)], axis=1)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        splitter = KFold(folds, shuffle=True, random_state=seed)
        task, metric, scoring = "circular regression", "mean_cos_error", _mean_cos_error
    elif numeric:
        y = np.asarray(raw, dtype=np.float64)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        splitter = KFold(folds, shuffle=True, random_state=seed)
        task, metric = "regression", "r2"
    else:
        y = np.asarray([str(v) for v in raw], dtype=object)
        classes, counts = np.unique(y, return_counts=True)
        rare = classes[counts < folds]
        if len(rare):
            # Stratified folds need every class in every fold: leave rare classes out, say so.
            log.warning("%s: left out classes with fewer than %d segments: %s", column, folds, ", ".join(rare))
            keep = ~np.isin(y, rare)
            x, y = x[keep], y[keep]
            classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"column {column!r} has fewer than two classes with at least {folds} segments: nothing to predict"
            )
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        task, metric = "classification", "balanced_accuracy"
    total = 1 + n_shuffles
    scoring = scoring or metric
    fold_scores = cross_val_score(model, x, y, cv=splitter, scoring=scoring)
    yield Progress(1, total, "fits", f"{metric} {fold_scores.mean():.3f}")
    baseline = []
    for k in range(n_shuffles):
        baseline.append(float(cross_val_score(model, x, rng.permutation(y), cv=splitter, scoring=scoring).mean()))
        yield Progress(2 + k, total, "fits", "shuffled-label baseline")
    base = np.asarray(baseline)
    score = float(fold_scores.mean())
    return PropertyScore(
        column=column,
        task=task,
        metric=metric,
        n_segments=len(y),
        folds=folds,
        score=score,
        fold_scores=tuple(float(s) for s in fold_scores),
        baseline_mean=float(base.mean()) if len(base) else float("nan"),
        baseline_std=float(base.std(ddof=1)) if len(base) > 1 else float("nan"),
        p_value=float((1 + np.sum(base >= score)) / (1 + len(base))),
    )
