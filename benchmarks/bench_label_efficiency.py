"""Label efficiency as a user sees it: N labelled nodes chosen by active learning vs at random.

Usage::

    python benchmarks/bench_label_efficiency.py [--counts 10 30 100 300] [--rounds 2]
                                                [--radius-nm 2500] [--pool-cells 0.5]

Data: the demo's context embeddings (``assets/demo_context.parquet``, 4,535 nodes of
1,036 segments) with each node's ground-truth compartment from the cached full demo
(``~/.cache/segscope/demo/v*/nodes.parquet``; run ``segscope demo-data`` once), node
embeddings aggregated over ``--radius-nm`` within their segment (the shipped compartment
classifier's 2500 nm). Cells are split: the labelling pool is the nodes of
``--pool-cells`` of the cells (a demo cell alone holds a few dozen context nodes, too few
for N = 300, so the "one cell" of the issue is a set of cells here), the test set every
node of the other cells.

Per round and N: *random* labels N pool nodes drawn at random; *active* starts from the
first 10 of that random order, trains, and adds the pool nodes ranked first by
:func:`segscope.analysis.classify.active.suggest_next` (SNGP uncertainty, diversity, at
most 2 per segment) until it holds N, retraining at each N. Both train BERT_SMALL_SNGP_v1
with the training defaults and report balanced accuracy (mean per-class recall) on the
test cells. Prints a table of medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from segscope.analysis.classify import train_classifier
from segscope.analysis.classify.active import suggest_next, uncertainty_scores
from segscope.analysis.classify.user_labels import aggregate_by_segment, score_predictions
from segscope.analysis.progress import drive
from segscope.analysis.projection import read_embedding_table

REPO = Path(__file__).resolve().parents[1]
CONFIG = "BERT_SMALL_SNGP_v1"


def load(radius_nm: float):
    table = read_embedding_table(REPO / "assets" / "demo_context.parquet")
    cache = sorted((Path.home() / ".cache" / "segscope" / "demo").glob("v*-seed0"))
    if not cache:
        raise SystemExit("no cached demo: run `segscope demo-data` first")
    nodes = pq.read_table(cache[-1] / "nodes.parquet").to_pylist()
    segments = pq.read_table(cache[-1] / "segments.parquet").to_pylist()
    truth = {(r["segment_id"], r["node_id"]): r["compartment"] for r in nodes}
    cell_of = {r["segment_id"]: r["cell_id"] for r in segments}
    labels = np.array([truth[(int(s), int(n))] for s, n in zip(table.segment_ids, table.node_ids)])
    cells = np.array([cell_of[int(s)] for s in table.segment_ids])
    features = table.embeddings
    if radius_nm > 0:
        features = aggregate_by_segment(table.segment_ids, table.xyz_nm, table.embeddings, radius_nm)
    return features, labels, cells, np.asarray(table.segment_ids)


def fit(x, y, seed):
    return drive(train_classifier(x, y, config=CONFIG, seed=seed, class_names=sorted(set(y.tolist()))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 30, 100, 300])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--radius-nm", type=float, default=2500.0)
    parser.add_argument("--pool-cells", type=float, default=0.5)
    args = parser.parse_args()

    x, y, cells, segments = load(args.radius_nm)
    results: dict[tuple[str, int], list[float]] = {}
    for round_index in range(args.rounds):
        rng = np.random.default_rng(round_index)
        unique_cells = rng.permutation(np.unique(cells))
        pool_cells = set(unique_cells[: int(len(unique_cells) * args.pool_cells)].tolist())
        in_pool = np.array([c in pool_cells for c in cells])
        pool, test = np.flatnonzero(in_pool), np.flatnonzero(~in_pool)
        order = rng.permutation(pool)
        print(f"round {round_index}: pool {pool.size} nodes of {len(pool_cells)} cells, test {test.size} nodes")

        def score(chosen, test=test, seed=round_index):
            if np.unique(y[chosen]).size < 2:
                return float("nan"), None
            classifier = fit(x[chosen], y[chosen], seed)
            predicted = classifier.predict(x[test]).label_names
            return score_predictions(y[test], predicted).balanced_accuracy, classifier

        for count in args.counts:
            value, _ = score(order[:count])
            results.setdefault(("random", count), []).append(value)
            print(f"  random N={count}: {value:.3f}", flush=True)
        chosen = list(order[: min(args.counts)])
        classifier = None
        for count in sorted(args.counts):
            if len(chosen) < count and classifier is not None:
                labelled = np.zeros(x.shape[0], bool)
                labelled[chosen] = True
                labelled[~in_pool] = True  # only pool nodes may be asked for
                extra = suggest_next(
                    x,
                    uncertainty_scores(classifier, x),
                    count=count - len(chosen),
                    labelled=labelled,
                    segment_ids=segments,
                    per_segment=2,
                )
                chosen.extend(extra.tolist())
            value, classifier = score(np.asarray(chosen))
            results.setdefault(("active", count), []).append(value)
            print(f"  active N={count}: {value:.3f}", flush=True)
    print(
        f"\nbalanced accuracy on the test cells, median of {args.rounds} rounds "
        f"({CONFIG}, radius {args.radius_nm:g} nm)"
    )
    print("N      random  active")
    for count in sorted(args.counts):
        random_value = statistics.median(results[("random", count)])
        active_value = statistics.median(results[("active", count)])
        print(f"{count:<6} {random_value:.3f}   {active_value:.3f}")


if __name__ == "__main__":
    main()
