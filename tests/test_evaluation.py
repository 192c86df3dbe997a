"""Evaluation protocol: held-out bookkeeping, segment scores, an end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.evaluation import EvaluationConfig, centre_table, evaluate, segment_scores
from segscope.analysis.progress import drive
from segscope.analysis.training import CellSplit


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.synthetic import generate_dataset

    return open_dataset(
        drive(generate_dataset(tmp_path_factory.mktemp("eval") / "demo", seed=2, size_vox=(96, 96, 96)))
    )


def test_segment_scores_average_their_nodes():
    ids = np.array([7, 3, 7, 3, 3], np.uint64)
    probs = np.array([[1, 0], [0, 1], [0, 1], [0.5, 0.5], [1, 0]], float)
    unc = np.array([0.1, 0.2, 0.3, 0.4, 0.6])
    seg, p, u = segment_scores(ids, probs, unc)
    assert seg.tolist() == [3, 7]
    assert np.allclose(p, [[0.5, 0.5], [0.5, 0.5]]) and np.allclose(u, [0.4, 0.2])


def test_centre_table_keeps_evaluation_cells_apart(small_demo):
    split = CellSplit.for_dataset(small_demo, 0.3, holdout_types=["microglia"], seed=0)
    table = centre_table(small_demo, split, spacing_nm=1500.0)
    eval_ids = set(split.segment_ids(small_demo, "eval").tolist())
    assert set(table.segment_ids[table.is_eval].tolist()) == eval_ids & set(table.segment_ids.tolist())
    assert not set(table.segment_ids[~table.is_eval].tolist()) & eval_ids
    # Held-out types only ever appear among evaluation rows.
    assert not np.any((table.cell_type == "microglia") & ~table.is_eval)
    assert set(table.compartment.tolist()) <= set(range(-1, len(COMPARTMENTS)))
    # Every centre is a skeleton node of its segment.
    for sid, node, xyz in zip(table.segment_ids[:20], table.node_ids[:20], table.xyz_nm[:20]):
        assert np.allclose(small_demo.skeleton(int(sid)).nodes_nm[node], xyz)


@pytest.mark.slow
def test_evaluate_end_to_end_writes_metrics_and_plots(small_demo, tmp_path):
    from segscope.analysis.encoder import SEGCLR_LITE, build_encoder

    tiny = SEGCLR_LITE.with_updates(
        input_size_vox=(17, 17, 17),
        stem_filters=4,
        stage_filters=(8,),
        stage_blocks=(1,),
        stage_strides=(1,),
        bottleneck_widths=(16,),
        projection_widths=(8,),
    )
    split = CellSplit.for_dataset(small_demo, 0.3, holdout_types=["microglia"], seed=0)
    config = EvaluationConfig(label_counts=(8,), repeats=1, efficiency_max_epochs=5)
    metrics = drive(
        evaluate(
            small_demo,
            build_encoder(tiny, seed=1),
            split,
            tmp_path,
            baseline_encoder=build_encoder(tiny, seed=2),
            config=config,
        )
    )
    assert set(metrics["_classifiers"]) == {"compartment", "cell_type"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("trained", "baseline"):
        assert 0.0 <= saved[name]["subcompartment"]["macro_f1"] <= 1.0
        assert "microglia" not in saved[name]["cell_type"]["classes"]
        assert list(saved[name]["label_efficiency"]) == ["8"]
    for png in ("label_efficiency.png", "confusion.png", "ood.png"):
        assert (tmp_path / png).stat().st_size > 1000
