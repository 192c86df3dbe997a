"""Find similar: index build time, query latency and recall@10 against exact search.

Usage::

    python benchmarks/bench_similar.py [--sizes 100000 1000000] [--queries 1000]
                                       [--ef-search 32 64 128] [--skip-demo]

Prints, for each ``--sizes`` node count (64-d):

1. build time of the HNSW index SegScope uses above 50,000 vectors (faiss
   ``IndexHNSWFlat``, M 32, efConstruction 200) and of the exact index (``IndexFlatL2``);
2. per efSearch: median and 90th-percentile latency of ONE 10-nearest-neighbour query at
   a time (as a click asks), and recall@10 of HNSW against exact search over
   ``--queries`` held-out vectors (the exact answers come from one batched flat search);
3. median latency of a whole "find similar" query by segment id: node level (the
   segment's 16 nodes each searched, segments ranked) and segment level (one mean vector,
   exact index over the segment means).

The data is RANDOM CLUSTERED data (:func:`segscope.analysis.similar.clustered_embeddings`:
100 clusters, each a random centre plus an 8-d random subspace at unit scale plus
isotropic noise of std 0.05; segments of 16 nodes of one cluster), chosen for scale, not
realism: real SegCLR embeddings also lie near low-dimensional manifolds, but their
recall may differ. Then, unless ``--skip-demo``, the same figures on the demo's real
embeddings (``assets/demo_context.parquet``: 4,535 nodes of 1,036 segments), with HNSW
forced (at that size SegScope searches exactly), and, when the demo dataset is cached,
how often the top-5 similar segments share the query's ground-truth cell type.

Targets (issue 18): query <= 10 ms at 10^6 nodes, recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from segscope.analysis.progress import drive
from segscope.analysis.similar import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    EmbeddingSet,
    SimilarityIndex,
    build_similarity_index,
    build_vector_index,
    clustered_embeddings,
    read_embeddings,
    recall_at_k,
)

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def one_at_a_time(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Ids of each query's k nearest, searched one query per call, and each call's ms."""
    ids = np.empty((len(queries), k), np.int64)
    times = []
    for i, query in enumerate(queries):
        start = time.perf_counter()
        _, found = index.search(query[None, :], k)
        times.append((time.perf_counter() - start) * 1e3)
        ids[i] = found[0]
    return ids, times


def measure(
    name: str,
    data: EmbeddingSet,
    queries: np.ndarray,
    ef_values: list[int],
    n_segment_queries: int,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
) -> None:
    n = len(data)
    print(f"\n== {name}: {n:,} nodes of {len(np.unique(data.segment_ids)):,} segments, {data.dim}-d ==")
    start = time.perf_counter()
    node_index = drive(build_similarity_index(data, "node", kind="hnsw", m=m, ef_construction=ef_construction))
    hnsw_s = time.perf_counter() - start
    start = time.perf_counter()
    exact = drive(build_vector_index(data.embeddings, kind="flat"))
    flat_s = time.perf_counter() - start
    print(
        f"build: HNSW (M {m}, efConstruction {ef_construction}) {hnsw_s:.1f} s "
        f"({n / hnsw_s:,.0f} vectors/s); exact flat {flat_s:.2f} s"
    )
    start = time.perf_counter()
    _, truth = exact.search(queries, 10)
    exact_batch_ms = (time.perf_counter() - start) * 1e3 / len(queries)
    _, exact_times = one_at_a_time(exact, queries[: min(len(queries), 100)], 10)
    print(
        f"exact search: {statistics.median(exact_times):.2f} ms per single query (median of "
        f"{len(exact_times)}), {exact_batch_ms:.3f} ms per query batched"
    )
    hnsw = node_index.index
    for ef in ef_values:
        hnsw.ef_search = ef
        ids, times = one_at_a_time(hnsw, queries, 10)
        print(
            f"HNSW efSearch {ef:4d}: query median {statistics.median(times):.3f} ms, p90 "
            f"{percentile(times, 90):.3f} ms; recall@10 {recall_at_k(ids, truth):.4f} ({len(queries)} queries)"
        )
    hnsw.ef_search = HNSW_EF_SEARCH
    rng = np.random.default_rng(1)
    all_segments = np.unique(data.segment_ids)
    segments = rng.choice(all_segments, min(n_segment_queries, len(all_segments)), replace=False)
    times = []
    for segment in segments:
        start = time.perf_counter()
        node_index.query(int(segment), 20)
        times.append((time.perf_counter() - start) * 1e3)
    print(
        f"find similar by segment id, node level (efSearch {HNSW_EF_SEARCH}, k 20): median "
        f"{statistics.median(times):.2f} ms, p90 {percentile(times, 90):.2f} ms ({len(times)} segments)"
    )
    start = time.perf_counter()
    segment_index: SimilarityIndex = drive(build_similarity_index(data, "segment"))
    build_segments_s = time.perf_counter() - start
    times = []
    for segment in segments:
        start = time.perf_counter()
        segment_index.query(int(segment), 20)
        times.append((time.perf_counter() - start) * 1e3)
    print(
        f"find similar by segment id, segment level ({segment_index.index.kind} index of "
        f"{len(segment_index):,} segment means, built in {build_segments_s:.2f} s): median "
        f"{statistics.median(times):.2f} ms"
    )


def type_agreement(data: EmbeddingSet, truth: dict[int, str], level: str, k: int = 5) -> tuple[float, float]:
    """Fraction of top-k answers with the query's type, and the chance rate (sum of p^2)."""
    index = drive(build_similarity_index(data, level))
    segments = np.unique(data.segment_ids)
    same = []
    for segment in segments:
        for result in index.query(int(segment), k):
            same.append(truth.get(result.segment_id) == truth.get(int(segment)))
    types = [truth.get(int(s)) for s in segments]
    _, counts = np.unique(np.asarray(types, dtype=object).astype(str), return_counts=True)
    return float(np.mean(same)), float(((counts / counts.sum()) ** 2).sum())


def demo_truth(segments: set[int]) -> dict[int, str] | None:
    """Ground-truth cell type of each segment, from a cached demo dataset holding all ``segments``."""
    import pyarrow.parquet as pq

    from segscope.analysis.paths import user_cache_dir

    for table_path in sorted((user_cache_dir() / "demo").glob("v*-seed0/segments.parquet")):
        table = pq.read_table(table_path, columns=["segment_id", "cell_type"])
        truth = dict(zip(table.column("segment_id").to_pylist(), table.column("cell_type").to_pylist()))
        if segments <= truth.keys():
            return truth
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--segment-queries", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, HNSW_EF_SEARCH])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--m", type=int, default=HNSW_M, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    parser.add_argument(
        "--walk-step",
        type=float,
        default=None,
        help="segments as random walks with this step (default: independent nodes; see clustered_embeddings)",
    )
    args = parser.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; Euclidean distance")
    for n in args.sizes:
        # Held-out queries from the same distribution: the last --queries rows.
        data = clustered_embeddings(n + args.queries, 64, n_clusters=100, walk_step=args.walk_step, seed=0)
        queries = data.embeddings[n:].copy()
        base = EmbeddingSet(data.segment_ids[:n], data.node_ids[:n], data.embeddings[:n], None, data.source)
        nodes = "independent nodes" if args.walk_step is None else f"segments walk, step {args.walk_step:g}"
        measure(
            f"random clustered data ({nodes}), 10^{round(np.log10(n))}",
            base,
            queries,
            args.ef_search,
            args.segment_queries,
            args.m,
            args.ef_construction,
        )
    if args.skip_demo:
        return
    context = REPO / "assets" / "demo_context.parquet"
    demo = drive(read_embeddings(context))
    # Queries: every 9th node, left out of the index.
    held = np.zeros(len(demo), bool)
    held[::9] = True
    base = EmbeddingSet(demo.segment_ids[~held], demo.node_ids[~held], demo.embeddings[~held], None, str(context))
    measure(
        "demo's real embeddings (HNSW forced)",
        base,
        demo.embeddings[held],
        args.ef_search,
        args.segment_queries,
        args.m,
        args.ef_construction,
    )
    truth = demo_truth(set(np.unique(demo.segment_ids).tolist()))
    if truth is None:
        print("(no cached demo dataset holds these segments: no ground-truth type agreement)")
        return
    for level in ("segment", "node"):
        agreement, chance = type_agreement(demo, truth, level)
        print(
            f"demo, {level} level: top-5 similar segments share the query's ground-truth cell type "
            f"{agreement:.3f} of the time (chance {chance:.3f})"
        )


if __name__ == "__main__":
    main()
