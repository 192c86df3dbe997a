"""The ``segscope`` command line.

Only argparse and the standard library are imported at start-up so ``segscope --help``
answers at once; each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

__version__ = "0.1.0"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or X,Y,Z voxels, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) < 16:
        raise argparse.ArgumentTypeError(f"size must be N or X,Y,Z voxels (each >= 16), got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"segment ids must be comma-separated integers, got {text!r}") from None
    if not ids or any(i <= 0 or i >= 2**64 for i in ids):
        raise argparse.ArgumentTypeError(f"segment ids must be in 1..2^64-1, got {text!r}")
    return ids


def _progress_bar(desc: str):
    """A callback that renders :class:`analysis.progress.Progress` reports with tqdm."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="", dynamic_ncols=True, file=sys.stderr)

    def update(report) -> None:
        if report.total and bar.total != report.total:
            bar.total = report.total
        bar.unit = report.unit or ""
        bar.set_postfix_str(report.message, refresh=False)
        bar.n = report.done
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def _cmd_demo_data(args: argparse.Namespace) -> int:
    import time

    from analysis.progress import drive
    from analysis.synthetic import generate_dataset

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise CliError(f"{out} exists and is not empty; pass --force to replace it")
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    bar = _progress_bar("demo-data")
    try:
        path = drive(generate_dataset(out, seed=args.seed, size_vox=args.size), bar)
    finally:
        bar.close()
    print(f"wrote demo dataset to {path} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from analysis.volume import open_volume

    volume = open_volume(args.url)
    lo, hi = volume.bounds_nm
    print(f"url:          {volume.url}")
    print(f"format:       {volume.info.driver}")
    print(f"dtype:        {volume.dtype}")
    print(f"shape (xyz):  {' x '.join(str(s) for s in volume.shape)} voxels")
    print(f"voxel (xyz):  {' x '.join(f'{v:g}' for v in volume.voxel_size_nm)} nm")
    print(f"origin (xyz): {volume.origin_vox.tolist()} voxels")
    print(f"bounds (nm):  {lo.tolist()} to {hi.tolist()}")
    return 0


def _open_dataset_arg(path: str | None):
    """The dataset named on the command line, or the cached demo dataset."""
    from analysis.dataset import open_dataset

    if path:
        return open_dataset(path)
    from analysis.synthetic import demo_dataset

    return open_dataset(demo_dataset())


def _cmd_train(args: argparse.Namespace) -> int:
    from analysis.encoder import SEGCLR_FULL, SEGCLR_LITE
    from analysis.progress import drive
    from analysis.training import CellSplit, TrainingConfig, train_on_dataset

    dataset = _open_dataset_arg(args.dataset)
    encoder = {"lite": SEGCLR_LITE, "full": SEGCLR_FULL}[args.encoder]
    config = TrainingConfig(
        encoder=encoder.to_dict(), steps=args.steps, batch_pairs=args.batch_pairs,
        learning_rate=args.learning_rate, warmup_steps=min(args.warmup_steps, args.steps),
        max_pair_distance_nm=args.max_pair_distance_nm, checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    split = CellSplit.for_dataset(dataset, args.eval_fraction, args.holdout_type, seed=args.seed)
    bar = _progress_bar("train")
    try:
        result = drive(train_on_dataset(dataset, args.out, config, split=split, resume=not args.no_resume,
                                        stop_at_step=args.stop_at_step), bar)
    finally:
        bar.close()
    last = result.losses[-20:]
    print(f"trained {result.steps_done} steps in {result.seconds:.0f} s; mean loss of the last "
          f"{len(last)} steps {sum(last) / max(1, len(last)):.3f}")
    if result.encoder_path:
        print(f"encoder written to {result.encoder_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segscope",
        description="SegScope: compute, classify and explore SegCLR embeddings of EM segments. "
        "With no command, opens the desktop app on the built-in demo.",
    )
    parser.add_argument("--version", action="version", version=f"segscope {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write a synthetic demo dataset with ground truth")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--size", type=_parse_size, default=(256, 256, 256),
                      help="volume size in voxels, N or X,Y,Z (default 256)")
    demo.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    demo.set_defaults(handler=_cmd_demo_data)

    train = sub.add_parser("train", help="self-supervised SegCLR training on a dataset's training cells")
    train.add_argument("--dataset", help="SegScope dataset folder (default: the built-in demo)")
    train.add_argument("--out", required=True, help="run folder (checkpoints, split, final encoder)")
    train.add_argument("--encoder", choices=("lite", "full"), default="lite", help="architecture (default lite)")
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--batch-pairs", type=int, default=32, help="positive pairs per step (2x cutouts)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--max-pair-distance-nm", type=float, default=3000.0,
                       help="largest straight-line distance between the nodes of a pair (nm)")
    train.add_argument("--eval-fraction", type=float, default=0.25, help="cells of each type kept for evaluation")
    train.add_argument("--holdout-type", action="append", default=[],
                       help="cell type kept out of training entirely (repeatable)")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--stop-at-step", type=int, default=None, help="stop early (resumable) at this step")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    train.set_defaults(handler=_cmd_train)

    info = sub.add_parser("info", help="print format, shape, voxel size and bounds of a volume")
    info.add_argument("url", help="path or URL (file://, gs://, http(s)://; precomputed, zarr, n5)")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"segscope {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
