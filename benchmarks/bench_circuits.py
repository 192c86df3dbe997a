"""Circuits: contact sites, synapse placement and the motif census's null models, timed.

Usage::

    python benchmarks/bench_circuits.py [--size 128] [--samples 20] [--rounds 3]

Generates a demo volume of ``--size``^3 voxels (not timed), then prints medians over
``--rounds`` of: contact sites of the segmentation (``contact_sites``), synapse placement
(``place_synapses``, contacts included), and one census against ``--samples`` graphs of
each null model (per graph too), with the graph's size and the planted reciprocity's z.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _median_s(fn, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from segscope.analysis.motifs import motif_census, synapse_graph
    from segscope.analysis.progress import drive
    from segscope.analysis.synapses import contact_sites
    from segscope.analysis.synthetic import synthesize
    from segscope.analysis.synthetic._circuit import place_synapses

    vol = drive(synthesize(seed=0, size_vox=(args.size,) * 3))
    print(f"demo {args.size}^3: {len(vol.segment_ids)} segments")
    seconds, contacts = _median_s(lambda: contact_sites(vol.segmentation, vol.voxel_size_nm), args.rounds)
    faces = len(contacts.face_xyz_nm)
    print(f"contact_sites: {seconds:.2f} s median, {len(contacts.pairs)} touching pairs, {faces} faces")
    seconds, (synapses, _) = _median_s(lambda: place_synapses(vol, np.random.default_rng(0)), args.rounds)
    print(f"place_synapses (contacts included): {seconds:.2f} s median, {len(synapses)} synapses")
    types = dict(zip(vol.segment_ids.tolist(), vol.cell_types))
    graph = synapse_graph(synapses, types.keys())
    print(f"graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    for model in ("degree", "type"):
        seconds, result = _median_s(
            lambda model=model: drive(motif_census(graph, model, types=types, n_samples=args.samples)), args.rounds
        )
        print(
            f"census vs {model} null, {args.samples} graphs: {seconds:.2f} s median "
            f"({1000 * seconds / args.samples:.0f} ms per graph); reciprocal z = {result.z['reciprocal']:.1f}"
        )


if __name__ == "__main__":
    main()
