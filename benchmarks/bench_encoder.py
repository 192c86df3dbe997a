"""Encoder throughput and end-to-end embedding speed: full vs lite, streaming vs naive.

Usage::

    python benchmarks/bench_encoder.py [--parts full,lite,e2e] [--repeats 5] [--full-repeats 2]
                                       [--segment ID] [--spacing-nm 500] [--e2e-repeats 3]

Prints, all as medians over repeats after one warm-up call:

1. the full SegCLR encoder (129^3, random weights; speed does not depend on them) at
   batch 1 and 2 (more on a GPU): cutouts/s and achieved GFLOP/s (74.85 GFLOP/cutout);
2. the lite encoder at batch 1, 8, 32, 64, with XLA off and on;
3. end-to-end nodes/s for the demo segment with the most skeleton nodes, lite encoder,
   including TensorStore reads and masking: the streaming engine (reader thread, batched
   shared-block reads) against a naive loop (read one cutout, one forward call, repeat),
   in the same run, with the ratio. Each strategy gets a cold pass (fresh chunk cache,
   reported) and warm repeats.

Set ``KERAS_BACKEND=jax`` to measure Keras on JAX (e.g. on a GPU machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: graph tracing, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(label: str, encoder, batch_sizes, repeats: int, *, jit: bool = False) -> None:
    from segscope.analysis.encoder import flops_per_cutout

    config = encoder.encoder_config
    gflop = flops_per_cutout(config) / 1e9
    encoder.set_jit_compile(jit)
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        cutouts = rng.integers(0, 256, (batch, *config.input_size_vox), dtype=np.uint8)
        cutouts[:, : config.input_size_vox[0] // 3] = 0  # masked EM is partly zero
        seconds = _median_time(lambda cutouts=cutouts: encoder.embed(cutouts), repeats)
        rate = batch / seconds
        print(
            f"  {label:10s} jit={'on ' if jit else 'off'} batch {batch:3d}: {rate:8.2f} cutouts/s"
            f"  {rate * gflop:8.1f} GFLOP/s  ({seconds * 1e3:8.1f} ms/call, median of {repeats})",
            flush=True,
        )
    encoder.set_jit_compile(False)


def demo_segment(args):
    """(image, segmentation, segment_id, centres_nm) from the demo dataset."""
    from segscope.analysis.centres import segment_centres
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.synthetic import demo_dataset

    dataset = open_dataset(demo_dataset())
    if args.segment is None:
        ids, counts = np.unique(np.asarray(dataset.nodes["segment_id"]), return_counts=True)
        segment_id = int(ids[np.argmax(counts)])
    else:
        segment_id = args.segment
    skeleton = dataset.skeleton(segment_id)
    centres = segment_centres(
        dataset.segmentation,
        segment_id,
        skeleton_nodes_nm=skeleton.nodes_nm,
        skeleton_edges=skeleton.edges,
        spacing_nm=args.spacing_nm,
        click_nm=skeleton.nodes_nm[0],
    )
    return dataset.image.url, dataset.segmentation.url, segment_id, centres.positions_nm


def bench_end_to_end(encoder, args) -> None:
    from segscope.analysis.inference import naive_segment_embeddings, stream_segment_embeddings
    from segscope.analysis.progress import drive
    from segscope.analysis.volume import open_volume, reset_chunk_cache

    image_url, seg_url, segment_id, centres = demo_segment(args)
    n = len(centres)
    print(
        f"\nend-to-end, demo segment {segment_id}: {n} centres at {args.spacing_nm:g} nm spacing, "
        f"{encoder.encoder_config.name} {encoder.encoder_config.input_size_vox[0]}^3 at "
        f"{'x'.join(f'{v:g}' for v in encoder.encoder_config.voxel_size_nm)} nm",
        flush=True,
    )

    def streaming(image, segmentation):
        return drive(
            stream_segment_embeddings(encoder, image, segmentation, segment_id, centres, batch_size=args.batch_size)
        )

    def naive(image, segmentation):
        return naive_segment_embeddings(encoder, image, segmentation, segment_id, centres)

    # Warm the model for both call shapes so neither strategy pays graph tracing.
    warm = np.zeros((args.batch_size, *encoder.encoder_config.input_size_vox), np.uint8)
    encoder.embed(warm), encoder.embed(warm[:1])
    results = {}
    outputs = {}
    for label, run in (("naive loop", naive), ("streaming", streaming)):
        reset_chunk_cache()
        image, segmentation = open_volume(image_url), open_volume(seg_url)
        start = time.perf_counter()
        outputs[label] = run(image, segmentation)
        cold = time.perf_counter() - start
        seconds = _median_time(functools.partial(run, image, segmentation), args.e2e_repeats)
        results[label] = seconds
        print(
            f"  {label:10s}: cold {n / cold:8.1f} nodes/s   warm median {n / seconds:8.1f} nodes/s "
            f"({args.e2e_repeats} repeats)",
            flush=True,
        )
    diff = float(np.abs(outputs["naive loop"] - outputs["streaming"]).max())
    print(
        f"  streaming / naive (warm medians): {results['naive loop'] / results['streaming']:.2f}x"
        f"   (max |difference| of embeddings {diff:.2e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats for the lite model")
    parser.add_argument("--full-repeats", type=int, default=2, help="repeats for the full model")
    parser.add_argument("--parts", default="full,lite,e2e", help="comma-separated subset of full, lite, e2e")
    parser.add_argument("--segment", type=int, default=None)
    parser.add_argument(
        "--spacing-nm", type=float, default=500.0, help="centre spacing along the skeleton (SegCLR uses 1500)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="streaming batch size (lite)")
    parser.add_argument("--e2e-repeats", type=int, default=3)
    args = parser.parse_args()

    import keras

    from segscope.analysis.encoder import SEGCLR_FULL, SEGCLR_LITE, build_encoder, flops_per_cutout
    from segscope.analysis.inference import available_device

    device = available_device()
    print(f"Keras {keras.__version__} on {keras.backend.backend()}, device {device}, {os.cpu_count()} CPUs")
    print(
        f"FLOPs per cutout: full {flops_per_cutout(SEGCLR_FULL) / 1e9:.2f} GFLOP, "
        f"lite {flops_per_cutout(SEGCLR_LITE) / 1e9:.3f} GFLOP"
    )

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"full", "lite", "e2e"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    on_gpu = device == "GPU"
    if "full" in parts:
        full = build_encoder(SEGCLR_FULL, seed=0)
        bench_model("full", full, (1, 2, 8, 32) if on_gpu else (1, 2), args.full_repeats)
        del full
    lite = build_encoder(SEGCLR_LITE, seed=0)
    if "lite" in parts:
        lite_batches = (1, 8, 32, 64, 256) if on_gpu else (1, 8, 32, 64)
        for jit in (False, True):
            bench_model("lite", lite, lite_batches, args.repeats, jit=jit)
    if "e2e" in parts:
        bench_end_to_end(lite, args)


if __name__ == "__main__":
    main()
