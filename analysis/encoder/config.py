"""Encoder configurations: the SegCLR ResNet family as plain data, plus its cost model.

Nothing here imports Keras or TensorFlow, so the CLI and the app can read a config, its
voxel size or its FLOP count without paying for a framework import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Version of the config schema written into saved SegScope models.
CONFIG_FORMAT_VERSION = 1

#: Largest cutout edge (voxels) a config may ask for: 4x SegCLR's 129, one cutout 512 MiB as uint8.
MAX_INPUT_SIZE_VOX = 512
#: Largest layer width (filters or dense units) a config may ask for.
MAX_WIDTH = 8192

_AXIS_ORDERS = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx")


#: Precisions an encoder can compute in, and the Keras dtype policy of its backbone.
PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def normalise_precision(precision: str | None) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for a precision or Keras policy name.

    Accepts the Keras policy names ``"mixed_bfloat16"`` and ``"mixed_float16"`` too (and
    None for float32). ``"auto"`` is resolved elsewhere
    (:func:`segscope.analysis.inference.resolve_precision`); here it is an error.

    Raises
    ------
    ValueError
        Any other name.
    """
    name = "float32" if precision is None else str(precision).lower().removeprefix("mixed_")
    if name not in PRECISION_POLICIES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_POLICIES)}, got {precision!r}")
    return name


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    """``values`` as a tuple of ints; ValueError naming the field for anything else."""
    try:
        items = tuple(values)
        if any(isinstance(v, bool) or not isinstance(v, (numbers.Real, str)) for v in items):
            raise TypeError
        result = tuple(int(v) for v in items)
        if any(not isinstance(v, (str, numbers.Integral)) and v != r for v, r in zip(items, result)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"invalid EncoderConfig: {name} must be a list of integers, got {values!r}") from None
    return result


def _same_out(size: int, stride: int) -> int:
    """Output length of a TensorFlow ``SAME`` convolution or pooling: ceil(size / stride)."""
    return -(-size // stride)


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of one encoder of the SegCLR 3-D ResNet family.

    The published SegCLR models are :data:`SEGCLR_FULL`; :data:`SEGCLR_LITE` is SegScope's
    CPU-sized sibling. Every field survives a save/load round trip.

    Attributes
    ----------
    input_size_vox
        Cutout size ``(x, y, z)`` in voxels of ``voxel_size_nm``.
    voxel_size_nm
        Voxel size ``(x, y, z)`` in nm of the cutouts the model expects.
    axis_order
        Order in which the cutout's spatial axes are fed to the network. Cutouts are always
        handed over as ``[B, x, y, z]``; ``"zyx"`` transposes them to ``[B, z, y, x]``
        inside the model. SegCLR trained with random axis permutations, so either works
        nearly equally; the reference fixture is fed as given (``"xyz"``).
    input_dtype
        ``"uint8"``: raw masked EM, divided by 255 inside the model; ``"float32"``: values
        already in [0, 1] (for training pipelines that augment in float).
    stem_filters, stem_kernel, stem_stride, stem_pool
        Stage 1: ``Conv3D(stem_filters, stem_kernel, stem_stride, bias) -> BN`` (no ReLU),
        then ``MaxPool3D(3, 2, SAME)`` when ``stem_pool``.
    stage_filters, stage_blocks, stage_strides
        One entry per residual stage (SegCLR's stage_2 ... stage_5): filters, number of
        blocks (``block_a``, ``block_b``...), stride of the first block.
    bottleneck_widths
        Widths of the bottleneck head's dense layers; the last is the embedding size.
    projection_widths
        Widths of the training-only projection head (input is the embedding).
    bn_momentum, bn_epsilon
        Batch-norm moving-average momentum and epsilon (SegCLR: 0.9, 1e-5).
    backbone_scope, bottleneck_scope, projection_scope
        TF1 variable scopes of the three parts; Keras layer names are these scopes with
        ``/`` written ``.``, so checkpoint variables map onto layers by name.
    model_version
        Free-form identifier of the trained weights (e.g. ``"segclr-216000"``).
    format_version
        :data:`CONFIG_FORMAT_VERSION` when the config was written.
    """

    name: str = "segclr_resnet18"
    input_size_vox: tuple[int, int, int] = (129, 129, 129)
    voxel_size_nm: tuple[float, float, float] = (32.0, 32.0, 40.0)
    axis_order: str = "xyz"
    input_dtype: str = "uint8"
    stem_filters: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    stage_filters: tuple[int, ...] = (64, 128, 256, 512)
    stage_blocks: tuple[int, ...] = (2, 2, 2, 2)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    bottleneck_widths: tuple[int, ...] = (512, 512, 64)
    projection_widths: tuple[int, ...] = (64, 64, 16)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    backbone_scope: str = "base_model_0/resnet18"
    bottleneck_scope: str = "bottleneck_head_0"
    projection_scope: str = "projection_head_0_0"
    model_version: str = ""
    format_version: int = field(default=CONFIG_FORMAT_VERSION)

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so configs compare equal after a JSON round trip.
        for name in (
            "input_size_vox",
            "stage_filters",
            "stage_blocks",
            "stage_strides",
            "bottleneck_widths",
            "projection_widths",
        ):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        try:
            object.__setattr__(self, "voxel_size_nm", tuple(float(v) for v in self.voxel_size_nm))
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid EncoderConfig: voxel_size_nm must be 3 numbers, got {self.voxel_size_nm!r}"
            ) from None
        for name in ("stem_filters", "stem_kernel", "stem_stride", "format_version"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                object.__setattr__(self, name, operator.index(value))  # numpy ints too
            except TypeError:
                raise ValueError(f"invalid EncoderConfig: {name} must be an integer, got {value!r}") from None
        for name in ("bn_momentum", "bn_epsilon"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"invalid EncoderConfig: {name} must be a finite number, got {value!r}")
        if not isinstance(self.stem_pool, bool):
            raise ValueError(f"invalid EncoderConfig: stem_pool must be true or false, got {self.stem_pool!r}")
        for name in (
            "model_version",
            "name",
            "axis_order",
            "input_dtype",
            "backbone_scope",
            "bottleneck_scope",
            "projection_scope",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"invalid EncoderConfig: {name} must be a string, got {getattr(self, name)!r}")
        self._validate()

    def _validate(self) -> None:
        problems = []
        if len(self.input_size_vox) != 3 or min(self.input_size_vox) < 1:
            problems.append(f"input_size_vox must be 3 positive ints, got {self.input_size_vox}")
        elif max(self.input_size_vox) > MAX_INPUT_SIZE_VOX:
            # A config read from a file is checked before any tensor is built: 10^6 voxels a
            # side would otherwise go on to allocate petabytes.
            problems.append(f"input_size_vox must be at most {MAX_INPUT_SIZE_VOX} a side, got {self.input_size_vox}")
        if (
            len(self.voxel_size_nm) != 3
            or not all(math.isfinite(v) for v in self.voxel_size_nm)
            or min(self.voxel_size_nm) <= 0
            or max(self.voxel_size_nm) > 1e6
        ):
            problems.append(f"voxel_size_nm must be 3 positive numbers up to 1e6, got {self.voxel_size_nm}")
        widths = self.stage_filters + self.bottleneck_widths + self.projection_widths + (self.stem_filters,)
        if widths and max(widths) > MAX_WIDTH:
            problems.append(f"filters and widths must be at most {MAX_WIDTH}, got {max(widths)}")
        if len(self.stage_filters) > 8:
            problems.append(f"at most 8 residual stages, got {len(self.stage_filters)}")
        if self.stem_kernel > 31 or max((*self.stage_strides, self.stem_stride), default=1) > 16:
            problems.append("stem_kernel must be at most 31 and strides at most 16")
        if not (0 <= self.bn_momentum < 1) or not (0 < self.bn_epsilon < 1):
            problems.append(
                f"bn_momentum in [0, 1) and bn_epsilon in (0, 1), got {self.bn_momentum}, {self.bn_epsilon}"
            )
        if self.axis_order not in _AXIS_ORDERS:
            problems.append(f"axis_order must be one of {_AXIS_ORDERS}, got {self.axis_order!r}")
        if self.input_dtype not in ("uint8", "float32"):
            problems.append(f"input_dtype must be 'uint8' or 'float32', got {self.input_dtype!r}")
        n_stages = len(self.stage_filters)
        if n_stages == 0 or len(self.stage_blocks) != n_stages or len(self.stage_strides) != n_stages:
            problems.append(
                "stage_filters, stage_blocks and stage_strides need the same, "
                f"non-zero length, got {self.stage_filters}, {self.stage_blocks}, "
                f"{self.stage_strides}"
            )
        if any(b < 1 or b > len(string.ascii_lowercase) for b in self.stage_blocks):
            problems.append(f"stage_blocks must be in 1..26, got {self.stage_blocks}")
        if (
            min(
                self.stage_filters + self.stage_strides + (self.stem_filters, self.stem_kernel, self.stem_stride),
                default=1,
            )
            < 1
        ):
            problems.append("filters, kernel sizes and strides must be positive")
        if not self.bottleneck_widths or min(self.bottleneck_widths) < 1:
            problems.append(f"bottleneck_widths must be non-empty and positive, got {self.bottleneck_widths}")
        if self.projection_widths and min(self.projection_widths) < 1:
            problems.append(f"projection_widths must be positive, got {self.projection_widths}")
        if problems:
            raise ValueError("invalid EncoderConfig: " + "; ".join(problems))

    # -- derived facts -------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector (last bottleneck width)."""
        return self.bottleneck_widths[-1]

    @property
    def network_input_shape(self) -> tuple[int, int, int]:
        """Spatial shape the network sees, after the ``axis_order`` transpose."""
        size = dict(zip("xyz", self.input_size_vox))
        return tuple(size[a] for a in self.axis_order)  # type: ignore[return-value]

    @property
    def field_of_view_nm(self) -> tuple[float, float, float]:
        """Physical extent ``(x, y, z)`` of one cutout in nm."""
        return tuple(n * v for n, v in zip(self.input_size_vox, self.voxel_size_nm))  # type: ignore[return-value]

    def downsample_from(self, source_voxel_nm) -> tuple[int, int, int]:
        """Integer factor per axis from a volume's voxels to this model's voxels.

        Raises
        ------
        ValueError
            When the model's voxel size is not an integer multiple of ``source_voxel_nm``.
        """
        factors = []
        for model_v, src_v in zip(self.voxel_size_nm, [float(v) for v in source_voxel_nm]):
            ratio = model_v / src_v
            rounded = round(ratio)
            if rounded < 1 or abs(ratio - rounded) > 1e-6:
                raise ValueError(
                    f"model voxel size {self.voxel_size_nm} nm is not an integer multiple of "
                    f"the volume's voxel size {tuple(source_voxel_nm)} nm"
                )
            factors.append(int(rounded))
        return tuple(factors)  # type: ignore[return-value]

    def block_names(self, stage_index: int) -> list[str]:
        """SegCLR block names of residual stage ``stage_index`` (0-based): a, b, c..."""
        return [f"block_{string.ascii_lowercase[i]}" for i in range(self.stage_blocks[stage_index])]

    def with_updates(self, **changes: Any) -> EncoderConfig:
        """A copy with some fields replaced (validated)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        """Inverse of :meth:`to_dict`; rejects unknown keys and newer format versions."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an encoder config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields {unknown}")
        try:
            version = int(data.get("format_version", CONFIG_FORMAT_VERSION))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"encoder config format_version must be an integer, got {data.get('format_version')!r}"
            ) from None
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"encoder config format {version} is newer than this SegScope understands "
                f"({CONFIG_FORMAT_VERSION}); upgrade SegScope"
            )
        return cls(**dict(data))


#: The published SegCLR encoder (MICrONS voxel size; H01 uses 32 x 32 x 33 nm).
SEGCLR_FULL = EncoderConfig()

#: SegScope's interactive CPU encoder: same family, coarser and narrower.
#: 41^3 voxels of 64 x 64 x 80 nm (demo data at 32 x 32 x 40 nm downsampled by 2) cover
#: 2.6 x 2.6 x 3.3 um; see benchmarks/bench_encoder.py for its throughput.
SEGCLR_LITE = EncoderConfig(
    name="segscope_lite",
    input_size_vox=(41, 41, 41),
    voxel_size_nm=(64.0, 64.0, 80.0),
    stem_filters=16,
    stem_kernel=5,
    stage_filters=(32, 64, 128),
    stage_blocks=(1, 1, 1),
    stage_strides=(1, 2, 2),
    bottleneck_widths=(128, 64),
    projection_widths=(64, 16),
    backbone_scope="base_model_0/resnet_lite",
)


# -- cost model ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """FLOPs of one layer for one cutout (a multiply-add counts as 2 FLOPs)."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    flops: int


def layer_costs(config: EncoderConfig, *, include_projection: bool = False) -> list[LayerCost]:
    """Analytic FLOP count per layer for one cutout, in network order.

    Counts convolutions and dense layers as ``2 * outputs * fan_in`` (multiply-add = 2),
    plus one FLOP per output for each bias add, residual add, and per window element for
    max pooling and global average pooling. Batch norm and ReLU are not counted (at
    inference BN folds into the preceding layer's scale and shift). With this rule the
    published SegCLR model costs 74.85 GFLOP per 129^3 cutout.
    """
    costs: list[LayerCost] = []
    spatial = list(config.network_input_shape)
    channels = 1
    scope = config.backbone_scope.replace("/", ".")

    def conv(name: str, size_in, cin, cout, kernel, stride, bias=True):
        out = [_same_out(s, stride) for s in size_in]
        n_out = out[0] * out[1] * out[2]
        flops = 2 * n_out * kernel**3 * cin * cout + (n_out * cout if bias else 0)
        costs.append(LayerCost(name, "conv3d", (*out, cout), flops))
        return out

    spatial = conv(
        f"{scope}.stage_1.conv1", spatial, channels, config.stem_filters, config.stem_kernel, config.stem_stride
    )
    channels = config.stem_filters
    if config.stem_pool:
        pooled = [_same_out(s, 2) for s in spatial]
        n_out = pooled[0] * pooled[1] * pooled[2]
        costs.append(LayerCost(f"{scope}.stage_1.pool1", "maxpool3d", (*pooled, channels), n_out * channels * 27))
        spatial = pooled
    for stage_index, (filters, stride) in enumerate(zip(config.stage_filters, config.stage_strides)):
        stage = f"{scope}.stage_{stage_index + 2}"
        for block_index, block in enumerate(config.block_names(stage_index)):
            block_stride = stride if block_index == 0 else 1
            prefix = f"{stage}.{block}"
            block_in = spatial
            mid = conv(f"{prefix}.conv_0", block_in, channels, filters, 3, block_stride)
            out = conv(f"{prefix}.conv_1", mid, filters, filters, 3, 1)
            if block_index == 0:
                conv(f"{prefix}.shortcut_conv", block_in, channels, filters, 1, block_stride)
            n_out = out[0] * out[1] * out[2]
            costs.append(LayerCost(f"{prefix}.add", "add", (*out, filters), n_out * filters))
            spatial, channels = out, filters
    n_vox = spatial[0] * spatial[1] * spatial[2]
    costs.append(LayerCost(f"{scope}.avg_pool", "global_avg_pool", (channels,), n_vox * channels))

    def dense_stack(head_scope: str, widths, fan_in):
        for i, width in enumerate(widths):
            costs.append(
                LayerCost(f"{head_scope.replace('/', '.')}.nl_{i}.dense", "dense", (width,), 2 * fan_in * width)
            )
            fan_in = width
        return fan_in

    embedding = dense_stack(config.bottleneck_scope, config.bottleneck_widths, channels)
    if include_projection and config.projection_widths:
        dense_stack(config.projection_scope, config.projection_widths, embedding)
    return costs


def flops_per_cutout(config: EncoderConfig, *, include_projection: bool = False) -> int:
    """Total FLOPs for one cutout at inference; see :func:`layer_costs` for the rule."""
    return sum(c.flops for c in layer_costs(config, include_projection=include_projection))


def parameter_count(config: EncoderConfig, *, include_projection: bool = False) -> int:
    """Number of inference weights (kernels, biases, BN gamma/beta/mean/variance)."""
    total = 0
    channels = 1
    total += config.stem_kernel**3 * channels * config.stem_filters + config.stem_filters
    total += 4 * config.stem_filters
    channels = config.stem_filters
    for stage_index, filters in enumerate(config.stage_filters):
        for block_index in range(config.stage_blocks[stage_index]):
            total += 27 * channels * filters + filters + 4 * filters
            total += 27 * filters * filters + filters + 4 * filters
            if block_index == 0:
                total += channels * filters + filters + 4 * filters
            channels = filters
    widths = list(config.bottleneck_widths)
    if include_projection:
        widths += list(config.projection_widths)
    for width in widths:
        total += channels * width + 4 * width
        channels = width
    return total
