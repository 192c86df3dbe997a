"""``segscope connectivity``, ``segscope motifs`` and ``segscope predict-property``.

Circuit analysis on a synapse table (pre_segment, post_segment, x_nm, y_nm, z_nm) and
segment types, and function-from-structure prediction on segment embeddings. Only the
standard library at module level (``segscope --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _synapses_and_types(args: argparse.Namespace):
    from segscope.analysis.connectivity import read_segment_types
    from segscope.analysis.synapses import read_synapse_table

    synapses = read_synapse_table(args.synapses)
    types = read_segment_types(args.types, ood_threshold=args.ood_threshold)
    if args.labels:
        from segscope.analysis.connectivity import read_segment_types as read_labels

        labels = read_labels(args.labels, use_manual_labels=True)
        types = types.with_labels(labels.as_dict())
    return synapses, types


def _add_type_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--synapses",
        required=True,
        help="synapse table, .parquet or .csv (pre_segment, post_segment, x_nm, y_nm, z_nm)",
    )
    parser.add_argument(
        "--types",
        required=True,
        help="segment types: an embeddings .parquet from 'segscope embed --classifiers' or a segment table "
        "(segment_id, cell_type[, ood, manual_label]; a demo's segments.parquet is the ground truth)",
    )
    parser.add_argument("--labels", help="manual labels overriding the types (segment_id, cell_type or manual_label)")
    parser.add_argument(
        "--ood-threshold", type=float, help="OOD when ood_score exceeds this (default: the classifier's)"
    )


def _cmd_connectivity(args: argparse.Namespace) -> int:
    from segscope.analysis.connectivity import connectivity_matrix

    synapses, types = _synapses_and_types(args)
    # Default order: every type the type table names (glia without synapses show as zeros).
    order = args.type_order.split(",") if args.type_order else sorted({t for t in types.cell_type.tolist() if t})
    matrix = connectivity_matrix(synapses, types, order)
    norm = matrix.normalised(args.normalise)
    width = max([8, *(len(t) for t in matrix.types)]) + 1
    print(f"{len(synapses)} synapses; rows: presynaptic type, columns: postsynaptic type")
    print("synapses".ljust(width) + "".join(t.rjust(width) for t in matrix.types))
    for i, t in enumerate(matrix.types):
        print(t.ljust(width) + "".join(str(v).rjust(width) for v in matrix.synapses[i]))
    print(f"normalised ({args.normalise})".ljust(width))
    for i, t in enumerate(matrix.types):
        print(t.ljust(width) + "".join(f"{v:.3g}".rjust(width) for v in norm[i]))
    if args.out:
        matrix.write_csv(args.out, args.normalise, force=args.force)
        print(f"wrote {args.out}")
    return 0


def _cmd_motifs(args: argparse.Namespace) -> int:
    from segscope.analysis.motifs import motif_census, synapse_graph
    from segscope.app.cli import CliError, _run_with_progress

    synapses, types = _synapses_and_types(args)
    lookup = types.as_dict()
    nodes = [s for s, t in lookup.items() if not args.type or t == args.type]
    if args.type and not nodes:
        raise CliError(f"no segment has type {args.type!r} (types: {', '.join(sorted(set(lookup.values())))})")
    graph = synapse_graph(synapses, nodes)
    print(f"graph: {graph.number_of_nodes()} segments, {graph.number_of_edges()} connections")
    results = []
    for model in args.null:
        result = _run_with_progress(
            f"motifs ({model} null)",
            motif_census(
                graph, model, types=lookup, n_samples=args.samples, swaps_per_edge=args.swaps_per_edge, seed=args.seed
            ),
        )
        results.append(result)
        print(f"null model: {model} ({result.n_samples} graphs)")
        print(f"{'motif':<11}{'observed':>10}{'null mean':>12}{'null sd':>10}{'z':>9}")
        for row in result.rows():
            print(
                f"{row['motif']:<11}{row['observed']:>10}{row['null_mean']:>12.1f}{row['null_std']:>10.2f}{row['z']:>9.2f}"
            )
    if args.out:
        import csv

        from segscope.analysis.export.atomic import atomic_file

        rows = [row for result in results for row in result.rows()]
        with atomic_file(args.out, force=args.force) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")
    return 0


def _cmd_predict_property(args: argparse.Namespace) -> int:
    from segscope.analysis.predict_property import predict_property, read_property, segment_mean_embeddings
    from segscope.app.cli import _run_with_progress

    ids, features = segment_mean_embeddings(args.embeddings)
    property_ids, values = read_property(args.table, args.column)
    result = _run_with_progress(
        "predict-property",
        predict_property(
            ids,
            features,
            property_ids,
            values,
            column=args.column,
            folds=args.folds,
            n_shuffles=args.shuffles,
            seed=args.seed,
            period=args.period,
        ),
    )
    print(f"{args.column}: {result.task} on {result.n_segments} segments' mean embeddings, {result.folds}-fold CV")
    print(f"  {result.metric}: {result.score:.3f} (folds {', '.join(f'{s:.3f}' for s in result.fold_scores)})")
    print(
        f"  shuffled-label baseline: {result.baseline_mean:.3f} +- {result.baseline_std:.3f} "
        f"({args.shuffles} shuffles), p = {result.p_value:.3g}"
    )
    if args.json:
        from dataclasses import asdict

        Path(args.json).write_text(json.dumps(asdict(result), indent=1) + "\n")
    return 0


def register(subparsers) -> None:
    """Add the analysis subcommands to ``segscope``'s subparsers."""
    conn = subparsers.add_parser(
        "connectivity", help="type-to-type synapse counts from a synapse table and segment types"
    )
    _add_type_arguments(conn)
    conn.add_argument(
        "--normalise",
        choices=("row", "pair"),
        default="row",
        help="row: share of the pre type's synapses; pair: per segment pair",
    )
    conn.add_argument("--type-order", help="comma-separated type order (others follow, then OOD, untyped)")
    conn.add_argument("--out", help="write the matrix as a CSV table (one row per type pair)")
    conn.add_argument("--force", action="store_true")
    conn.set_defaults(handler=_cmd_connectivity)

    motifs = subparsers.add_parser("motifs", help="2- and 3-node motif census against null models (z-scores)")
    _add_type_arguments(motifs)
    motifs.add_argument("--null", nargs="+", choices=("degree", "type"), default=["degree", "type"])
    motifs.add_argument("--type", help="only the segments of this type")
    motifs.add_argument("--samples", type=int, default=100, help="null graphs per model")
    motifs.add_argument("--swaps-per-edge", type=float, default=10.0)
    motifs.add_argument("--seed", type=int, default=0)
    motifs.add_argument("--out", help="write the census as CSV")
    motifs.add_argument("--force", action="store_true")
    motifs.set_defaults(handler=_cmd_motifs)

    predict = subparsers.add_parser(
        "predict-property", help="predict a segment property from embeddings (cross-validated)"
    )
    predict.add_argument("--embeddings", required=True, help="embeddings .parquet (segscope embed)")
    predict.add_argument("--table", required=True, help="segment table (.parquet/.csv) with segment_id and the column")
    predict.add_argument("--column", required=True, help="numbers: ridge (R^2); text: logistic (balanced accuracy)")
    predict.add_argument(
        "--period", type=float, help="the column is an angle with this period (180 for orientations in degrees)"
    )
    predict.add_argument("--folds", type=int, default=5)
    predict.add_argument("--shuffles", type=int, default=20, help="shuffled-label baseline repeats")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--json", help="also write the scores as JSON")
    predict.set_defaults(handler=_cmd_predict_property)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through 'segscope'")
