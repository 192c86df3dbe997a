"""Encoder throughput in float32 and bfloat16, the error bfloat16 costs, end-to-end speed.

Usage::

    python benchmarks/bench_encoder.py [--parts speed,error,e2e] [--rounds 5]
                                       [--full-batches 1,2,4] [--lite-batches 1,16,32,64,128,256]
                                       [--spacing-nm 500] [--segment ID] [--e2e-repeats 3]

Prints, in one run:

1. ``speed``: cutouts/s and achieved GFLOP/s of the exact SegCLR encoder (129^3, 74.85
   GFLOP/cutout) and the lite encoder (41^3, FLOPs from ``layer_costs``) in float32 and in
   bfloat16, at every batch size asked for. Timed calls of all (model, precision, batch)
   cases alternate round by round, so a machine shared with other jobs slows them alike;
   figures are medians over ``--rounds`` after one warm-up call each. Then a table of
   batch 1 and each precision's best batch with the bfloat16/float32 ratio. Speed does not
   depend on the weights, so the models are randomly initialised.
2. ``error``: bfloat16 against float32 embeddings (worst cosine similarity, max absolute
   and relative error) of the SegCLR fixture's four cutouts through its checkpoint
   (``shared/fixtures/segclr_reference``, also against SegCLR's own outputs), and of the
   demo's held-out cells (``assets/evaluation/split.json``) through the shipped lite encoder;
   on the latter, how often the shipped classifiers (``assets/classifiers``) make the same
   call from both (node subcompartments, segment cell types, OOD flags) and the k=15
   nearest-neighbour overlap in embedding space and in UMAP layouts (UMAP fitted on each;
   two float32 fits with different seeds give UMAP's own variability for scale).
3. ``e2e``: end-to-end nodes/s for the demo segment with the most skeleton nodes, lite
   encoder in the machine's default precision, TensorStore reads and masking included: the
   streaming engine against a naive loop (read one cutout, one forward call, repeat).

The header gives the CPU, its bfloat16 flags, thread and oneDNN settings and the load
average before and after: on a shared machine, run it twice and compare.
Set ``KERAS_BACKEND=jax`` to measure Keras on JAX (e.g. on a GPU machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "bfloat16")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segclr_reference"


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: graph tracing, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _cutouts(config, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cutouts = rng.integers(0, 256, (batch, *config.input_size_vox), dtype=np.uint8)
    cutouts[:, : config.input_size_vox[0] // 3] = 0  # masked EM is partly zero
    return cutouts


def _header() -> None:
    import keras

    from segscope.analysis.inference import BFLOAT16_CPU_FLAGS, available_device, cpu_flags, resolve_precision

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    threads = "TF default"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        threads = (
            f"intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, "
            f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'default'}"
        )
    onednn = {k: v for k, v in os.environ.items() if k.startswith(("TF_ENABLE_ONEDNN", "ONEDNN", "DNNL", "OMP_"))}
    print(
        f"Keras {keras.__version__} on {keras.backend.backend()}, device {available_device()}, "
        f"{os.cpu_count()} CPUs ({model}); bfloat16 flags: "
        f"{', '.join(sorted(cpu_flags() & BFLOAT16_CPU_FLAGS)) or 'none'}; "
        f"precision 'auto' -> {resolve_precision('auto')}"
    )
    print(f"threads: {threads}; oneDNN/OpenMP environment: {onednn or 'defaults (TF_ENABLE_ONEDNN_OPTS on)'}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


# -- speed -------------------------------------------------------------------------------


def bench_speed(args) -> None:
    from segscope.analysis.encoder import SEGCLR_FULL, SEGCLR_LITE, build_encoder, flops_per_cutout

    models = {"exact": (SEGCLR_FULL, args.full_batches), "lite": (SEGCLR_LITE, args.lite_batches)}
    cases = []  # (model name, precision, batch, encoder, cutouts)
    for name, (config, batches) in models.items():
        base = build_encoder(config, seed=0)
        encoders = {p: base.with_precision(p) for p in PRECISIONS}
        for batch in batches:
            cutouts = _cutouts(config, batch)
            for precision in PRECISIONS:
                cases.append((name, precision, batch, encoders[precision], cutouts))
    print(
        f"\nspeed: {len(cases)} cases, {args.rounds} alternating rounds after one warm-up call each "
        f"(exact {flops_per_cutout(SEGCLR_FULL) / 1e9:.2f} GFLOP/cutout, "
        f"lite {flops_per_cutout(SEGCLR_LITE) / 1e9:.4f})",
        flush=True,
    )
    for name, precision, batch, encoder, cutouts in cases:
        start = time.perf_counter()
        encoder.embed(cutouts)  # traces, and in bfloat16 freezes the weights into the graph
        if batch == models[name][1][0]:
            print(f"  first call {name} {precision}: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[tuple, list[float]] = {case[:3]: [] for case in cases}
    for _ in range(args.rounds):
        for name, precision, batch, encoder, cutouts in cases:
            start = time.perf_counter()
            encoder.embed(cutouts)
            times[name, precision, batch].append(time.perf_counter() - start)

    rate = {key: key[2] / statistics.median(values) for key, values in times.items()}
    print(f"\n  {'model':6s} {'batch':>5s} {'precision':9s} {'cutouts/s':>10s} {'GFLOP/s':>9s} {'ms/call':>9s}")
    for (name, precision, batch), value in rate.items():
        gflop = flops_per_cutout(models[name][0]) / 1e9
        print(
            f"  {name:6s} {batch:5d} {precision:9s} {value:10.2f} {value * gflop:9.1f} "
            f"{1e3 * statistics.median(times[name, precision, batch]):9.1f}"
        )
    print("\n  summary (medians; best = the batch with the highest median rate of that precision)")
    print(f"  {'model':6s} {'':10s} {'float32':>22s} {'bfloat16':>22s} {'ratio':>6s}")
    for name, (config, batches) in models.items():
        gflop = flops_per_cutout(config) / 1e9
        best = {p: max(batches, key=lambda b, p=p: rate[name, p, b]) for p in PRECISIONS}

        def cell(precision, batch, gflop=gflop, name=name):
            value = rate[name, precision, batch]
            return f"{value:8.2f}/s {value * gflop:7.1f} GF/s (b{batch})"

        if batches[0] == 1:
            ratio = rate[name, "bfloat16", 1] / rate[name, "float32", 1]
            print(f"  {name:6s} {'batch 1':10s} {cell('float32', 1):>22s} {cell('bfloat16', 1):>22s} {ratio:5.2f}x")
        ratio = rate[name, "bfloat16", best["bfloat16"]] / rate[name, "float32", best["float32"]]
        print(
            f"  {name:6s} {'best batch':10s} {cell('float32', best['float32']):>22s} "
            f"{cell('bfloat16', best['bfloat16']):>22s} {ratio:5.2f}x",
            flush=True,
        )


# -- error -------------------------------------------------------------------------------


def _report(label: str, report) -> None:
    print(
        f"  {label:34s} min cosine {report.min_cosine:.6f}   max |diff| {report.max_abs:.4g}   "
        f"max rel {report.max_rel:.2e}   mean |diff| {report.mean_abs:.3g}"
    )


def _knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 15) -> float:
    """Mean fraction of each point's k nearest neighbours in ``a`` that are also in ``b``."""
    from scipy.spatial import cKDTree

    na = cKDTree(a).query(a, k + 1)[1][:, 1:]
    nb = cKDTree(b).query(b, k + 1)[1][:, 1:]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))


def bench_error(args) -> None:
    from segscope.analysis.inference import compare_embeddings

    if REFERENCE.is_dir():
        from segscope.analysis.encoder import load_checkpoint

        cutouts = np.load(REFERENCE / "cutouts.npz")["cutouts"]
        segclr = np.load(REFERENCE / "embeddings.npy")
        exact = {p: load_checkpoint(REFERENCE / "ckpt_object", precision=p) for p in PRECISIONS}
        out = {p: encoder.embed(cutouts, batch_size=1) for p, encoder in exact.items()}
        norms = np.linalg.norm(segclr, axis=1)
        print(
            f"\nerror, SegCLR fixture checkpoint, {len(cutouts)} cutouts of 129^3 "
            f"(|values| up to {np.abs(segclr).max():.1f}, norms {norms.min():.0f}-{norms.max():.0f})"
        )
        _report("bfloat16 vs float32", compare_embeddings(out["float32"], out["bfloat16"]))
        _report("float32 vs SegCLR's own outputs", compare_embeddings(segclr, out["float32"]))
        _report("bfloat16 vs SegCLR's own outputs", compare_embeddings(segclr, out["bfloat16"]))
        del exact
    else:
        print(f"\n(no SegCLR fixture at {REFERENCE}: skipped)")
    _demo_error(args)


def _demo_error(args) -> None:
    from segscope.analysis.artefacts import find_demo_classifiers, find_demo_model, read_classifier_folder
    from segscope.analysis.classify.segments import load_segment_predictor, predict_segment
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.encoder import load_encoder
    from segscope.analysis.evaluation import centre_table
    from segscope.analysis.inference import compare_embeddings, stream_node_embeddings
    from segscope.analysis.paths import assets_dir
    from segscope.analysis.progress import drive
    from segscope.analysis.synthetic import demo_dataset
    from segscope.analysis.training import CellSplit

    model, classifier_folder = find_demo_model(), find_demo_classifiers()
    split_path = assets_dir() / "evaluation" / "split.json"
    if model is None or classifier_folder is None or not split_path.is_file():
        print("\n(no shipped demo encoder, classifiers or split in assets/: demo error skipped)")
        return
    dataset = open_dataset(demo_dataset())
    split = CellSplit.load(split_path)
    centres = centre_table(dataset, split, args.spacing_nm)
    held_out = [seg for seg in centres.segments() if centres.is_eval[centres.segment_ids == seg[0]][0]]
    n_nodes = sum(len(nodes) for _, nodes, _ in held_out)
    print(
        f"\nerror, demo: shipped lite encoder on {n_nodes} nodes ({args.spacing_nm:g} nm apart) of the "
        f"{len(held_out)} held-out segments ({len(split.eval_cells)} evaluation cells of {split_path.name})",
        flush=True,
    )
    embedded = {}
    for precision in PRECISIONS:
        encoder = load_encoder(model, precision=precision)
        start = time.perf_counter()
        embedded[precision] = drive(stream_node_embeddings(encoder, dataset.image, dataset.segmentation, held_out))
        print(f"  embedded in {precision}: {time.perf_counter() - start:.1f} s", flush=True)
    f32, bf16 = embedded["float32"], embedded["bfloat16"]
    assert np.array_equal(f32.node_ids, bf16.node_ids)
    _report("bfloat16 vs float32, node embeddings", compare_embeddings(f32.embeddings, bf16.embeddings))

    summary = read_classifier_folder(classifier_folder)
    entries = [
        {"task": info.task, "path": info.path, "radius_nm": info.radius_nm}
        for info in (summary.compartment, summary.cell_type)
        if info is not None
    ]
    predictor, _ = load_segment_predictor(entries)
    calls: dict[str, dict[str, list]] = {p: {"compartment": [], "cell_type": [], "ood": []} for p in PRECISIONS}
    starts = np.flatnonzero(np.r_[True, f32.segment_ids[1:] != f32.segment_ids[:-1]])
    for start, stop in zip(starts, [*starts[1:], len(f32)]):
        for precision, nodes in embedded.items():
            predictions = predict_segment(predictor, nodes.xyz_nm[start:stop], nodes.embeddings[start:stop])
            compartments = np.zeros(stop - start, np.int64)
            compartments[predictions.compartments.indices] = predictions.compartments.codes
            calls[precision]["compartment"].append(compartments)
            calls[precision]["cell_type"].append(predictions.cell_type.name)
            calls[precision]["ood"].append(predictions.cell_type.ood_flagged)
    same_nodes = np.concatenate(calls["float32"]["compartment"]) == np.concatenate(calls["bfloat16"]["compartment"])
    same_types = np.array(calls["float32"]["cell_type"]) == np.array(calls["bfloat16"]["cell_type"])
    same_ood = np.array(calls["float32"]["ood"]) == np.array(calls["bfloat16"]["ood"])
    print(
        f"  classifier agreement bfloat16 vs float32: subcompartment {100 * same_nodes.mean():.2f} % of "
        f"{len(same_nodes)} nodes, cell type {100 * same_types.mean():.2f} % of {len(same_types)} segments, "
        f"OOD flag {100 * same_ood.mean():.2f} %"
    )

    from segscope.analysis.projection import UmapSettings, fit_umap

    print(f"  k=15 neighbour overlap, embedding space: {_knn_overlap(f32.embeddings, bf16.embeddings):.3f}")
    start = time.perf_counter()
    layouts = {
        "float32": drive(fit_umap(f32.embeddings, UmapSettings(seed=0), prepare_transform=False)).layout,
        "bfloat16": drive(fit_umap(bf16.embeddings, UmapSettings(seed=0), prepare_transform=False)).layout,
        "float32 seed 1": drive(fit_umap(f32.embeddings, UmapSettings(seed=1), prepare_transform=False)).layout,
    }
    print(
        f"  k=15 neighbour overlap, UMAP layouts (seed 0): bfloat16 vs float32 "
        f"{_knn_overlap(layouts['float32'], layouts['bfloat16']):.3f}; float32 seed 0 vs seed 1 "
        f"{_knn_overlap(layouts['float32'], layouts['float32 seed 1']):.3f}  ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )


# -- end to end --------------------------------------------------------------------------


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
        spacing_nm=args.e2e_spacing_nm,
        click_nm=skeleton.nodes_nm[0],
    )
    return dataset.image.url, dataset.segmentation.url, segment_id, centres.positions_nm


def bench_end_to_end(args) -> None:
    from segscope.analysis.encoder import SEGCLR_LITE, build_encoder
    from segscope.analysis.inference import (
        default_batch_size,
        naive_segment_embeddings,
        resolve_precision,
        stream_segment_embeddings,
    )
    from segscope.analysis.progress import drive
    from segscope.analysis.volume import open_volume, reset_chunk_cache

    encoder = build_encoder(SEGCLR_LITE, seed=0, precision=resolve_precision("auto"))
    batch_size = args.batch_size or default_batch_size(encoder)
    image_url, seg_url, segment_id, centres = demo_segment(args)
    n = len(centres)
    print(
        f"\nend-to-end, demo segment {segment_id}: {n} centres at {args.e2e_spacing_nm:g} nm spacing, "
        f"{encoder.encoder_config.name} {encoder.encoder_config.input_size_vox[0]}^3 in {encoder.precision}, "
        f"batch {batch_size}",
        flush=True,
    )

    def streaming(image, segmentation):
        return drive(
            stream_segment_embeddings(encoder, image, segmentation, segment_id, centres, batch_size=batch_size)
        )

    def naive(image, segmentation):
        return naive_segment_embeddings(encoder, image, segmentation, segment_id, centres)

    # Warm the model for both call shapes so neither strategy pays graph tracing.
    warm = np.zeros((batch_size, *encoder.encoder_config.input_size_vox), np.uint8)
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
    parser.add_argument("--parts", default="speed,error,e2e", help="comma-separated subset of speed, error, e2e")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (speed)")
    parser.add_argument("--full-batches", type=_ints, default=[1, 2, 4], help="batch sizes of the exact encoder")
    parser.add_argument(
        "--lite-batches", type=_ints, default=[1, 16, 32, 64, 128, 256], help="batch sizes of the lite encoder"
    )
    parser.add_argument("--spacing-nm", type=float, default=500.0, help="node spacing of the demo error cells")
    parser.add_argument("--segment", type=int, default=None, help="e2e: demo segment (default: most nodes)")
    parser.add_argument(
        "--e2e-spacing-nm", type=float, default=500.0, help="e2e: centre spacing along the skeleton (SegCLR: 1500)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="e2e: streaming batch size (default: engine's)")
    parser.add_argument("--e2e-repeats", type=int, default=3)
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"speed", "error", "e2e"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    started = time.perf_counter()
    _header()
    if "speed" in parts:
        bench_speed(args)
    if "error" in parts:
        bench_error(args)
    if "e2e" in parts:
        bench_end_to_end(args)
    print(
        f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
