"""Test-wide set-up: headless Qt and WebEngine, a private cache folder, shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Qt must see these before any QApplication exists (design.md, "Recipes").
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--ignore-gpu-blocklist")
os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tests out of the user's real cache (demo data, numba cache)."""
    cache = tmp_path_factory.mktemp("segscope-cache")
    previous = os.environ.get("SEGSCOPE_CACHE_DIR")
    os.environ["SEGSCOPE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SEGSCOPE_CACHE_DIR", None)
    else:
        os.environ["SEGSCOPE_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _qt_tests_need_a_process_without_tensorflow(request):
    """TensorFlow and QtWebEngine's software WebGL (Mesa's LLVM) crash in one process.

    TF 2.21 exports LLVM symbols that clash with Mesa's libLLVM, so whichever loads second
    segfaults. ``make test`` runs ``-m qt`` tests in a pytest session of their own; here
    a mixed session skips them with that explanation instead of crashing.
    """
    if request.node.get_closest_marker("qt") and "tensorflow" in sys.modules:
        pytest.skip("TensorFlow is loaded in this process; run the Qt tests on their own: pytest -m qt")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The shared SegCLR fixtures (skips when shared/ is not beside the checkout)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def demo96_dir(tmp_path_factory) -> Path:
    """A small demo dataset (96^3 voxels, seed 0), generated once per test session."""
    from segscope.analysis.progress import drive
    from segscope.analysis.synthetic import generate_dataset

    return drive(generate_dataset(tmp_path_factory.mktemp("demo96") / "demo", seed=0, size_vox=(96, 96, 96)))
