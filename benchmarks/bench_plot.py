"""Live embedding plot figures: placing new points into a UMAP, and redraw time.

1. Placement: synthetic clustered 64-d embeddings (40 Gaussian clusters), a UMAP fitted
   once on N points (N = 10k and 100k by default; fit settings printed), then 500 new
   points placed with ``transform`` (median of repeats; the first call is reported apart
   since it may load or compile numba kernels). Target: 0.5 s at 100k. Timed in this
   process and, as the app does it, through the UMAP child process (the same fit there,
   new points sent over the pipe).
2. Redraw: the plot dock's point item in an offscreen window (800 x 600 px) with 100k and
   1,000,000 points in 5 colours; each repeat pans/zooms with ``setRange`` and forces a
   full repaint with ``grab()``. Median of repeats. Target: 100 ms at 1M. pyqtgraph's
   ``ScatterPlotItem`` is timed at 100k for reference.
3. GUI stall: a plain main-thread heartbeat (``time.sleep(0.01)`` in a loop, no Qt) while
   a worker thread runs the scheduler's UMAP work through a backend: warm-up, a fit of
   10k points (n_epochs 200, PCA start, as the app refits) and placements of 500 new
   points. ``thread``: numba in the same process (LocalProjectionBackend); ``process``: in
   a spawned child (ProcessProjectionBackend). Each backend runs in a fresh interpreter,
   so both pay the umap import; ``--stall-cache cold`` gives each a fresh empty
   NUMBA_CACHE_DIR (several minutes each), ``warm`` (default) the user's numba cache.
   Reports median / p99 / max gap between ticks, overall and per phase.

Usage::

    python benchmarks/bench_plot.py                  # everything (about 5-10 min, 2 cores)
    python benchmarks/bench_plot.py --parts redraw   # only the redraw figures
    python benchmarks/bench_plot.py --sizes 10000    # placement at 10k only
    python benchmarks/bench_plot.py --parts latency  # GUI timer gaps during warm-up and fits
    python benchmarks/bench_plot.py --parts stall --stall-cache cold  # heartbeat gaps, thread vs process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered(n: int, dim: int = 64, n_clusters: int = 40, seed: int = 0) -> np.ndarray:
    """float32 [n, dim]: points around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_clusters, dim))
    return (centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def bench_placement(sizes: list[int], new_points: int, repeats: int, backends: tuple[str, ...] = ("local",)) -> None:
    from segscope.analysis.progress import drive
    from segscope.analysis.projection import (
        UmapSettings,
        configure_numba_cache,
        fit_pca,
        fit_umap,
        numba_cache_is_warm,
        umap_module,
        warm_up,
    )

    cache = configure_numba_cache()
    print(f"numba cache {cache}: {'warm' if numba_cache_is_warm() else 'cold'} at start")
    started = time.perf_counter()
    umap_module()
    print(f"import umap.umap_ (TensorFlow hidden): {time.perf_counter() - started:.1f} s")
    timings = warm_up(settings=UmapSettings(seed=None))  # the fits below run unseeded (parallel)
    print(
        "warm-up (300 points; compiles or loads numba kernels): "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    )
    for n in sizes:
        data = clustered(n + new_points * repeats, seed=n)
        fitted, fresh = data[:n], data[n:]
        pca_started = time.perf_counter()
        init = fit_pca(fitted).transform(fitted)
        pca_seconds = time.perf_counter() - pca_started
        # Big fits: fewer epochs and a PCA start (spectral init is slow at 100k); the app
        # refits from the current layout the same way.
        settings = UmapSettings(n_epochs=200 if n <= 20_000 else 50, seed=None, approximate=True)
        cpu = time.process_time()
        wall = time.perf_counter()
        model = drive(fit_umap(fitted, settings, init=init))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"\nN={n}: PCA {pca_seconds * 1000:.0f} ms; UMAP fit {model.fit_seconds:.1f} s wall "
            f"(+ {wall - model.fit_seconds:.1f} s preparing transform), {cpu:.1f} s CPU in all "
            f"(n_neighbors={settings.n_neighbors}, n_epochs={settings.n_epochs}, "
            f"force_approximation_algorithm={settings.approximate}, init=PCA, parallel)"
        )
        print(
            f"N={n}: place {new_points} new points (in this process): "
            + _placement_times(model, fresh, new_points, repeats)
        )
        if "process" in backends:
            _place_through_the_child(n, fitted, fresh, init, settings, new_points, repeats)


def _placement_times(model, fresh: np.ndarray, new_points: int, repeats: int) -> str:
    """Place ``repeats`` batches of ``new_points`` rows of ``fresh`` with ``model.transform``;
    the figures as one line (the first call apart: it may load kernels)."""
    times = []
    for r in range(repeats):
        batch = fresh[r * new_points : (r + 1) * new_points]
        t0 = time.perf_counter()
        placed = model.transform(batch)
        times.append(time.perf_counter() - t0)
        assert placed.shape == (new_points, 2) and np.isfinite(placed).all()
    rest = times[1:] or times
    return (
        f"first {times[0]:.3f} s, median of next {len(rest)} {statistics.median(rest):.3f} s "
        f"(min {min(rest):.3f}, max {max(rest):.3f})"
    )


def _place_through_the_child(n, fitted, fresh, init, settings, new_points: int, repeats: int) -> None:
    """The app's path: the same fit in the UMAP child process, new points placed through
    the pipe (:class:`segscope.app.projection_process.ProcessProjectionBackend`)."""
    from segscope.app.projection_process import ProcessProjectionBackend

    backend = ProcessProjectionBackend()
    try:
        backend.warm_up(settings)
        wall = time.perf_counter()
        model = backend.fit(fitted, settings, init)
        print(
            f"N={n}: the same fit in the child process: {model.fit_seconds:.1f} s in the child, "
            f"{time.perf_counter() - wall:.1f} s round trip"
        )
        print(
            f"N={n}: place {new_points} new points through the child (the app's path): "
            + _placement_times(model, fresh, new_points, repeats)
            + "; target 0.5 s at 100k"
        )
    finally:
        backend.close()


def bench_redraw(sizes: list[int], repeats: int, scatter_reference: int) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    from PyQt6.QtWidgets import QApplication

    from segscope.app.plot_controller import PlotController
    from segscope.app.views.embedding_plot import EmbeddingPlotWidget

    app = QApplication.instance() or QApplication([])
    rng = np.random.default_rng(0)

    def layout_of(n: int) -> np.ndarray:
        centres = rng.normal(0, 10, size=(30, 2))
        return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, 2))).astype(np.float32)

    def pan_zoom_times(view_box, widget, xy) -> list[float]:
        lo, hi = np.nanmin(xy, axis=0), np.nanmax(xy, axis=0)
        times = []
        for r in range(repeats + 1):
            zoom = 1.0 if r % 3 == 0 else 0.4 + 0.5 * rng.random()
            centre = lo + (hi - lo) * rng.uniform(0.3, 0.7, 2)
            half = (hi - lo) * zoom / 2
            t0 = time.perf_counter()
            view_box.setRange(
                xRange=(centre[0] - half[0], centre[0] + half[0]),
                yRange=(centre[1] - half[1], centre[1] + half[1]),
                padding=0,
            )
            widget.grab()  # forces a full repaint of the view
            times.append(time.perf_counter() - t0)
        return times[1:]  # the first includes one-off layout work

    for n in sizes:
        controller = PlotController()
        plot = EmbeddingPlotWidget(controller, scheduler_options={"min_points": 10**12, "warm_up": False})
        plot.resize(800, 600)
        plot.show()
        app.processEvents()
        xy = layout_of(n)
        t0 = time.perf_counter()
        controller.add_points(
            np.arange(n, dtype=np.uint64) // 100,
            np.arange(n),
            np.zeros((n, 3)),
            np.zeros((n, 2), np.float32),
            compartments=rng.integers(0, 5, n).astype(np.uint8),
        )
        add_seconds = time.perf_counter() - t0
        controller.set_layout(None, xy, kind="pca")
        t0 = time.perf_counter()
        app.processEvents()  # the coalesced refresh: positions + colours into the item
        refresh_seconds = time.perf_counter() - t0
        times = pan_zoom_times(plot.view_box, plot.graphics, xy)
        t0 = time.perf_counter()
        frame = xy + 0.01
        plot.points.set_positions(frame)
        plot.graphics.grab()
        frame_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        controller.hit_test(0.0, 0.0, 0.5)
        tree_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(100):
            controller.hit_test(*rng.normal(0, 10, 2), 0.5)
        query_ms = (time.perf_counter() - t0) * 10
        t0 = time.perf_counter()
        angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        controller.rows_in_polygon(np.stack([8 * np.cos(angles), 8 * np.sin(angles)], axis=1))
        lasso_seconds = time.perf_counter() - t0
        print(
            f"\nredraw N={n}: pan/zoom + repaint median {statistics.median(times) * 1000:.0f} ms "
            f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, {len(times)} repeats); "
            f"add points {add_seconds * 1000:.0f} ms, first refresh {refresh_seconds * 1000:.0f} ms, "
            f"one animation frame {frame_seconds * 1000:.0f} ms"
        )
        print(
            f"hit test N={n}: KD-tree build {tree_seconds * 1000:.0f} ms, query {query_ms:.3f} ms; "
            f"60-vertex lasso {lasso_seconds * 1000:.0f} ms"
        )
        plot.shutdown()
        plot.close()
        plot.deleteLater()
        app.processEvents()

    if scatter_reference:
        n = scatter_reference
        widget = pg.PlotWidget()
        widget.resize(800, 600)
        widget.show()
        xy = layout_of(n)
        brushes = [pg.mkBrush(c) for c in ("#3b8bff", "#ff5a36", "#2fd16b", "#c061ff", "#808080")]
        item = pg.ScatterPlotItem(pen=None, size=4)
        t0 = time.perf_counter()
        item.setData(x=xy[:, 0], y=xy[:, 1], brush=[brushes[i] for i in rng.integers(0, 5, n)])
        set_seconds = time.perf_counter() - t0
        widget.addItem(item)
        app.processEvents()
        times = pan_zoom_times(widget.getViewBox(), widget, xy)
        print(
            f"\nreference pyqtgraph ScatterPlotItem N={n}: setData {set_seconds * 1000:.0f} ms, pan/zoom + repaint "
            f"median {statistics.median(times) * 1000:.0f} ms"
        )
        widget.close()


def bench_latency(n_points: int, batch: int, limit_s: float, backend_name: str = "process") -> None:
    """Qt event-loop gaps while points stream in and the warm-up and UMAP fits run, with
    UMAP in the app's child process (``"process"``) or on threads here (``"local"``)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt6.QtCore import QTimer
    from PyQt6.QtWidgets import QApplication

    from segscope.app.projection_process import LocalProjectionBackend, ProcessProjectionBackend
    from segscope.app.views.embedding_plot import EmbeddingPlotWidget

    app = QApplication.instance() or QApplication([])
    backend = ProcessProjectionBackend() if backend_name == "process" else LocalProjectionBackend()
    plot = EmbeddingPlotWidget(scheduler_options={"min_points": 500, "backend": backend})
    plot.resize(600, 500)
    plot.show()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(20, 64))
    gaps: list[float] = []
    last = [time.perf_counter()]
    started = time.perf_counter()

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    def add() -> None:
        if plot.controller.n_points >= n_points:
            adder.stop()
            return
        embeddings = centres[rng.integers(0, 20, batch)] + rng.normal(size=(batch, 64))
        plot.controller.add_points(
            int(rng.integers(1, 50)), rng.integers(0, 2**40, batch), np.zeros((batch, 3)), embeddings
        )

    def check() -> None:
        if (
            plot.controller.layout_kind == "umap"
            and not plot.scheduler.busy
            and not adder.isActive()
            and np.isfinite(plot.controller.layout).all()
        ):
            app.quit()

    timer, adder, checker = QTimer(), QTimer(), QTimer()
    timer.timeout.connect(tick)
    adder.timeout.connect(add)
    checker.timeout.connect(check)
    timer.start(10)
    adder.start(200)
    checker.start(100)
    QTimer.singleShot(int(limit_s * 1000), app.quit)
    plot.scheduler.start()
    app.exec()
    g = np.array(gaps[1:]) * 1000
    print(
        f"\nlatency ({backend_name} UMAP): {plot.controller.n_points} points streamed in batches of {batch} "
        f"every 200 ms; "
        f"warm-up {plot.scheduler.warm_up_result}; after {time.perf_counter() - started:.0f} s the plot shows "
        f"{plot.scheduler.status!r}"
    )
    print(
        f"latency: GUI 10 ms timer gaps median {np.median(g):.0f} ms, p99 {np.percentile(g, 99):.0f} ms, "
        f"max {g.max():.0f} ms; {(g > 100).sum()} of {len(g)} gaps over 100 ms"
    )
    plot.shutdown()
    backend.close()


def _stall_run(backend_name: str, n_points: int, new_points: int, placements: int) -> dict:
    """In a fresh interpreter: heartbeat gaps on the main thread while a worker thread
    drives warm-up, a fit and placements through ``backend_name``'s backend."""
    from dataclasses import replace

    from segscope.analysis.projection import UmapSettings, configure_numba_cache, fit_pca, numba_cache_is_warm
    from segscope.app.projection_process import LocalProjectionBackend, ProcessProjectionBackend

    cache = configure_numba_cache()
    warm = numba_cache_is_warm()
    settings = UmapSettings(seed=None)  # the app's settings: parallel kernels
    data = clustered(n_points + new_points * placements, seed=n_points)
    phases: list[tuple[str, float, float]] = []  # (name, start, end) in perf_counter seconds
    done = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            t0 = time.perf_counter()
            backend = ProcessProjectionBackend() if backend_name == "process" else LocalProjectionBackend()
            backend.warm_up(settings)
            t1 = time.perf_counter()
            phases.append(("warm-up", t0, t1))
            fitted = data[:n_points]
            init = fit_pca(fitted).transform(fitted).astype(np.float64)
            model = backend.fit(fitted, replace(settings, n_epochs=200), init)
            t2 = time.perf_counter()
            phases.append(("fit", t1, t2))
            for r in range(placements):
                placed = model.transform(data[n_points + r * new_points : n_points + (r + 1) * new_points])
                assert placed.shape == (new_points, 2) and np.isfinite(placed).all()
            phases.append(("placements", t2, time.perf_counter()))
            backend.close()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            done.set()

    ticks = [time.perf_counter()]
    threading.Thread(target=work, name="bench-umap-worker", daemon=True).start()
    while not done.is_set():
        time.sleep(0.010)  # the GUI's 10 ms timer
        ticks.append(time.perf_counter())
    if failure:
        raise failure[0]
    times = np.array(ticks)
    gaps = np.diff(times) * 1000
    ends = times[1:]

    def stats(mask) -> dict:
        g = gaps[mask]
        return (
            {
                "ticks": len(g),
                "median_ms": float(np.median(g)),
                "p99_ms": float(np.percentile(g, 99)),
                "max_ms": float(g.max()),
                "over_50ms": int((g > 50).sum()),
            }
            if len(g)
            else {}
        )

    return {
        "backend": backend_name,
        "cache": str(cache),
        "cache_was_warm": warm,
        "all": stats(ends > 0),
        "phases": {
            name: {"seconds": end - start, **stats((ends > start) & (ends <= end))} for name, start, end in phases
        },
    }


def bench_stall(n_points: int, new_points: int, placements: int, cache: str) -> None:
    """Main-thread heartbeat gaps: UMAP on worker threads vs in a child process."""
    print(
        f"\nGUI stall: 10 ms main-thread heartbeat while warm-up, a UMAP fit of {n_points} points "
        f"(n_epochs 200, PCA init, parallel) and {placements} placements of {new_points} points run; "
        f"numba cache {cache}"
    )
    for backend in ("thread", "process"):
        env = dict(os.environ)
        with tempfile.TemporaryDirectory(prefix="segscope-numba-") as fresh:
            if cache == "cold":
                env["NUMBA_CACHE_DIR"] = fresh  # both backends compile from nothing
            command = [
                sys.executable,
                __file__,
                "--stall-run",
                backend,
                "--stall-points",
                str(n_points),
                "--new-points",
                str(new_points),
                "--stall-placements",
                str(placements),
            ]
            run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"stall {backend}: failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        overall = result["all"]
        print(
            f"stall {backend:>7}: cache {'warm' if result['cache_was_warm'] else 'cold'} at start; gaps median "
            f"{overall['median_ms']:.0f} ms, p99 {overall['p99_ms']:.0f} ms, max {overall['max_ms']:.0f} ms; "
            f"{overall['over_50ms']} of {overall['ticks']} over 50 ms"
        )
        for name, phase in result["phases"].items():
            print(
                f"    {name:>10}: {phase['seconds']:.1f} s, gaps median {phase.get('median_ms', 0):.0f} ms, "
                f"max {phase.get('max_ms', 0):.0f} ms, {phase.get('over_50ms', 0)} over 50 ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["placement", "redraw", "stall"],
        choices=["placement", "redraw", "latency", "stall"],
        help="latency (not run by default): GUI responsiveness while UMAP fits in the background",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="UMAP sizes")
    parser.add_argument("--new-points", type=int, default=500)
    parser.add_argument("--place-repeats", type=int, default=6)
    parser.add_argument(
        "--latency-backends",
        nargs="+",
        choices=["local", "process"],
        default=["process", "local"],
        help="where UMAP runs in the latency part: the app's child process, or threads here",
    )
    parser.add_argument(
        "--place-backends",
        nargs="+",
        choices=["local", "process"],
        default=["local", "process"],
        help="where placement is timed: in this process, and through the app's UMAP child process",
    )
    parser.add_argument("--redraw-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--redraw-repeats", type=int, default=15)
    parser.add_argument(
        "--scatter-reference",
        type=int,
        default=100_000,
        help="also time pyqtgraph's ScatterPlotItem at this size (0: skip)",
    )
    parser.add_argument("--stall-points", type=int, default=10_000, help="UMAP fit size of the stall part")
    parser.add_argument("--stall-placements", type=int, default=5)
    parser.add_argument(
        "--stall-cache",
        choices=["warm", "cold"],
        default="warm",
        help="cold: each backend compiles numba's kernels in a fresh cache folder",
    )
    parser.add_argument("--stall-run", choices=["thread", "process"], help=argparse.SUPPRESS)  # one backend, JSON out
    args = parser.parse_args()
    if args.stall_run:
        print(json.dumps(_stall_run(args.stall_run, args.stall_points, args.new_points, args.stall_placements)))
        return
    print(f"cores: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if "redraw" in args.parts:
        bench_redraw(args.redraw_sizes, args.redraw_repeats, args.scatter_reference)
    if "placement" in args.parts:
        bench_placement(args.sizes, args.new_points, args.place_repeats, tuple(args.place_backends))
    if "latency" in args.parts:
        for backend_name in args.latency_backends:
            bench_latency(5000, 50, 300.0, backend_name)
    if "stall" in args.parts:
        bench_stall(args.stall_points, args.new_points, args.stall_placements, args.stall_cache)
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
