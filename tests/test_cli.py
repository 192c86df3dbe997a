"""The segscope command line: fast help, clear errors, the data commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segscope.app.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_imports_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from segscope.app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'umap', 'PyQt6', 'tensorstore', 'numba') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info_prints_shape_and_voxel_size(tmp_path, capsys):
    from segscope.analysis.volume import write_volume

    write_volume(tmp_path / "img", np.zeros((20, 30, 40), np.uint8), (32, 32, 40))
    assert main(["info", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "20 x 30 x 40 voxels" in out and "32 x 32 x 40 nm" in out and "neuroglancer_precomputed" in out


def test_file_server_request_lines_stay_off_the_terminal_unless_verbose(tmp_path, monkeypatch):
    """The page's 404s for never-written (empty) chunks are logged by tornado at WARNING."""
    import logging

    from segscope.analysis.volume import write_volume

    write_volume(tmp_path / "img", np.zeros((4, 4, 4), np.uint8), (32, 32, 40))
    access = logging.getLogger("tornado.access")
    monkeypatch.setattr(access, "level", logging.NOTSET)
    monkeypatch.setenv("SEGSCOPE_VERBOSE", "0")  # restored afterwards: -v below sets it
    assert main(["info", str(tmp_path / "img")]) == 0
    assert not access.isEnabledFor(logging.WARNING)
    access.setLevel(logging.NOTSET)
    assert main(["-v", "info", str(tmp_path / "img")]) == 0
    assert access.isEnabledFor(logging.WARNING)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "/nonexistent/volume"], "does not exist"),
        (["info", "ftp://host/x"], "unsupported URL scheme"),
        (["export", "--out", "{tmp}/b", "--nodes", "{tmp}/n.parquet"], "--nodes and --segments go together"),
        (["evaluate", "--run", "{tmp}", "--out", "{tmp}/e", "--dataset", "{tmp}/nodata"], "does not exist"),
        (["evaluate", "--run", "{tmp}", "--out", "{tmp}/e"], "split.json not found"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("segscope ") and message in err and "Traceback" not in err


def test_demo_data_then_export_ground_truth(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--size", "64", "--seed", "3"]) == 0
    assert (tmp_path / "demo" / "dataset.json").is_file()
    # Refuses to overwrite without --force.
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--size", "64"]) == 2
    assert main(["export", "--dataset", str(tmp_path / "demo"), "--out", str(tmp_path / "bundle")]) == 0
    state = json.loads((tmp_path / "bundle" / "state.json").read_text())
    assert {layer["name"] for layer in state["layers"]} >= {"image", "segmentation"}
    import pyarrow.parquet as pq

    nodes = pq.read_table(tmp_path / "bundle" / "nodes.parquet")
    truth = pq.read_table(tmp_path / "demo" / "nodes.parquet")
    assert nodes.num_rows == truth.num_rows
    assert main(["export", "--dataset", str(tmp_path / "demo"), "--out", str(tmp_path / "bundle")]) == 2
    assert "exists" in capsys.readouterr().err


def test_embed_keeps_tensorflow_start_up_lines_off_the_terminal(tmp_path):
    """TensorFlow 2.21 prints oneDNN, cudart and cuInit lines on import whatever its log
    level says; ``embed`` hides them (``-v`` shows them) before its progress bar."""
    import os
    import re

    from segscope.analysis.dataset import open_dataset

    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--size", "64", "--seed", "0"]) == 0
    segment_id = int(open_dataset(tmp_path / "demo").segment_ids[0])
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "SEGSCOPE_VERBOSE")}
    argv = [
        sys.executable, "-m", "segscope.app.cli", "embed",
        "--image", str(tmp_path / "demo" / "image"), "--segmentation", str(tmp_path / "demo" / "segmentation"),
        "--segments", str(segment_id), "--out", str(tmp_path / "e.parquet"),
    ]  # fmt: skip
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    noise = re.compile(r"cuInit|cudart|CUDA|oneDNN|absl|tensorflow|^[IWE]\d{4} ", re.MULTILINE)
    assert not noise.search(run.stderr), run.stderr
    assert "embed" in run.stderr  # the progress bar is still there
    assert (tmp_path / "e.parquet").is_file()
