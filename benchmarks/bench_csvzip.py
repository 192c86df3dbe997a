"""CSV ZIP store speed: write and read rows/s, one-segment fetch latency, aggregation time.

Usage::

    python benchmarks/bench_csvzip.py [--segments 20000] [--nodes 16] [--dim 64]
                                      [--shards 10000] [--reads 2000] [--workdir DIR]
                                      [--compression deflate|stored] [--level 1]
                                      [--big-members 24000] [--skip-store] [--skip-aggregate]

Prints:

1. writing a ``--shards``-shard local store (SegCLR's layout, bytewidth 64) of
   ``--segments`` segments with 8-24 (mean ``--nodes``) nodes each and ``--dim``-d
   embeddings through ``write_many`` (chunks of 5,000 segments, fsync per shard):
   rows/s of wall time and of this process's CPU time (the second does not depend on
   other load on the machine), MB on disk;
2. median and 90th-percentile time to fetch one random segment with ``read()``: cold
   (a fresh store object, so every shard's central directory is parsed; the OS page cache
   is warm since the files were just written) and warm (directories cached);
3. rows/s read by ``read()`` and by a whole-store ``iter_shard`` pass;
3b. fetch latency from one shard of ``--big-members`` (24,000: MICrONS v343's ~3.8e9
   nodes / 16 per segment / 10,000 shards) one-node segments, cold (central directory
   parsed) and warm (cached), since the small shards above have tiny directories;
4. aggregation at 10 and 25 um of 1,000 segments x 100 nodes and of one 100,000-node
   segment, nodes 1.5 um apart (SegCLR's spacing) along neurite-like paths (persistent
   random walks), plus the 100,000-node case on a plain random walk at 10 um, a dense
   worst case (hundreds of neighbours per node): medians over 3 runs, with the mean
   neighbour count.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from segscope.analysis.aggregate import aggregate_embeddings
from segscope.analysis.csvzip import CsvZipStore


def make_segments(rng: np.random.Generator, count: int, mean_nodes: int, dim: int) -> dict:
    """Random segments: ids below 2**63, voxel coordinates, float32 embeddings."""
    ids = np.unique(rng.integers(1, 2**63, size=count + 100))[:count]
    low, high = max(1, mean_nodes // 2), mean_nodes + mean_nodes // 2
    segments = {}
    for segment_id in ids.tolist():
        n = int(rng.integers(low, high + 1))
        segments[segment_id] = (
            np.arange(n, dtype=np.int64),
            rng.integers(0, 100_000, size=(n, 3)).astype(np.float64),
            rng.normal(size=(n, dim)).astype(np.float32),
        )
    return segments


def timed_reads(store: CsvZipStore, segment_ids: list[int]) -> tuple[list[float], int]:
    times, rows = [], 0
    for segment_id in segment_ids:
        start = time.perf_counter()
        node_ids, _, _ = store.read(segment_id)
        times.append(time.perf_counter() - start)
        rows += node_ids.shape[0]
    return times, rows


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(times) * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms (n={len(times)})"


def bench_store(args: argparse.Namespace, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    segments = make_segments(rng, args.segments, args.nodes, args.dim)
    total_rows = sum(arrays[0].shape[0] for arrays in segments.values())
    root = workdir / "store"
    store = CsvZipStore(
        root,
        num_shards=args.shards,
        bytewidth=64,
        compression=args.compression,
        compresslevel=args.level,
    )
    items = list(segments.items())
    start, cpu_start = time.perf_counter(), time.process_time()
    for at in range(0, len(items), 5000):
        store.write_many(dict(items[at : at + 5000]))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    files = list(root.glob("*.zip"))
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"write: {len(segments)} segments, {total_rows} rows x {args.dim} dims into "
        f"{len(files)} shard files ({megabytes:.1f} MB, {args.compression}): {elapsed:.1f} s "
        f"wall, {cpu:.1f} s CPU; {total_rows / elapsed:,.0f} rows/s wall, "
        f"{total_rows / cpu:,.0f} rows/CPU-s"
    )

    sample = rng.choice(np.array(list(segments), dtype=np.uint64), size=min(args.reads, len(segments)), replace=False)
    sample = [int(s) for s in sample]
    cold_store = CsvZipStore(root, num_shards=args.shards, cache_shards=args.shards)
    cpu_start = time.process_time()
    cold, rows = timed_reads(cold_store, sample)
    cold_cpu = time.process_time() - cpu_start
    print(f"fetch one segment, cold directory: {describe(cold)}")
    cpu_start = time.process_time()
    warm, _ = timed_reads(cold_store, sample)
    warm_cpu = time.process_time() - cpu_start
    print(f"fetch one segment, warm directory: {describe(warm)}")
    print(
        f"read() rows/s: cold {rows / sum(cold):,.0f} wall, {rows / cold_cpu:,.0f} per CPU-s; "
        f"warm {rows / sum(warm):,.0f} wall, {rows / warm_cpu:,.0f} per CPU-s"
    )

    start, cpu_start = time.perf_counter(), time.process_time()
    rows = 0
    for shard in store.shards():
        for _, node_ids, _, _ in store.iter_shard(shard):
            rows += node_ids.shape[0]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert rows == total_rows, (rows, total_rows)
    print(
        f"iter_shard over the whole store: {rows} rows in {elapsed:.1f} s wall, {cpu:.1f} s CPU; "
        f"{rows / elapsed:,.0f} rows/s wall, {rows / cpu:,.0f} rows/CPU-s"
    )


def bench_big_shard(args: argparse.Namespace, workdir: Path) -> None:
    rng = np.random.default_rng(2)
    root = workdir / "big"
    store = CsvZipStore(root, num_shards=1, compresslevel=args.level)
    ids = np.unique(rng.integers(1, 2**63, size=args.big_members + 100))[: args.big_members]
    one_row = (np.zeros(1, np.int64), np.zeros((1, 3)), rng.normal(size=(1, args.dim)).astype(np.float32))
    store.write_many({int(sid): one_row for sid in ids})
    size_mb = (root / "0.zip").stat().st_size / 1e6
    sample = [int(s) for s in rng.choice(ids, size=min(200, ids.shape[0]), replace=False)]
    cold = []
    for segment_id in sample:
        store.clear_cache()
        start = time.perf_counter()
        store.read(segment_id)
        cold.append(time.perf_counter() - start)
    warm, _ = timed_reads(store, sample)
    print(f"{args.big_members}-member shard ({size_mb:.1f} MB), fetch one segment: cold directory {describe(cold)}")
    print(f"{args.big_members}-member shard, fetch one segment: warm directory {describe(warm)}")


def random_walk(rng: np.random.Generator, n: int, persistence: float = 0.0, step_nm: float = 1500.0) -> np.ndarray:
    """Node positions [n, 3] in nm, ``step_nm`` apart. With ``persistence`` near 1 each
    step's direction mostly follows the previous one (a meandering neurite); with 0 the
    walk is plain Brownian and folds back on itself (dense)."""
    from scipy.signal import lfilter

    directions = lfilter([1.0], [1.0, -persistence], rng.normal(size=(n, 3)), axis=0)
    directions *= step_nm / np.linalg.norm(directions, axis=1, keepdims=True)
    return np.cumsum(directions, axis=0)


def mean_neighbours(xyz: np.ndarray, radius_nm: float) -> float:
    from scipy.spatial import cKDTree

    return float(cKDTree(xyz).query_ball_point(xyz, radius_nm, return_length=True).mean())


def median_time(function, repeats: int = 3) -> str:
    """Median wall and CPU time of ``function()`` over ``repeats`` calls, as text."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return f"median {statistics.median(walls):.3f} s wall, {statistics.median(cpus):.3f} s CPU"


def bench_aggregate(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    persistence = 0.95
    many = [
        (random_walk(rng, 100, persistence), rng.normal(size=(100, args.dim)).astype(np.float32)) for _ in range(1000)
    ]
    for radius in (10_000.0, 25_000.0):
        timing = median_time(lambda radius=radius: [aggregate_embeddings(xyz, emb, radius) for xyz, emb in many])
        neighbours = np.mean([mean_neighbours(xyz, radius) for xyz, _ in many[:50]])
        print(
            f"aggregate 1000 segments x 100 nodes at {radius / 1000:g} um: {timing} "
            f"({neighbours:.0f} neighbours per node)"
        )
    emb = rng.normal(size=(100_000, args.dim)).astype(np.float32)
    cases = [
        ("neurite-like", persistence, 10_000.0),
        ("neurite-like", persistence, 25_000.0),
        ("random-walk", 0.0, 10_000.0),
    ]
    for name, walk_persistence, radius in cases:
        xyz = random_walk(rng, 100_000, walk_persistence)
        timing = median_time(lambda xyz=xyz, radius=radius: aggregate_embeddings(xyz, emb, radius))
        print(
            f"aggregate one {name} segment x 100,000 nodes at {radius / 1000:g} um: {timing} "
            f"({mean_neighbours(xyz, radius):.0f} neighbours per node)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=20_000)
    parser.add_argument("--nodes", type=int, default=16, help="mean nodes per segment")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=2_000, help="random segments fetched")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the store (temp)")
    parser.add_argument("--compression", choices=("deflate", "stored"), default="deflate")
    parser.add_argument("--level", type=int, default=1, help="zlib level for deflate")
    parser.add_argument("--big-members", type=int, default=24_000, help="segments in the big shard")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--skip-aggregate", action="store_true")
    args = parser.parse_args()
    if not args.skip_store:
        workdir = Path(tempfile.mkdtemp(prefix="bench_csvzip_", dir=args.workdir))
        try:
            bench_store(args, workdir)
            bench_big_shard(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.skip_aggregate:
        bench_aggregate(args)


if __name__ == "__main__":
    main()
