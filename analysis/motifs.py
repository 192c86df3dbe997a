"""Motif census of a synapse graph against null models, with z-scores.

The graph: one node per segment, a directed edge ``a -> b`` when at least one synapse
goes from ``a`` to ``b`` (synapse counts and self-synapses are dropped). Counted:

- ``reciprocal``: pairs connected both ways (the 2-node motif), and ``edges``;
- the 13 connected 3-node motifs (triads), by the MAN names of networkx's
  ``triadic_census`` (Holland and Leinhardt): 021D, 021U, 021C, 111D, 111U, 030T, 030C,
  201, 120D, 120U, 120C, 210, 300 (030T is the feed-forward loop, 030C the cycle).

Null models (``n_samples`` graphs each):

- ``degree``: every node keeps its in- and out-degree; networkx's ``directed_edge_swap``
  (three-edge swaps) run for ``swaps_per_edge`` times the edge count;
- ``type``: a stochastic block model that keeps the number of edges between every pair
  of types (so type-to-type densities), placed uniformly at random within each block.

``z = (observed - null mean) / null standard deviation`` (NaN when the null never varies).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segscope.analysis.progress import Progress, RateMeter
from segscope.analysis.synapses import SynapseTable

log = logging.getLogger(__name__)

CONNECTED_TRIADS: tuple[str, ...] = (
    "021D",
    "021U",
    "021C",
    "111D",
    "111U",
    "030T",
    "030C",
    "201",
    "120D",
    "120U",
    "120C",
    "210",
    "300",
)
MOTIFS: tuple[str, ...] = ("edges", "reciprocal", *CONNECTED_TRIADS)
NULL_MODELS: tuple[str, ...] = ("degree", "type")

__all__ = ["CONNECTED_TRIADS", "MOTIFS", "NULL_MODELS", "MotifCensus", "census", "motif_census", "synapse_graph"]


def synapse_graph(synapses: SynapseTable, nodes: Sequence[int] | None = None):
    """Directed networkx graph of ``synapses`` (binary edges, no self-loops).

    ``nodes``: keep only these segments (and the synapses among them); others' isolated
    segments may be added this way too.
    """
    import networkx as nx

    graph = nx.DiGraph()
    keep = None if nodes is None else {int(n) for n in nodes}
    if keep is not None:
        graph.add_nodes_from(sorted(keep))
    for a, b in set(zip(synapses.pre.tolist(), synapses.post.tolist())):
        if a != b and (keep is None or (a in keep and b in keep)):
            graph.add_edge(a, b)
    return graph


def census(graph) -> dict[str, int]:
    """Counts of :data:`MOTIFS` in a directed graph."""
    import networkx as nx

    reciprocal = sum(1 for a, b in graph.edges if a < b and graph.has_edge(b, a))
    triads = nx.triadic_census(graph)
    return {"edges": graph.number_of_edges(), "reciprocal": reciprocal, **{t: int(triads[t]) for t in CONNECTED_TRIADS}}


@dataclass(frozen=True)
class MotifCensus:
    """Observed motif counts against a null model's samples.

    Attributes
    ----------
    model : str
        The null model (one of :data:`NULL_MODELS`).
    observed, null_mean, null_std, z : dict
        Motif name (:data:`MOTIFS`) -> value.
    n_samples : int
    """

    model: str
    observed: dict[str, int]
    null_mean: dict[str, float]
    null_std: dict[str, float]
    z: dict[str, float]
    n_samples: int

    def rows(self) -> list[dict]:
        return [
            {
                "motif": m,
                "null_model": self.model,
                "observed": self.observed[m],
                "null_mean": self.null_mean[m],
                "null_std": self.null_std[m],
                "z": self.z[m],
            }
            for m in MOTIFS
        ]


def _degree_null(graph, rng: np.random.Generator, swaps_per_edge: float):
    import networkx as nx

    sample = graph.copy()
    n_edges = sample.number_of_edges()
    if n_edges < 3:
        return sample
    nx.directed_edge_swap(
        sample,
        nswap=max(1, int(swaps_per_edge * n_edges)),
        max_tries=int(100 * swaps_per_edge * n_edges) + 100,
        seed=int(rng.integers(2**31)),
    )
    return sample


def _type_null(graph, blocks: Mapping[str, list[int]], block_of: Mapping[int, str], rng: np.random.Generator):
    import networkx as nx

    counts: dict[tuple[str, str], int] = {}
    for a, b in graph.edges:
        key = (block_of[a], block_of[b])
        counts[key] = counts.get(key, 0) + 1
    sample = nx.DiGraph()
    sample.add_nodes_from(graph.nodes)
    for (s, t), n in counts.items():
        src, dst = blocks[s], blocks[t]
        possible = len(src) * len(dst) - (len(src) if s == t else 0)
        # Draw n distinct ordered pairs (no self-loops) of the block uniformly.
        chosen: set[tuple[int, int]] = set()
        while len(chosen) < min(n, possible):
            i = rng.integers(len(src), size=2 * n)
            j = rng.integers(len(dst), size=2 * n)
            for a, b in zip(i.tolist(), j.tolist()):
                if src[a] != dst[b] and len(chosen) < n:
                    chosen.add((src[a], dst[b]))
        sample.add_edges_from(chosen)
    return sample


def motif_census(
    graph,
    model: str = "degree",
    *,
    types: Mapping[int, str] | None = None,
    n_samples: int = 100,
    swaps_per_edge: float = 10.0,
    seed: int = 0,
) -> Generator[Progress, None, MotifCensus]:
    """Census of :data:`MOTIFS` in ``graph`` against ``n_samples`` graphs of a null ``model``.

    ``types`` (segment id -> type) is needed by the ``type`` model; nodes without a type
    form one block of their own.
    """
    if model not in NULL_MODELS:
        raise ValueError(f"null model must be one of {', '.join(NULL_MODELS)}, got {model!r}")
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 to estimate a spread, got {n_samples}")
    if model == "type" and types is None:
        raise ValueError("the 'type' null model needs each segment's type")
    rng = np.random.default_rng(seed)
    observed = census(graph)
    block_of: dict[int, str] = {}
    blocks: dict[str, list[int]] = {}
    if model == "type":
        assert types is not None
        for node in sorted(graph.nodes):
            block_of[node] = types.get(node) or "untyped"
            blocks.setdefault(block_of[node], []).append(node)
    samples = np.zeros((n_samples, len(MOTIFS)), dtype=np.float64)
    meter = RateMeter()
    for k in range(n_samples):
        if model == "degree":
            null = _degree_null(graph, rng, swaps_per_edge)
        else:
            null = _type_null(graph, blocks, block_of, rng)
        counts = census(null)
        samples[k] = [counts[m] for m in MOTIFS]
        if (k + 1) % 5 == 0 or k + 1 == n_samples:
            yield Progress(k + 1, n_samples, "graphs", f"{model} null model", meter.rate(k + 1))
    mean = samples.mean(axis=0)
    std = samples.std(axis=0, ddof=1)
    obs = np.array([observed[m] for m in MOTIFS], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(std > 0, (obs - mean) / np.where(std > 0, std, 1), np.nan)
    return MotifCensus(
        model=model,
        observed=observed,
        null_mean=dict(zip(MOTIFS, mean.tolist())),
        null_std=dict(zip(MOTIFS, std.tolist())),
        z=dict(zip(MOTIFS, z.tolist())),
        n_samples=n_samples,
    )
