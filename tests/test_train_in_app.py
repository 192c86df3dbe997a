"""Train classifier and Suggest next through the session service, with the real compute child.

Six demo segments are labelled through the LabelStore (as a user's menu would) with
their ground-truth cell type, "excitatory" or "other" (free text: "other" is no class of
the shipped classifier); a cell-type classifier is trained in the compute child with
grouped cross-validation, accepted (every record predicted again, so cell types become
the new classes) and reverted (the shipped classifiers' predictions come back).
"""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.artefacts import find_demo_classifiers, find_demo_model, read_classifier_folder
from segscope.app.service import MIN_NODES_PER_CLASS

from test_service import EventLoop, _service


def _segments_by_type(demo_dir, per_group: int) -> list[tuple[int, np.ndarray, str]]:
    """The ``per_group`` largest excitatory segments and as many of the other types.

    Returns (segment id, a skeleton node to click (xyz nm), "excitatory" or "other").
    """
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo_dir)
    n_nodes = np.asarray(dataset.segments["n_nodes"])
    cell_types = np.asarray(dataset.segments["cell_type"]).astype(str)
    picks = []
    for group in ("excitatory", "other"):
        members = np.flatnonzero((cell_types == "excitatory") == (group == "excitatory"))
        for index in members[np.argsort(-n_nodes[members])][:per_group]:
            segment_id = int(dataset.segment_ids[int(index)])
            skeleton = dataset.skeleton(segment_id)
            picks.append((segment_id, skeleton.nodes_nm[len(skeleton.nodes_nm) // 2], group))
    return picks


@pytest.mark.slow
def test_train_accept_revert_and_suggest_with_the_compute_child(demo96_dir, tmp_path, monkeypatch):
    model, classifiers = find_demo_model(), find_demo_classifiers()
    if model is None or classifiers is None:
        pytest.skip("the demo model is not in assets/")
    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    loop = EventLoop()
    session, service, errors = _service(loop)
    state = session.state
    try:
        service.open_sources(str(demo96_dir / "image"), str(demo96_dir / "segmentation"))
        service.load_model(model)
        service.load_classifiers(read_classifier_folder(classifiers))
        loop.run_until(lambda: state.classifiers is not None or errors)
        assert not errors
        shipped_folder = state.classifiers.folder

        # Too few labels: a clear error naming what each class needs, no job.
        segments = _segments_by_type(demo96_dir, 3)
        for segment_id, click_nm, _ in segments:
            service.handle_click(segment_id, click_nm)
            loop.run_until(lambda: (state.job is not None and state.job.state == "finished") or errors)
            assert not errors
        session.labels.assign_segments("excitatory", [segments[0][0]])
        assert service.train_classifier() is None
        assert errors and f"at least {MIN_NODES_PER_CLASS} labelled" in errors[-1]
        errors.clear()

        for segment_id, _, group in segments:
            session.labels.assign_segments(group, [segment_id])
        before = {sid: (r.cell_type, r.predicted.copy()) for sid, r in state.records.items()}
        assert all(cell_type != "other" for cell_type, _ in before.values())

        reports: list[dict] = []
        job = service.train_classifier(reports.append, max_epochs=15, folds=3)
        assert job is not None, errors
        loop.run_until(lambda: reports or errors, timeout_s=600)
        assert not errors, errors
        report = reports[0]
        assert report["task"] == "cell_type" and report["n_segments"] == 6
        assert report["classes"] == ["excitatory", "other"]
        score, current = report["score"], report["current"]
        assert set(score["class_names"]) == set(report["classes"]) and len(report["classes"]) >= 2
        assert 0.0 <= score["balanced_accuracy"] <= 1.0
        # The shipped classifier never says "other": its recall there is 0.
        assert current is not None and current["recall"]["other"] == 0.0
        assert np.asarray(score["confusion"]).sum() == report["n_examples"]
        # Six labelled segments: the OOD threshold comes from the held-out ones.
        assert report["ood_threshold"] == pytest.approx(score["held_out_ood_threshold"])
        assert report["ood_threshold_from"].startswith("held-out segments")
        manifest = read_classifier_folder(report["folder"])
        assert manifest.compartment is not None and manifest.cell_type is not None  # compartments kept
        assert state.classifiers.folder == shipped_folder  # nothing swapped before Accept

        service.accept_trained(report)
        loop.run_until(
            lambda: (state.classifiers is not None and state.classifiers.folder == report["folder"]) or errors
        )
        loop.run_until(lambda: "refreshed" in state.status_message or errors)
        assert not errors, errors
        assert {r.cell_type for r in state.records.values()} <= {"excitatory", "other"}
        assert any(r.cell_type == "other" for r in state.records.values())
        for segment_id, record in state.records.items():  # the compartment classifier is the same
            np.testing.assert_array_equal(record.predicted, before[segment_id][1])
        point_rows = session.plot.rows_of(segments[0][0], state.records[segments[0][0]].node_ids)
        assert (point_rows >= 0).all()

        # Export what was accepted: a folder embed --classifiers and open --classifiers read.
        exported: list = []
        assert service.export_classifiers(tmp_path / "exported", on_done=exported.append) is not None
        loop.run_until(lambda: exported or errors)
        assert exported == [tmp_path / "exported"] and not errors
        assert read_classifier_folder(exported[0]).cell_type.class_names == ("excitatory", "other")
        service.export_classifiers(tmp_path / "exported", on_done=exported.append)  # it exists now
        loop.run_until(lambda: errors)
        assert "exists" in errors[-1] and len(exported) == 1
        errors.clear()

        # Suggest next: every node is labelled, so nothing is suggested; unlabel one segment.
        session.labels.assign_segments(None, [segments[1][0]])
        suggested: list = []
        service.suggest_next(suggested.append, count=5)
        loop.run_until(lambda: suggested or errors)
        assert not errors, errors
        assert suggested[0] and all(s == segments[1][0] for s, _ in suggested[0])
        first_row = int(session.plot.rows_of(*suggested[0][0][:1], [suggested[0][0][1]])[0])
        assert session.plot.selected_rows.tolist() == [first_row]

        assert service.revert_classifier()
        loop.run_until(lambda: (state.classifiers is not None and state.classifiers.folder == shipped_folder) or errors)
        state.show_status("")
        loop.run_until(lambda: "refreshed" in state.status_message or errors)
        assert not errors, errors
        for segment_id, record in state.records.items():
            assert record.cell_type == before[segment_id][0]
            np.testing.assert_array_equal(record.predicted, before[segment_id][1])
        assert not service.revert_classifier()
    finally:
        service.shutdown()


_REPORT = {
    "folder": "/nowhere",
    "task": "cell_type",
    "radius_nm": 10000.0,
    "classes": ["excitatory", "other"],
    "n_examples": 30,
    "n_segments": 6,
    "score": {
        "class_names": ["excitatory", "other"],
        "confusion": [[14, 1, 0], [4, 11, 0]],
        "recall": {"excitatory": 14 / 15, "other": 11 / 15},
        "balanced_accuracy": 25 / 30,
        "n_examples": 30,
        "n_segments": 6,
    },
    "current": {
        "class_names": ["excitatory", "other"],
        "confusion": [[15, 0, 0], [0, 0, 15]],
        "recall": {"excitatory": 1.0, "other": 0.0},
        "balanced_accuracy": 0.5,
        "n_examples": 30,
        "n_segments": 6,
    },
    "epochs": 12,
    "ood_threshold": 17.63,
    "ood_threshold_from": "held-out segments of the grouped cross-validation",
}


@pytest.mark.qt
def test_the_dialog_shows_both_scores_recall_and_confusion(qtbot):
    from PyQt6.QtWidgets import QDialog

    from segscope.app.views.train_dialog import TrainResultDialog

    dialog = TrainResultDialog(_REPORT)
    qtbot.addWidget(dialog)
    text = dialog.summary.text()
    assert "0.833" in text and "0.500" in text and "30 labelled nodes of 6 segments" in text
    assert "OOD score of 17.63 (threshold from the held-out segments" in text
    assert dialog.recall_table.item(1, 0).text() == "0.733" and dialog.recall_table.item(1, 1).text() == "0.000"
    assert dialog.confusion_table.columnCount() == 3
    assert [dialog.confusion_table.item(1, c).text() for c in range(3)] == ["4", "11", "0"]
    accepted: list[int] = []
    dialog.finished.connect(accepted.append)
    dialog.open()
    dialog.accept_button.click()
    assert accepted == [QDialog.DialogCode.Accepted.value]
    dialog = TrainResultDialog({**_REPORT, "current": None})
    qtbot.addWidget(dialog)
    assert "none loaded" in dialog.summary.text()
    assert dialog.recall_table.item(0, 1).text() == "—"
    dialog.open()
    dialog.keep_button.click()
    assert dialog.result() == QDialog.DialogCode.Rejected.value


@pytest.mark.slow
def test_training_without_classifiers_then_revert_unloads_them(demo96_dir, tmp_path, monkeypatch):
    model = find_demo_model()
    if model is None:
        pytest.skip("the demo model is not in assets/")
    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    loop = EventLoop()
    session, service, errors = _service(loop)
    state = session.state
    try:
        service.open_sources(str(demo96_dir / "image"), str(demo96_dir / "segmentation"))
        service.load_model(model)
        loop.run_until(lambda: state.model is not None or errors)
        segments = _segments_by_type(demo96_dir, 3)
        for segment_id, click_nm, group in segments:
            service.handle_click(segment_id, click_nm)
            loop.run_until(lambda: (state.job is not None and state.job.state == "finished") or errors)
            session.labels.assign_segments(group, [segment_id])
        assert not errors and all(r.cell_type is None for r in state.records.values())
        service.suggest_next()
        assert errors and "needs a loaded classifier" in errors[-1]
        errors.clear()

        reports: list[dict] = []
        service.train_classifier(reports.append, max_epochs=10, folds=2)
        loop.run_until(lambda: reports or errors, timeout_s=600)
        assert not errors, errors
        assert reports[0]["current"] is None
        manifest = read_classifier_folder(reports[0]["folder"])
        assert manifest.compartment is None and manifest.cell_type is not None

        service.accept_trained(reports[0])
        loop.run_until(lambda: "refreshed" in state.status_message or errors)
        assert not errors, errors
        assert all(r.cell_type in ("excitatory", "other") for r in state.records.values())

        assert service.revert_classifier()
        state.show_status("")
        loop.run_until(lambda: "refreshed" in state.status_message or errors)
        assert not errors, errors
        assert state.classifiers is None
        assert all(r.cell_type is None and r.predicted is None for r in state.records.values())
    finally:
        service.shutdown()
