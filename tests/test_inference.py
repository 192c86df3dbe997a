"""Tests of the streaming inference engine (tiny encoder, synthetic volumes)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from segscope.analysis.encoder import EncoderConfig, build_encoder
from segscope.analysis.inference import (
    EmbeddingBatch,
    InferenceCancelled,
    available_device,
    default_batch_size,
    is_out_of_memory,
    measure_mixed_precision_error,
    naive_segment_embeddings,
    stream_embeddings,
    stream_segment_embeddings,
)
from segscope.analysis.progress import drive

SMALL = EncoderConfig(
    name="small",
    input_size_vox=(12, 12, 10),
    voxel_size_nm=(64.0, 64.0, 80.0),
    stem_filters=4,
    stem_kernel=3,
    stage_filters=(4, 8),
    stage_blocks=(1, 1),
    stage_strides=(1, 2),
    bottleneck_widths=(8, 6),
    projection_widths=(6, 3),
)


@pytest.fixture(scope="module")
def encoder():
    enc = build_encoder(SMALL, seed=7)
    rng = np.random.default_rng(0)
    for variable in enc.weights:  # non-trivial BN statistics
        if variable.name == "moving_mean":
            variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    return enc


def _cutouts(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SMALL.input_size_vox), dtype=np.uint8)


def _batches(cutouts: np.ndarray, size: int):
    for start in range(0, len(cutouts), size):
        indices = np.arange(start, min(start + size, len(cutouts)))
        yield indices, cutouts[indices]


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "segscope-cutout-reader"]


def _run(gen):
    reports = []
    result = drive(gen, reports.append)
    return result, reports


def test_stream_equals_one_shot_embed_and_reports_progress(encoder):
    cutouts = _cutouts(11)
    result, reports = _run(stream_embeddings(encoder, _batches(cutouts, 4), 11, batch_size=3))
    np.testing.assert_allclose(result, encoder.embed(cutouts), rtol=1e-5, atol=1e-5)
    assert result.dtype == np.float32 and result.shape == (11, 6)
    # Reads of 4 are embedded in forward calls of at most 3.
    assert [r.done for r in reports] == [3, 4, 7, 8, 11]
    assert all(r.total == 11 and r.unit == "cutouts" and r.rate > 0 for r in reports)
    payloads = [r.payload for r in reports]
    assert all(isinstance(p, EmbeddingBatch) for p in payloads)
    np.testing.assert_array_equal(np.concatenate([p.indices for p in payloads]), np.arange(11))
    for p in payloads:
        np.testing.assert_array_equal(result[p.indices], p.embeddings)
    assert not _reader_threads()


def test_stream_keeps_caller_order_for_shuffled_batches(encoder):
    cutouts = _cutouts(6, seed=1)
    order = np.array([4, 0, 5, 2, 1, 3])
    batches = [(order[:3], cutouts[order[:3]]), (order[3:], cutouts[order[3:]])]
    result, reports = _run(stream_embeddings(encoder, batches, 6, batch_size=8))
    np.testing.assert_allclose(result, encoder.embed(cutouts), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reports[0].payload.indices, order[:3])


def test_empty_input_returns_empty_result(encoder):
    result, reports = _run(stream_embeddings(encoder, [], 0, batch_size=2))
    assert result.shape == (0, 6) and reports == []


def test_cancel_stops_between_batches_with_partial_result(encoder):
    cutouts = _cutouts(10)
    cancel = threading.Event()
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return encoder.embed(batch)

    gen = stream_embeddings(encoder, _batches(cutouts, 2), 10, batch_size=2, cancel=cancel, predict=predict)
    first = next(gen)
    cancel.set()
    with pytest.raises(InferenceCancelled) as info:
        next(gen)
    assert calls == [2] and first.done == 2
    assert info.value.done == 2
    assert info.value.computed.tolist() == [True, True] + [False] * 8
    np.testing.assert_allclose(info.value.embeddings[:2], encoder.embed(cutouts[:2]), rtol=1e-5, atol=1e-5)
    assert np.isnan(info.value.embeddings[2:]).all()
    assert not _reader_threads()


def test_cancel_accepts_a_callable_and_close_stops_the_reader(encoder):
    cutouts = _cutouts(8)
    with pytest.raises(InferenceCancelled):
        _run(stream_embeddings(encoder, _batches(cutouts, 2), 8, batch_size=2, cancel=lambda: True))
    gen = stream_embeddings(encoder, _batches(cutouts, 1), 8, batch_size=1, prefetch=1)
    next(gen)
    gen.close()  # a GUI dropping a superseded job
    assert not _reader_threads()
    with pytest.raises(TypeError, match="cancel"):
        _run(stream_embeddings(encoder, _batches(cutouts, 2), 8, batch_size=2, cancel="stop"))


def test_out_of_memory_halves_batch_and_continues(encoder):
    import tensorflow as tf

    cutouts = _cutouts(20)
    calls = []

    def predict(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return encoder.embed(batch)

    result, reports = _run(stream_embeddings(encoder, _batches(cutouts, 8), 20, batch_size=8, predict=predict))
    assert calls == [8, 4, 4, 4, 4, 4]
    assert [r.done for r in reports] == [4, 8, 12, 16, 20]
    np.testing.assert_allclose(result, encoder.embed(cutouts), rtol=1e-5, atol=1e-5)


def test_out_of_memory_at_batch_one_and_other_errors_propagate(encoder):
    import tensorflow as tf

    def always_oom(batch):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM")

    with pytest.raises(tf.errors.ResourceExhaustedError):
        _run(stream_embeddings(encoder, _batches(_cutouts(4), 2), 4, batch_size=2, predict=always_oom))

    def broken_reader():
        yield np.arange(2), _cutouts(2)
        raise OSError("chunk server went away")

    with pytest.raises(OSError, match="chunk server"):
        _run(stream_embeddings(encoder, broken_reader(), 4, batch_size=2))
    assert not _reader_threads()
    with pytest.raises(ValueError, match="covered 2 of 4"):
        _run(stream_embeddings(encoder, _batches(_cutouts(2), 2), 4, batch_size=2))


def test_out_of_memory_detection():
    import tensorflow as tf

    class XlaRuntimeError(RuntimeError):  # what jaxlib raises, by name
        pass

    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM"))
    assert is_out_of_memory(XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(XlaRuntimeError("INVALID_ARGUMENT: bad shape"))
    assert not is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED"))


def test_device_selection_on_this_machine(encoder):
    device = available_device()
    assert device in ("CPU", "GPU")
    if device == "CPU":
        with pytest.raises(ValueError, match="no GPU"):
            _run(stream_embeddings(encoder, [], 0, device="gpu"))
    with pytest.raises(ValueError, match="device must be"):
        _run(stream_embeddings(encoder, [], 0, device="tpu"))
    # Cheap models get big batches, the published one a single cutout per CPU call.
    from segscope.analysis.encoder import SEGCLR_FULL, SEGCLR_LITE

    class Stub:
        def __init__(self, config):
            self.encoder_config = config

    assert default_batch_size(Stub(SEGCLR_FULL), "cpu") == 1
    assert 8 <= default_batch_size(Stub(SEGCLR_LITE), "cpu") <= 64
    assert default_batch_size(Stub(SEGCLR_FULL), "auto") >= 1


def test_mixed_precision_error_is_measured(encoder):
    cutouts = _cutouts(4)
    report = measure_mixed_precision_error(encoder, cutouts, policy="mixed_bfloat16")
    # bfloat16 keeps 8 bits of mantissa: visible but small differences.
    assert 0 < report.max_abs and report.max_rel < 0.1 and report.min_cosine > 0.99
    result, _ = _run(
        stream_embeddings(encoder, _batches(cutouts, 2), 4, batch_size=2, mixed_precision="mixed_bfloat16")
    )
    assert np.abs(result - encoder.embed(cutouts)).max() == pytest.approx(report.max_abs, rel=0.5)


# -- through real volumes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A 48 x 48 x 40 voxel (32 x 32 x 40 nm) pair: noisy EM and a tube-shaped segment 7."""
    from segscope.analysis.volume import open_volume, write_volume

    root = tmp_path_factory.mktemp("vol")
    rng = np.random.default_rng(3)
    em = rng.integers(30, 220, (48, 48, 40), dtype=np.uint8)
    seg = np.ones((48, 48, 40), dtype=np.uint64)
    x, y, _z = np.meshgrid(np.arange(48), np.arange(48), np.arange(40), indexing="ij")
    seg[(x - 24) ** 2 + (y - 20) ** 2 < 64] = 7
    write_volume(root / "em", em, (32, 32, 40))
    write_volume(root / "seg", seg, (32, 32, 40), segmentation=True)
    return open_volume(root / "em"), open_volume(root / "seg")


def test_segment_stream_matches_one_shot_and_naive_loop(encoder, volumes):
    from segscope.analysis.volume import cut_masked

    image, segmentation = volumes
    centres = np.array([[24, 20, z] for z in (3, 10, 18, 25, 31, 37)], dtype=float) * (32, 32, 40)
    cutouts = cut_masked(image, segmentation, 7, centres, SMALL.input_size_vox, downsample=(2, 2, 2))
    expected = encoder.embed(cutouts)
    result, reports = _run(
        stream_segment_embeddings(encoder, image, segmentation, 7, centres, batch_size=4, read_batch_size=2)
    )
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    assert [r.done for r in reports] == [2, 4, 6] and reports[-1].message == "segment 7"
    naive = naive_segment_embeddings(encoder, image, segmentation, 7, centres)
    np.testing.assert_allclose(naive, expected, rtol=1e-5, atol=1e-5)


def test_segment_stream_rejects_incompatible_voxel_size(encoder, volumes):
    image, segmentation = volumes
    odd = build_encoder(SMALL.with_updates(voxel_size_nm=(48.0, 64.0, 80.0)))
    with pytest.raises(ValueError, match="integer multiple"):
        _run(stream_segment_embeddings(odd, image, segmentation, 7, np.array([[768.0, 640.0, 800.0]])))


@pytest.mark.parametrize("workers", [1, 2])
def test_node_stream_cuts_per_batch_across_segments_in_order(encoder, volumes, monkeypatch, workers):
    """Segments 7 and 1 interleaved in batches of 3: the rows come back in the given order,
    equal to one-shot embeddings, and no more cutouts are cut than the batches in flight."""
    from segscope.analysis import volume as volume_module
    from segscope.analysis.inference import stream_node_embeddings
    from segscope.analysis.volume import cut_masked

    image, segmentation = volumes
    tube = np.array([[24, 20, z] for z in (3, 10, 18, 25, 31)], dtype=float) * (32, 32, 40)
    corner = np.array([[4, 40, 5], [6, 42, 30]], dtype=float) * (32, 32, 40)
    segments = [(7, np.arange(3), tube[:3]), (1, np.arange(2), corner), (7, np.arange(3, 5), tube[3:])]
    expected = np.concatenate(
        [
            encoder.embed(cut_masked(image, segmentation, s, c, SMALL.input_size_vox, downsample=(2, 2, 2)))
            for s, _, c in segments
        ]
    )
    cut_sizes = []
    original = volume_module.cut_masked

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        cut_sizes.append(len(out))
        return out

    monkeypatch.setattr(volume_module, "cut_masked", counting)
    result, reports = _run(
        stream_node_embeddings(encoder, image, segmentation, segments, batch_size=3, cut_workers=workers)
    )
    np.testing.assert_allclose(result.embeddings, expected, rtol=1e-5, atol=1e-5)
    assert result.segment_ids.tolist() == [7, 7, 7, 1, 1, 7, 7]
    assert result.node_ids.tolist() == [0, 1, 2, 0, 1, 3, 4]
    assert [r.done for r in reports] == [3, 6, 7]
    assert max(cut_sizes) <= 3 and sum(cut_sizes) == 7  # cut batch by batch, each centre once
