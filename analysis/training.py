"""Self-supervised SegCLR training: positive pairs, augmentations, NT-Xent, checkpoints.

Works for any dataset with image, segmentation and skeletons (``segscope.analysis.dataset``).

* **Positive pairs**: two skeleton nodes of the same segment whose *straight-line*
  (Euclidean) distance is at most ``max_pair_distance_nm``. Each step draws its pairs from
  distinct segments, so no two pairs of a batch share a segment (they would otherwise be
  pushed apart as negatives). Negatives are all other cutouts in the batch.
* **Augmentations** (SegCLR's): a random shift of each centre; gray jitter of the EM before
  masking, ``clip(x * a + c, 0, 1) ** g`` with ``a = 1 + U(-.25, .25)``,
  ``c = U(-.25, .25)``, ``g = 2 ** U(-1, 1)``; random flips on all three axes (SegCLR's own
  code never flips z, an indexing slip); random permutations of the spatial axes (cubic
  cutouts only).
* **Loss**: NT-Xent with temperature 0.1 on the L2-normalised projection, self-similarities
  masked, summed over both directions (``mean_i l(a_i, b_i) + mean_i l(b_i, a_i)``).
* **Optimiser**: Adam with linear warm-up then cosine decay. SegCLR used LARS, which exists
  for very large batches; at the tens of cutouts per step a CPU affords, Adam is the
  standard choice.
* **Checkpoints** every ``checkpoint_every`` steps in ``out_dir/checkpoint`` (encoder
  weights, optimiser variables, loss history) and resume from there; the data stream is
  seeded by ``(seed, step)`` so a resumed run draws the same batches it would have drawn.

Cutouts are ``[B, x, y, z]`` uint8 (the encoder's input convention); positions are nm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis.export.atomic import atomic_file, atomic_folder
from segscope.analysis.progress import Progress
from segscope.analysis.volume import Volume, cut_em_and_mask

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a contrastive training run (distances in nm)."""

    encoder: dict = field(default_factory=dict)  # EncoderConfig.to_dict(); empty = SEGCLR_LITE
    steps: int = 1000
    batch_pairs: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    temperature: float = 0.1
    max_pair_distance_nm: float = 3000.0
    #: How segments are drawn for pairs: "nodes" (by node count, so every node is equally
    #: likely an anchor; small fragments are rarely seen) or "sqrt_nodes" (by the square
    #: root of it, which shows the encoder short fragments about 10x as often).
    segment_weighting: str = "nodes"
    #: Share of pairs whose second view is cut by an axis-aligned plane between
    #: ``truncate_min_nm`` and ``truncate_max_nm`` from its centre, as the volume's faces cut
    #: fragments, so a truncated piece learns to embed near its uncut neighbour.
    truncate_fraction: float = 0.0
    truncate_min_nm: float = 100.0
    truncate_max_nm: float = 1200.0
    centre_shift_nm: float = 150.0
    gray_jitter: bool = True
    flip_axes: bool = True
    permute_axes: bool = True
    checkpoint_every: int = 50
    seed: int = 0

    def encoder_config(self):
        from segscope.analysis.encoder import SEGCLR_LITE, EncoderConfig

        return EncoderConfig.from_dict(self.encoder) if self.encoder else SEGCLR_LITE


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def nt_xent_per_anchor(projections, temperature: float = 0.1):
    """NT-Xent terms for a batch laid out as ``[a_0..a_{N-1}, b_0..b_{N-1}]``.

    Parameters
    ----------
    projections
        ``[2N, P]`` projections (any backend tensor or numpy array); L2-normalised here.
    temperature
        Softmax temperature (SegCLR: 0.1).

    Returns
    -------
    tensor
        ``[2N]``: ``2 * l(k)`` for each anchor ``k``, where ``l(k)`` is the cross-entropy
        of picking ``k``'s partner among the other ``2N - 1`` cutouts. Its mean is SegCLR's
        loss summed over both directions.
    """
    from keras import ops

    z = ops.cast(projections, "float32")
    z = z / ops.maximum(ops.sqrt(ops.sum(z * z, axis=1, keepdims=True)), 1e-12)
    n2 = ops.shape(z)[0]
    n = n2 // 2
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    logits = logits - ops.eye(n2) * 1e9  # mask self-similarity
    partner = ops.concatenate([ops.arange(n, n2), ops.arange(0, n)])
    log_probs = logits - ops.logsumexp(logits, axis=1, keepdims=True)
    positive = ops.take_along_axis(log_probs, ops.expand_dims(partner, 1), axis=1)[:, 0]
    return -2.0 * positive


def _nt_xent_loss(temperature: float):
    import keras

    class NTXent(keras.losses.Loss):
        """NT-Xent (y_true ignored); see :func:`nt_xent_per_anchor`."""

        def __init__(self, temperature: float = 0.1, name: str = "nt_xent", **kwargs):
            super().__init__(name=name, **kwargs)
            self.temperature = temperature

        def call(self, y_true, y_pred):
            return nt_xent_per_anchor(y_pred, self.temperature)

    return NTXent(temperature)


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Warm-up then cosine decay to zero, as a function of the (0-based) step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return 0.5 * config.learning_rate * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# Pairs and augmentations
# --------------------------------------------------------------------------------------


class PairSampler:
    """Draws positive pairs of skeleton nodes from the same segment.

    Parameters
    ----------
    segment_ids
        uint64 ``[N]`` segment of each node.
    nodes_nm
        float ``[N, 3]`` node positions (nm).
    max_distance_nm
        Largest straight-line distance between the two nodes of a pair.
    weighting
        ``"nodes"``: segments drawn with probability proportional to their node count;
        ``"sqrt_nodes"``: to its square root.
    """

    def __init__(self, segment_ids: np.ndarray, nodes_nm: np.ndarray, max_distance_nm: float, weighting: str = "nodes"):
        from scipy.spatial import cKDTree

        segment_ids = np.asarray(segment_ids, dtype=np.uint64)
        nodes_nm = np.asarray(nodes_nm, dtype=np.float64).reshape(-1, 3)
        if len(segment_ids) != len(nodes_nm) or len(nodes_nm) == 0:
            raise ValueError("PairSampler needs one segment id per node and at least one node")
        self.segments, inverse = np.unique(segment_ids, return_inverse=True)
        self.positions: list[np.ndarray] = []
        self.neighbours: list[list[np.ndarray]] = []
        for index in range(len(self.segments)):
            pts = nodes_nm[inverse == index]
            tree = cKDTree(pts)
            self.positions.append(pts)
            self.neighbours.append([np.asarray(n, dtype=np.int64) for n in tree.query_ball_point(pts, max_distance_nm)])
        if weighting not in ("nodes", "sqrt_nodes"):
            raise ValueError(f"weighting must be 'nodes' or 'sqrt_nodes', got {weighting!r}")
        self.weights = np.array([len(p) for p in self.positions], dtype=np.float64)
        if weighting == "sqrt_nodes":
            self.weights = np.sqrt(self.weights)
        self.weights /= self.weights.sum()

    def sample(self, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw ``n_pairs`` pairs from distinct segments (fewer if there are fewer segments).

        Segments are drawn with probability proportional to their weight, the anchor
        uniformly among the segment's nodes and the partner uniformly among the anchor's
        neighbours within the distance (the anchor itself only when it has none).

        Returns
        -------
        segment_ids : uint64 ``[n]``; anchors_nm, partners_nm : float64 ``[n, 3]``.
        """
        n = min(n_pairs, len(self.segments))
        chosen = rng.choice(len(self.segments), size=n, replace=False, p=self.weights)
        anchors = np.empty((n, 3))
        partners = np.empty((n, 3))
        for row, seg in enumerate(chosen):
            pts = self.positions[seg]
            a = rng.integers(len(pts))
            candidates = self.neighbours[seg][a]
            others = candidates[candidates != a]
            b = rng.choice(others) if len(others) else a
            anchors[row], partners[row] = pts[a], pts[b]
        return self.segments[chosen], anchors, partners


def augment_cutouts(em: np.ndarray, mask: np.ndarray, rng: np.random.Generator, config: TrainingConfig) -> np.ndarray:
    """Gray jitter (before masking), masking, flips and axis permutations.

    Parameters
    ----------
    em : uint8 ``[B, x, y, z]`` unmasked EM.
    mask : bool ``[B, x, y, z]``.

    Returns
    -------
    numpy.ndarray
        uint8 ``[B, x, y, z]`` augmented masked EM.
    """
    out = np.empty(em.shape, dtype=np.uint8)
    cubic = em.shape[1] == em.shape[2] == em.shape[3]
    for i in range(len(em)):
        x = em[i].astype(np.float32) / 255.0
        if config.gray_jitter:
            a = 1.0 + rng.uniform(-0.25, 0.25)
            c = rng.uniform(-0.25, 0.25)
            g = 2.0 ** rng.uniform(-1.0, 1.0)
            x = np.clip(x * a + c, 0.0, 1.0) ** g
        x = np.where(mask[i], x, 0.0)
        if config.flip_axes:
            flips = [axis for axis in range(3) if rng.random() < 0.5]
            if flips:
                x = np.flip(x, axis=tuple(flips))
        if config.permute_axes and cubic:
            x = np.transpose(x, rng.permutation(3))
        out[i] = np.rint(x * 255.0).astype(np.uint8)
    return out


def truncate_masks(
    mask: np.ndarray, rows: np.ndarray, voxel_size_nm: Sequence[float], min_nm: float, max_nm: float, rng
) -> None:
    """Cut each listed mask by a random axis-aligned plane near its centre, in place.

    The plane is perpendicular to a random axis, on a random side of the cutout's centre
    voxel, ``U(min_nm, max_nm)`` away from it; the mask beyond it is cleared, which is how a
    volume face (where the EM reads 0) cuts a fragment.

    Parameters
    ----------
    mask : bool ``[B, x, y, z]``.
    rows : int ``[k]`` indices into ``mask``.
    voxel_size_nm : ``(x, y, z)`` size of one cutout voxel (nm).
    """
    size = np.asarray(mask.shape[1:])
    for row in rows:
        axis = int(rng.integers(3))
        offset = max(round(rng.uniform(min_nm, max_nm) / float(voxel_size_nm[axis])), 1)
        centre = int(size[axis]) // 2
        index: list[Any] = [slice(None)] * 3
        if rng.random() < 0.5:
            index[axis] = slice(centre + offset, None)
        else:
            index[axis] = slice(0, max(centre - offset + 1, 0))
        mask[(int(row), *index)] = False


def make_batch(
    image: Volume,
    segmentation: Volume,
    sampler: PairSampler,
    encoder_config,
    config: TrainingConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One training batch ``[a_0..a_{n-1}, b_0..b_{n-1}]`` of augmented cutouts.

    Returns
    -------
    cutouts : uint8 ``[2n, x, y, z]``; segment_ids : uint64 ``[n]``.
    """
    segment_ids, anchors, partners = sampler.sample(config.batch_pairs, rng)
    size = encoder_config.input_size_vox
    factor = encoder_config.downsample_from(segmentation.voxel_size_nm)
    lo, hi = segmentation.bounds_nm
    n = len(segment_ids)
    em = np.empty((2 * n, *size), dtype=np.uint8)
    mask = np.empty((2 * n, *size), dtype=bool)
    for row, seg in enumerate(segment_ids):
        centres = np.stack([anchors[row], partners[row]])
        centres = centres + rng.uniform(-config.centre_shift_nm, config.centre_shift_nm, size=centres.shape)
        centres = np.clip(centres, lo, hi - 1e-3)
        pair_em, pair_mask = cut_em_and_mask(image, segmentation, int(seg), centres, size, downsample=factor)
        em[[row, n + row]] = pair_em
        mask[[row, n + row]] = pair_mask
    if config.truncate_fraction > 0:
        cut = n + np.flatnonzero(rng.random(n) < config.truncate_fraction)
        voxel_nm = np.asarray(segmentation.voxel_size_nm, dtype=np.float64) * np.asarray(factor)
        truncate_masks(mask, cut, voxel_nm, config.truncate_min_nm, config.truncate_max_nm, rng)
    return augment_cutouts(em, mask, rng, config), segment_ids


# --------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What a finished (or stopped) run produced."""

    steps_done: int
    losses: list[float]
    encoder_path: Path | None
    checkpoint_dir: Path
    seconds: float


def _save_checkpoint(
    directory: Path, encoder, optimizer, step: int, losses: list[float], config: TrainingConfig
) -> None:
    """Write weights, optimiser state and history aside, then swap the folder in."""
    with atomic_folder(directory, force=True) as tmp:
        encoder.save_weights(tmp / "encoder.weights.h5")
        np.savez(tmp / "optimizer.npz", *[np.asarray(v) for v in optimizer.variables])
        (tmp / "state.json").write_text(
            json.dumps(
                {
                    "format_version": CHECKPOINT_FORMAT_VERSION,
                    "step": step,
                    "losses": losses,
                    "config": asdict(config),
                }
            )
        )


def _load_checkpoint(directory: Path, encoder, optimizer, config: TrainingConfig) -> tuple[int, list[float]]:
    state = json.loads((directory / "state.json").read_text())
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"training checkpoint {directory} has format {state.get('format_version')}, "
            f"expected {CHECKPOINT_FORMAT_VERSION}"
        )
    saved = {k: v for k, v in state["config"].items() if k not in ("steps", "checkpoint_every")}
    wanted = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every")}
    if saved != wanted:
        diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ValueError(f"cannot resume from {directory}: its training config differs in {diff}")
    encoder.load_weights(directory / "encoder.weights.h5")
    with np.load(directory / "optimizer.npz") as arrays:
        values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(
            f"optimizer state in {directory} has {len(values)} variables, expected {len(optimizer.variables)}"
        )
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
    return int(state["step"]), list(state["losses"])


def _prefetch(make, start_step: int, stop_step: int, depth: int = 2):
    """Produce ``make(step)`` for each step in a background thread, ``depth`` ahead."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        for step in range(start_step, stop_step):
            if stop.is_set():
                return
            item: tuple[int, Any, Exception | None]
            try:
                item = (step, make(step), None)
            except Exception as exc:  # hand the failure to the training loop
                item = (step, None, exc)
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    thread = threading.Thread(target=worker, name="segscope-train-data", daemon=True)
    thread.start()
    try:
        for _ in range(start_step, stop_step):
            step, batch, error = slots.get()
            if error is not None:
                raise error
            yield step, batch
    finally:
        stop.set()
        thread.join(timeout=5)


def train_contrastive(
    image: Volume,
    segmentation: Volume,
    segment_ids: np.ndarray,
    nodes_nm: np.ndarray,
    out_dir: str | os.PathLike,
    config: TrainingConfig = TrainingConfig(),
    *,
    resume: bool = True,
    stop_at_step: int | None = None,
) -> Generator[Progress, None, TrainingResult]:
    """Train an encoder contrastively; yields Progress once per step.

    Parameters
    ----------
    image, segmentation
        Volumes (open them ``.in_memory()`` for speed when they fit).
    segment_ids, nodes_nm
        uint64 ``[N]`` and float ``[N, 3]`` (nm): the skeleton nodes of the *training*
        segments only; held-out cells must not appear here.
    out_dir
        Run folder: ``checkpoint/`` (resumable state), ``encoder.keras`` (final model without
        the projection head), ``history.json`` (loss per step).
    config
        Hyper-parameters.
    resume
        Continue from ``out_dir/checkpoint`` when it exists.
    stop_at_step
        Stop (after checkpointing) at this step instead of ``config.steps``, e.g. to
        split a long run; the cosine schedule still spans ``config.steps``.

    Returns
    -------
    TrainingResult
    """
    import keras

    from segscope.analysis.encoder import build_encoder, save_encoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoint"
    encoder_config = config.encoder_config()
    sampler = PairSampler(segment_ids, nodes_nm, config.max_pair_distance_nm, config.segment_weighting)
    if len(sampler.segments) < 2:
        raise ValueError("contrastive training needs at least two training segments")

    encoder = build_encoder(encoder_config, include_projection=True, seed=config.seed)
    # The learning rate is set before every step from learning_rate_at, the one place the
    # schedule is written down, so the logged rate is the rate used.
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate_at(0, config))
    loss_fn = _nt_xent_loss(config.temperature)

    class Trainer(keras.Model):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def call(self, x, training=False):
            return self.enc(x, training=training)["projection"]

    trainer = Trainer(encoder)
    trainer.compile(optimizer=optimizer, loss=loss_fn, jit_compile=False)
    # Build optimiser slots so a checkpoint's variables can be assigned before step 0.
    optimizer.build(trainer.trainable_variables if trainer.built else encoder.trainable_variables)

    start_step = 0
    losses: list[float] = []
    if resume and (checkpoint_dir / "state.json").exists():
        start_step, losses = _load_checkpoint(checkpoint_dir, encoder, optimizer, config)
        log.info("resuming contrastive training at step %d from %s", start_step, checkpoint_dir)
    end_step = min(config.steps, stop_at_step) if stop_at_step is not None else config.steps

    def make(step: int):
        rng = np.random.default_rng([config.seed, step])
        return make_batch(image, segmentation, sampler, encoder_config, config, rng)

    started = time.perf_counter()
    done_here = 0
    yield Progress(start_step, config.steps, "steps", "preparing first batch")
    for step, (cutouts, _) in _prefetch(make, start_step, end_step):
        dummy = np.zeros((len(cutouts),), dtype=np.float32)
        optimizer.learning_rate.assign(learning_rate_at(step, config))
        loss = float(np.asarray(trainer.train_on_batch(cutouts[..., None], dummy)))
        if not math.isfinite(loss):
            raise FloatingPointError(f"contrastive loss became {loss} at step {step}")
        losses.append(loss)
        done_here += 1
        elapsed = time.perf_counter() - started
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end_step:
            _save_checkpoint(checkpoint_dir, encoder, optimizer, step + 1, losses, config)
        yield Progress(
            step + 1,
            config.steps,
            "steps",
            f"loss {loss:.3f}",
            rate=done_here / elapsed if elapsed > 0 else None,
            payload={"loss": loss, "learning_rate": learning_rate_at(step, config)},
        )

    with atomic_file(out / "history.json", force=True) as tmp_history:
        tmp_history.write_text(json.dumps({"loss": losses, "config": asdict(config)}))
    encoder_path = None
    if len(losses) >= config.steps:
        inference = build_encoder(encoder_config, include_projection=False)
        _copy_weights_by_name(encoder, inference)
        encoder_path = save_encoder(inference, out / "encoder.keras")
    return TrainingResult(len(losses), losses, encoder_path, checkpoint_dir, time.perf_counter() - started)


def _copy_weights_by_name(source, target) -> None:
    """Copy every weight of ``target`` from the same-named weight of ``source``."""
    from segscope.analysis.encoder.model import weight_names

    src = weight_names(source)
    for name, variable in weight_names(target).items():
        variable.assign(np.asarray(src[name]))


def split_cells(cell_ids: Sequence[int] | np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split cells into (train, eval) id arrays, deterministic in ``seed``."""
    cells = np.unique(np.asarray(cell_ids))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(cells)
    n_eval = round(eval_fraction * len(cells))
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])


# --------------------------------------------------------------------------------------
# Dataset-level runs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSplit:
    """Which cells train and which are kept for evaluation (never seen in training).

    Attributes
    ----------
    train_cells, eval_cells : tuple of int
        Cell ids (``segments.parquet`` ``cell_id``).
    holdout_types : tuple of str
        Cell types excluded from training entirely (all their cells are evaluation cells),
        so classifiers can be tested on a type they were never taught.
    seed : int
    """

    train_cells: tuple[int, ...]
    eval_cells: tuple[int, ...]
    holdout_types: tuple[str, ...]
    seed: int

    @classmethod
    def for_dataset(
        cls, dataset, eval_fraction: float = 0.25, holdout_types: Sequence[str] = (), seed: int = 0
    ) -> CellSplit:
        """Split a dataset's cells: ``eval_fraction`` of each known type, all held-out types."""
        cells = np.asarray(dataset.segments["cell_id"], dtype=np.int64)
        types = np.asarray(dataset.segments["cell_type"].to_numpy(zero_copy_only=False)).astype(str)
        unknown = sorted(set(holdout_types) - set(types.tolist()))
        if unknown:
            raise ValueError(
                f"held-out cell types {unknown} are not in the dataset (it has {sorted(set(types.tolist()))})"
            )
        train, held = [], []
        for kind in sorted(set(types.tolist())):
            kind_cells = np.unique(cells[types == kind])
            if kind in holdout_types:
                held.extend(kind_cells.tolist())
                continue
            # Split per type so every known type has training and evaluation cells.
            t, e = split_cells(kind_cells, eval_fraction, seed)
            train.extend(t.tolist())
            held.extend(e.tolist())
        return cls(tuple(sorted(train)), tuple(sorted(held)), tuple(holdout_types), seed)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CellSplit:
        data = json.loads(Path(path).read_text())
        return cls(
            tuple(data["train_cells"]), tuple(data["eval_cells"]), tuple(data["holdout_types"]), int(data["seed"])
        )

    def segment_ids(self, dataset, which: str) -> np.ndarray:
        """uint64 ids of the dataset's segments whose cell is in ``which`` ("train"/"eval")."""
        cells = np.asarray(dataset.segments["cell_id"], dtype=np.int64)
        chosen = self.train_cells if which == "train" else self.eval_cells
        return dataset.segment_ids[np.isin(cells, np.asarray(chosen, dtype=np.int64))]


def train_on_dataset(
    dataset,
    out_dir: str | os.PathLike,
    config: TrainingConfig = TrainingConfig(),
    *,
    split: CellSplit | None = None,
    resume: bool = True,
    stop_at_step: int | None = None,
) -> Generator[Progress, None, TrainingResult]:
    """Contrastive training on a dataset's training cells; yields Progress per step.

    Writes ``split.json`` (the cells kept out) into ``out_dir`` and trains on the skeleton
    nodes of training-cell segments only. Volumes small enough (<= 1 GiB together) are
    loaded into memory first, since training reads random places.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split or CellSplit.for_dataset(dataset, seed=config.seed)
    split_path = out / "split.json"
    if split_path.exists() and resume and CellSplit.load(split_path) != split:
        raise ValueError(f"{split_path} holds a different cell split; use a new output folder")
    split.save(split_path)
    train_ids = split.segment_ids(dataset, "train")
    node_segments = np.asarray(dataset.nodes["segment_id"], dtype=np.uint64)
    keep = np.isin(node_segments, train_ids)
    nodes = np.stack([np.asarray(dataset.nodes[c], dtype=np.float64)[keep] for c in ("x_nm", "y_nm", "z_nm")], axis=1)
    image, segmentation = dataset.image, dataset.segmentation
    n_bytes = np.prod(image.shape) * (image.dtype.itemsize + segmentation.dtype.itemsize)
    if n_bytes <= 1024**3:
        image, segmentation = image.in_memory(), segmentation.in_memory()
    log.info(
        "training on %d segments (%d nodes) of %d cells; %d cells held out",
        len(train_ids),
        int(keep.sum()),
        len(split.train_cells),
        len(split.eval_cells),
    )
    return (
        yield from train_contrastive(
            image, segmentation, node_segments[keep], nodes, out, config, resume=resume, stop_at_step=stop_at_step
        )
    )


def plot_loss_curve(losses: Sequence[float], png_path: str | os.PathLike, *, window: int = 50, title: str = "") -> None:
    """Save the per-step loss and its running mean (``window`` steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, values, lw=0.5, alpha=0.4, label="per step")
    if len(values) >= window:
        running = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], running, lw=1.5, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("NT-Xent loss (both directions)")
    ax.set_title(title or "Contrastive training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
