"""Where SegScope keeps cached data and where its shipped assets live."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """Return SegScope's per-user cache folder, creating it if needed.

    ``$SEGSCOPE_CACHE_DIR`` wins; otherwise ``$XDG_CACHE_HOME/segscope`` or
    ``~/.cache/segscope`` (the XDG default on Linux).
    """
    override = os.environ.get("SEGSCOPE_CACHE_DIR")
    if override:
        path = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        path = Path(base) / "segscope"
    path.mkdir(parents=True, exist_ok=True)
    return path


def assets_dir() -> Path:
    """Return the folder of shipped assets (demo model, classifiers, context table).

    ``segscope.analysis`` and ``segscope.assets`` are siblings both in a checkout
    (``<repo>/analysis``, ``<repo>/assets``) and in an installed wheel
    (``site-packages/segscope/analysis``, ``.../segscope/assets``).
    """
    return Path(__file__).resolve().parents[1] / "assets"
