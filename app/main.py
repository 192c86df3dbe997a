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
import queue
import re
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from segscope.analysis.artefacts import ClassifierSummary
    from segscope.analysis.progress import Progress
    from segscope.app.controller import DataSource, PrecomputedEmbeddings
    from segscope.app.jobs import Job
    from segscope.app.views.main_window import MainWindow

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """A problem with the launch arguments, reported on the console before the window."""


def add_precision_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--precision`` (what the encoder computes in; default ``auto``) to ``parser``."""
    from segscope.analysis.encoder.config import PRECISION_POLICIES

    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISION_POLICIES),
        default="auto",
        help="encoder arithmetic: auto (default: bfloat16 on CPUs with AMX or AVX-512 BF16 and on GPUs, "
        "else float32), float32 (SegCLR's numbers exactly), bfloat16, float16 (GPUs)",
    )
    return parser


def add_open_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data options of ``segscope open`` to ``parser`` and return it."""
    from segscope.app import cli_args

    parser.add_argument(
        "--image", metavar="URL", help="EM image volume: path, file://, gs:// or http(s):// (precomputed, zarr, n5)"
    )
    parser.add_argument("--segmentation", metavar="URL", help="segmentation volume (same forms as --image)")
    parser.add_argument(
        "--skeletons",
        metavar="PATH",
        help="precomputed skeleton folder, folder of ID.swc files (nm) or CSV/Parquet node table "
        "(default: the folder the segmentation's info names; other segments are skeletonised when clicked)",
    )
    parser.add_argument(
        "--skeleton-box-vox",
        type=int,
        default=None,
        metavar="N",
        help="largest box edge (voxels per axis) a clicked segment is skeletonised in (default 512)",
    )
    parser.add_argument(
        "--embeddings",
        metavar="DIR",
        help="precomputed SegCLR embeddings (CSV ZIP shards, folder or URL): segments found there are not computed",
    )
    parser.add_argument(
        "--embeddings-coordinates",
        choices=("nm", "voxels"),
        default="nm",
        help="unit of the store's x, y, z columns: nm (segscope embed, SegCLR *_nm_coord*) "
        "or voxels of the segmentation (SegCLR's plain releases); default nm",
    )
    parser.add_argument(
        "--embeddings-shards",
        metavar="N",
        type=cli_args.positive_int,
        default=10_000,
        help="number of shards of the store (10000 for H01 and MICrONS v117/v343, 50000 for newer MICrONS exports)",
    )
    parser.add_argument(
        "--embeddings-bytewidth",
        metavar="B",
        type=cli_args.positive_int,
        default=64,
        help="byte width of the store's shard function (64, or 8 for newer MICrONS exports)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="encoder: a SegScope .keras file or a SegCLR TensorFlow checkpoint "
        "(default: the demo model in assets/, when present)",
    )
    parser.add_argument(
        "--session",
        metavar="FILE",
        help="reopen a saved session (*.segscope.json): its data, model, classifiers, "
        "segments, labels and plot; other options override its data",
    )
    parser.add_argument(
        "--batch-size",
        metavar="N",
        type=cli_args.integer(1, 65_536),
        default=None,
        help="cutouts per forward call after a click's first (default: the engine's for the device); "
        "lower it when the GPU runs out of memory",
    )
    parser.add_argument(
        "--classifiers",
        metavar="DIR",
        help="folder of trained classifiers with a classifiers.json (segscope evaluate "
        "--save-classifiers writes one); default: the demo classifiers in assets/",
    )
    return add_precision_argument(parser)


@dataclass(frozen=True)
class LaunchPlan:
    """What the window opens with, after checking the arguments."""

    source: DataSource | None
    model_path: Path | None
    model_trained: bool
    classifiers: ClassifierSummary | None = None
    precomputed: PrecomputedEmbeddings | None = None
    #: Context embeddings for the plot (the demo's), and why there are none otherwise.
    background: Path | None = None
    background_note: str = ""
    #: A saved session to restore once the window is up.
    session: Path | None = None
    #: The demo dataset is not generated yet: the window opens without data (``source``
    #: None) and :func:`prepare_demo` generates it as a job with progress in the window.
    demo_pending: bool = False
    #: What the encoder computes in (``--precision``; ``"auto"`` is resolved by the compute child).
    precision: str = "auto"
    #: Cutouts per forward call (``--batch-size``; None: the engine's default).
    batch_size: int | None = None


#: Stages of the demo generation as the job bar counts them: synthesize's 5 stages, then
#: the 3 parts written to disk.
_DEMO_STAGES = {"stages": 0, "parts": 5}
_DEMO_STEPS = 8


def _demo_child(seed: int, reports) -> None:  # pragma: no cover - runs in a child process
    """Generate the demo dataset, sending ``("progress", Progress)`` and then the outcome."""
    from segscope.analysis.synthetic import demo_dataset

    try:
        folder = demo_dataset(seed, progress=lambda report: reports.put(("progress", report)))
    except BaseException as exc:
        reports.put(("failed", f"{type(exc).__name__}: {exc}"))
    else:
        reports.put(("finished", str(folder)))


def demo_job(seed: int = 0, *, in_process: bool = False) -> Generator[Progress, None, Path]:
    """A job generator: the demo dataset's folder, generated first when it is not cached.

    :func:`segscope.analysis.synthetic.demo_dataset` runs in a ``spawn``-ed child process
    (its numpy work then never competes with the Qt thread for the GIL), or with
    ``in_process`` on a helper thread; its progress reports are yielded as they come,
    counted over the whole generation (``done`` of ``total`` 8 stages). Closing the job
    ends the child (the half-written dataset lies in a hidden temporary folder).

    Raises
    ------
    RuntimeError
        When the generation failed or its process died.
    """
    from segscope.analysis.progress import Progress

    cached = _cached_demo_folder(seed)
    if cached is not None:
        return cached
    reports: Any
    process = None
    if in_process:
        from segscope.analysis.synthetic import demo_dataset

        reports = queue.Queue()

        def work() -> None:
            try:
                folder = demo_dataset(seed, progress=lambda report: reports.put(("progress", report)))
            except BaseException as exc:  # handed to the job, which raises it
                reports.put(("failed", f"{type(exc).__name__}: {exc}"))
            else:
                reports.put(("finished", str(folder)))

        threading.Thread(target=work, name="segscope-demo-data", daemon=True).start()
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        reports = context.Queue()
        process = context.Process(target=_demo_child, args=(seed, reports), name="segscope-demo-data", daemon=True)
        process.start()
    done = 0
    try:
        yield Progress(done, _DEMO_STEPS, "stages", "building the cells")
        while True:
            try:
                kind, value = reports.get(timeout=0.5)
            except queue.Empty:
                if process is not None and not process.is_alive():
                    raise RuntimeError(f"the demo generation process died (exit code {process.exitcode})") from None
                continue
            if kind == "progress":
                if value.unit in _DEMO_STAGES:
                    done = min(_DEMO_STAGES[value.unit] + value.done, _DEMO_STEPS)
                yield Progress(done, _DEMO_STEPS, "stages", value.message)
            elif kind == "failed":
                raise RuntimeError(value)
            else:
                return Path(value)
    finally:
        if process is not None:
            if process.is_alive():
                process.terminate()
            process.join(5.0)


def _cached_demo_folder(seed: int = 0) -> Path | None:
    """The demo dataset's folder when it is already generated, else None (writes nothing)."""
    from segscope.analysis.paths import user_cache_dir
    from segscope.analysis.synthetic import GENERATOR_VERSION

    folder = user_cache_dir() / "demo" / f"v{GENERATOR_VERSION}-seed{seed}"
    return folder if (folder / "dataset.json").is_file() else None


def _demo_folder() -> Path:
    from segscope.analysis.synthetic import demo_dataset

    last = [-1]

    def report(progress) -> None:
        if progress.total and progress.done != last[0]:
            last[0] = progress.done
            print(f"  {progress.message} ({progress.done}/{progress.total})", file=sys.stderr, flush=True)

    from segscope.analysis.paths import user_cache_dir

    if not any((user_cache_dir() / "demo").glob("v*-seed0/dataset.json")):
        print("Preparing the demo dataset (first run only, about 15 s)…", file=sys.stderr, flush=True)
    return Path(demo_dataset(progress=report))


def _session_sources(path: str) -> tuple[Path, dict]:
    """The data, model and classifiers a saved session names (console side).

    Raises
    ------
    LaunchError
        For a missing or unreadable session file.
    """
    from segscope.app.session_file import SessionDocument, SessionFileError, session_paths

    json_path, _ = session_paths(path)
    try:
        document = SessionDocument.from_json(json_path.read_text(), source=json_path)
    except FileNotFoundError:
        raise LaunchError(f"--session: no session file {json_path}") from None
    except (OSError, SessionFileError, ValueError) as exc:
        raise LaunchError(f"--session: {exc}") from None
    dataset = document.dataset
    return json_path, {
        "image": dataset.image_url,
        "segmentation": dataset.segmentation_url,
        "skeletons": dataset.skeletons_url,
        "checkpoint": document.model_path,
        "classifiers": document.classifiers_folder,
    }


def plan_launch(args: argparse.Namespace, *, defer_demo: bool = False) -> LaunchPlan:
    """Check the arguments and open the data's metadata (console side, no Qt).

    For the demo (no data given) whose dataset is not generated yet, ``defer_demo``
    returns at once a plan with ``demo_pending`` and no ``source`` (the app then
    generates it in the window, :func:`prepare_demo`); otherwise the dataset is generated
    here, with progress on the terminal (scripts).

    Raises
    ------
    LaunchError
        With a one-line message naming the problem.
    """
    from segscope.analysis.artefacts import (
        check_checkpoint,
        find_demo_classifiers,
        find_demo_model,
        read_classifier_folder,
    )
    from segscope.app.controller import PrecomputedEmbeddings, SourceError

    session = None
    if getattr(args, "session", None):
        session, saved = _session_sources(args.session)
        # Options given on the command line win over the session's own.
        args = argparse.Namespace(
            **{
                **{k: v for k, v in saved.items() if v is not None},
                **{k: v for k, v in vars(args).items() if v is not None},
            }
        )
    image = getattr(args, "image", None)
    segmentation = getattr(args, "segmentation", None)
    if bool(image) != bool(segmentation):
        raise LaunchError("give both --image and --segmentation (or neither, for the demo)")
    if getattr(args, "skeletons", None) and not image:
        raise LaunchError("--skeletons needs --image and --segmentation")

    precision = getattr(args, "precision", None) or "auto"
    batch_size = getattr(args, "batch_size", None)
    checkpoint = getattr(args, "checkpoint", None)
    model_path: Path | None
    if checkpoint:
        try:
            model_path = check_checkpoint(checkpoint)
        except (OSError, ValueError) as exc:
            raise LaunchError(f"--checkpoint: {exc}") from None
    else:
        model_path = find_demo_model()

    classifier_folder = getattr(args, "classifiers", None)
    classifiers = None
    try:
        folder = Path(classifier_folder) if classifier_folder else find_demo_classifiers()
        if folder is not None:
            classifiers = read_classifier_folder(folder)
    except (OSError, ValueError) as exc:
        raise LaunchError(
            f"--classifiers: {exc}" if classifier_folder else f"the demo classifiers in assets/ are unreadable: {exc}"
        ) from None

    precomputed = None
    if getattr(args, "embeddings", None):
        try:
            precomputed = PrecomputedEmbeddings.open(
                args.embeddings,
                coordinates=getattr(args, "embeddings_coordinates", "nm"),
                num_shards=getattr(args, "embeddings_shards", 10_000),
                bytewidth=getattr(args, "embeddings_bytewidth", 64),
            )
        except SourceError as exc:
            raise LaunchError(str(exc)) from None

    from segscope.app.controller import DataSource

    background, note = None, ""
    try:
        if image:
            source = DataSource.open(
                image,
                str(segmentation),
                getattr(args, "skeletons", None),
                skeleton_box_vox=getattr(args, "skeleton_box_vox", None),
            )
            # A SegScope dataset folder (the demo's, reopened from a session) keeps its context.
            folder = Path(str(segmentation)).parent if "://" not in str(segmentation) else None
        else:
            folder = _cached_demo_folder()
            if folder is None and defer_demo:
                return LaunchPlan(
                    None,
                    model_path,
                    True,
                    classifiers,
                    precomputed,
                    None,
                    "",
                    session,
                    True,
                    precision=precision,
                    batch_size=batch_size,
                )
            folder = folder or _demo_folder()
            source = DataSource.open_dataset_folder(folder)
        if folder is not None and (folder / "dataset.json").is_file():
            from segscope.analysis.provenance import find_demo_context

            context = find_demo_context(
                folder, encoder_path=model_path, classifiers_folder=None if classifiers is None else classifiers.folder
            )
            background, note = context.path, context.reason
    except (SourceError, OSError, ValueError) as exc:
        raise LaunchError(str(exc)) from None
    return LaunchPlan(
        source,
        model_path,
        True,
        classifiers,
        precomputed,
        background,
        note,
        session,
        precision=precision,
        batch_size=batch_size,
    )


def prepare_demo(window: MainWindow, plan: LaunchPlan, then: Callable[[], object] | None = None) -> Job:
    """Generate the demo dataset as a job while the window is up, then open it there.

    Progress shows in the job bar and the status bar; the dataset is opened, and its
    context table read, on the job's worker thread. Then the service opens the data, the
    plot gets its context points (PCA at once, UMAP when fitted) and ``then()`` runs (the
    crash-recovery offer). A failure is shown in the window's error banner. The job runs
    on a worker of its own, which the window shuts down when it closes.
    """
    from segscope.analysis.paths import user_cache_dir
    from segscope.app.controller import DataSource
    from segscope.app.jobs import JobRunner, JobUpdate

    def make():
        folder = yield from demo_job()
        source = DataSource.open_dataset_folder(folder)
        background = None
        from segscope.analysis.provenance import find_demo_context

        classifiers = plan.classifiers
        context = find_demo_context(
            folder,
            encoder_path=plan.model_path,
            classifiers_folder=None if classifiers is None else classifiers.folder,
        )
        if context.path is not None:
            from segscope.analysis.projection import read_embedding_table

            try:
                background = read_embedding_table(context.path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("context embeddings %s not shown: %s", context.path, exc)
        return source, background, context.reason

    def on_update(update: JobUpdate) -> None:
        if update.event == "progress" and update.progress is not None:
            progress = update.progress
            window.job_bar.show_task(
                f"Preparing the demo dataset (first run only, under a minute): {progress.message}",
                progress.done,
                progress.total,
            )
        elif update.event == "finished":
            window.job_bar.show_job(window.state.job)
            source, background, note = update.result
            window.service.open_source(source, precomputed=plan.precomputed)
            if background is not None and window.plot_dock is not None:
                window.plot_dock.plot.add_background(background)
            status_bar = window.statusBar()
            if note and status_bar is not None:
                status_bar.showMessage(f"No context embeddings in the plot: {note}", 15000)
            if then is not None:
                then()
        elif update.event == "failed":
            window.job_bar.show_job(window.state.job)
            window.state.show_error(
                f"Could not prepare the demo dataset in {user_cache_dir() / 'demo'}: {update.error}"
            )

    runner = JobRunner(post=window.invoker.post, name="segscope-demo")
    window.extra_runners.append(runner)
    window.job_bar.show_task("Preparing the demo dataset (first run only, under a minute)…")
    window.state.show_status(f"Preparing the demo dataset in {user_cache_dir() / 'demo'} (first run only)…")
    return runner.submit("demo dataset", make, on_update, kind="demo")


def _check_display() -> None:
    """Fail early, with a readable message, where Qt would abort for lack of a display."""
    if sys.platform.startswith("linux") and not os.environ.get("QT_QPA_PLATFORM"):
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise LaunchError(
                "no display found (DISPLAY/WAYLAND_DISPLAY unset); for a headless run set QT_QPA_PLATFORM=offscreen"
            )


def configure_qt_environment() -> None:
    """Environment QtWebEngine needs before the QApplication exists.

    Software-rendered (no GPU) machines are blocklisted for WebGL by Chromium, and
    Neuroglancer needs WebGL, so the blocklist is ignored unless the user set flags. Each
    setting below applies only where the user did not set the variable.

    - ``QTWEBENGINE_FORCE_USE_GBM=0``: under Xvfb, in VMs and over remote X, Chromium's GBM
      path fails ("Failed to get native pixmap due to dma_buf acquisition failure /
      Compositor returned null texture") and the 3-D view stays black; without GBM it
      draws (with a GPU too, at the cost of one copy per frame).
    - ``--log-level=3`` in ``QTWEBENGINE_CHROMIUM_FLAGS`` and ``QT_LOGGING_RULES`` for Qt
      WebEngine's own categories: Chromium's Vulkan, D-Bus and GPU notes stay off the
      terminal, unless ``-v`` (``SEGSCOPE_VERBOSE``).
    """
    verbose = os.environ.get("SEGSCOPE_VERBOSE", "") not in ("", "0")
    os.environ.setdefault("QTWEBENGINE_FORCE_USE_GBM", "0")
    os.environ.setdefault(
        "QTWEBENGINE_CHROMIUM_FLAGS", "--ignore-gpu-blocklist" + ("" if verbose else " --log-level=3")
    )
    if not verbose:
        os.environ.setdefault("QT_LOGGING_RULES", "qt.webenginecontext.info=false;qt.webenginecontext.debug=false")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Chromium refuses to start its sandbox as root (containers, CI); without this
        # the web view stays blank.
        os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")


#: Qt WebEngine's notes on machines without a GPU, Vulkan or D-Bus (every launch, harmless):
#: debug logging rather than the terminal.
QT_NOISE = re.compile(
    r"Sandboxing disabled|vulkan|GPU vendor|GBM|GPUInfo|native pixmap|null texture|Compositor returned|READ-usage",
    re.IGNORECASE,
)
_qt_message_handler = None  # kept alive: Qt holds only a pointer to it


def install_qt_message_filter() -> None:
    """Send Qt's messages to Python logging (``segscope.qt``), its known noise at debug level.

    Warnings other than :data:`QT_NOISE` still show (as ``WARNING segscope.qt: ...``).
    With ``-v`` (``SEGSCOPE_VERBOSE``) Qt prints everything itself, as before.
    """
    global _qt_message_handler
    if os.environ.get("SEGSCOPE_VERBOSE", "") not in ("", "0"):
        return
    from PyQt6.QtCore import QtMsgType, qInstallMessageHandler

    qt_log = logging.getLogger("segscope.qt")

    def handler(kind, context, message) -> None:
        text = str(message)
        if kind in (QtMsgType.QtDebugMsg, QtMsgType.QtInfoMsg) or QT_NOISE.search(text):
            level = logging.DEBUG
        elif kind == QtMsgType.QtWarningMsg:
            level = logging.WARNING
        else:
            level = logging.ERROR
        qt_log.log(level, "%s", text)

    _qt_message_handler = handler
    qInstallMessageHandler(handler)


def build_window(
    source: DataSource | None,
    model_path: Path | None,
    *,
    model_trained: bool = True,
    precision: str = "auto",
    spacing_nm: float | None = None,
    batch_size: int | None = None,
    classifiers: ClassifierSummary | None = None,
    precomputed: PrecomputedEmbeddings | None = None,
    background: Path | None = None,
    plot: bool = True,
    projection_backend=None,
    plot_options: dict | None = None,
) -> MainWindow:
    """Create the session, its service, the neuroglancer bridge, the window and the plot.

    A QApplication must exist. The model, then the classifiers, load on the worker
    thread after the window is built; without a model, segments can be selected but not
    embedded (unless ``precomputed`` holds them); without classifiers, nodes are not
    labelled. TensorFlow runs in a child process (see :mod:`segscope.app.compute_process` for why),
    and so does UMAP (:mod:`segscope.app.projection_process`: numba's compiler holds the GIL), unless
    ``projection_backend`` says otherwise. ``background`` is a context embedding table for
    the plot (the demo's); ``plot=False`` leaves the plot out; ``plot_options`` go to
    :meth:`~segscope.app.views.main_window.MainWindow.attach_plot` (``start_warm_up``...).
    ``batch_size`` is cutouts per forward call after a click's first (None: the engine's
    default). ``source`` None opens no data yet (the demo being generated, :func:`prepare_demo`).
    """
    from segscope.app.neuroglancer_bridge import NeuroglancerBridge
    from segscope.app.service import SessionService
    from segscope.app.session import Session
    from segscope.app.views.main_window import MainThreadInvoker, MainWindow

    session = Session()
    invoker = MainThreadInvoker()
    bridge = NeuroglancerBridge()
    bridge.attach(session.state)
    service = SessionService(session, post=invoker.post, viewer=bridge, spacing_nm=spacing_nm, batch_size=batch_size)
    window = MainWindow(session, service, bridge, invoker)
    invoker.setParent(window)
    if source is not None:
        service.open_source(source, precomputed=precomputed)
    if plot:
        if projection_backend is None:
            from segscope.app.projection_process import ProcessProjectionBackend

            projection_backend = ProcessProjectionBackend(on_event=service.report_child_event)
            window.owns_projection_backend = True
        options = dict(plot_options or {})
        options["scheduler_options"] = {**options.get("scheduler_options", {}), "backend": projection_backend}
        try:
            window.attach_plot(background=background, **options)
        except (OSError, ValueError, KeyError) as exc:  # an unreadable context table
            log.warning("context embeddings %s not shown: %s", background, exc)
            window.attach_plot(**options)
    service.load_model(model_path, trained=model_trained, precision=precision)
    service.load_classifiers(
        classifiers,
        ""
        if classifiers is not None
        else "No classifiers found in assets/classifiers and no --classifiers given: nodes are not labelled.",
    )
    return window


def run_app(args: argparse.Namespace) -> int:
    """Run the desktop app until its window closes; returns the exit status.

    With neither ``--image`` nor ``--segmentation`` it opens the demo dataset.
    """
    try:
        _check_display()
        plan = plan_launch(args, defer_demo=True)  # a first run generates the demo in the window
    except LaunchError as exc:
        print(f"segscope: error: {exc}", file=sys.stderr)
        return 2
    configure_qt_environment()
    import PyQt6.QtWebEngineWidgets  # noqa: F401  (must be imported before the QApplication)
    from PyQt6.QtWidgets import QApplication

    install_qt_message_filter()

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "segscope"])
    app.setApplicationName("SegScope")
    window = build_window(
        plan.source,
        plan.model_path,
        model_trained=plan.model_trained,
        precision=plan.precision,
        batch_size=plan.batch_size,
        classifiers=plan.classifiers,
        precomputed=plan.precomputed,
        background=plan.background,
    )
    if plan.background_note:
        status_bar = window.statusBar()
        if status_bar is not None:
            status_bar.showMessage(f"No context embeddings in the plot: {plan.background_note}", 15000)
    from segscope.app.session_file import AutosaveManager

    autosave = AutosaveManager()
    try:
        autosave.start()
        window.start_autosave(autosave)
    except OSError as exc:  # a read-only cache: run without autosave, and say so
        window.state.show_error(f"Autosave is off: {exc}")
    window.show()
    if plan.session is not None:
        window.service.open_session(plan.session)
    elif plan.demo_pending:
        prepare_demo(window, plan, then=window.offer_recovery)
    else:
        window.offer_recovery()
    status = app.exec()
    window.dispose()
    return int(status)
