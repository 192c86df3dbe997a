"""SNGP classifier training time: 8,000 examples of 64-d, SegScope's default settings.

Usage::

    python benchmarks/bench_classifier.py [--examples 8000] [--dims 64] [--classes 4]
                                          [--rounds 3] [--config BERT_SNGP_v1]

Each round trains :func:`segscope.analysis.classify.train_classifier` with its defaults
(``max_epochs``, ``patience``, ``min_improvement``, 10 % stratified validation split) on
a Gaussian mixture (``--classes`` centres drawn at 0.6 sigma, unit isotropic noise: the
classes overlap, as compartments do in real embeddings), then predicts 2,000 held-out
examples. Prints, per round and as medians: wall seconds from the call to the returned
classifier (the Keras trace of the train step included), epochs run and whether early
stopping ended them, seconds per epoch, held-out balanced accuracy. Also the machine's
1-minute load average before and after, since the machine is shared.

Target (issue 13): under 30 s for 8k examples of 64-d.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from segscope.analysis.classify import train_classifier
from segscope.analysis.classify.metrics import confusion_matrix
from segscope.analysis.progress import drive


def mixture(count: int, dims: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(classes, dims)) * 0.6
    labels = rng.integers(0, classes, count)
    return (centres[labels] + rng.normal(size=(count, dims))).astype(np.float32), labels


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    counts = confusion_matrix(truth, predicted, classes)
    return float(np.mean(np.diag(counts) / np.maximum(counts.sum(axis=1), 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="BERT_SNGP_v1")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x, y = mixture(args.examples + 2000, args.dims, args.classes, rng)
    train_x, train_y, test_x, test_y = x[: args.examples], y[: args.examples], x[args.examples :], y[args.examples :]
    print(f"{args.examples} examples, {args.dims}-d, {args.classes} classes, config {args.config}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    seconds, epochs, per_epoch, scores = [], [], [], []
    for round_index in range(args.rounds):
        start = time.perf_counter()
        classifier = drive(train_classifier(train_x, train_y, config=args.config, seed=round_index))
        elapsed = time.perf_counter() - start
        info = classifier.training_info
        score = balanced_accuracy(test_y, classifier.predict(test_x).labels, args.classes)
        seconds.append(elapsed)
        epochs.append(info["epochs_run"])
        per_epoch.append(elapsed / info["epochs_run"])
        scores.append(score)
        print(
            f"round {round_index}: {elapsed:.1f} s, {info['epochs_run']} epochs (best {info['best_epoch']}, "
            f"stopped early: {info['stopped_early']}), {elapsed / info['epochs_run']:.2f} s/epoch, "
            f"held-out balanced accuracy {score:.3f}"
        )
    print(
        f"median: {statistics.median(seconds):.1f} s, {statistics.median(epochs)} epochs, "
        f"{statistics.median(per_epoch):.2f} s/epoch, balanced accuracy {statistics.median(scores):.3f}"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
