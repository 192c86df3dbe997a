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
generators that yield :class:`~analysis.progress.Progress` like every compute function.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
from typing import Any, Callable, Generator, Sequence

import numpy as np

from analysis.progress import Progress

log = logging.getLogger(__name__)

#: Seconds to wait for the child between checks of the cancel flag and its liveness.
_POLL_S = 0.02


class ComputeProcessError(RuntimeError):
    """The compute process died or answered out of protocol."""


class JobCancelledError(RuntimeError):
    """The compute process stopped a job because it was asked to."""


_ERROR_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError, "KeyError": KeyError, "FileNotFoundError": FileNotFoundError,
    "PermissionError": PermissionError, "MemoryError": MemoryError,
    # SegScope's own errors subclass ValueError / KeyError; keep their meaning.
    "VolumeError": ValueError, "DatasetError": ValueError, "CheckpointMismatchError": ValueError,
    "SegmentNotFoundError": KeyError,
}


def _rebuild_error(type_name: str, message: str) -> Exception:
    """The child's exception as the nearest built-in type (its message kept)."""
    if type_name in _ERROR_TYPES:
        return _ERROR_TYPES[type_name](message)
    return ComputeProcessError(f"{type_name}: {message}")


# -- the child -------------------------------------------------------------------------------


def _child_main(conn) -> None:  # pragma: no cover - runs in the child process
    """Serve requests until told to stop or the parent goes away."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    server = _ChildServer(conn)
    server.serve()


class _ChildServer:  # pragma: no cover - runs in the child process
    def __init__(self, conn):
        self.conn = conn
        self.encoder = None
        self.volumes: dict[str, Any] = {}
        self.backlog: collections.deque = collections.deque()

    def receive(self):
        return self.backlog.popleft() if self.backlog else self.conn.recv()

    def serve(self) -> None:
        while True:
            try:
                message = self.receive()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "stop":
                return
            if kind == "cancel":
                continue  # a cancel for a job that already ended
            try:
                if kind == "load":
                    self.conn.send(("loaded", self.load(*message[1:])))
                elif kind == "embed":
                    self.embed(*message[1:])
                else:
                    self.conn.send(("error", None, "ValueError", f"unknown request {kind!r}"))
            except (EOFError, OSError, BrokenPipeError):
                return

    def load(self, path: str, warm_up_batches: Sequence[int]) -> dict:
        try:
            from analysis.encoder import open_encoder

            encoder = open_encoder(path)
            config = encoder.encoder_config
            from analysis.inference import default_batch_size

            for batch in sorted(set(warm_up_batches) | {default_batch_size(encoder)}):
                encoder.embed(np.zeros((batch, *config.input_size_vox), dtype=np.uint8))
        except Exception as exc:
            return {"error": (type(exc).__name__, str(exc))}
        self.encoder = encoder
        return {
            "name": config.name,
            "embedding_dim": int(encoder.embedding_dim),
            "input_size_vox": [int(v) for v in config.input_size_vox],
            "voxel_size_nm": [float(v) for v in config.voxel_size_nm],
        }

    def volume(self, url: str):
        from analysis.volume import open_volume

        if url not in self.volumes:
            self.volumes[url] = open_volume(url)
        return self.volumes[url]

    def cancelled(self, token: int) -> bool:
        """Read pending messages; True once a cancel for ``token`` arrived."""
        found = False
        while self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cancel" and message[1] == token:
                found = True
            elif message[0] != "cancel":
                self.backlog.append(message)
        return found

    def embed(self, token: int, image_url: str, segmentation_url: str, segment_id: int,
              centres_nm: np.ndarray, first_batch: int) -> None:
        from analysis.inference import stream_segment_embeddings
        from analysis.progress import RateMeter

        if self.encoder is None:
            self.conn.send(("error", token, "ValueError", "no model is loaded"))
            return
        done = 0
        cancelled = [False]

        def is_cancelled() -> bool:
            if not cancelled[0] and self.cancelled(token):
                cancelled[0] = True
            return cancelled[0]

        try:
            image = self.volume(image_url)
            segmentation = self.volume(segmentation_url)
            total = len(centres_nm)
            meter = RateMeter()
            first = min(max(1, first_batch), total)
            # A small first call puts the nearest node on screen quickly; the rest run at
            # the engine's efficient batch size.
            for start, stop, batch_size in ((0, first, first), (first, total, None)):
                if stop <= start:
                    continue
                part = stream_segment_embeddings(
                    self.encoder, image, segmentation, segment_id, centres_nm[start:stop],
                    batch_size=batch_size, cancel=is_cancelled)
                for report in part:
                    batch = report.payload
                    done += len(batch.indices)
                    self.conn.send(("batch", token, batch.indices + start, batch.embeddings, done, total,
                                    meter.rate(done)))
                    if is_cancelled():
                        part.close()
                        self.conn.send(("cancelled", token, done))
                        return
        except Exception as exc:
            if cancelled[0]:
                self.conn.send(("cancelled", token, done))
            else:
                self.conn.send(("error", token, type(exc).__name__, str(exc)))
            return
        self.conn.send(("done", token, done))


# -- the parent ----------------------------------------------------------------------------


class ComputeProcess:
    """A child process that holds the encoder.

    Not thread-safe: drive it from one thread (the app's job worker), one generator at a
    time, and close or exhaust each generator before starting the next.

    The process starts at construction (``spawn``: a fresh interpreter that imports
    TensorFlow itself), so its start-up overlaps the GUI's.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child_main, args=(child_conn,),
                                        name="segscope-compute", daemon=True)
        self._process.start()
        child_conn.close()
        self._tokens = itertools.count(1)
        self.loaded = False

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (OSError, BrokenPipeError) as exc:
            raise ComputeProcessError(f"the compute process is gone ({exc})") from exc

    def _receive(self, cancel: Callable[[], bool] | None = None, on_cancel: Callable[[], None] | None = None):
        """Wait for the next message, checking the child's liveness and the cancel flag."""
        while not self._conn.poll(_POLL_S):
            if cancel is not None and on_cancel is not None and cancel():
                on_cancel()
                on_cancel = None
            if not self._process.is_alive():
                raise ComputeProcessError(
                    f"the compute process exited unexpectedly (exit code {self._process.exitcode})")
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ComputeProcessError(f"the compute process is gone ({exc})") from exc

    def load(self, path: str | os.PathLike, *, warm_up_batches: Sequence[int] = (1, 2)
             ) -> Generator[Progress, None, dict]:
        """Load an encoder (``.keras`` file or SegCLR checkpoint) and warm it up.

        Returns a dict with ``name``, ``embedding_dim``, ``input_size_vox`` and
        ``voxel_size_nm``. Raises the child's error (ValueError, FileNotFoundError...).
        """
        yield Progress(0, 1, "steps", f"loading {os.fspath(path)}")
        self._send(("load", os.fspath(path), list(warm_up_batches)))
        reply = self._receive()
        while reply[0] != "loaded":  # late messages of an abandoned embedding job
            reply = self._receive()
        summary = reply[1]
        if "error" in summary:
            raise _rebuild_error(*summary["error"])
        self.loaded = True
        yield Progress(1, 1, "steps", "model ready")
        return summary

    def embed(self, image_url: str, segmentation_url: str, segment_id: int, centres_nm: np.ndarray, *,
              cancel: Callable[[], bool] | None = None, first_batch: int = 2
              ) -> Generator[Progress, None, int]:
        """Embed cutouts around ``centres_nm`` (``[N, 3]`` xyz nm) of one segment.

        Yields a Progress per forward call whose payload is an
        :class:`analysis.inference.EmbeddingBatch` (indices into ``centres_nm``); returns
        the number embedded. Raises :class:`JobCancelledError` when ``cancel`` fired
        before the end, or the child's error.
        """
        from analysis.inference import EmbeddingBatch

        centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
        token = next(self._tokens)
        finished = False

        def send_cancel() -> None:
            self._send(("cancel", token))

        self._send(("embed", token, image_url, segmentation_url, int(segment_id), centres, int(first_batch)))
        try:
            while True:
                message = self._receive(cancel, send_cancel)
                if len(message) < 2 or message[1] != token:
                    continue  # a late message of an abandoned job
                kind = message[0]
                if kind == "batch":
                    _, _, indices, embeddings, done, total, rate = message
                    yield Progress(done, total, "cutouts", f"segment {segment_id}", rate=rate,
                                   payload=EmbeddingBatch(np.asarray(indices), np.asarray(embeddings)))
                elif kind == "done":
                    finished = True
                    return int(message[2])
                elif kind == "cancelled":
                    finished = True
                    raise JobCancelledError(f"cancelled after {message[2]} cutouts")
                elif kind == "error":
                    finished = True
                    raise _rebuild_error(message[2], message[3])
        finally:
            if not finished:
                # Closed early (the job runner cancels between batches): tell the child to
                # stop; its remaining messages carry this token and are skipped.
                try:
                    send_cancel()
                except ComputeProcessError:
                    pass

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit; terminate it if it does not within ``timeout`` s."""
        if self._process.is_alive():
            try:
                self._conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            self._process.join(timeout)
            if self._process.is_alive():
                log.warning("compute process did not stop in %.0f s; terminating it", timeout)
                self._process.terminate()
                self._process.join(2.0)
        self._conn.close()
