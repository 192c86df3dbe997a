"""Classifiers from a user's own labels: training examples, grouped cross-validation, saving.

A user labels nodes (segment id, node id) or whole segments (segment id) of an embedding
table with free-text names. :func:`labelled_examples` turns those labels into training
examples (a segment label stands for each of the segment's embedded nodes, a node label
for its node; a node's own label wins over its segment's), optionally on embeddings
aggregated over ``radius_nm`` within each segment (SegCLR's 10-25 um aggregates for cell
types). :func:`cross_validate` estimates how well a classifier trained on them will do on
segments it has not seen: folds are whole segments, because nodes of one segment are
near-copies of each other and a node-level split would score memory, not generalisation.
:func:`write_classifier_folder` saves a classifier in the folder layout
:func:`segscope.analysis.artefacts.read_classifier_folder` reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress
from .metrics import confusion_matrix

log = logging.getLogger(__name__)

#: Folds of the grouped cross-validation (fewer when there are fewer labelled segments).
DEFAULT_FOLDS = 5
#: Held-out segments the cross-validation needs before their OOD scores set the threshold.
MIN_HELD_OUT_SEGMENTS = 3


@dataclass(frozen=True)
class LabelledExamples:
    """Training examples drawn from labels.

    Attributes
    ----------
    embeddings : numpy.ndarray
        float32 ``[N, D]`` (radius-aggregated when ``radius_nm > 0``).
    labels : numpy.ndarray
        str ``[N]``: label names.
    segment_ids : numpy.ndarray
        uint64 ``[N]``: the group of each example (cross-validation folds keep segments whole).
    rows : numpy.ndarray
        int64 ``[N]``: row of each example in the embedding table it came from.
    radius_nm : float
    """

    embeddings: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    rows: np.ndarray
    radius_nm: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(sorted({str(v) for v in self.labels}))


def aggregate_by_segment(segment_ids, xyz_nm, embeddings, radius_nm: float, rows=None) -> np.ndarray:
    """Radius aggregates ``[len(rows), D]`` (float32) of table ``rows``, each within its own segment.

    ``segment_ids`` ``[N]``, ``xyz_nm`` ``[N, 3]`` (x, y, z nm) and ``embeddings`` ``[N, D]``
    describe the whole table; only the segments of ``rows`` (default: all rows) are aggregated.
    """
    from ..aggregate import aggregate_embeddings

    segment_ids = np.asarray(segment_ids)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    rows = np.arange(segment_ids.size) if rows is None else np.asarray(rows, dtype=np.int64)
    if xyz_nm is None:
        raise ValueError("radius aggregation needs node positions (nm), and this embedding table has none")
    xyz_nm = np.asarray(xyz_nm, dtype=np.float64)
    out = np.zeros((rows.size, embeddings.shape[1]), np.float32)
    wanted = np.unique(segment_ids[rows])
    position_in_rows = {int(r): i for i, r in enumerate(rows)}
    for segment in wanted:
        members = np.flatnonzero(segment_ids == segment)
        aggregated = aggregate_embeddings(xyz_nm[members], embeddings[members], radius_nm)
        for local, row in enumerate(members):
            index = position_in_rows.get(int(row))
            if index is not None:
                out[index] = aggregated[local]
    return out


def labelled_examples(
    segment_ids,
    node_ids,
    embeddings,
    label_segment_ids,
    label_node_ids,
    label_names,
    *,
    xyz_nm=None,
    radius_nm: float = 0.0,
) -> LabelledExamples:
    """Examples of the labelled rows of an embedding table.

    Parameters
    ----------
    segment_ids, node_ids : array-like ``[N]``
        The embedding table's keys (uint64 segment ids, int64 node ids).
    embeddings : array-like ``[N, D]``
    label_segment_ids : array-like ``[L]``
    label_node_ids : array-like ``[L]`` or None
        Node id of each label, or -1 / NaN / None for a label of the whole segment.
    label_names : array-like of str ``[L]``
    xyz_nm : array-like ``[N, 3]``, optional
        Node positions (nm); needed when ``radius_nm > 0``.
    radius_nm : float
        Aggregate embeddings over this radius within each segment first (0: raw nodes).

    Raises
    ------
    ValueError
        No label matches an embedded node or segment (the message counts the misses), or
        the inputs' lengths differ.
    """
    segment_ids = np.asarray(segment_ids).astype(np.uint64)
    node_ids = np.asarray(node_ids).astype(np.int64)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not (segment_ids.size == node_ids.size == embeddings.shape[0]):
        raise ValueError(f"{segment_ids.size} segment ids, {node_ids.size} node ids, {embeddings.shape[0]} embeddings")
    names = np.asarray([str(v).strip() for v in label_names], dtype=object)
    label_segments = np.asarray(label_segment_ids).astype(np.uint64)
    if label_node_ids is None:
        label_nodes = np.full(label_segments.size, -1, np.int64)
    else:
        raw = np.asarray(label_node_ids, dtype=np.float64)
        label_nodes = np.where(np.isfinite(raw), raw, -1).astype(np.int64)
    if not (label_segments.size == label_nodes.size == names.size):
        raise ValueError("label segment ids, node ids and names must have one entry per label")
    keep = names != ""
    label_segments, label_nodes, names = label_segments[keep], label_nodes[keep], names[keep]

    row_of_node = {(int(s), int(n)): i for i, (s, n) in enumerate(zip(segment_ids, node_ids))}
    rows_of_segment: dict[int, list[int]] = {}
    for i, s in enumerate(segment_ids):
        rows_of_segment.setdefault(int(s), []).append(i)
    chosen: dict[int, str] = {}
    missing = 0
    # Segment labels first, so a node's own label overrides its segment's.
    for segment, name in zip(label_segments[label_nodes < 0], names[label_nodes < 0]):
        segment_rows = rows_of_segment.get(int(segment))
        if segment_rows is None:
            missing += 1
            continue
        chosen.update(dict.fromkeys(segment_rows, str(name)))
    for segment, node, name in zip(
        label_segments[label_nodes >= 0], label_nodes[label_nodes >= 0], names[label_nodes >= 0]
    ):
        row = row_of_node.get((int(segment), int(node)))
        if row is None:
            missing += 1
            continue
        chosen[row] = str(name)
    if not chosen:
        raise ValueError(f"none of the {names.size} labels names an embedded node or segment")
    if missing:
        log.warning("%d of %d labels name no embedded node or segment; skipped", missing, names.size)
    rows = np.asarray(sorted(chosen), dtype=np.int64)
    values = embeddings[rows]
    if radius_nm > 0:
        values = aggregate_by_segment(segment_ids, xyz_nm, embeddings, radius_nm, rows)
    return LabelledExamples(
        embeddings=values,
        labels=np.asarray([chosen[int(r)] for r in rows], dtype=str),
        segment_ids=segment_ids[rows],
        rows=rows,
        radius_nm=float(radius_nm),
    )


def grouped_folds(groups, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test-index arrays of ``min(folds, distinct groups)`` folds that keep every group whole.

    Groups are shuffled (``seed``) and dealt to the fold with the fewest examples so far,
    largest first, so folds hold similar numbers of examples.
    """
    groups = np.asarray(groups)
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    folds = min(int(folds), unique.size)
    if folds < 2:
        raise ValueError(f"cross-validation grouped by segment needs labels on at least 2 segments, got {unique.size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(unique.size)
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(folds, np.int64)
    fold_of_group = np.zeros(unique.size, np.int64)
    for group in order:
        target = int(np.argmin(sizes))
        fold_of_group[group] = target
        sizes[target] += counts[group]
    fold_of_example = fold_of_group[inverse]
    return [np.flatnonzero(fold_of_example == f) for f in range(folds)]


@dataclass(frozen=True)
class Score:
    """How predictions match labels.

    Attributes
    ----------
    class_names : tuple of str
        Rows of ``confusion`` (the labels' classes) and its first columns; a last column
        ``"(other)"`` counts predictions of a class the labels do not have.
    confusion : numpy.ndarray
        int64 ``[K, K + 1]``: row = label, column = prediction.
    recall : dict
        Per-class recall (fraction of a class's examples predicted as it).
    balanced_accuracy : float
        Mean recall over the classes.
    n_examples, n_segments : int
    held_out_ood_threshold : float or None
        From :func:`cross_validate`: the ``ood_quantile`` of the mean OOD scores of the
        held-out segments whose class the fold's classifier knew, estimated robustly
        (:func:`robust_quantile`; None with fewer than :data:`MIN_HELD_OUT_SEGMENTS`).
    """

    class_names: tuple[str, ...]
    confusion: np.ndarray
    recall: dict[str, float]
    balanced_accuracy: float
    n_examples: int
    n_segments: int
    held_out_ood_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "confusion": self.confusion.tolist(),
            "recall": self.recall,
            "balanced_accuracy": self.balanced_accuracy,
            "n_examples": self.n_examples,
            "n_segments": self.n_segments,
            "held_out_ood_threshold": self.held_out_ood_threshold,
        }

    def format(self) -> str:
        """A few lines of text: balanced accuracy, per-class recall, confusion."""
        lines = [
            (
                f"balanced accuracy {self.balanced_accuracy:.3f} over {self.n_examples} examples "
                f"of {self.n_segments} segments"
            )
        ]
        width = max(8, *(len(n) for n in self.class_names))
        for name in self.class_names:
            lines.append(f"  recall {name:<{width}} {self.recall[name]:.3f}")
        header = " " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in (*self.class_names, "(other)"))
        lines.append("confusion (rows: label, columns: prediction)")
        lines.append(header)
        for name, row in zip(self.class_names, self.confusion):
            lines.append(f"  {name:<{width}}" + " ".join(f"{int(v):>8}" for v in row))
        return "\n".join(lines)


def score_predictions(labels, predicted, segment_ids=None) -> Score:
    """Compare predicted names ``[N]`` with label names ``[N]`` (any strings)."""
    labels = np.asarray(labels, dtype=str)
    predicted = np.asarray(predicted, dtype=str)
    if labels.size == 0 or labels.shape != predicted.shape:
        raise ValueError(f"need equal non-empty label and prediction arrays, got {labels.shape} and {predicted.shape}")
    class_names = tuple(sorted(set(labels.tolist())))
    lookup = {name: i for i, name in enumerate(class_names)}
    other = len(class_names)
    truth = np.array([lookup[v] for v in labels], np.int64)
    guess = np.array([lookup.get(v, other) for v in predicted], np.int64)
    confusion = confusion_matrix(truth, guess, other + 1)[:other]
    recall = {name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)}
    return Score(
        class_names=class_names,
        confusion=confusion,
        recall=recall,
        balanced_accuracy=float(np.mean(list(recall.values()))),
        n_examples=int(labels.size),
        n_segments=int(np.unique(segment_ids).size) if segment_ids is not None else 0,
    )


def score_classifier(classifier, examples: LabelledExamples) -> Score | None:
    """How an existing classifier does on ``examples`` (None when its input width differs)."""
    if classifier is None or classifier.num_features != examples.embeddings.shape[1]:
        return None
    return score_predictions(examples.labels, classifier.predict(examples.embeddings).label_names, examples.segment_ids)


def cross_validate(
    examples: LabelledExamples,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    ood_quantile: float = 0.95,
    **train_options: Any,
) -> Generator[Progress, None, Score]:
    """Grouped (by segment) k-fold estimate of a classifier trained on ``examples``.

    Each fold trains :func:`~segscope.analysis.classify.train_classifier` (with
    ``train_options``) on the other folds' segments and predicts its own; the pooled
    predictions give one :class:`Score`. A fold whose training part holds a single class
    predicts that class. Yields one Progress per fold (unit ``"folds"``), the epoch
    messages of the fold in training passed on.

    The held-out segments' mean OOD scores (the statistic a segment is flagged by) also
    give :attr:`Score.held_out_ood_threshold`: how far *unseen segments of known classes*
    lie, which is what an OOD threshold must let pass. (A random validation split shares
    segments with training, so its scores are smaller and a threshold from them flags
    known segments, even training ones, when few are labelled. Node scores weigh large
    segments most, so one unusual big segment can set the node quantile; and the
    empirical quantile of a few segments is their largest, hence :func:`robust_quantile`.)
    """
    from ..progress import RateMeter
    from .classifier import train_classifier

    if len(examples) == 0:
        raise ValueError("no labelled examples")
    class_names = examples.class_names
    if len(class_names) < 2:
        raise ValueError(f"the labels hold one class only ({class_names[0]}); label at least two")
    test_sets = grouped_folds(examples.segment_ids, folds, seed)
    predicted = np.empty(len(examples), dtype=object)
    held_out_means: list[float] = []
    meter = RateMeter()
    for index, test in enumerate(test_sets):
        train = np.setdiff1d(np.arange(len(examples)), test)
        train_labels = examples.labels[train]
        if np.unique(train_labels).size < 2:
            predicted[test] = train_labels[0]
        else:
            generator = train_classifier(
                examples.embeddings[train], train_labels, class_names=class_names, seed=seed + index, **train_options
            )
            while True:
                try:
                    step = next(generator)
                except StopIteration as stop:
                    classifier = stop.value
                    break
                yield Progress(index, len(test_sets), "folds", f"fold {index + 1}/{len(test_sets)}: {step.message}")
            prediction = classifier.predict(examples.embeddings[test])
            predicted[test] = prediction.label_names
            # An example of a class this fold never saw is out of distribution for it.
            known = np.isin(examples.labels[test], train_labels)
            scores, owners = np.asarray(prediction.ood_score)[known], examples.segment_ids[test][known]
            held_out_means += [float(scores[owners == owner].mean()) for owner in np.unique(owners)]
        yield Progress(
            index + 1, len(test_sets), "folds", f"fold {index + 1}/{len(test_sets)} done", meter.rate(index + 1)
        )
    score = score_predictions(examples.labels, predicted.astype(str), examples.segment_ids)
    if len(held_out_means) >= MIN_HELD_OUT_SEGMENTS:
        threshold = robust_quantile(held_out_means, ood_quantile)
        score = dataclasses.replace(score, held_out_ood_threshold=threshold)
    return score


def robust_quantile(values, q: float) -> float:
    """The ``q`` quantile of positive ``values`` taken as log-normal, from their median and MAD.

    With a few values the empirical upper quantile is the largest one, so one unusual
    value sets it; the median and the median absolute deviation (scaled by 1.4826 to a
    normal's standard deviation) of the logarithms are not moved by it. Falls back to the
    largest value when the MAD is 0 (all but one alike).
    """
    from statistics import NormalDist

    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-12))
    centre = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - centre)))
    if spread <= 0.0:
        return float(np.exp(logs.max()))
    return float(np.exp(centre + NormalDist().inv_cdf(q) * spread))


def train_on_examples(
    examples: LabelledExamples, score: Score | None = None, **train_options: Any
) -> Generator[Progress, None, Any]:
    """Train the classifier to keep from all of ``examples``.

    Its OOD threshold is ``score.held_out_ood_threshold`` when the cross-validation gave one
    (see :func:`cross_validate`), else the validation quantile of
    :func:`~segscope.analysis.classify.train_classifier`; ``training_info`` records which.
    """
    from .classifier import train_classifier

    threshold = None if score is None else score.held_out_ood_threshold
    classifier = yield from train_classifier(
        examples.embeddings, examples.labels, class_names=examples.class_names, ood_threshold=threshold, **train_options
    )
    classifier.training_info["ood_threshold_from"] = (
        "held-out segments of the grouped cross-validation" if threshold is not None else "validation split"
    )
    return classifier


def write_classifier_folder(
    folder: str | os.PathLike,
    task: str,
    classifier,
    *,
    radius_nm: float,
    encoder: str | None = None,
    encoder_sha256: str | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Save ``classifier`` as ``folder/<task>.npz`` and enter it in ``folder/classifiers.json``.

    An existing manifest keeps its other task (so a compartment and a cell-type
    classifier can share a folder) unless that task was trained on another encoder, which
    is refused. Returns the manifest path.

    Raises
    ------
    ValueError
        Unknown task, a compartment class SegScope cannot colour, or an encoder conflict.
    """
    from ..artefacts import CLASSIFIER_MANIFEST, CLASSIFIER_TASKS
    from ..export.atomic import atomic_file

    if task not in CLASSIFIER_TASKS:
        raise ValueError(f"task must be one of {', '.join(CLASSIFIER_TASKS)}, got {task!r}")
    if task == "compartment":
        from segscope.analysis import compartment_codes

        compartment_codes(classifier.class_names, "these compartment labels")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / CLASSIFIER_MANIFEST
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{manifest_path} exists but is not JSON: {exc}") from exc
        for other, existing in manifest.items():
            if other != task and isinstance(existing, dict) and existing.get("encoder_sha256") and encoder_sha256:
                if existing["encoder_sha256"] != encoder_sha256:
                    raise ValueError(
                        f"{manifest_path}: its {other} classifier was trained on another encoder "
                        f"({existing['encoder_sha256'][:12]}...); write to another folder"
                    )
    classifier.save(folder / f"{task}.npz")
    entry: dict[str, Any] = {
        "file": f"{task}.npz",
        "radius_nm": float(radius_nm),
        "classes": list(classifier.class_names),
        "ood_threshold": classifier.ood_threshold,
    }
    if encoder:
        entry["encoder"] = encoder
    if encoder_sha256:
        entry["encoder_sha256"] = encoder_sha256
    if evaluation is not None:
        entry["cross_validation"] = evaluation
    manifest[task] = entry
    with atomic_file(manifest_path, force=True) as temporary:
        temporary.write_text(json.dumps(manifest, indent=1))
    return manifest_path


def labels_from_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read a label table (CSV or Parquet): ``segment_id``, optional ``node_id``, ``label``.

    ``manual_label`` stands for ``label`` (the app's export bundle ``nodes`` table); rows
    with an empty label are ignored later.

    Returns segment ids (uint64 ``[L]``), node ids (float ``[L]`` with NaN for segment
    labels, or None without the column) and names (str ``[L]``).

    Raises
    ------
    FileNotFoundError, ValueError
        No file; not CSV/Parquet; missing columns; non-integer segment ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label file {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns = {
                name: np.asarray(column.to_pylist(), dtype=object)
                for name, column in zip(table.column_names, table.columns)
            }
        elif suffix in (".csv", ".tsv", ".txt"):
            import csv

            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                records = list(reader)
                fields = reader.fieldnames or []
            columns = {name: np.asarray([r[name] for r in records], dtype=object) for name in fields}
        else:
            raise ValueError(f"label files are .csv or .parquet, got {path.name}")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable label table: {exc}") from exc
    columns = {str(k).strip(): v for k, v in columns.items()}
    if "label" not in columns and "manual_label" in columns:
        # The app's export bundle (nodes.parquet / nodes.csv) names the column manual_label.
        columns["label"] = columns["manual_label"]
    for required in ("segment_id", "label"):
        if required not in columns:
            raise ValueError(f"{path} has no {required!r} column (columns: {', '.join(columns) or 'none'})")
    try:
        segments = np.asarray([int(v) for v in columns["segment_id"]], dtype=np.uint64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{path}: segment_id must hold integers ({exc})") from exc
    nodes = None
    if "node_id" in columns:
        values = []
        for v in columns["node_id"]:
            text = "" if v is None else str(v).strip()
            try:
                values.append(float(int(float(text))) if text not in ("", "nan", "NaN") else np.nan)
            except ValueError as exc:
                raise ValueError(f"{path}: node_id must hold integers or be empty, got {v!r}") from exc
        nodes = np.asarray(values, dtype=np.float64)
    names = np.asarray(["" if v is None else str(v).strip() for v in columns["label"]], dtype=str)
    return segments, nodes, names


def summarize_labels(names: Sequence[str] | np.ndarray) -> str:
    """``"axon 12, dendrite 30"``: counts of each label."""
    unique, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)
    return ", ".join(f"{n} {c}" for n, c in zip(unique, counts))
