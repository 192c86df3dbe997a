"""Manual labels: assignment, undo/redo, effective labels, persistence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segscope.app.labels import MAX_LABEL_LENGTH, LabelChange, LabelStore, validate_label


@pytest.fixture
def store() -> LabelStore:
    return LabelStore()


def test_assign_nodes_and_read_back(store):
    assert store.assign_nodes("axon", [5, 5, 7], [1, 2, 1])
    labels = store.node_labels([5, 5, 5, 7, 7, 9], [1, 2, 3, 1, 2, 1])
    assert labels.dtype == object
    assert labels.tolist() == ["axon", "axon", "", "axon", "", ""]
    assert store.n_labelled_nodes == 3
    assert store.undo_text == 'label 3 nodes "axon"'


def test_one_segment_id_applies_to_every_node(store):
    store.assign_nodes("dendrite", 12, np.arange(4))
    assert store.node_labels(12, np.arange(6)).tolist() == ["dendrite"] * 4 + ["", ""]
    ids, labels = store.segment_node_labels(12)
    assert ids.tolist() == [0, 1, 2, 3] and labels.tolist() == ["dendrite"] * 4


def test_undo_redo_and_new_command_clears_redo(store):
    store.assign_nodes("axon", 1, [1, 2])
    store.assign_nodes("soma", 1, [2, 3])
    assert store.node_labels(1, [1, 2, 3]).tolist() == ["axon", "soma", "soma"]

    assert store.undo()
    assert store.node_labels(1, [1, 2, 3]).tolist() == ["axon", "axon", ""]
    assert store.can_redo and store.redo_text == 'label 2 nodes "soma"'
    assert store.undo()
    assert store.node_labels(1, [1, 2, 3]).tolist() == ["", "", ""]
    assert not store.can_undo and store.undo_text == ""
    assert not store.undo()

    assert store.redo()
    assert store.node_labels(1, [1, 2, 3]).tolist() == ["axon", "axon", ""]
    store.assign_segments("pyramidal", 1)  # a new command forks history
    assert not store.can_redo and store.redo_text == "" and not store.redo()
    assert store.undo_text == 'label segment 1 "pyramidal"'


def test_removing_labels_is_undoable(store):
    store.assign_nodes("axon", 3, [1, 2, 3])
    assert store.assign_nodes(None, 3, [2, 3, 4])  # node 4 had none: only 2 change
    assert store.undo_text == "remove labels of 2 nodes"
    assert store.node_labels(3, [1, 2, 3]).tolist() == ["axon", "", ""]
    assert store.assign_nodes("", 3, [1])
    assert store.n_labelled_nodes == 0 and store.labels() == []
    store.undo()
    store.undo()
    assert store.node_labels(3, [1, 2, 3]).tolist() == ["axon"] * 3


def test_commands_that_change_nothing_record_nothing(store):
    assert not store.assign_nodes(None, 1, [1, 2])
    assert not store.assign_nodes("axon", 1, [])
    assert not store.assign_segments(None, [4])
    assert not store.can_undo
    store.assign_nodes("axon", 1, [1, 2])
    store.assign_segments("glia", [4])
    store.undo()  # leaves a redo
    assert not store.assign_nodes("axon", [1, 1], [2, 1])
    assert not store.assign_segments(None, 4)
    assert store.undo_text == 'label 2 nodes "axon"' and store.can_redo
    # a no-op with a new label does not make it a known label
    assert not store.assign_nodes("never", 1, [])
    assert store.labels() == ["axon"]


def test_repeated_pairs_count_once(store):
    assert store.assign_nodes("axon", [2, 2, 2], [7, 7, 8])
    assert store.n_labelled_nodes == 2 and store.undo_text == 'label 2 nodes "axon"'


def test_effective_labels_prefer_node_then_segment(store):
    store.assign_segments("basket", [10, 11])
    store.assign_nodes("axon", 10, [1])
    effective = store.effective_node_labels([10, 10, 11, 12], [1, 2, 1, 1])
    assert effective.tolist() == ["axon", "basket", "basket", ""]
    assert store.node_labels([10, 10], [1, 2]).tolist() == ["axon", ""]
    assert store.segment_label(10) == "basket" and store.segment_label(12) == ""
    assert store.n_labelled_segments == 2
    assert store.undo_text == 'label 1 node "axon"'
    store.undo()
    store.undo()
    assert store.effective_node_labels([10], [1]).tolist() == [""]
    assert store.n_labelled_segments == 0


def test_labels_in_first_use_order(store):
    store.assign_nodes("soma", 1, [1])
    store.assign_segments("pyramidal", 1)
    store.assign_nodes("axon", 1, [2])
    store.assign_nodes("soma", 1, [3])
    assert store.labels() == ["soma", "pyramidal", "axon"]
    store.assign_nodes("axon", 1, [1])  # soma still used by node 3
    store.assign_nodes("axon", 1, [3])
    assert store.labels() == ["pyramidal", "axon"]
    store.undo()
    assert store.labels() == ["soma", "pyramidal", "axon"]


def test_labels_are_stripped_and_validated(store):
    assert validate_label("  axon ") == "axon"
    assert validate_label(None) == "" and validate_label("") == ""
    store.assign_nodes(" axon ", 1, [1])
    assert store.node_labels(1, [1]).tolist() == ["axon"]
    for bad, why in (
        ("   ", "only whitespace"),
        ("x" * (MAX_LABEL_LENGTH + 1), "at most"),
        ("ax\non", "control characters"),
        ("tab\there", "control characters"),
        (3, "must be a string"),
    ):
        with pytest.raises(ValueError, match=why):
            store.assign_nodes(bad, 1, [2])
        with pytest.raises(ValueError, match=why):
            store.assign_segments(bad, 1)
    assert store.n_labelled_nodes == 1 and store.n_labelled_segments == 0


def test_bad_ids_are_refused(store):
    with pytest.raises(ValueError, match="nonzero"):
        store.assign_nodes("axon", [0], [1])
    with pytest.raises(ValueError, match="nonzero"):
        store.assign_segments("axon", [-3])
    with pytest.raises(ValueError, match="2 segment ids for 3 node ids"):
        store.assign_nodes("axon", [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="integer"):
        store.assign_nodes("axon", 1, [1.5])
    with pytest.raises(ValueError, match="integer"):
        store.assign_segments("axon", [2**64])
    with pytest.raises(ValueError, match="int64"):
        store.assign_nodes("axon", 1, np.array([2**63], dtype=np.uint64))
    with pytest.raises(ValueError, match="nonzero"):
        store.node_labels([0], [1])
    assert not store.can_undo


def test_large_uint64_segment_ids(store):
    big = np.array([2**64 - 1, 2**63 + 5], dtype=np.uint64)
    store.assign_nodes("axon", big, [1, 1])
    store.assign_segments("glia", big[:1])
    assert store.effective_node_labels(big, [1, 2]).tolist() == ["axon", ""]
    assert store.effective_node_labels(big, [2, 2]).tolist() == ["glia", ""]
    restored = LabelStore.from_dict(json.loads(json.dumps(store.to_dict())))
    assert restored.node_labels(big, [1, 1]).tolist() == ["axon", "axon"]
    assert restored.segment_label(2**64 - 1) == "glia"


def test_subscribers_hear_what_changed(store):
    heard: list[LabelChange] = []
    unsubscribe = store.subscribe(heard.append)
    store.assign_nodes("axon", [4, 5], [1, 2])
    store.assign_segments("basket", [6])
    store.undo()
    store.redo()
    store.assign_nodes("axon", 4, [1])  # no change: no event
    assert [c.action for c in heard] == ["assign", "assign", "undo", "redo"]
    assert heard[0].node_segment_ids.tolist() == [4, 5] and heard[0].node_ids.tolist() == [1, 2]
    assert heard[0].affected_segment_ids == {4, 5}
    assert heard[1].segment_ids == (6,) and len(heard[1].node_ids) == 0
    assert heard[2].text == 'label segment 6 "basket"' and heard[2].affected_segment_ids == {6}
    unsubscribe()
    store.undo()
    assert len(heard) == 4


def test_a_failing_subscriber_does_not_stop_others(store):
    heard = []

    def broken(change):
        raise RuntimeError("view bug")

    store.subscribe(broken)
    store.subscribe(heard.append)
    assert store.assign_segments("x", 1)
    assert len(heard) == 1


def test_reset_drops_labels_and_history(store):
    heard = []
    store.assign_nodes("axon", 1, [1, 2])
    store.assign_segments("glia", 3)
    store.subscribe(heard.append)
    store.reset()
    assert store.n_labelled_nodes == 0 and store.n_labelled_segments == 0 and store.labels() == []
    assert not store.can_undo and not store.can_redo
    assert heard[0].action == "reset" and heard[0].affected_segment_ids == {1, 3}


def test_to_dict_round_trip(store):
    store.assign_nodes("soma", [8, 8, 9], [3, 1, 2])
    store.assign_segments("pyramidal", [9])
    store.assign_nodes("axon", 8, [5])
    data = store.to_dict()
    text = json.dumps(data)  # JSON-safe
    assert data == {
        "version": 1,
        "labels": ["soma", "pyramidal", "axon"],
        "segments": [[9, "pyramidal"]],
        "nodes": [[8, 1, "soma"], [8, 3, "soma"], [8, 5, "axon"], [9, 2, "soma"]],
    }
    restored = LabelStore.from_dict(json.loads(text))
    assert restored.to_dict() == data
    assert restored.labels() == ["soma", "pyramidal", "axon"]
    assert not restored.can_undo
    assert restored.effective_node_labels([8, 8, 9, 9], [3, 4, 2, 7]).tolist() == ["soma", "", "soma", "pyramidal"]
    # the restored store keeps working
    assert restored.assign_nodes("axon", 8, [1]) and restored.undo()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "JSON object"),
        ({"version": 2}, "version"),
        ({"colour": []}, "unknown keys"),
        ({"nodes": {}}, "must be a list"),
        ({"nodes": [[1, 2]]}, r"nodes\[0\] must be"),
        ({"nodes": [[1, 2, "a"], [0, 2, "a"]]}, r"nodes\[1\]: segment id 0"),
        ({"nodes": [[1, 2.0, "a"]]}, r"nodes\[0\]: ids must be integers"),
        ({"nodes": [[1, True, "a"]]}, r"nodes\[0\]: ids must be integers"),
        ({"nodes": [[1, 2, "a"], [1, 2, "b"]]}, r"nodes\[1\]: node 2 of segment 1 is labelled twice"),
        ({"nodes": [[1, 2, ""]]}, r"nodes\[0\]: empty label"),
        ({"segments": [[2**64, "a"]]}, r"segments\[0\]: segment id"),
        ({"segments": [[3, "a"], [3, "b"]]}, r"segments\[1\]: segment 3 is labelled twice"),
        ({"segments": [[3, "a\x00"]]}, r"segments\[0\]: label .* control"),
        ({"labels": [None]}, r"labels\[0\]"),
    ],
)
def test_from_dict_names_the_bad_entry(data, message):
    with pytest.raises(ValueError, match=message):
        LabelStore.from_dict(data)


def test_node_labels_of_100k_points_match_a_per_point_lookup(store):
    rng = np.random.default_rng(0)
    segments = rng.integers(1, 40, size=100_000).astype(np.uint64)
    nodes = rng.integers(0, 50_000, size=100_000)
    store.assign_nodes("axon", segments[::2], nodes[::2])
    store.assign_segments("basket", [7])
    labels = store.node_labels(segments, nodes)
    assert (labels[::2] == "axon").all()
    effective = store.effective_node_labels(segments, nodes)
    unlabelled = labels == ""
    assert (effective[unlabelled & (segments == 7)] == "basket").all()
    assert (effective[unlabelled & (segments != 7)] == "").all()
    # an independent (slow) reference on a sample
    pairs = set(zip(segments[::2].tolist(), nodes[::2].tolist()))
    sample = rng.choice(100_000, 500, replace=False)
    expected = ["axon" if (s, n) in pairs else "" for s, n in zip(segments[sample].tolist(), nodes[sample].tolist())]
    assert labels[sample].tolist() == expected


def test_load_dict_replaces_labels_in_place_and_notifies():
    store = LabelStore()
    store.assign_segments("old", [5])
    changes = []
    store.subscribe(changes.append)
    saved = LabelStore()
    saved.assign_nodes("axon", [7, 7], [1, 2])
    saved.assign_segments("glia", [8])
    store.load_dict(saved.to_dict())
    assert store.to_dict() == saved.to_dict()
    assert not store.can_undo and store.segment_label(5) == ""
    assert [c.action for c in changes] == ["load"]  # one refresh, naming old and new keys
    assert changes[0].affected_segment_ids == frozenset({5, 7, 8})
    with pytest.raises(ValueError, match="nodes"):
        store.load_dict({"version": 1, "nodes": [[7, 1]]})
    assert store.to_dict() == saved.to_dict()  # a bad document changes nothing
