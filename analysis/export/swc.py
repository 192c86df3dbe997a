"""SWC skeletons with per-node subcompartment type codes.

Rows are ``n type x y z radius parent``: ``n`` is the node id + 1 (SWC numbers samples from
1, SegScope node ids start at 0), coordinates and radius are nanometres, a root's parent is
-1, and every parent row comes before its children (depth-first from the root).

Type codes follow the SWC standard where it has one: 1 soma, 2 axon, 3 dendrite, 0
undefined (not predicted). SWC has no glia code; its custom range starts at 5, and SegScope
uses 7 for glia (as several tools do for "custom"/glia), stated in the file header.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS
from segscope.analysis.export.atomic import atomic_file

log = logging.getLogger(__name__)

#: Compartment name -> SWC type code.
SWC_TYPE_OF_COMPARTMENT = {"soma": 1, "axon": 2, "dendrite": 3, "glia": 7}
#: SWC type of nodes whose compartment was not predicted.
SWC_UNDEFINED = 0


def swc_type_codes(compartment: np.ndarray) -> np.ndarray:
    """SWC type code (int64 ``[N]``) of each compartment code (index into COMPARTMENTS, -1 = none)."""
    table = np.array([SWC_TYPE_OF_COMPARTMENT.get(name, SWC_UNDEFINED) for name in COMPARTMENTS] + [SWC_UNDEFINED])
    codes = np.asarray(compartment, dtype=np.int64)
    if codes.size and (codes.min() < -1 or codes.max() >= len(COMPARTMENTS)):
        raise ValueError(f"compartment codes must lie in [-1, {len(COMPARTMENTS) - 1}]")
    return table[codes]  # -1 picks the final entry: undefined


def skeleton_parents(
    node_ids: np.ndarray, edges: np.ndarray, compartment: np.ndarray | None = None, xyz_nm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Orient an undirected skeleton as a forest: parent of every node, rows in writing order.

    Parameters
    ----------
    node_ids
        int ``[N]`` node ids.
    edges
        int ``[E, 2]`` pairs of node ids (not row indices), undirected.
    compartment
        Optional int ``[N]`` compartment codes: each connected component is rooted at its
        soma node nearest the component's soma centroid when it has soma nodes.
    xyz_nm
        float ``[N, 3]`` positions (needed to pick the central soma node).

    Returns
    -------
    parent_row : numpy.ndarray
        int64 ``[N]`` row of each node's parent, -1 for roots.
    order : numpy.ndarray
        int64 ``[N]`` rows in depth-first order from each root (parents before children).

    Components without soma are rooted at their lowest-id leaf (a skeleton end). Edges that
    close a cycle are dropped (logged), since SWC describes trees.
    """
    node_ids = np.asarray(node_ids, dtype=np.int64)
    n = len(node_ids)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    row_of = {int(node): row for row, node in enumerate(node_ids)}
    if len(row_of) != n:
        raise ValueError("node ids must be unique")
    try:
        edge_rows = np.array([[row_of[int(a)], row_of[int(b)]] for a, b in edges], dtype=np.int64).reshape(-1, 2)
    except KeyError as missing:
        raise ValueError(f"edge refers to node id {missing.args[0]}, which is not among the nodes") from None
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in edge_rows:
        if a == b:
            continue
        neighbours[a].append(int(b))
        neighbours[b].append(int(a))
    soma = COMPARTMENTS.index("soma") if "soma" in COMPARTMENTS else None

    parent = np.full(n, -2, dtype=np.int64)  # -2: not reached yet
    order: list[int] = []
    dropped = 0
    # Visit components in order of their smallest node id, so output is deterministic.
    for start in np.argsort(node_ids, kind="stable"):
        if parent[start] != -2:
            continue
        component = _component(int(start), neighbours)
        root = _choose_root(component, node_ids, neighbours, compartment, xyz_nm, soma)
        parent[root] = -1
        stack = [root]
        while stack:
            row = stack.pop()
            order.append(row)
            # Reverse so the lowest-id neighbour is visited first (stack is LIFO).
            for nxt in sorted(neighbours[row], key=lambda r: node_ids[r], reverse=True):
                if parent[nxt] == -2:
                    parent[nxt] = row
                    stack.append(nxt)
                elif nxt != parent[row] and parent[nxt] != row:
                    dropped += 1
    if dropped:
        log.warning("skeleton has cycles: dropped %d edges to write a tree", dropped // 2)
    return parent, np.array(order, dtype=np.int64)


def _component(start: int, neighbours: list[list[int]]) -> list[int]:
    seen = {start}
    queue = deque([start])
    while queue:
        row = queue.popleft()
        for nxt in neighbours[row]:
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return sorted(seen)


def _choose_root(component, node_ids, neighbours, compartment, xyz_nm, soma) -> int:
    rows = np.array(component, dtype=np.int64)
    if compartment is not None and soma is not None:
        soma_rows = rows[np.asarray(compartment)[rows] == soma]
        if len(soma_rows):
            if xyz_nm is None:
                return int(soma_rows[np.argmin(node_ids[soma_rows])])
            xyz = np.asarray(xyz_nm, dtype=np.float64)[soma_rows]
            return int(soma_rows[np.argmin(np.linalg.norm(xyz - xyz.mean(axis=0), axis=1))])
    leaves = rows[[len(neighbours[r]) <= 1 for r in rows]]
    candidates = leaves if len(leaves) else rows
    return int(candidates[np.argmin(node_ids[candidates])])


def swc_text(
    node_ids: np.ndarray,
    xyz_nm: np.ndarray,
    edges: np.ndarray,
    compartment: np.ndarray | None = None,
    radius_nm: np.ndarray | None = None,
    *,
    header: Sequence[str] = (),
) -> str:
    """The SWC text of one skeleton (see the module docstring for the conventions).

    Parameters
    ----------
    node_ids
        int ``[N]`` node ids, >= 0.
    xyz_nm
        float ``[N, 3]`` positions, x, y, z nm.
    edges
        int ``[E, 2]`` pairs of node ids.
    compartment
        int ``[N]`` compartment codes (-1 = not predicted); default all undefined.
    radius_nm
        float ``[N]`` radii (nm); default 0.
    header
        Extra comment lines (without ``#``).
    """
    node_ids = np.asarray(node_ids, dtype=np.int64)
    n = len(node_ids)
    xyz = np.asarray(xyz_nm, dtype=np.float64)
    if xyz.shape != (n, 3) or not np.isfinite(xyz).all():
        raise ValueError(f"xyz_nm must be finite with shape ({n}, 3), got {xyz.shape}")
    if n and node_ids.min() < 0:
        raise ValueError("SWC export needs node ids >= 0 (sample number = node id + 1)")
    compartment = np.full(n, -1) if compartment is None else np.asarray(compartment)
    if compartment.shape != (n,):
        raise ValueError(f"compartment must have shape ({n},), got {compartment.shape}")
    radius = np.zeros(n) if radius_nm is None else np.asarray(radius_nm, dtype=np.float64)
    if radius.shape != (n,) or not np.isfinite(radius).all() or (radius < 0).any():
        raise ValueError(f"radius_nm must be {n} finite non-negative numbers")
    types = swc_type_codes(compartment)
    parent, order = skeleton_parents(node_ids, edges, compartment, xyz)
    lines = [f"# {line}" for line in header]
    lines += [
        "# SWC written by SegScope. Coordinates and radius in nanometres.",
        "# Sample number = SegScope node id + 1. Types: 0 undefined, 1 soma, 2 axon, 3 dendrite,",
        "# 7 glia (SegScope's code in SWC's custom range, which starts at 5).",
        "# n type x y z radius parent",
    ]
    for row in order:
        parent_sample = -1 if parent[row] < 0 else int(node_ids[parent[row]]) + 1
        x, y, z = xyz[row]
        lines.append(
            f"{int(node_ids[row]) + 1} {int(types[row])} {x:.3f} {y:.3f} {z:.3f} {radius[row]:.3f} {parent_sample}"
        )
    return "\n".join(lines) + "\n"


def write_swc(
    path: str | Path,
    node_ids,
    xyz_nm,
    edges,
    compartment=None,
    radius_nm=None,
    *,
    header: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """Write one skeleton as SWC (atomically); see :func:`swc_text` for the arguments."""
    text = swc_text(node_ids, xyz_nm, edges, compartment, radius_nm, header=header)
    with atomic_file(path, force=force) as temporary:
        temporary.write_text(text)
    return Path(path)


def read_swc(path: str | Path) -> np.ndarray:
    """Read SWC rows as float64 ``[N, 7]`` (n, type, x, y, z, radius, parent), comments skipped."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 7:
            raise ValueError(f"{path}:{number}: expected 7 fields, got {len(fields)}")
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            raise ValueError(f"{path}:{number}: non-numeric field in {line!r}") from None
        values = rows[-1]
        # nan/inf positions or non-integer sample numbers would pass silently downstream.
        if not all(np.isfinite(values)) or any(
            v != int(v) or abs(v) >= 2**53 for v in (values[0], values[1], values[6])
        ):
            raise ValueError(f"{path}:{number}: expected integer sample, type and parent and finite x, y, z, radius")
    return np.array(rows, dtype=np.float64).reshape(-1, 7)
