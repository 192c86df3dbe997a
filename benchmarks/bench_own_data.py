"""Own data: skeletonise + embed one segment of a declared-large volume; memory and CPU for many centres.

Usage::

    python benchmarks/bench_own_data.py [--centres 10000] [--skip-rss] [--work DIR] [--listing-only]

Builds (once, in ``--work``) a pair of precomputed volumes SegScope did not make: an image
and a segmentation each *declared* 2048 x 2048 x 2048 voxels (8.6 G voxels, 32 x 32 x 40 nm)
holding only a 160^3 synthetic demo block at an offset, no skeletons, no tables.

1. ``skeletonise + embed``: the segment whose kimimaro skeleton is nearest 100 nodes, found
   from a click on one of its voxels with an empty skeleton cache: time to skeletonise (the
   bounded, growing box), to thin and embed its centres, and the total; median of 3 runs
   (the cache is emptied before each), at SegCLR's 1.5 um spacing and with every skeleton
   node a centre. The encoder is loaded before the clock starts.
2. ``peak RSS``: a child process embeds ``--centres`` centres (the demo block's segments'
   centres, repeated) with :func:`stream_node_embeddings` and prints its peak RSS
   (``ru_maxrss``), wall time, and CPU utilisation ((user + sys) / wall / cores).

3. ``list segments``: every segment in a 512^3 box around the block (what ``embed
   --segments all --bbox`` scans; 3 rounds) and in the whole volume (``--segments all``;
   2 rounds), paired: the chunk files' names telling which
   chunks exist (what SegScope does for local unsharded precomputed volumes), against
   reading every block (what it did before: TensorStore cannot say for precomputed).
   ``--listing-only`` runs just this part.

Prints figures only; no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DECLARED = (2048, 2048, 2048)
OFFSET = (1024, 640, 900)
BLOCK = 160


def build(work: Path) -> tuple[Path, Path]:
    """The declared-large image and segmentation (built once)."""
    import tensorstore as ts

    from segscope.analysis.progress import drive
    from segscope.analysis.synthetic import generate_dataset
    from segscope.analysis.volume import open_volume

    image_path, seg_path = work / "image", work / "segmentation"
    if (seg_path / "info").is_file() and (image_path / "info").is_file():
        return image_path, seg_path
    demo = drive(generate_dataset(work / "demo", seed=1, size_vox=(BLOCK,) * 3))
    for path, source, kind, dtype, encoding in (
        (image_path, demo / "image", "image", "uint8", "raw"),
        (seg_path, demo / "segmentation", "segmentation", "uint64", "compressed_segmentation"),
    ):
        scale = {
            "size": list(DECLARED),
            "resolution": [32, 32, 40],
            "encoding": encoding,
            "chunk_size": [64, 64, 64],
        }
        if encoding == "compressed_segmentation":
            scale["compressed_segmentation_block_size"] = [8, 8, 8]
        store = ts.open(
            {
                "driver": "neuroglancer_precomputed",
                "kvstore": {"driver": "file", "path": str(path)},
                "multiscale_metadata": {"type": kind, "data_type": dtype, "num_channels": 1},
                "scale_metadata": scale,
                "create": True,
            }
        ).result()
        block = open_volume(source).read_all()
        x, y, z = OFFSET
        store[x : x + BLOCK, y : y + BLOCK, z : z + BLOCK, 0].write(block).result()
    shutil.rmtree(work / "demo")
    return image_path, seg_path


def segment_near_100_nodes(segmentation, cache: Path) -> tuple[int, np.ndarray, int]:
    """The segment of the demo block whose kimimaro skeleton has nearest 100 nodes; a voxel of it."""
    from segscope.analysis.progress import drive
    from segscope.analysis.segment_list import enumerate_segments
    from segscope.analysis.skeleton_sources import SegmentSkeletons

    lo = np.array(OFFSET)
    listed = drive(enumerate_segments(segmentation, box_vox=(lo, lo + BLOCK), min_voxels=20_000))
    skeletons = SegmentSkeletons(segmentation, cache_root=cache)
    best = None
    for segment_id, seed in zip(listed.ids.tolist(), listed.seed_vox):
        n = drive(skeletons.resolve(segment_id, seed_vox=seed)).skeleton.n_nodes
        if best is None or abs(n - 100) < abs(best[2] - 100):
            best = (segment_id, seed, n)
    assert best is not None
    return best


def skeletonise_and_embed(image, segmentation, encoder, segment_id, seed, cache: Path, spacing_nm: float) -> dict:
    from segscope.analysis.centres import skeleton_centres
    from segscope.analysis.inference import stream_node_embeddings
    from segscope.analysis.progress import drive
    from segscope.analysis.skeleton_sources import SegmentSkeletons

    shutil.rmtree(cache, ignore_errors=True)
    click_nm = (np.asarray(seed) + 0.5) * segmentation.voxel_size_nm
    start = time.perf_counter()
    found = drive(SegmentSkeletons(segmentation, cache_root=cache).resolve(segment_id, click_nm=click_nm))
    skeletonised = time.perf_counter()
    centres = skeleton_centres(
        segment_id, found.skeleton.nodes_nm, found.skeleton.edges, spacing_nm=spacing_nm, click_nm=click_nm
    )
    drive(stream_node_embeddings(encoder, image, segmentation, [(segment_id, centres.node_ids, centres.positions_nm)]))
    done = time.perf_counter()
    return {
        "skeleton_nodes": found.skeleton.n_nodes,
        "centres": len(centres),
        "skeletonise_s": skeletonised - start,
        "embed_s": done - skeletonised,
        "total_s": done - start,
        "origin": found.origin,
    }


def rss_child(image_path: str, seg_path: str, n_centres: int, cache: str) -> None:
    """Embed ``n_centres`` centres; print JSON with peak RSS, wall and CPU utilisation."""
    from segscope.analysis.artefacts import find_demo_model
    from segscope.analysis.centres import skeleton_centres
    from segscope.analysis.encoder import open_encoder
    from segscope.analysis.inference import stream_node_embeddings
    from segscope.analysis.progress import drive
    from segscope.analysis.segment_list import enumerate_segments
    from segscope.analysis.skeleton_sources import SegmentSkeletons
    from segscope.analysis.volume import open_volume

    image, segmentation = open_volume(image_path), open_volume(seg_path)
    encoder = open_encoder(find_demo_model())
    lo = np.array(OFFSET)
    listed = drive(enumerate_segments(segmentation, box_vox=(lo, lo + BLOCK), min_voxels=2000))
    skeletons = SegmentSkeletons(segmentation, cache_root=Path(cache))
    pool = []
    for segment_id, seed in zip(listed.ids.tolist(), listed.seed_vox):
        skeleton = drive(skeletons.resolve(segment_id, seed_vox=seed)).skeleton
        centres = skeleton_centres(segment_id, skeleton.nodes_nm, skeleton.edges)
        pool.append((segment_id, centres.node_ids, centres.positions_nm))
    segments, total = [], 0
    while total < n_centres:
        for entry in pool:
            take = min(len(entry[1]), n_centres - total)
            segments.append((entry[0], entry[1][:take], entry[2][:take]))
            total += take
            if total >= n_centres:
                break
    before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = before.ru_maxrss
    start = time.perf_counter()
    drive(stream_node_embeddings(encoder, image, segmentation, segments))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        json.dumps(
            {
                "centres": total,
                "segments": len(segments),
                "peak_rss_mib": after.ru_maxrss / 1024,
                "rss_before_embedding_mib": rss_before / 1024,
                "wall_s": wall,
                "cutouts_per_s": total / wall,
                "cpu_utilisation": cpu / wall / (os.cpu_count() or 1),
                "cores": os.cpu_count(),
                "precision": encoder.precision,
            }
        )
    )


def list_segments(segmentation, box_edge: int | None, rounds: int) -> None:
    """Time listing the segments of a box around the block (None: the whole volume), with and without the probe."""
    from segscope.analysis.progress import drive
    from segscope.analysis.segment_list import enumerate_segments

    box = None
    if box_edge is not None:
        lo = np.asarray(OFFSET) - (box_edge - BLOCK) // 2
        box = (lo, lo + box_edge)
    probe = segmentation._chunk_files
    seconds: dict[str, list[float]] = {"chunk files": [], "read every block": []}
    found: dict[str, list[int]] = {}
    for _ in range(rounds):
        for variant in seconds:
            segmentation._chunk_files = probe if variant == "chunk files" else None
            start = time.perf_counter()
            listed = drive(enumerate_segments(segmentation, box_vox=box))
            seconds[variant].append(time.perf_counter() - start)
            found[variant] = listed.ids.tolist()
    segmentation._chunk_files = probe
    same = found["chunk files"] == found["read every block"]
    where = "the whole declared volume" if box_edge is None else f"a {box_edge}^3 box"
    print(f"list segments in {where} ({len(found['chunk files'])} segments, same ids both ways: {same})")
    for variant, values in seconds.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {variant:17s} median {statistics.median(values):6.2f} s  (runs: {runs})")
    ratios = [b / a for a, b in zip(seconds["chunk files"], seconds["read every block"])]
    print(f"  read every block / chunk files, paired: median {statistics.median(ratios):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--centres", type=int, default=10_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--listing-only", action="store_true", help="only time listing the segments of a box")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "segscope-bench-own-data")
    parser.add_argument("--rss-child", nargs=3, metavar=("IMAGE", "SEG", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], args.centres, args.rss_child[2])
        return

    from segscope.analysis.artefacts import find_demo_model
    from segscope.analysis.encoder import open_encoder
    from segscope.analysis.volume import open_volume

    args.work.mkdir(parents=True, exist_ok=True)
    image_path, seg_path = build(args.work)
    image, segmentation = open_volume(image_path), open_volume(seg_path)
    print(f"volume: declared {'x'.join(map(str, segmentation.shape))} voxels, a {BLOCK}^3 block at {OFFSET}")
    list_segments(segmentation, 512, rounds=3)
    list_segments(segmentation, None, rounds=2)
    if args.listing_only:
        return
    cache = args.work / "skeleton-cache"
    segment_id, seed, _ = segment_near_100_nodes(segmentation, cache)
    encoder = open_encoder(find_demo_model())
    # SegCLR's 1.5 um spacing, then every skeleton node a centre (an embed of ~100 cutouts).
    for spacing in (1500.0, 0.0):
        runs = [skeletonise_and_embed(image, segmentation, encoder, segment_id, seed, cache, spacing) for _ in range(3)]
        first = runs[0]
        print(
            f"segment {segment_id}: {first['skeleton_nodes']} skeleton nodes -> {first['centres']} centres at "
            f"{spacing:g} nm spacing ({first['origin']}), encoder {encoder.precision}"
        )
        for key in ("skeletonise_s", "embed_s", "total_s"):
            values = [r[key] for r in runs]
            listing = ", ".join(f"{v:.2f}" for v in values)
            print(f"  {key:14s} median {statistics.median(values):6.2f} s  (runs: {listing})")
    if args.skip_rss:
        return
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--centres",
            str(args.centres),
            "--rss-child",
            str(image_path),
            str(seg_path),
            str(cache),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"{figures['centres']} centres of {figures['segments']} segment entries ({figures['precision']}): "
        f"peak RSS {figures['peak_rss_mib']:.0f} MiB (before embedding {figures['rss_before_embedding_mib']:.0f} MiB), "
        f"{figures['cutouts_per_s']:.1f} cutouts/s, CPU utilisation {100 * figures['cpu_utilisation']:.0f} % "
        f"of {figures['cores']} cores over {figures['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
