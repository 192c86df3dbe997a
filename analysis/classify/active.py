"""Active learning: which unlabelled embeddings to label next.

The SNGP classifier knows where it is unsure: its predictive variance grows away from
the training data and its Dempster-Shafer uncertainty is high there and on class
boundaries. Ranking by uncertainty alone picks clumps (a segment's neighbouring nodes are
near-copies, so they are all uncertain together), so :func:`suggest_next` takes the most
uncertain candidates in turn and skips any whose embedding lies within ``min_distance``
of one already picked, and any in a segment that already gave ``per_segment`` picks
(farthest-point diversity over the most uncertain pool).

With few labels and imbalanced classes (axons are four fifths of the demo's nodes) the
most uncertain nodes are mostly of the common class, so a user labels axon after axon and
the rare classes stay unlearnt. Given the classifier's predicted class of every candidate,
:func:`suggest_next` therefore takes the picks class by class in turn, the class with the
fewest labels first (class-balanced uncertainty sampling, as in Aggarwal et al. 2020,
"Active learning for imbalanced datasets"). Before the user has labelled as many nodes as
one batch of suggestions, the classifier knows one or two classes and its uncertainty
cannot point at the others, so the first batch covers the data instead: the most central
candidate of each of ``count`` k-means clusters (:func:`typical_picks`; "typical" picks
win at low budgets, Hacohen et al. 2022). ``benchmarks/bench_label_efficiency.py``
compares these with random picks.
"""

from __future__ import annotations

import numpy as np


def uncertainty_scores(classifier, embeddings) -> np.ndarray:
    """Uncertainty ``[N]`` (float64) of each embedding: the classifier's Dempster-Shafer score.

    That score (``K / (K + sum exp(adjusted logits))``) already folds in the GP
    variance through the mean-field adjusted logits.
    """
    return np.asarray(classifier.predict(embeddings).uncertainty, dtype=np.float64)


def suggest_next(
    embeddings,
    uncertainty,
    *,
    count: int = 10,
    labelled=None,
    segment_ids=None,
    per_segment: int = 1,
    pool_factor: int = 20,
    min_distance: float | None = None,
    predicted=None,
    label_counts: dict | None = None,
) -> np.ndarray:
    """Indices of up to ``count`` embeddings to label next, most useful first.

    Parameters
    ----------
    embeddings : array-like ``[N, D]``
        The candidates' embeddings (as the classifier sees them).
    uncertainty : array-like ``[N]``
        Higher: more worth labelling (:func:`uncertainty_scores`).
    count : int
    labelled : array-like of bool ``[N]``, optional
        Already labelled: never suggested.
    segment_ids : array-like ``[N]``, optional
        With ``per_segment``: at most that many picks per segment (0: no limit).
    pool_factor : int
        Only the ``count * pool_factor`` most uncertain candidates are considered.
    min_distance : float, optional
        Euclidean distance (embedding units) below which a candidate counts as a
        near-duplicate of a pick. Default: the median distance of the pool's points to
        the pool's mean, times 0.25.
    predicted : array-like ``[N]``, optional
        The classifier's predicted class (name or code) of each candidate. Given, the
        picks alternate between predicted classes, least-labelled class first, each
        class's own picks ranked as above; while ``label_counts`` sum to fewer than
        ``count``, the picks are :func:`typical_picks` instead.
    label_counts : dict, optional
        Labels already given per class (with ``predicted``); classes missing count 0.

    Returns
    -------
    numpy.ndarray
        int64 ``[<= count]``. When diversity rules leave fewer than ``count``, the rest
        are filled by uncertainty alone.
    """
    if predicted is not None and sum((label_counts or {}).values()) < count:
        return typical_picks(embeddings, count, labelled=labelled)
    if predicted is not None:
        return _class_balanced(
            embeddings,
            uncertainty,
            np.asarray(predicted),
            label_counts or {},
            count=count,
            labelled=labelled,
            segment_ids=segment_ids,
            per_segment=per_segment,
            pool_factor=pool_factor,
            min_distance=min_distance,
        )
    data = np.asarray(embeddings, dtype=np.float32)
    scores = np.asarray(uncertainty, dtype=np.float64)
    if data.ndim != 2 or scores.shape != (data.shape[0],):
        raise ValueError(f"embeddings [N, D] and uncertainty [N] expected, got {data.shape} and {scores.shape}")
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    candidates = np.arange(data.shape[0])
    if labelled is not None:
        candidates = candidates[~np.asarray(labelled, dtype=bool)]
    if candidates.size == 0:
        return np.zeros(0, np.int64)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    pool = order[: max(count * pool_factor, count)]
    if min_distance is None:
        spread = np.linalg.norm(data[pool] - data[pool].mean(axis=0), axis=1)
        min_distance = 0.25 * float(np.median(spread))
    segments = None if segment_ids is None else np.asarray(segment_ids)
    picks: list[int] = []
    taken_per_segment: dict[int, int] = {}
    for index in pool:
        if len(picks) == count:
            break
        if segments is not None and per_segment > 0 and taken_per_segment.get(int(segments[index]), 0) >= per_segment:
            continue
        if picks and np.min(np.linalg.norm(data[picks] - data[index], axis=1)) < min_distance:
            continue
        picks.append(int(index))
        if segments is not None:
            taken_per_segment[int(segments[index])] = taken_per_segment.get(int(segments[index]), 0) + 1
    if len(picks) < count:
        chosen = set(picks)
        for index in order:
            if len(picks) == count:
                break
            if int(index) not in chosen:
                picks.append(int(index))
                chosen.add(int(index))
    return np.asarray(picks, dtype=np.int64)


def _class_balanced(embeddings, uncertainty, predicted, label_counts: dict, *, count: int, labelled, **ranking):
    """:func:`suggest_next` per predicted class, interleaved, least-labelled class first."""
    if predicted.shape != (np.asarray(uncertainty).shape[0],):
        raise ValueError(f"predicted must hold one class per embedding, got shape {predicted.shape}")
    free = np.ones(predicted.size, bool) if labelled is None else ~np.asarray(labelled, dtype=bool)
    classes = sorted(np.unique(predicted[free]).tolist(), key=lambda c: (label_counts.get(c, 0), str(c)))
    queues = {
        c: suggest_next(embeddings, uncertainty, count=count, labelled=~(free & (predicted == c)), **ranking)
        for c in classes
    }
    picks: list[int] = []
    while len(picks) < count and any(len(q) for q in queues.values()):
        for c in classes:
            if len(picks) < count and len(queues[c]):
                picks.append(int(queues[c][0]))
                queues[c] = queues[c][1:]
    return np.asarray(picks, dtype=np.int64)


def typical_picks(embeddings, count: int, *, labelled=None, seed: int = 0, max_points: int = 20_000) -> np.ndarray:
    """The candidate nearest the centre of each of ``count`` k-means clusters of the candidates.

    Covers the data's main kinds before any classifier knows them. Parameters as
    :func:`suggest_next`; ``max_points`` candidates at most are clustered (a seeded
    random subset of larger sets). Returns int64 indices ``[<= count]``, largest cluster
    first.
    """
    from sklearn.cluster import KMeans

    data = np.asarray(embeddings, dtype=np.float32)
    candidates = np.arange(data.shape[0])
    if labelled is not None:
        candidates = candidates[~np.asarray(labelled, dtype=bool)]
    if candidates.size <= count:
        return candidates.astype(np.int64)
    if candidates.size > max_points:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, max_points, replace=False))
    clusters = KMeans(n_clusters=count, n_init=1, random_state=seed).fit(data[candidates])
    sizes = np.bincount(clusters.labels_, minlength=count)
    picks = []
    for cluster in np.argsort(-sizes, kind="stable"):
        members = candidates[clusters.labels_ == cluster]
        if members.size:
            distance = np.linalg.norm(data[members] - clusters.cluster_centers_[cluster], axis=1)
            picks.append(int(members[np.argmin(distance)]))
    return np.asarray(picks, dtype=np.int64)
