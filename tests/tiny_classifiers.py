"""Tiny classifiers for the app tests, trained on synthetic embeddings in seconds.

Run as a script (``python tests/tiny_classifiers.py FOLDER``) it trains them and writes
``compartment.npz``, ``cell_type.npz`` and ``classifiers.json`` into FOLDER; tests call
:func:`write_in_subprocess` so that TensorFlow never loads in a pytest process that also
runs QtWebEngine (they crash together, see ``app/compute_process.py``).

The cell-type classifier is an SNGP (distance-aware) trained on two Gaussian clusters far
from the origin: embeddings drawn from :func:`cell_type_cluster` are in distribution and
confidently typed, while a randomly initialised encoder's embeddings (all within a few
units of the origin) lie far from every training point and are flagged out of
distribution. The compartment classifier is linear on four clusters around the origin,
so every node gets some compartment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_FEATURES = 64
CELL_TYPES = ("pyramidal", "interneuron")
#: Where the cell-type clusters sit: far from the origin, where random encoders answer.
CELL_TYPE_OFFSET = 6.0
CELL_TYPE_NOISE = 0.5


def cell_type_cluster(count: int, class_index: int, seed: int = 0) -> np.ndarray:
    """float32 ``[count, 64]`` embeddings from the training cluster of ``CELL_TYPES[class_index]``."""
    rng = np.random.default_rng(seed + 100 * class_index)
    centre = CELL_TYPE_OFFSET * np.ones(NUM_FEATURES) + 4.0 * np.eye(NUM_FEATURES)[class_index]
    return (centre + rng.normal(0.0, CELL_TYPE_NOISE, (count, NUM_FEATURES))).astype(np.float32)


def write_classifiers(folder: Path, seed: int = 0) -> None:
    """Train and save both classifiers with their manifest (imports TensorFlow)."""
    from segscope.analysis import COMPARTMENTS
    from segscope.analysis.classify import BERT_SMALL_SNGP_V1, train_classifier
    from segscope.analysis.progress import drive

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    codes = rng.integers(0, len(COMPARTMENTS), 400)
    centres = 2.0 * np.eye(NUM_FEATURES)[: len(COMPARTMENTS)]
    points = (centres[codes] + rng.normal(0.0, 0.7, (400, NUM_FEATURES))).astype(np.float32)
    compartment = drive(
        train_classifier(
            points,
            codes,
            class_names=COMPARTMENTS,
            config="linear_v1",
            max_epochs=20,
            patience=3,
            learning_rate=1e-2,
            seed=seed,
        )
    )
    labels = np.repeat(np.arange(len(CELL_TYPES)), 200)
    points = np.concatenate([cell_type_cluster(200, k, seed) for k in range(len(CELL_TYPES))])
    tiny_sngp = BERT_SMALL_SNGP_V1.with_updates(name="tiny_sngp", num_hidden=16, num_inducing=64, batch_size=64)
    cell_type = drive(
        train_classifier(
            points,
            labels,
            class_names=CELL_TYPES,
            config=tiny_sngp,
            max_epochs=30,
            patience=5,
            learning_rate=1e-2,
            seed=seed,
        )
    )
    compartment.save(folder / "compartment.npz")
    cell_type.save(folder / "cell_type.npz")
    manifest = {
        "compartment": {"file": "compartment.npz", "radius_nm": 0},
        "cell_type": {"file": "cell_type.npz", "radius_nm": 10_000},
    }
    (folder / "classifiers.json").write_text(json.dumps(manifest, indent=1))


def write_in_subprocess(folder: Path, timeout_s: float = 240) -> Path:
    """Run :func:`write_classifiers` in a fresh interpreter; returns ``folder``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(folder)], check=True, cwd=REPO, env=env, timeout=timeout_s
    )
    return folder


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    write_classifiers(Path(sys.argv[1]))
