"""The wheel: built from the checkout, installed outside it, it runs on the shipped assets.

Slow (a wheel build and a TensorFlow import in a fresh interpreter). The fresh venv gets
SegScope only from the wheel; its dependencies come from the test environment's
site-packages, added as a plain path (so that environment's editable-install finder,
which maps ``segscope.*`` back to the checkout, is not activated).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(argv, cwd, env=None, timeout=900):
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_outside_the_checkout_and_opens_the_demo_model(tmp_path):
    wheel_dir = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)],
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("segscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "segscope/app/cli.py" in names
    assert "segscope/analysis/encoder/model.py" in names
    assert "segscope/assets/demo_encoder.keras" in names
    assert "segscope/assets/classifiers/classifiers.json" in names
    assert not any(n.startswith(("app/", "analysis/", "assets/")) for n in names), "top-level clash"

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    fresh_python = env_dir / "bin" / "python"
    fresh_site = Path(
        _run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip()
    )
    (fresh_site / "test_env_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(fresh_site), str(wheel)], cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["SEGSCOPE_CACHE_DIR"] = str(tmp_path / "cache")
    where = _run(
        [
            str(fresh_python),
            "-c",
            "import segscope.app, segscope.analysis.paths as p; print(segscope.app.__file__); print(p.assets_dir())",
        ],
        cwd=tmp_path,
        env=env,
    ).split()
    assert all(str(fresh_site) in w for w in where), where
    assert REPO.as_posix() not in " ".join(where)

    cli = [str(fresh_python), "-m", "segscope.app.cli"]
    assert "segscope" in _run([*cli, "--version"], cwd=tmp_path, env=env)
    _run([*cli, "demo-data", "--out", str(tmp_path / "demo"), "--size", "64", "--seed", "2"], cwd=tmp_path, env=env)
    info = _run([*cli, "info", str(tmp_path / "demo" / "image")], cwd=tmp_path, env=env)
    assert "voxel" in info.lower()
    opened = _run(
        [
            str(fresh_python),
            "-c",
            (
                "from segscope.analysis.paths import assets_dir\n"
                "from segscope.analysis.encoder import load_encoder\n"
                "import numpy as np\n"
                "enc = load_encoder(assets_dir() / 'demo_encoder.keras')\n"
                "cfg = enc.encoder_config\n"
                "out = np.asarray(enc(np.zeros((1, *cfg.input_size_vox, 1), np.float32)))\n"
                "print(out.shape[-1], cfg.embedding_dim, np.isfinite(out).all())\n"
            ),
        ],
        cwd=tmp_path,
        env=env,
    )
    assert opened.split()[-3:] == ["64", "64", "True"]
