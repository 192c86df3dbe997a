"""``segscope pipeline embed``: whole-volume embedding on Apache Beam (local runner or a cluster).

Only the standard library is imported at module level (``segscope --help`` stays instant);
the handler imports Beam, which comes with the ``beam`` extra (``pip install -e '.[beam]'``).
"""

from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    """Add ``pipeline`` and its ``embed`` subcommand to the ``segscope`` parser."""
    pipeline = subparsers.add_parser(
        "pipeline",
        help="batch pipelines on Apache Beam (local runner, Flink, Spark, Dataflow)",
        description="Batch pipelines on Apache Beam. See docs/pipeline.md for running on a cluster.",
    )
    commands = pipeline.add_subparsers(dest="pipeline_command", metavar="PIPELINE", required=True)
    embed = commands.add_parser(
        "embed",
        help="embed every node of many segments into a SegCLR CSV ZIP store (and/or Parquet)",
        description="Embed segments' skeleton nodes into a SegCLR-layout CSV ZIP store (nm coordinates) "
        "and/or Parquet, shard by shard; a rerun skips finished shards. Beam pipeline options go "
        "after '--' (for example: -- --flink_master=host:8081 --parallelism=16).",
    )
    embed.add_argument("--image", required=True, metavar="URL")
    embed.add_argument("--segmentation", required=True, metavar="URL")
    embed.add_argument(
        "--segments",
        required=True,
        metavar="IDS|all|FILE",
        help="comma-separated ids; 'all' (the dataset's segments table, else the skeleton source's "
        "segments, else a chunked scan of the segmentation); or a file: .parquet/.csv with a "
        "segment_id column, or a text list of ids",
    )
    embed.add_argument(
        "--skeletons",
        metavar="PATH",
        help="skeleton source: precomputed folder, SWC folder or node table (default: the "
        "segmentation's own); segments without one are skeletonised on the workers (kimimaro)",
    )
    embed.add_argument(
        "--skeleton-box-vox", type=int, default=None, metavar="N", help="largest skeletonisation box edge"
    )
    embed.add_argument(
        "--checkpoint", metavar="PATH", help="encoder (.keras or SegCLR checkpoint; default: demo model)"
    )
    embed.add_argument(
        "--classifiers", metavar="DIR", help="classifier folder: prediction columns in the Parquet output"
    )
    embed.add_argument("--spacing-nm", type=float, default=1500.0, help="centre spacing along the skeleton (nm)")
    embed.add_argument("--batch-size", type=int, default=None, help="cutouts per forward call (default 16)")
    embed.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="encoder precision; auto: each worker picks bfloat16 on GPUs and bfloat16 CPUs, else float32",
    )
    embed.add_argument(
        "--format",
        default="csvzip",
        metavar="csvzip,parquet",
        help="node embedding outputs: csvzip (SegCLR layout), parquet, or both (default csvzip)",
    )
    embed.add_argument(
        "--aggregate-um",
        default="",
        metavar="R[,R...]",
        help="also write radius-aggregated CSV ZIP stores (um; SegCLR publishes 10 and 25)",
    )
    embed.add_argument("--num-shards", type=int, default=10_000, help="SegCLR shard count (default 10000)")
    embed.add_argument("--bytewidth", type=int, default=64, help="SegCLR shard hash byte width (default 64)")
    embed.add_argument("--out", required=True, metavar="DIR", help="output folder (see docs/pipeline.md)")
    embed.add_argument(
        "--force", action="store_true", help="recompute every shard (also when the folder holds other settings)"
    )
    embed.add_argument(
        "--runner",
        default="local",
        help="Beam runner: local (default: Beam's FnApiRunner, offline), DirectRunner, PrismRunner, "
        "FlinkRunner, SparkRunner, DataflowRunner...",
    )
    embed.add_argument(
        "--direct_num_workers",
        "--workers",
        dest="workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes of the local runner (default 1)",
    )
    embed.add_argument(
        "--wave-shards",
        type=int,
        default=1000,
        metavar="N",
        help="shards per pipeline run: a kill loses at most one wave's work (default 1000)",
    )
    embed.add_argument("beam_args", nargs=argparse.REMAINDER, help="Beam pipeline options, after '--'")
    embed.set_defaults(handler=_cmd_pipeline_embed)


class _DropBeamResourceWarning(logging.Filter):
    """Drops Beam 2.77's per-batch "Resource module is not available" warning.

    RunInference cannot measure memory when torch is absent: its ``resource`` import sits in
    the same try block as a torch-only import.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resource module is not available" not in record.getMessage()


def _cmd_pipeline_embed(args: argparse.Namespace) -> int:
    from segscope.app.cli import CliError, _parse_ids, _resolve_encoder_path, _run_with_progress
    from segscope.app.compute_process import import_tensorflow_quietly

    # Before the progress bar: TensorFlow's start-up lines stay off the terminal (-v shows them).
    import_tensorflow_quietly()
    for name in ("", "apache_beam.runners.portability.local_job_service"):  # in-process, worker relay
        logging.getLogger(name).addFilter(_DropBeamResourceWarning())

    try:
        from segscope.analysis.pipeline.beam import run_embed
    except ImportError as exc:
        raise CliError(f"Apache Beam is not installed ({exc}); install the extra: pip install -e '.[beam]'") from None
    from segscope.analysis.pipeline.driver import list_segments, make_job
    from segscope.analysis.pipeline.job import plan_shards, prepare_output, split_finished

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    try:
        radii = tuple(float(r) * 1000.0 for r in args.aggregate_um.split(",") if r.strip())
    except ValueError:
        raise CliError(f"--aggregate-um takes radii in um, comma separated, got {args.aggregate_um!r}") from None
    if args.workers < 1 or args.wave_shards < 1:
        raise CliError("--direct_num_workers and --wave-shards must be >= 1")
    segments: list[int] | str = args.segments.strip()
    if args.segments.strip().lower() == "all":
        segments = "all"
    elif all(p.strip().isdigit() for p in args.segments.split(",")):  # ids, as `segscope embed` takes them
        try:
            segments = _parse_ids(args.segments)
        except argparse.ArgumentTypeError as exc:
            raise CliError(str(exc)) from None
    job = make_job(
        args.image,
        args.segmentation,
        args.out,
        _resolve_encoder_path(args.checkpoint),
        precision=args.precision,
        skeletons=args.skeletons,
        classifiers=args.classifiers,
        skeleton_box_vox=args.skeleton_box_vox,
        spacing_nm=args.spacing_nm,
        batch_size=args.batch_size,
        formats=formats,
        aggregate_radii_nm=radii,
        num_shards=args.num_shards,
        bytewidth=args.bytewidth,
    )
    listing = list_segments(args.segmentation, segments, skeletons=job.skeletons)
    if segments == "all":  # may scan the segmentation: worth a progress bar
        ids, seeds = _run_with_progress("listing segments", listing)
    else:
        from segscope.analysis.progress import drive

        ids, seeds = drive(listing)
    tasks = plan_shards(ids, job.num_shards, job.bytewidth, seeds or None)
    prepare_output(job, force=args.force)
    todo, finished = split_finished(job.layout, tasks)
    beam_args = list(args.beam_args)
    if beam_args[:1] == ["--"]:
        beam_args = beam_args[1:]
    beam_args = [f"--runner={args.runner}", *beam_args]
    if args.workers != 1:
        beam_args.append(f"--direct_num_workers={args.workers}")
    summary = _run_with_progress(
        f"pipeline embed ({args.runner})", run_embed(job, todo, len(finished), beam_args, wave_shards=args.wave_shards)
    )
    counters = summary.counters
    print(
        f"{summary.shards_written} shards written, {summary.shards_skipped} already finished, "
        f"{counters.get('segments', 0)} segments, {counters.get('nodes', 0)} nodes in {summary.seconds:.1f} s "
        f"-> {job.layout.root}",
        file=sys.stdout,
    )
    if summary.stage_ms:
        parts = [f"{stage} {total / 1000:.1f} s" for stage, (total, _count) in sorted(summary.stage_ms.items())]
        print("stage time (summed over workers): " + ", ".join(parts))
    return 0
