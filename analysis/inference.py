"""Streaming SegCLR inference: cutouts are read on a helper thread while the model runs.

:func:`stream_segment_embeddings` is the entry point for one segment: it cuts masked EM
around each centre (:func:`segscope.analysis.volume.iter_cutout_batches`, shared-block reads) one
batch ahead of the model, and yields a :class:`~segscope.analysis.progress.Progress` per batch whose
``payload`` is an :class:`EmbeddingBatch`, so embeddings can be shown as they arrive. The
generator returns all embeddings, float32 ``[N, D]`` in the order of the centres.

The engine runs on the GPU when the Keras backend sees one, else on the CPU; it stops
between batches when cancelled (raising :class:`InferenceCancelled` with the partial
result), and halves the batch and carries on when the device runs out of memory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis.progress import Progress, RateMeter

logger = logging.getLogger(__name__)

#: FLOPs one forward call should cost, by device: large enough to amortise per-call
#: overhead, small enough that the first embeddings show up quickly (CPU) and that the
#: activations fit in memory (GPU; out-of-memory halving covers misjudgements).
_BATCH_FLOP_BUDGET = {"CPU": 4e9, "GPU": 2.5e12}
_BATCH_CAP = {"CPU": 64, "GPU": 512}


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of one batch, delivered as a progress payload.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 ``[b]``: positions of these cutouts in the caller's centre list.
    embeddings : numpy.ndarray
        float32 ``[b, D]``.
    """

    indices: np.ndarray
    embeddings: np.ndarray


class InferenceCancelled(RuntimeError):
    """Raised by the streaming engine when cancelled between batches.

    Attributes
    ----------
    done : int
        Cutouts embedded before the cancel.
    embeddings : numpy.ndarray
        float32 ``[N, D]``; rows not computed are NaN.
    computed : numpy.ndarray
        bool ``[N]``: which rows hold results.
    """

    def __init__(self, done: int, embeddings: np.ndarray, computed: np.ndarray):
        super().__init__(f"inference cancelled after {done} of {len(embeddings)} cutouts")
        self.done = done
        self.embeddings = embeddings
        self.computed = computed


# -- devices and precision ---------------------------------------------------------------


def available_device() -> str:
    """``"GPU"`` when the Keras backend sees a GPU, else ``"CPU"``."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    if backend == "jax":
        import jax

        return "GPU" if any(d.platform == "gpu" for d in jax.devices()) else "CPU"
    if backend == "torch":
        import torch

        return "GPU" if torch.cuda.is_available() else "CPU"
    return "CPU"


def _resolve_device(device: str) -> str:
    found = available_device()
    wanted = device.upper()
    if wanted == "AUTO":
        return found
    if wanted not in ("CPU", "GPU"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if wanted == "GPU" and found != "GPU":
        raise ValueError("device 'gpu' requested but the Keras backend sees no GPU")
    return wanted


def default_batch_size(encoder, device: str = "auto") -> int:
    """Cutouts per forward call for ``encoder`` on ``device`` (see ``_BATCH_FLOP_BUDGET``).

    Reduced precision gets twice the FLOP budget: a call costs about the same time as a
    float32 call of half the size, and larger calls use the CPU better.
    """
    from segscope.analysis.encoder import flops_per_cutout

    resolved = _resolve_device(device)
    flops = flops_per_cutout(encoder.encoder_config)
    budget = _BATCH_FLOP_BUDGET[resolved] * (1 if getattr(encoder, "precision", "float32") == "float32" else 2)
    return int(np.clip(budget // flops, 1, _BATCH_CAP[resolved]))


#: CPU feature flags (Linux ``/proc/cpuinfo``) of native bfloat16 matrix arithmetic.
BFLOAT16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no ``cpuinfo``."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags; the first will do
            return frozenset(value.split())
    return frozenset()


def resolve_precision(precision: str = "auto", device: str = "auto") -> str:
    """The precision an encoder should compute in: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    ``"auto"`` is bfloat16 on a GPU and on a CPU with AMX or AVX-512 BF16 (flags
    ``amx_bf16``/``avx512_bf16``; oneDNN then runs bfloat16 convolutions at about twice the
    float32 rate, 7x with AMX), float32 elsewhere: without those instructions bfloat16 is
    emulated and slower than float32. Other values are checked and returned.

    Raises
    ------
    ValueError
        An unknown precision.
    """
    from segscope.analysis.encoder.config import normalise_precision

    if str(precision).lower() != "auto":
        return normalise_precision(precision)
    if _resolve_device(device) == "GPU":
        return "bfloat16"
    found = cpu_flags() & BFLOAT16_CPU_FLAGS
    return "bfloat16" if found else "float32"


# Reduced-precision copies, built once per (encoder, precision); weights are refreshed on use.
_TWINS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def mixed_precision_twin(encoder, policy: str = "mixed_float16"):
    """A copy of ``encoder`` computing in another precision, holding its current weights.

    ``policy`` is a precision (``"float32"``, ``"bfloat16"``, ``"float16"``) or a Keras
    policy name (``"mixed_float16"``, ``"mixed_bfloat16"``); see
    :meth:`~segscope.analysis.encoder.model.SegClrEncoder.with_precision`. ``encoder``
    itself is returned when it already computes in that precision.

    The copy is cached per encoder and precision (building the full model takes seconds);
    its weights are copied again on every call so it never runs stale weights.
    """
    from segscope.analysis.encoder.config import normalise_precision

    precision = normalise_precision(policy)
    if precision == encoder.precision:
        return encoder
    twins = _TWINS.setdefault(encoder, {})
    twin = twins.get(precision)
    if twin is None:
        twin = twins[precision] = encoder.with_precision(precision)
    else:
        twin.set_weights(encoder.get_weights())
    return twin


@dataclass(frozen=True)
class PrecisionReport:
    """Difference between reduced-precision and float32 embeddings of the same cutouts.

    ``max_abs`` and ``mean_abs`` are absolute; ``max_rel`` is ``max_abs`` over the largest
    float32 magnitude; ``min_cosine`` is the worst per-cutout cosine similarity.
    """

    policy: str
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cosine: float


def compare_embeddings(reference: np.ndarray, reduced: np.ndarray, policy: str = "") -> PrecisionReport:
    """A :class:`PrecisionReport` of ``reduced`` against ``reference`` (both ``[N, D]``)."""
    reference = np.asarray(reference, dtype=np.float64)
    reduced = np.asarray(reduced, dtype=np.float64)
    diff = np.abs(reduced - reference)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(reduced, axis=1)
    cosine = np.sum(reference * reduced, axis=1) / np.where(norms > 0, norms, 1.0)
    scale = float(np.abs(reference).max()) or 1.0
    return PrecisionReport(
        policy, float(diff.max()), float(diff.mean()), float(diff.max()) / scale, float(cosine.min())
    )


def measure_mixed_precision_error(
    encoder, cutouts: np.ndarray, policy: str = "mixed_float16", batch_size: int | None = None
) -> PrecisionReport:
    """Embed ``cutouts`` (uint8 ``[B, x, y, z]``) in float32 and in ``policy``; compare.

    ``encoder`` may compute in any precision: the float32 side is ``encoder`` itself or
    its float32 twin, the other side its ``policy`` twin (see :func:`mixed_precision_twin`).
    """
    reference = mixed_precision_twin(encoder, "float32").embed(cutouts, batch_size=batch_size)
    reduced = mixed_precision_twin(encoder, policy).embed(cutouts, batch_size=batch_size)
    return compare_embeddings(reference, reduced, policy)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (TensorFlow or JAX/XLA)."""
    if isinstance(exc, MemoryError):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "ResourceExhaustedError" in names:
        return True
    # JAX raises XlaRuntimeError (a RuntimeError) whose message starts RESOURCE_EXHAUSTED.
    return ("XlaRuntimeError" in names or "JaxRuntimeError" in names) and "RESOURCE_EXHAUSTED" in str(exc)


# -- the engine ------------------------------------------------------------------------


class _Predictor:
    """Runs forward calls on the chosen device.

    Ragged batches are padded on JAX, whose jit would otherwise compile the model again
    for every new batch size.
    """

    def __init__(self, encoder, device: str, predict: Callable[[np.ndarray], np.ndarray] | None):
        import keras

        self.device = device
        self.backend = keras.backend.backend()
        self._predict = predict or encoder.embed
        self._pad = predict is None and self.backend == "jax"

    def __call__(self, cutouts: np.ndarray, batch_size: int) -> np.ndarray:
        n = len(cutouts)
        if self._pad and n < batch_size:
            padding = np.zeros((batch_size - n, *cutouts.shape[1:]), dtype=cutouts.dtype)
            cutouts = np.concatenate([cutouts, padding])
        if self.backend == "tensorflow":
            import tensorflow as tf

            with tf.device(f"/{self.device}:0"):
                out = self._predict(cutouts)
        else:
            out = self._predict(cutouts)
        return np.asarray(out, dtype=np.float32)[:n]


class _Prefetcher:
    """Iterates ``batches`` on a daemon thread, ``depth`` batches ahead of the consumer."""

    _DONE = object()

    def __init__(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(iter(batches),), name="segscope-cutout-reader", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        # Empty the queue so a reader blocked on put() sees the stop flag promptly.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.warning("cutout reader thread did not stop within 10 s")


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError(f"cancel must be a threading.Event or a callable, got {type(cancel).__name__}")


def stream_embeddings(
    encoder,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    total: int,
    *,
    batch_size: int | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    prefetch: int = 2,
    device: str = "auto",
    mixed_precision: bool | str = False,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
    message: str = "embedding",
) -> Generator[Progress, None, np.ndarray]:
    """Embed cutouts from an iterator of batches, reading ahead on a helper thread.

    Parameters
    ----------
    encoder
        A :class:`~segscope.analysis.encoder.model.SegClrEncoder`.
    batches
        Iterable of ``(indices int [b], cutouts uint8 [b, x, y, z])``; indices in ``[0, total)``.
        It is consumed on a helper thread.
    total
        Number of cutouts in all (rows of the result).
    batch_size
        Cutouts per forward call (default :func:`default_batch_size`); halved on
        out-of-memory errors down to 1.
    cancel
        ``threading.Event`` or callable; checked between forward calls.
    prefetch
        Batches read ahead of the model.
    device
        ``"auto"`` (GPU when available), ``"cpu"`` or ``"gpu"``.
    mixed_precision
        ``False`` (run ``encoder`` as it is), ``True`` (``"float16"``) or a precision or
        Keras policy name: run :func:`mixed_precision_twin` of ``encoder`` instead. Loading
        the encoder in the wanted precision (``open_encoder(..., precision=...)``) is
        cheaper; see :func:`measure_mixed_precision_error` for the effect on embeddings.
    predict
        Replaces the forward call (``uint8 [b, ...] -> float [b, D]``); for tests.

    Yields
    ------
    Progress
        One per forward call: ``done``/``total`` cutouts, ``rate`` in cutouts/s,
        ``payload`` an :class:`EmbeddingBatch`.

    Returns
    -------
    numpy.ndarray
        float32 ``[total, D]``.

    Raises
    ------
    InferenceCancelled
        When ``cancel`` fires; carries the partial result.
    """
    resolved = _resolve_device(device)
    if mixed_precision:
        policy = "float16" if mixed_precision is True else str(mixed_precision)
        model = mixed_precision_twin(encoder, policy)
        if resolved == "CPU" and model.precision != "float32" and resolve_precision("auto", resolved) == "float32":
            logger.warning("%s on a CPU without bfloat16 instructions is usually slower than float32", policy)
    else:
        model = encoder
    compute_batch = int(batch_size or default_batch_size(encoder, resolved))
    if compute_batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    forward = _Predictor(model, resolved, predict)
    is_cancelled = _cancel_check(cancel)
    embeddings = np.full((total, encoder.embedding_dim), np.nan, dtype=np.float32)
    computed = np.zeros(total, dtype=bool)
    done = 0
    meter = RateMeter()
    if total == 0:
        return embeddings
    reader = _Prefetcher(batches, prefetch)
    try:
        for indices, cutouts in reader:
            indices = np.asarray(indices, dtype=np.int64)
            start = 0
            while start < len(indices):
                if is_cancelled():
                    raise InferenceCancelled(done, embeddings, computed)
                chunk = slice(start, start + compute_batch)
                try:
                    result = forward(cutouts[chunk], compute_batch)
                except Exception as exc:
                    if not is_out_of_memory(exc) or compute_batch == 1:
                        raise
                    compute_batch //= 2
                    logger.warning("out of memory on %s; batch size halved to %d", resolved, compute_batch)
                    continue
                chunk_indices = indices[chunk]
                embeddings[chunk_indices] = result
                computed[chunk_indices] = True
                done += len(chunk_indices)
                start += len(chunk_indices)
                yield Progress(
                    done,
                    total,
                    "cutouts",
                    message,
                    rate=meter.rate(done),
                    payload=EmbeddingBatch(chunk_indices, result),
                )
    finally:
        reader.close()
    if done != total or not computed.all():
        raise ValueError(f"the cutout batches covered {int(computed.sum())} of {total} cutouts")
    return embeddings


def stream_segment_embeddings(
    encoder,
    image,
    segmentation,
    segment_id: int,
    centres_nm: np.ndarray,
    *,
    batch_size: int | None = None,
    read_batch_size: int | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    prefetch: int = 2,
    device: str = "auto",
    mixed_precision: bool | str = False,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Stream the embeddings of one segment's cutouts.

    Parameters
    ----------
    image, segmentation
        :class:`segscope.analysis.volume.Volume` pair at the same voxel size, whose voxel size
        divides the encoder's (``encoder.encoder_config.voxel_size_nm``) by integers.
    segment_id
        The segment whose masked EM is embedded.
    centres_nm
        ``[N, 3]`` cutout centres (x, y, z nm), in the order results should arrive
        (nearest to the user's click first).
    read_batch_size
        Cutouts per read (default: ``batch_size``); the reader thread stays one read ahead.
    encoder, batch_size, cancel, prefetch, device, mixed_precision, predict
        As in :func:`stream_embeddings`.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, D]`` in the order of ``centres_nm``.
    """
    from segscope.analysis.volume import iter_cutout_batches

    config = encoder.encoder_config
    centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
    downsample = config.downsample_from(image.voxel_size_nm)
    resolved = _resolve_device(device)
    compute_batch = int(batch_size or default_batch_size(encoder, resolved))
    batches = iter_cutout_batches(
        image,
        segmentation,
        segment_id,
        centres,
        read_batch_size or compute_batch,
        config.input_size_vox,
        downsample=downsample,
    )
    return (
        yield from stream_embeddings(
            encoder,
            batches,
            len(centres),
            batch_size=compute_batch,
            cancel=cancel,
            prefetch=prefetch,
            device=resolved,
            mixed_precision=mixed_precision,
            predict=predict,
            message=f"segment {int(segment_id)}",
        )
    )


def naive_segment_embeddings(encoder, image, segmentation, segment_id: int, centres_nm: np.ndarray) -> np.ndarray:
    """Baseline for benchmarks: read one cutout, run one forward call, repeat.

    Returns float32 ``[N, D]``.
    """
    from segscope.analysis.volume import cut_masked

    config = encoder.encoder_config
    downsample = config.downsample_from(image.voxel_size_nm)
    centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
    out = np.zeros((len(centres), encoder.embedding_dim), dtype=np.float32)
    for i, centre in enumerate(centres):
        cutout = cut_masked(image, segmentation, segment_id, centre[None], config.input_size_vox, downsample=downsample)
        out[i] = encoder.embed(cutout)[0]
    return out


@dataclass
class NodeEmbeddings:
    """Embeddings of skeleton nodes of many segments (one row per node).

    Attributes
    ----------
    segment_ids : uint64 ``[N]``
    node_ids : int64 ``[N]``  (index into the segment's skeleton nodes)
    xyz_nm : float64 ``[N, 3]`` node positions, x, y, z nm
    embeddings : float32 ``[N, D]``
    """

    segment_ids: np.ndarray
    node_ids: np.ndarray
    xyz_nm: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.segment_ids)

    def subset(self, rows: np.ndarray) -> NodeEmbeddings:
        """The rows selected by a boolean mask or index array."""
        return NodeEmbeddings(self.segment_ids[rows], self.node_ids[rows], self.xyz_nm[rows], self.embeddings[rows])

    def aggregated(self, radius_nm: float) -> np.ndarray:
        """Per node, the mean embedding of its segment's nodes within ``radius_nm`` (float32 ``[N, D]``)."""
        from segscope.analysis.aggregate import aggregate_embeddings

        out = np.empty_like(self.embeddings)
        order = np.argsort(self.segment_ids, kind="stable")
        _ids, starts = np.unique(self.segment_ids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for start, end in zip(starts, ends):
            rows = order[start:end]
            out[rows] = aggregate_embeddings(self.xyz_nm[rows], self.embeddings[rows], radius_nm)
        return out


def stream_node_embeddings(
    encoder,
    image,
    segmentation,
    segments: Sequence[tuple[int, np.ndarray, np.ndarray]],
    *,
    batch_size: int | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    device: str = "auto",
    cut_workers: int | None = None,
) -> Generator[Progress, None, NodeEmbeddings]:
    """Embed the nodes of many segments, batching cutouts across segments.

    Small segments (a few nodes each) fill shared batches instead of each paying a forward
    call of its own. Cutouts are cut batch by batch on the reader thread, so peak memory
    depends on the batch size, not on the number of nodes.

    Parameters
    ----------
    segments
        ``(segment_id, node_ids int [n], centres_nm float [n, 3])`` per segment.
    cut_workers
        Threads cutting batches at once (default: the CPU count, at most 4).

    Returns
    -------
    NodeEmbeddings
        Rows in the order of ``segments`` and their nodes.
    """
    from segscope.analysis.volume import cut_masked

    config = encoder.encoder_config
    downsample = config.downsample_from(image.voxel_size_nm)
    resolved = _resolve_device(device)
    compute_batch = int(batch_size or default_batch_size(encoder, resolved))
    seg_col = (
        np.concatenate([np.full(len(n), int(s), dtype=np.uint64) for s, n, _ in segments])
        if segments
        else np.zeros(0, np.uint64)
    )
    node_col = (
        np.concatenate([np.asarray(n, dtype=np.int64) for _, n, _ in segments]) if segments else np.zeros(0, np.int64)
    )
    xyz = (
        np.concatenate([np.asarray(c, dtype=np.float64).reshape(-1, 3) for _, _, c in segments])
        if segments
        else np.zeros((0, 3))
    )
    total = len(node_col)

    size = tuple(int(v) for v in config.input_size_vox)
    cut_workers = max(1, int(cut_workers or min(4, os.cpu_count() or 1)))

    def cut(start: int) -> tuple[np.ndarray, np.ndarray]:
        # One forward call's cutouts. Rows are grouped by segment, so a batch is a few runs
        # of one segment each; nearby centres of a run share reads.
        stop = min(start + compute_batch, total)
        cutouts = np.empty((stop - start, *size), dtype=np.uint8)
        run_start = start
        while run_start < stop:
            segment_id = seg_col[run_start]
            run_stop = run_start + 1
            while run_stop < stop and seg_col[run_stop] == segment_id:
                run_stop += 1
            cutouts[run_start - start : run_stop - start] = cut_masked(
                image, segmentation, int(segment_id), xyz[run_start:run_stop], size, downsample=downsample
            )
            run_start = run_stop
        return np.arange(start, stop), cutouts

    def batches():
        # Batches are cut as the model needs them (the reader thread stays `prefetch` calls
        # ahead, plus one batch per cutting worker), so memory does not grow with the
        # number of centres. Several workers cut at once: reading and masking, not the
        # model, limited a single cutting thread on small segments (50 % of 2 cores).
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=cut_workers, thread_name_prefix="segscope-cut") as pool:
            pending: deque = deque()
            for start in range(0, total, compute_batch):
                pending.append(pool.submit(cut, start))
                if len(pending) >= cut_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    embeddings = yield from stream_embeddings(
        encoder,
        batches(),
        total,
        batch_size=compute_batch,
        cancel=cancel,
        device=resolved,
        message=f"{len(segments)} segments",
    )
    return NodeEmbeddings(seg_col, node_col, xyz, embeddings)
