"""A density term for out-of-distribution scores: Mahalanobis distance to the classes.

SNGP's Dempster-Shafer uncertainty grows with the GP's distance from the training data only
as far as its kernel lengthscale lets it. SegCLR's lengthscale leaves the classifier at
chance on our data (see ``configs.py``), and the wider one we use makes the uncertainty
measure class ambiguity far more than novelty: on the demo's held-out microglia its
segment AUROC is 0.78-0.82. The distance of an embedding from the training classes' own
distribution (class-conditional Gaussians with one shared covariance, Lee et al. 2018,
"A simple unified framework for detecting out-of-distribution samples") reaches 0.99 on
the same segments. The Gaussians are fitted in the classifier's standardised input space,
so the distance is in units of training standard deviations along the data's own axes.

The shared covariance is Ledoit-Wolf shrunk (scikit-learn): a user's few dozen labels in
64 dimensions give a singular sample covariance, and shrinkage chooses how far to pull it
towards a scaled identity from the data instead of a hand-set ridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassDensity:
    """Class-conditional Gaussians with a shared covariance, in standardised units.

    Attributes
    ----------
    means : numpy.ndarray
        float64 ``[K, D]``: each training class's mean (classes without examples left out).
    precision : numpy.ndarray
        float64 ``[D, D]``: inverse of the shared (shrunk) within-class covariance.
    """

    means: np.ndarray
    precision: np.ndarray

    def __post_init__(self) -> None:
        means, precision = np.asarray(self.means), np.asarray(self.precision)
        if means.ndim != 2 or not means.shape[0] or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(
                f"density means must be [K, D] and precision [D, D], got {means.shape} and {precision.shape}"
            )
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(precision))):
            raise ValueError("density means or precision hold NaN or infinite values")

    @property
    def num_features(self) -> int:
        return int(self.means.shape[1])

    @classmethod
    def fit(cls, standardised: np.ndarray, codes: np.ndarray) -> ClassDensity:
        """Fit to standardised embeddings ``[N, D]`` and their class codes ``[N]``."""
        from sklearn.covariance import ledoit_wolf

        data = np.asarray(standardised, dtype=np.float64)
        codes = np.asarray(codes)
        present = np.unique(codes)
        means = np.stack([data[codes == c].mean(axis=0) for c in present])
        residuals = data - means[np.searchsorted(present, codes)]
        covariance, _shrinkage = ledoit_wolf(residuals, assume_centered=True)
        # Ledoit-Wolf's target is a scaled identity, so the shrunk matrix is positive
        # definite whenever the residuals are not all zero; the floor covers that case.
        covariance += 1e-9 * np.eye(covariance.shape[0])
        return cls(means, np.linalg.inv(covariance))

    def distance(self, standardised: np.ndarray) -> np.ndarray:
        """Mahalanobis distance ``[N]`` (float64) of each row to the nearest class mean."""
        data = np.asarray(standardised, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != self.num_features:
            raise ValueError(f"density takes [N, {self.num_features}] embeddings, got {data.shape}")
        # (x - m)^T P (x - m) = |L^T x - L^T m|^2 with P = L L^T: one whitening, then plain
        # squared distances to the whitened means.
        factor = np.linalg.cholesky(self.precision)
        whitened, centres = data @ factor, self.means @ factor
        squared = (whitened**2).sum(axis=1)[:, None] - 2.0 * whitened @ centres.T + (centres**2).sum(axis=1)[None, :]
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0)) if len(data) else np.zeros(0)
