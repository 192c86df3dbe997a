"""Take the README's picture of the linked plot and 3-D view on the demo.

    QT_QPA_PLATFORM=offscreen python scripts/screenshot_linked.py docs/screenshot_linked.png

What it does, as a user would: opens the demo the way ``segscope`` does (shipped encoder,
classifiers and context embeddings), waits for the UMAP of the context, double-clicks (by
API) the demo's largest glial segment, selects the points around its plot cluster as a
lasso would (their segments light up in 3-D), labels the segment, and saves the window. It
prints what it measured on the way: seconds to the first UMAP and to the segment's last label.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def run_until(app, predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    return bool(predicate())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from segscope.app.main import add_open_arguments, build_window, configure_qt_environment, plan_launch

    configure_qt_environment()
    import PyQt6.QtWebEngineWidgets  # noqa: F401
    from PyQt6.QtWidgets import QApplication

    started = time.perf_counter()
    plan = plan_launch(add_open_arguments(argparse.ArgumentParser()).parse_args([]))
    if plan.background is None:
        raise SystemExit(f"no context embeddings: {plan.background_note}")
    app = QApplication([sys.argv[0]])
    window = build_window(plan.source, plan.model_path, classifiers=plan.classifiers, background=plan.background)
    window.resize(1600, 900)
    window.show()
    plot = window.plot_dock.plot
    scheduler = plot.scheduler
    if not run_until(app, lambda: window.state.model is not None and window.state.classifiers is not None, 180):
        raise SystemExit("the model did not load")
    if not run_until(app, lambda: scheduler.umap is not None and not plot.animating, 600):
        raise SystemExit(f"no UMAP: {scheduler.status}")
    umap_s = time.perf_counter() - started
    print(f"first UMAP of {scheduler.umap.n_points} context points shown {umap_s:.1f} s after start")

    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.paths import user_cache_dir

    folder = next((user_cache_dir() / "demo").glob("v*-seed0"))
    dataset = open_dataset(folder)
    table = dataset.segments
    types = np.asarray(table["cell_type"]).astype(str)
    n_nodes = np.asarray(table["n_nodes"])
    glia = np.flatnonzero(types == "astrocyte")
    pick = glia[np.argmax(n_nodes[glia])]
    segment_id = int(dataset.segment_ids[pick])
    skeleton = dataset.skeleton(segment_id)
    click = time.perf_counter()
    window.service.handle_click(segment_id, skeleton.nodes_nm[len(skeleton.nodes_nm) // 2])
    if not run_until(
        app,
        lambda: (
            window.state.segment is not None
            and window.state.segment.complete
            and window.state.segment.cell_type is not None
        ),
        120,
    ):
        raise SystemExit("the segment was not embedded")
    print(
        f"segment {segment_id}: {window.state.segment.n_centres} nodes embedded and labelled "
        f"{time.perf_counter() - click:.1f} s after the click; cell type {window.state.segment.cell_type}"
    )
    run_until(app, lambda: not scheduler.busy, 120)

    # A lasso around the clicked segment's points in the plot: the rows within reach of
    # their centre, which takes in neighbouring context segments of the same kind.
    controller = plot.controller
    own = controller.segment_rows([segment_id])
    centre = np.nanmedian(controller.layout[own], axis=0)
    reach = np.nanpercentile(np.linalg.norm(controller.layout[own] - centre, axis=1), 80)
    rows = np.flatnonzero(np.linalg.norm(controller.layout - centre, axis=1) <= reach)
    controller.select_rows(rows, origin="plot")
    window.labels.assign_segments("reactive astrocyte?", [segment_id])
    plot.mode_box.setCurrentText("cell type")
    window.bridge.set_layout("xy-3d")
    lo, hi = skeleton.nodes_nm.min(axis=0), skeleton.nodes_nm.max(axis=0)
    window.bridge.set_view((lo + hi) / 2, cross_section_scale=0.8)
    window.bridge.flush()
    voxel = np.asarray(window.state.dataset.voxel_size_nm)
    with window.bridge.viewer.txn() as s:
        s.projection_scale = float(1.4 * np.max((hi - lo) / voxel))  # 3-D panel height, voxels
    window.bridge.flush()
    run_until(app, lambda: False, 6.0)  # chunks and meshes of the selected segments
    print(f"lasso: {len(rows)} points of {len(controller.selected_segments)} segments selected")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(args.out)):
        raise SystemExit(f"could not save {args.out}")
    print(f"screenshot: {args.out}")
    window.service.autosave = None
    window.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
