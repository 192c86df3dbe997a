"""Outputs appear whole or not at all, and a killed run's leftovers go at the next run (issue 15 item 6).

The fault tests run the real CLI in a subprocess and SIGKILL it at random moments; after each
kill the output is either absent or equal (file for file) to a complete one, and the next run
removes the hidden ``.NAME.<pid>.*.tmp`` / ``.old`` siblings the killed one left.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.export.atomic import atomic_folder, remove_leftovers
from segscope.app.cli import main

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, target = _dead_pid(), tmp_path / "bundle"
    stale = [tmp_path / f".bundle.{dead}.abc123.tmp", tmp_path / f".bundle.{dead}.{'f' * 32}.old"]
    for folder in stale:
        (folder / "layer").mkdir(parents=True)
        (folder / "layer" / "x").write_bytes(b"x" * 1000)
    live = tmp_path / f".bundle.{os.getpid()}.zzz.tmp"
    live.mkdir()
    legacy_new = tmp_path / ".bundle.k3j2h1gf.tmp"  # pid-less (older SegScope), recent: kept
    legacy_new.mkdir()
    legacy_old = tmp_path / f".bundle.{'a' * 32}.old"
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    other = tmp_path / ".bundle2.123.abc.tmp"  # another output's
    other.mkdir()
    with atomic_folder(target) as work:
        (work / "state.json").write_text("{}")
    assert target.is_dir() and (target / "state.json").is_file()
    assert not any(p.exists() for p in [*stale, legacy_old])
    assert live.exists() and legacy_new.exists() and other.exists()
    assert remove_leftovers(target) == []


def test_existing_output_errors_name_the_cli_flag(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="--force"), atomic_folder(tmp_path / "b"):
        pass


def test_csv_zip_store_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from segscope.analysis import csvzip
    from segscope.analysis.csvzip import CsvZipStore, write_new_store

    rows = {s: (np.arange(3), np.full((3, 3), float(s)), np.full((3, 4), s / 8, np.float32)) for s in range(1, 40)}
    store = write_new_store(tmp_path / "store", rows, coordinates="nm")
    assert sorted(store.segment_ids()) == list(range(1, 40))
    before = _files(tmp_path / "store")
    calls = []
    original = CsvZipStore._rewrite_shard

    def fail_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CsvZipStore, "_rewrite_shard", fail_on_third)
    changed = {s: (a, b, c + 1) for s, (a, b, c) in rows.items()}
    with pytest.raises(OSError, match="No space left"):
        write_new_store(tmp_path / "store", changed, coordinates="nm", force=True)
    assert _files(tmp_path / "store") == before  # the old store, untouched
    np.testing.assert_array_equal(CsvZipStore(tmp_path / "store", coordinates="nm").read(7)[2], rows[7][2])
    assert _leftovers(tmp_path / "store") == []
    with pytest.raises(FileExistsError, match="--force"):
        write_new_store(tmp_path / "store", rows, coordinates="nm")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_new_store(tmp_path / "f", rows)
    assert csvzip.write_new_store is write_new_store


def test_demo_data_on_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    import segscope.analysis.dataset as dataset_module

    def full_disk(out, *args, **kwargs):
        (Path(out) / "nodes.parquet").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "nodes.parquet"))

    monkeypatch.setattr(dataset_module, "write_ground_truth", full_disk)
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []


def _kill_at_random_points(argv, out: Path, complete: set[str], delays, env=None) -> list[str]:
    """Run ``argv`` and SIGKILL it after each delay; check all-or-nothing after every kill."""
    outcomes = []
    for delay in delays:
        process = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():
            assert _files(out) == complete, f"killed after {delay:.2f} s: partial output {out}"
            outcomes.append("whole")
            import shutil

            shutil.rmtree(out)
        else:
            outcomes.append("absent")
    return outcomes


def _export_argv(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "segscope.app.cli", "export", "--dataset", str(dataset), "--out", str(out)]


@pytest.mark.parametrize("kills", [pytest.param(2, id="fast"), pytest.param(10, id="many", marks=pytest.mark.slow)])
def test_killed_export_leaves_a_whole_bundle_or_none(demo96_dir, tmp_path, kills):
    out = tmp_path / "bundle"
    warm = tmp_path / "warm"
    subprocess.run(_export_argv(demo96_dir, warm), cwd=REPO, check=True, capture_output=True, timeout=300)
    started = time.monotonic()
    subprocess.run(_export_argv(demo96_dir, out), cwd=REPO, check=True, capture_output=True, timeout=300)
    full_run = time.monotonic() - started
    complete = _files(out)
    assert "state.json" in complete
    import shutil

    shutil.rmtree(out)
    rng = random.Random(kills)
    delays = [rng.uniform(0.4 * full_run, 1.1 * full_run) for _ in range(kills)]
    outcomes = _kill_at_random_points(_export_argv(demo96_dir, out), out, complete, delays)
    print("export kill outcomes:", outcomes)
    # The next run completes and removes what the killed ones left.
    subprocess.run(_export_argv(demo96_dir, out), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert _files(out) == complete
    assert _leftovers(out) == []


@pytest.mark.slow
def test_killed_embed_leaves_a_whole_csv_zip_store_or_none(demo96_dir, tmp_path):
    from segscope.analysis.dataset import open_dataset

    ids = ",".join(str(int(s)) for s in open_dataset(demo96_dir).segment_ids[:6])
    out = tmp_path / "store"

    def argv() -> list[str]:
        return [
            sys.executable, "-m", "segscope.app.cli", "embed", "--image", str(demo96_dir / "image"),
            "--segmentation", str(demo96_dir / "segmentation"), "--segments", ids, "--out", str(out),
            "--force", "--no-skeleton-cache",
        ]  # fmt: skip

    subprocess.run(argv(), cwd=REPO, check=True, capture_output=True, timeout=600)  # warms the caches
    started = time.monotonic()
    subprocess.run(argv(), cwd=REPO, check=True, capture_output=True, timeout=600)
    full_run = time.monotonic() - started  # what the killed runs take
    complete = _files(out)
    assert len(complete) > 1
    import shutil

    shutil.rmtree(out)
    rng = random.Random(0)
    # Most of a run is TensorFlow's start; kill mostly in the second half, where the store is written.
    delays = [rng.uniform(0.5 * full_run, 0.98 * full_run) for _ in range(6)]
    outcomes = _kill_at_random_points(argv(), out, complete, delays)
    subprocess.run(argv(), cwd=REPO, check=True, capture_output=True, timeout=600)
    assert _files(out) == complete and _leftovers(out) == []
    print("embed kill outcomes:", outcomes)


def test_a_failed_encoder_save_leaves_the_previous_file(tmp_path, monkeypatch):
    from segscope.analysis.encoder import SEGCLR_LITE, build_encoder, read_encoder_config, save_encoder

    encoder = build_encoder(SEGCLR_LITE, seed=0)
    path = save_encoder(encoder, tmp_path / "encoder.keras")
    before = path.read_bytes()
    assert read_encoder_config(path) == SEGCLR_LITE and _leftovers(path) == []
    float32 = type(encoder.with_precision("float32"))

    def killed_mid_write(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(float32, "save", killed_mid_write)
    with pytest.raises(OSError, match="No space left"):
        save_encoder(encoder, path)
    assert path.read_bytes() == before and _leftovers(path) == []
