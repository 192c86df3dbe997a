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
    """Return the folder of shipped assets (demo model, classifiers, icons).

    Editable installs and source checkouts use ``<repo>/assets``; a wheel install maps the
    same folder to the ``segscope_assets`` package.
    """
    try:
        import segscope_assets  # type: ignore[import-not-found]

        return Path(next(iter(segscope_assets.__path__)))
    except ImportError:
        return Path(__file__).resolve().parents[1] / "assets"
