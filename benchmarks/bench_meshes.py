"""Meshing speed: the demo's precomputed meshes and one segment meshed on the fly.

Prints, for the cached demo's segmentation (256^3 voxels, 32 x 32 x 40 nm, ~1000 segments):

* the wall time of :func:`segscope.analysis.meshes.mesh_volume` per block size (rounds
  alternate between block sizes, median reported), with triangles and bytes written;
* the time to mesh single segments on the fly (:func:`mesh_segment_around`, the app's path
  for volumes without meshes) from a box around a voxel of each: median and maximum,
  split into reading the box and meshing.

Run: ``.venv/bin/python benchmarks/bench_meshes.py [--rounds 2] [--segments 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--segments", type=int, default=20, help="segments meshed on the fly")
    parser.add_argument("--blocks", default="128,256", help='block edges (voxels) to compare; "" for none')
    parser.add_argument("--dataset", help="a dataset folder (default: the cached demo)")
    args = parser.parse_args()

    from segscope.analysis.meshes import mesh_segment_around, mesh_volume
    from segscope.analysis.progress import drive
    from segscope.analysis.synthetic import demo_dataset
    from segscope.analysis.volume import open_volume

    folder = Path(args.dataset) if args.dataset else demo_dataset()
    segmentation = open_volume(folder / "segmentation")
    print(f"segmentation {segmentation.shape} voxels at {segmentation.voxel_size_nm.tolist()} nm")
    blocks = [int(b) for b in args.blocks.split(",") if b]  # --blocks "": on the fly only
    times: dict[int, list[float]] = {b: [] for b in blocks}
    for _round in range(args.rounds):
        for block in blocks:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = drive(mesh_volume(segmentation, Path(tmp) / "mesh", block_vox=(block,) * 3))
                times[block].append(time.perf_counter() - start)
                size = sum(p.stat().st_size for p in (Path(tmp) / "mesh").iterdir())
            print(
                f"  block {block}: {times[block][-1]:.1f} s, {summary.n_segments} segments, "
                f"{summary.n_fragments} fragments, {summary.n_faces} triangles, {size / 1e6:.1f} MB"
            )
    for block in blocks:
        print(f"mesh_volume block {block}^3: median {statistics.median(times[block]):.1f} s over {args.rounds} rounds")

    labels = segmentation.read_all()
    ids = np.unique(labels[labels != 0])
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(ids), size=min(args.segments, len(ids)), replace=False)
    total, reads, faces, truncated = [], [], [], 0
    for index in chosen:
        segment = int(ids[index])
        voxels = np.argwhere(labels == ids[index])
        seed = voxels[len(voxels) // 2]
        result = drive(mesh_segment_around(segmentation, segment, (seed + 0.5) * segmentation.voxel_size_nm))
        total.append(result.seconds)
        reads.append(result.read_seconds)
        faces.append(result.mesh.n_faces)
        truncated += result.truncated
    print(
        f"on the fly, {len(total)} segments: median {statistics.median(total) * 1000:.0f} ms "
        f"(reading {statistics.median(reads) * 1000:.0f} ms), max {max(total) * 1000:.0f} ms, "
        f"median {int(statistics.median(faces))} triangles, {truncated} truncated"
    )


if __name__ == "__main__":
    main()
