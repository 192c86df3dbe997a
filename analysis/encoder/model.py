"""The SegCLR 3-D ResNet encoder as a Keras 3 model.

Importing this module imports Keras; :mod:`segscope.analysis.encoder` only imports it on first use.

Architecture (SegCLR ``resnet18_stack`` + heads; see ``shared/docs/segclr-reference.md``):

* stem: ``Conv3D(k=7, s=2, bias) -> BN -> MaxPool3D(3, s=2, SAME)``; no ReLU.
* block: ``(Conv3D(3, bias) -> ReLU -> BN) x 2``; shortcut on the first block of every
  stage (stage_2 included) is ``Conv3D(1, bias) -> BN``; ``out = ReLU(main + shortcut)``.
* global average pool, bottleneck head ``(Dense(no bias) -> BN -> ReLU) ..., Dense -> BN``.
* projection head (training only) on the embedding, same pattern.

All convolutions and the pool use ``padding="same"``: TensorFlow's SAME rule (the odd
extra pad goes at the end), which Keras implements identically on the TensorFlow and JAX
backends. Layer names are TF1 scopes with ``/`` written ``.``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from .config import EncoderConfig

logger = logging.getLogger(__name__)

_REGISTER_PACKAGE = "segscope"


@keras.saving.register_keras_serializable(package=_REGISTER_PACKAGE)
class UnitScale(layers.Layer):
    """Casts raw uint8 EM to the compute dtype and divides by 255 (SegCLR's input scaling)."""

    def call(self, inputs):
        return ops.divide(ops.cast(inputs, self.compute_dtype), 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape


def _scope(*parts: str) -> str:
    return ".".join(p.replace("/", ".") for p in parts)


def _batch_norm(config: EncoderConfig, name: str, dtype) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=config.bn_momentum, epsilon=config.bn_epsilon, name=name, dtype=dtype)


def build_graph(config: EncoderConfig, *, include_projection: bool = False, dtype=None):
    """Build the functional graph of ``config``.

    Returns
    -------
    inputs : keras.KerasTensor
        ``[B, x, y, z, 1]`` in ``config.input_dtype``.
    outputs : keras.KerasTensor or dict
        The embedding ``[B, D]``; with ``include_projection`` a dict with ``"embedding"``
        and ``"projection"`` (``[B, P]``, not normalised).
    """
    backbone = config.backbone_scope
    inputs = keras.Input(shape=(*config.input_size_vox, 1), dtype=config.input_dtype, name="cutouts")
    x = inputs
    if config.input_dtype == "uint8":
        x = UnitScale(name="unit_scale", dtype=dtype)(x)
    if config.axis_order != "xyz":
        perm = (*("xyz".index(a) + 1 for a in config.axis_order), 4)
        x = layers.Permute(perm, name="axis_order", dtype=dtype)(x)

    def conv(filters, kernel, stride, name):
        return layers.Conv3D(filters, kernel, strides=stride, padding="same", use_bias=True, name=name, dtype=dtype)

    x = conv(config.stem_filters, config.stem_kernel, config.stem_stride, _scope(backbone, "stage_1", "conv1"))(x)
    x = _batch_norm(config, _scope(backbone, "stage_1", "bn1"), dtype)(x)
    if config.stem_pool:
        x = layers.MaxPooling3D(3, strides=2, padding="same", name=_scope(backbone, "stage_1", "pool1"), dtype=dtype)(x)

    for stage_index, (filters, stride) in enumerate(zip(config.stage_filters, config.stage_strides)):
        stage = f"stage_{stage_index + 2}"
        for block_index, block in enumerate(config.block_names(stage_index)):
            prefix = _scope(backbone, stage, block)
            block_stride = stride if block_index == 0 else 1
            block_in = x
            for i, s in enumerate((block_stride, 1)):
                x = conv(filters, 3, s, f"{prefix}.conv_{i}")(x)
                # SegCLR applies ReLU before BN inside blocks; keep that order.
                x = layers.ReLU(name=f"{prefix}.relu_{i}", dtype=dtype)(x)
                x = _batch_norm(config, f"{prefix}.bn_{i}", dtype)(x)
            if block_index == 0:
                shortcut = conv(filters, 1, block_stride, f"{prefix}.shortcut_conv")(block_in)
                shortcut = _batch_norm(config, f"{prefix}.shortcut_bn", dtype)(shortcut)
            else:
                shortcut = block_in
            x = layers.Add(name=f"{prefix}.add", dtype=dtype)([x, shortcut])
            x = layers.ReLU(name=f"{prefix}.relu", dtype=dtype)(x)
    x = layers.GlobalAveragePooling3D(name=_scope(backbone, "avg_pool"), dtype=dtype)(x)

    def head(x, scope, widths):
        for i, width in enumerate(widths):
            x = layers.Dense(width, use_bias=False, name=_scope(scope, f"nl_{i}", "dense"), dtype=dtype)(x)
            x = _batch_norm(config, _scope(scope, f"nl_{i}", f"nl_{i}_bn"), dtype)(x)
            if i < len(widths) - 1:
                x = layers.ReLU(name=_scope(scope, f"nl_{i}", "relu"), dtype=dtype)(x)
        return x

    embedding = head(x, config.bottleneck_scope, config.bottleneck_widths)
    if include_projection and config.projection_widths:
        projection = head(embedding, config.projection_scope, config.projection_widths)
        return inputs, {"embedding": embedding, "projection": projection}
    return inputs, embedding


@keras.saving.register_keras_serializable(package=_REGISTER_PACKAGE)
class SegClrEncoder(keras.Model):
    """A SegCLR-family encoder: a functional Keras model that knows its own config.

    Call :meth:`embed` with uint8 cutouts ``[B, x, y, z]`` (or ``[B, x, y, z, 1]``) to
    get float32 embeddings ``[B, D]``. Save with :func:`segscope.analysis.encoder.save_encoder`
    (Keras ``.keras`` zip), load with :func:`segscope.analysis.encoder.load_encoder`.

    Parameters
    ----------
    encoder_config
        An :class:`EncoderConfig` or its dict form.
    include_projection
        Also output the training-only projection head (outputs become a dict).
    """

    def __init__(
        self,
        encoder_config: EncoderConfig | dict,
        include_projection: bool = False,
        name: str | None = None,
        dtype=None,
        **kwargs: Any,
    ):
        config = (
            encoder_config if isinstance(encoder_config, EncoderConfig) else EncoderConfig.from_dict(encoder_config)
        )
        inputs, outputs = build_graph(config, include_projection=include_projection, dtype=dtype)
        super().__init__(inputs=inputs, outputs=outputs, name=name or config.name, **kwargs)
        self.encoder_config = config
        self.include_projection = bool(include_projection)
        self._inference_fn: Callable[[Any], Any] | None = None
        self._jit_compile = False

    def get_config(self) -> dict:
        return {
            "encoder_config": self.encoder_config.to_dict(),
            "include_projection": self.include_projection,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> SegClrEncoder:
        return cls(**config)

    # -- inference -------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.encoder_config.embedding_dim

    def set_jit_compile(self, enabled: bool) -> None:
        """Use XLA for :meth:`embed` on the TensorFlow backend.

        Off by default: on the 2-core CPU machine XLA ran the lite model 6-8x slower and
        the full model about 2x slower (``benchmarks/bench_encoder.py``).
        """
        self._jit_compile = bool(enabled)
        self._inference_fn = None

    def _forward_fn(self):
        if self._inference_fn is None:
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                model = self

                # A tf.function around the call avoids predict()'s per-call setup cost;
                # reduce_retracing keeps a ragged last batch from compiling a new graph
                # every time.
                @tf.function(jit_compile=self._jit_compile, reduce_retracing=True)
                def forward(x):
                    out = model(x, training=False)
                    return out["embedding"] if isinstance(out, dict) else out

                self._inference_fn = lambda x: forward(x).numpy()
            else:

                def forward_other(x):
                    out = self.predict_on_batch(x)
                    return out["embedding"] if isinstance(out, dict) else out

                self._inference_fn = forward_other
        return self._inference_fn

    def prepare_input(self, cutouts: np.ndarray) -> np.ndarray:
        """Validate cutouts and give them the model's ``[B, x, y, z, 1]`` layout.

        Raises
        ------
        ValueError
            Wrong rank, spatial size, channel count or dtype.
        """
        arr = np.asarray(cutouts)
        size = tuple(self.encoder_config.input_size_vox)
        if arr.ndim == 5:
            if arr.shape[-1] != 1:
                raise ValueError(f"cutouts must have one channel, got shape {arr.shape}")
        elif arr.ndim == 4:
            arr = arr[..., None]
        else:
            raise ValueError(f"cutouts must be [B, x, y, z] or [B, x, y, z, 1], got shape {arr.shape}")
        if tuple(arr.shape[1:4]) != size:
            raise ValueError(
                f"cutouts are {tuple(arr.shape[1:4])} voxels, this encoder ({self.encoder_config.name}) expects {size}"
            )
        expected = self.encoder_config.input_dtype
        if expected == "uint8" and arr.dtype != np.uint8:
            raise ValueError(f"cutouts must be uint8 masked EM, got {arr.dtype}")
        if expected == "float32":
            arr = arr.astype(np.float32, copy=False)
        return arr

    def embed(self, cutouts: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Embed cutouts.

        Parameters
        ----------
        cutouts
            uint8 ``[B, x, y, z]`` or ``[B, x, y, z, 1]`` masked EM, spatial size
            ``encoder_config.input_size_vox``.
        batch_size
            Cutouts per forward call (default: all at once).

        Returns
        -------
        numpy.ndarray
            float32 ``[B, D]`` embeddings (not normalised).
        """
        arr = self.prepare_input(cutouts)
        if len(arr) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        step = len(arr) if not batch_size else int(batch_size)
        forward = self._forward_fn()
        parts = [np.asarray(forward(arr[i : i + step]), dtype=np.float32) for i in range(0, len(arr), step)]
        return np.concatenate(parts, axis=0)


def build_encoder(
    config: EncoderConfig, *, include_projection: bool = False, seed: int | None = None, dtype=None
) -> SegClrEncoder:
    """A freshly initialised encoder of ``config`` (random weights)."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return SegClrEncoder(config, include_projection=include_projection, dtype=dtype)


def weight_names(model: keras.Model) -> dict[str, Any]:
    """Map TF1 variable names (``scope/.../kernel``) to the model's Keras variables."""
    names: dict[str, Any] = {}
    for layer in model.layers:
        for variable in layer.weights:
            tf1_name = f"{layer.name.replace('.', '/')}/{variable.name}"
            names[tf1_name] = variable
    return names
