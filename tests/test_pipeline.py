"""``segscope pipeline embed`` on Apache Beam's local runner: same rows as ``segscope embed``,
SegCLR's layout, resumable shard by shard."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="the beam extra is not installed: pip install -e '.[beam]'")

from segscope.analysis.artefacts import find_demo_classifiers
from segscope.analysis.csvzip import CsvZipStore, shard_for_segment
from segscope.analysis.pipeline.job import (
    EmbedJob,
    OutputLayout,
    plan_shards,
    prepare_output,
    read_marker,
    split_finished,
)

# Beam's own deprecation notes (its use of pkg_resources, grpc options...) are not SegScope's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")


def _read_table(path) -> dict[str, np.ndarray]:
    """Every column of a Parquet file or folder, rows sorted by (segment_id, node_id)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    order = np.lexsort((table["node_id"].to_numpy(), table["segment_id"].to_numpy()))
    out = {}
    for name in table.column_names:
        column = table[name]
        if str(column.type).startswith("dictionary") or str(column.type) in ("string", "bool"):
            values = np.array(column.to_pylist(), dtype=object)
        else:
            values = column.to_numpy(zero_copy_only=False)
        out[name] = values[order]
    return out


def _assert_same_rows(expected: dict, got: dict, *, atol: float = 1e-5) -> None:
    assert sorted(expected) == sorted(got)
    np.testing.assert_array_equal(got["segment_id"], expected["segment_id"])
    np.testing.assert_array_equal(got["node_id"], expected["node_id"])
    for axis in ("x_nm", "y_nm", "z_nm"):
        np.testing.assert_array_equal(got[axis], expected[axis])
    dims = [name for name in expected if name.startswith("e") and name[1:].isdigit()]
    assert len(dims) > 1
    for name in dims:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol)
    for name in ("compartment", "cell_type", "ood"):
        if name in expected:
            assert list(got[name]) == list(expected[name])
    for name in ("compartment_probability", "cell_type_probability", "ood_score"):
        if name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-4)


def _segclr_read(store: Path, segment_id: int, num_shards: int = 10_000, bytewidth: int = 64) -> np.ndarray:
    """Read a segment the way SegCLR's reader does: md5 shard, ``{shard}.zip``, ``{id}.csv``, split lines."""
    digest = hashlib.md5(int(segment_id).to_bytes(bytewidth, "little")).digest()
    shard = int.from_bytes(digest, "little") % num_shards
    with zipfile.ZipFile(store / f"{shard}.zip") as archive:
        text = archive.read(f"{segment_id}.csv").decode()
    return np.array([[float(v) for v in line.split(",")] for line in text.split("\n")])


def _segment_ids(dataset: Path, count: int | None = None) -> list[int]:
    import pyarrow.parquet as pq

    ids = [int(s) for s in pq.read_table(dataset / "segments.parquet")["segment_id"].to_pylist()]
    return ids if count is None else ids[:count]


def _embed_in_process(dataset: Path, out: Path, ids: list[int] | str, *extra: str) -> None:
    from segscope.app import cli

    segments = ids if isinstance(ids, str) else ",".join(str(s) for s in ids)
    status = cli.main(
        [
            "embed",
            "--image",
            str(dataset / "image"),
            "--segmentation",
            str(dataset / "segmentation"),
            "--segments",
            segments,
            "--precision",
            "float32",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert status == 0


def _pipeline(dataset: Path, out: Path, ids: list[int] | str, *extra: str) -> int:
    from segscope.app import cli

    segments = ids if isinstance(ids, str) else ",".join(str(s) for s in ids)
    return cli.main(
        [
            "pipeline",
            "embed",
            "--image",
            str(dataset / "image"),
            "--segmentation",
            str(dataset / "segmentation"),
            "--segments",
            segments,
            "--precision",
            "float32",
            "--out",
            str(out),
            *extra,
        ]
    )


# -- the equality test (default run) ------------------------------------------------------


def test_pipeline_rows_equal_segscope_embed_rows(demo96_dir, tmp_path, capsys):
    """Pipeline on the local runner vs in-process ``segscope embed``: every row, ids, positions,
    embeddings and predictions; the CSV ZIP store reads back with SegCLR's reading recipe."""
    ids = _segment_ids(demo96_dir, 10)
    classifiers = str(find_demo_classifiers())
    _embed_in_process(demo96_dir, tmp_path / "in_process.parquet", ids, "--classifiers", classifiers)
    out = tmp_path / "run"
    status = _pipeline(
        demo96_dir, out, ids, "--classifiers", classifiers, "--format", "csvzip,parquet", "--aggregate-um", "10"
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert f"{len(ids)} segments" in printed

    expected = _read_table(tmp_path / "in_process.parquet")
    got = _read_table(out / "parquet")
    assert len(got["segment_id"]) >= len(ids)
    _assert_same_rows(expected, got)

    dims = [f"e{d}" for d in range(sum(1 for n in expected if n.startswith("e") and n[1:].isdigit()))]
    for segment_id in ids:
        rows = expected["segment_id"] == segment_id
        stored = _segclr_read(out / "csvzip", segment_id)
        stored = stored[np.argsort(stored[:, 0], kind="stable")]
        np.testing.assert_array_equal(stored[:, 0], expected["node_id"][rows])
        np.testing.assert_allclose(
            stored[:, 1:4], np.stack([expected[a][rows] for a in ("x_nm", "y_nm", "z_nm")], 1), atol=1e-9
        )
        np.testing.assert_allclose(stored[:, 4:], np.stack([expected[d][rows] for d in dims], 1), atol=1e-5)

    # The aggregated store holds each node's mean over its segment's nodes within 10 um.
    from segscope.analysis.aggregate import aggregate_embeddings

    aggregated = CsvZipStore(out / "aggregated_10um", coordinates="nm")
    for segment_id in ids:
        node_ids, xyz, embeddings = CsvZipStore(out / "csvzip", coordinates="nm").read(segment_id)
        agg_nodes, _, agg = aggregated.read(segment_id)
        np.testing.assert_array_equal(agg_nodes, node_ids)
        np.testing.assert_allclose(agg, aggregate_embeddings(xyz, embeddings, 10_000.0), atol=1e-5)

    # Every shard is marked, and a rerun skips them all.
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["settings"]["precision"] == "float32"
    shards = {shard_for_segment(s) for s in ids}
    assert {int(p.stem) for p in (out / "done").glob("*.json")} == shards
    assert (
        _pipeline(
            demo96_dir, out, ids, "--classifiers", classifiers, "--format", "csvzip,parquet", "--aggregate-um", "10"
        )
        == 0
    )
    assert f"0 shards written, {len(shards)} already finished" in capsys.readouterr().out


# -- planning, markers and partial shards (no Beam run) ---------------------------------


def _job(out: Path, **changes) -> EmbedJob:
    settings = dict(
        image="image",
        segmentation="segmentation",
        out=str(out),
        encoder_path="encoder.keras",
        encoder_config={},
        precision="float32",
        formats=("csvzip", "parquet"),
        aggregate_radii_nm=(10_000.0,),
        provenance={"model_sha256": "0" * 64},
    )
    settings.update(changes)
    return EmbedJob(**settings)


def test_plan_groups_segments_by_segclr_shard():
    ids = [7, 11, 123456789, 2**63 + 5, 42, 7]
    tasks = plan_shards(ids, num_shards=3)
    assert [t.shard for t in tasks] == sorted({shard_for_segment(s, 3) for s in ids})
    for task in tasks:
        assert all(shard_for_segment(s, 3) == task.shard for s in task.segment_ids)
    assert sorted(s for t in tasks for s in t.segment_ids) == sorted(set(ids))
    with pytest.raises(ValueError, match=r"not in 1\.\.2"):
        plan_shards([0])


def test_rerun_with_other_settings_is_refused_unless_forced(tmp_path):
    out = tmp_path / "run"
    prepare_output(_job(out))
    prepare_output(_job(out))  # same settings: a resume
    with pytest.raises(ValueError, match=r"spacing_nm: 1500.0 then, 1000.0 now"):
        prepare_output(_job(out, spacing_nm=1000.0))
    (out / "done").mkdir()
    (out / "done" / "5.json").write_text("{}")
    prepare_output(_job(out, spacing_nm=1000.0), force=True)
    assert not (out / "done").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pipeline output"):
        prepare_output(_job(other))


def test_a_shard_killed_while_writing_is_redone_and_never_marked(tmp_path, monkeypatch):
    """A failure after the CSV ZIP shard is in place but before the marker: the shard is
    whole but unmarked, so the rerun redoes it; the marker appears only once all is written."""
    from segscope.analysis.pipeline import stages

    job = _job(tmp_path / "run", num_shards=4)
    prepare_output(job)
    shard = shard_for_segment(3, 4)
    ids = [3, next(s for s in range(4, 100) if shard_for_segment(s, 4) == shard)]
    rng = np.random.default_rng(0)
    chunks = [
        stages.EmbeddedChunk(shard, s, c, np.arange(2) + 2 * c, rng.uniform(0, 5000, (2, 3)), rng.normal(size=(2, 8)))
        for s in ids
        for c in (1, 0)  # chunks arrive in any order
    ]
    rows = stages.assemble_shard(shard, chunks)
    np.testing.assert_array_equal(rows.node_ids, [0, 1, 2, 3, 0, 1, 2, 3])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("segscope.analysis.aggregate.aggregate_embeddings", killed)
    with pytest.raises(KeyboardInterrupt):
        stages.write_shard(job, rows)
    store = CsvZipStore(job.layout.csvzip, num_shards=4, coordinates="nm")
    assert store.segment_ids_in_shard(shard).tolist() == sorted(ids)  # the zip itself is whole
    assert read_marker(job.layout, shard) is None
    todo, finished = split_finished(job.layout, plan_shards(ids, num_shards=4))
    assert finished == [] and [t.shard for t in todo] == [shard]
    assert not list(job.layout.root.rglob("*.tmp"))

    monkeypatch.undo()
    marker = stages.write_shard(job, rows, precision="float32")
    assert read_marker(job.layout, shard) == marker
    assert marker.segment_ids == tuple(sorted(ids)) and marker.nodes == 8
    todo, finished = split_finished(job.layout, plan_shards(ids, num_shards=4))
    assert todo == [] and len(finished) == 1
    aggregated = CsvZipStore(job.layout.aggregated(10_000.0), num_shards=4, coordinates="nm")
    assert aggregated.read(ids[1])[0].tolist() == [0, 1, 2, 3]


def test_chunks_with_a_gap_are_refused():
    from segscope.analysis.pipeline import stages

    chunk = stages.EmbeddedChunk(1, 5, 1, np.arange(2), np.zeros((2, 3)), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="segment 5 has chunks"):
        stages.assemble_shard(1, [chunk])


# -- slow: the whole demo volume, two worker processes, and a failed run resumed --------


@pytest.mark.slow
def test_whole_demo_volume_on_two_workers_equals_in_process(demo96_dir, tmp_path):
    _embed_in_process(demo96_dir, tmp_path / "in_process.parquet", "all")
    out = tmp_path / "run"
    assert _pipeline(demo96_dir, out, "all", "--format", "parquet", "--direct_num_workers", "2") == 0
    _assert_same_rows(_read_table(tmp_path / "in_process.parquet"), _read_table(out / "parquet"))


@pytest.mark.slow
def test_a_failed_run_resumes_from_its_finished_waves(demo96_dir, tmp_path, capsys):
    """One wave fails on a segment the volume does not hold; the waves before it stay
    finished, the failed wave leaves no files, and the rerun without the bad id does only
    the rest and ends equal to a clean run."""
    ids = _segment_ids(demo96_dir, 12)
    tasks = plan_shards(ids)
    missing = next(s for s in range(10**12, 10**12 + 10_000) if shard_for_segment(s) > tasks[3].shard and s not in ids)
    bad_shard = shard_for_segment(missing)
    out = tmp_path / "run"
    status = _pipeline(demo96_dir, out, [*ids, missing], "--format", "csvzip,parquet", "--wave-shards", "4")
    assert status == 2
    assert f"segment {missing}" in capsys.readouterr().err
    done_before = {int(p.stem) for p in (out / "done").glob("*.json")}
    assert {t.shard for t in tasks[:4]} <= done_before
    assert bad_shard not in done_before
    for shard in done_before:  # every marked shard is whole
        marker = read_marker(OutputLayout(out), shard)
        assert marker is not None
        for segment_id in marker.segment_ids:
            assert _segclr_read(out / "csvzip", segment_id).shape[1] > 4
    wave_of_bad = [t.shard for t in plan_shards([*ids, missing])]
    first_failed = (wave_of_bad.index(bad_shard) // 4) * 4
    for shard in wave_of_bad[first_failed : first_failed + 4]:
        assert not (out / "csvzip" / f"{shard}.zip").exists()
        assert not (out / "parquet" / f"shard-{shard}.parquet").exists()

    assert _pipeline(demo96_dir, out, ids, "--format", "csvzip,parquet", "--wave-shards", "4") == 0
    printed = capsys.readouterr().out
    assert f"{len(tasks) - len(done_before & {t.shard for t in tasks})} shards written" in printed
    clean = tmp_path / "clean"
    assert _pipeline(demo96_dir, clean, ids, "--format", "parquet") == 0
    _assert_same_rows(_read_table(clean / "parquet"), _read_table(out / "parquet"), atol=0)


def test_bad_inputs_fail_in_one_line_before_any_runner_starts(demo96_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = tmp_path / "nowhere"
    assert _pipeline(demo96_dir, tmp_path / "a", [1], "--checkpoint", str(missing)) == 2
    assert str(missing) in capsys.readouterr().err
    table = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"segment": [1, 2]}), table)
    assert _pipeline(demo96_dir, tmp_path / "b", str(table)) == 2
    err = capsys.readouterr().err
    assert "no segment_id column" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [line for line in err.splitlines() if line]
    assert not (tmp_path / "b" / "done").exists()
