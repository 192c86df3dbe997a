"""Tests of the SegCLR encoder family: architecture, checkpoints, saving, cost model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.encoder import (
    SEGCLR_FULL,
    SEGCLR_LITE,
    CheckpointMismatchError,
    EncoderConfig,
    build_encoder,
    flops_per_cutout,
    layer_costs,
    load_checkpoint,
    load_encoder,
    open_encoder,
    parameter_count,
    read_encoder_config,
    resolve_checkpoint_prefix,
    save_checkpoint,
    save_encoder,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
REFERENCE = FIXTURES / "segclr_reference"

# Small enough to run a forward pass in milliseconds; even, anisotropic input sizes
# exercise TensorFlow's SAME rule (extra pad at the end) on every strided layer.
TINY = EncoderConfig(
    name="tiny",
    input_size_vox=(18, 14, 11),
    voxel_size_nm=(64.0, 64.0, 80.0),
    stem_filters=4,
    stem_kernel=3,
    stage_filters=(4, 6),
    stage_blocks=(1, 2),
    stage_strides=(1, 2),
    bottleneck_widths=(8, 5),
    projection_widths=(5, 3),
)


def _random_cutouts(config: EncoderConfig, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cutouts = rng.integers(0, 256, size=(n, *config.input_size_vox), dtype=np.uint8)
    # Masked EM is mostly zero outside the object.
    cutouts[:, : config.input_size_vox[0] // 3] = 0
    return cutouts


def _randomise_bn_statistics(encoder, seed: int = 1) -> None:
    """Freshly built BNs are identities; give them non-trivial statistics to test with."""
    rng = np.random.default_rng(seed)
    for variable in encoder.weights:
        if variable.name in ("moving_mean", "beta"):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
        elif variable.name in ("moving_variance", "gamma"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


@pytest.fixture(scope="module")
def tiny_encoder():
    encoder = build_encoder(TINY, include_projection=True, seed=3)
    _randomise_bn_statistics(encoder)
    return encoder


# -- numpy reference of SegCLR's TF1 graph, written independently of Keras -------------


def _pad_same(x: np.ndarray, kernel: int, stride: int, value: float) -> np.ndarray:
    pads = [(0, 0)]
    for n in x.shape[1:4]:
        out = -(-n // stride)
        total = max((out - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))  # TF: the odd pad goes at the end
    pads.append((0, 0))
    return np.pad(x, pads, constant_values=value)


def _conv(x, kernel, bias, stride):
    k = kernel.shape[0]
    out_shape = [-(-n // stride) for n in x.shape[1:4]]
    xp = _pad_same(x, k, stride, 0.0)
    out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            for m in range(k):
                window = xp[:, i::stride, j::stride, m::stride][:, : out_shape[0], : out_shape[1], : out_shape[2]]
                out += window @ kernel[i, j, m]
    return out + bias


def _max_pool(x):
    out_shape = [-(-n // 2) for n in x.shape[1:4]]
    xp = _pad_same(x, 3, 2, -np.inf)
    out = np.full((x.shape[0], *out_shape, x.shape[-1]), -np.inf)
    for i in range(3):
        for j in range(3):
            for m in range(3):
                out = np.maximum(out, xp[:, i::2, j::2, m::2][:, : out_shape[0], : out_shape[1], : out_shape[2]])
    return out


def _bn(x, w, scope, eps):
    return (x - w[f"{scope}/moving_mean"]) / np.sqrt(w[f"{scope}/moving_variance"] + eps) * w[f"{scope}/gamma"] + w[
        f"{scope}/beta"
    ]


def _reference_forward(config: EncoderConfig, w: dict, cutouts: np.ndarray) -> dict:
    eps = config.bn_epsilon
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    bb = config.backbone_scope
    x = cutouts[..., None].astype(np.float64) / 255
    x = _conv(x, w[f"{bb}/stage_1/conv1/kernel"], w[f"{bb}/stage_1/conv1/bias"], config.stem_stride)
    x = _bn(x, w, f"{bb}/stage_1/bn1", eps)  # no ReLU in the stem
    x = _max_pool(x)
    for s, stride in enumerate(config.stage_strides):
        for b, block in enumerate(config.block_names(s)):
            p = f"{bb}/stage_{s + 2}/{block}"
            block_in, block_stride = x, (stride if b == 0 else 1)
            for i, st in enumerate((block_stride, 1)):
                x = relu(_conv(x, w[f"{p}/conv_{i}/kernel"], w[f"{p}/conv_{i}/bias"], st))
                x = _bn(x, w, f"{p}/bn_{i}", eps)
            if b == 0:
                sc = _conv(block_in, w[f"{p}/shortcut_conv/kernel"], w[f"{p}/shortcut_conv/bias"], block_stride)
                sc = _bn(sc, w, f"{p}/shortcut_bn", eps)
            else:
                sc = block_in
            x = relu(x + sc)
    x = x.mean(axis=(1, 2, 3))

    def head(x, scope, widths):
        for i in range(len(widths)):
            x = _bn(x @ w[f"{scope}/nl_{i}/dense/kernel"], w, f"{scope}/nl_{i}/nl_{i}_bn", eps)
            if i < len(widths) - 1:
                x = relu(x)
        return x

    embedding = head(x, config.bottleneck_scope, config.bottleneck_widths)
    return {"embedding": embedding, "projection": head(embedding, config.projection_scope, config.projection_widths)}


def _tf1_weights(encoder) -> dict:
    from segscope.analysis.encoder.model import weight_names

    return {name: np.asarray(v.numpy(), dtype=np.float64) for name, v in weight_names(encoder).items()}


# -- architecture ----------------------------------------------------------------------


def test_tiny_encoder_matches_independent_numpy_reference(tiny_encoder):
    cutouts = _random_cutouts(TINY, 3)
    expected = _reference_forward(TINY, _tf1_weights(tiny_encoder), cutouts)
    outputs = tiny_encoder(tiny_encoder.prepare_input(cutouts), training=False)
    np.testing.assert_allclose(np.asarray(outputs["embedding"]), expected["embedding"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(outputs["projection"]), expected["projection"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tiny_encoder.embed(cutouts), expected["embedding"], rtol=1e-4, atol=1e-4)


def test_layer_shapes_follow_tf_same_rule_and_cost_model():
    """Every conv/pool output has ceil(n / stride) voxels, as the cost model assumes."""
    encoder = build_encoder(TINY)
    by_name = {layer.name: layer for layer in encoder.layers}
    costs = layer_costs(TINY)
    for cost in costs:
        if cost.kind in ("conv3d", "maxpool3d", "dense"):
            assert tuple(by_name[cost.name].output.shape[1:]) == cost.output_shape, cost.name
    assert costs[0].output_shape[:3] == (9, 7, 6)  # ceil((18, 14, 11) / 2)


def test_block_order_and_batch_norm_settings_follow_segclr():
    encoder = build_encoder(SEGCLR_FULL)
    names = [layer.name for layer in encoder.layers]
    stem = "base_model_0.resnet18.stage_1"
    # Stem: conv -> BN -> pool with no ReLU in between.
    assert names[names.index(f"{stem}.conv1") + 1 : names.index(f"{stem}.pool1") + 1] == [
        f"{stem}.bn1",
        f"{stem}.pool1",
    ]
    block = "base_model_0.resnet18.stage_2.block_a"
    i = names.index(f"{block}.conv_0")
    assert names[i : i + 3] == [f"{block}.conv_0", f"{block}.relu_0", f"{block}.bn_0"]
    # stage_2 has a 1x1 conv shortcut although its stride is 1.
    assert f"{block}.shortcut_conv" in names and f"{block}.shortcut_bn" in names
    bns = [layer for layer in encoder.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert bns and all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)
    assert encoder.output.shape == (None, 64)
    assert encoder.count_params() == parameter_count(SEGCLR_FULL) == 33_740_224


def test_full_model_costs_published_74_85_gflop():
    assert flops_per_cutout(SEGCLR_FULL) / 1e9 == pytest.approx(74.85, abs=0.005)
    conv_only = sum(c.flops for c in layer_costs(SEGCLR_FULL) if c.kind == "conv3d")
    assert conv_only / flops_per_cutout(SEGCLR_FULL) > 0.99


def test_lite_config_is_much_cheaper_and_embeds_64d():
    assert flops_per_cutout(SEGCLR_LITE) < flops_per_cutout(SEGCLR_FULL) / 100
    assert SEGCLR_LITE.downsample_from((32, 32, 40)) == (2, 2, 2)
    encoder = build_encoder(SEGCLR_LITE, seed=0)
    embeddings = encoder.embed(_random_cutouts(SEGCLR_LITE, 3))
    assert embeddings.shape == (3, 64) and embeddings.dtype == np.float32
    assert np.all(np.isfinite(embeddings))


def test_axis_order_transposes_inside_the_model(tiny_encoder):
    cube = TINY.with_updates(input_size_vox=(12, 10, 8))
    xyz = build_encoder(cube, seed=5)
    zyx = build_encoder(cube.with_updates(axis_order="zyx", input_size_vox=(8, 10, 12)))
    zyx.set_weights(xyz.get_weights())
    cutouts = _random_cutouts(cube, 2)
    np.testing.assert_allclose(zyx.embed(cutouts.transpose(0, 3, 2, 1)), xyz.embed(cutouts), rtol=1e-5, atol=1e-5)


def test_embed_validates_input_and_accepts_channel_axis(tiny_encoder):
    cutouts = _random_cutouts(TINY, 4)
    np.testing.assert_allclose(
        tiny_encoder.embed(cutouts[..., None], batch_size=3), tiny_encoder.embed(cutouts), rtol=1e-5, atol=1e-5
    )
    assert tiny_encoder.embed(cutouts[:0]).shape == (0, 5)
    with pytest.raises(ValueError, match="expects"):
        tiny_encoder.embed(np.zeros((1, 5, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tiny_encoder.embed(cutouts.astype(np.float32))
    with pytest.raises(ValueError, match="one channel"):
        tiny_encoder.embed(np.zeros((1, *TINY.input_size_vox, 2), np.uint8))


def test_config_round_trip_and_validation():
    assert EncoderConfig.from_dict(json.loads(json.dumps(SEGCLR_LITE.to_dict()))) == SEGCLR_LITE
    with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
        EncoderConfig.from_dict({**SEGCLR_FULL.to_dict(), "dropout": 0.5})
    with pytest.raises(ValueError, match="newer"):
        EncoderConfig.from_dict({**SEGCLR_FULL.to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match="axis_order"):
        SEGCLR_FULL.with_updates(axis_order="xxy")
    with pytest.raises(ValueError, match="same"):
        SEGCLR_FULL.with_updates(stage_blocks=(2, 2))
    with pytest.raises(ValueError, match="integer multiple"):
        SEGCLR_LITE.downsample_from((30, 32, 40))


# -- checkpoints -----------------------------------------------------------------------


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="SegCLR reference fixture not available")
def test_full_model_reproduces_segclr_reference_from_both_layouts(tmp_path):
    """The one full-size test: SegCLR's own outputs from the object- and name-based files."""
    import tensorflow as tf

    from segscope.analysis.encoder.checkpoint import rename_checkpoint

    cutouts = np.load(REFERENCE / "cutouts.npz")["cutouts"]
    expected = np.load(REFERENCE / "embeddings.npy")

    # float32 is what reproduces SegCLR to 1e-3; tests/test_precision.py bounds bfloat16.
    encoder = load_checkpoint(REFERENCE / "ckpt_object", precision="float32")
    assert encoder.precision == "float32"
    np.testing.assert_allclose(encoder.embed(cutouts), expected, rtol=0, atol=1e-3)
    assert encoder.encoder_config.model_version == "model.ckpt-0.training_tf2resaved-1"

    prefix = rename_checkpoint(REFERENCE / "ckpt_object", tmp_path / "tf1" / "model.ckpt-0", layout="name")
    keys = dict(tf.train.list_variables(prefix))
    assert keys["base_model_0/resnet18/stage_1/conv1/kernel"] == [7, 7, 7, 1, 64]
    assert not any(k.startswith("_tf1_style_var_store") for k in keys)
    from_names = load_checkpoint(tmp_path / "tf1", precision="float32")  # the folder, via its 'checkpoint' file
    np.testing.assert_allclose(from_names.embed(cutouts, batch_size=2), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout", ["name", "object"])
def test_checkpoint_round_trip_in_both_layouts(tiny_encoder, tmp_path, layout):
    import tensorflow as tf

    prefix = save_checkpoint(tiny_encoder, tmp_path / "ckpt" / "model.ckpt-7", layout=layout)
    keys = [k for k, _ in tf.train.list_variables(prefix)]
    conv = "base_model_0/resnet18/stage_1/conv1/kernel"
    if layout == "object":
        assert (
            "_tf1_style_var_store/_vars/base_model_0.Sresnet18.Sstage_1.Sconv1.Skernel/.ATTRIBUTES/VARIABLE_VALUE"
            in keys
        )
    else:
        assert conv in keys
    loaded = load_checkpoint(prefix, TINY, include_projection=True, precision="float32")
    cutouts = _random_cutouts(TINY, 2)
    np.testing.assert_array_equal(loaded.embed(cutouts), tiny_encoder.embed(cutouts))
    # The training head comes along when asked for.
    np.testing.assert_array_equal(
        loaded.get_layer("projection_head_0_0.nl_1.dense").get_weights()[0],
        tiny_encoder.get_layer("projection_head_0_0.nl_1.dense").get_weights()[0],
    )


def test_checkpoint_missing_variable_is_named(tiny_encoder, tmp_path):
    from segscope.analysis.encoder.checkpoint import rename_checkpoint

    good = save_checkpoint(tiny_encoder, tmp_path / "good" / "model.ckpt", layout="object")
    dropped = "base_model_0/resnet18/stage_3/block_b/bn_1/moving_variance"
    bad = rename_checkpoint(good, tmp_path / "bad" / "model.ckpt", drop=[dropped])
    with pytest.raises(CheckpointMismatchError, match="1 missing variable") as info:
        load_checkpoint(bad, TINY)
    assert info.value.missing == [dropped] and dropped in str(info.value)
    # Without the projection head requested, its absence is no error.
    no_head = rename_checkpoint(
        good,
        tmp_path / "nohead" / "model.ckpt",
        drop=[*info.value.missing, "projection_head_0_0/nl_0/dense/kernel"],
    )
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(no_head, TINY)  # still misses the BN variance
    only_head_missing = rename_checkpoint(
        good, tmp_path / "head" / "model.ckpt", drop=["projection_head_0_0/nl_0/dense/kernel"]
    )
    load_checkpoint(only_head_missing, TINY)
    with pytest.raises(CheckpointMismatchError, match="projection_head_0_0/nl_0/dense/kernel"):
        load_checkpoint(only_head_missing, TINY, include_projection=True)


def test_checkpoint_misshaped_kernel_is_named(tiny_encoder, tmp_path):
    from segscope.analysis.encoder.checkpoint import rename_checkpoint

    good = save_checkpoint(tiny_encoder, tmp_path / "good" / "model.ckpt", layout="name")
    target = "base_model_0/resnet18/stage_2/block_a/conv_1/kernel"
    bad = rename_checkpoint(
        good, tmp_path / "bad" / "model.ckpt", transform=lambda name, v: v[..., :3] if name == target else v
    )
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(bad, TINY)
    assert info.value.misshaped == [(target, (3, 3, 3, 4, 3), (3, 3, 3, 4, 4))]
    assert f"mis-shaped {target}: checkpoint [3, 3, 3, 4, 3], encoder expects [3, 3, 3, 4, 4]" in str(info.value)
    # The published architecture does not fit a tiny checkpoint: every difference is listed.
    with pytest.raises(CheckpointMismatchError, match="missing variable"):
        load_checkpoint(good)


def test_bad_checkpoint_paths_get_clear_errors(tmp_path, tiny_encoder):
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint"):
        load_checkpoint(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no TensorFlow checkpoint \(\*.index\)"):
        load_checkpoint(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.ckpt.index").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable TensorFlow checkpoint"):
        load_checkpoint(junk)
    two = tmp_path / "two"
    save_checkpoint(tiny_encoder, two / "a", layout="object")
    save_checkpoint(tiny_encoder, two / "b", layout="object")
    with pytest.raises(FileNotFoundError, match="holds 2 checkpoints"):
        resolve_checkpoint_prefix(two)
    assert resolve_checkpoint_prefix(two / "a.index") == str(two / "a")


# -- SegScope's own model files --------------------------------------------------------


def test_keras_file_round_trip_keeps_config_and_weights(tiny_encoder, tmp_path):
    config = TINY.with_updates(model_version="demo-1", axis_order="zyx", input_size_vox=(11, 14, 18))
    encoder = build_encoder(config, seed=11)
    _randomise_bn_statistics(encoder)
    path = save_encoder(encoder, tmp_path / "models" / "demo.keras")
    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        saved = json.loads(archive.read("config.json"))
    assert members == {"config.json", "metadata.json", "model.weights.h5"}
    assert saved["config"]["encoder_config"]["voxel_size_nm"] == [64.0, 64.0, 80.0]
    assert read_encoder_config(path) == config

    loaded = load_encoder(path, precision="float32")
    assert loaded.encoder_config == config
    assert loaded.encoder_config.input_size_vox == (11, 14, 18)
    assert loaded.encoder_config.format_version == 1
    cutouts = _random_cutouts(config, 2)
    np.testing.assert_array_equal(loaded.embed(cutouts), encoder.embed(cutouts))


def test_load_encoder_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "absent.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a Keras"):
        load_encoder(junk)
    import keras

    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="not a SegScope encoder"):
        load_encoder(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match=r"\.keras"):
        save_encoder(build_encoder(TINY), tmp_path / "model.h5")


def test_open_encoder_dispatches_on_file_kind(tiny_encoder, tmp_path):
    cutouts = _random_cutouts(TINY, 2)
    expected = tiny_encoder.embed(cutouts)
    keras_file = save_encoder(tiny_encoder, tmp_path / "model" / "tiny.keras")
    prefix = save_checkpoint(tiny_encoder, tmp_path / "ckpt" / "model.ckpt-1", layout="object")
    for source, options in (
        (keras_file, {}),
        (keras_file.parent, {}),
        (prefix, {"config": TINY}),
        (tmp_path / "ckpt", {"config": TINY}),
    ):
        np.testing.assert_array_equal(open_encoder(source, precision="float32", **options).embed(cutouts), expected)
    with pytest.raises(FileNotFoundError):
        open_encoder(tmp_path / "missing")
