"""The CLI's error boundary and parse-time argument checks (issue 15 items 4, 5, 7).

Every expected failure is one line ``segscope CMD: error: ...`` naming the file, URL or
argument, exit status 2; a bug is one line saying to run with ``-v`` (exit 1), and ``-v``
shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from segscope.app import cli_args
from segscope.app.cli import expected_failure_message, main


def _run(capsys, argv):
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse refuses the command line
        status = exc.code
    err = capsys.readouterr().err
    return status, err


# -- parse-time checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["embed", "--spacing-nm", "0"], "--spacing-nm"),
        (["embed", "--spacing-nm", "-100"], "--spacing-nm"),
        (["embed", "--spacing-nm", "nan"], "--spacing-nm"),
        (["embed", "--spacing-nm", "inf"], "--spacing-nm"),
        (["embed", "--batch-size", "0"], "--batch-size"),
        (["embed", "--min-voxels", "-3"], "--min-voxels"),
        (["embed", "--skeleton-box-vox", "1e9"], "--skeleton-box-vox"),
        (["embed", "--voxel-size-nm", "32,32"], "--voxel-size-nm"),
        (["embed", "--voxel-size-nm", "32,0,40"], "--voxel-size-nm"),
        (["train", "--steps", "-1"], "--steps"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--batch-pairs", "0"], "--batch-pairs"),
        (["train", "--learning-rate", "nan"], "--learning-rate"),
        (["train", "--eval-fraction", "1.5"], "--eval-fraction"),
        (["train", "--max-pair-distance-nm", "-5"], "--max-pair-distance-nm"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every"),
        (["train", "--seed", "-1"], "--seed"),
        (["export", "--voxel-size", "32,32"], "--voxel-size"),
        (["export", "--voxel-size", "-1,0,1e308"], "--voxel-size"),
        (["export", "--voxel-size", "a,b,c"], "--voxel-size"),
        (["evaluate", "--repeats", "0"], "--repeats"),
        (["evaluate", "--label-counts", "8", "-2"], "--label-counts"),
        (["evaluate", "--cell-type-radius-nm", "nan"], "--cell-type-radius-nm"),
        (["demo-data", "--size", "8"], "--size"),
        (["open", "--embeddings-shards", "0"], "--embeddings-shards"),
    ],
)
def test_numeric_arguments_are_checked_when_parsed(tmp_path, capsys, argv, option):
    required = {
        "embed": ["--image", "x", "--segmentation", "x", "--segments", "1", "--out", str(tmp_path / "e")],
        "train": ["--out", str(tmp_path / "run")],
        "export": ["--out", str(tmp_path / "b")],
        "evaluate": ["--run", str(tmp_path), "--out", str(tmp_path / "e")],
        "demo-data": ["--out", str(tmp_path / "d")],
        "open": [],
    }[argv[0]]
    status, err = _run(capsys, [argv[0], *required, *argv[1:]])
    assert status == 2
    assert option in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_validators_accept_good_values_and_refuse_bad_ones():
    assert cli_args.positive_float()("1500") == 1500.0
    assert cli_args.voxel_size_nm("32, 32,40") == (32.0, 32.0, 40.0)
    assert cli_args.positive_int("7") == 7
    assert cli_args.fraction(allow_zero=False)("0.25") == 0.25
    for parse, text in [
        (cli_args.positive_float(), "1e308"),
        (cli_args.positive_float(allow_zero=True), "-0.1"),
        (cli_args.positive_int, "1.5"),
        (cli_args.positive_int, "0x10"),
        (cli_args.voxel_size_nm, "1,2,3,4"),
        (cli_args.voxel_size_nm, "nan,1,1"),
        (cli_args.fraction(), "1"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_output_paths_are_checked_when_parsed(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    status, err = _run(capsys, ["demo-data", "--out", str(a_file)])
    assert status == 2 and "is a file" in err and "Traceback" not in err
    status, err = _run(capsys, ["demo-data", "--out", str(a_file / "below")])
    assert status == 2 and f"{a_file} is a file" in err
    status, err = _run(capsys, ["export", "--out", str(a_file)])
    assert status == 2 and "is a file" in err
    assert cli_args.output_problem(tmp_path / "new" / "deeper", kind="dir") is None


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/proc/self/mountinfo").exists(), reason="needs a read-only mount")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    """/proc is mounted read-only-ish for writes: a root process cannot create files there."""
    status, err = _run(capsys, ["demo-data", "--out", "/proc/segscope-demo"])
    assert status == 2 and "not writable" in err and "Traceback" not in err


# -- the error boundary ----------------------------------------------------------------


def _fail_with(monkeypatch, exc):
    from segscope.app import cli

    def handler(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_info", handler)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.zip"), "/data/out/x.zip: no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/bundle"), "/ro/bundle: read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
        (TimeoutError("reading http://h/0.zip: no answer within 30 s"), "no answer within 30 s"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (MemoryError(), "not enough memory"),
        (ValueError("Cannot load file containing pickled data when allow_pickle=False"), "not a NumPy"),
        (KeyError("segment 5 not found"), "segment 5 not found"),
    ],
)
def test_expected_failures_are_one_line_with_status_2(monkeypatch, capsys, exc, expected):
    _fail_with(monkeypatch, exc)
    status, err = _run(capsys, ["info", "x"])
    assert status == 2
    assert err.startswith("segscope info: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err and "allow_pickle" not in err


def test_a_bug_says_run_with_v_and_v_shows_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, AttributeError("'NoneType' object has no attribute 'shape'"))
    status, err = _run(capsys, ["info", "x"])
    assert status == 1 and "run with -v" in err and "AttributeError" in err and "Traceback" not in err
    with pytest.raises(AttributeError):
        main(["-v", "info", "x"])


def test_unknown_classes_are_bugs_and_messages_are_one_line():
    assert expected_failure_message(TypeError("x")) is None
    assert expected_failure_message(ValueError("a\nb")) == "a b"


# -- files the CLI reads ----------------------------------------------------------------


def test_evaluate_names_a_broken_split_json(tmp_path, capsys, demo96_dir):
    (tmp_path / "split.json").write_text("{not json")
    status, err = _run(
        capsys, ["evaluate", "--run", str(tmp_path), "--out", str(tmp_path / "e"), "--dataset", str(demo96_dir)]
    )
    assert status == 2 and str(tmp_path / "split.json") in err and "Traceback" not in err
    (tmp_path / "split.json").write_text("[" * 100_000 + "]" * 100_000)
    status, err = _run(
        capsys, ["evaluate", "--run", str(tmp_path), "--out", str(tmp_path / "e"), "--dataset", str(demo96_dir)]
    )
    assert status == 2 and str(tmp_path / "split.json") in err


def test_info_refuses_absurd_voxel_sizes(tmp_path, capsys):
    from segscope.analysis.volume import write_volume

    write_volume(tmp_path / "v", np.zeros((4, 4, 4), np.uint8), (32, 32, 40))
    info_path = tmp_path / "v" / "info"
    info = json.loads(info_path.read_text())
    for bad in ([-1, 32, 40], [0, 32, 40], [1e308, 32, 40]):
        info["scales"][0]["resolution"] = bad
        info_path.write_text(json.dumps(info))
        status, err = _run(capsys, ["info", str(tmp_path / "v")])
        assert status == 2 and "Traceback" not in err, err
        assert str(tmp_path / "v") in err


def test_export_with_bad_tables_is_one_line(tmp_path, capsys):
    (tmp_path / "n.csv").write_text("segment_id,node_id,x_nm,y_nm,z_nm\n")
    (tmp_path / "s.csv").write_text("segment_id,cell_type\nabc,def\n")
    argv = ["export", "--out", str(tmp_path / "b"), "--nodes", str(tmp_path / "n.csv")]
    status, err = _run(capsys, [*argv, "--segments", str(tmp_path / "s.csv"), "--voxel-size", "32,32,40"])
    assert status == 2 and "Traceback" not in err
    assert not (tmp_path / "b").exists()


# -- embed checks its output before any work --------------------------------------------


@pytest.mark.parametrize("case", ["file", "store", "missing-parent"])
def test_embed_checks_the_output_before_computing(tmp_path, capsys, monkeypatch, demo96_dir, case):
    import segscope.analysis.encoder as encoder_module

    def no_compute(*args, **kwargs):
        raise AssertionError("embed loaded the encoder before checking its output")

    monkeypatch.setattr(encoder_module, "open_encoder", no_compute)
    out = tmp_path / "store"
    if case == "file":
        out.write_text("x")
    elif case == "store":
        out.mkdir()
        (out / "17.zip").write_bytes(b"PK")
    else:
        out = tmp_path / "no" / "such" / "e.parquet"
    argv = [
        "embed", "--image", str(demo96_dir / "image"), "--segmentation", str(demo96_dir / "segmentation"),
        "--segments", "1", "--out", str(out),
    ]  # fmt: skip
    status, err = _run(capsys, argv)
    assert status == 2 and "Traceback" not in err and "AssertionError" not in err, err
    assert {"file": "is a file", "store": "--force", "missing-parent": "does not exist"}[case] in err
