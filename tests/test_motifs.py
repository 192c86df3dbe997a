"""Motif census: the demo's planted reciprocity stands out; a null-drawn graph does not."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from segscope.analysis.connectivity import read_segment_types
from segscope.analysis.motifs import CONNECTED_TRIADS, _type_null, census, motif_census, synapse_graph
from segscope.analysis.progress import drive
from segscope.analysis.synapses import read_synapse_table


def test_census_of_small_graphs():
    ffl = nx.DiGraph([(1, 2), (2, 3), (1, 3)])
    counts = census(ffl)
    assert counts["030T"] == 1 and counts["reciprocal"] == 0 and counts["edges"] == 3
    assert sum(counts[t] for t in CONNECTED_TRIADS) == 1
    mutual = census(nx.DiGraph([(1, 2), (2, 1), (2, 3)]))
    assert mutual["reciprocal"] == 1 and mutual["111U"] + mutual["111D"] == 1


@pytest.fixture(scope="module")
def demo_graph(demo96_dir):
    synapses = read_synapse_table(demo96_dir / "synapses.parquet")
    types = read_segment_types(demo96_dir / "segments.parquet").as_dict()
    return synapse_graph(synapses, types.keys()), types


@pytest.mark.parametrize("model", ["degree", "type"])
def test_planted_reciprocity_has_a_high_z_score(demo_graph, model):
    graph, types = demo_graph
    result = drive(motif_census(graph, model, types=types, n_samples=30, swaps_per_edge=5, seed=1))
    assert result.observed["edges"] == graph.number_of_edges()
    assert result.null_mean["edges"] == graph.number_of_edges()  # both nulls keep the edge count
    assert result.z["reciprocal"] > 5, result.rows()


def test_graph_drawn_from_the_type_null_has_small_z(demo_graph):
    graph, types = demo_graph
    block_of = {n: types[n] for n in graph.nodes}
    blocks: dict[str, list[int]] = {}
    for node in sorted(graph.nodes):
        blocks.setdefault(block_of[node], []).append(node)
    drawn = _type_null(graph, blocks, block_of, np.random.default_rng(7))
    result = drive(motif_census(drawn, "type", types=types, n_samples=40, seed=2))
    assert abs(result.z["reciprocal"]) < 3, result.rows()
    finite = [abs(result.z[t]) for t in CONNECTED_TRIADS if np.isfinite(result.z[t])]
    assert max(finite) < 4, result.rows()


def test_bad_arguments_are_refused(demo_graph):
    graph, _ = demo_graph
    with pytest.raises(ValueError, match="null model"):
        drive(motif_census(graph, "erdos"))
    with pytest.raises(ValueError, match="type"):
        drive(motif_census(graph, "type"))
