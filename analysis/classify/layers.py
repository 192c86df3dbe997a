"""Keras 3 layers of SegCLR's SNGP embedding classifier (backend-neutral: ``keras.ops``).

Importing this module imports Keras; :mod:`segscope.analysis.classify` imports it only when a model
is built or loaded.

Network (``shared/docs/segclr-reference.md`` section 4)::

    x      = (embedding - mean) / std                       Standardize
    hidden = Dense(H)(x)                                    not spectrally normalised
    L times: x0 = hidden; ReLU; SN-Dense(H); ReLU; SN-Dense(H); hidden = x0 + hidden
    logits = RandomFeatureGP(K)(hidden)  or  Dense(K)(hidden)

With ``L = 0`` the output layer sees the standardised embedding directly. All activations
are ``[B, features]`` float32.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

from .configs import ClassifierConfig

_EPSILON = 1e-12


def _l2_normalize(vector):
    return vector * ops.rsqrt(ops.maximum(ops.sum(ops.square(vector)), _EPSILON))


def _constant_initializer(array: np.ndarray):
    """An initializer returning ``array`` (used for the frozen random-feature weights)."""

    def initialize(shape, dtype=None):
        if tuple(shape) != array.shape:
            raise ValueError(f"initializer holds shape {array.shape}, asked for {tuple(shape)}")
        return ops.convert_to_tensor(array, dtype=dtype)

    return initialize


def orthogonal_random_features(input_dim: int, num_features: int, rng: np.random.Generator) -> np.ndarray:
    """Orthogonal random features (Yu et al. 2016) for a unit-lengthscale RBF kernel.

    Frequencies are stacked blocks of ``input_dim`` orthonormal directions, each scaled by
    the norm of an independent standard Gaussian vector, so every column is distributed as
    a standard Gaussian vector while columns within a block are orthogonal (a lower-variance
    kernel estimate than i.i.d. Gaussian frequencies).

    Returns
    -------
    numpy.ndarray
        float32 ``[input_dim, num_features]``: one frequency per column.
    """
    blocks = []
    for _ in range(math.ceil(num_features / input_dim)):
        q, r = np.linalg.qr(rng.standard_normal((input_dim, input_dim)))
        # Fixing the signs by diag(r) makes q Haar-distributed (uniform over rotations).
        q = q * np.sign(np.diag(r))[None, :]
        norms = np.linalg.norm(rng.standard_normal((input_dim, input_dim)), axis=0)
        blocks.append(q * norms[None, :])
    return np.concatenate(blocks, axis=1)[:, :num_features].astype(np.float32)


@keras.saving.register_keras_serializable(package="segscope")
class Standardize(layers.Layer):
    """``(x - mean) / std`` per feature, with the training set's statistics as frozen weights.

    Parameters
    ----------
    mean, std : numpy.ndarray
        ``[D]`` statistics of the training embeddings; ``std`` must be positive.
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self._initial_mean = np.asarray(mean, dtype=np.float32)
        self._initial_std = np.asarray(std, dtype=np.float32)
        if self._initial_mean.ndim != 1 or self._initial_std.shape != self._initial_mean.shape:
            raise ValueError("mean and std must be 1-D arrays of equal length")
        if not (self._initial_std > 0).all():
            raise ValueError("standardisation std must be positive")

    def build(self, input_shape):
        if input_shape[-1] != self._initial_mean.size:
            raise ValueError(f"Standardize expects {self._initial_mean.size} features, got {input_shape[-1]}")
        self.mean = self.add_weight(
            name="mean",
            shape=self._initial_mean.shape,
            initializer=_constant_initializer(self._initial_mean),
            trainable=False,
        )
        self.std = self.add_weight(
            name="std",
            shape=self._initial_std.shape,
            initializer=_constant_initializer(self._initial_std),
            trainable=False,
        )

    def call(self, inputs):
        return ops.divide(ops.subtract(inputs, self.mean), self.std)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="segscope")
class SpectralNormDense(layers.Layer):
    """Dense layer whose kernel's spectral norm is bounded by ``norm_bound``.

    The effective kernel is ``W * bound / max(sigma, bound)``: rescaled by ``bound / sigma``
    only when ``sigma > bound``, untouched otherwise. ``sigma = |W u|`` estimates the
    largest singular value of ``W`` ``[in, units]`` with the power-iteration vector ``u``
    ``[1, units]`` (a non-trainable weight). Each call in training mode runs one power
    iteration and stores the new ``u``; inference reads ``u`` without changing it.

    Unlike edward2's ``SpectralNormalization`` (which SegCLR uses and which overwrites the
    kernel in place), the bound is a reparameterisation: the stored kernel stays raw, the
    gradient flows through ``sigma`` (``u`` held constant, as in Miyato et al. 2018), and
    nothing but ``u`` is written during a forward pass.
    """

    def __init__(self, units: int, norm_bound: float, *, kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        if norm_bound <= 0:
            raise ValueError(f"norm_bound must be positive, got {norm_bound}")
        self.units = int(units)
        self.norm_bound = float(norm_bound)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer="glorot_uniform",
            regularizer=self.kernel_regularizer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self.power_u = self.add_weight(
            name="power_u", shape=(1, self.units), initializer="random_normal", trainable=False
        )

    def _spectral_norm(self, u):
        return ops.sqrt(ops.sum(ops.square(ops.matmul(u, ops.transpose(self.kernel)))))

    def _scale(self, sigma):
        return self.norm_bound / ops.maximum(sigma, self.norm_bound)

    def normalized_kernel(self):
        """The kernel the layer applies at inference, ``[in, units]``."""
        sigma = self._spectral_norm(ops.convert_to_tensor(self.power_u))
        return self.kernel * self._scale(sigma)

    def call(self, inputs, training=False):
        u = ops.convert_to_tensor(self.power_u)
        if training:
            v = _l2_normalize(ops.matmul(u, ops.transpose(self.kernel)))
            u = ops.stop_gradient(_l2_normalize(ops.matmul(v, self.kernel)))
            self.power_u.assign(u)
        kernel = self.kernel * self._scale(self._spectral_norm(u))
        return ops.add(ops.matmul(inputs, kernel), self.bias)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)


@keras.saving.register_keras_serializable(package="segscope")
class RandomFeatureGP(layers.Layer):
    """Random-feature Gaussian-process output layer (SNGP, Liu et al. 2020).

    ``h = LayerNorm(x)``; ``phi = sqrt(2 / M) cos(h W / l + b)`` ``[B, M]`` with frozen
    orthogonal random frequencies ``W`` ``[H, M]``, phases ``b ~ U(0, 2 pi)`` ``[M]`` and
    kernel lengthscale ``l``;
    ``logits = phi beta`` ``[B, K]`` (``beta`` trainable, no bias). In training mode each
    call folds the batch into the precision matrix ``P`` ``[M, M]`` (non-trainable):
    ``P <- m P + (1 - m) phi^T phi / B``, or ``P <- P + phi^T phi`` when ``m = -1``.
    :meth:`reset_precision` zeroes it (every epoch, see :class:`ResetPrecisionEachEpoch`).
    Inference never writes ``P``.

    The ridge is not folded into ``P`` (edward2 starts ``P`` at ``ridge * I`` and lets the
    momentum decay it); the predictive variance is ``ridge * diag(phi (ridge I + P)^-1
    phi^T)``, computed from the frozen ``P`` by :mod:`segscope.analysis.classify.uncertainty`.

    The frequencies are divided by the kernel lengthscale ``relative_lengthscale *
    sqrt(H)`` (edward2 with ``normalize_input=True`` uses 1 whatever ``H``; see
    :class:`~segscope.analysis.classify.configs.ClassifierConfig` for why SegScope does not).

    Parameters
    ----------
    units : int
        Classes ``K``.
    num_inducing : int
        Random features ``M``.
    momentum : float
        In [0, 1), or -1 for an exact sum.
    ridge : float
        Ridge penalty (kept here so it travels with the layer).
    relative_lengthscale : float
        RBF lengthscale in units of ``sqrt(H)``, ``H`` the width of the inputs.
    seed : int or None
        Seeds the frozen random frequencies and phases. None leaves them zero, for a
        layer whose weights are about to be assigned from a saved classifier (drawing
        orthogonal features costs a QR per block, seconds on a busy machine).
    """

    def __init__(
        self,
        units: int,
        num_inducing: int,
        *,
        momentum: float = 0.999,
        ridge: float = 1e-3,
        relative_lengthscale: float = 0.5,
        seed: int | None = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if relative_lengthscale <= 0:
            raise ValueError(f"relative_lengthscale must be positive, got {relative_lengthscale}")
        self.units = int(units)
        self.relative_lengthscale = float(relative_lengthscale)
        self.lengthscale: float | None = None  # relative_lengthscale * sqrt(H), known once built
        self.num_inducing = int(num_inducing)
        self.momentum = float(momentum)
        self.ridge = float(ridge)
        self.seed = None if seed is None else int(seed)
        self.input_norm = layers.LayerNormalization(name="input_norm")
        #: Whether a training-mode call folds its batch into the precision matrix. The
        #: trainer turns this off and computes the precision once, after training, from the
        #: restored network (:func:`accumulated_precision`): ``phi^T phi`` of a 2048-feature
        #: layer is ~0.5 GFLOP a batch, most of an epoch's cost, and only the last epoch's
        #: sum survives. Read when the train step is traced, so set it before training.
        self.accumulate_in_training = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.lengthscale = self.relative_lengthscale * math.sqrt(input_dim)
        self.input_norm.build(input_shape)
        if self.seed is None:
            frequencies = np.zeros((input_dim, self.num_inducing), np.float32)
            phases = np.zeros(self.num_inducing, np.float32)
        else:
            rng = np.random.default_rng(self.seed)
            frequencies = orthogonal_random_features(input_dim, self.num_inducing, rng)
            phases = rng.uniform(0.0, 2.0 * math.pi, self.num_inducing).astype(np.float32)
        self.random_kernel = self.add_weight(
            name="random_kernel",
            shape=frequencies.shape,
            initializer=_constant_initializer(frequencies),
            trainable=False,
        )
        self.random_bias = self.add_weight(
            name="random_bias", shape=phases.shape, initializer=_constant_initializer(phases), trainable=False
        )
        self.output_kernel = self.add_weight(
            name="output_kernel", shape=(self.num_inducing, self.units), initializer="glorot_uniform"
        )
        self.precision = self.add_weight(
            name="precision", shape=(self.num_inducing, self.num_inducing), initializer="zeros", trainable=False
        )

    def random_features(self, inputs):
        """``phi`` ``[B, M]`` of hidden activations ``[B, H]``."""
        assert self.lengthscale is not None, "build() sets the lengthscale"
        normalized = self.input_norm(inputs) * (1.0 / self.lengthscale)
        projected = ops.matmul(normalized, self.random_kernel) + self.random_bias
        return math.sqrt(2.0 / self.num_inducing) * ops.cos(projected)

    def logits(self, features):
        """Logits ``[B, K]`` of random features ``[B, M]``."""
        return ops.matmul(features, self.output_kernel)

    def call(self, inputs, training=False):
        features = self.random_features(inputs)
        if training and self.accumulate_in_training:
            self._accumulate_precision(ops.stop_gradient(features))
        return self.logits(features)

    def _accumulate_precision(self, features):
        batch_precision = ops.matmul(ops.transpose(features), features)
        if self.momentum == -1:
            updated = self.precision + batch_precision
        else:
            batch_size = ops.cast(ops.shape(features)[0], features.dtype)
            updated = self.momentum * self.precision + (1.0 - self.momentum) * batch_precision / batch_size
        self.precision.assign(updated)

    def reset_precision(self):
        """Zero the precision matrix (start of an epoch)."""
        self.precision.assign(ops.zeros_like(self.precision))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)


def accumulated_precision(features: np.ndarray, batch_size: int, momentum: float) -> np.ndarray:
    """The precision matrix ``[M, M]`` one epoch of :meth:`RandomFeatureGP._accumulate_precision` leaves.

    ``features`` ``[N, M]`` are the random features of the epoch's examples in the order the
    batches of ``batch_size`` see them. Starting from zero (the per-epoch reset), the
    momentum recursion ``P <- m P + (1 - m) phi_b^T phi_b / B`` over batches ``b = 0..n-1``
    sums to ``sum_b (1 - m) m^(n-1-b) phi_b^T phi_b / B``, computed here as one weighted
    Gram matrix; ``m = -1`` is the plain sum ``phi^T phi``. float64 accumulation.
    """
    features = np.asarray(features, dtype=np.float64)
    count = features.shape[0]
    if momentum == -1:
        return features.T @ features
    batch_index = np.arange(count) // batch_size
    num_batches = int(batch_index[-1]) + 1 if count else 0
    sizes = np.bincount(batch_index, minlength=num_batches).astype(np.float64)
    row_weight = (1.0 - momentum) * momentum ** (num_batches - 1 - batch_index) / sizes[batch_index]
    scaled = features * np.sqrt(row_weight)[:, None]
    return scaled.T @ scaled


class ResetPrecisionEachEpoch(keras.callbacks.Callback):
    """Zeroes every :class:`RandomFeatureGP` precision matrix when an epoch begins.

    The precision is a posterior over the output weights given the features of the
    current network; features from earlier epochs were computed by older weights.
    """

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self.model.layers:
            if isinstance(layer, RandomFeatureGP):
                layer.reset_precision()


class ClassifierNet(keras.Model):
    """SegCLR's ``DeepResNet`` family: standardise, residual SN blocks, GP or Dense output.

    ``call(embeddings [B, D], training)`` returns logits ``[B, K]``. Layer names are fixed
    so that weight paths are stable between processes (the save format keys on them).

    Parameters
    ----------
    config : ClassifierConfig
    mean, std : numpy.ndarray
        ``[D]`` standardisation statistics.
    num_classes : int
    seed : int or None
        Seeds the GP layer's frozen random features (None: left zero, for loading).
        Trainable initial weights come from Keras' global RNG (seeded by the caller).
    """

    def __init__(self, config: ClassifierConfig, mean, std, num_classes: int, *, seed: int | None = 0, **kwargs):
        kwargs.setdefault("name", "segscope_classifier")
        super().__init__(**kwargs)
        self.classifier_config = config
        self.num_classes = int(num_classes)
        self.num_features = int(np.asarray(mean).size)
        self.standardize = Standardize(mean, std, name="standardize")
        regularizer = keras.regularizers.L2(config.l2_reg) if config.l2_reg > 0 else None
        self.input_dense = layers.Dense(config.num_hidden, name="input_dense") if config.num_layers > 0 else None

        def block_dense(name):
            if config.spec_norm_bound > 0:
                return SpectralNormDense(
                    config.num_hidden, config.spec_norm_bound, kernel_regularizer=regularizer, name=name
                )
            return layers.Dense(config.num_hidden, kernel_regularizer=regularizer, name=name)

        self.first_dense = [block_dense(f"block_{i}_dense_0") for i in range(config.num_layers)]
        self.second_dense = [block_dense(f"block_{i}_dense_1") for i in range(config.num_layers)]
        self.output_layer: RandomFeatureGP | layers.Dense
        if config.uses_gp:
            self.output_layer = RandomFeatureGP(
                num_classes,
                config.num_inducing,
                momentum=config.gp_cov_momentum,
                ridge=config.gp_cov_ridge_penalty,
                relative_lengthscale=config.gp_relative_lengthscale,
                seed=seed,
                name="gp_output",
            )
        else:
            self.output_layer = layers.Dense(num_classes, kernel_regularizer=regularizer, name="dense_output")
        # Build eagerly so weights exist (and can be assigned) before any fit or predict.
        self(np.zeros((1, self.num_features), dtype=np.float32), training=False)

    @property
    def gp_layer(self) -> RandomFeatureGP | None:
        """The GP output layer, or None for a Dense output."""
        return self.output_layer if isinstance(self.output_layer, RandomFeatureGP) else None

    @property
    def spectral_layers(self) -> list[SpectralNormDense]:
        """The spectrally normalised Dense layers, in order."""
        return [
            layer
            for pair in zip(self.first_dense, self.second_dense)
            for layer in pair
            if isinstance(layer, SpectralNormDense)
        ]

    def hidden(self, inputs, training=False):
        """Hidden representation ``[B, H]`` (the standardised input when ``L = 0``)."""
        hidden = self.standardize(inputs)
        if self.input_dense is None:
            return hidden
        hidden = self.input_dense(hidden)
        for first, second in zip(self.first_dense, self.second_dense):
            residual = first(ops.relu(hidden), training=training)
            residual = second(ops.relu(residual), training=training)
            hidden = hidden + residual
        return hidden

    def call(self, inputs, training=False):
        return self.output_layer(self.hidden(inputs, training=training), training=training)

    def inference_outputs(self, inputs):
        """Logits ``[B, K]`` and random features ``[B, M]`` (None without GP), inference mode.

        Nothing is written: no power iteration, no precision update.
        """
        hidden = self.hidden(inputs, training=False)
        gp = self.gp_layer
        if gp is None:
            return self.output_layer(hidden), None
        features = gp.random_features(hidden)
        return gp.logits(features), features
