"""Test-wide set-up: headless Qt and WebEngine, a private cache folder, shared fixtures."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The shared SegCLR fixtures (skips when shared/ is not beside the checkout)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES
