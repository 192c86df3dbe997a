"""Session state: selection, centres, streamed embeddings, predictions and events."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.app.state import JobStatus, SessionState


@pytest.fixture
def state():
    return SessionState()


def record_events(state, *names):
    seen = []
    for name in names:
        state.subscribe(name, lambda *args, _n=name: seen.append((_n, args)))
    return seen


def test_selection_then_centres_then_streamed_embeddings(state):
    seen = record_events(state, "segment", "centres", "embeddings")
    state.select_segment(42, [1.0, 2.0, 3.0])
    assert state.segment.segment_id == 42 and state.segment.n_centres == 0
    state.set_centres(42, [5, 0, 9], np.arange(9.0).reshape(3, 3), skeleton_node_count=30, ground_truth=[0, 1, 255])
    assert state.segment.n_centres == 3 and state.segment.n_embedded == 0
    state.add_embeddings(42, [2], np.ones((1, 4)))
    state.add_embeddings(42, [0, 1], np.zeros((2, 4)))
    segment = state.segment
    assert segment.complete
    assert segment.embeddings.shape == (3, 4) and segment.embeddings[2, 0] == 1.0
    assert [name for name, _ in seen] == ["segment", "centres", "embeddings", "embeddings"]
    assert seen[-1][1][1].tolist() == [0, 1]


def test_partial_embeddings_stay_nan_and_unmarked(state):
    state.select_segment(7)
    state.set_centres(7, [0, 1, 2], np.zeros((3, 3)))
    state.add_embeddings(7, [1], np.ones((1, 2)))
    assert state.segment.embedded.tolist() == [False, True, False]
    assert np.isnan(state.segment.embeddings[0]).all() and not state.segment.complete


def test_data_for_another_segment_is_ignored(state):
    state.select_segment(1)
    state.set_centres(1, [0], np.zeros((1, 3)))
    state.select_segment(2)
    assert state.set_centres(1, [0, 1], np.zeros((2, 3))) is False
    assert state.add_embeddings(1, [0], np.ones((1, 2))) is False
    assert state.segment.segment_id == 2 and state.segment.n_centres == 0


@pytest.mark.parametrize(
    ("indices", "values", "message"),
    [
        ([3], np.ones((1, 2)), "centre indices"),
        ([0, 1], np.ones((1, 2)), "must be"),
    ],
)
def test_bad_embedding_batches_are_refused(state, indices, values, message):
    state.select_segment(3)
    state.set_centres(3, [0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=message):
        state.add_embeddings(3, indices, values)


def test_embeddings_before_centres_are_refused(state):
    state.select_segment(3)
    with pytest.raises(ValueError, match="before its centres"):
        state.add_embeddings(3, [0], np.ones((1, 2)))


def test_compartment_counts_separate_truth_and_predictions(state):
    state.select_segment(9)
    state.set_centres(9, [0, 1, 2, 3], np.zeros((4, 3)), ground_truth=[0, 0, 2, 255])
    truth = state.segment.compartment_counts("ground_truth")
    assert truth == {"axon": 2, "dendrite": 0, "soma": 1, "glia": 0, "unlabelled": 1}
    assert state.segment.compartment_counts("predicted") is None


def test_predictions_are_validated_and_announced(state):
    seen = record_events(state, "predictions")
    state.select_segment(9)
    state.set_centres(9, [0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="compartment codes"):
        state.set_predictions(9, predicted=[0, 7])
    with pytest.raises(ValueError, match="probability"):
        state.set_predictions(9, cell_type="astrocyte", cell_type_probability=1.5)
    state.set_predictions(
        9, predicted=[1, 255], cell_type="astrocyte", cell_type_probability=0.8, ood_score=0.9, ood_flagged=True
    )
    segment = state.segment
    assert segment.compartment_counts("predicted")["dendrite"] == 1
    assert (segment.cell_type, segment.cell_type_probability, segment.ood_flagged) == ("astrocyte", 0.8, True)
    assert len(seen) == 1


def test_job_updates_only_touch_the_current_job(state):
    seen = record_events(state, "job")
    state.set_job(JobStatus(5, "segment 1", "running", total=10))
    state.update_job(4, done=3)  # an older job: ignored
    state.update_job(5, done=4, rate=2.0)
    assert state.job.done == 4 and state.job.rate == 2.0 and state.job.active
    assert len(seen) == 2


def test_a_failing_subscriber_does_not_stop_the_others(state):
    calls = []
    state.subscribe("status", lambda message: 1 / 0)
    state.subscribe("status", calls.append)
    state.show_status("hello")
    assert calls == ["hello"]


def test_unknown_events_and_ids_are_refused(state):
    with pytest.raises(KeyError, match="unknown event"):
        state.subscribe("selection", print)
    with pytest.raises(ValueError, match="nonzero uint64"):
        state.select_segment(0)


def test_batch_predictions_fill_only_their_rows_and_node_batches_carry_them():
    state = SessionState()
    state.select_segment(9)
    state.set_centres(9, [10, 11, 12], np.arange(9.0).reshape(3, 3))
    batches = []
    state.subscribe("node_batch", batches.append)
    state.add_embeddings(9, [2], np.ones((1, 4)))
    assert state.set_predictions(9, indices=[2], predicted=[3], probability=[0.7], uncertainty=[0.2])
    assert state.announce_batch(9, [2])
    record = state.segment
    assert record.predicted.tolist() == [255, 255, 3]
    assert np.isnan(record.predicted_probability[:2]).all() and record.predicted_probability[2] == np.float32(0.7)
    assert record.compartment_counts("predicted") == {"axon": 0, "dendrite": 0, "soma": 0, "glia": 1, "unlabelled": 2}
    (batch,) = batches
    assert batch.segment_id == 9 and batch.indices.tolist() == [2] and batch.node_ids.tolist() == [12]
    np.testing.assert_array_equal(batch.positions_nm, [[6.0, 7.0, 8.0]])
    assert batch.predicted.tolist() == [3] and batch.embedding_source == "computed"
    # Rows not yet embedded are not announced; bad input is refused.
    assert not state.announce_batch(9, [0])
    with pytest.raises(ValueError, match="indices"):
        state.set_predictions(9, indices=[3], predicted=[0])
    with pytest.raises(ValueError, match="predictions for 2 indices"):
        state.set_predictions(9, indices=[0, 1], predicted=[0])
    with pytest.raises(ValueError, match="probability values"):
        state.set_predictions(9, indices=[0], predicted=[0], probability=[0.1, 0.2])
    # New centres (the segment embedded again) forget the old predictions.
    state.set_centres(9, [10], np.zeros((1, 3)))
    assert state.segment.predicted is None and state.segment.cell_type is None


def test_classifiers_loaded_follows_the_summary():
    from segscope.analysis.artefacts import ClassifierInfo, ClassifierSummary

    state = SessionState()
    seen = []
    state.subscribe("classifiers", seen.append)
    assert not state.classifiers_loaded
    info = ClassifierInfo("cell_type", "c.npz", ("a", "b"), 10_000.0, 0.3, 64, "linear_v1")
    state.set_classifiers(ClassifierSummary("dir", cell_type=info), "ok")
    assert state.classifiers_loaded and seen[-1].cell_type is info
    state.set_classifiers(None, "gone")
    assert not state.classifiers_loaded and state.classifiers_message == "gone"
