"""TensorFlow in a child process: the encoder lives outside the GUI process.

Why a process and not a thread
------------------------------
Measured with TensorFlow 2.21 and PyQt6-WebEngine 6.11 on Debian 12 (Mesa 22.3): TF
exports thousands of LLVM symbols (``libtensorflow_framework.so.2``), and Chromium's
WebGL runs in-process on Mesa's ``llvmpipe``, which loads ``libLLVM-15``. With both in one
process the app segfaults, whichever loads first (TF initialising after a Neuroglancer page
rendered, or the page rendering after TF was imported). A GPU driver that compiles shaders
with LLVM (radeonsi) would meet the same clash. So the GUI process never imports
TensorFlow: a ``spawn``-ed child owns the encoder, reads its own cutouts through
TensorStore, and streams embeddings back over a pipe. As a bonus, TensorFlow never
competes with the Qt thread for the GIL.

:class:`ComputeProcess` is driven from the app's job worker thread; its methods are
generators that yield :class:`~segscope.analysis.progress.Progress` like every compute function.

Classifiers are Keras models too, so they live in the child beside the encoder: after
each embedding batch the child's :class:`SegmentPredictor` labels the new nodes with
their predicted subcompartment and re-estimates the segment's cell type and
out-of-distribution score, and the batch travels back with its predictions
(:class:`PredictedBatch`), so a node gets its colour the moment its embedding exists.

The pipe, the watchdog and restarts are :class:`segscope.app.child_process.ChildProcessRunner`'s.
A restarted child gets the last encoder and classifiers loaded before anything else (the
runner replays those requests), so the job after a crash runs without the user reloading.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis.classify.segments import (
    Predictions,
    SegmentPredictor,
    load_segment_predictor,
    predict_safely,
    predict_segment,
)
from segscope.analysis.progress import Progress
from segscope.app.child_process import (
    HANG_TIMEOUT_S,
    PING_INTERVAL_S,
    ChildProcessFailure,
    ChildProcessRunner,
    rebuild_error as rebuild_error,  # moved there; importable here too
    serve,
)

log = logging.getLogger(__name__)

#: Seconds between checks of the cancel flag while an embedding job waits for batches.
_POLL_S = 0.02


class ComputeProcessError(ChildProcessFailure):
    """The compute process died, stopped answering, was shut down, or failed unexpectedly."""


class JobCancelledError(RuntimeError):
    """The compute process stopped a job because it was asked to."""


# -- predictions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictedBatch:
    """One batch of embeddings with their predictions (a Progress payload).

    ``indices`` int64 ``[b]`` (positions in the centre order), ``embeddings`` float32
    ``[b, D]``; ``predictions`` is None when no classifier is loaded.
    """

    indices: np.ndarray
    embeddings: np.ndarray
    predictions: Predictions | None


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadEncoder:
    """Load the encoder at ``path`` (``.keras`` or SegCLR checkpoint) in ``precision``; run it on blank batches."""

    path: str
    warm_up_batches: tuple[int, ...]
    precision: str = "auto"


@dataclass(frozen=True)
class LoadClassifiers:
    """Load classifiers: ``entries`` of ``{"task", "path", "radius_nm"}``."""

    entries: tuple[dict, ...]


@dataclass(frozen=True)
class Embed:
    """Embed cutouts of segment ``segment_id`` around float64 ``[N, 3]`` ``centres_nm``."""

    image_url: str
    segmentation_url: str
    segment_id: int
    centres_nm: np.ndarray
    first_batch: int
    #: Cutouts per forward call after the first; None: the engine's default for the device.
    batch_size: int | None = None


@dataclass(frozen=True)
class Predict:
    """Classifier outputs for one segment's precomputed embeddings at once."""

    positions_nm: np.ndarray
    embeddings: np.ndarray


@dataclass(frozen=True)
class TrainClassifier:
    """Train a ``task`` classifier on labelled embedded nodes and write it into ``out_folder``.

    Node arrays (``[N]`` uint64 ``segment_ids`` / int64 ``node_ids``, float64 ``[N, 3]`` xyz
    ``positions_nm``, float32 ``[N, D]`` ``embeddings``) are every embedded node of the
    session (radius aggregation uses unlabelled neighbours too); ``labels`` ``[N]`` str is
    each node's effective manual label (``""``: unlabelled). ``base_folder``: the current
    classifiers folder, copied first so the other task is kept; ``current_path`` its
    ``task`` classifier (.npz), scored on the same labels.
    """

    task: str
    out_folder: str
    segment_ids: np.ndarray
    node_ids: np.ndarray
    positions_nm: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    radius_nm: float
    base_folder: str | None = None
    current_path: str | None = None
    current_radius_nm: float | None = None
    encoder: str | None = None
    encoder_sha256: str | None = None
    folds: int = 5
    max_epochs: int | None = None


@dataclass(frozen=True)
class SuggestNext:
    """Rank unlabelled nodes (``labelled`` bool ``[N]``) by the loaded ``task`` classifier's uncertainty.

    ``label_names`` (str ``[N]``, ``""`` unlabelled) lets the ranking favour the classes
    with the fewest labels (see :mod:`segscope.analysis.classify.active`).
    """

    task: str
    segment_ids: np.ndarray
    positions_nm: np.ndarray
    embeddings: np.ndarray
    labelled: np.ndarray
    count: int = 20
    label_names: np.ndarray | None = None


@dataclass(frozen=True)
class EmbedBatch:
    """Progress of an :class:`Embed`: one forward call's embeddings and predictions.

    ``indices`` int64 ``[b]`` into the centres, ``embeddings`` float32 ``[b, D]``; ``done``
    of ``total`` centres so far at ``rate`` cutouts per second.
    """

    indices: np.ndarray
    embeddings: np.ndarray
    done: int
    total: int
    rate: float | None
    predictions: Predictions | None


# -- the child -------------------------------------------------------------------------------


def verbose() -> bool:
    """Whether ``segscope -v`` asked for library chatter (``SEGSCOPE_VERBOSE``, inherited by children)."""
    return os.environ.get("SEGSCOPE_VERBOSE", "") not in ("", "0")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and find its devices without its start-up lines on the terminal.

    TensorFlow 2.21 prints its oneDNN and CUDA notes ("cudart_stub", "failed call to
    cuInit" on machines without a GPU) through absl before its log level applies, so
    ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them: file descriptor 2 goes to
    ``/dev/null`` while TensorFlow loads and enumerates its devices. Errors raised by the
    import still propagate. With ``-v`` (``SEGSCOPE_VERBOSE``) nothing is hidden. Sets
    ``TF_CPP_MIN_LOG_LEVEL`` (3) and absl's verbosity (errors) unless the user chose.
    """
    if verbose():
        return
    user_level = "TF_CPP_MIN_LOG_LEVEL" in os.environ
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # cuInit and its complaint happen here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    if not user_level:
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:  # pragma: no cover - absl comes with TensorFlow
            pass


def _child_main(conn) -> None:  # pragma: no cover - runs in the child process
    """Serve requests until told to stop or the parent goes away."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if not verbose() else "0")
    # TensorFlow is imported (quietly) on a thread of its own, so the reading thread serves
    # at once and a Stop at quit is not held up by the import. Requests wait for it: two
    # threads importing TensorFlow and Keras at once can deadlock on the import locks.
    imported = threading.Event()

    def import_quietly() -> None:
        try:
            import_tensorflow_quietly()
        except Exception:  # the first request that needs TensorFlow reports it
            log.debug("importing TensorFlow failed", exc_info=True)
        finally:
            imported.set()

    threading.Thread(target=import_quietly, name="segscope-tf-import", daemon=True).start()
    child = _ComputeChild()

    def handle(payload, context):
        imported.wait()
        return child.handle(payload, context)

    # TensorFlow work runs in order on one lane, and the reading thread stays free to
    # answer pings and take cancels while a batch runs. Training a classifier has a lane
    # of its own: it shares nothing with the encoder or the loaded classifiers (it writes
    # a new folder), and on the embedding lane a click made during a minute of training
    # waited for all of it. The two threads share the cores, so both run slower, but a
    # click is embedded at once.
    serve(conn, handle, lane_of=lambda payload: "train" if isinstance(payload, TrainClassifier) else "worker")


class _ComputeChild:  # pragma: no cover - runs in the child process
    def __init__(self):
        self.encoder = None
        self.predictor: SegmentPredictor | None = None
        self.volumes: dict[str, Any] = {}

    def handle(self, payload, context):
        if isinstance(payload, LoadEncoder):
            return self.load(payload.path, payload.warm_up_batches, payload.precision)
        if isinstance(payload, LoadClassifiers):
            return self.load_classifiers(payload.entries)
        if isinstance(payload, Embed):
            return self.embed(payload, context)
        if isinstance(payload, Predict):
            if self.predictor is None:
                return None
            return predict_segment(self.predictor, payload.positions_nm, payload.embeddings)
        if isinstance(payload, TrainClassifier):
            return train_in_child(payload, context)
        if isinstance(payload, SuggestNext):
            return self.suggest(payload)
        raise ValueError(f"unknown request {type(payload).__name__}")

    def load(self, path: str, warm_up_batches: Sequence[int], precision: str = "auto") -> dict:
        from segscope.analysis.encoder import open_encoder
        from segscope.analysis.inference import default_batch_size

        encoder = open_encoder(path, precision=precision)
        config = encoder.encoder_config
        for batch in sorted(set(warm_up_batches) | {default_batch_size(encoder)}):
            encoder.embed(np.zeros((batch, *config.input_size_vox), dtype=np.uint8))
        self.encoder = encoder  # only once it works: a failed load keeps the last encoder
        return {
            "name": config.name,
            "embedding_dim": int(encoder.embedding_dim),
            "input_size_vox": [int(v) for v in config.input_size_vox],
            "voxel_size_nm": [float(v) for v in config.voxel_size_nm],
            "precision": encoder.precision,
        }

    def load_classifiers(self, entries: Sequence[dict]) -> dict:
        predictor, loaded = load_segment_predictor(entries)
        self.predictor = predictor if predictor.active else None
        return {
            task: {
                "class_names": list(c.class_names),
                "num_features": int(c.num_features),
                "ood_threshold": float(c.ood_threshold),
                "config": c.config.name,
            }
            for task, c in loaded.items()
        }

    def suggest(self, request: SuggestNext) -> np.ndarray:
        """Indices (int64) of the nodes to label next, most useful first."""
        from collections import Counter

        from segscope.analysis.classify.active import suggest_next
        from segscope.analysis.classify.user_labels import aggregate_by_segment

        predictor = self.predictor
        classifier = None if predictor is None else getattr(predictor, request.task)
        if predictor is None or classifier is None:
            raise ValueError(f"no {request.task.replace('_', '-')} classifier is loaded; train or load one first")
        radius = float(getattr(predictor, f"{request.task}_radius_nm"))
        features = np.asarray(request.embeddings, dtype=np.float32)
        if radius > 0:
            features = aggregate_by_segment(request.segment_ids, request.positions_nm, features, radius)
        prediction = classifier.predict(features)
        counts = None
        if request.label_names is not None:
            counts = Counter(str(name) for name in request.label_names if name)
        return suggest_next(
            features,
            prediction.uncertainty,
            count=request.count,
            labelled=request.labelled,
            segment_ids=request.segment_ids,
            predicted=prediction.label_names,
            label_counts=counts,
        )

    def volume(self, url: str):
        from segscope.analysis.volume import open_volume

        if url not in self.volumes:
            self.volumes[url] = open_volume(url)
        return self.volumes[url]

    def embed(self, request: Embed, context) -> int:
        """Stream the segment's embeddings as progress; the number embedded."""
        from segscope.analysis.inference import stream_segment_embeddings
        from segscope.analysis.progress import RateMeter

        if self.encoder is None:
            raise ValueError("no model is loaded")
        centres_nm = request.centres_nm
        done = 0
        try:
            image = self.volume(request.image_url)
            segmentation = self.volume(request.segmentation_url)
            total = len(centres_nm)
            meter = RateMeter()
            predictor = self.predictor
            if predictor is not None:
                predictor.start(centres_nm)
            first = min(max(1, request.first_batch), total)
            # A small first call puts the nearest node on screen quickly; the rest run at
            # the engine's efficient batch size.
            for start, stop, batch_size in ((0, first, first), (first, total, request.batch_size)):
                if stop <= start:
                    continue
                part = stream_segment_embeddings(
                    self.encoder,
                    image,
                    segmentation,
                    request.segment_id,
                    centres_nm[start:stop],
                    batch_size=batch_size,
                    cancel=context.cancelled,
                )
                for report in part:
                    batch = report.payload
                    done += len(batch.indices)
                    indices = batch.indices + start
                    predictions = None if predictor is None else predict_safely(predictor, indices, batch.embeddings)
                    context.progress(EmbedBatch(indices, batch.embeddings, done, total, meter.rate(done), predictions))
                    if context.cancelled():
                        part.close()
                        raise JobCancelledError(f"cancelled after {done} cutouts")
        except JobCancelledError:
            raise
        except Exception as exc:
            if context.cancelled():  # the engine noticed the cancel first
                raise JobCancelledError(f"cancelled after {done} cutouts") from exc
            raise
        return done


def train_in_child(request: TrainClassifier, context) -> dict:  # pragma: no cover - runs in the child
    """Grouped cross-validation, training and the new classifiers folder; the report as a dict.

    Returns ``{"folder", "task", "radius_nm", "classes", "n_examples", "n_segments",
    "score" (Score.to_dict of the grouped CV), "current" (the current classifier's score
    on the same labels, or None), "epochs", "ood_threshold", "ood_threshold_from"}``. Progress payloads are
    :class:`~segscope.analysis.progress.Progress`; a cancel stops between epochs.
    """
    import shutil

    from segscope.analysis.classify import load_classifier
    from segscope.analysis.classify.user_labels import (
        cross_validate,
        labelled_examples,
        score_classifier,
        train_on_examples,
        write_classifier_folder,
    )

    labelled = np.flatnonzero(np.asarray(request.labels, dtype=str) != "")

    def examples_at(radius_nm: float):
        return labelled_examples(
            request.segment_ids,
            request.node_ids,
            request.embeddings,
            np.asarray(request.segment_ids)[labelled],
            np.asarray(request.node_ids)[labelled],
            np.asarray(request.labels, dtype=str)[labelled],
            xyz_nm=request.positions_nm,
            radius_nm=radius_nm,
        )

    def drive(generator):
        while True:
            if context.cancelled():
                generator.close()
                raise JobCancelledError("training cancelled")
            try:
                step = next(generator)
            except StopIteration as stop:
                return stop.value
            context.progress(step)

    examples = examples_at(request.radius_nm)
    current = None
    if request.current_path:
        radius = request.radius_nm if request.current_radius_nm is None else float(request.current_radius_nm)
        scored = score_classifier(
            load_classifier(request.current_path), examples if radius == request.radius_nm else examples_at(radius)
        )
        current = None if scored is None else scored.to_dict()
    options: dict = {} if request.max_epochs is None else {"max_epochs": int(request.max_epochs)}
    score = drive(cross_validate(examples, folds=request.folds, **options))
    classifier = drive(train_on_examples(examples, score, **options))
    out = Path(request.out_folder)
    if out.exists():
        shutil.rmtree(out)
    if request.base_folder and Path(request.base_folder).is_dir():
        shutil.copytree(request.base_folder, out)
    write_classifier_folder(
        out,
        request.task,
        classifier,
        radius_nm=examples.radius_nm,
        encoder=request.encoder,
        encoder_sha256=request.encoder_sha256,
        evaluation=score.to_dict(),
    )
    return {
        "folder": str(out),
        "task": request.task,
        "radius_nm": float(examples.radius_nm),
        "classes": list(examples.class_names),
        "n_examples": len(examples),
        "n_segments": int(np.unique(examples.segment_ids).size),
        "score": score.to_dict(),
        "current": current,
        "epochs": int(classifier.training_info.get("epochs_run", 0)),
        "ood_threshold": float(classifier.ood_threshold),
        "ood_threshold_from": classifier.training_info.get("ood_threshold_from"),
    }


# -- the parent ----------------------------------------------------------------------------

_DONE = object()  # ends an embed's queue of batches


class ComputeProcess:
    """A child process that holds the encoder and the classifiers.

    Drive it from one thread (the app's job worker), one generator at a time, and close or
    exhaust each generator before starting the next.

    The process starts at construction (``spawn``: a fresh interpreter that imports
    TensorFlow itself), so its start-up overlaps the GUI's. If it dies or hangs, the
    request in flight fails with :class:`ComputeProcessError` ("the compute process died
    (exit code -9); it restarts on the next request"), and the next request starts a new
    child into which the last encoder and classifiers loaded are loaded again first, so
    the next click embeds without the user doing anything.

    Parameters
    ----------
    start
        Start the child now rather than at the first request.
    ping_interval_s, hang_timeout_s
        The watchdog's ping period and the silence (seconds) after which a child with a
        request waiting is killed as hung; ``hang_timeout_s=None`` turns the watchdog off.
    on_event
        Called with a one-line message when the child died or hung, when a new one
        started, and when reloading the model into it failed; from a reader thread (post
        it to the GUI thread).
    """

    def __init__(
        self,
        *,
        start: bool = True,
        ping_interval_s: float = PING_INTERVAL_S,
        hang_timeout_s: float | None = HANG_TIMEOUT_S,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._runner = ChildProcessRunner(
            "compute",
            _child_main,
            start=start,
            ping_interval_s=ping_interval_s,
            hang_timeout_s=hang_timeout_s,
            on_event=on_event,
            error_type=ComputeProcessError,
            own_errors={"JobCancelledError": JobCancelledError},
        )
        self.loaded = False
        self.classifiers_loaded = False

    @property
    def alive(self) -> bool:
        return self._runner.alive

    @property
    def pid(self) -> int | None:
        """The current child's process id (None when there is none)."""
        return self._runner.pid

    @property
    def restarts(self) -> int:
        """Children started after the first one."""
        return self._runner.restarts

    def load(
        self, path: str | os.PathLike, *, warm_up_batches: Sequence[int] = (1, 2), precision: str = "auto"
    ) -> Generator[Progress, None, dict]:
        """Load an encoder (``.keras`` file or SegCLR checkpoint) in ``precision`` and warm it up.

        ``precision`` is resolved in the child (``"auto"``: bfloat16 where its CPU or GPU
        has it). Returns a dict with ``name``, ``embedding_dim``, ``input_size_vox``,
        ``voxel_size_nm`` and ``precision`` (the resolved one). Raises the child's error
        (ValueError, FileNotFoundError...). A child started after a crash loads it again
        before anything else.
        """
        yield Progress(0, 1, "steps", f"loading {os.fspath(path)}")
        request = LoadEncoder(os.fspath(path), tuple(int(b) for b in warm_up_batches), precision)
        summary = self._runner.request(request).result()
        self._runner.set_init("the encoder", request)
        self.loaded = True
        yield Progress(1, 1, "steps", "model ready")
        return summary

    def load_classifiers(self, entries: Sequence[dict]) -> Generator[Progress, None, dict]:
        """Load classifiers in the child process.

        ``entries`` are ``{"task": "compartment" or "cell_type", "path": .npz file,
        "radius_nm": aggregation radius}``.

        Returns ``{task: {"class_names", "num_features", "ood_threshold", "config"}}``.
        Raises the child's error (FileNotFoundError, ValueError...). A child started after
        a crash loads them again before anything else.
        """
        yield Progress(0, 1, "steps", f"loading {len(entries)} classifiers")
        request = LoadClassifiers(tuple(dict(entry) for entry in entries))
        summary = self._runner.request(request).result()
        self._runner.set_init("the classifiers", request)
        self.classifiers_loaded = bool(summary)
        yield Progress(1, 1, "steps", "classifiers ready")
        return summary

    def predict(self, positions_nm: np.ndarray, embeddings: np.ndarray) -> Predictions | None:
        """Classifier outputs for one segment's nodes (``[N, 3]`` xyz nm, ``[N, D]``).

        Blocks until the child answers (call from the worker thread); None when no
        classifier is loaded.
        """
        request = Predict(np.asarray(positions_nm, dtype=np.float64), np.asarray(embeddings, dtype=np.float32))
        return self._runner.request(request).result()

    def embed(
        self,
        image_url: str,
        segmentation_url: str,
        segment_id: int,
        centres_nm: np.ndarray,
        *,
        cancel: Callable[[], bool] | None = None,
        first_batch: int = 2,
        batch_size: int | None = None,
    ) -> Generator[Progress, None, int]:
        """Embed cutouts around ``centres_nm`` (``[N, 3]`` xyz nm) of one segment.

        The first ``first_batch`` cutouts go in one small forward call (the nearest node on
        screen quickly), the rest ``batch_size`` at a time (None: the engine's default for the
        device; smaller calls use less GPU memory and let a cancel stop sooner).

        Yields a Progress per forward call whose payload is a :class:`PredictedBatch`
        (indices into ``centres_nm``, with predictions when classifiers are loaded);
        returns the number embedded. Raises :class:`JobCancelledError` when ``cancel`` fired
        before the end, :class:`ComputeProcessError` when the child died or hung, or the
        child's error.
        """
        centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
        # Batches arrive on the runner's reader thread; _streamed hands them on in order, on
        # the caller's thread, and tells the child to stop when this generator is closed
        # early (the job runner cancels between batches).
        stream = self._streamed(
            Embed(
                image_url,
                segmentation_url,
                int(segment_id),
                centres,
                int(first_batch),
                None if batch_size is None else int(batch_size),
            ),
            cancel,
        )
        try:
            while True:
                try:
                    batch = next(stream)
                except StopIteration as stop:
                    return int(stop.value)
                yield Progress(
                    batch.done,
                    batch.total,
                    "cutouts",
                    f"segment {segment_id}",
                    rate=batch.rate,
                    payload=PredictedBatch(np.asarray(batch.indices), np.asarray(batch.embeddings), batch.predictions),
                )
        finally:
            stream.close()

    def train_classifier(
        self, request: TrainClassifier, *, cancel: Callable[[], bool] | None = None
    ) -> Generator[Progress, None, dict]:
        """Run :class:`TrainClassifier` in the child; yields its progress, returns its report."""
        return (yield from self._streamed(request, cancel))

    def suggest_next(self, request: SuggestNext) -> np.ndarray:
        """Indices of :class:`SuggestNext`'s nodes to label next (blocks; call from a worker)."""
        return np.asarray(self._runner.request(request).result(), dtype=np.int64)

    def _streamed(self, request, cancel: Callable[[], bool] | None) -> Generator[Any, None, Any]:
        """Send ``request``; yield the child's progress payloads in order, return its result.

        Polls ``cancel`` while waiting and tells the child to stop when it says so, or when
        this generator is closed before the result.
        """
        updates: queue.Queue = queue.Queue()
        call = self._runner.request(request, on_progress=updates.put)
        call.add_done_callback(lambda _: updates.put(_DONE))
        cancelled = finished = False
        try:
            while True:
                try:
                    step = updates.get(timeout=_POLL_S)
                except queue.Empty:
                    if not cancelled and cancel is not None and cancel():
                        self._runner.cancel(call)
                        cancelled = True
                    continue
                if step is _DONE:
                    finished = True
                    return call.result()
                yield step
        finally:
            if not finished:
                self._runner.cancel(call)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit; terminate it if it does not within ``timeout`` s."""
        self._runner.shutdown(timeout)

    shutdown = stop
