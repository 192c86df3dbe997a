"""SNGP posterior maths in numpy: predictive variance, mean-field logits, Dempster-Shafer.

Shapes: random features ``phi`` ``[N, M]``, precision ``[M, M]``, logits ``[N, K]``,
variances ``[N]``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.special import expit, logsumexp, softmax

MEAN_FIELD_LAMBDA: float = 3.0 / math.pi**2
"""Mean-field factor lambda of SegCLR's ``adjust_logits`` (the alternative is pi/8)."""


def posterior_covariance(precision: np.ndarray, ridge: float) -> np.ndarray:
    """``ridge * (ridge I + P)^-1`` ``[M, M]`` float64, through a Cholesky factorisation.

    This is the factor of the predictive variance ``ridge * phi (ridge I + P)^-1 phi^T``.
    ``P`` (the accumulated ``phi^T phi``) is positive semi-definite and the ridge makes the
    sum positive definite, so Cholesky is the cheap, stable way to invert it.
    """
    precision = np.asarray(precision, dtype=np.float64)
    if precision.ndim != 2 or precision.shape[0] != precision.shape[1]:
        raise ValueError(f"precision must be square [M, M], got {precision.shape}")
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    size = precision.shape[0]
    system = ridge * np.eye(size) + 0.5 * (precision + precision.T)
    try:
        factor = cho_factor(system, lower=True, check_finite=True)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise ValueError(f"precision matrix is not positive semi-definite/finite: {exc}") from exc
    return ridge * cho_solve(factor, np.eye(size))


def predictive_variance(features: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """``diag(phi C phi^T)`` ``[N]`` for random features ``phi`` ``[N, M]`` and ``C`` ``[M, M]``.

    ``C`` comes from :func:`posterior_covariance`, so the ridge factor is already in it.
    """
    features = np.asarray(features)
    product = features @ covariance.astype(features.dtype, copy=False)
    # Round-off can make a tiny variance negative; a variance is never below 0.
    return np.maximum(np.einsum("nm,nm->n", product, features), 0.0)


def mean_field_logits(logits: np.ndarray, variance: np.ndarray, lam: float = MEAN_FIELD_LAMBDA) -> np.ndarray:
    """Mean-field adjusted logits ``logit / sqrt(1 + lam * var)`` ``[N, K]``."""
    logits = np.asarray(logits)
    variance = np.asarray(variance)
    if logits.ndim != 2 or variance.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, K] and variance [N], got {logits.shape} and {variance.shape}")
    return logits / np.sqrt(1.0 + lam * variance)[:, None]


def dempster_shafer(logits: np.ndarray) -> np.ndarray:
    """Dempster-Shafer uncertainty ``K / (K + sum_k exp(logit_k))`` ``[N]``, in (0, 1).

    Computed as ``sigmoid(log K - logsumexp(logits))``, the same value without overflow for
    large logits.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, K], got {logits.shape}")
    return expit(math.log(logits.shape[1]) - logsumexp(logits, axis=1))


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the class axis of ``[N, K]`` logits."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)
