"""Contrastive training: loss maths, pairs, augmentations, a tiny run that learns."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from segscope.analysis.training import (
    PairSampler,
    TrainingConfig,
    augment_cutouts,
    learning_rate_at,
    nt_xent_per_anchor,
    split_cells,
    truncate_masks,
)


def test_nt_xent_matches_hand_computed_case():
    # a0 = b0 = e1, a1 = b1 = e2, temperature 1: every anchor sees its partner at
    # similarity 1 and the two others at 0, so l = -log(e / (e + 2)) for each of the four.
    z = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    per_anchor = np.asarray(nt_xent_per_anchor(z, temperature=1.0))
    expected = 2 * math.log(1 + 2 / math.e)
    assert np.allclose(per_anchor, expected, atol=1e-5)


def test_nt_xent_normalises_masks_self_and_uses_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    # Reference written out directly from the definition.
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = u @ u.T / 0.1
    n = 3
    terms = []
    for k in range(6):
        partner = (k + n) % 6
        others = [j for j in range(6) if j != k]
        terms.append(-(sim[k, partner] - np.log(np.exp(sim[k, others]).sum())))
    got = np.asarray(nt_xent_per_anchor(z * 5.0, temperature=0.1))  # scale must not matter
    assert np.allclose(got, 2 * np.array(terms), rtol=1e-4, atol=1e-4)
    # Mean over anchors = mean over a->b plus mean over b->a.
    assert math.isclose(float(got.mean()), float(np.mean(terms[:3]) + np.mean(terms[3:])), rel_tol=1e-4)


def test_pairs_come_from_one_segment_within_distance_and_distinct_segments():
    rng = np.random.default_rng(1)
    segs = np.repeat(np.arange(1, 11, dtype=np.uint64), 30)
    nodes = rng.uniform(0, 20_000, size=(300, 3))
    sampler = PairSampler(segs, nodes, max_distance_nm=4000.0)
    ids, a, b = sampler.sample(8, rng)
    assert len(set(ids.tolist())) == 8
    assert np.all(np.linalg.norm(a - b, axis=1) <= 4000.0 + 1e-9)
    lookup = {tuple(p): s for p, s in zip(nodes, segs)}
    assert all(lookup[tuple(p)] == s and lookup[tuple(q)] == s for p, q, s in zip(a, b, ids))
    # Never more pairs than segments.
    assert len(sampler.sample(50, rng)[0]) == 10


def test_sqrt_weighting_draws_short_fragments_more_often():
    # One 100-node segment and 20 one-node fragments: by node count a fragment is drawn
    # 20/120 of the time, by its square root 20/30.
    segs = np.r_[np.zeros(100, np.uint64), np.arange(1, 21, dtype=np.uint64)]
    nodes = np.random.default_rng(0).uniform(0, 5_000, size=(120, 3))
    shares = {}
    for weighting in ("nodes", "sqrt_nodes"):
        sampler = PairSampler(segs, nodes, max_distance_nm=3000.0, weighting=weighting)
        rng = np.random.default_rng(1)
        drawn = np.concatenate([sampler.sample(1, rng)[0] for _ in range(3000)])
        shares[weighting] = float(np.mean(drawn != 0))
    assert abs(shares["nodes"] - 20 / 120) < 0.03
    assert abs(shares["sqrt_nodes"] - 20 / 30) < 0.03
    with pytest.raises(ValueError, match="weighting"):
        PairSampler(segs, nodes, max_distance_nm=3000.0, weighting="uniform")


def test_augmentation_keeps_the_mask_and_changes_gray_values():
    rng = np.random.default_rng(2)
    em = rng.integers(50, 200, size=(4, 9, 9, 9), dtype=np.uint8)
    mask = np.zeros(em.shape, bool)
    mask[:, 2:7, 3:6, 1:8] = True
    config = TrainingConfig(flip_axes=False, permute_axes=False)
    out = augment_cutouts(em, mask, rng, config)
    assert out.dtype == np.uint8 and out.shape == em.shape
    assert np.all(out[~mask] == 0)
    assert not np.array_equal(out[mask], em[mask])
    # Flips/permutations move voxels but never create or destroy masked-in voxels.
    flipped = augment_cutouts(em, mask, rng, TrainingConfig(gray_jitter=False))
    assert [int((f > 0).sum()) for f in flipped] == [int((np.where(m, e, 0) > 0).sum()) for e, m in zip(em, mask)]


def test_truncation_clears_one_side_of_a_plane_near_the_centre():
    rng = np.random.default_rng(4)
    mask = np.ones((200, 41, 41, 41), bool)
    rows = np.arange(0, 200, 2)
    voxel_nm = (64.0, 64.0, 80.0)
    truncate_masks(mask, rows, voxel_nm, 100.0, 1200.0, rng)
    assert mask[1::2].all(), "rows not listed stay whole"
    axes_seen = set()
    for row in rows:
        kept = mask[row]
        assert kept[20, 20, 20], "the centre voxel (the skeleton node) is never cut"
        cleared = np.argwhere(~kept)
        # Exactly one axis is cut: the cleared voxels span the full range of the other two.
        spans = [len(np.unique(cleared[:, a])) for a in range(3)]
        axis = int(np.argmin(spans))
        axes_seen.add(axis)
        assert sorted(spans)[1:] == [41, 41]
        edge = cleared[:, axis]
        distance_vox = edge.min() - 20 if edge.min() > 20 else 20 - edge.max()
        assert 100.0 / voxel_nm[axis] - 1 <= distance_vox <= 1200.0 / voxel_nm[axis] + 1
        assert kept.sum() == 41 * 41 * (41 - spans[axis])
    assert axes_seen == {0, 1, 2}


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainingConfig(steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [learning_rate_at(s, config) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in itertools.pairwise(rates[10:]))
    assert rates[-1] < 1e-6


def test_cell_split_is_deterministic_and_disjoint():
    train, held = split_cells(range(20), 0.25, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 20
    assert np.array_equal(split_cells(range(20), 0.25, seed=3)[1], held)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from segscope.analysis.dataset import open_dataset
    from segscope.analysis.progress import drive
    from segscope.analysis.synthetic import generate_dataset

    return open_dataset(
        drive(generate_dataset(tmp_path_factory.mktemp("train") / "demo", seed=1, size_vox=(64, 64, 64)))
    )


def test_tiny_training_run_learns_and_resumes(small_demo, tmp_path):
    from segscope.analysis.encoder import SEGCLR_LITE, load_encoder
    from segscope.analysis.progress import drive
    from segscope.analysis.training import CellSplit, train_on_dataset

    tiny = SEGCLR_LITE.with_updates(
        input_size_vox=(17, 17, 17),
        stem_filters=8,
        stage_filters=(8, 16),
        stage_blocks=(1, 1),
        stage_strides=(1, 2),
        bottleneck_widths=(32, 16),
        projection_widths=(16, 8),
    )
    config = TrainingConfig(
        encoder=tiny.to_dict(), steps=80, batch_pairs=8, learning_rate=3e-3, warmup_steps=5, checkpoint_every=20, seed=0
    )
    split = CellSplit.for_dataset(small_demo, 0.2, seed=0)
    # Run in two parts to exercise resuming from the checkpoint.
    first = drive(train_on_dataset(small_demo, tmp_path, config, split=split, stop_at_step=40))
    assert first.steps_done == 40 and first.encoder_path is None
    result = drive(train_on_dataset(small_demo, tmp_path, config, split=split))
    assert result.steps_done == 80 and result.losses[:40] == first.losses
    chance = 2 * math.log(2 * config.batch_pairs - 1)  # loss of a projection that knows nothing
    start, end = np.mean(result.losses[:10]), np.mean(result.losses[-20:])
    print(f"loss first 10 steps {start:.3f}, last 20 steps {end:.3f}, chance {chance:.3f}")
    assert end < start and end < chance, (start, end, chance)
    encoder = load_encoder(result.encoder_path)
    assert encoder.encoder_config == tiny
    held = set(CellSplit.load(tmp_path / "split.json").eval_cells)
    assert held == set(split.eval_cells)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    import json

    from segscope.analysis.training import _save_checkpoint

    class Weights:
        fail = False

        def save_weights(self, path):
            if self.fail:
                raise OSError("disk full")
            path.write_bytes(b"w")

    class Optimizer:
        def __init__(self):
            self.variables = [np.zeros(2)]

    encoder, directory = Weights(), tmp_path / "checkpoint"
    _save_checkpoint(directory, encoder, Optimizer(), 50, [1.0], TrainingConfig())
    encoder.fail = True
    with pytest.raises(OSError, match="disk full"):
        _save_checkpoint(directory, encoder, Optimizer(), 100, [1.0, 0.5], TrainingConfig())
    assert json.loads((directory / "state.json").read_text())["step"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], "no half-written folder is left"
