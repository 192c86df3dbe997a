"""The ``segscope`` command line.

Only argparse and the standard library are imported at start-up so ``segscope --help``
answers at once; each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segscope.analysis import __version__
from segscope.app import cli_args

log = logging.getLogger(__name__)


# Subcommands kept in their own modules; each defines ``register(subparsers)``, which adds
# its parser(s) and sets ``handler``. Keeps this file from growing with every command.
_COMMAND_MODULES: tuple[str, ...] = (
    "segscope.app.cli_similar",
    "segscope.app.cli_pipeline",
    "segscope.app.cli_analysis",
    "segscope.app.cli_classify",
)


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
    """A callback that renders :class:`segscope.analysis.progress.Progress` reports with tqdm."""
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


def _run_with_progress(desc: str, generator):
    """Drive a compute generator to its result behind a progress bar on stderr."""
    from segscope.analysis.progress import drive

    bar = _progress_bar(desc)
    try:
        return drive(generator, bar)
    finally:
        bar.close()


def _cmd_demo_data(args: argparse.Namespace) -> int:
    import time

    from segscope.analysis.export.atomic import atomic_folder
    from segscope.analysis.synthetic import generate_dataset

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"{out} is a file, not a folder")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not args.force:
        raise CliError(f"{out} exists and is not empty; pass --force to replace it")
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True)
    start = time.perf_counter()
    # Built in a hidden sibling and renamed into place: a full disk or a kill leaves no
    # partial dataset (and an existing one untouched); the next run removes the leftovers.
    with atomic_folder(out, force=out.exists()) as work:
        _run_with_progress("demo-data", generate_dataset(work, seed=args.seed, size_vox=args.size))
    print(f"wrote demo dataset to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from segscope.analysis.volume import open_volume

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
    from segscope.analysis.dataset import open_dataset

    if path:
        return open_dataset(path)
    from segscope.analysis.synthetic import demo_dataset

    return open_dataset(demo_dataset())


def _cmd_train(args: argparse.Namespace) -> int:
    from segscope.analysis.encoder import SEGCLR_FULL, SEGCLR_LITE
    from segscope.analysis.training import CellSplit, TrainingConfig, train_on_dataset

    dataset = _open_dataset_arg(args.dataset)
    encoder = {"lite": SEGCLR_LITE, "full": SEGCLR_FULL}[args.encoder]
    config = TrainingConfig(
        encoder=encoder.to_dict(),
        steps=args.steps,
        batch_pairs=args.batch_pairs,
        learning_rate=args.learning_rate,
        warmup_steps=min(args.warmup_steps, args.steps),
        max_pair_distance_nm=args.max_pair_distance_nm,
        segment_weighting=args.segment_weighting,
        truncate_fraction=args.truncate_fraction,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    split = CellSplit.for_dataset(dataset, args.eval_fraction, args.holdout_type, seed=args.seed)
    result = _run_with_progress(
        "train",
        train_on_dataset(
            dataset, args.out, config, split=split, resume=not args.no_resume, stop_at_step=args.stop_at_step
        ),
    )
    last = result.losses[-20:]
    print(
        f"trained {result.steps_done} steps in {result.seconds:.0f} s; mean loss of the last "
        f"{len(last)} steps {sum(last) / max(1, len(last)):.3f}"
    )
    if result.encoder_path:
        print(f"encoder written to {result.encoder_path}")
    return 0


def _cmd_open(args: argparse.Namespace) -> int:
    from segscope.app.main import run_app

    return run_app(args)


def _resolve_encoder_path(checkpoint: str | None) -> Path:
    """The encoder named on the command line, or the shipped demo model."""
    from segscope.analysis.artefacts import check_checkpoint, find_demo_model

    if checkpoint:
        return check_checkpoint(checkpoint)
    found = find_demo_model()
    if found is None:
        raise CliError("no trained demo encoder in assets/; pass --checkpoint (a .keras file or a SegCLR checkpoint)")
    return found


def _parse_segments(text: str) -> list[int] | str:
    """``all`` or comma-separated segment ids."""
    if text.strip().lower() == "all":
        return "all"
    return _parse_ids(text)


def _local_dir(url: str) -> Path | None:
    """The local folder a volume argument names (plain path or file://), else None."""
    from segscope.analysis.artefacts import local_folder

    path = local_folder(url)
    return path if path is not None and path.is_dir() else None


def _all_segment_ids(segmentation, box_vox, min_voxels: int):
    """Every segment of the segmentation (in ``box_vox``, with at least ``min_voxels``): a chunked scan.

    Returns the :class:`segscope.analysis.segment_list.SegmentList` (ids and a voxel of each).
    """
    from segscope.analysis.segment_list import enumerate_segments

    scan = enumerate_segments(segmentation, box_vox=box_vox, min_voxels=min_voxels)
    found = _run_with_progress("listing segments", scan)
    if not len(found):
        where = "" if box_vox is None else f" in the box {box_vox[0].tolist()}..{box_vox[1].tolist()}"
        raise CliError(f"no segment with at least {min_voxels} voxels{where} of {segmentation.url}")
    return found


def _segment_skeleton(skeletons, segment_ids, listed, box_vox, spacing_nm: float):
    """Centres of every segment from its skeleton: given, cached, or made now (kimimaro, bounded box).

    A generator (one Progress per segment and per skeleton box read) returning
    ``(segments, origins, edgeless)``: ``(id, node_ids, centres_nm)`` per segment, where each
    skeleton came from, and the segments whose skeleton has no edges.
    """
    from segscope.analysis.centres import skeleton_centres
    from segscope.analysis.progress import Progress

    segments, origins, edgeless = [], {}, []
    total = len(segment_ids)
    for done, segment_id in enumerate(segment_ids):
        seed = None if listed is None else listed.seed_of(segment_id)
        yield Progress(done, total, "segments", f"skeleton of {segment_id}")
        found = yield from skeletons.resolve(segment_id, seed_vox=seed, search_box_vox=box_vox)
        if found.origin == "truncated":
            log.warning("segment %d: %s", segment_id, found.note)
        origins[segment_id] = found.origin
        centres = skeleton_centres(segment_id, found.skeleton.nodes_nm, found.skeleton.edges, spacing_nm=spacing_nm)
        if centres.thinned_by == "distance":
            edgeless.append(segment_id)
        segments.append((segment_id, centres.node_ids, centres.positions_nm))
    yield Progress(total, total, "segments", "skeletons ready")
    return segments, origins, edgeless


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from segscope.analysis.artefacts import named_skeleton_folder
    from segscope.analysis.dataset import dataset_beside
    from segscope.analysis.encoder import open_encoder
    from segscope.analysis.inference import stream_node_embeddings
    from segscope.analysis.segment_list import parse_bbox, read_segment_ids_file
    from segscope.analysis.skeleton_sources import SegmentSkeletons, open_skeleton_source
    from segscope.analysis.volume import open_volume

    out = Path(args.out)
    parquet = out.suffix == ".parquet"
    _check_output_first(out, folder=not parquet, force=args.force)  # before any compute
    if out.exists() and parquet and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it")
    table_path = _segment_table_path(out)
    if table_path.exists() and not args.force:
        raise CliError(f"{table_path} (the segment table) exists; pass --force to replace it")
    if args.classifiers and not parquet:
        raise CliError("--classifiers writes prediction columns, which only a .parquet output holds")
    encoder_path = _resolve_encoder_path(args.checkpoint)
    classifiers = None
    if args.classifiers:
        from segscope.analysis.artefacts import classifier_encoder_mismatch, read_classifier_folder

        classifiers = read_classifier_folder(args.classifiers)  # checked before the long part
        mismatch = classifier_encoder_mismatch(classifiers, encoder_path)
        if mismatch:
            raise CliError(f"refusing --classifiers: {mismatch}")
    voxel = args.voxel_size_nm
    try:
        image = open_volume(args.image, voxel_size_nm=voxel)
        segmentation = open_volume(args.segmentation, voxel_size_nm=voxel)
    except ValueError as exc:
        hint = " (give it with --voxel-size-nm X,Y,Z)" if "voxel size" in str(exc) and voxel is None else ""
        raise CliError(f"{exc}{hint}") from exc
    segmentation_dir = _local_dir(args.segmentation)
    skeleton_location = args.skeletons
    if skeleton_location is None and segmentation_dir is not None:
        named = named_skeleton_folder(segmentation_dir)
        skeleton_location = str(named) if named is not None and named.is_dir() else None
    given = open_skeleton_source(skeleton_location) if skeleton_location else None
    skeletons = SegmentSkeletons(
        segmentation, given, max_box_vox=args.skeleton_box_vox, cache_root=False if args.no_skeleton_cache else None
    )
    dataset = dataset_beside(args.segmentation)
    box = None if args.bbox is None else parse_bbox(args.bbox, segmentation.voxel_size_nm)
    listed = None
    if args.segments_file:
        segment_ids = read_segment_ids_file(args.segments_file)
    elif args.segments == "all":
        listed = _all_segment_ids(segmentation, box, args.min_voxels)
        segment_ids = [int(i) for i in listed.ids]
    else:
        segment_ids = args.segments
    segments, origins, edgeless = _run_with_progress(
        "skeletons", _segment_skeleton(skeletons, segment_ids, listed, box, args.spacing_nm)
    )
    if edgeless:
        log.warning(
            "%d skeleton(s) have no edges (e.g. segment %d): thinned by straight-line distance",
            len(edgeless),
            edgeless[0],
        )
    encoder = open_encoder(encoder_path, precision=args.precision)
    result = _run_with_progress(
        f"embed ({encoder.precision})",
        stream_node_embeddings(encoder, image, segmentation, segments, batch_size=args.batch_size),
    )
    predictions = None
    calls: dict[int, Any] = {}
    if classifiers is not None:
        predictions, calls = _run_with_progress("classify", _predict_nodes(classifiers, result))
    centres_record = {
        "spacing_nm": args.spacing_nm,
        "thinned_by_path": len(segments) - len(edgeless),
        "thinned_by_distance": len(edgeless),
        "skeletons": {
            origin: sum(1 for v in origins.values() if v == origin) for origin in sorted(set(origins.values()))
        },
    }
    if parquet:
        _write_embeddings_parquet(
            out,
            result,
            encoder_path,
            predictions=predictions,
            classifiers=classifiers,
            dataset=dataset,
            spacing_nm=args.spacing_nm,
            precision=encoder.precision,
            centres=centres_record,
        )
    else:
        from segscope.analysis.arrays import group_rows
        from segscope.analysis.csvzip import write_new_store

        rows = {
            segment_id: (result.node_ids[pick], result.xyz_nm[pick], result.embeddings[pick])
            for segment_id, pick in group_rows(result.segment_ids)
        }
        write_new_store(out, rows, coordinates="nm", force=args.force)  # whole or not at all
    _write_segment_table(
        table_path,
        np.array(segment_ids, dtype=np.uint64),
        result,
        calls,
        origins,
        encoder_path=encoder_path,
        classifiers=classifiers,
        dataset=str(dataset["path"]) if dataset else str(args.segmentation),
    )
    print(f"wrote {len(result)} node embeddings of {len(segment_ids)} segments to {out}, segment table {table_path}")
    return 0


def _check_output_first(out: Path, *, folder: bool, force: bool) -> None:
    """Refuse an output that cannot be written, before any data is read or computed.

    ``folder``: the output is a folder (a CSV ZIP store), else a file. Checks that its parent
    exists and is writable, that it is not a file where a folder goes (or the reverse), and
    that an existing non-empty store is only replaced with ``--force``.
    """
    problem = cli_args.output_problem(out, kind="dir" if folder else "file")
    if problem:
        raise CliError(problem)
    if not out.parent.is_dir():
        raise CliError(f"output folder {out.parent} does not exist")
    if folder and out.is_dir() and any(out.iterdir()) and not force:
        raise CliError(f"{out} exists and is not empty; pass --force to replace it")


def _segment_table_path(out: Path) -> Path:
    """Where ``embed`` writes its segment table: ``NAME.segments.parquet`` beside the output."""
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(f"{stem}.segments.parquet")


def _write_segment_table(path: Path, segment_ids, result, calls: dict, origins: dict, **provenance) -> None:
    """One row per segment (the export's segment table, plus ``n_nodes`` and ``skeleton``).

    ``calls`` maps segment id to its :class:`segscope.analysis.classify.segments.CellTypeCall`
    (absent: no cell type); compartment counts come from the node predictions there.
    """
    import numpy as np
    import pyarrow as pa

    from segscope.analysis import COMPARTMENTS
    from segscope.analysis.export import SegmentTable, write_table
    from segscope.analysis.export.model import Provenance
    from segscope.analysis.export.tables import segment_arrow_table
    from segscope.analysis.provenance import model_sha256

    classifiers = provenance["classifiers"]
    names: tuple[str, ...] = ()
    threshold = None
    if classifiers is not None and classifiers.cell_type is not None:
        names = tuple(classifiers.cell_type.class_names)
        threshold = classifiers.cell_type.ood_threshold
    n = len(segment_ids)
    cell_type = np.full(n, "", dtype=object)
    probability = np.full((n, len(names)), np.nan, dtype=np.float32)
    ood_score = np.full(n, np.nan, dtype=np.float32)
    ood = np.zeros(n, dtype=bool)
    counts = np.zeros((n, len(COMPARTMENTS)), dtype=np.int64)
    n_nodes = np.zeros(n, dtype=np.int64)
    for row, segment_id in enumerate(segment_ids.tolist()):
        n_nodes[row] = int(np.count_nonzero(result.segment_ids == np.uint64(segment_id)))
        call = calls.get(segment_id)
        if call is None:
            continue
        cell_type[row] = call["cell_type"] or ""
        for column, name in enumerate(names):
            probability[row, column] = call["probabilities"].get(name, np.nan)
        ood_score[row] = call["ood_score"]
        ood[row] = bool(call["ood"])
        counts[row] = call["compartment_counts"]
    table = segment_arrow_table(
        SegmentTable(segment_ids, names, cell_type, probability, ood_score, ood, counts),
        Provenance(
            model_name=Path(provenance["encoder_path"]).name,
            checkpoint_sha256=model_sha256(provenance["encoder_path"]),
            aggregation_radius_nm=None if not names else classifiers.cell_type.radius_nm,
            ood_threshold=threshold,
            dataset=provenance["dataset"],
        ),
    )
    table = table.append_column("n_nodes", pa.array(n_nodes, pa.int64()))
    table = table.append_column("skeleton", pa.array([origins.get(int(s), "") for s in segment_ids], pa.string()))
    write_table(path, table, force=True)


def _predict_nodes(classifiers, result):
    """Label every node of ``result`` (``segscope.analysis.inference.NodeEmbeddings``) as the app does.

    Each segment's nodes go through :func:`segscope.analysis.classify.segments.predict_segment`, the code
    the app runs on a segment's embeddings; yields a Progress per segment and returns the
    prediction columns (one entry per row of ``result``): ``compartment`` (object, name or
    None), ``compartment_probability``, ``cell_type`` (object, name or None),
    ``cell_type_probability``, ``ood_score`` (float32, NaN when not predicted), ``ood``
    (object, the segment's out-of-distribution flag or None), and the per-segment calls
    ``{segment id: {"cell_type", "probabilities", "ood_score", "ood", "compartment_counts"}}``.
    """
    from segscope.analysis.classify.segments import load_segment_predictor, predict_node_rows
    from segscope.analysis.progress import Progress

    entries = [
        {"task": info.task, "path": info.path, "radius_nm": info.radius_nm}
        for info in (classifiers.compartment, classifiers.cell_type)
        if info is not None
    ]
    yield Progress(0, 0, "segments", "loading classifiers")  # total 0: unknown
    predictor, _ = load_segment_predictor(entries)
    return (yield from predict_node_rows(predictor, result.segment_ids, result.xyz_nm, result.embeddings))


def _write_embeddings_parquet(
    path: Path,
    result,
    encoder_path: Path,
    *,
    predictions: dict | None = None,
    classifiers=None,
    dataset: dict | None = None,
    spacing_nm: float | None = None,
    precision: str | None = None,
    centres: dict | None = None,
) -> None:
    """Write the embeddings table as Parquet, one row per node.

    Columns: segment_id, node_id, x_nm, y_nm, z_nm, e0..e{D-1} (float32), then
    with ``predictions`` compartment, compartment_probability, cell_type,
    cell_type_probability, ood_score, ood (the segment's flag; null when not predicted);
    ``centres`` (how centres were thinned, where skeletons came from) goes into the
    provenance; zstd-compressed, provenance in the schema metadata
    (``segscope_provenance``: encoder and classifier sha256, the precision the encoder
    ran in, the dataset it came from).
    """
    import pyarrow.parquet as pq

    from segscope.analysis.export.atomic import atomic_file
    from segscope.analysis.export.tables import embeddings_arrow_table
    from segscope.analysis.provenance import DATASET_KEYS, classifier_hashes, model_sha256

    provenance: dict[str, Any] = {
        "model": str(encoder_path),
        "model_sha256": model_sha256(encoder_path),
        "precision": precision,
        "coordinates": "nm",
        "segscope_version": __version__,
        "segments": len(set(result.segment_ids.tolist())),
        "spacing_nm": spacing_nm,
    }
    if centres is not None:
        provenance["centres"] = centres
    if dataset is not None:
        provenance["dataset"] = {key: dataset.get(key) for key in DATASET_KEYS}
    if classifiers is not None:
        labelled: dict[str, Any] = {"folder": str(classifiers.folder), "files": classifier_hashes(classifiers.folder)}
        provenance["classifiers"] = labelled
        for info in (classifiers.compartment, classifiers.cell_type):
            if info is not None:
                labelled[info.task] = {
                    "classes": list(info.class_names),
                    "radius_nm": info.radius_nm,
                    "ood_threshold": info.ood_threshold,
                }
    table = embeddings_arrow_table(
        result.segment_ids, result.node_ids, result.xyz_nm, result.embeddings, predictions, provenance
    )
    with atomic_file(path, force=True) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _cmd_export(args: argparse.Namespace) -> int:
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.export import (
        Provenance,
        export_bundle,
        read_node_table,
        read_segment_table,
        skeletons_from_edges_table,
        tables_from_ground_truth,
    )

    skeletons = None
    if args.nodes or args.segments:
        if not (args.nodes and args.segments):
            raise CliError("--nodes and --segments go together")
        nodes, provenance = _read_table(read_node_table, args.nodes)
        segments, _ = _read_table(read_segment_table, args.segments)
        provenance = provenance or Provenance(dataset=str(args.nodes))
        voxel = args.voxel_size
        if voxel is None:
            raise CliError("--voxel-size X,Y,Z (nm) is needed with --nodes/--segments")
    else:
        dataset = open_dataset(args.dataset) if args.dataset else _open_dataset_arg(None)
        nodes, segments = tables_from_ground_truth(
            dataset.path / "nodes.parquet",
            dataset.path / "segments.parquet",
            cell_type_names=dataset.cell_types or None,
        )
        provenance = Provenance(model_name="ground truth", dataset=str(dataset.path))
        voxel = tuple(dataset.voxel_size_nm)
        skeletons = skeletons_from_edges_table(dataset.path / "edges.parquet")
        args.image_url = args.image_url or str(dataset.path / "image")
        args.segmentation_url = args.segmentation_url or str(dataset.path / "segmentation")
    result = _run_with_progress(
        "export",
        export_bundle(
            args.out,
            nodes,
            segments,
            provenance,
            voxel_size_nm=voxel,
            image_url=args.image_url,
            segmentation_url=args.segmentation_url,
            serve_url=args.serve_url,
            skeletons=skeletons,
            force=args.force,
        ),
    )
    print(f"exported to {result.folder}")
    return 0


def _read_table(reader, path: str):
    """``reader(path)``, with a table of the wrong column types as one line naming the file."""
    try:
        return reader(path)
    except TypeError as exc:  # the table models say "x must be numeric, got dtype object"
        raise CliError(f"{path}: {exc}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from segscope.analysis.encoder import build_encoder, open_encoder
    from segscope.analysis.evaluation import EvaluationConfig, evaluate
    from segscope.analysis.provenance import model_sha256
    from segscope.analysis.training import CellSplit

    dataset = _open_dataset_arg(args.dataset) if args.dataset else None
    run = Path(args.run)
    split_path = run / "split.json"
    if not split_path.is_file():
        raise CliError(f"{split_path} not found: evaluate needs the training run's cell split")
    try:
        split = CellSplit.load(split_path)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CliError(f"{split_path} is not a valid cell split ({type(exc).__name__}: {exc})") from None
    if dataset is None:
        dataset = _open_dataset_arg(None)  # after the cheap checks: the demo may be generated here
    encoder_path = Path(args.encoder) if args.encoder else run / "encoder.keras"
    encoder = open_encoder(encoder_path, precision=args.precision)
    # The random baseline runs in the same precision, so the two differ only in training.
    baseline = build_encoder(encoder.encoder_config, seed=args.seed + 1000, precision=encoder.precision)
    config = EvaluationConfig(
        label_counts=tuple(args.label_counts),
        repeats=args.repeats,
        seed=args.seed,
        compartment_radius_nm=args.compartment_radius_nm,
        cell_type_radius_nm=args.cell_type_radius_nm,
    )
    metrics = _run_with_progress(
        "evaluate", evaluate(dataset, encoder, split, args.out, baseline_encoder=baseline, config=config)
    )
    classifiers = metrics.pop("_classifiers")
    if args.save_classifiers:
        folder = Path(args.save_classifiers)
        folder.mkdir(parents=True, exist_ok=True)
        radius = {"compartment": config.compartment_radius_nm, "cell_type": config.cell_type_radius_nm}
        manifest = {}
        for name, classifier in classifiers.items():
            classifier.save(folder / f"{name}.npz")
            manifest[name] = {
                "file": f"{name}.npz",
                "radius_nm": radius[name],
                "classes": list(classifier.class_names),
                "ood_threshold": classifier.ood_threshold,
                "encoder": str(encoder_path.name),
                "encoder_sha256": model_sha256(encoder_path),
            }
        (folder / "classifiers.json").write_text(json.dumps(manifest, indent=1))
    summary = {
        name: {
            "subcompartment_macro_f1": metrics[name]["subcompartment"]["macro_f1"],
            "cell_type_accuracy": metrics[name]["cell_type"]["segment_accuracy"],
            "ood_auroc": metrics[name]["cell_type"].get("ood_auroc"),
        }
        for name in ("trained", "baseline")
    }
    print(json.dumps(summary, indent=1))
    print(f"metrics and plots in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``segscope`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="segscope",
        description="SegScope: compute, classify and explore SegCLR embeddings of EM segments. "
        "With no command, opens the desktop app on the built-in demo.",
        epilog="The demo dataset is generated on first use (under a minute) and cached in "
        "$SEGSCOPE_CACHE_DIR/demo, else $XDG_CACHE_HOME/segscope/demo or ~/.cache/segscope/demo; "
        "delete that folder to regenerate it. -v shows library and browser log lines (TensorFlow, Qt WebEngine).",
    )
    parser.add_argument("--version", action="version", version=f"segscope {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write a synthetic demo dataset with ground truth")
    demo.add_argument("--out", required=True, type=cli_args.output_path(kind="dir"), help="output folder")
    demo.add_argument("--seed", type=cli_args.seed, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--size", type=_parse_size, default=(256, 256, 256), help="volume size in voxels, N or X,Y,Z (default 256)"
    )
    demo.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    demo.set_defaults(handler=_cmd_demo_data)

    train = sub.add_parser("train", help="self-supervised SegCLR training on a dataset's training cells")
    train.add_argument("--dataset", help="SegScope dataset folder (default: the built-in demo)")
    train.add_argument(
        "--out",
        required=True,
        type=cli_args.output_path(kind="dir"),
        help="run folder (checkpoints, split, final encoder)",
    )
    train.add_argument("--encoder", choices=("lite", "full"), default="lite", help="architecture (default lite)")
    train.add_argument("--steps", type=cli_args.positive_int, default=3000)
    train.add_argument(
        "--batch-pairs", type=cli_args.integer(1, 65_536), default=32, help="positive pairs per step (2x cutouts)"
    )
    train.add_argument("--learning-rate", type=cli_args.positive_float(10.0), default=1e-3, help="peak learning rate")
    train.add_argument("--warmup-steps", type=cli_args.non_negative_int, default=100)
    train.add_argument(
        "--max-pair-distance-nm",
        type=cli_args.positive_float(),
        default=3000.0,
        help="largest straight-line distance between the nodes of a pair (nm)",
    )
    train.add_argument(
        "--segment-weighting",
        choices=("nodes", "sqrt_nodes"),
        default="nodes",
        help="draw pair segments by node count (default) or its square root (short fragments more often)",
    )
    train.add_argument(
        "--truncate-fraction",
        type=cli_args.fraction(allow_one=True),
        default=0.0,
        help="share of pairs whose second view is cut by a plane 0.1-1.2 um from its centre, as volume faces cut "
        "fragments (default 0)",
    )
    train.add_argument(
        "--eval-fraction",
        type=cli_args.fraction(allow_zero=False),
        default=0.25,
        help="cells of each type kept for evaluation",
    )
    train.add_argument(
        "--holdout-type", action="append", default=[], help="cell type kept out of training entirely (repeatable)"
    )
    train.add_argument("--checkpoint-every", type=cli_args.positive_int, default=100)
    train.add_argument(
        "--stop-at-step", type=cli_args.positive_int, default=None, help="stop early (resumable) at this step"
    )
    train.add_argument("--seed", type=cli_args.seed, default=0)
    train.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    train.set_defaults(handler=_cmd_train)

    from segscope.app.main import add_open_arguments, add_precision_argument

    open_ = sub.add_parser("open", help="open the desktop app on other data")
    add_open_arguments(open_)
    open_.set_defaults(handler=_cmd_open)

    embed = sub.add_parser("embed", help="SegCLR embeddings of segments' nodes (Parquet or CSV ZIP)")
    embed.add_argument("--image", required=True, metavar="URL")
    embed.add_argument("--segmentation", required=True, metavar="URL")
    which = embed.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--segments",
        type=_parse_segments,
        metavar="ID[,ID...]|all",
        help="segment ids, or 'all': every segment present in the segmentation (a chunked scan; "
        "see --bbox, --min-voxels)",
    )
    which.add_argument(
        "--segments-file", metavar="FILE", help="text file of segment ids (one or more a line, '#' comments)"
    )
    embed.add_argument(
        "--bbox",
        metavar="X0,Y0,Z0,X1,Y1,Z1[nm]",
        help="only this box of the segmentation: voxels, or nm with an 'nm' suffix "
        "(where --segments all scans and where a listed segment is looked for)",
    )
    embed.add_argument(
        "--min-voxels",
        type=cli_args.positive_int,
        default=1,
        metavar="N",
        help="with --segments all: skip segments with fewer voxels",
    )
    embed.add_argument(
        "--skeletons",
        metavar="PATH",
        help="skeletons: a precomputed skeleton folder, a folder of ID.swc files (nm) or a CSV/Parquet "
        "node table (segment_id,node_id,x_nm,y_nm,z_nm[,parent]); default: the segmentation's own. "
        "Segments without one are skeletonised (kimimaro) and cached in the user cache",
    )
    embed.add_argument(
        "--skeleton-box-vox",
        type=cli_args.integer(16, 16_384),
        default=512,
        metavar="N",
        help="largest box edge (voxels per axis) a segment is skeletonised in; larger segments are "
        "skeletonised inside it only (default 512)",
    )
    embed.add_argument(
        "--no-skeleton-cache", action="store_true", help="neither read nor write the skeletons SegScope makes"
    )
    embed.add_argument(
        "--voxel-size-nm",
        type=cli_args.voxel_size_nm,
        metavar="X,Y,Z",
        help="voxel size (nm) of volumes whose metadata has no units (plain zarr)",
    )
    embed.add_argument(
        "--checkpoint", metavar="PATH", help="encoder (.keras or SegCLR checkpoint; default: demo model)"
    )
    embed.add_argument(
        "--classifiers",
        metavar="DIR",
        help="classifier folder (classifiers.json, like "
        "assets/classifiers): add each node's predicted compartment and its segment's cell type "
        "and OOD score (Parquet output only)",
    )
    embed.add_argument(
        "--spacing-nm", type=cli_args.positive_float(), default=1500.0, help="centre spacing along the skeleton (nm)"
    )
    embed.add_argument("--batch-size", type=cli_args.integer(1, 65_536), default=None)
    add_precision_argument(embed)
    embed.add_argument(
        "--out",
        required=True,
        type=cli_args.output_path(),
        metavar="PATH",
        help="*.parquet (one row per node, nm) or a CSV ZIP store folder (nm coordinates); "
        "a segment table NAME.segments.parquet is written beside it",
    )
    embed.add_argument("--force", action="store_true", help="replace existing output")
    embed.set_defaults(handler=_cmd_embed)

    export = sub.add_parser("export", help="Neuroglancer layers, tables and SWC for annotated nodes and segments")
    export.add_argument("--out", required=True, type=cli_args.output_path(kind="dir"), help="bundle folder")
    export.add_argument("--dataset", help="export a SegScope dataset's ground truth (default: the demo)")
    export.add_argument("--nodes", help="node table (Parquet/CSV written by SegScope)")
    export.add_argument("--segments", help="segment table (Parquet/CSV written by SegScope)")
    export.add_argument("--voxel-size", type=cli_args.voxel_size_nm, metavar="X,Y,Z")
    export.add_argument("--image-url", help="image source for the state JSON")
    export.add_argument("--segmentation-url", help="segmentation source for the state JSON")
    export.add_argument("--serve-url", help="URL the bundle folder will be served at (for the state JSON)")
    export.add_argument("--force", action="store_true", help="replace an existing bundle")
    export.set_defaults(handler=_cmd_export)

    evaluate = sub.add_parser("evaluate", help="score an encoder on held-out cells (JSON + PNG plots)")
    evaluate.add_argument("--run", required=True, help="training run folder (its split.json, encoder.keras)")
    evaluate.add_argument("--encoder", help="encoder to evaluate (default: RUN/encoder.keras)")
    evaluate.add_argument("--dataset", help="dataset folder (default: the demo)")
    evaluate.add_argument(
        "--out", required=True, type=cli_args.output_path(kind="dir"), help="folder for metrics.json and plots"
    )
    evaluate.add_argument("--label-counts", type=cli_args.positive_int, nargs="+", default=[8, 32, 128, 512, 2048])
    evaluate.add_argument("--repeats", type=cli_args.integer(1, 1000), default=3)
    evaluate.add_argument(
        "--compartment-radius-nm",
        type=cli_args.positive_float(allow_zero=True),
        default=0.0,
        help="aggregation radius of the subcompartment classifier's inputs (0: node embeddings)",
    )
    evaluate.add_argument(
        "--cell-type-radius-nm",
        type=cli_args.positive_float(allow_zero=True),
        default=10_000.0,
        help="aggregation radius of the cell-type classifier's inputs",
    )
    evaluate.add_argument("--save-classifiers", metavar="DIR", help="also save the trained classifiers here")
    evaluate.add_argument("--seed", type=cli_args.seed, default=0)
    add_precision_argument(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    info = sub.add_parser("info", help="print format, shape, voxel size and bounds of a volume")
    info.add_argument("url", help="path or URL (file://, gs://, http(s)://; precomputed, zarr, n5)")
    info.set_defaults(handler=_cmd_info)
    for module_name in _COMMAND_MODULES:
        # Each imports only the standard library at module level, so --help stays instant.
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segscope`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        # Child processes (TensorFlow's, UMAP's) and Qt WebEngine read it: show their chatter too.
        os.environ["SEGSCOPE_VERBOSE"] = str(args.verbose)
    else:
        # The local file servers log every request the page makes; a 404 for a chunk that was
        # never written (all background) is how precomputed volumes say "empty", not a problem.
        logging.getLogger("tornado.access").setLevel(logging.ERROR)
    handler = getattr(args, "handler", None)
    if handler is None:
        # No command: the desktop app on the built-in demo.
        from segscope.app.main import add_open_arguments, run_app

        return run_app(add_open_arguments(argparse.ArgumentParser()).parse_args([]))
    try:
        if args.command in ("embed", "train", "evaluate"):
            if args.command == "embed":
                # An output that cannot be written is refused before TensorFlow's 10-30 s start.
                out = Path(args.out)
                _check_output_first(out, folder=out.suffix != ".parquet", force=args.force)
            # Before the progress bar: TensorFlow's start-up lines stay off the terminal (-v shows them).
            from segscope.app.compute_process import import_tensorflow_quietly

            import_tensorflow_quietly()
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one error boundary of every command
        message = expected_failure_message(exc)
        if message is None:
            if args.verbose:
                raise
            print(
                f"segscope {args.command}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                "(a bug in SegScope; run with -v for the traceback)",
                file=sys.stderr,
            )
            return 1
        if args.verbose > 1:
            log.debug("expected failure", exc_info=exc)
        print(f"segscope {args.command}: error: {message}", file=sys.stderr)
        return 2


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expected_failure_message(exc: BaseException) -> str | None:
    """One line for a failure a user can cause and fix (bad input, files, network), else None.

    The classes: :class:`CliError`; ``OSError`` (missing, unreadable or read-only paths, a
    full disk, timeouts), with the path it names; ``ValueError`` (every SegScope reader's own
    error class derives from it: corrupt or mismatched data, a bad model, a remote volume
    that did not answer); ``KeyError`` (an unknown segment id); ``RecursionError`` (a file
    nested too deeply to read); ``MemoryError`` (a file declaring sizes too large to hold);
    zip-format errors. Anything else is a bug: the caller shows a traceback (``-v``).
    """
    import zipfile

    if isinstance(exc, CliError):
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        return _one_line(_os_error_message(exc))
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read (a JSON file or model with thousands of nested levels?)"
    if isinstance(exc, MemoryError):
        detail = f": {exc}" if str(exc) else ""
        return _one_line(f"not enough memory{detail} (an input declaring a size too large to hold?)")
    if isinstance(exc, KeyError):
        return _one_line(str(exc.args[0]) if exc.args else "missing key")
    if isinstance(exc, (ValueError, zipfile.BadZipFile, zipfile.LargeZipFile)):
        return _one_line(_without_pickle_wording(str(exc)) or type(exc).__name__)
    return None


def _os_error_message(exc: OSError) -> str:
    import errno

    hints = {
        errno.ENOSPC: "no space left on the device (disk full)",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }
    what = hints.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not exc.strerror:
        what = str(exc) or "timed out"
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        return f"{' -> '.join(names)}: {what}"
    return str(exc) if exc.strerror is None and str(exc) else what


def _without_pickle_wording(text: str) -> str:
    # numpy's np.load says "allow_pickle=False" for any file that is not an .npy/.npz; that
    # is a hint for programmers, not something a user can act on.
    if "Object arrays cannot be loaded" in text:
        return "a NumPy file holding pickled Python objects, which SegScope never loads"
    if "allow_pickle" in text:
        return "not a NumPy .npy/.npz file (unreadable or corrupt)"
    return text


if __name__ == "__main__":
    sys.exit(main())
