"""SNGP classifier training time: 8,000 examples of 64-d, SegScope's default settings.

Usage::

    python benchmarks/bench_classifier.py [--examples 8000] [--dims 64] [--classes 4]
                                          [--rounds 3] [--config BERT_SNGP_v1]
                                          [--separation 0.6] [--peer eager-validation|relative-only]

Each round trains :func:`segscope.analysis.classify.train_classifier` with its defaults
(``max_epochs``, ``patience``, ``min_improvement``, 10 % stratified validation split) on
a Gaussian mixture (``--classes`` centres drawn at 0.6 sigma, unit isotropic noise: the
classes overlap, as compartments do in real embeddings), then predicts 2,000 held-out
examples. Prints, per round and as medians: wall seconds from the call to the returned
classifier (the Keras trace of the train step included), epochs run and whether early
stopping ended them, seconds per epoch, held-out balanced accuracy. Also the machine's
1-minute load average before and after, since the machine is shared.

Target (issue 13): under 30 s for 8k examples of 64-d.

``--peer eager-validation`` alternates each round with the same training whose per-epoch
validation forward pass is an eager Keras call (SegScope before it used the compiled
``predict_on_batch``), same seed, so the two are paired on the same data and load;
``--peer relative-only`` with the early-stopping rule before the absolute floor
(``min_delta=0``: an epoch improves when it lowers the loss by 1 % of itself). A
user's label set in the app is small and separable: ``--examples 100 --classes 2
--separation 2`` is one (its validation loss keeps falling, so it runs to the epoch cap).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import numpy as np

from segscope.analysis.classify import classifier as classifier_module, train_classifier
from segscope.analysis.classify.metrics import confusion_matrix
from segscope.analysis.progress import drive


def mixture(
    count: int, dims: int, classes: int, rng: np.random.Generator, separation: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(classes, dims)) * separation
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
    parser.add_argument("--separation", type=float, default=0.6, help="class centres' spread, in noise sigmas")
    parser.add_argument("--peer", choices=("eager-validation", "relative-only"), default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x, y = mixture(args.examples + 2000, args.dims, args.classes, rng, args.separation)
    train_x, train_y, test_x, test_y = x[: args.examples], y[: args.examples], x[args.examples :], y[args.examples :]
    print(f"{args.examples} examples, {args.dims}-d, {args.classes} classes, config {args.config}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    variants = ["segscope"] + ([args.peer] if args.peer else [])
    results: dict[str, dict[str, list[float]]] = {
        variant: {"s": [], "epochs": [], "s/epoch": [], "acc": []} for variant in variants
    }
    for round_index in range(args.rounds):
        for variant in variants:
            with eager_validation(variant == "eager-validation"):
                start = time.perf_counter()
                options = {"min_delta": 0.0} if variant == "relative-only" else {}
                classifier = drive(train_classifier(train_x, train_y, config=args.config, seed=round_index, **options))
                elapsed = time.perf_counter() - start
            info = classifier.training_info
            score = balanced_accuracy(test_y, classifier.predict(test_x).labels, args.classes)
            row = results[variant]
            row["s"].append(elapsed)
            row["epochs"].append(info["epochs_run"])
            row["s/epoch"].append(elapsed / info["epochs_run"])
            row["acc"].append(score)
            print(
                f"round {round_index} {variant}: {elapsed:.1f} s, {info['epochs_run']} epochs "
                f"(best {info['best_epoch']}, stopped early: {info['stopped_early']}), "
                f"{elapsed / info['epochs_run']:.3f} s/epoch, held-out balanced accuracy {score:.3f}"
            )
    for variant, row in results.items():
        print(
            f"median {variant}: {statistics.median(row['s']):.1f} s, {statistics.median(row['epochs'])} epochs, "
            f"{statistics.median(row['s/epoch']):.3f} s/epoch, balanced accuracy {statistics.median(row['acc']):.3f}"
        )
    if args.peer:
        ratios = [peer / ours for ours, peer in zip(results["segscope"]["s"], results[args.peer]["s"])]
        print(f"{args.peer} / segscope wall time, paired rounds: median {statistics.median(ratios):.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


@contextlib.contextmanager
def eager_validation(enabled: bool) -> Iterator[None]:
    """Run the per-epoch validation forward pass as an eager Keras call while active."""
    if not enabled:
        yield
        return

    class Eager:
        def __init__(self, model):
            self.model = model
            self.losses = model.losses

        def predict_on_batch(self, x):
            return self.model(x, training=False)

    original = classifier_module.validation_loss
    classifier_module.validation_loss = lambda model, *args, **kwargs: original(Eager(model), *args, **kwargs)
    try:
        yield
    finally:
        classifier_module.validation_loss = original


if __name__ == "__main__":
    main()
