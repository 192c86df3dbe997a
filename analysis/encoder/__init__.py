"""SegCLR encoders: the published 3-D ResNet-18, SegScope's lite sibling, checkpoints, saving.

Public API
----------
* :data:`SEGCLR_FULL`, :data:`SEGCLR_LITE`, :class:`EncoderConfig`: architectures as data.
* :func:`build_encoder`: a randomly initialised encoder of a config.
* :func:`load_checkpoint`: a SegCLR TensorFlow checkpoint (either layout) -> encoder.
* :func:`save_checkpoint`: an encoder -> TensorFlow checkpoint SegCLR's code can read.
* :func:`save_encoder` / :func:`load_encoder`: SegScope's own ``.keras`` model files.
* :func:`open_encoder`: either of the above, chosen by what ``path`` holds.
* :func:`flops_per_cutout`, :func:`layer_costs`, :func:`parameter_count`: cost model.
* :data:`PRECISIONS`: what the loaders' ``precision=`` takes.

Every encoder's ``embed(cutouts)`` takes uint8 ``[B, x, y, z]`` (or ``[B, x, y, z, 1]``)
masked EM and returns float32 ``[B, D]``. Keras and TensorFlow are imported on first use.

The loaders take ``precision="auto"`` (the default), ``"float32"``, ``"bfloat16"`` or
``"float16"``; ``encoder.precision`` says which one runs. ``"auto"`` is bfloat16 on a CPU
with AMX or AVX-512 BF16 and on a GPU, float32 elsewhere
(:func:`segscope.analysis.inference.resolve_precision`). bfloat16 changes embeddings by
about 1 % of their largest value (cosine similarity to float32 above 0.9999 on the SegCLR
fixture); pass ``precision="float32"`` to reproduce SegCLR's numbers to 1e-3.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import CheckpointMismatchError, resolve_checkpoint_prefix
from .config import (
    CONFIG_FORMAT_VERSION,
    PRECISION_POLICIES,
    SEGCLR_FULL,
    SEGCLR_LITE,
    EncoderConfig,
    LayerCost,
    flops_per_cutout,
    layer_costs,
    parameter_count,
)

if TYPE_CHECKING:  # pragma: no cover
    from .model import SegClrEncoder

logger = logging.getLogger(__name__)

#: Values of the loaders' ``precision`` option (``"auto"`` is resolved per machine).
PRECISIONS = ("auto", *PRECISION_POLICIES)

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "PRECISIONS",
    "SEGCLR_FULL",
    "SEGCLR_LITE",
    "CheckpointMismatchError",
    "EncoderConfig",
    "LayerCost",
    "build_encoder",
    "flops_per_cutout",
    "layer_costs",
    "load_checkpoint",
    "load_encoder",
    "open_encoder",
    "parameter_count",
    "read_encoder_config",
    "resolve_checkpoint_prefix",
    "save_checkpoint",
    "save_encoder",
]


def build_encoder(
    config: EncoderConfig = SEGCLR_LITE,
    *,
    include_projection: bool = False,
    seed: int | None = None,
    precision: str = "float32",
) -> SegClrEncoder:
    """A freshly initialised (random) encoder of ``config``.

    ``seed`` seeds Keras' global RNG first, for reproducible weights. ``precision`` is one
    of :data:`PRECISIONS`; float32 by default, since fresh encoders are mostly trained.
    """
    from .model import build_encoder as _build

    return _build(config, include_projection=include_projection, seed=seed, precision=_resolve(precision))


def _resolve(precision: str) -> str:
    from segscope.analysis.inference import resolve_precision

    return resolve_precision(precision)


def load_checkpoint(
    path: str | os.PathLike,
    config: EncoderConfig | None = None,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    include_projection: bool = False,
    model_version: str | None = None,
    precision: str = "auto",
) -> SegClrEncoder:
    """Load a SegCLR TensorFlow checkpoint into a Keras encoder.

    Parameters
    ----------
    path
        Checkpoint prefix (``.../model.ckpt-216000.training_tf2resaved-1``), its
        ``.index`` file, or the folder holding it. Object-based (TF2) and name-based (TF1
        ``Saver``) layouts are both read, by variable name.
    config
        Architecture; default :data:`SEGCLR_FULL`, the published SegCLR model.
    voxel_size_nm
        Voxel size ``(x, y, z)`` nm the weights were trained at (checkpoints do not record
        it): 32 x 32 x 40 for MICrONS (the default), 32 x 32 x 33 for H01.
    include_projection
        Also load the training-only projection head.
    model_version
        Recorded in the config; default: the checkpoint file name.
    precision
        One of :data:`PRECISIONS`: ``"auto"`` (bfloat16 where the hardware has it),
        ``"float32"`` (SegCLR's numbers), ``"bfloat16"`` or ``"float16"``.

    Returns
    -------
    SegClrEncoder
        ``embed(uint8 [B, x, y, z]) -> float32 [B, 64]`` for the published config;
        ``encoder.precision`` is the precision it computes in.

    Raises
    ------
    FileNotFoundError
        No checkpoint at ``path``.
    ValueError
        ``path`` is not a readable checkpoint, or ``precision`` is unknown.
    CheckpointMismatchError
        (a ValueError) Variables missing from the checkpoint, or of the wrong shape.
    """
    from .checkpoint import CheckpointContents, assign_from_checkpoint
    from .model import SegClrEncoder, weight_names

    contents = CheckpointContents(path)
    config = config or SEGCLR_FULL
    updates: dict[str, object] = {
        "model_version": model_version if model_version is not None else Path(contents.prefix).name
    }
    if voxel_size_nm is not None:
        updates["voxel_size_nm"] = tuple(voxel_size_nm)
    config = config.with_updates(**updates)
    # Variables are float32 in every precision, so the checkpoint loads the same way.
    encoder = SegClrEncoder(config, include_projection=include_projection, precision=_resolve(precision))
    assign_from_checkpoint(weight_names(encoder), contents)
    logger.info(
        "loaded %s checkpoint %s into %s (%s)", contents.layout, contents.prefix, config.name, encoder.precision
    )
    return encoder


def save_checkpoint(encoder: SegClrEncoder, prefix: str | os.PathLike, *, layout: str = "name") -> str:
    """Write an encoder's weights as a SegCLR-compatible TensorFlow checkpoint.

    ``layout`` is ``"name"`` (TF1 Saver keys) or ``"object"`` (the published
    ``_tf1_style_var_store`` layout). Returns the prefix written.
    """
    from .checkpoint import write_checkpoint
    from .model import weight_names

    values = {name: np.asarray(variable.numpy()) for name, variable in weight_names(encoder).items()}
    return write_checkpoint(values, prefix, layout=layout)


def save_encoder(encoder: SegClrEncoder, path: str | os.PathLike) -> Path:
    """Save a SegScope encoder as a Keras-native ``.keras`` zip (config JSON + weights).

    The config carries input size, voxel size (nm), axis order, format version and model
    version. No pickled Python is written. The file holds the float32 model whatever
    ``encoder.precision`` is (weights are float32 either way); loaders pick the precision.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"encoder files end in .keras, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    from segscope.analysis.export.atomic import staged_in_sibling

    # Keras writes the zip in place; a kill part-way would leave an encoder.keras that looks
    # finished. Saved in a hidden sibling folder and renamed over the target when complete.
    with staged_in_sibling(path) as staged:
        encoder.with_precision("float32").save(staged)
    return path


def read_encoder_config(path: str | os.PathLike) -> EncoderConfig:
    """Read only the :class:`EncoderConfig` of a saved ``.keras`` encoder (no Keras import)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder file {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > _MAX_CONFIG_BYTES:
                raise ValueError(f"config.json declares {info.file_size} bytes (more than {_MAX_CONFIG_BYTES})")
            saved = json.loads(archive.read(info))
    except (zipfile.BadZipFile, KeyError, ValueError, RecursionError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ValueError(f"{path} is not a Keras .keras model file: {reason}") from None
    config = saved.get("config", {}) if isinstance(saved, dict) else None
    if not isinstance(config, dict) or "encoder_config" not in config:
        raise ValueError(f"{path} holds a Keras model but not a SegScope encoder")
    foreign = _foreign_callable(saved)
    if foreign:
        raise ValueError(f"{path} names {foreign}, which is not part of a SegScope encoder; refusing to load it")
    try:
        return EncoderConfig.from_dict(config["encoder_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


#: The largest config.json a .keras encoder may carry (a SegScope encoder's is a few kB).
_MAX_CONFIG_BYTES = 16 * 2**20
#: Python modules a saved encoder's config may name (Keras layers, SegScope's own classes).
_ALLOWED_MODULES = ("keras", "segscope", "analysis")  # "analysis": saved from a source checkout


def _foreign_callable(config: object) -> str | None:
    """The first ``module.name`` a Keras config names outside Keras and SegScope, or None.

    Keras's safe mode refuses lambdas, but a config can still name any importable function
    (``os.system``), which Keras then rejects with a TypeError deep inside deserialisation;
    this says so up front and in words. Iterative, so deep nesting cannot overflow the stack.
    """
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module = item.get("module")
            if isinstance(module, str) and module and module.split(".")[0] not in _ALLOWED_MODULES:
                return f"{module}.{item.get('class_name') or item.get('config') or '?'}"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def load_encoder(path: str | os.PathLike, *, precision: str = "auto") -> SegClrEncoder:
    """Load an encoder written by :func:`save_encoder` (``safe_mode=True``: no code runs).

    ``precision`` is one of :data:`PRECISIONS` (see :func:`load_checkpoint`).
    """
    read_encoder_config(path)  # clear errors for missing/foreign files before Keras sees them
    resolved = _resolve(precision)
    import keras

    from .model import SegClrEncoder

    try:
        model = keras.saving.load_model(Path(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras reports a damaged file as any of a dozen classes
        raise ValueError(f"{path}: cannot load the encoder (damaged or not written by SegScope): {exc}") from exc
    if not isinstance(model, SegClrEncoder):
        raise ValueError(f"{path} does not hold a SegScope encoder")
    return model.with_precision(resolved)


def open_encoder(path: str | os.PathLike, *, precision: str = "auto", **checkpoint_options) -> SegClrEncoder:
    """Open a SegScope ``.keras`` encoder or a SegCLR TensorFlow checkpoint.

    A ``.keras`` file (or a folder holding exactly one ``*.keras`` and no checkpoint) goes
    to :func:`load_encoder`; anything else to :func:`load_checkpoint`, which receives
    ``checkpoint_options`` (``config``, ``voxel_size_nm``...). Both get ``precision``.
    """
    p = Path(path).expanduser()
    if p.suffix == ".keras":
        return load_encoder(p, precision=precision)
    if p.is_dir() and not any(p.glob("*.index")):
        models = sorted(p.glob("*.keras"))
        if len(models) == 1:
            return load_encoder(models[0], precision=precision)
    return load_checkpoint(p, precision=precision, **checkpoint_options)
