"""Render xy slices of a SegScope dataset, with segment outlines, to a PNG.

    python scripts/render_slices.py DATASET OUT.png [--z 64 128 192] [--crop 128]

Without DATASET (``--demo``) it renders the cached default demo (generated on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segscope.analysis.synthetic.preview import render_slices_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", help="dataset folder (default: the cached demo)")
    parser.add_argument("out_png", help="output PNG path")
    parser.add_argument("--z", type=int, nargs="+", default=None, help="z sections (voxels)")
    parser.add_argument("--crop", type=int, default=128, help="edge of the zoomed crop (voxels)")
    parser.add_argument("--seed", type=int, default=0, help="demo seed when no dataset is given")
    args = parser.parse_args(argv)
    dataset = args.dataset
    if dataset is None:
        from segscope.analysis.synthetic import demo_dataset

        dataset = demo_dataset(seed=args.seed)
    out = render_slices_png(dataset, args.out_png, args.z, crop=args.crop)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
