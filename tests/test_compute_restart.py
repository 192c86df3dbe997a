"""The real TensorFlow child killed mid-job: the job fails clearly, and the next embedding
job runs in a new child that has the encoder and classifiers loaded again, without the
app restarting. TensorFlow loads only in the child, never in this pytest process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.artefacts import read_classifier_folder
from segscope.analysis.progress import drive
from segscope.app.compute_process import ComputeProcess, ComputeProcessError, JobCancelledError, PredictedBatch
from segscope.app.controller import (
    FIRST_BATCH,
    DataSource,
    SegmentCentres,
    embed_segment_job,
    load_classifiers_job,
    load_encoder_job,
)

pytestmark = pytest.mark.timeout(600)  # two TensorFlow children start on a shared 2-core machine

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _largest_segment(folder: Path) -> tuple[int, np.ndarray]:
    """The demo segment with the most skeleton nodes, and one of its nodes (nm)."""
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(folder)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    segment_id = int(dataset.segment_ids[int(np.argmax(n_nodes))])
    skeleton = dataset.skeleton(segment_id)
    return segment_id, skeleton.nodes_nm[len(skeleton.nodes_nm) // 2]


def test_a_killed_compute_child_restarts_with_its_model_and_the_next_job_succeeds(demo96_dir):
    events: list[str] = []
    engine = ComputeProcess(on_event=events.append)
    try:
        drive(load_encoder_job(ASSETS / "demo_encoder.keras", engine))
        drive(load_classifiers_job(read_classifier_folder(ASSETS / "classifiers"), engine))
        source = DataSource.open_dataset_folder(demo96_dir)
        segment_id, click = _largest_segment(demo96_dir)
        first_pid = engine.pid

        # Centres 300 nm apart: every skeleton node, so the job has several batches to go.
        job = embed_segment_job(source, engine, segment_id, click, first_batch=1, spacing_nm=300.0)
        centres = next(job).payload
        assert isinstance(centres, SegmentCentres) and len(centres.node_ids) > 20
        first = next(job).payload  # the first batch is here, the rest are being computed
        assert isinstance(first, PredictedBatch) and len(first.indices) == 1
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(ComputeProcessError) as info:
            for _ in job:
                pass
        assert str(info.value) == "the compute process died (exit code -9); it restarts on the next request"
        assert events[0] == str(info.value)

        # The next click: a new child, the model and classifiers loaded again first; the
        # user's batch size reaches the child (the first call stays small).
        reports = []
        count = drive(
            embed_segment_job(source, engine, segment_id, click, spacing_nm=300.0, batch_size=4), reports.append
        )
        assert count == len(centres.node_ids)
        batches = [report.payload for report in reports[1:]]
        assert all(isinstance(batch, PredictedBatch) for batch in batches)
        sizes = [len(batch.indices) for batch in batches]
        assert sizes[0] == FIRST_BATCH and set(sizes[1:-1]) == {4} and 1 <= sizes[-1] <= 4
        indices = np.sort(np.concatenate([batch.indices for batch in batches]))
        np.testing.assert_array_equal(indices, np.arange(count))
        assert all(np.isfinite(batch.embeddings).all() for batch in batches)
        assert all(batch.predictions.compartments is not None for batch in batches)  # classifiers reloaded
        assert batches[-1].predictions.cell_type is not None
        assert engine.pid != first_pid and engine.restarts == 1 and engine.alive
        assert f"the compute process was restarted (pid {engine.pid}); replaying 2 set-up requests" in events
        assert len(events) == 2  # died, restarted: the replay did not fail

        # A cancelled job stops in the child, which stays the same and usable.
        job = embed_segment_job(source, engine, segment_id, click, spacing_nm=300.0, cancel=lambda: True)
        with pytest.raises(JobCancelledError, match="cancelled after"):
            drive(job)
        assert drive(embed_segment_job(source, engine, segment_id, click)) == 5
        assert engine.restarts == 1
    finally:
        engine.stop()
    assert not engine.alive


def test_a_click_is_embedded_while_a_classifier_trains(demo96_dir, tmp_path):
    """Training has a lane of its own in the child: an embedding request made while a long
    training runs comes back before the training does (it used to queue behind it)."""
    import threading

    from segscope.app.compute_process import TrainClassifier

    engine = ComputeProcess()
    try:
        drive(load_encoder_job(ASSETS / "demo_encoder.keras", engine))
        source = DataSource.open_dataset_folder(demo96_dir)
        segment_id, click = _largest_segment(demo96_dir)
        # 20,000 noisy two-class examples: several seconds per fold, far longer than a click.
        rng = np.random.default_rng(0)
        n = 20_000
        labels = np.where(rng.random(n) < 0.5, "a", "b")
        embeddings = (rng.normal(size=(n, 64)) + 0.3 * (labels == "a")[:, None]).astype(np.float32)
        request = TrainClassifier(
            task="cell_type",
            out_folder=str(tmp_path / "trained"),
            segment_ids=np.arange(n, dtype=np.uint64) // 50,
            node_ids=np.arange(n, dtype=np.int64),
            positions_nm=rng.uniform(0, 1e6, (n, 3)),
            embeddings=embeddings,
            labels=labels,
            radius_nm=0.0,
            folds=2,
        )
        order: list[str] = []
        started = threading.Event()

        def train() -> None:
            drive(engine.train_classifier(request), lambda _: started.set())
            order.append("trained")

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        assert started.wait(300)  # the first epoch is done: training is under way
        count = drive(embed_segment_job(source, engine, segment_id, click))
        order.append("embedded")
        assert count > 0
        trainer.join(600)
        assert order == ["embedded", "trained"]
    finally:
        engine.stop()
