"""Launching the SegScope window: ``segscope`` (demo) and ``segscope open ...``.

:func:`add_open_arguments` adds the data options to an argparse parser and
:func:`run_app` runs the app from the parsed arguments. Inputs are checked on the console
before any window opens (a bad path gives one ``segscope: error: ...`` line and exit
status 2); once the window is up, errors show in the window instead.

Qt is imported only inside the functions that need it, so importing this module (as
``segscope --help`` does) stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from app.controller import DataSource
    from app.views.main_window import MainWindow

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """A problem with the launch arguments, reported on the console before the window."""


def add_open_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data options of ``segscope open`` to ``parser`` and return it."""
    parser.add_argument("--image", metavar="URL",
                        help="EM image volume: path, file://, gs:// or http(s):// (precomputed, zarr, n5)")
    parser.add_argument("--segmentation", metavar="URL", help="segmentation volume (same forms as --image)")
    parser.add_argument("--skeletons", metavar="DIR",
                        help="precomputed skeleton folder (default: the one the segmentation's info names)")
    parser.add_argument("--embeddings", metavar="DIR", help="precomputed SegCLR embeddings (CSV ZIP shards)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="encoder: a SegScope .keras file or a SegCLR TensorFlow checkpoint "
                             "(default: the demo model in assets/, when present)")
    parser.add_argument("--classifiers", metavar="DIR", help="folder of trained classifiers")
    return parser


@dataclass(frozen=True)
class LaunchPlan:
    """What the window opens with, after checking the arguments."""

    source: "DataSource"
    model_path: Path | None
    model_trained: bool


def _demo_source() -> "DataSource":
    from analysis.synthetic import demo_dataset
    from app.controller import DataSource

    last = [-1]

    def report(progress) -> None:
        if progress.total and progress.done != last[0]:
            last[0] = progress.done
            print(f"  {progress.message} ({progress.done}/{progress.total})", file=sys.stderr, flush=True)

    from analysis.paths import user_cache_dir

    if not any((user_cache_dir() / "demo").glob("v*-seed0/dataset.json")):
        print("Preparing the demo dataset (first run only, about 15 s)…", file=sys.stderr, flush=True)
    return DataSource.open_dataset_folder(demo_dataset(progress=report))


def plan_launch(args: argparse.Namespace) -> LaunchPlan:
    """Check the arguments and open the data's metadata (console side, no Qt).

    Raises
    ------
    LaunchError
        With a one-line message naming the problem.
    """
    from app.controller import SourceError, check_checkpoint, find_demo_model

    image = getattr(args, "image", None)
    segmentation = getattr(args, "segmentation", None)
    if bool(image) != bool(segmentation):
        raise LaunchError("give both --image and --segmentation (or neither, for the demo)")
    if getattr(args, "embeddings", None):
        raise LaunchError("reading precomputed CSV ZIP embeddings is not available in this version yet; "
                          "leave out --embeddings to compute embeddings")
    if getattr(args, "classifiers", None):
        raise LaunchError("loading classifiers is not available in this version yet; leave out --classifiers")
    if getattr(args, "skeletons", None) and not image:
        raise LaunchError("--skeletons needs --image and --segmentation")

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        try:
            model_path = check_checkpoint(checkpoint)
        except (OSError, ValueError) as exc:
            raise LaunchError(f"--checkpoint: {exc}") from None
    else:
        model_path = find_demo_model()

    try:
        if image:
            from app.controller import DataSource

            source = DataSource.open(image, segmentation, getattr(args, "skeletons", None))
        else:
            source = _demo_source()
    except (SourceError, OSError, ValueError) as exc:
        raise LaunchError(str(exc)) from None
    return LaunchPlan(source, model_path, True)


def _check_display() -> None:
    """Fail early, with a readable message, where Qt would abort for lack of a display."""
    if sys.platform.startswith("linux") and not os.environ.get("QT_QPA_PLATFORM"):
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise LaunchError("no display found (DISPLAY/WAYLAND_DISPLAY unset); for a headless run "
                              "set QT_QPA_PLATFORM=offscreen")


def configure_qt_environment() -> None:
    """Environment QtWebEngine needs before the QApplication exists.

    Software-rendered (no GPU) machines are blocklisted for WebGL by Chromium, and
    Neuroglancer needs WebGL, so the blocklist is ignored unless the user set flags.
    """
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--ignore-gpu-blocklist")


def build_window(source: "DataSource", model_path: Path | None, *,
                 model_trained: bool = True, spacing_nm: float | None = None) -> "MainWindow":
    """Create the window, its controller, job runner and neuroglancer bridge.

    A QApplication must exist. The model loads on the worker thread after the window is
    built; without one, segments can be selected but not embedded. TensorFlow runs in a
    child process (see :mod:`app.compute_process` for why).
    """
    from app.controller import AppController
    from app.jobs import JobRunner
    from app.neuroglancer_bridge import NeuroglancerBridge
    from app.state import SessionState
    from app.views.main_window import ClickRelay, MainThreadInvoker, MainWindow

    state = SessionState()
    invoker = MainThreadInvoker()
    runner = JobRunner(post=invoker.post)
    controller = AppController(state, runner, spacing_nm=spacing_nm)
    relay = ClickRelay()
    bridge = NeuroglancerBridge(relay.forward)
    bridge.attach(state)
    window = MainWindow(state, controller, bridge, invoker, relay)
    invoker.setParent(window)
    relay.setParent(window)
    window.show_source(source)
    controller.load_model(model_path, trained=model_trained)
    return window


def run_app(args: argparse.Namespace) -> int:
    """Run the desktop app until its window closes; returns the exit status.

    With neither ``--image`` nor ``--segmentation`` it opens the demo dataset.
    """
    try:
        _check_display()
        plan = plan_launch(args)
    except LaunchError as exc:
        print(f"segscope: error: {exc}", file=sys.stderr)
        return 2
    configure_qt_environment()
    import PyQt6.QtWebEngineWidgets  # noqa: F401  (must be imported before the QApplication)
    from PyQt6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "segscope"])
    app.setApplicationName("SegScope")
    window = build_window(plan.source, plan.model_path, model_trained=plan.model_trained)
    window.show()
    status = app.exec()
    window.shutdown()
    return int(status)
