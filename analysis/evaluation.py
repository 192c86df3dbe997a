"""Evaluate an encoder on a dataset's held-out cells: subcompartments, cell types, OOD.

The protocol (``segscope evaluate``):

1. Centres: every segment's skeleton thinned to SegCLR's spacing (1.5 um); each centre
   keeps its ground-truth subcompartment and its segment's cell type.
2. Embeddings of all centres with the encoder under test and with a baseline: the same
   architecture randomly initialised (seeded), so the comparison isolates what training
   taught.
3. Classifiers (SegCLR's SNGP maths, ``segscope.analysis.classify``) trained on the *training*
   cells of the split only:
   * subcompartments on node embeddings (optionally radius-aggregated),
   * cell types on radius-aggregated embeddings (10 um by default), over the known types
     (held-out types never appear in classifier training).
4. Scores on the *evaluation* cells (never seen by the encoder or the classifiers):
   subcompartment accuracy and macro-F1 (nodes of known-type cells); cell-type accuracy
   per segment (mean of its nodes' probabilities) on known types; out-of-distribution
   AUROC of the segment's mean OOD score (the classifier's: Mahalanobis distance to the
   training classes, see ``classify/density.py``), held-out types (positive) against
   known types, with the AUROC of SegCLR's Dempster-Shafer uncertainty beside it; and a
   label-efficiency curve: subcompartment accuracy against the number of labelled
   training nodes, repeated class-guaranteed subsamples, for the encoder and the baseline.

Positions are nm; embeddings are ``[N, D]`` float32 rows, one per centre.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS
from segscope.analysis.progress import Progress, drive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of an evaluation run (distances in nm)."""

    spacing_nm: float = 1500.0
    compartment_radius_nm: float = 0.0
    cell_type_radius_nm: float = 10_000.0
    compartment_classifier: str = "BERT_SMALL_SNGP_v1"
    cell_type_classifier: str = "BERT_SMALL_SNGP_v1"
    label_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    repeats: int = 5
    efficiency_max_epochs: int = 200
    seed: int = 0


@dataclass
class CentreTable:
    """The evaluation centres of a dataset (one row per centre)."""

    segment_ids: np.ndarray  # uint64 [N]
    node_ids: np.ndarray  # int64 [N], index into the segment's skeleton nodes
    xyz_nm: np.ndarray  # float64 [N, 3]
    compartment: np.ndarray  # int64 [N], index into COMPARTMENTS (-1 unknown)
    cell_type: np.ndarray  # str [N]
    is_eval: np.ndarray  # bool [N], the segment's cell is an evaluation cell

    def segments(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(segment_id, node_ids, centres_nm)`` per segment, in table order."""
        out = []
        _ids, starts = np.unique(self.segment_ids, return_index=True)
        for start in np.sort(starts):
            rows = np.flatnonzero(self.segment_ids == self.segment_ids[start])
            out.append((int(self.segment_ids[start]), self.node_ids[rows], self.xyz_nm[rows]))
        return out


def centre_table(dataset, split, spacing_nm: float) -> CentreTable:
    """Thinned skeleton centres of every split segment, with ground truth."""
    from segscope.analysis.centres import thin_skeleton

    eval_ids = set(split.segment_ids(dataset, "eval").tolist())
    train_ids = set(split.segment_ids(dataset, "train").tolist())
    cols: dict[str, list] = {k: [] for k in ("seg", "node", "xyz", "comp", "type", "eval")}
    for segment_id in dataset.segment_ids:
        sid = int(segment_id)
        if sid not in eval_ids and sid not in train_ids:
            continue
        skeleton = dataset.skeleton(sid)
        keep = thin_skeleton(skeleton.nodes_nm, skeleton.edges, spacing_nm)
        codes = skeleton.compartment[keep].astype(np.int64)
        codes[codes >= len(COMPARTMENTS)] = -1
        cols["seg"].append(np.full(len(keep), sid, dtype=np.uint64))
        cols["node"].append(keep.astype(np.int64))
        cols["xyz"].append(skeleton.nodes_nm[keep])
        cols["comp"].append(codes)
        cols["type"].append(np.full(len(keep), dataset.cell_type(sid), dtype=object))
        cols["eval"].append(np.full(len(keep), sid in eval_ids))
    return CentreTable(
        np.concatenate(cols["seg"]),
        np.concatenate(cols["node"]),
        np.concatenate(cols["xyz"]),
        np.concatenate(cols["comp"]),
        np.concatenate(cols["type"]).astype(str),
        np.concatenate(cols["eval"]),
    )


def _fit(embeddings, labels, class_names, config_name, seed, max_epochs=1000):
    from segscope.analysis.classify import train_classifier

    return drive(
        train_classifier(
            embeddings, labels, class_names=class_names, config=config_name, seed=seed, max_epochs=max_epochs
        )
    )


def segment_scores(segment_ids: np.ndarray, probabilities: np.ndarray, score: np.ndarray):
    """Per segment: mean class probabilities ``[S, K]`` and mean of a node score ``[S]``.

    Returns ``(ids [S], probabilities [S, K], score [S])``, ids sorted.
    """
    ids, inverse = np.unique(segment_ids, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    probs = np.stack([np.bincount(inverse, weights=probabilities[:, k]) for k in range(probabilities.shape[1])], 1)
    return ids, probs / counts[:, None], np.bincount(inverse, weights=score) / counts


def _compartment_task(centres: CentreTable, embeddings: np.ndarray, known: np.ndarray, config: EvaluationConfig):
    from segscope.analysis.classify import accuracy, confusion_matrix, macro_f1

    labelled = centres.compartment >= 0
    train = labelled & ~centres.is_eval
    test = labelled & centres.is_eval & known
    classifier = _fit(
        embeddings[train], centres.compartment[train], list(COMPARTMENTS), config.compartment_classifier, config.seed
    )
    predicted = classifier.predict(embeddings[test]).labels
    truth = centres.compartment[test]
    return classifier, {
        "train_nodes": int(train.sum()),
        "eval_nodes": int(test.sum()),
        "accuracy": accuracy(truth, predicted),
        "macro_f1": macro_f1(truth, predicted, num_classes=len(COMPARTMENTS)),
        "confusion": confusion_matrix(truth, predicted, num_classes=len(COMPARTMENTS)).tolist(),
    }


def _cell_type_task(centres: CentreTable, aggregated: np.ndarray, known_types: list[str], config: EvaluationConfig):
    from segscope.analysis.classify import accuracy, auroc, confusion_matrix

    is_known = np.isin(centres.cell_type, known_types)
    train = ~centres.is_eval & is_known
    codes = np.array([known_types.index(t) if t in known_types else -1 for t in centres.cell_type])
    classifier = _fit(aggregated[train], codes[train], known_types, config.cell_type_classifier, config.seed)
    test = centres.is_eval
    prediction = classifier.predict(aggregated[test])
    ids, probs, unc = segment_scores(centres.segment_ids[test], prediction.probabilities, prediction.ood_score)
    seg_type = {int(s): t for s, t in zip(centres.segment_ids[test], centres.cell_type[test])}
    types = np.array([seg_type[int(s)] for s in ids])
    known_seg = np.isin(types, known_types)
    truth = np.array([known_types.index(t) for t in types[known_seg]])
    predicted = probs[known_seg].argmax(axis=1)
    node_known = is_known[test]
    result = {
        "classes": known_types,
        "train_nodes": int(train.sum()),
        "eval_segments_known": int(known_seg.sum()),
        "eval_segments_held_out": int((~known_seg).sum()),
        "segment_accuracy": accuracy(truth, predicted),
        "node_accuracy": accuracy(codes[test][node_known], prediction.labels[node_known]),
        "confusion": confusion_matrix(truth, predicted, num_classes=len(known_types)).tolist(),
        "ood_threshold": classifier.ood_threshold,
        "ood_score": classifier.ood_score_kind,
    }
    if (~known_seg).any() and known_seg.any():
        result["ood_auroc"] = auroc(unc, ~known_seg)
        _, _, ds = segment_scores(centres.segment_ids[test], prediction.probabilities, prediction.uncertainty)
        result["ood_auroc_dempster_shafer"] = auroc(ds, ~known_seg)
        result["ood_flagged_held_out"] = float(np.mean(unc[~known_seg] > classifier.ood_threshold))
        result["ood_flagged_known"] = float(np.mean(unc[known_seg] > classifier.ood_threshold))
    result["_segment_ood_score"] = (unc, ~known_seg)
    return classifier, result


def _label_efficiency(
    centres: CentreTable, embeddings: np.ndarray, known: np.ndarray, config: EvaluationConfig, rng_seed: int
):
    """Accuracy on evaluation nodes vs number of labelled training nodes ``{n: [acc per repeat]}``."""
    from segscope.analysis.classify import accuracy, class_guaranteed_subsample

    labelled = centres.compartment >= 0
    train_rows = np.flatnonzero(labelled & ~centres.is_eval)
    test = labelled & centres.is_eval & known
    rng = np.random.default_rng(rng_seed)
    curve = {}
    for n in config.label_counts:
        if n > len(train_rows):
            break
        scores = []
        for repeat in range(config.repeats):
            pick = train_rows[class_guaranteed_subsample(centres.compartment[train_rows], n, rng)]
            classifier = _fit(
                embeddings[pick],
                centres.compartment[pick],
                list(COMPARTMENTS),
                config.compartment_classifier,
                config.seed + repeat,
                config.efficiency_max_epochs,
            )
            scores.append(accuracy(centres.compartment[test], classifier.predict(embeddings[test]).labels))
        curve[int(n)] = scores
    return curve


def evaluate(
    dataset,
    encoder,
    split,
    out_dir,
    *,
    baseline_encoder=None,
    config: EvaluationConfig = EvaluationConfig(),
) -> Generator[Progress, None, dict]:
    """Run the evaluation protocol; yields Progress per stage, returns the metrics dict.

    Writes ``metrics.json``, ``label_efficiency.png``, ``confusion.png`` and ``ood.png`` to
    ``out_dir`` and keeps the trained classifiers in the returned dict under
    ``"_classifiers"`` (``compartment``, ``cell_type``) for the caller to save.
    """
    from segscope.analysis.inference import stream_node_embeddings

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    centres = centre_table(dataset, split, config.spacing_nm)
    known_types = sorted(set(centres.cell_type.tolist()) - set(split.holdout_types))
    known = np.isin(centres.cell_type, known_types)
    stages = 6 if baseline_encoder is not None else 4
    yield Progress(
        0, stages, "stages", f"{len(centres.segment_ids)} centres in {len(np.unique(centres.segment_ids))} segments"
    )

    encoders = {"trained": encoder}
    if baseline_encoder is not None:
        encoders["baseline"] = baseline_encoder
    embedded = {}
    for name, enc in encoders.items():

        def relay(report, name=name):
            return Progress(report.done, report.total, report.unit, f"embedding ({name}) {report.message}", report.rate)

        gen = stream_node_embeddings(enc, dataset.image, dataset.segmentation, centres.segments())
        while True:
            try:
                report = next(gen)
            except StopIteration as stop:
                nodes = stop.value
                break
            yield relay(report)
        # stream_node_embeddings walks segments in table order; map rows back.
        order = _row_order(centres, nodes)
        embedded[name] = nodes.embeddings[order]
    done = len(encoders)
    yield Progress(done, stages, "stages", "embedded")

    from segscope.analysis.inference import NodeEmbeddings

    def features(name, radius):
        emb = embedded[name]
        if radius and radius > 0:
            return NodeEmbeddings(centres.segment_ids, centres.node_ids, centres.xyz_nm, emb).aggregated(radius)
        return emb

    metrics: dict = {
        "config": asdict(config),
        "dataset": str(dataset.path),
        "split": asdict(split),
        "known_types": known_types,
        "held_out_types": list(split.holdout_types),
    }
    classifiers = {}
    for name in encoders:
        comp_classifier, comp = _compartment_task(centres, features(name, config.compartment_radius_nm), known, config)
        type_classifier, types = _cell_type_task(
            centres, features(name, config.cell_type_radius_nm), known_types, config
        )
        metrics[name] = {"subcompartment": comp, "cell_type": types}
        if name == "trained":
            classifiers = {"compartment": comp_classifier, "cell_type": type_classifier}
        done += 1
        yield Progress(done, stages, "stages", f"classifiers ({name})")

    curves = {}
    for name in encoders:
        curves[name] = _label_efficiency(
            centres, features(name, config.compartment_radius_nm), known, config, config.seed
        )
        metrics[name]["label_efficiency"] = {str(n): s for n, s in curves[name].items()}
        done += 1
        yield Progress(done, stages, "stages", f"label efficiency ({name})")
    if "baseline" in curves:
        points = sorted(set(curves["trained"]) & set(curves["baseline"]))
        metrics["trained_beats_baseline_everywhere"] = bool(
            all(np.median(curves["trained"][n]) > np.median(curves["baseline"][n]) for n in points)
        )

    _plot(out, metrics, curves)
    for name in encoders:
        metrics[name]["cell_type"].pop("_segment_ood_score", None)
    metrics["seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["_classifiers"] = classifiers
    return metrics


def _row_order(centres: CentreTable, nodes) -> np.ndarray:
    """Indices into ``nodes`` that line its rows up with ``centres``' rows."""
    key_nodes = {(int(s), int(n)): i for i, (s, n) in enumerate(zip(nodes.segment_ids, nodes.node_ids))}
    return np.array([key_nodes[(int(s), int(n))] for s, n in zip(centres.segment_ids, centres.node_ids)])


def _plot(out: Path, metrics: dict, curves: dict) -> None:
    """Label-efficiency curve, confusion matrices and OOD score histogram as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        ns = sorted(curve)
        med = [np.median(curve[n]) for n in ns]
        lo = [np.min(curve[n]) for n in ns]
        hi = [np.max(curve[n]) for n in ns]
        ax.plot(ns, med, marker="o", label=f"{name} encoder")
        ax.fill_between(ns, lo, hi, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training nodes")
    ax.set_ylabel("subcompartment accuracy (held-out cells)")
    ax.set_title("Label efficiency (median, min-max over repeats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png")
    plt.close(fig)

    trained = metrics["trained"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120)
    for ax, (title, task, names) in zip(
        axes,
        [
            ("subcompartments (nodes)", trained["subcompartment"], list(COMPARTMENTS)),
            ("cell types (segments)", trained["cell_type"], trained["cell_type"]["classes"]),
        ],
    ):
        matrix = np.asarray(task["confusion"], dtype=float)
        ax.imshow(matrix / np.maximum(matrix.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "confusion.png")
    plt.close(fig)

    unc, held_out = trained["cell_type"]["_segment_ood_score"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    top = 1.0 if trained["cell_type"]["ood_score"] == "dempster_shafer" else float(np.max(unc, initial=1.0)) * 1.02
    bins = np.linspace(0, top, 31).tolist()
    ax.hist(unc[~held_out], bins=bins, alpha=0.6, label="known types", density=True)
    if held_out.any():
        ax.hist(unc[held_out], bins=bins, alpha=0.6, label="held-out type(s)", density=True)
    ax.axvline(trained["cell_type"]["ood_threshold"], color="k", ls="--", label="OOD threshold")
    ax.set_xlabel(
        "segment mean Dempster-Shafer uncertainty"
        if trained["cell_type"]["ood_score"] == "dempster_shafer"
        else "segment mean Mahalanobis distance to the training classes"
    )
    ax.set_ylabel("density")
    title = "Out-of-distribution score on held-out cells"
    if "ood_auroc" in trained["cell_type"]:
        title += f" (AUROC {trained['cell_type']['ood_auroc']:.3f})"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ood.png")
    plt.close(fig)
