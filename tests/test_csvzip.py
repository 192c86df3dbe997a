"""SegCLR CSV ZIP stores: shard function, round trips, format details, errors, remote reads."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from segscope.analysis.csvzip import (
    CsvZipError,
    CsvZipStore,
    format_member,
    parse_member,
    shard_for_segment,
)


def random_segment(rng: np.random.Generator, n: int, dim: int, coordinates: str):
    """Node ids int64 [n], xyz [n, 3] (integer voxels or fractional nm), float32 [n, dim]."""
    node_ids = rng.choice(2**40, size=n, replace=False).astype(np.int64)
    if coordinates == "voxels":
        xyz = rng.integers(0, 200_000, size=(n, 3)).astype(np.float64)
    else:
        xyz = rng.uniform(0, 8e6, size=(n, 3))
    embeddings = rng.normal(scale=3.0, size=(n, dim)).astype(np.float32)
    return node_ids, xyz, embeddings


def ids_in_same_shard(count: int, num_shards: int, bytewidth: int = 64, start: int = 1):
    """The first ``count`` segment ids from ``start`` that fall in one shard."""
    target = shard_for_segment(start, num_shards, bytewidth)
    found, candidate = [], start
    while len(found) < count:
        if shard_for_segment(candidate, num_shards, bytewidth) == target:
            found.append(candidate)
        candidate += 1
    return found, target


def assert_segment_equal(got, expected) -> None:
    for got_array, expected_array in zip(got, expected):
        np.testing.assert_array_equal(got_array, expected_array)
    assert got[0].dtype == np.int64
    assert got[1].dtype == np.float64 and got[1].shape[1] == 3
    assert got[2].dtype == np.float32


# --------------------------------------------------------------------------- shard function


def test_shard_function_matches_every_published_vector(fixtures_dir):
    vectors = json.loads((fixtures_dir / "csvzip_shards.json").read_text())["vectors"]
    assert len(vectors) >= 10
    for vector in vectors:
        got = shard_for_segment(vector["segment_id"], vector["num_shards"], vector["bytewidth"])
        assert got == vector["shard"], vector


def test_shard_function_accepts_numpy_ints_and_rejects_bad_ids():
    assert shard_for_segment(np.uint64(12345), 10_000, 64) == shard_for_segment(12345, 10_000, 64)
    with pytest.raises(ValueError, match="uint64"):
        shard_for_segment(-1)
    with pytest.raises(ValueError, match="uint64"):
        shard_for_segment(2**64)
    with pytest.raises(TypeError):
        shard_for_segment(1.0)
    with pytest.raises(ValueError, match="bytewidth"):
        shard_for_segment(1, 10, bytewidth=4)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("coordinates", ["voxels", "nm"])
def test_round_trip_is_exact(tmp_path, dim, coordinates):
    rng = np.random.default_rng(dim)
    store = CsvZipStore(tmp_path / "store", coordinates=coordinates)
    segments = {
        int(sid): random_segment(rng, int(rng.integers(1, 40)), dim, coordinates)
        for sid in np.unique(rng.integers(0, 2**64 - 1, size=25, dtype=np.uint64, endpoint=True))
    }
    assert store.write_many(segments) == len(segments) == 25
    for segment_id, expected in segments.items():
        assert segment_id in store
        assert_segment_equal(store.read(segment_id), expected)
    assert sorted(store.segment_ids()) == sorted(segments)
    # A fresh store object (no cache) reads the same.
    again = CsvZipStore(tmp_path / "store", coordinates=coordinates)
    some = next(iter(segments))
    assert_segment_equal(again.read(some), segments[some])


def test_extreme_float32_values_round_trip(tmp_path):
    tiny = np.finfo(np.float32).smallest_subnormal
    big = np.finfo(np.float32).max
    embeddings = np.array([[tiny, -tiny, big, -big, 0.1, -0.0, 1e-30, 3.4e38]], dtype=np.float32)
    store = CsvZipStore(tmp_path, num_shards=7, bytewidth=8, coordinates="nm")
    store.write(2**64 - 1, [2**63 - 1], [[0.1, -2.5e-7, 1e15 + 0.5]], embeddings)
    node_ids, xyz, got = store.read(2**64 - 1)
    assert node_ids[0] == 2**63 - 1
    np.testing.assert_array_equal(xyz, [[0.1, -2.5e-7, 1e15 + 0.5]])
    np.testing.assert_array_equal(got.view(np.uint32), embeddings.view(np.uint32))


def test_many_segments_share_a_shard_and_iter_shard_reads_them_all(tmp_path):
    rng = np.random.default_rng(1)
    store = CsvZipStore(tmp_path, num_shards=3)
    segments = {sid: random_segment(rng, 5, 64, "voxels") for sid in range(100, 160)}
    store.write_many(segments)
    assert store.shards() == [0, 1, 2]
    total = 0
    for shard in store.shards():
        with zipfile.ZipFile(tmp_path / f"{shard}.zip") as archive:
            names = archive.namelist()
            assert archive.testzip() is None
        assert all(re.fullmatch(r"[1-9][0-9]*\.csv", name) for name in names)
        assert sorted(int(n[:-4]) for n in names) == store.segment_ids_in_shard(shard).tolist()
        for segment_id, *arrays in store.iter_shard(shard):
            assert store.shard_of(segment_id) == shard
            assert_segment_equal(arrays, segments[segment_id])
            total += 1
    assert total == 60


def test_append_to_existing_shard_keeps_old_members_byte_identical(tmp_path):
    rng = np.random.default_rng(2)
    (first, second, third), shard = ids_in_same_shard(3, 10_000)
    store = CsvZipStore(tmp_path)
    data = {sid: random_segment(rng, 8, 64, "voxels") for sid in (first, second, third)}
    store.write(first, *data[first])
    with zipfile.ZipFile(tmp_path / f"{shard}.zip") as archive:
        before = archive.read(f"{first}.csv")
    store.write(second, *data[second])
    store.write_many({third: data[third]})
    with zipfile.ZipFile(tmp_path / f"{shard}.zip") as archive:
        assert archive.testzip() is None
        assert archive.read(f"{first}.csv") == before
        assert sorted(archive.namelist()) == sorted(f"{s}.csv" for s in data)
    for segment_id, expected in data.items():
        assert_segment_equal(store.read(segment_id), expected)


def test_overwrite_is_refused_unless_asked(tmp_path):
    rng = np.random.default_rng(3)
    (keep, target), shard = ids_in_same_shard(2, 50, bytewidth=8)
    store = CsvZipStore(tmp_path, num_shards=50, bytewidth=8)
    original = {keep: random_segment(rng, 4, 64, "voxels"), target: random_segment(rng, 4, 64, "voxels")}
    store.write_many(original)
    shard_bytes = (tmp_path / f"{shard}.zip").read_bytes()
    replacement = random_segment(rng, 2, 64, "voxels")
    with pytest.raises(FileExistsError, match=f"{target}.*overwrite=True"):
        store.write(target, *replacement)
    # A batch with one conflict writes nothing at all, even its new segments.
    with pytest.raises(FileExistsError):
        store.write_many({target: replacement, 999_999: replacement})
    assert (tmp_path / f"{shard}.zip").read_bytes() == shard_bytes
    assert 999_999 not in store
    store.write(target, *replacement, overwrite=True)
    assert_segment_equal(store.read(target), replacement)
    assert_segment_equal(store.read(keep), original[keep])
    with zipfile.ZipFile(tmp_path / f"{shard}.zip") as archive:
        assert sorted(archive.namelist()) == sorted([f"{keep}.csv", f"{target}.csv"])


def test_write_rejects_bad_input(tmp_path):
    store = CsvZipStore(tmp_path)
    one = (np.array([1]), np.zeros((1, 3)), np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="twice"):
        store.write_many([(5, *one), (5, *one)])
    with pytest.raises(ValueError, match="at least one node"):
        store.write(5, [], np.zeros((0, 3)), np.zeros((0, 64)))
    with pytest.raises(ValueError, match="xyz"):
        store.write(5, [1], np.zeros((1, 2)), np.zeros((1, 64)))
    with pytest.raises(ValueError, match="integer"):
        store.write(5, [1.5], np.zeros((1, 3)), np.zeros((1, 64)))
    with pytest.raises(ValueError, match="NaN"):
        store.write(5, [1], np.zeros((1, 3)), np.full((1, 64), np.nan))
    with pytest.raises(ValueError, match="embeddings"):
        store.write(5, [1, 2], np.zeros((2, 3)), np.zeros((1, 64)))
    assert store.shards() == []


def test_interrupted_write_leaves_shard_intact_and_no_temp_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    (first, second), shard = ids_in_same_shard(2, 10)
    store = CsvZipStore(tmp_path, num_shards=10)
    store.write(first, *random_segment(rng, 3, 64, "voxels"))
    before = (tmp_path / f"{shard}.zip").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail)
    with pytest.raises(KeyboardInterrupt):
        store.write(second, *random_segment(rng, 3, 64, "voxels"))
    assert (tmp_path / f"{shard}.zip").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_writers_to_one_shard_lose_nothing(tmp_path):
    rng = np.random.default_rng(5)
    store = CsvZipStore(tmp_path, num_shards=2, durable=False)
    data = {sid: random_segment(rng, 2, 16, "voxels") for sid in range(1, 81)}
    errors = []

    def writer(ids):
        try:
            for sid in ids:
                store.write(sid, *data[sid])
        except Exception as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(list(range(k, 81, 8)),)) for k in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(store.segment_ids()) == list(range(1, 81))
    for sid in (1, 40, 80):
        assert_segment_equal(store.read(sid), data[sid])


def _write_in_child(root: str, segment_ids: list[int]) -> None:
    store = CsvZipStore(root, num_shards=1, durable=False)
    for segment_id in segment_ids:
        store.write(segment_id, [segment_id], [[1, 2, 3]], [[segment_id / 2]])


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_write_in_child, args=(str(tmp_path), list(range(k, 61, 3)))) for k in (1, 2, 3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0, 0]
    store = CsvZipStore(tmp_path, num_shards=1)
    assert sorted(store.segment_ids()) == list(range(1, 61))
    assert store.read(31)[2].tolist() == [[15.5]]


def test_cache_notices_a_shard_rewritten_by_another_store_object(tmp_path):
    rng = np.random.default_rng(6)
    (first, second), _ = ids_in_same_shard(2, 10)
    reader = CsvZipStore(tmp_path, num_shards=10)
    writer = CsvZipStore(tmp_path, num_shards=10)
    writer.write(first, *random_segment(rng, 3, 8, "voxels"))
    reader.read(first)  # caches the directory
    expected = random_segment(rng, 3, 8, "voxels")
    writer.write(second, *expected)
    assert_segment_equal(reader.read(second), expected)


def test_directory_cache_is_bounded(tmp_path):
    rng = np.random.default_rng(7)
    store = CsvZipStore(tmp_path, num_shards=10, cache_shards=2)
    store.write_many({sid: random_segment(rng, 1, 4, "voxels") for sid in range(1, 30)})
    for sid in range(1, 30):
        store.read(sid)
    assert len(store._cache) == 2


def test_listing_ignores_lock_temp_and_foreign_files(tmp_path):
    store = CsvZipStore(tmp_path, num_shards=100)
    store.write(7, [1], [[1, 2, 3]], [[0.5, 0.25]])
    (tmp_path / ".3.zip.123.abcd.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "0042.zip").write_bytes(b"not ours")
    assert store.shards() == [store.shard_of(7)]
    assert list(store.segment_ids()) == [7]
    assert (tmp_path / ".csvzip.lock").exists()


def test_membership_of_odd_keys(tmp_path):
    store = CsvZipStore(tmp_path)
    store.write(3, [1], [[1, 2, 3]], [[0.5]])
    assert 3 in store and np.uint64(3) in store
    assert 4 not in store and -1 not in store and "3" not in store and 2**70 not in store


# --------------------------------------------------------------------------- text format


def test_written_member_has_no_header_and_no_trailing_newline(tmp_path):
    store = CsvZipStore(tmp_path, num_shards=1, coordinates="voxels")
    embeddings = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 7
    store.write(11, [5, 6], [[1, 2, 3], [4, 5, 6]], embeddings)
    with zipfile.ZipFile(tmp_path / "0.zip") as archive:
        assert archive.namelist() == ["11.csv"]
        text = archive.read("11.csv").decode("ascii")
    assert not text.endswith("\n")
    lines = text.split("\n")
    assert len(lines) == 2
    assert lines[0].startswith("5,1,2,3,0,0.142857149,")  # integer voxels, %.9g floats
    assert all(len(line.split(",")) == 4 + 64 for line in lines)


def test_nm_coordinates_keep_fractions_and_integral_ones_print_as_integers():
    text = format_member([1, 2], [[1.5, 2.0, 3.0], [4.0, 5.0, 6.25]], [[1.0], [2.0]]).decode()
    assert text == "1,1.5,2.0,3.0,1\n2,4.0,5.0,6.25,2"
    assert format_member([1], [[1.0, 2.0, 3.0]], [[1.0]]) == b"1,1,2,3,1"


def test_reader_tolerates_blank_lines_and_crlf():
    data = b"\n\n1,10,20,30,0.5,1.5\r\n  \n\n2,11.5,21,31,-0.5,2.5\n\n"
    node_ids, xyz, embeddings = parse_member(data)
    np.testing.assert_array_equal(node_ids, [1, 2])
    np.testing.assert_array_equal(xyz, [[10, 20, 30], [11.5, 21, 31]])
    np.testing.assert_array_equal(embeddings, np.array([[0.5, 1.5], [-0.5, 2.5]], np.float32))


def test_store_reads_members_with_blank_lines_written_by_others(tmp_path):
    (tmp_path).mkdir(exist_ok=True)
    with zipfile.ZipFile(tmp_path / f"{shard_for_segment(9, 5)}.zip", "w") as archive:
        archive.writestr("9.csv", "1,1,2,3,0.5\n\n2,4,5,6,0.25\n")
    node_ids, _xyz, embeddings = CsvZipStore(tmp_path, num_shards=5).read(9)
    assert node_ids.tolist() == [1, 2] and embeddings[:, 0].tolist() == [0.5, 0.25]


@pytest.mark.parametrize(
    ("data", "line", "problem"),
    [
        (b"1,2,3,4,0.5\n2,2,3,4,abc\n", 2, "column 5 value b'abc' is not a number"),
        (b"1,2,3,4,0.5,0.5\n\n3,2,3,4,0.5\n", 3, "3 columns|5 columns but line 1 has 6"),
        (b"1,2,3,4,0.5\nx,2,3,4,0.5", 2, "node id b'x' is not an integer"),
        (b"1.5,2,3,4,0.5", 1, "node id b'1.5' is not an integer"),
        (b"99999999999999999999,2,3,4,0.5", 1, "does not fit in int64"),
        (b"1,2,3,4,nan", 1, "not finite"),
        (b"1,2,3,4,1e39", 1, "not finite"),
        (b"1,2,3,4", 1, "4 columns"),
        (b"1,2,3,4,0.5,\n", 1, "column 6 value b'' is not a number"),
        (b"1,2,3\x00,4,0.5", 1, "NUL"),
    ],
)
def test_malformed_rows_name_file_member_and_line(data, line, problem):
    with pytest.raises(CsvZipError) as caught:
        parse_member(data, path="/data/12.zip", member="77.csv")
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.path, error.member, error.line) == ("/data/12.zip", "77.csv", line)
    assert str(error).startswith(f"/data/12.zip, member 77.csv, line {line}: ")
    assert re.search(problem, str(error)), str(error)


def test_empty_member_is_an_error():
    with pytest.raises(CsvZipError, match="no rows"):
        parse_member(b"\n \n")


def test_malformed_row_in_store_names_the_shard_file(tmp_path):
    shard = shard_for_segment(21, 4)
    with zipfile.ZipFile(tmp_path / f"{shard}.zip", "w") as archive:
        archive.writestr("21.csv", "1,1,2,3,0.5\n2,1,2,3,0.5,0.7")
    with pytest.raises(CsvZipError) as caught:
        CsvZipStore(tmp_path, num_shards=4).read(21)
    assert caught.value.path == str(tmp_path / f"{shard}.zip")
    assert caught.value.member == "21.csv" and caught.value.line == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_never_crashes_on_arbitrary_bytes(data):
    try:
        node_ids, xyz, embeddings = parse_member(data, path="p", member="m")
    except ValueError:
        return
    assert node_ids.dtype == np.int64 and xyz.dtype == np.float64 and embeddings.dtype == np.float32
    assert xyz.shape == (node_ids.shape[0], 3) and embeddings.shape[0] == node_ids.shape[0]
    assert node_ids.shape[0] >= 1 and embeddings.shape[1] >= 1
    assert np.isfinite(xyz).all() and np.isfinite(embeddings).all()


csv_alphabet = st.sampled_from([*b"0123456789,.-+eE\n \r", ord("a"), ord("n"), ord("_")])


@settings(max_examples=300, deadline=None)
@given(st.lists(csv_alphabet, max_size=300).map(bytes))
def test_parser_never_crashes_on_csv_like_bytes(data):
    try:
        parse_member(data, path="p", member="m")
    except ValueError as error:  # random bytes may or may not parse; any error must name its source
        assert isinstance(error, CsvZipError) and error.path == "p" and error.member == "m"  # noqa: PT017


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    st.booleans(),
)
def test_format_then_parse_is_exact(embeddings, integral_coordinates):
    n = embeddings.shape[0]
    rng = np.random.default_rng(n)
    xyz = rng.integers(-5, 10**6, size=(n, 3)).astype(np.float64)
    if not integral_coordinates:
        xyz += rng.uniform(size=(n, 3))
    node_ids = np.arange(n, dtype=np.int64) - 3
    node_back, xyz_back, embeddings_back = parse_member(format_member(node_ids, xyz, embeddings))
    np.testing.assert_array_equal(node_back, node_ids)
    np.testing.assert_array_equal(xyz_back, xyz)
    # Bit patterns, so even the sign of zero must survive.
    np.testing.assert_array_equal(embeddings_back.view(np.uint32), embeddings.view(np.uint32))


# --------------------------------------------------------------------------- zip structure


def handmade_zip64(members: list[tuple[str, bytes]], method: int = 8) -> bytes:
    """A zip whose sizes and offsets all live in zip64 extra fields and zip64 end records,
    built with struct only (so the reader is not tested against its own writer)."""
    out, central = bytearray(), bytearray()
    for name, data in members:
        raw_name = name.encode()
        payload = zlib.compress(data)[2:-4] if method == 8 else data
        crc = zlib.crc32(data)
        offset = len(out)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(payload))
        out += (
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                45,
                0,
                method,
                0,
                0x21,
                crc,
                0xFFFFFFFF,
                0xFFFFFFFF,
                len(raw_name),
                len(local_extra),
            )
            + raw_name
            + local_extra
            + payload
        )
        central_extra = struct.pack("<HHQQQ", 1, 24, len(data), len(payload), offset)
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                45,
                45,
                0,
                method,
                0,
                0x21,
                crc,
                0xFFFFFFFF,
                0xFFFFFFFF,
                len(raw_name),
                len(central_extra),
                0,
                0,
                0,
                0,
                0xFFFFFFFF,
            )
            + raw_name
            + central_extra
        )
    cd_offset = len(out)
    out += central
    record_offset = len(out)
    count = len(members)
    out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_offset)
    out += struct.pack("<4sLQL", b"PK\x06\x07", 0, record_offset, 1)
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


@pytest.mark.parametrize("method", [0, 8])
def test_zip64_archives_are_read(tmp_path, method):
    members = [(f"{sid}.csv", f"{sid},1,2,3,{sid / 4}\n{sid + 1},4,5,6,0.5".encode()) for sid in range(1, 40)]
    blob = handmade_zip64(members, method)
    with zipfile.ZipFile(io.BytesIO(blob)) as reference:  # the test zip itself is valid
        assert reference.read("7.csv") == members[6][1]
    (tmp_path / "0.zip").write_bytes(blob)
    store = CsvZipStore(tmp_path, num_shards=1)
    assert list(store.segment_ids()) == list(range(1, 40))
    node_ids, _xyz, embeddings = store.read(7)
    assert node_ids.tolist() == [7, 8] and embeddings[:, 0].tolist() == [1.75, 0.5]


def test_repeated_names_take_the_later_entry_and_foreign_members_are_ignored(tmp_path):
    with zipfile.ZipFile(tmp_path / "0.zip", "w") as archive:
        archive.writestr("readme.txt", "not a segment")
        archive.writestr("007.csv", "1,1,2,3,0.5")  # not how segment 7 is named
        archive.writestr("5.csv", "1,1,2,3,0.5")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("5.csv", "2,1,2,3,0.75")
    store = CsvZipStore(tmp_path, num_shards=1)
    assert list(store.segment_ids()) == [5] and 7 not in store
    assert store.read(5)[2].tolist() == [[0.75]]


def test_stored_members_and_long_comments_are_read(tmp_path):
    store = CsvZipStore(tmp_path, num_shards=1, compression="stored")
    store.write(5, [1], [[1, 2, 3]], [[0.5, 1.0]])
    with zipfile.ZipFile(tmp_path / "0.zip") as archive:
        assert archive.getinfo("5.csv").compress_type == zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp_path / "0.zip", "a") as archive:
        archive.comment = b"c" * 40_000  # pushes the end record beyond the first tail read
    assert CsvZipStore(tmp_path, num_shards=1).read(5)[2].tolist() == [[0.5, 1.0]]


def test_non_zip_and_truncated_shards_raise_value_errors_naming_the_file(tmp_path):
    store = CsvZipStore(tmp_path, num_shards=1)
    (tmp_path / "0.zip").write_bytes(b"this is not a zip file at all" * 100)
    with pytest.raises(CsvZipError, match=re.escape(str(tmp_path / "0.zip")) + ".*not a zip"):
        store.read(1)
    store_ok = CsvZipStore(tmp_path / "ok", num_shards=1, compression="stored")
    store_ok.write(1, [1], [[1, 2, 3]], [[0.5] * 64])
    blob = (tmp_path / "ok" / "0.zip").read_bytes()
    (tmp_path / "0.zip").write_bytes(blob[: len(blob) // 2] + blob[-22:])  # data cut out
    with pytest.raises(CsvZipError, match=re.escape(str(tmp_path / "0.zip"))):
        CsvZipStore(tmp_path, num_shards=1).read(1)
    with pytest.raises(CsvZipError, match="corrupt zip"):
        store.write(1, [1], [[1, 2, 3]], [[0.5]], overwrite=True)


def test_flipped_byte_in_member_fails_the_crc(tmp_path):
    store = CsvZipStore(tmp_path, num_shards=1, compression="stored")
    store.write(1, [1], [[1, 2, 3]], [[0.123456789] * 8])
    blob = bytearray((tmp_path / "0.zip").read_bytes())
    at = blob.index(b"0.123456791")
    blob[at + 3] = ord("9")
    (tmp_path / "0.zip").write_bytes(bytes(blob))
    with pytest.raises(CsvZipError, match="CRC"):
        store.read(1)


def test_missing_segment_and_shard_raise_key_errors(tmp_path):
    store = CsvZipStore(tmp_path / "nowhere")
    with pytest.raises(KeyError, match=r"segment 5 .*nowhere/\d+\.zip"):
        store.read(5)
    assert 5 not in store
    store.write(5, [1], [[1, 2, 3]], [[0.5]])
    (six,), _shard = ids_in_same_shard(1, 10_000, start=6)
    with pytest.raises(KeyError, match=f"segment {six} is not in shard"):
        store.read(six)


def test_constructor_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="coordinates"):
        CsvZipStore(tmp_path, coordinates="microns")
    with pytest.raises(ValueError, match="unsupported store URL"):
        CsvZipStore("ftp://example.org/x")
    store = CsvZipStore(f"file://{tmp_path}")
    assert store.local_dir == tmp_path and not store.is_remote


# --------------------------------------------------------------------------- remote reads


class RangeRequestHandler(http.server.BaseHTTPRequestHandler):
    """GET with single byte ranges (``a-b``, ``a-``, ``-n``) and an ETag from mtime/size;
    records every request and the body bytes sent on the server object."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        server = self.server
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            server.log.append((self.path, self.headers.get("Range"), 0))
            return
        data = path.read_bytes()
        stat = path.stat()
        size = len(data)
        header = self.headers.get("Range")
        if header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", header)
            first, last = match.groups()
            if first == "":
                start, stop = max(0, size - int(last)), size
            else:
                start = int(first)
                stop = min(size, int(last) + 1) if last else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                server.log.append((self.path, header, 0))
                return
            body = data[start:stop]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{stat.st_mtime_ns}-{size}"')
        self.end_headers()
        with server.lock:  # before sending, so the client never sees an unlogged reply
            server.log.append((self.path, header, len(body)))
        self.wfile.write(body)


@pytest.fixture
def http_store_root(tmp_path):
    """A folder served over HTTP on localhost; yields (folder, base URL, request log)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    server.root = tmp_path
    server.log = []
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}/", server.log
    finally:
        server.shutdown()
        server.server_close()


def served_bytes(log, start=0):
    return sum(sent for _, _, sent in log[start:])


def test_remote_read_fetches_only_directory_and_member_and_caches_directory(http_store_root):
    root, url, log = http_store_root
    rng = np.random.default_rng(8)
    local = CsvZipStore(root / "emb", num_shards=1)
    segments = {sid: random_segment(rng, 20, 64, "nm") for sid in range(1, 201)}
    local.write_many(segments)
    shard_size = (root / "emb" / "0.zip").stat().st_size

    remote = CsvZipStore(url + "emb", num_shards=1)
    assert remote.is_remote
    assert_segment_equal(remote.read(17), segments[17])
    first_read = served_bytes(log)
    assert first_read < shard_size / 20, (first_read, shard_size)

    mark = len(log)
    assert_segment_equal(remote.read(150), segments[150])
    # Second member of the same shard: one ranged request for the member, no directory.
    assert len(log) - mark == 1
    path, byte_range, sent = log[-1]
    assert path == "/emb/0.zip" and re.fullmatch(r"bytes=\d+-\d+", byte_range)
    with zipfile.ZipFile(root / "emb" / "0.zip") as archive:
        info = archive.getinfo("150.csv")
    assert info.compress_size <= sent <= info.compress_size + 30 + 8 + 64
    assert 150 in remote and 100_000 not in remote
    assert len(log) - mark == 1  # membership answered from the cached directory

    # A whole-shard pass fetches the member data once, not member by member.
    mark = len(log)
    got = {segment_id: arrays for segment_id, *arrays in remote.iter_shard(0)}
    assert sorted(got) == sorted(segments)
    assert_segment_equal(got[99], segments[99])
    assert len(log) - mark <= 3 and served_bytes(log, mark) < 1.1 * shard_size


def test_remote_directory_beyond_first_tail_read(http_store_root):
    root, url, log = http_store_root
    local = CsvZipStore(root / "wide", num_shards=1)
    local.write_many({sid: ([1], [[1, 2, 3]], [[sid % 1000 / 8]]) for sid in range(10**9, 10**9 + 900)})
    remote = CsvZipStore(url + "wide", num_shards=1)
    assert remote.read(10**9 + 450)[2].tolist() == [[450 / 8]]
    # Tail, then the central directory (too big for the tail), then the member.
    assert len(log) == 3 and log[0][1] == "bytes=-16384"
    assert all(re.fullmatch(r"bytes=\d+-\d+", byte_range) for _, byte_range, _ in log[1:])
    assert served_bytes(log) < (root / "wide" / "0.zip").stat().st_size


def test_remote_zip64_small_file_and_missing_keys(http_store_root):
    root, url, _log = http_store_root
    (root / "z64").mkdir()
    members = [(f"{sid}.csv", f"{sid},1,2,3,0.5,0.25".encode()) for sid in range(1, 6)]
    (root / "z64" / "0.zip").write_bytes(handmade_zip64(members))  # smaller than the tail read
    remote = CsvZipStore(url + "z64", num_shards=1)
    assert remote.read(3)[0].tolist() == [3]
    with pytest.raises(KeyError, match=r"segment 9 is not in shard http://.*/z64/0\.zip"):
        remote.read(9)
    missing_shard_store = CsvZipStore(url + "nothing-here", num_shards=1)
    with pytest.raises(KeyError, match="segment 3"):
        missing_shard_store.read(3)
    assert 3 not in missing_shard_store


def test_remote_store_rereads_a_shard_that_changed(http_store_root):
    root, url, _log = http_store_root
    (first, second), _ = ids_in_same_shard(2, 10)
    local = CsvZipStore(root / "live", num_shards=10)
    local.write(first, [1], [[1, 2, 3]], [[1.0]])
    remote = CsvZipStore(url + "live", num_shards=10)
    remote.read(first)
    shard_file = root / "live" / f"{remote.shard_of(first)}.zip"
    local.write(second, [2], [[4, 5, 6]], [[2.0]])  # moves the first member's bytes
    os.utime(shard_file, ns=(1, 1))  # and gives the shard a new ETag
    # A cached directory is trusted for misses until a member read shows a new ETag ...
    assert second not in remote
    # ... which this read does: the directory is refetched and the read retried.
    assert remote.read(first)[2].tolist() == [[1.0]]
    assert remote.read(second)[2].tolist() == [[2.0]]
    remote.clear_cache()
    local.write(first, [3], [[1, 2, 3]], [[3.0]], overwrite=True)
    assert remote.read(first)[2].tolist() == [[3.0]]


def test_remote_stores_are_read_only_and_http_cannot_list(http_store_root):
    import io as _io

    _, url, _ = http_store_root
    remote = CsvZipStore(url + "emb", num_shards=1)
    with pytest.raises(_io.UnsupportedOperation, match="remote store"):
        remote.write(1, [1], [[1, 2, 3]], [[0.5]])
    with pytest.raises(_io.UnsupportedOperation, match="cannot list"):
        remote.shards()


def test_remote_store_over_a_listing_kvstore(tmp_path):
    """gs:// and s3:// list their keys; TensorStore's file kvstore stands in for them here
    (no bucket is reachable from the test machines)."""
    import tensorstore as ts

    rng = np.random.default_rng(9)
    local = CsvZipStore(tmp_path, num_shards=5)
    segments = {sid: random_segment(rng, 3, 8, "voxels") for sid in range(1, 30)}
    local.write_many(segments)
    remote = CsvZipStore("gs://example-bucket/embeddings", num_shards=5)
    remote._kvstore = ts.KvStore.open(f"file://{tmp_path}/").result()
    assert remote.is_remote and remote.shards() == local.shards()
    assert sorted(remote.segment_ids()) == sorted(segments)
    assert_segment_equal(remote.read(12), segments[12])
    assert remote.shard_location(3) == "gs://example-bucket/embeddings/3.zip"


def test_a_deflate_bomb_member_is_refused_before_it_is_inflated(tmp_path):
    shard = shard_for_segment(21, 4)
    with zipfile.ZipFile(tmp_path / f"{shard}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("21.csv", b"\n" * (64 * 1024 * 1024))  # 64 MiB of newlines, ~64 KiB deflated
    assert (tmp_path / f"{shard}.zip").stat().st_size < 1024 * 1024
    with pytest.raises(CsvZipError, match="refusing to inflate") as caught:
        CsvZipStore(tmp_path, num_shards=4).read(21)
    assert caught.value.path == str(tmp_path / f"{shard}.zip") and caught.value.member == "21.csv"


def test_real_members_stay_well_inside_the_inflate_limits(tmp_path):
    from segscope.analysis.csvzip import MAX_DEFLATE_RATIO

    rng = np.random.default_rng(0)
    store = CsvZipStore(tmp_path, num_shards=1)
    store.write(3, np.arange(200), rng.normal(size=(200, 3)) * 1e4, rng.normal(size=(200, 64)).astype(np.float32))
    with zipfile.ZipFile(tmp_path / "0.zip") as archive:
        (info,) = archive.infolist()
    assert info.file_size < MAX_DEFLATE_RATIO / 8 * info.compress_size  # real CSV deflates ~2-4x
    node_ids, _xyz, embeddings = store.read(3)
    assert len(node_ids) == 200 and embeddings.shape == (200, 64)
