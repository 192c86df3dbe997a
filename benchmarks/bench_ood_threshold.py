"""OOD flags of a classifier trained on a handful of labelled segments: where its threshold comes from.

Usage::

    python benchmarks/bench_ood_threshold.py [--segments 4 8 16] [--rounds 4] [--radius-nm 2500]

Data as in ``bench_label_efficiency.py``: the demo's context embeddings aggregated over
``--radius-nm``, with each segment's true cell type from the cached demo. A user labels
N segments of the training cells (``assets/evaluation/split.json``): N/2 astrocyte
segments "glia" and N/2 excitatory segments "neuron" (segments of at least 3 nodes), and
trains as the app does: a grouped cross-validation, then the classifier kept from all
labels. Two thresholds for its OOD flag, on the same classifier maths and labels:

* *validation*: the 95th percentile of the distances of a random validation split of the
  labelled nodes (what train_classifier does alone);
* *held-out*: the 95th percentile of the held-out segments' mean distances in the grouped
  cross-validation, estimated from their median and MAD as log-normal
  (``user_labels.robust_quantile``; what the app and ``segscope classify train`` do).

Reports, per round and as medians over rounds (paired: both see the same labels), the
threshold and the share of segments flagged (a segment is flagged when its nodes' mean
distance exceeds it): the labelled segments, the astrocyte and excitatory segments of the
evaluation cells (known kinds: each flag is false), and the microglia segments (a kind no
label covers: each flag is right).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_label_efficiency import REPO, load

from segscope.analysis.classify.user_labels import LabelledExamples, cross_validate, train_on_examples
from segscope.analysis.progress import drive


def segment_types() -> dict[int, str]:
    cache = sorted((Path.home() / ".cache" / "segscope" / "demo").glob("v*-seed0"))
    rows = pq.read_table(cache[-1] / "segments.parquet", columns=["segment_id", "cell_type"]).to_pylist()
    return {int(r["segment_id"]): r["cell_type"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--radius-nm", type=float, default=2500.0)
    args = parser.parse_args()

    x, _, cells, segments = load(args.radius_nm)
    types = segment_types()
    eval_cells = set(json.loads((REPO / "assets" / "evaluation" / "split.json").read_text())["eval_cells"])
    ids, inverse, counts = np.unique(segments, return_inverse=True, return_counts=True)
    cell_of = dict(zip(segments.tolist(), cells.tolist()))

    def pool(kind: str, evaluation: bool) -> list[int]:
        return [
            int(s)
            for s, n in zip(ids, counts)
            if types[int(s)] == kind and (cell_of[int(s)] in eval_cells) == evaluation and n >= 3
        ]

    known_test = pool("astrocyte", True) + pool("excitatory", True)
    microglia = pool("microglia", True) + pool("microglia", False)
    print(f"{len(known_test)} known-kind test segments, {len(microglia)} microglia segments")
    columns = ("threshold", "labelled", "known", "microglia")
    for n_segments in args.segments:
        results: dict[str, list[tuple[float, ...]]] = {"validation": [], "held-out": []}
        for round_ in range(args.rounds):
            rng = np.random.default_rng(100 * n_segments + round_)
            chosen = np.r_[
                rng.choice(pool("astrocyte", False), n_segments // 2, replace=False),
                rng.choice(pool("excitatory", False), n_segments // 2, replace=False),
            ]
            rows = np.flatnonzero(np.isin(segments, chosen))
            labels = np.array(["glia" if types[int(s)] == "astrocyte" else "neuron" for s in segments[rows]])
            examples = LabelledExamples(x[rows], labels, segments[rows], rows, args.radius_nm)
            score = drive(cross_validate(examples))
            line = [f"{n_segments:3d} segments, round {round_}:"]
            for name, given in (("validation", None), ("held-out", score)):
                classifier = drive(train_on_examples(examples, given))
                means = np.bincount(inverse, classifier.predict(x).ood_score) / counts
                flagged = dict(zip(ids.tolist(), means > classifier.ood_threshold))
                share = [float(np.mean([flagged[int(s)] for s in group])) for group in (chosen, known_test, microglia)]
                results[name].append((classifier.ood_threshold, *share))
                flags = f"{share[0]:.2f} {share[1]:.3f} {share[2]:.2f}"
                line.append(f"{name} {classifier.ood_threshold:7.2f} flags {flags};")
            print(" ".join(line), flush=True)
        for name, values in results.items():
            medians = [statistics.median(v[i] for v in values) for i in range(len(columns))]
            print(
                f"{n_segments:3d} segments, {name:10s} median threshold {medians[0]:.2f}; flagged: labelled "
                f"{medians[1]:.3f}, known kinds {medians[2]:.3f}, microglia {medians[3]:.3f}"
            )


if __name__ == "__main__":
    main()
