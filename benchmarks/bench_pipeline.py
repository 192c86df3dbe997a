"""Nodes per second of ``segscope pipeline embed`` on Beam's local runner vs in-process embedding.

Usage::

    python benchmarks/bench_pipeline.py [--dataset DIR] [--size 128] [--rounds 2]
        [--precision float32] [--gpus 8 64 512] [--gpu-tflops 150] [--gpu-hour-usd 3.0]

On the same segments (every segment of a demo dataset, generated at ``--size`` voxels into a
temporary folder unless ``--dataset`` names one) it times, alternating in each round:

* in-process: what ``segscope embed`` runs (skeletons and centres, then
  ``stream_node_embeddings``, then the CSV ZIP store), with the encoder already loaded;
* the pipeline on the local runner in this process (1 worker) and in 2 worker processes,
  wall clock from submission to the last shard marker, worker start-up (TensorFlow import,
  encoder load) included; CSV ZIP output.

It prints medians of nodes/s, the per-stage time Beam's metrics report (summed over
workers; cutting overlaps inference), the model's own time per cutout, and a paper
estimate of embedding 10^9 nodes with the full SegCLR ResNet-18 on N GPU workers, from the
measured per-cutout costs and the assumptions it prints.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from segscope.analysis.arrays import group_rows
from segscope.analysis.artefacts import find_demo_model
from segscope.analysis.centres import skeleton_centres
from segscope.analysis.csvzip import CsvZipStore
from segscope.analysis.encoder import SEGCLR_FULL, flops_per_cutout, open_encoder
from segscope.analysis.inference import stream_node_embeddings
from segscope.analysis.pipeline.beam import run_embed
from segscope.analysis.pipeline.driver import list_segments, make_job
from segscope.analysis.pipeline.job import plan_shards, prepare_output, split_finished
from segscope.analysis.progress import drive
from segscope.analysis.skeleton_sources import SegmentSkeletons, open_skeleton_source
from segscope.analysis.volume import open_volume


def in_process(job, ids, encoder, out: Path | None = None) -> tuple[float, int]:
    """Seconds and nodes of the in-process path on ``ids`` (encoder loaded beforehand).

    With ``out``, the rows are written to a CSV ZIP store there, as ``segscope embed`` does.
    """
    start = time.perf_counter()
    image, segmentation = open_volume(job.image), open_volume(job.segmentation)
    skeletons = SegmentSkeletons(segmentation, open_skeleton_source(job.skeletons) if job.skeletons else None)
    segments = []
    for segment_id in ids:
        found = drive(skeletons.resolve(segment_id))
        centres = skeleton_centres(segment_id, found.skeleton.nodes_nm, found.skeleton.edges, spacing_nm=job.spacing_nm)
        segments.append((segment_id, centres.node_ids, centres.positions_nm))
    result = drive(stream_node_embeddings(encoder, image, segmentation, segments, batch_size=job.batch_size))
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        groups = group_rows(result.segment_ids)
        rows = {s: (result.node_ids[r], result.xyz_nm[r], result.embeddings[r]) for s, r in groups}
        CsvZipStore(out, coordinates="nm").write_many(rows)
    return time.perf_counter() - start, len(result)


def model_ms_per_cutout(encoder, batch_size: int, repeats: int = 5) -> float:
    """Median forward-call time per cutout (ms) on random masked cutouts, model only."""
    import numpy as np

    size = tuple(int(v) for v in encoder.encoder_config.input_size_vox)
    cutouts = np.random.default_rng(0).integers(0, 255, (batch_size, *size), dtype=np.uint8)
    encoder.embed(cutouts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.embed(cutouts)
        times.append((time.perf_counter() - start) * 1000 / batch_size)
    return statistics.median(times)


def pipeline(job, ids, workers: int):
    """Seconds, nodes and the RunSummary of one pipeline run into a fresh output folder."""
    shutil.rmtree(job.out, ignore_errors=True)
    prepare_output(job)
    todo, finished = split_finished(job.layout, plan_shards(ids, job.num_shards, job.bytewidth))
    start = time.perf_counter()
    summary = drive(run_embed(job, todo, len(finished), [f"--direct_num_workers={workers}"]))
    return time.perf_counter() - start, summary.counters.get("nodes", 0), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, help="SegScope dataset folder (default: a generated demo)")
    parser.add_argument("--size", type=int, default=128, help="voxels per side of the generated demo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument(
        "--gpu-tflops", type=float, default=150.0, help="assumed sustained bfloat16 3-D conv TFLOP/s per GPU"
    )
    parser.add_argument("--gpu-hour-usd", type=float, default=3.0, help="assumed price of one GPU-hour")
    parser.add_argument("--core-hour-usd", type=float, default=0.04, help="assumed price of one CPU core-hour")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger().addFilter(lambda record: "Resource module is not available" not in record.getMessage())

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        dataset = args.dataset
        if dataset is None:
            from segscope.analysis.synthetic import generate_dataset

            dataset = drive(generate_dataset(work / "demo", seed=0, size_vox=(args.size,) * 3))
        encoder_path = find_demo_model()
        job = make_job(
            str(dataset / "image"),
            str(dataset / "segmentation"),
            work / "out",
            encoder_path,
            precision=args.precision,
            batch_size=args.batch_size,
        )
        ids, _ = drive(list_segments(job.segmentation, "all", skeletons=job.skeletons))
        encoder = open_encoder(encoder_path, precision=args.precision)
        print(
            f"{len(ids)} segments of {dataset}; encoder {encoder_path.name} ({encoder.precision}), "
            f"batch {job.batch_size}"
        )
        in_process(job, ids[:3], encoder)  # warm: first forward call traces the model

        times: dict[str, list[float]] = {"in-process": [], "pipeline 1 worker": [], "pipeline 2 workers": []}
        nodes = 0
        summaries = {}
        for round_ in range(args.rounds):
            seconds, nodes = in_process(job, ids, encoder, work / "in_process")
            times["in-process"].append(seconds)
            for workers in (1, 2):
                seconds, run_nodes, summary = pipeline(job, ids, workers)
                assert run_nodes == nodes, (run_nodes, nodes)
                name = f"pipeline {workers} worker{'s' if workers > 1 else ''}"
                times[name].append(seconds)
                summaries[name] = summary
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))

        print(f"\n{nodes} nodes, median of {args.rounds} rounds (alternating):")
        base = statistics.median(times["in-process"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:20s} {median:6.1f} s  {nodes / median:7.1f} nodes/s  ({base / median:.2f}x in-process)")
        for name, summary in summaries.items():
            stages_text = ", ".join(
                f"{stage} {total / 1000:.1f} s ({total / max(count, 1):.0f} ms x {count})"
                for stage, (total, count) in sorted(summary.stage_ms.items())
            )
            print(f"  {name} stage time, last round, summed over workers: {stages_text}")

        summary = summaries["pipeline 1 worker"]
        cut_ms = summary.stage_ms.get("cutouts", (0, 0))[0] / max(nodes, 1)
        infer_ms = model_ms_per_cutout(encoder, job.batch_size)
        lite_flops = flops_per_cutout(encoder.encoder_config)
        full_flops = flops_per_cutout(SEGCLR_FULL)
        size = encoder.encoder_config.input_size_vox
        voxel_ratio = (129**3) / (size[0] * size[1] * size[2])
        print("\nPaper estimate, 10^9 nodes (one cutout each) with the full SegCLR ResNet-18 (129^3):")
        print(
            f"  measured here (CPU, {encoder.precision}): inference {infer_ms:.1f} ms/cutout for "
            f"{lite_flops / 1e9:.2f} GFLOP ({lite_flops / max(infer_ms, 1e-9) / 1e6:.0f} GFLOP/s); "
            f"cutout read+mask {cut_ms:.2f} ms/cutout of {size[0]}^3"
        )
        gpu_s = full_flops / (args.gpu_tflops * 1e12)
        cut_full_ms = cut_ms * voxel_ratio
        cores_per_gpu = cut_full_ms / 1000 / gpu_s
        total_gpu_h = 1e9 * gpu_s / 3600
        total_core_h = 1e9 * cut_full_ms / 1000 / 3600
        print(
            f"  assumptions: {full_flops / 1e9:.1f} GFLOP/cutout at {args.gpu_tflops:g} TFLOP/s sustained per GPU "
            f"(bfloat16) = {gpu_s * 1000:.2f} ms/cutout; cutout reads scale with voxels read ({voxel_ratio:.0f}x "
            f"this encoder's) = {cut_full_ms:.0f} ms per cutout per CPU core, so {cores_per_gpu:.0f} cores keep a GPU "
            "fed; storage and network keep up; no retries; shard writes negligible"
        )
        print(
            f"  totals: {total_gpu_h:,.0f} GPU-hours + {total_core_h:,.0f} core-hours "
            f"= ${total_gpu_h * args.gpu_hour_usd + total_core_h * args.core_hour_usd:,.0f} "
            f"at ${args.gpu_hour_usd:g}/GPU-h and ${args.core_hour_usd:g}/core-h"
        )
        for gpus in args.gpus:
            print(f"  {gpus:5d} GPU workers ({gpus * cores_per_gpu:,.0f} cores): {total_gpu_h / gpus:8.1f} h wall")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
