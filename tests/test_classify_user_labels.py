"""Classifiers from the user's labels: examples, grouped cross-validation, the CLI, active learning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from segscope.analysis.classify.active import suggest_next
from segscope.analysis.classify.user_labels import (
    cross_validate,
    grouped_folds,
    labelled_examples,
    labels_from_table,
    robust_quantile,
    score_predictions,
    train_on_examples,
)
from segscope.analysis.progress import drive

REPO = Path(__file__).resolve().parents[1]
CONTEXT = REPO / "assets" / "demo_context.parquet"
TINY = {"config": "BERT_SMALL_SNGP_v1", "max_epochs": 30, "patience": 5, "learning_rate": 1e-2}


def test_node_label_overrides_segment_label_and_unknown_labels_are_skipped():
    segments = np.array([5, 5, 5, 7, 7], np.uint64)
    nodes = np.array([0, 1, 2, 0, 1])
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    examples = labelled_examples(
        segments,
        nodes,
        emb,
        [5, 5, 7, 99],
        [np.nan, 2, 1, np.nan],
        ["spiny thing", "other", "smooth", "ghost"],
    )
    assert examples.rows.tolist() == [0, 1, 2, 4]
    assert examples.labels.tolist() == ["spiny thing", "spiny thing", "other", "smooth"]
    assert examples.class_names == ("other", "smooth", "spiny thing")
    with pytest.raises(ValueError, match="none of the 1 labels"):
        labelled_examples(segments, nodes, emb, [99], None, ["x"])


def test_radius_aggregation_stays_within_a_segment():
    segments = np.array([1, 1, 2], np.uint64)
    xyz = np.zeros((3, 3))  # all at one place: only the segment boundary separates them
    emb = np.array([[0.0], [2.0], [100.0]], np.float32)
    examples = labelled_examples(segments, [0, 1, 0], emb, [1, 2], None, ["a", "b"], xyz_nm=xyz, radius_nm=500)
    assert examples.embeddings[:, 0].tolist() == [1.0, 1.0, 100.0]


def test_grouped_folds_keep_segments_whole():
    groups = np.repeat(np.arange(10), np.arange(1, 11))
    folds = grouped_folds(groups, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(groups.size))
    owners = [set(groups[f].tolist()) for f in folds]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1 :])
    with pytest.raises(ValueError, match="at least 2 segments"):
        grouped_folds(np.zeros(5), 3)


def test_score_counts_unknown_predictions_as_misses():
    score = score_predictions(["a", "a", "b", "b"], ["a", "z", "b", "b"])
    assert score.recall == {"a": 0.5, "b": 1.0}
    assert score.balanced_accuracy == 0.75
    assert score.confusion.tolist() == [[1, 0, 1], [0, 2, 0]]


def test_cross_validation_separates_separable_segments():
    rng = np.random.default_rng(0)
    segments = np.repeat(np.arange(1, 13), 15).astype(np.uint64)
    kinds = np.where(segments % 2 == 0, "left", "right")
    emb = rng.normal(size=(segments.size, 8)).astype(np.float32)
    emb[:, 0] += np.where(kinds == "left", -4.0, 4.0)
    examples = labelled_examples(segments, np.arange(segments.size), emb, segments, None, kinds)
    score = drive(cross_validate(examples, folds=3, **TINY))
    assert score.balanced_accuracy > 0.9
    assert score.n_segments == 12


def test_robust_quantile_is_not_set_by_one_unusual_value():
    rng = np.random.default_rng(0)
    sample = np.exp(rng.normal(2.0, 0.3, size=4000))
    assert robust_quantile(sample, 0.95) == pytest.approx(np.quantile(sample, 0.95), rel=0.05)
    few = [5.0, 5.5, 6.2, 7.4, 8.1, 10.8, 12.5]
    assert robust_quantile([*few, 70.0], 0.95) < 20.0 < np.quantile([*few, 70.0], 0.95)
    assert robust_quantile([3.0, 3.0, 3.0, 9.0], 0.95) == pytest.approx(9.0), "no spread: the largest"


def test_the_ood_threshold_comes_from_held_out_segments():
    # Few segments, each a tight clump around its own point of its class's cloud: as real
    # fragments, nodes of one segment resemble each other more than other segments.
    rng = np.random.default_rng(3)
    segments = np.repeat(np.arange(1, 9), 12).astype(np.uint64)
    kinds = np.where(segments % 2 == 0, "glia", "neuron")
    centres = rng.normal(scale=1.0, size=(9, 8)) + np.where(np.arange(9) % 2 == 0, -3.0, 3.0)[:, None]
    emb = (centres[segments.astype(int)] + rng.normal(scale=0.2, size=(segments.size, 8))).astype(np.float32)
    examples = labelled_examples(segments, np.arange(segments.size), emb, segments, None, kinds)
    score = drive(cross_validate(examples, folds=4, **TINY))
    assert score.held_out_ood_threshold is not None
    assert score.to_dict()["held_out_ood_threshold"] == score.held_out_ood_threshold
    held_out = drive(train_on_examples(examples, score, **TINY))
    split = drive(train_on_examples(examples, None, **TINY))
    assert held_out.ood_threshold == pytest.approx(score.held_out_ood_threshold)
    assert held_out.training_info["ood_threshold_from"].startswith("held-out segments")
    assert split.training_info["ood_threshold_from"] == "validation split"
    # Validation nodes share segments with training nodes: their threshold is tighter.
    assert held_out.ood_threshold > split.ood_threshold
    per_segment = [held_out.predict(emb[segments == s]).ood_score.mean() for s in np.unique(segments)]
    assert max(per_segment) <= held_out.ood_threshold, "no labelled segment is flagged"
    novel = (rng.normal(size=(12, 8)) + 12.0).astype(np.float32)
    assert held_out.predict(novel).ood.all()


def test_suggest_next_prefers_uncertain_and_spreads_picks():
    rng = np.random.default_rng(0)
    # A tight clump of very uncertain near-duplicates and a spread of fairly uncertain points.
    clump = rng.normal(scale=0.01, size=(20, 4))
    spread = rng.normal(scale=3.0, size=(20, 4))
    emb = np.vstack([clump, spread])
    uncertainty = np.r_[np.full(20, 0.9), np.linspace(0.8, 0.5, 20)]
    picks = suggest_next(emb, uncertainty, count=5)
    assert picks[0] < 20  # the most uncertain comes first
    assert np.sum(picks < 20) == 1  # but only one of the clump
    labelled = np.zeros(40, bool)
    labelled[picks] = True
    again = suggest_next(emb, uncertainty, count=5, labelled=labelled)
    assert not set(again.tolist()) & set(picks.tolist())
    segments = np.repeat([1, 2], 20)
    assert len(set(segments[suggest_next(emb, uncertainty, count=2, segment_ids=segments)].tolist())) == 2


def test_suggest_next_takes_the_least_labelled_class_first():
    rng = np.random.default_rng(1)
    emb = rng.normal(scale=3.0, size=(60, 4))
    # 50 "axon" candidates, all more uncertain than the 10 "glia" ones.
    predicted = np.array(["axon"] * 50 + ["glia"] * 10)
    uncertainty = np.r_[np.linspace(0.9, 0.6, 50), np.linspace(0.5, 0.3, 10)]
    plain = suggest_next(emb, uncertainty, count=4)
    assert (predicted[plain] == "axon").all()
    balanced = suggest_next(emb, uncertainty, count=4, predicted=predicted, label_counts={"axon": 12, "glia": 1})
    assert predicted[balanced].tolist() == ["glia", "axon", "glia", "axon"]
    assert balanced[1] == plain[0]  # within a class, uncertainty still ranks
    # With the other class exhausted, the rest come from the one left.
    labelled = np.zeros(60, bool)
    labelled[50:] = True
    only = suggest_next(emb, uncertainty, count=3, labelled=labelled, predicted=predicted, label_counts={"glia": 10})
    assert (predicted[only] == "axon").all() and len(only) == 3


def test_the_first_suggestions_cover_the_data_before_uncertainty_can():
    # Three kinds of node, 60 / 25 / 5 of them, far apart; the most uncertain are all of
    # the big kind, and only 2 labels exist (fewer than one batch of 3).
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0, 0, 0], [20, 0, 0, 0], [0, 20, 0, 0]])
    kind = np.repeat([0, 1, 2], [60, 25, 5])
    emb = centres[kind] + rng.normal(scale=1.0, size=(90, 4))
    uncertainty = np.where(kind == 0, 0.9, 0.1)
    predicted = np.where(kind == 0, "axon", "glia")
    picks = suggest_next(emb, uncertainty, count=3, predicted=predicted, label_counts={"axon": 2})
    assert sorted(kind[picks].tolist()) == [0, 1, 2]  # one of each kind, the rare one included
    assert kind[picks[0]] == 0  # largest cluster first
    # Each pick is the member nearest its kind's middle, not an outlier.
    for pick in picks:
        members = emb[kind == kind[pick]]
        assert np.linalg.norm(emb[pick] - members.mean(axis=0)) < np.median(
            np.linalg.norm(members - members.mean(axis=0), axis=1)
        )
    # Once a batch's worth is labelled, the class-balanced uncertainty ranking takes over.
    later = suggest_next(emb, uncertainty, count=3, predicted=predicted, label_counts={"axon": 2, "glia": 1})
    assert kind[later[0]] != 0  # glia, the least-labelled predicted class, first


def _write_labels(path: Path, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["segment_id", "node_id", "label"])
        writer.writerows(rows)


def test_label_table_errors_are_clear(tmp_path):
    bad = tmp_path / "l.csv"
    bad.write_text("segment,label\n1,a\n")
    with pytest.raises(ValueError, match="no 'segment_id' column"):
        labels_from_table(bad)
    with pytest.raises(FileNotFoundError):
        labels_from_table(tmp_path / "none.csv")
    export = tmp_path / "nodes.csv"  # the app's export bundle names the column manual_label
    export.write_text("segment_id,node_id,manual_label\n7,3,axon\n7,4,\n")
    segments, nodes, names = labels_from_table(export)
    assert segments.tolist() == [7, 7] and nodes.tolist() == [3.0, 4.0] and names.tolist() == ["axon", ""]


@pytest.mark.slow
def test_cli_train_writes_a_folder_the_readers_accept(tmp_path, capsys):
    from segscope.analysis.artefacts import read_classifier_folder
    from segscope.analysis.classify import load_classifier
    from segscope.analysis.provenance import read_provenance
    from segscope.app.cli import main

    table = pq.read_table(CONTEXT, columns=["segment_id", "node_id", "cell_type"]).to_pylist()
    rng = np.random.default_rng(0)
    segment_type = {r["segment_id"]: r["cell_type"] for r in table}
    picked = rng.choice(sorted(segment_type), 40, replace=False)
    # Free-text names: the classifier's classes follow them.
    _write_labels(tmp_path / "labels.csv", [[s, "", f"my {segment_type[s]}"] for s in picked])
    out = tmp_path / "clf"
    argv = ["classify", "train", "--embeddings", str(CONTEXT), "--labels", str(tmp_path / "labels.csv")]
    argv += ["--target", "cell_type", "--out", str(out), "--folds", "2", "--config", "BERT_SMALL_SNGP_v1"]
    assert main([*argv, "--max-epochs", "5"]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    summary = read_classifier_folder(out)
    names = {f"my {segment_type[s]}" for s in picked}
    assert set(summary.cell_type.class_names) == names
    assert summary.cell_type.radius_nm == 10_000.0
    assert summary.encoder_sha256 == read_provenance(CONTEXT)["model_sha256"]
    manifest = json.loads((out / "classifiers.json").read_text())
    assert 0.0 <= manifest["cell_type"]["cross_validation"]["balanced_accuracy"] <= 1.0
    assert load_classifier(out / "cell_type.npz").num_features == 64

    # The app's Export classifiers: a whole copy or nothing, never over an existing folder.
    from segscope.analysis.artefacts import copy_classifier_folder

    copied = copy_classifier_folder(summary, tmp_path / "copy")
    assert read_classifier_folder(copied).cell_type.class_names == summary.cell_type.class_names
    assert (copied / "cell_type.npz").read_bytes() == (out / "cell_type.npz").read_bytes()
    with pytest.raises(FileExistsError):
        copy_classifier_folder(summary, copied)
    (out / "cell_type.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"cell_type\.npz is gone"):
        copy_classifier_folder(summary, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()

    _write_labels(tmp_path / "bad.csv", [[picked[0], "", "spiny"], [picked[1], "", "axon"]])
    argv = ["classify", "evaluate", "--embeddings", str(CONTEXT), "--labels", str(tmp_path / "bad.csv")]
    assert main([*argv, "--target", "compartment"]) == 2
    assert "compartment labels must be among" in capsys.readouterr().err
