"""Shared array helpers."""

import numpy as np

from segscope.analysis.arrays import group_rows


def test_group_rows_gives_each_keys_rows_in_order():
    keys = np.array([7, 3, 7, 2**63 + 5, 3, 7], dtype=np.uint64)
    groups = group_rows(keys)
    assert [k for k, _ in groups] == [3, 7, 2**63 + 5]
    assert [rows.tolist() for _, rows in groups] == [[1, 4], [0, 2, 5], [3]]
    assert group_rows(np.zeros(0, np.uint64)) == []
