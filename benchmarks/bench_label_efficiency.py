"""Label efficiency as a user sees it: N labelled nodes chosen by active learning vs at random.

Usage::

    python benchmarks/bench_label_efficiency.py [--counts 10 30 100 300] [--rounds 6]
                                                [--batch 10] [--radius-nm 2500] [--pool-cells 0.5]

Data: the demo's context embeddings (``assets/demo_context.parquet``, 4,535 nodes of
1,036 segments) with each node's ground-truth compartment from the cached full demo
(``~/.cache/segscope/demo/v*/nodes.parquet``; run ``segscope demo-data`` once), node
embeddings aggregated over ``--radius-nm`` within their segment (the shipped compartment
classifier's 2500 nm). Cells are split: the labelling pool is the nodes of
``--pool-cells`` of the cells (a demo cell alone holds a few dozen context nodes, too few
for N = 300, so the "one cell" of the issue is a set of cells here), the test set every
node of the other cells.

Per round and N: *random* labels N pool nodes drawn at random. The active strategies start
from the first 10 of that random order and, as a user of *Suggest next* does, label the
``--batch`` pool nodes ranked first and retrain, until they hold N:
*uncertainty* ranks by SNGP uncertainty with diversity and at most 2 picks per segment
(:func:`segscope.analysis.classify.active.suggest_next`); *balanced* (what the app does)
takes the same ranking per predicted class, least-labelled class first, after a first
batch of cluster-typical picks while fewer nodes than one batch are labelled. All train
BERT_SMALL_SNGP_v1 with the training defaults and report balanced accuracy (mean
per-class recall) on the test cells. Prints each round (rounds are paired: the same split
and start for every strategy) and medians, and how many rounds each strategy beat random.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from segscope.analysis.classify import train_classifier
from segscope.analysis.classify.active import suggest_next
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
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=10, help="labels between retrainings")
    parser.add_argument("--radius-nm", type=float, default=2500.0)
    parser.add_argument("--pool-cells", type=float, default=0.5)
    args = parser.parse_args()

    x, y, cells, segments = load(args.radius_nm)
    strategies = ("random", "uncertainty", "balanced")
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
            results.setdefault(("random", count), []).append(score(order[:count])[0])
        for strategy in strategies[1:]:
            chosen = list(order[: min(args.counts)])
            value, classifier = score(np.asarray(chosen))
            for count in sorted(args.counts):
                while len(chosen) < count and classifier is not None:
                    labelled = np.zeros(x.shape[0], bool)
                    labelled[chosen] = True
                    labelled[~in_pool] = True  # only pool nodes may be asked for
                    prediction = classifier.predict(x)
                    extra = suggest_next(
                        x,
                        prediction.uncertainty,
                        count=min(args.batch, count - len(chosen)),
                        labelled=labelled,
                        segment_ids=segments,
                        per_segment=2,
                        predicted=prediction.label_names if strategy == "balanced" else None,
                        label_counts=Counter(y[chosen].tolist()),
                    )
                    if not len(extra):
                        break
                    chosen.extend(extra.tolist())
                    value, classifier = score(np.asarray(chosen))
                results.setdefault((strategy, count), []).append(value)
        for strategy in strategies:
            row = "  ".join(f"N={n}: {results[(strategy, n)][-1]:.3f}" for n in args.counts)
            print(f"  {strategy:<11} {row}", flush=True)
    print(
        f"\nbalanced accuracy on the test cells, median of {args.rounds} rounds "
        f"({CONFIG}, radius {args.radius_nm:g} nm, retrained every {args.batch} labels)"
    )
    print("N      " + "  ".join(f"{s:<11}" for s in strategies) + "  rounds beating random (uncertainty, balanced)")
    for count in sorted(args.counts):
        medians = "  ".join(f"{statistics.median(results[(s, count)]):<11.3f}" for s in strategies)
        wins = [
            sum(a > r for a, r in zip(results[(s, count)], results[("random", count)], strict=True))
            for s in strategies[1:]
        ]
        print(f"{count:<6} {medians}  {wins[0]}/{args.rounds}, {wins[1]}/{args.rounds}")


if __name__ == "__main__":
    main()
