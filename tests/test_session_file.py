"""Session files: JSON documents, the records sidecar, atomic saves, autosave and recovery."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import segscope.app.session_file as session_file
from segscope.app.session_file import (
    RECORD_FIELDS,
    AutosaveManager,
    DatasetRef,
    PrecomputedRef,
    RecoveryCandidate,
    SessionDocument,
    SessionFileError,
    load_records,
    load_session,
    save_records,
    save_session,
    session_paths,
)
from segscope.app.state import SegmentRecord


def make_document(**changes) -> SessionDocument:
    values = dict(
        dataset=DatasetRef(
            name="demo",
            image_url="precomputed://gs://bucket/image",
            segmentation_url="relative/seg",
            skeletons_url=None,
        ),
        precomputed=PrecomputedRef(
            location="gs://bucket/embeddings", coordinates="voxels", num_shards=10_000, bytewidth=64
        ),
        model_path="/models/encoder.keras",
        classifiers_folder=None,
        current_segment=2**64 - 1,
        selected_segments=[5, 7],
        selected_nodes=[[5, 0], [7, 12]],
        labels={"classes": ["axon", "dendrite"], "assignments": {"5": "axon"}},
        plot={"colour_mode": "compartment", "tool": "lasso", "view_range": ((-1.5, 2.0), (0.0, 3.25))},
    )
    values.update(changes)
    return SessionDocument(**values)


def full_record(segment_id: int = 11, n: int = 4, d: int = 3, seed: int = 0) -> SegmentRecord:
    """A record with every field set, NaN rows included (a half-embedded segment)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, d)).astype(np.float32)
    embeddings[-1] = np.nan
    embedded = np.ones(n, dtype=bool)
    embedded[-1] = False
    return SegmentRecord(
        segment_id=segment_id,
        click_nm=np.array([1.5, 2.5, 3.5]),
        node_ids=np.arange(n, dtype=np.int64) * 3,
        positions_nm=rng.uniform(0, 1e5, size=(n, 3)),
        skeleton_node_count=10 * n,
        ground_truth=np.array([0, 1, 255, 2][:n] + [3] * max(0, n - 4), dtype=np.uint8),
        embeddings=embeddings,
        embedded=embedded,
        embedding_source="precomputed",
        predicted=np.full(n, 1, dtype=np.uint8),
        predicted_probability=np.linspace(0.2, 0.9, n).astype(np.float32),
        predicted_uncertainty=np.full(n, np.nan, dtype=np.float32),
        cell_type="pyramidal",
        cell_type_probability=0.75,
        cell_type_probabilities={"pyramidal": 0.75, "basket": 0.1 + 0.2},  # 0.30000000000000004
        ood_score=0.125,
        ood_flagged=False,
        ood_threshold=0.5,
        prediction_note="partial: 3 of 4 nodes",
    )


def bare_record(segment_id: int = 12) -> SegmentRecord:
    """A freshly selected segment: everything optional is None."""
    return SegmentRecord(segment_id=segment_id)


def assert_records_equal(actual: list[SegmentRecord], expected: list[SegmentRecord]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for f in dataclasses.fields(SegmentRecord):
            a, b = getattr(got, f.name), getattr(want, f.name)
            if isinstance(b, np.ndarray):
                assert isinstance(a, np.ndarray), f.name
                assert a.dtype == b.dtype and a.shape == b.shape, f.name
                assert np.array_equal(a, b, equal_nan=b.dtype.kind == "f"), f.name
            else:
                assert a == b and type(a) is type(b), (f.name, a, b)


# -- the JSON document -----------------------------------------------------------------


def test_document_round_trips_through_json_and_normalises_paths():
    document = make_document()
    # Local paths become absolute, URLs stay as given, tuples become lists.
    assert document.dataset.segmentation_url == os.path.abspath("relative/seg")
    assert document.dataset.image_url == "precomputed://gs://bucket/image"
    assert document.plot["view_range"] == [[-1.5, 2.0], [0.0, 3.25]]

    text = document.to_json()
    data = json.loads(text)
    assert data["format"] == "segscope-session" and data["version"] == 1
    assert data["dataset"]["skeletons_url"] is None
    assert data["precomputed"]["coordinates"] == "voxels"

    again = SessionDocument.from_json(text, "x.segscope.json")
    assert again == document
    assert again.to_json() == text


def test_document_accepts_numpy_values_from_the_app():
    document = make_document(
        current_segment=np.uint64(9),
        selected_segments=np.array([1, 2]),
        plot={
            "view_range": np.array([[0.0, 1.0], [2.0, 3.0]]).tolist(),
            "alpha": np.float32(0.5),
            "on": np.bool_(True),
        },
    )
    data = json.loads(document.to_json())
    assert data["current_segment"] == 9 and data["selected_segments"] == [1, 2]
    assert data["plot"] == {"view_range": [[0.0, 1.0], [2.0, 3.0]], "alpha": 0.5, "on": True}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda d: d.update(format="something-else"), "format", "not a SegScope session"),
        (lambda d: d.update(version=2), "version", "newer SegScope"),
        (lambda d: d.update(version="1"), "version", "integer"),
        (lambda d: d.pop("labels"), "labels", "missing"),
        (lambda d: d["dataset"].pop("segmentation_url"), "dataset.segmentation_url", "missing"),
        (lambda d: d.update(extra=1), "extra", "unexpected"),
        (lambda d: d.update(saved_at="yesterday"), "saved_at", "ISO 8601"),
        (lambda d: d.update(current_segment=True), "current_segment", "segment id"),
        (lambda d: d.update(current_segment=0), "current_segment", "segment id"),
        (lambda d: d.update(selected_segments=[1, "2"]), "selected_segments[1]", "segment id"),
        (lambda d: d.update(selected_segments={"a": 1}), "selected_segments", "list"),
        (lambda d: d.update(selected_nodes=[[1, 2, 3]]), "selected_nodes[0]", "[segment_id, node_id]"),
        (lambda d: d.update(selected_nodes=[[1, -2]]), "selected_nodes[0]", "node id"),
        (lambda d: d.update(labels=[1, 2]), "labels", "object"),
        (lambda d: d.update(plot=None), "plot", "object"),
        (lambda d: d.update(model_path=3), "model_path", "path or URL"),
        (lambda d: d["precomputed"].update(coordinates="pixels"), "precomputed.coordinates", "nm"),
        (lambda d: d["precomputed"].update(num_shards=0), "precomputed.num_shards", "positive"),
        (lambda d: d.update(records_file="../elsewhere.npz"), "records_file", "file name"),
    ],
)
def test_invalid_documents_name_the_file_and_the_field(change, field, words):
    data = make_document().to_dict()
    change(data)
    with pytest.raises(SessionFileError) as caught:
        SessionDocument.from_json(json.dumps(data), "/tmp/bad.segscope.json")
    assert caught.value.field == field
    message = str(caught.value)
    assert "/tmp/bad.segscope.json" in message and repr(field) in message and words in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", "\xff\xfe"])
def test_text_that_is_not_a_session_object_is_refused(text):
    with pytest.raises(SessionFileError, match=r"bad\.json"):
        SessionDocument.from_json(text, "bad.json")


def test_documents_built_in_code_are_validated_too():
    with pytest.raises(SessionFileError, match="non-empty path"):
        DatasetRef(name="x", image_url="", segmentation_url="/s")
    with pytest.raises(SessionFileError, match="not JSON data"):
        make_document(labels={"when": object()})
    with pytest.raises(SessionFileError, match="cannot store"):
        make_document(plot={"view_range": [[0.0, float("nan")], [0.0, 1.0]]})
    document = make_document()
    document.plot = {"bad": {1: "int key"}}  # changed after construction
    with pytest.raises(SessionFileError, match="keys must be strings"):
        document.to_json()


# -- the records sidecar -------------------------------------------------------------------


def test_sidecar_stores_every_segment_record_field():
    assert set(RECORD_FIELDS) == {f.name for f in dataclasses.fields(SegmentRecord)}


def test_records_round_trip_with_predictions_and_with_none_fields(tmp_path):
    records = [
        full_record(11, n=4, d=3),
        bare_record(12),
        # a second encoder of another width, and a segment without predictions
        dataclasses.replace(
            full_record(13, n=6, d=5, seed=1),
            predicted=None,
            predicted_probability=None,
            predicted_uncertainty=None,
            cell_type=None,
            cell_type_probability=None,
            cell_type_probabilities=None,
            ood_score=None,
            ood_flagged=None,
            ood_threshold=None,
            prediction_note="",
        ),
        # centres known but none embedded yet; a flagged segment; an empty skeleton
        SegmentRecord(
            segment_id=2**64 - 1,
            node_ids=np.zeros(0, np.int64),
            positions_nm=np.zeros((0, 3)),
            embedded=np.zeros(0, bool),
            ood_score=0.9,
            ood_flagged=True,
        ),
    ]
    path = save_records(tmp_path / "r.npz", records)
    assert path == tmp_path / "r.npz" and sorted(os.listdir(tmp_path)) == ["r.npz"]
    loaded = load_records(path)
    assert_records_equal(loaded, records)
    assert loaded[2].cell_type_probabilities is None and loaded[0].cell_type_probabilities["basket"] == 0.1 + 0.2

    assert load_records(save_records(tmp_path / "empty.npz", [])) == []


def test_records_file_with_pickled_objects_is_refused_not_unpickled(tmp_path):
    path = save_records(tmp_path / "r.npz", [full_record()])
    arrays = dict(np.load(path))
    arrays["cell_type"] = np.array([{"payload": "a pickled object"}], dtype=object)
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    with pytest.raises(SessionFileError, match=r"r\.npz.*pickled Python objects"):
        load_records(path)


def test_records_that_cannot_be_stored_exactly_are_refused(tmp_path):
    record = full_record()
    record.embeddings = record.embeddings.astype(np.float64) + 1e-12  # would be rounded
    with pytest.raises(ValueError, match="segment 11: embeddings"):
        save_records(tmp_path / "r.npz", [record])
    record = full_record()
    record.positions_nm = record.positions_nm.ravel()
    with pytest.raises(ValueError, match="positions_nm must have 2"):
        save_records(tmp_path / "r.npz", [record])
    assert not (tmp_path / "r.npz").exists()
    # A lossless cast is fine (int codes that fit uint8).
    record = full_record()
    record.predicted = record.predicted.astype(np.int64)
    assert load_records(save_records(tmp_path / "r.npz", [record]))[0].predicted.dtype == np.uint8


def test_corrupt_or_foreign_records_files_name_the_file(tmp_path):
    good = save_records(tmp_path / "good.npz", [full_record(), full_record(14, n=50, d=64)])
    data = good.read_bytes()
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "garbage.npz": b"this is not an archive at all" * 10,
        "flipped.npz": data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:],
        # one bit in the middle, inside the embeddings' values: only the zip CRC sees it
        "bitflip.npz": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1 :],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "array.npy", np.arange(3))
    np.savez(tmp_path / "foreign.npz", x=np.arange(3))
    for name in [*cases, "array.npy", "foreign.npz"]:
        with pytest.raises(SessionFileError) as caught:
            load_records(tmp_path / name)
        assert name in str(caught.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        load_records(tmp_path / "missing.npz")


def test_inconsistent_sidecar_arrays_are_reported_by_key(tmp_path):
    path = save_records(tmp_path / "r.npz", [full_record()])
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["embeddings__data"] = arrays["embeddings__data"][:-1]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(SessionFileError, match="'embeddings__data': holds 11 values, the shapes need 12"):
        load_records(tmp_path / "short.npz")


# -- whole sessions ------------------------------------------------------------------------


def test_session_round_trip_writes_the_two_files(tmp_path):
    document = make_document(saved_at="2000-01-01T00:00:00+00:00")
    records = [full_record(), bare_record()]
    path = save_session(tmp_path / "mine", document, records)
    assert path == tmp_path / "mine.segscope.json"
    assert sorted(os.listdir(tmp_path)) == ["mine.records.npz", "mine.segscope.json"]

    loaded, loaded_records = load_session(path)
    assert loaded.records_file == "mine.records.npz"
    assert loaded.saved_at > "2000"  # stamped at save time
    assert dataclasses.replace(loaded, saved_at=document.saved_at, records_file=None) == document
    assert_records_equal(loaded_records, records)
    assert load_session(tmp_path / "mine")[0] == loaded  # the stem works too


def test_session_without_records_has_no_sidecar_and_removes_a_stale_one(tmp_path):
    save_session(tmp_path / "s.segscope.json", make_document(), [full_record()])
    path = save_session(tmp_path / "s.segscope.json", make_document(), [])
    assert sorted(os.listdir(tmp_path)) == ["s.segscope.json"]
    document, records = load_session(path)
    assert document.records_file is None and records == []


def test_session_paths():
    for given in ("a/b", "a/b.json", "a/b.segscope.json"):
        assert session_paths(given) == (Path("a/b.segscope.json"), Path("a/b.records.npz"))
    with pytest.raises(ValueError, match="has no name before its suffix"):
        session_paths("a/.segscope.json")


def test_missing_or_broken_session_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.segscope\.json"):
        load_session(tmp_path / "nothing.segscope.json")

    path = save_session(tmp_path / "s", make_document(), [full_record()])
    (tmp_path / "s.records.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"s\.records\.npz.*s\.segscope\.json"):
        load_session(path)

    path.write_text('{"format": "segscope-session", "version": 1,')  # cut off mid-write
    with pytest.raises(SessionFileError, match=r"s\.segscope\.json.*not valid JSON"):
        load_session(path)

    data = make_document().to_dict()
    data["version"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(SessionFileError, match=r"s\.segscope\.json.*'version'.*version 7"):
        load_session(path)

    save_session(tmp_path / "c", make_document(), [full_record()])
    sidecar = tmp_path / "c.records.npz"
    sidecar.write_bytes(sidecar.read_bytes()[:100])
    with pytest.raises(SessionFileError, match=r"c\.records\.npz"):
        load_session(tmp_path / "c.segscope.json")


def _failing_savez(file, **arrays):
    file.write(b"PK\x03\x04 half an archive")
    raise OSError("disk full")


def test_a_failed_save_leaves_no_partial_files(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "savez", _failing_savez)
    with pytest.raises(OSError, match="disk full"):
        save_session(tmp_path / "s", make_document(), [full_record()])
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="disk full"):
        save_records(tmp_path / "r.npz", [full_record()])
    assert os.listdir(tmp_path) == []


def test_a_failed_save_keeps_the_previous_session(tmp_path, monkeypatch):
    first = [full_record()]
    path = save_session(tmp_path / "s", make_document(labels={"v": 1}), first)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    monkeypatch.setattr(np, "savez", _failing_savez)
    with pytest.raises(OSError, match="disk full"):
        save_session(path, make_document(labels={"v": 2}), [full_record(), bare_record()])
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before

    # An invalid document writes nothing at all (validated before the disk is touched).
    monkeypatch.undo()
    bad = make_document()
    bad.selected_segments = ["x"]
    with pytest.raises(SessionFileError):
        save_session(path, bad, first)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert load_session(path)[0].labels == {"v": 1}


# -- autosave and crash recovery -------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def crashed_session(directory: Path, labels: dict, *, pid: int | None = None) -> AutosaveManager:
    """Play a SegScope that started, autosaved and then died without finish()."""
    manager = AutosaveManager(directory, pid=dead_pid() if pid is None else pid)
    manager.start()
    assert manager.autosave(make_document(labels=labels), [full_record()]) is not None
    return manager


def test_default_folder_is_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path))
    manager = AutosaveManager()
    assert manager.directory == tmp_path / "sessions" and manager.pid == os.getpid()
    manager.start()
    marker = json.loads(manager.marker_path.read_text())
    assert marker["pid"] == os.getpid() and marker["host"] and marker["started_at"]
    manager.finish()
    assert os.listdir(tmp_path / "sessions") == []


def test_unchanged_session_is_not_written_again(tmp_path, monkeypatch):
    manager = AutosaveManager(tmp_path)
    manager.start()
    writes = []
    real_save = session_file.save_session
    monkeypatch.setattr(
        session_file, "save_session", lambda *args, **kwargs: writes.append(1) or real_save(*args, **kwargs)
    )
    record = full_record()
    assert manager.autosave(make_document(), [record]) == manager.autosave_path
    assert manager.autosave(make_document(), [record]) is None  # new saved_at, same content
    assert len(writes) == 1

    record.embeddings[0, 0] += 1  # the state mutates arrays in place
    assert manager.autosave(make_document(), [record]) is not None
    assert manager.autosave(make_document(labels={"a": 1}), [record]) is not None
    assert manager.autosave(make_document(labels={"a": 1}), [record, bare_record()]) is not None
    assert len(writes) == 4

    manager.autosave_path.unlink()  # removed behind our back: write it again
    assert manager.autosave(make_document(labels={"a": 1}), [record, bare_record()]) is not None
    assert len(writes) == 5
    document, records = load_session(manager.autosave_path)
    assert document.labels == {"a": 1} and len(records) == 2
    assert records[0].embeddings[0, 0] == record.embeddings[0, 0]


def test_a_crashed_session_is_offered_and_a_finished_one_is_not(tmp_path):
    crashed = crashed_session(tmp_path, {"who": "crashed"})
    me = AutosaveManager(tmp_path)
    me.start()
    me.autosave(make_document(labels={"who": "me"}), [])

    candidates = me.recoverable()
    assert candidates == [
        RecoveryCandidate(path=crashed.autosave_path, saved_at=candidates[0].saved_at, pid=crashed.pid)
    ]
    assert candidates[0].saved_at == load_session(crashed.autosave_path)[0].saved_at
    # Seen from the crashed pid: its own autosave is excluded, and ours is alive.
    assert crashed.recoverable() == []

    finished = AutosaveManager(tmp_path, pid=dead_pid())
    finished.start()
    finished.autosave(make_document(), [full_record()])
    finished.finish()
    assert not finished.autosave_path.exists() and not finished.marker_path.exists()
    assert [c.pid for c in me.recoverable()] == [crashed.pid]

    me.finish()
    assert [c.pid for c in AutosaveManager(tmp_path).recoverable()] == [crashed.pid]


def test_live_or_foreign_sessions_are_not_offered(tmp_path):
    # Another SegScope that is still running (our parent process is alive).
    alive = AutosaveManager(tmp_path, pid=os.getppid())
    alive.start()
    alive.autosave(make_document(), [])
    # A dead pid, but on another machine sharing the folder: its liveness is unknown.
    remote = crashed_session(tmp_path, {})
    marker = json.loads(remote.marker_path.read_text())
    remote.marker_path.write_text(json.dumps({**marker, "host": "elsewhere"}))
    assert AutosaveManager(tmp_path).recoverable() == []


def test_an_autosave_whose_marker_vanished_is_offered_newest_first(tmp_path):
    older = crashed_session(tmp_path, {"n": 1})
    newer = crashed_session(tmp_path, {"n": 2})
    newer.marker_path.unlink()  # gone without a clean finish
    assert [c.pid for c in AutosaveManager(tmp_path).recoverable()] == [newer.pid, older.pid]


def test_discard_removes_the_autosave_and_its_marker(tmp_path):
    crashed_session(tmp_path, {})
    me = AutosaveManager(tmp_path)
    [candidate] = me.recoverable()
    me.discard(candidate)
    assert os.listdir(tmp_path) == []
    assert me.recoverable() == []
    with pytest.raises(ValueError, match="own autosave"):
        me.discard(RecoveryCandidate(me.autosave_path, "", me.pid))


def test_adopt_returns_the_session_and_keeps_it_on_disk(tmp_path):
    crashed = crashed_session(tmp_path, {"who": "crashed"})
    me = AutosaveManager(tmp_path)
    me.start()
    [candidate] = me.recoverable()
    document, records = me.adopt(candidate)
    assert document.labels == {"who": "crashed"}
    assert_records_equal(records, [full_record()])
    # The old files are gone, and the work now lives in this process's autosave.
    assert not crashed.autosave_path.exists() and not crashed.marker_path.exists()
    assert not (tmp_path / f"autosave-{crashed.pid}.records.npz").exists()
    assert load_session(me.autosave_path)[0].labels == {"who": "crashed"}
    assert me.recoverable() == []
    # Nothing changed since the adoption: the next autosave is skipped.
    assert me.autosave(document, records) is None


def test_adopt_of_a_broken_autosave_raises_and_keeps_its_files(tmp_path):
    crashed = crashed_session(tmp_path, {})
    sidecar = tmp_path / f"autosave-{crashed.pid}.records.npz"
    sidecar.write_bytes(b"garbage")
    me = AutosaveManager(tmp_path)
    [candidate] = me.recoverable()
    with pytest.raises(SessionFileError, match=sidecar.name):
        me.adopt(candidate)
    assert crashed.autosave_path.exists() and sidecar.exists() and crashed.marker_path.exists()

    crashed.autosave_path.write_text("{")  # even an unreadable JSON is offered, to discard
    [candidate] = me.recoverable()
    assert candidate.pid == crashed.pid and candidate.saved_at
    with pytest.raises(SessionFileError, match="not valid JSON"):
        me.adopt(candidate)
    me.discard(candidate)
    assert me.recoverable() == []


def test_start_forgets_markers_of_dead_processes_that_never_autosaved(tmp_path):
    stale = AutosaveManager(tmp_path, pid=dead_pid())
    stale.start()
    crashed = crashed_session(tmp_path, {})
    AutosaveManager(tmp_path).start()
    assert not stale.marker_path.exists()
    assert crashed.marker_path.exists()  # it has work to recover


def test_a_reused_pid_does_not_hide_a_crashed_session(tmp_path):
    # The crashed SegScope's pid now belongs to a live process (our parent), or the
    # machine rebooted since: the marker's process identity no longer matches.
    crashed = crashed_session(tmp_path, {"who": "crashed"}, pid=os.getppid())
    me = AutosaveManager(tmp_path)
    marker = json.loads(crashed.marker_path.read_text())
    if marker["process"] is None:
        pytest.skip("no /proc process identity on this system")
    assert me.recoverable() == []  # same identity: that SegScope is alive
    boot_id, start = marker["process"].split(":")
    for identity in (f"{boot_id}:{int(start) + 1}", f"another-boot:{start}"):
        crashed.marker_path.write_text(json.dumps({**marker, "process": identity}))
        assert [c.pid for c in me.recoverable()] == [crashed.pid]


def test_only_one_segscope_at_a_time_can_claim_a_crashed_autosave(tmp_path):
    crashed_session(tmp_path, {"who": "crashed"})
    first, second = AutosaveManager(tmp_path), AutosaveManager(tmp_path, pid=os.getppid())
    [candidate] = first.recoverable()
    assert [c.pid for c in second.recoverable()] == [candidate.pid]  # both see it...
    assert first.claim(candidate) and first.claim(candidate)  # (claiming twice is fine)
    assert not second.claim(candidate)  # ...only one may offer it
    first.release(candidate)
    assert second.claim(candidate)
    # Discarding under the claim removes the claim file with the autosave.
    second.discard(candidate)
    second.release(candidate)
    assert os.listdir(tmp_path) == []


def test_a_claim_dies_with_the_process_that_held_it(tmp_path):
    """A SegScope that crashes while offering an autosave must not hide it forever."""
    crashed = crashed_session(tmp_path, {})
    root = str(Path(__file__).resolve().parents[1])
    script = (
        "import os, sys, pathlib\n"
        "from segscope.app.session_file import AutosaveManager\n"
        "manager = AutosaveManager(pathlib.Path(sys.argv[1]))\n"
        "[candidate] = manager.recoverable()\n"
        "assert manager.claim(candidate)\n"
        "print('claimed', flush=True)\n"
        "sys.stdin.readline()\n"
        "os._exit(1)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    # The with block closes the pipes (left open they are a ResourceWarning) and reaps the child.
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "claimed"
            me = AutosaveManager(tmp_path)
            [candidate] = me.recoverable()
            assert candidate.pid == crashed.pid and not me.claim(candidate)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 1
            assert me.claim(candidate)
        finally:
            holder.kill()
