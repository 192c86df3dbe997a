"""``segscope similar``: the segments whose embeddings are nearest to a segment's.

Only the standard library is imported here; the handler imports faiss and the readers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from segscope.app.cli_args import integer, positive_int, voxel_size_nm

#: Columns of the ranked table (``--out`` and the terminal).
COLUMNS = ("rank", "segment_id", "distance", "n_nodes", "hits")

segment_id = integer(1, 2**64 - 1)


def register(subparsers) -> None:
    """Add ``segscope similar`` to the ``segscope`` subcommands."""
    parser = subparsers.add_parser(
        "similar",
        help="segments whose embeddings are nearest to a segment's (faiss; Euclidean distance)",
        description="Rank the segments of an embedding store by the Euclidean distance of their "
        "embeddings to a segment's: at the segment level, between per-segment mean embeddings; at "
        "the node level, from each of the segment's nodes to the nearest node of every other segment "
        "(averaged). Exact search up to 50,000 vectors, HNSW above.",
    )
    parser.add_argument(
        "--embeddings",
        required=True,
        metavar="STORE",
        help="segscope embed's *.parquet, or a SegCLR CSV ZIP store (folder or URL)",
    )
    parser.add_argument("--segment", required=True, type=segment_id, metavar="ID", help="the query segment")
    parser.add_argument("-k", type=positive_int, default=20, help="how many segments to return (default 20)")
    parser.add_argument(
        "--level",
        choices=("segment", "node"),
        default="segment",
        help="compare per-segment mean embeddings (default) or node embeddings",
    )
    parser.add_argument(
        "--radius-nm",
        type=float,
        default=None,
        help="segment level: average the nodes' radius aggregates (SegCLR's 10000 or 25000) instead of the nodes",
    )
    parser.add_argument("--index", choices=("auto", "flat", "hnsw"), default="auto", help="index kind (default auto)")
    parser.add_argument("--shards", type=positive_int, default=10_000, help="CSV ZIP: number of shards (default 10000)")
    parser.add_argument("--bytewidth", type=positive_int, default=64, help="CSV ZIP: shard function bytewidth")
    parser.add_argument(
        "--coordinates", choices=("nm", "voxels"), default="nm", help="CSV ZIP: what x, y, z hold (default nm)"
    )
    parser.add_argument("--voxel-size", type=voxel_size_nm, metavar="X,Y,Z", help="CSV ZIP in voxels: voxel size (nm)")
    parser.add_argument("--out", metavar="TABLE.csv", help="also write the ranked table as CSV")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.set_defaults(handler=run_similar)


def run_similar(args: argparse.Namespace) -> int:
    """Handle ``segscope similar`` (see :func:`register`)."""
    from segscope.analysis.similar import build_similarity_index, read_embeddings
    from segscope.app.cli import CliError, _run_with_progress

    if args.level == "node" and args.radius_nm is not None:
        raise CliError("--radius-nm applies to --level segment only")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it")
    start = time.perf_counter()
    data = _run_with_progress(
        "reading",
        read_embeddings(
            args.embeddings,
            num_shards=args.shards,
            bytewidth=args.bytewidth,
            coordinates=args.coordinates,
            voxel_size_nm=args.voxel_size,
        ),
    )
    known = set(data.segment_ids.tolist())
    if args.segment not in known:
        raise CliError(f"segment {args.segment} is not in {args.embeddings} ({len(known)} segments)")
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    index = _run_with_progress(
        f"indexing {args.level}s",
        build_similarity_index(data, args.level, radius_nm=args.radius_nm, kind=args.index),
    )
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    results = index.query(args.segment, args.k)
    query_ms = (time.perf_counter() - start) * 1e3
    print(
        f"segment {args.segment}: {len(results)} nearest of {index.n_segments - 1} other segments "
        f"({args.level} level, {index.index.kind} index of {len(index)} vectors, Euclidean distance); "
        f"read {read_s:.1f} s, index {build_s:.1f} s, query {query_ms:.1f} ms",
        file=sys.stderr,
    )
    rows = [(r.rank, r.segment_id, f"{r.distance:.6g}", r.n_nodes, r.hits) for r in results]
    print("\t".join(COLUMNS))
    for row in rows:
        print("\t".join(str(v) for v in row))
    if out is not None:
        _write_csv(out, rows, force=args.force)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _write_csv(path: Path, rows: list[tuple], *, force: bool) -> None:
    import csv

    from segscope.analysis.export.atomic import atomic_file

    with atomic_file(path, force=force) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
