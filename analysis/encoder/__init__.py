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

Every encoder's ``embed(cutouts)`` takes uint8 ``[B, x, y, z]`` (or ``[B, x, y, z, 1]``)
masked EM and returns float32 ``[B, D]``. Keras and TensorFlow are imported on first use.
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

__all__ = [
    "CONFIG_FORMAT_VERSION",
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
    config: EncoderConfig = SEGCLR_LITE, *, include_projection: bool = False, seed: int | None = None, dtype=None
) -> SegClrEncoder:
    """A freshly initialised (random) encoder of ``config``.

    ``seed`` seeds Keras' global RNG first, for reproducible weights; ``dtype`` is a
    Keras dtype policy such as ``"mixed_float16"``.
    """
    from .model import build_encoder as _build

    return _build(config, include_projection=include_projection, seed=seed, dtype=dtype)


def load_checkpoint(
    path: str | os.PathLike,
    config: EncoderConfig | None = None,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    include_projection: bool = False,
    model_version: str | None = None,
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

    Returns
    -------
    SegClrEncoder
        ``embed(uint8 [B, x, y, z]) -> float32 [B, 64]`` for the published config.

    Raises
    ------
    FileNotFoundError
        No checkpoint at ``path``.
    ValueError
        ``path`` is not a readable checkpoint.
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
    encoder = SegClrEncoder(config, include_projection=include_projection)
    assign_from_checkpoint(weight_names(encoder), contents)
    logger.info("loaded %s checkpoint %s into %s", contents.layout, contents.prefix, config.name)
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
    version. No pickled Python is written.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"encoder files end in .keras, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.save(path)
    return path


def read_encoder_config(path: str | os.PathLike) -> EncoderConfig:
    """Read only the :class:`EncoderConfig` of a saved ``.keras`` encoder (no Keras import)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder file {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            saved = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a Keras .keras model file: {exc}") from exc
    config = saved.get("config", {})
    if "encoder_config" not in config:
        raise ValueError(f"{path} holds a Keras model but not a SegScope encoder")
    return EncoderConfig.from_dict(config["encoder_config"])


def load_encoder(path: str | os.PathLike) -> SegClrEncoder:
    """Load an encoder written by :func:`save_encoder` (``safe_mode=True``: no code runs)."""
    read_encoder_config(path)  # clear errors for missing/foreign files before Keras sees them
    import keras

    from .model import SegClrEncoder

    model = keras.saving.load_model(Path(path), compile=False, safe_mode=True)
    if not isinstance(model, SegClrEncoder):
        raise ValueError(f"{path} does not hold a SegScope encoder")
    return model


def open_encoder(path: str | os.PathLike, **checkpoint_options) -> SegClrEncoder:
    """Open a SegScope ``.keras`` encoder or a SegCLR TensorFlow checkpoint.

    A ``.keras`` file (or a folder holding exactly one ``*.keras`` and no checkpoint) goes
    to :func:`load_encoder`; anything else to :func:`load_checkpoint`, which receives
    ``checkpoint_options`` (``config``, ``voxel_size_nm``...).
    """
    p = Path(path).expanduser()
    if p.suffix == ".keras":
        return load_encoder(p)
    if p.is_dir() and not any(p.glob("*.index")):
        models = sorted(p.glob("*.keras"))
        if len(models) == 1:
            return load_encoder(models[0])
    return load_checkpoint(p, **checkpoint_options)
