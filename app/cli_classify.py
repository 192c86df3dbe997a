"""``segscope classify train|evaluate``: SNGP classifiers from a user's own labels.

Only the standard library is imported here; the handlers import numpy, Keras and the readers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segscope.app.cli_args import positive_float, positive_int

#: Aggregation radius (nm) of each target when --radius-nm is not given: those of the
#: shipped demo classifiers (assets/classifiers/classifiers.json).
DEFAULT_RADIUS_NM = {"compartment": 2500.0, "cell_type": 10_000.0}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, metavar="FILE.parquet", help="segscope embed's Parquet table")
    parser.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help="CSV or Parquet with segment_id, label and optionally node_id (empty: the label is the segment's)",
    )
    parser.add_argument("--target", required=True, choices=("compartment", "cell_type"), help="what the labels name")
    parser.add_argument(
        "--radius-nm",
        type=positive_float(allow_zero=True),
        default=None,
        help="aggregate node embeddings within this radius in their segment first "
        "(default: compartment 2500, cell_type 10000; 0 = raw node embeddings)",
    )
    parser.add_argument("--config", default="BERT_SNGP_v1", help="classifier architecture (default BERT_SNGP_v1)")
    parser.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds, grouped by segment")
    parser.add_argument("--max-epochs", type=positive_int, default=None, help="training epoch cap (default 200)")
    parser.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    """Add ``segscope classify`` to the ``segscope`` subcommands."""
    parser = subparsers.add_parser(
        "classify",
        help="train or evaluate SNGP classifiers from your own labels",
        description="Train a compartment or cell-type classifier (SegCLR's SNGP network) on labelled "
        "nodes or segments of an embedding table, or estimate how well one would do with a "
        "cross-validation that keeps each segment's nodes in one fold.",
    )
    sub = parser.add_subparsers(dest="classify_command", required=True)
    train = sub.add_parser(
        "train",
        help="train and write a classifiers folder (embed --classifiers, open --classifiers, the app)",
    )
    _add_common(train)
    train.add_argument("--out", required=True, metavar="DIR", help="classifiers folder (created; other task kept)")
    train.add_argument("--no-cv", action="store_true", help="skip the cross-validation estimate")
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser("evaluate", help="grouped cross-validation of a classifier trained on the labels")
    _add_common(evaluate)
    evaluate.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    evaluate.set_defaults(handler=_evaluate)


def _examples(args):
    from segscope.analysis.classify.user_labels import labelled_examples, labels_from_table, summarize_labels
    from segscope.analysis.projection import read_embedding_table
    from segscope.app.cli import CliError

    if not str(args.embeddings).lower().endswith(".parquet"):
        raise CliError(f"--embeddings must be segscope embed's .parquet table, got {args.embeddings}")
    try:
        table = read_embedding_table(args.embeddings)
        segments, nodes, names = labels_from_table(args.labels)
        radius = DEFAULT_RADIUS_NM[args.target] if args.radius_nm is None else args.radius_nm
        examples = labelled_examples(
            table.segment_ids,
            table.node_ids,
            table.embeddings,
            segments,
            nodes,
            names,
            xyz_nm=table.xyz_nm,
            radius_nm=radius,
        )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CliError(str(exc)) from exc
    if args.target == "compartment":
        from segscope.analysis import COMPARTMENTS

        unknown = sorted(set(examples.class_names) - set(COMPARTMENTS))
        if unknown:
            raise CliError(
                f"compartment labels must be among {', '.join(COMPARTMENTS)} (the app colours nodes by those); "
                f"got {', '.join(unknown)}. Use --target cell_type for other names"
            )
    if len(examples.class_names) < 2:
        raise CliError(f"the labels name one class only ({examples.class_names[0]}); label at least two")
    print(
        f"{len(examples)} examples of {len(set(examples.segment_ids.tolist()))} segments "
        f"({summarize_labels(examples.labels)}), radius {examples.radius_nm:g} nm",
        file=sys.stderr,
    )
    return table, examples


def _train_options(args) -> dict:
    options: dict = {"config": args.config}
    if args.max_epochs is not None:
        options["max_epochs"] = args.max_epochs
    return options


def _cross_validate(args, examples):
    from segscope.analysis.classify.user_labels import cross_validate
    from segscope.app.cli import CliError, _run_with_progress

    try:
        return _run_with_progress(
            "cross-validation",
            cross_validate(examples, folds=args.folds, seed=args.seed, **_train_options(args)),
        )
    except (ValueError, KeyError, FloatingPointError) as exc:
        raise CliError(str(exc)) from exc


def _evaluate(args) -> int:
    _, examples = _examples(args)
    score = _cross_validate(args, examples)
    print(score.format())
    if args.json:
        Path(args.json).write_text(json.dumps(score.to_dict(), indent=1))
    return 0


def _encoder_of(path: str) -> tuple[str | None, str | None]:
    from segscope.analysis.provenance import read_provenance

    try:
        record = read_provenance(path)
    except ValueError:
        return None, None
    model = record.get("model")
    return (Path(str(model)).name if model else None), record.get("model_sha256")


def _train(args) -> int:
    from segscope.analysis.classify.user_labels import train_on_examples, write_classifier_folder
    from segscope.app.cli import CliError, _run_with_progress

    _, examples = _examples(args)
    encoder, encoder_sha256 = _encoder_of(args.embeddings)
    if encoder_sha256 is None:
        print(
            f"warning: {args.embeddings} records no encoder sha256; the classifiers will not be checked against one",
            file=sys.stderr,
        )
    evaluation = score = None
    if not args.no_cv:
        score = _cross_validate(args, examples)
        print(score.format())
        evaluation = score.to_dict()
    try:
        classifier = _run_with_progress(
            "training", train_on_examples(examples, score, seed=args.seed, **_train_options(args))
        )
        manifest = write_classifier_folder(
            args.out,
            args.target,
            classifier,
            radius_nm=examples.radius_nm,
            encoder=encoder,
            encoder_sha256=encoder_sha256,
            evaluation=evaluation,
        )
    except (ValueError, KeyError, FloatingPointError, OSError) as exc:
        raise CliError(str(exc)) from exc
    info = classifier.training_info
    print(
        f"wrote {manifest.parent / (args.target + '.npz')} ({', '.join(classifier.class_names)}; "
        f"{info['epochs_run']} epochs, best {info['best_epoch']}; OOD threshold {classifier.ood_threshold:.4g} "
        f"from the {info['ood_threshold_from']})"
    )
    return 0
