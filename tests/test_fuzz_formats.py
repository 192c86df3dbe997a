"""Fuzz every file format SegScope reads: any input is read correctly or refused with the
reader's own error class, never another exception (issue 15).

Formats: CSV ZIP shards (SegCLR embeddings), classifier ``.npz`` files and their
``classifiers.json`` manifest, session JSON and its records ``.npz``, encoder configs. Each
starts from a valid file written by SegScope itself and mutates its bytes (flips, cuts,
splices) or its JSON structure (Hypothesis); deep nesting and absurd numbers are included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(data: bytes, edits) -> bytes:
    """Apply ``(kind, position, value)`` edits: flip a byte, cut the tail, or splice bytes in."""
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == "flip":
            buffer[at] ^= (value % 255) + 1
        elif kind == "cut":
            del buffer[at:]
        else:
            buffer[at:at] = bytes([value % 256]) * (1 + value % 64)
    return bytes(buffer)


EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "splice"]), st.integers(0, 2**31), st.integers(0, 2**16)),
    min_size=1,
    max_size=6,
)

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _deeply_nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def _mutated_json(valid: dict, data) -> object:
    """``valid`` with one field replaced by arbitrary JSON, or arbitrary JSON outright."""
    if data.draw(st.booleans()):
        return data.draw(JSON_VALUES)
    changed = json.loads(json.dumps(valid))
    key = data.draw(st.sampled_from(sorted(changed)))
    changed[key] = data.draw(JSON_VALUES)
    return changed


# -- CSV ZIP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csv_zip_shard(tmp_path_factory):
    from segscope.analysis.csvzip import CsvZipStore

    folder = tmp_path_factory.mktemp("csvzip") / "store"
    store = CsvZipStore(folder, num_shards=1, coordinates="nm")
    rng = np.random.default_rng(0)
    rows = {
        s: (np.arange(5) + s, rng.normal(size=(5, 3)) * 1e4, rng.normal(size=(5, 8)).astype(np.float32))
        for s in (3, 8, 21)
    }
    store.write_many(rows)
    return folder / "0.zip", rows


@FUZZ
@given(edits=EDITS)
def test_csv_zip_shards_read_correctly_or_raise_csvzip_error(csv_zip_shard, tmp_path_factory, edits):
    from segscope.analysis.csvzip import CsvZipError, CsvZipStore

    shard, rows = csv_zip_shard
    folder = tmp_path_factory.mktemp("fuzzed")
    (folder / "0.zip").write_bytes(_mutate(shard.read_bytes(), edits))
    store = CsvZipStore(folder, num_shards=1, coordinates="nm")
    for segment_id, (node_ids, _, embeddings) in rows.items():
        try:
            got_ids, xyz, got = store.read(segment_id)
        except (CsvZipError, KeyError):
            continue
        # A read that succeeds returns well-formed arrays (the zip CRC catches flipped text).
        assert got_ids.ndim == 1 and xyz.shape == (len(got_ids), 3) and got.shape[0] == len(got_ids)
        if got.shape == embeddings.shape and np.array_equal(got_ids, node_ids):
            np.testing.assert_allclose(got, embeddings, rtol=1e-6)
    try:
        list(store.segment_ids())
    except CsvZipError:
        pass
    shutil.rmtree(folder)


# -- classifiers -----------------------------------------------------------------------


CLASSIFIER = REPO / "assets" / "classifiers" / "cell_type.npz"


@pytest.mark.skipif(not CLASSIFIER.is_file(), reason="no shipped classifier")
@FUZZ
@given(edits=EDITS)
def test_classifier_metadata_reads_or_raises_classifier_file_error(tmp_path_factory, edits):
    from segscope.analysis.classify.classifier import ClassifierFileError, read_classifier_metadata

    path = tmp_path_factory.mktemp("clf") / "c.npz"
    path.write_bytes(_mutate(CLASSIFIER.read_bytes(), edits))
    try:
        metadata: object = read_classifier_metadata(path)
    except ClassifierFileError as exc:
        metadata = str(exc)
    assert isinstance(metadata, dict) or "allow_pickle" not in metadata


@pytest.mark.slow
@pytest.mark.skipif(not CLASSIFIER.is_file(), reason="no shipped classifier")
@settings(max_examples=30, deadline=None)
@given(edits=EDITS)
def test_classifier_weights_load_or_raise_classifier_file_error(tmp_path_factory, edits):
    from segscope.analysis.classify.classifier import ClassifierFileError, load_classifier

    path = tmp_path_factory.mktemp("clf") / "c.npz"
    path.write_bytes(_mutate(CLASSIFIER.read_bytes(), edits))
    try:
        classifier = load_classifier(path)
    except ClassifierFileError:
        return
    assert all(np.all(np.isfinite(np.asarray(w))) for w in classifier.model.weights)


def test_classifier_with_nan_weights_is_refused(tmp_path):
    if not CLASSIFIER.is_file():
        pytest.skip("no shipped classifier")
    from segscope.analysis.classify.classifier import ClassifierFileError, load_classifier

    with np.load(CLASSIFIER, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    name = next(k for k in arrays if k.startswith("weight_") and arrays[k].dtype.kind == "f" and arrays[k].size)
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ClassifierFileError, match="NaN"):
        load_classifier(tmp_path / "nan.npz")


@FUZZ
@given(data=st.data())
def test_classifier_manifest_reads_or_raises_a_value_error(tmp_path_factory, data):
    from segscope.analysis.artefacts import read_classifier_folder

    folder = tmp_path_factory.mktemp("manifest")
    valid = json.loads((REPO / "assets" / "classifiers" / "classifiers.json").read_text())
    for file in (REPO / "assets" / "classifiers").glob("*.npz"):
        (folder / file.name).symlink_to(file)
    text = json.dumps(_mutated_json(valid, data)) if data.draw(st.integers(0, 9)) else _deeply_nested()
    (folder / "classifiers.json").write_text(text)
    try:
        read_classifier_folder(folder)
    except (ValueError, FileNotFoundError):
        pass  # the reader's own classes; anything else fails the test


# -- sessions ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_session_json_parses_or_raises_session_file_error(data):
    from segscope.app.session_file import SessionDocument, SessionFileError

    from test_session_file import make_document

    valid = json.loads(make_document().to_json())
    text = json.dumps(_mutated_json(valid, data)) if data.draw(st.integers(0, 9)) else _deeply_nested()
    message = ""
    try:
        SessionDocument.from_json(text, "fuzzed.segscope.json")
    except SessionFileError as exc:
        message = str(exc)
    assert not message or "fuzzed.segscope.json" in message


@FUZZ
@given(edits=EDITS)
def test_session_records_load_or_raise_session_file_error(tmp_path_factory, edits):
    from segscope.app.session_file import SessionFileError, load_records, save_records

    from test_session_file import full_record

    folder = tmp_path_factory.mktemp("records")
    path = save_records(folder / "r.npz", [full_record(11), full_record(12, seed=1)])
    path.write_bytes(_mutate(path.read_bytes(), edits))
    try:
        records: object = load_records(path)
    except SessionFileError as exc:
        records = str(exc)
    if isinstance(records, str):
        assert "allow_pickle" not in records
    else:
        assert all(r.segment_id in (11, 12) for r in records)


# -- encoder configs -------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_encoder_configs_validate_or_raise_value_error(data):
    from segscope.analysis.encoder.config import MAX_INPUT_SIZE_VOX, SEGCLR_LITE, EncoderConfig

    changed = _mutated_json(SEGCLR_LITE.to_dict(), data)
    try:
        config = EncoderConfig.from_dict(changed)  # type: ignore[arg-type]
    except ValueError:
        return
    assert max(config.input_size_vox) <= MAX_INPUT_SIZE_VOX
    assert all(np.isfinite(config.voxel_size_nm)) and min(config.voxel_size_nm) > 0


def test_encoder_file_naming_a_foreign_callable_or_damaged_is_one_value_error(tmp_path):
    import zipfile

    from segscope.analysis.encoder import read_encoder_config

    source = REPO / "assets" / "demo_encoder.keras"
    if not source.is_file():
        pytest.skip("no demo encoder")
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"] = [{"module": "os", "class_name": "system", "config": {}}]
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(evil, "w") as archive:
        for name, blob in {**members, "config.json": json.dumps(config).encode()}.items():
            archive.writestr(name, blob)
    with pytest.raises(ValueError, match=r"os\.system"):
        read_encoder_config(evil)
    huge = json.loads(members["config.json"])
    huge["config"]["encoder_config"]["input_size_vox"] = [10**6] * 3
    big = tmp_path / "big.keras"
    with zipfile.ZipFile(big, "w") as archive:
        for name, blob in {**members, "config.json": json.dumps(huge).encode()}.items():
            archive.writestr(name, blob)
    with pytest.raises(ValueError, match="at most 512"):
        read_encoder_config(big)
    truncated = tmp_path / "cut.keras"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.keras"):
        read_encoder_config(truncated)


# -- skeletons: SWC folders and node tables -------------------------------------------------

SWC_TEXT = """# a three-node skeleton (nm)
1 1 100.0 200.0 300.0 50.0 -1
2 3 150.0 200.0 300.0 20.0 1
3 3 200.0 250.0 300.0 20.0 2
"""
SWC_FIELDS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e308", "-1", "0", "2", "9" * 30, "x", ""]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)


@FUZZ
@given(edits=EDITS, replacements=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6), SWC_FIELDS), max_size=3))
def test_swc_skeletons_read_or_raise_a_value_error(tmp_path_factory, edits, replacements):
    from segscope.analysis.skeleton_sources import open_skeleton_source

    folder = tmp_path_factory.mktemp("swc")
    rows = [line.split() for line in SWC_TEXT.splitlines()[1:]]
    for row, column, value in replacements:
        rows[row][column] = value
    text = SWC_TEXT.splitlines()[0] + "\n" + "\n".join(" ".join(r) for r in rows) + "\n"
    data = _mutate(text.encode(), edits) if edits[0][0] != "flip" or edits[0][2] % 2 else text.encode()
    (folder / "7.swc").write_bytes(data)
    try:
        skeleton = open_skeleton_source(folder).get(7)
    except ValueError:
        return
    if skeleton is not None:
        assert np.all(np.isfinite(skeleton.nodes_nm))
        assert skeleton.edges.size == 0 or skeleton.edges.max() < len(skeleton.nodes_nm)


@FUZZ
@given(edits=EDITS)
def test_node_tables_read_or_raise_a_value_error(tmp_path_factory, edits):
    from segscope.analysis.skeleton_sources import open_skeleton_source

    folder = tmp_path_factory.mktemp("nodes")
    text = "segment_id,node_id,x_nm,y_nm,z_nm,parent\n7,0,1,2,3,-1\n7,1,4,5,6,0\n8,0,7,8,9,-1\n"
    (folder / "nodes.csv").write_bytes(_mutate(text.encode(), edits))
    try:
        source = open_skeleton_source(folder / "nodes.csv")
        skeletons = [source.get(s) for s in (7, 8)]
    except ValueError:
        return
    for skeleton in skeletons:
        if skeleton is not None:
            assert np.all(np.isfinite(skeleton.nodes_nm))
