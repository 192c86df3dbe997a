"""The session service end to end with no Qt: open the demo, embed, label, save, restore, export.

Runs the real compute child (TensorFlow, the shipped demo encoder and classifiers) on a
small generated demo volume. Job results are posted to a queue that this test thread
drains, as the Qt event loop does in the app, so the model is only ever mutated here.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.artefacts import find_demo_classifiers, find_demo_model, read_classifier_folder
from segscope.app.controller import DataSource
from segscope.app.service import ExportRequest, SessionService
from segscope.app.session import Session


class EventLoop:
    """A single-thread stand-in for Qt's loop: ``post`` queues, :meth:`run_until` runs."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def post(self, fn) -> None:
        self.queue.put(fn)

    def run_until(self, predicate, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met in {timeout_s} s")
            try:
                self.queue.get(timeout=min(remaining, 0.5))()
            except queue.Empty:
                pass


def _largest_segment(demo_dir: Path) -> tuple[int, np.ndarray]:
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo_dir)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    segment_id = int(dataset.segment_ids[int(np.argmax(n_nodes))])
    skeleton = dataset.skeleton(segment_id)
    return segment_id, skeleton.nodes_nm[len(skeleton.nodes_nm) // 2]


def _service(loop: EventLoop) -> tuple[Session, SessionService, list[str]]:
    session = Session()
    service = SessionService(session, post=loop.post)
    errors: list[str] = []
    session.state.events.error.connect(errors.append)
    return session, service, errors


def test_open_embed_label_save_restore_export_without_qt(demo96_dir, tmp_path):
    model, classifiers = find_demo_model(), find_demo_classifiers()
    if model is None or classifiers is None:
        pytest.skip("the demo model is not in assets/")
    loop = EventLoop()
    session, service, errors = _service(loop)
    try:
        service.open_sources(str(demo96_dir / "image"), str(demo96_dir / "segmentation"))
        service.load_model(model)
        service.load_classifiers(read_classifier_folder(classifiers))
        loop.run_until(lambda: session.state.dataset is not None or errors)
        assert not errors and session.source is not None
        loop.run_until(lambda: session.state.classifiers is not None or errors)
        assert session.state.model is not None and session.state.model.trained

        segment_id, click_nm = _largest_segment(demo96_dir)
        service.handle_click(segment_id, click_nm)
        loop.run_until(lambda: (session.state.job is not None and session.state.job.state == "finished") or errors)
        assert not errors
        record = session.state.records[segment_id]
        assert record.complete and record.n_embedded > 0
        assert record.cell_type is not None and record.predicted is not None
        # The plot model shows every embedded node with its segment's call.
        assert session.plot.n_points == record.n_embedded
        assert session.plot.cell_type_names == [record.cell_type]

        session.labels.assign_segments("my type", [segment_id])
        session.labels.assign_nodes("spine", [segment_id], [int(record.node_ids[0])])
        path = tmp_path / "s.segscope.json"
        service.save(path)
        loop.run_until(lambda: session.path is not None or errors)
        assert not errors and path.is_file()

        folder = tmp_path / "bundle"
        service.export(ExportRequest(folder, ("tables", "annotations"), ("csv",)))
        loop.run_until(lambda: service.last_export is not None or errors)
        assert not errors
        assert "segments.csv" in service.last_export.files["tables"]
        segments_csv = (folder / "segments.csv").read_text()
        assert str(segment_id) in segments_csv and "my type" in segments_csv
        assert json.loads((folder / "annotations" / "info").read_text())["annotation_type"] == "POINT"
    finally:
        service.shutdown()

    # A second service restores the saved session: data, records, labels, current segment.
    loop2 = EventLoop()
    session2, service2, errors2 = _service(loop2)
    try:
        service2.open_session(path)
        loop2.run_until(lambda: bool(session2.state.records) or errors2)
        assert not errors2
        restored = session2.state.records[segment_id]
        np.testing.assert_array_equal(restored.embeddings, record.embeddings)
        assert session2.state.segment is not None and session2.state.segment.segment_id == segment_id
        assert session2.labels.segment_label(segment_id) == "my type"
        assert session2.plot.n_points == record.n_embedded
        assert session2.path == path
    finally:
        service2.shutdown()


def test_a_killed_compute_child_fails_its_job_and_the_next_click_succeeds(demo96_dir):
    import os
    import signal

    model, classifiers = find_demo_model(), find_demo_classifiers()
    if model is None or classifiers is None:
        pytest.skip("the demo model is not in assets/")
    loop = EventLoop()
    session, service, errors = _service(loop)
    statuses: list[str] = []
    session.state.events.status.connect(statuses.append)
    service.spacing_nm = 300.0  # dense centres: several batches, so the kill lands mid-job
    try:
        service.open_source(DataSource.open_dataset_folder(demo96_dir))
        service.load_model(model)
        service.load_classifiers(read_classifier_folder(classifiers))
        loop.run_until(lambda: session.state.classifiers is not None or errors)
        segment_id, click_nm = _largest_segment(demo96_dir)

        service.handle_click(segment_id, click_nm)
        loop.run_until(lambda: (session.state.segment is not None and session.state.segment.n_embedded > 0) or errors)
        os.kill(service.engine.pid, signal.SIGKILL)
        loop.run_until(lambda: session.state.job.state in ("failed", "finished"))
        assert session.state.job.state == "failed", "the kill landed after the job ended"
        assert any("compute process died" in e for e in errors)

        errors.clear()
        service.handle_click(segment_id, click_nm)
        loop.run_until(lambda: session.state.job.state in ("failed", "finished"))
        assert session.state.job.state == "finished" and not errors
        record = session.state.records[segment_id]
        assert record.complete and record.cell_type is not None  # the classifiers were reloaded
        assert any("restarted" in s for s in statuses)
    finally:
        service.shutdown()


def test_export_writes_the_labels_of_context_points(tmp_path):
    """Labels made on the plot's context points (no record) are exported, with positions."""
    from segscope.analysis.export import read_node_table, read_segment_table
    from segscope.app.state import DatasetSummary

    loop = EventLoop()
    session, service, errors = _service(loop)
    try:
        session.state.set_dataset(
            DatasetSummary(
                "demo", "precomputed://file:///i", "precomputed://file:///s", None, (8.0, 8.0, 40.0), (64, 64, 64)
            )
        )
        xyz = np.column_stack([np.arange(4) * 100.0, np.zeros(4), np.zeros(4)])
        rows = session.plot.add_points(
            [7, 7, 8, 8], [1, 2, 1, 2], xyz, np.ones((4, 3)), compartments=[0, 1, 2, 255], background=True
        )
        session.plot.set_point_predictions(
            rows, cell_types=["excitatory"] * 2 + ["astrocyte"] * 2, ood_scores=[0.1] * 4
        )
        session.labels.assign_nodes("spine", [7], [2])
        session.labels.assign_segments("glia!", [8])
        summary = service.export_summary()
        assert summary is not None and "3 labelled context nodes of 2 more segments" in summary

        folder = tmp_path / "bundle"
        service.export(ExportRequest(folder, ("tables",), ("csv",)))
        session.labels.assign_nodes("late", [7], [1])  # after the snapshot: not exported
        loop.run_until(lambda: service.last_export is not None or errors)
        assert not errors
        nodes, _ = read_node_table(folder / "nodes.csv")
        assert list(zip(nodes.segment_id.tolist(), nodes.node_id.tolist(), nodes.manual_label.tolist())) == [
            (7, 2, "spine"),
            (8, 1, "glia!"),
            (8, 2, "glia!"),
        ]
        np.testing.assert_allclose(nodes.xyz_nm[0], [100.0, 0.0, 0.0])
        assert nodes.compartment.tolist() == [1, 2, -1]
        segments, _ = read_segment_table(folder / "segments.csv")
        assert segments.cell_type.tolist() == ["excitatory", "astrocyte"]
        assert segments.manual_label.tolist() == ["", "glia!"]
    finally:
        service.shutdown()


def test_old_training_folders_are_pruned_but_folders_in_use_are_kept(tmp_path):
    import os

    from segscope.analysis.artefacts import ClassifierSummary
    from segscope.app.service import KEEP_TRAINED_FOLDERS, prune_trained_folders

    loop = EventLoop()
    session, service, _errors = _service(loop)
    try:
        root = tmp_path / "trained-classifiers"
        folders = []
        for age in range(KEEP_TRAINED_FOLDERS + 4):
            folder = root / f"run-{age:02d}"
            folder.mkdir(parents=True)
            os.utime(folder, (1e9 - age * 60, 1e9 - age * 60))  # run-00 newest
            folders.append(folder)
        session.state.set_classifiers(ClassifierSummary(folder=str(folders[-1])))  # the oldest, loaded
        service.previous_classifiers.append(ClassifierSummary(folder=str(folders[-2])))  # on the Revert stack
        prune_trained_folders(root, service.classifier_folders_in_use())
        left = sorted(p.name for p in root.iterdir())
        expected = [f.name for f in folders[:KEEP_TRAINED_FOLDERS]] + [folders[-2].name, folders[-1].name]
        assert left == sorted(expected)
    finally:
        service.shutdown()
