"""Cutouts per second for one demo segment: one read per centre vs shared-block reads.

Usage::

    python benchmarks/bench_cutouts.py [--size 129] [--downsample 1] [--repeats 5] [--segment ID]

Runs on the cached default demo dataset (generated on first use). Both strategies cut the
same centres (the segment's skeleton nodes at SegCLR's 1.5 um spacing, nearest a corner
first) in the same process; each is repeated and the median is reported. TensorStore's
chunk cache is reset before each strategy; its first (cold) pass is reported separately and
the medians are over warm passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from segscope.analysis.centres import segment_centres
from segscope.analysis.dataset import open_dataset
from segscope.analysis.synthetic import demo_dataset
from segscope.analysis.volume import cut_masked, open_volume, reset_chunk_cache


def pick_segment(dataset, requested: int | None) -> int:
    """The requested segment, else the segment with the most skeleton nodes."""
    if requested is not None:
        return requested
    nodes = dataset.nodes
    ids, counts = np.unique(np.asarray(nodes["segment_id"]), return_counts=True)
    return int(ids[np.argmax(counts)])


def time_strategy(image, segmentation, segment_id, centres, size, downsample, shared) -> float:
    start = time.perf_counter()
    cut_masked(image, segmentation, segment_id, centres, size, downsample=downsample, shared_reads=shared)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=129, help="cutout edge in output voxels")
    parser.add_argument("--downsample", type=int, default=1, help="native voxels per output voxel")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--segment", type=int, default=None)
    parser.add_argument("--spacing-nm", type=float, default=1500.0)
    args = parser.parse_args()

    dataset = open_dataset(demo_dataset())
    segment_id = pick_segment(dataset, args.segment)
    skeleton = dataset.skeleton(segment_id)
    centres = segment_centres(
        dataset.segmentation,
        segment_id,
        skeleton_nodes_nm=skeleton.nodes_nm,
        skeleton_edges=skeleton.edges,
        spacing_nm=args.spacing_nm,
        click_nm=(0, 0, 0),
    )
    size = (args.size,) * 3
    factor = (args.downsample,) * 3
    n = len(centres)
    print(
        f"demo segment {segment_id}: {len(skeleton.nodes_nm)} skeleton nodes, {n} centres at "
        f"{args.spacing_nm:g} nm; cutout {args.size}^3 x{args.downsample} downsample"
    )

    results = {}
    for shared in (False, True):
        # A fresh chunk cache so the cold pass does not profit from the other strategy.
        reset_chunk_cache()
        image = open_volume(dataset.image.url)
        segmentation = open_volume(dataset.segmentation.url)
        cold = time_strategy(image, segmentation, segment_id, centres.positions_nm, size, factor, shared)
        warm = [
            time_strategy(image, segmentation, segment_id, centres.positions_nm, size, factor, shared)
            for _ in range(args.repeats)
        ]
        results[shared] = statistics.median(warm)
        label = "shared-block reads" if shared else "one read per centre"
        print(f"  {label:22s}: cold {n / cold:8.1f} cutouts/s   warm median {n / results[shared]:8.1f} cutouts/s")
    print(f"  ratio shared/per-centre (warm medians): {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    main()
