"""Small array helpers shared by the compute layer, the CLI and the app (numpy only)."""

from __future__ import annotations

import numpy as np


def group_rows(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(key, rows with that key)]`` for integer ``keys`` ``[N]`` (segment ids...).

    One stable sort rather than one pass per key (thousands of segments).
    Keys come out ascending; each key's rows (int64) keep their order in ``keys``.
    """
    keys = np.asarray(keys).reshape(-1)
    if len(keys) == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return [(int(sorted_keys[a]), order[a:b].astype(np.int64)) for a, b in zip(starts, ends)]
