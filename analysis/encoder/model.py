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

Precision: ``"float32"``, or ``"bfloat16"``/``"float16"`` for the backbone (convolutions,
ReLU, pooling, residual adds) with float32 master weights, batch-norm arithmetic in
float32 (Keras upcasts it), and the global pool and the head in float32, so the embedding
is float32 whatever the precision. See :func:`segscope.analysis.inference.resolve_precision`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from .config import PRECISION_POLICIES, EncoderConfig, normalise_precision

logger = logging.getLogger(__name__)

_REGISTER_PACKAGE = "segscope"


@keras.saving.register_keras_serializable(package=_REGISTER_PACKAGE)
class UnitScale(layers.Layer):
    """Casts raw uint8 EM to the compute dtype and divides by 255 (SegCLR's input scaling)."""

    def call(self, inputs):
        return ops.divide(ops.cast(inputs, self.compute_dtype), 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape


def column_conv3d(inputs, kernel, strides: tuple[int, int, int]):
    """A one-channel ``padding="same"`` 3-D convolution as an x-tap gather plus a ``(1, ky, kz)`` convolution.

    ``inputs`` ``[B, x, y, z, 1]`` (channels last), ``kernel`` ``[kx, ky, kz, 1, F]``, no
    dilation; returns what
    ``ops.conv(inputs, kernel, strides, padding="same")`` does, ``[B, ceil(x/sx), ceil(y/sy),
    ceil(z/sz), F]``, up to the order of summation. The ``kx`` taps along x become input
    channels (``[B, x_out, y, z, kx]``), which reduced-precision kernels need: oneDNN's
    bfloat16 convolutions pair input channels, so a one-channel input leaves them mostly
    idle.
    """
    kx = int(kernel.shape[0])
    stride = int(strides[0])
    # TensorFlow's SAME rule along x (the odd pad at the end); y and z keep the original
    # kernel and stride, so the (1, ky, kz) convolution pads them by the same rule itself.
    n = int(inputs.shape[1])
    n_out = -(-n // stride)
    total = max((n_out - 1) * stride + kx - n, 0)
    x = ops.pad(ops.squeeze(inputs, -1), [(0, 0), (total // 2, total - total // 2), (0, 0), (0, 0)])
    # One gather instead of kx strided slices: TensorFlow's strided slice of a 5-D bfloat16
    # tensor took ~170 ms for the 129^3 stem on the 2-core CPU, the gather ~10 ms.
    taps = (np.arange(n_out)[:, None] * stride + np.arange(kx)[None]).astype("int32")
    columns = ops.transpose(ops.take(x, taps, axis=1), (0, 1, 3, 4, 2))  # [B, x_out, y, z, kx]
    # kernel [kx, ky, kz, 1, F] -> [1, ky, kz, kx, F]: the x taps are now input channels.
    folded = ops.reshape(ops.transpose(kernel, (1, 2, 0, 3, 4)), (1, *kernel.shape[1:3], kx, kernel.shape[-1]))
    return ops.conv(columns, folded, strides=(1, *strides[1:]), padding="same", data_format="channels_last")


class ColumnStemConv3D(layers.Conv3D):
    """The one-channel strided stem convolution, computed by :func:`column_conv3d` in reduced precision.

    Same weights, names and (up to summation order) results as :class:`keras.layers.Conv3D`
    with ``padding="same"``, which it is in float32. In bfloat16 the 7^3 stride-2 stem of
    the exact encoder ran at ~100 GFLOP/s against ~220 for its 64-channel layers; as a
    gather plus a 7-channel convolution the whole encoder got ~15 % faster on the 2-core
    CPU (``benchmarks/bench_encoder.py``).
    """

    def convolution_op(self, inputs, kernel):
        plain = (
            self.compute_dtype == "float32"
            or int(kernel.shape[3]) != 1
            or int(self.strides[0]) == 1
            or tuple(self.dilation_rate) != (1, 1, 1)
            or self.data_format != "channels_last"
            or self.padding != "same"
        )
        if plain:
            return super().convolution_op(inputs, kernel)
        return column_conv3d(inputs, kernel, tuple(self.strides))


def _scope(*parts: str) -> str:
    return ".".join(p.replace("/", ".") for p in parts)


def _batch_norm(config: EncoderConfig, name: str, dtype) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=config.bn_momentum, epsilon=config.bn_epsilon, name=name, dtype=dtype)


def build_graph(config: EncoderConfig, *, include_projection: bool = False, precision: str = "float32"):
    """Build the functional graph of ``config`` computing in ``precision``.

    The backbone runs in ``precision`` (a Keras mixed policy: float32 variables); the
    global average pool and the heads always run in float32: they cost nothing and the
    embedding keeps float32 resolution.

    Returns
    -------
    inputs : keras.KerasTensor
        ``[B, x, y, z, 1]`` in ``config.input_dtype``.
    outputs : keras.KerasTensor or dict
        The embedding ``[B, D]``; with ``include_projection`` a dict with ``"embedding"``
        and ``"projection"`` (``[B, P]``, not normalised).
    """
    backbone = config.backbone_scope
    dtype = PRECISION_POLICIES[normalise_precision(precision)]
    inputs = keras.Input(shape=(*config.input_size_vox, 1), dtype=config.input_dtype, name="cutouts")
    x = inputs
    if config.input_dtype == "uint8":
        x = UnitScale(name="unit_scale", dtype=dtype)(x)
    if config.axis_order != "xyz":
        perm = (*("xyz".index(a) + 1 for a in config.axis_order), 4)
        x = layers.Permute(perm, name="axis_order", dtype=dtype)(x)

    def conv(filters, kernel, stride, name, kind=layers.Conv3D):
        return kind(filters, kernel, strides=stride, padding="same", use_bias=True, name=name, dtype=dtype)

    # The stem class only differs from Conv3D in reduced precision; float32 graphs (the
    # ones written to .keras files) keep plain Conv3D layers.
    stem = ColumnStemConv3D if dtype != "float32" else layers.Conv3D
    x = conv(config.stem_filters, config.stem_kernel, config.stem_stride, _scope(backbone, "stage_1", "conv1"), stem)(x)
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
    # Averaging 5^3 (or more) values and the dense head run in float32 (the layer casts
    # its input up): they are cheap, and the head's BNs amplify small differences.
    x = layers.GlobalAveragePooling3D(name=_scope(backbone, "avg_pool"), dtype="float32")(x)

    def head(x, scope, widths):
        for i, width in enumerate(widths):
            x = layers.Dense(width, use_bias=False, name=_scope(scope, f"nl_{i}", "dense"), dtype="float32")(x)
            x = _batch_norm(config, _scope(scope, f"nl_{i}", f"nl_{i}_bn"), "float32")(x)
            if i < len(widths) - 1:
                x = layers.ReLU(name=_scope(scope, f"nl_{i}", "relu"), dtype="float32")(x)
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
    precision
        ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or the Keras policy names
        ``"mixed_bfloat16"``, ``"mixed_float16"``): what the backbone computes in; see
        :func:`build_graph`. Weights are float32 in every precision.
    """

    def __init__(
        self,
        encoder_config: EncoderConfig | dict,
        include_projection: bool = False,
        name: str | None = None,
        precision: str = "float32",
        **kwargs: Any,
    ):
        config = (
            encoder_config if isinstance(encoder_config, EncoderConfig) else EncoderConfig.from_dict(encoder_config)
        )
        precision = normalise_precision(precision)
        inputs, outputs = build_graph(config, include_projection=include_projection, precision=precision)
        super().__init__(inputs=inputs, outputs=outputs, name=name or config.name, **kwargs)
        self.encoder_config = config
        self.include_projection = bool(include_projection)
        self._precision = precision
        self._inference_fn: Callable[[Any], Any] | None = None
        self._jit_compile = False

    def get_config(self) -> dict:
        config = {
            "encoder_config": self.encoder_config.to_dict(),
            "include_projection": self.include_projection,
            "name": self.name,
        }
        # Only reduced precision is recorded, so float32 files stay readable by SegScope
        # versions that predate the option (save_encoder always writes float32).
        if self._precision != "float32":
            config["precision"] = self._precision
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> SegClrEncoder:
        return cls(**config)

    # -- precision -------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """What the backbone computes in: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
        return self._precision

    def with_precision(self, precision: str) -> SegClrEncoder:
        """The same encoder computing in ``precision``.

        ``self`` when it already does, else a copy holding the current weights (building
        the full model takes a few seconds).
        """
        precision = normalise_precision(precision)
        if precision == self._precision:
            return self
        copy = SegClrEncoder(
            self.encoder_config, include_projection=self.include_projection, name=self.name, precision=precision
        )
        copy.set_weights(self.get_weights())
        return copy

    def set_weights(self, weights) -> None:
        super().set_weights(weights)
        self._inference_fn = None  # a frozen reduced-precision graph holds the old weights

    def load_weights(self, filepath, skip_mismatch: bool = False, **kwargs) -> None:
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        self._inference_fn = None

    # -- inference -------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.encoder_config.embedding_dim

    def set_jit_compile(self, enabled: bool) -> None:
        """Use XLA for :meth:`embed` on the TensorFlow backend.

        Off by default: on the 2-core CPU machine XLA ran the lite model 6-8x slower and
        the full model about 2x slower (float32, TF 2.21). A reduced-precision encoder with
        XLA on runs unfrozen (see :meth:`embed`).
        """
        self._jit_compile = bool(enabled)
        self._inference_fn = None

    def _forward_fn(self):
        if self._inference_fn is None:
            if keras.backend.backend() == "tensorflow":
                self._inference_fn = self._tensorflow_forward()
            else:

                def forward_other(x):
                    out = self.predict_on_batch(x)
                    return out["embedding"] if isinstance(out, dict) else out

                self._inference_fn = forward_other
        return self._inference_fn

    def _tensorflow_forward(self) -> Callable[[np.ndarray], np.ndarray]:
        import tensorflow as tf

        model = self

        # A tf.function around the call avoids predict()'s per-call setup cost;
        # reduce_retracing keeps a ragged last batch from compiling a new graph every time.
        @tf.function(jit_compile=self._jit_compile, reduce_retracing=True)
        def forward(x):
            out = model(x, training=False)
            return out["embedding"] if isinstance(out, dict) else out

        if self._precision == "float32" or self._jit_compile:
            return lambda x: forward(x).numpy()
        # Reduced precision: freeze the weights into the graph. Grappler then casts them to
        # bfloat16 once instead of on every call, and oneDNN keeps constant filters in its
        # blocked layout instead of reordering them per call: 12-15 % faster for the full
        # encoder on the 2-core CPU, at a few seconds of extra set-up on the first call.
        # set_weights/load_weights drop the frozen graph; see embed() for assign().
        try:
            from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

            spec = tf.TensorSpec((None, *self.encoder_config.input_size_vox, 1), self.encoder_config.input_dtype)
            frozen = convert_variables_to_constants_v2(forward.get_concrete_function(spec))
        except Exception as exc:  # a TensorFlow without this private helper: run unfrozen
            logger.warning("could not freeze the %s encoder graph (%s); running it unfrozen", self._precision, exc)
            return lambda x: forward(x).numpy()
        return lambda x: frozen(tf.constant(x))[0].numpy()

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
            float32 ``[B, D]`` embeddings (not normalised), whatever :attr:`precision`.

        Notes
        -----
        In reduced precision on TensorFlow the first call freezes the current weights into
        the graph; :meth:`set_weights` and :meth:`load_weights` unfreeze it, assigning to
        variables directly does not (call ``set_weights(get_weights())`` after that).
        """
        arr = self.prepare_input(cutouts)
        if len(arr) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        step = len(arr) if not batch_size else int(batch_size)
        forward = self._forward_fn()
        parts = [np.asarray(forward(arr[i : i + step]), dtype=np.float32) for i in range(0, len(arr), step)]
        return np.concatenate(parts, axis=0)


def build_encoder(
    config: EncoderConfig, *, include_projection: bool = False, seed: int | None = None, precision: str = "float32"
) -> SegClrEncoder:
    """A freshly initialised encoder of ``config`` (random weights) computing in ``precision``."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return SegClrEncoder(config, include_projection=include_projection, precision=precision)


def weight_names(model: keras.Model) -> dict[str, Any]:
    """Map TF1 variable names (``scope/.../kernel``) to the model's Keras variables."""
    names: dict[str, Any] = {}
    for layer in model.layers:
        for variable in layer.weights:
            tf1_name = f"{layer.name.replace('.', '/')}/{variable.name}"
            names[tf1_name] = variable
    return names
