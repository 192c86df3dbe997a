"""Run bad command lines against ``segscope`` and count how each one ends (issue 15's table).

Each input runs in its own subprocess with a deadline. Outcomes:

- clean: exit status 2 with an ``error:`` line and no traceback (argparse's usage line counts);
- traceback: a Python traceback reached the terminal;
- bug: exit status 1, the CLI's "internal error ... run with -v" line (a bug, without traceback);
- accepted: exit status 0 for an input that should have been refused;
- hang: still running at the deadline (killed);
- crash: killed by a signal or an exit status other than 0, 1, 2.

A case may also name a file that must survive untouched ("data lost" otherwise).

    .venv/bin/python scripts/probe_bad_inputs.py [--jobs 2] [--timeout 120] [--only WORD]

Prints one line per input and the table. Needs nothing but the project (it writes a 64^3
demo dataset and the bad files into a temporary folder; remote cases use loopback sockets).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEGSCOPE = [sys.executable, "-m", "segscope.app.cli"]


@dataclass
class Case:
    name: str
    argv: list[str]
    keep: list[Path] = field(default_factory=list)  # files that must survive unchanged


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("".join(sorted(str(p) for p in path.rglob("*"))).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def _prepare(root: Path) -> dict[str, str]:
    """Bad files and servers; returns names for the case list."""
    demo = root / "demo"
    subprocess.run([*SEGSCOPE, "demo-data", "--out", str(demo), "--size", "64"], check=True, capture_output=True)
    (root / "a_file").write_text("x")
    store = root / "store"
    store.mkdir()
    (store / "0.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    (root / "nodes_text.csv").write_text("segment_id,node_id,x_nm,y_nm,z_nm\n1,1,a,b,c\n")
    (root / "nodes_empty.csv").write_text("segment_id,node_id,x_nm,y_nm,z_nm\n")
    (root / "segments.csv").write_text("segment_id,cell_type\n1,x\n")
    deep = root / "deep_classifiers"
    deep.mkdir()
    (deep / "classifiers.json").write_text("[" * 200_000 + "]" * 200_000)
    nan_dir = root / "nan_classifiers"
    shutil.copytree(REPO / "assets" / "classifiers", nan_dir)
    import numpy as np

    with np.load(nan_dir / "cell_type.npz", allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    key = next(k for k in arrays if k.startswith("weight_") and arrays[k].dtype.kind == "f" and arrays[k].size)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan
    np.savez(nan_dir / "cell_type.npz", **arrays)
    not_npz = root / "notnpz_classifiers"
    shutil.copytree(REPO / "assets" / "classifiers", not_npz)
    (not_npz / "cell_type.npz").write_bytes(b"\x80\x04not numpy at all" * 10)
    source = REPO / "assets" / "demo_encoder.keras"
    with zipfile.ZipFile(source) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    evil = json.loads(json.dumps(config))
    evil["config"]["layers"] = [{"module": "os", "class_name": "system", "config": {"command": "true"}}]
    huge = json.loads(json.dumps(config))
    huge["config"]["encoder_config"]["input_size_vox"] = [10**6] * 3
    for name, cfg in (("evil.keras", evil), ("huge.keras", huge)):
        with zipfile.ZipFile(root / name, "w") as archive:
            for member, blob in {**members, "config.json": json.dumps(cfg).encode()}.items():
                archive.writestr(member, blob)
    (root / "cut.keras").write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
    run = root / "run"
    run.mkdir()
    (run / "split.json").write_text("{broken")
    for bad, voxel in (("vox_neg", [-1, 32, 40]), ("vox_zero", [0, 32, 40]), ("vox_huge", [1e308, 32, 40])):
        shutil.copytree(demo / "image", root / bad)
        info = json.loads((root / bad / "info").read_text())
        info["scales"][0]["resolution"] = voxel
        (root / bad / "info").write_text(json.dumps(info))
    session = root / "deep.segscope.json"
    session.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    _prepare.hole = hole  # type: ignore[attr-defined]  # kept open for the run
    from segscope.analysis.dataset import open_dataset

    return {
        "segment": str(int(open_dataset(demo).segment_ids[0])),
        "root": str(root),
        "demo": str(demo),
        "hole": f"http://127.0.0.1:{hole.getsockname()[1]}",
        "closed": f"http://127.0.0.1:{closed_port}",
    }


def _cases(p: dict[str, str]) -> list[Case]:
    root, demo = Path(p["root"]), p["demo"]
    img, seg = f"{demo}/image", f"{demo}/segmentation"
    embed = ["embed", "--image", img, "--segmentation", seg, "--segments", p["segment"]]
    hole, closed = f"{p['hole']}/x", f"{p['closed']}/x"
    out = ["--out", f"{root}/e.parquet"]
    cases = [
        Case("info missing", ["info", f"{root}/missing"]),
        Case("info ftp", ["info", "ftp://host/x"]),
        Case("info closed port", ["info", f"{p['closed']}/vol"]),
        Case("info black hole", ["info", f"{p['hole']}/vol"]),
        Case("info gs no network", ["info", "gs://no-such-bucket-segscope/vol"]),
        Case("info a file", ["info", f"{root}/a_file"]),
        Case("info voxel -1", ["info", f"{root}/vox_neg"]),
        Case("info voxel 0", ["info", f"{root}/vox_zero"]),
        Case("info voxel 1e308", ["info", f"{root}/vox_huge"]),
        Case("embed spacing 0", [*embed, *out, "--spacing-nm", "0"]),
        Case("embed spacing -100", [*embed, *out, "--spacing-nm", "-100"]),
        Case("embed spacing nan", [*embed, *out, "--spacing-nm", "nan"]),
        Case("embed batch 0", [*embed, *out, "--batch-size", "0"]),
        Case("embed voxel 32,32", [*embed, *out, "--voxel-size-nm", "32,32"]),
        Case("embed ids 0", ["embed", "--image", img, "--segmentation", seg, "--segments", "0", *out]),
        Case("embed out is a file", [*embed, "--out", f"{root}/a_file"], keep=[root / "a_file"]),
        Case("embed out missing dir", [*embed, "--out", f"{root}/no/such/e.parquet"]),
        Case("embed out read-only", [*embed, "--out", "/proc/segscope-e.parquet"]),
        Case("embed existing store", [*embed, "--out", f"{root}/store"], keep=[root / "store"]),
        Case("embed image black hole", ["embed", "--image", hole, "--segmentation", seg, "--segments", "1", *out]),
        Case("embed image closed port", ["embed", "--image", closed, "--segmentation", seg, "--segments", "1", *out]),
        Case("embed keras os.system", [*embed, *out, "--checkpoint", f"{root}/evil.keras"]),
        Case("embed keras truncated", [*embed, *out, "--checkpoint", f"{root}/cut.keras"]),
        Case("embed keras huge input", [*embed, *out, "--checkpoint", f"{root}/huge.keras"]),
        Case("embed deep classifiers.json", [*embed, *out, "--classifiers", f"{root}/deep_classifiers"]),
        Case("embed NaN classifier", [*embed, *out, "--classifiers", f"{root}/nan_classifiers"]),
        Case("embed non-npz classifier", [*embed, *out, "--classifiers", f"{root}/notnpz_classifiers"]),
        Case("embed segments-file missing", [*embed[:5], "--segments-file", f"{root}/missing.txt", *out]),
        Case("embed bbox garbage", [*embed, *out, "--bbox", "1,2,x"]),
        Case("embed unknown segment", [*embed[:5], "--segments", "999999999", *out]),
        Case("similar remote CSV ZIP black hole", ["similar", "--embeddings", f"{p['hole']}/store", "--segment", "5"]),
        Case("similar remote CSV ZIP closed", ["similar", "--embeddings", f"{p['closed']}/store", "--segment", "5"]),
        Case("export nodes missing", ["export", "--out", f"{root}/b", "--nodes", f"{root}/missing.csv",
                                      "--segments", f"{root}/segments.csv", "--voxel-size", "32,32,40"]),
        Case("train steps -1", ["train", "--out", f"{root}/t", "--steps", "-1"]),
        Case("train batch-pairs 0", ["train", "--out", f"{root}/t", "--batch-pairs", "0"]),
        Case("train lr nan", ["train", "--out", f"{root}/t", "--learning-rate", "nan"]),
        Case("train out read-only", ["train", "--out", "/proc/segscope-run"]),
        Case("demo-data out file", ["demo-data", "--out", f"{root}/a_file"], keep=[root / "a_file"]),
        Case("demo-data size 8", ["demo-data", "--out", f"{root}/d", "--size", "8"]),
        Case("demo-data read-only", ["demo-data", "--out", "/proc/segscope-demo"]),
        Case("demo-data existing", ["demo-data", "--out", demo, "--size", "64"], keep=[Path(demo)]),
        Case("export voxel 32,32", ["export", "--out", f"{root}/b", "--nodes", f"{root}/nodes_text.csv",
                                     "--segments", f"{root}/segments.csv", "--voxel-size", "32,32"]),
        Case("export text coordinates", ["export", "--out", f"{root}/b", "--nodes", f"{root}/nodes_text.csv",
                                          "--segments", f"{root}/segments.csv", "--voxel-size", "32,32,40"]),
        Case("export header-only", ["export", "--out", f"{root}/b", "--nodes", f"{root}/nodes_empty.csv",
                                     "--segments", f"{root}/segments.csv", "--voxel-size", "32,32,40"]),
        Case("export read-only", ["export", "--out", "/proc/segscope-bundle", "--dataset", demo]),
        Case("export existing", ["export", "--out", f"{root}/store", "--dataset", demo], keep=[root / "store"]),
        Case("evaluate broken split", ["evaluate", "--run", f"{root}/run", "--out", f"{root}/ev", "--dataset", demo]),
        Case("evaluate repeats 0", ["evaluate", "--run", f"{root}/run", "--out", f"{root}/ev", "--repeats", "0"]),
        Case("open shards 0", ["open", "--embeddings-shards", "0"]),
        Case("open deep session", ["open", "--session", f"{root}/deep.segscope.json"]),
    ]  # fmt: skip
    return cases


def _run(case: Case, timeout: float) -> tuple[str, str, float]:
    before = {path: _digest(path) for path in case.keep}
    env = dict(os.environ, SEGSCOPE_REMOTE_TIMEOUT_S="10", QT_QPA_PLATFORM="offscreen")
    start = time.monotonic()
    try:
        run = subprocess.run(
            [*SEGSCOPE, *case.argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return "hang", "", time.monotonic() - start
    seconds = time.monotonic() - start
    err = run.stderr.strip()
    if any(_digest(path) != digest for path, digest in before.items()):
        outcome = "data lost"
    elif "Traceback" in err:
        outcome = "traceback"
    elif run.returncode < 0 or run.returncode not in (0, 1, 2):
        outcome = "crash"
    elif run.returncode == 0:
        outcome = "accepted"
    elif run.returncode == 1:
        outcome = "bug"
    else:
        outcome = "clean" if "error:" in err else "crash"
    last = err.splitlines()[-1] if err else ""
    return outcome, last, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before an input counts as a hang")
    parser.add_argument("--only", help="run the inputs whose name contains this word")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segscope-probe-") as folder:
        cases = _cases(_prepare(Path(folder)))
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        counts: dict[str, int] = {}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for case, (outcome, line, seconds) in zip(cases, pool.map(lambda c: _run(c, args.timeout), cases)):
                counts[outcome] = counts.get(outcome, 0) + 1
                print(f"{outcome:10s} {seconds:6.1f} s  {case.name:30s} {line[:150]}", flush=True)
    print()
    print(f"inputs tried: {len(cases)}")
    for outcome in ("clean", "traceback", "bug", "accepted", "hang", "crash", "data lost"):
        print(f"  {outcome:10s} {counts.get(outcome, 0)}")
    bad = sum(counts.get(k, 0) for k in ("traceback", "bug", "accepted", "hang", "crash", "data lost"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
