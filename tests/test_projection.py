"""PCA and UMAP projections of embeddings, the numba cache, the umap import, context tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis.progress import drive
from segscope.analysis.projection import (
    Similarity,
    UmapSettings,
    align_layout,
    fit_pca,
    fit_umap,
    read_embedding_table,
    warm_up,
)

REPO = Path(__file__).resolve().parents[1]


def clustered(n_per_cluster: int = 100, dim: int = 64, n_clusters: int = 3, seed: int = 0):
    """float32 [n_clusters * n_per_cluster, dim] points around well separated centres, and labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per_cluster)
    points = centres[labels] + rng.normal(size=(len(labels), dim))
    return points.astype(np.float32), labels


def test_pca_shape_determinism_and_cluster_separation():
    points, labels = clustered()
    model = fit_pca(points)
    layout = model.transform(points)
    assert layout.shape == (300, 2) and layout.dtype == np.float32
    np.testing.assert_array_equal(layout, fit_pca(points).transform(points))
    # Sign convention: each axis's largest loading is positive (no random flips).
    assert (model.components[np.arange(2), np.abs(model.components).argmax(axis=1)] > 0).all()
    assert model.explained_variance[0] >= model.explained_variance[1] > 0
    # Same axes as an SVD, up to that sign.
    _, _, vt = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(model.components @ vt[:2].T), np.eye(2), atol=1e-3)
    # Clusters 10 units apart in 64-d stay apart in the 2-d layout.
    centroids = np.stack([layout[labels == c].mean(axis=0) for c in range(3)])
    spread = max(np.linalg.norm(layout[labels == c] - centroids[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centroids[a] - centroids[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 3 * spread


def test_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        fit_pca(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fit_pca(np.zeros(5))
    with pytest.raises(ValueError, match="zero embeddings"):
        fit_pca(np.zeros((0, 8)))
    model = fit_pca(np.random.default_rng(0).normal(size=(20, 8)))
    with pytest.raises(ValueError, match="fitted on 8-d"):
        model.transform(np.zeros((3, 5)))


def test_align_layout_undoes_rotation_reflection_scale_and_shift():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(200, 2))
    angle = 1.1
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])
    moved = 3.0 * reference @ rotation + np.array([5.0, -2.0])
    np.testing.assert_allclose(align_layout(moved, reference), reference, atol=1e-4)
    # The fitted mapping carries later points (placed by transform) into the same frame.
    similarity = Similarity.fit(moved[:150], reference[:150])
    np.testing.assert_allclose(similarity.apply(moved[150:]), reference[150:], atol=1e-4)
    with pytest.raises(ValueError, match=r"must both be \[N, 2\]"):
        align_layout(moved[:10], reference)


def run_python(code: str, cache: Path) -> list[str]:
    env = {**os.environ, "SEGSCOPE_CACHE_DIR": str(cache)}
    env.pop("NUMBA_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_numba_cache_lives_in_the_user_cache(tmp_path):
    code = (
        "from segscope.analysis.projection import configure_numba_cache\n"
        "print(configure_numba_cache())\n"
        "import os, numba.core.config as c; print(os.environ['NUMBA_CACHE_DIR']); print(c.CACHE_DIR)\n"
    )
    assert run_python(code, tmp_path) == [str(tmp_path / "numba")] * 3


@pytest.mark.slow
def test_umap_import_hides_tensorflow(tmp_path):
    """`import umap` pulls in TensorFlow (it crashes beside QtWebEngine); umap_module must not.

    Slow: with an empty numba cache, importing umap compiles pynndescent (about a minute).
    """
    code = (
        "import sys\n"
        "from segscope.analysis.projection import umap_module\n"
        "assert hasattr(umap_module(), 'UMAP')\n"
        "print('tf' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'no-tf')\n"
    )
    assert run_python(code, tmp_path) == ["no-tf"]


def write_embedding_parquet(path: Path, n: int = 50, dim: int = 4) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    columns = {
        "segment_id": pa.array(np.arange(n, dtype=np.uint64) // 10 + 7, pa.uint64()),
        "node_id": pa.array(np.arange(n), pa.int64()),
        "x_nm": np.arange(n) * 8.0,
        "y_nm": np.zeros(n),
        "z_nm": np.ones(n) * 40,
    }
    for d in range(dim):
        columns[f"e{d}"] = embeddings[:, d]
    pq.write_table(pa.table(columns), path)
    return embeddings


def test_read_embedding_table_round_trip_subset_and_errors(tmp_path):
    path = tmp_path / "emb.parquet"
    embeddings = write_embedding_parquet(path)
    table = read_embedding_table(path)
    assert len(table) == 50 and table.embeddings.shape == (50, 4)
    np.testing.assert_array_equal(table.embeddings, embeddings)
    assert table.segment_ids.dtype == np.uint64 and int(table.segment_ids[-1]) == 11
    np.testing.assert_array_equal(table.xyz_nm[3], [24.0, 0.0, 40.0])
    subset = read_embedding_table(path, max_rows=20)
    assert len(subset) == 20
    np.testing.assert_array_equal(subset.embeddings, embeddings[subset.node_ids])
    with pytest.raises(FileNotFoundError):
        read_embedding_table(tmp_path / "missing.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"segment_id": [1], "e0": [0.5]}), tmp_path / "bad.parquet")
    with pytest.raises(KeyError, match="node_id"):
        read_embedding_table(tmp_path / "bad.parquet")


def test_fit_umap_rejects_too_few_points_before_importing_umap():
    with pytest.raises(ValueError, match="n_neighbors"):
        drive(fit_umap(np.zeros((10, 4)), UmapSettings(n_neighbors=15)))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # cold numba compile of fit and transform: minutes
def test_umap_fit_is_deterministic_with_a_seed_and_transform_places_points_in_their_cluster():
    """Pays numba's compile cost when the cache is cold (over a minute): slow."""
    points, labels = clustered(n_per_cluster=120, dim=32)
    train = np.ones(len(points), bool)
    train[::12] = False  # every 12th point arrives later
    settings = UmapSettings(n_epochs=60, seed=3)
    model = drive(fit_umap(points[train], settings))
    again = drive(fit_umap(points[train], settings))
    assert model.layout.shape == (train.sum(), 2)
    np.testing.assert_allclose(model.layout, again.layout, atol=1e-4)
    placed = model.transform(points[~train])
    assert placed.shape == ((~train).sum(), 2) and np.isfinite(placed).all()
    centroids = np.stack([model.layout[labels[train] == c].mean(axis=0) for c in range(3)])
    nearest = np.linalg.norm(placed[:, None, :] - centroids[None], axis=2).argmin(axis=1)
    np.testing.assert_array_equal(nearest, labels[~train])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_warm_up_compiles_then_reports_a_warm_cache():
    first = warm_up(n_points=200, settings=UmapSettings(seed=0))
    second = warm_up(n_points=200, settings=UmapSettings(seed=0))
    assert second["cache_was_warm"] == 1.0
    assert second["fit_s"] < 30 and second["transform_s"] < 30
    assert set(first) == {"import_s", "fit_s", "transform_s", "cache_was_warm"}
