"""Find similar (segscope.analysis.similar, ``segscope similar``): recall, exclusion, inputs, errors."""

from __future__ import annotations

import numpy as np
import pytest

from segscope.analysis.progress import drive
from segscope.analysis.similar import (
    MAX_QUERY_NODES,
    EmbeddingSet,
    SimilarityIndex,
    VectorIndex,
    build_similarity_index,
    build_vector_index,
    clustered_embeddings,
    read_embeddings,
    recall_at_k,
    segment_embeddings,
)

N_CLUSTERS = 20


def cluster_of(segment_id: int) -> int:
    """clustered_embeddings puts segment s in cluster (s - 1) % n_clusters."""
    return (int(segment_id) - 1) % N_CLUSTERS


@pytest.fixture(scope="module")
def clustered() -> EmbeddingSet:
    return clustered_embeddings(20_000, 64, n_clusters=N_CLUSTERS, nodes_per_segment=16, seed=3)


def write_parquet(path, data: EmbeddingSet, xyz: np.ndarray) -> None:
    """The columns ``segscope embed`` writes (segment_id, node_id, x_nm, y_nm, z_nm, e0..)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "segment_id": pa.array(data.segment_ids, pa.uint64()),
        "node_id": pa.array(data.node_ids, pa.int64()),
        "x_nm": xyz[:, 0],
        "y_nm": xyz[:, 1],
        "z_nm": xyz[:, 2],
    }
    for d in range(data.dim):
        columns[f"e{d}"] = pa.array(data.embeddings[:, d], pa.float32())
    pq.write_table(pa.table(columns), path)


def write_csvzip(folder, data: EmbeddingSet, xyz: np.ndarray) -> None:
    from segscope.analysis.arrays import group_rows
    from segscope.analysis.csvzip import CsvZipStore

    store = CsvZipStore(folder, num_shards=50, coordinates="nm")
    store.write_many(
        {s: (data.node_ids[rows], xyz[rows], data.embeddings[rows]) for s, rows in group_rows(data.segment_ids)}
    )


def test_hnsw_recall_at_10_against_exact_search_on_clustered_data(clustered):
    exact = drive(build_vector_index(clustered.embeddings, kind="flat"))
    hnsw = drive(build_vector_index(clustered.embeddings, kind="hnsw"))
    assert (exact.kind, hnsw.kind) == ("flat", "hnsw")
    rng = np.random.default_rng(0)
    queries = clustered.embeddings[rng.choice(len(clustered), 300, replace=False)]
    queries = queries + rng.normal(0, 0.02, queries.shape).astype(np.float32)
    d_exact, i_exact = exact.search(queries, 10)
    _, i_hnsw = hnsw.search(queries, 10)
    assert recall_at_k(i_hnsw, i_exact) >= 0.95
    # Distances are Euclidean (not faiss's squared L2), ascending.
    row, col = 7, 3
    np.testing.assert_allclose(
        d_exact[row, col], np.linalg.norm(clustered.embeddings[i_exact[row, col]] - queries[row]), rtol=1e-4
    )
    assert (np.diff(d_exact, axis=1) >= 0).all()


def test_recall_at_k_counts_the_overlap():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 1]])) == 1.0
    assert recall_at_k(np.array([[1, 2, 9], [4, 5, 6]]), np.array([[1, 2, 3], [7, 8, 9]])) == pytest.approx(1 / 3)


@pytest.mark.parametrize("level", ["segment", "node"])
def test_query_ranks_segments_of_the_same_cluster_and_excludes_the_query(clustered, level):
    index = drive(build_similarity_index(clustered, level))
    assert index.level == level and index.index.kind == "flat"  # 20k vectors: exact
    for query in (1, 17, 400):
        results = index.query(query, 10)
        assert len(results) == 10
        assert query not in [r.segment_id for r in results]
        assert [r.rank for r in results] == list(range(1, 11))
        assert np.all(np.diff([r.distance for r in results]) >= 0)
        # Every answer is a segment of the query's cluster (clusters are well apart).
        assert {cluster_of(r.segment_id) for r in results} == {cluster_of(query)}
        assert all(r.n_nodes == 16 for r in results)
        if level == "node":
            assert all(1 <= r.hits <= 16 for r in results)


def test_segment_level_vectors_are_the_node_means(clustered):
    index = drive(build_similarity_index(clustered, "segment"))
    rows = clustered.segment_ids == 5
    np.testing.assert_allclose(index.query_vectors(5)[0], clustered.embeddings[rows].mean(axis=0), rtol=1e-5)
    # The nearest segment's reported distance is the distance between the two means.
    best = index.query(5, 1)[0]
    other = clustered.embeddings[clustered.segment_ids == best.segment_id].mean(axis=0)
    assert best.distance == pytest.approx(float(np.linalg.norm(other - index.query_vectors(5)[0])), rel=1e-4)


def test_unknown_segment_is_a_key_error_naming_it(clustered):
    index = drive(build_similarity_index(clustered, "segment"))
    with pytest.raises(KeyError, match="segment 999999 is not in the index"):
        index.query(999_999)
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.query(1, 0)


def test_node_query_uses_at_most_max_query_nodes():
    data = clustered_embeddings(2_000, 8, n_clusters=2, nodes_per_segment=1_000, seed=1)
    index = drive(build_similarity_index(data, "node"))
    assert len(index.query_vectors(1)) == MAX_QUERY_NODES
    (other,) = index.query(1, 5)  # only one other segment exists
    assert other.segment_id == 2 and other.hits == MAX_QUERY_NODES


def test_growing_an_index_answers_as_one_built_at_once(clustered):
    half = len(clustered) // 2
    whole = drive(build_similarity_index(clustered, "node"))
    grown = SimilarityIndex("node", VectorIndex(clustered.dim), np.zeros(0, np.uint64))
    grown.add(clustered.segment_ids[:half], clustered.embeddings[:half])
    grown.add(clustered.segment_ids[half:], clustered.embeddings[half:])
    assert len(grown) == len(whole) and grown.n_segments == whole.n_segments
    assert grown.query(33, 8) == whole.query(33, 8)


def test_segment_level_add_replaces_a_segments_vector():
    data = clustered_embeddings(400, 16, n_clusters=4, nodes_per_segment=10, seed=2)
    ids, vectors, counts = segment_embeddings(data)
    index = SimilarityIndex("segment", VectorIndex(16), np.zeros(0, np.uint64))
    index.add(ids, vectors, counts)
    # Segment 2 moves onto segment 1: it becomes the nearest, and is listed once.
    index.add([2], vectors[:1] + 1e-3, [11])
    results = index.query(1, 40)
    assert results[0].segment_id == 2 and results[0].n_nodes == 11
    assert [r.segment_id for r in results].count(2) == 1
    assert len(results) == len(ids) - 1


def test_radius_aggregation_needs_positions_and_changes_the_vectors():
    data = clustered_embeddings(300, 8, n_clusters=3, nodes_per_segment=30, seed=4)
    with pytest.raises(ValueError, match="positions in nm are unknown"):
        segment_embeddings(data, radius_nm=10_000)
    xyz = np.zeros((len(data), 3))
    xyz[:, 0] = np.arange(len(data)) % 30 * 1_500.0  # 30 nodes 1.5 um apart along x
    placed = EmbeddingSet(data.segment_ids, data.node_ids, data.embeddings, xyz)
    _, plain, _ = segment_embeddings(placed)
    _, wide, _ = segment_embeddings(placed, radius_nm=1e9)  # every node sees the whole segment
    np.testing.assert_allclose(wide, plain, rtol=1e-5, atol=1e-6)
    _, local, _ = segment_embeddings(placed, radius_nm=3_000)
    assert not np.allclose(local, plain)
    index = drive(build_similarity_index(placed, "segment", radius_nm=3_000))
    assert index.radius_nm == 3_000 and index.query(1, 2)


def test_parquet_and_csvzip_stores_read_alike(tmp_path):
    data = clustered_embeddings(600, 64, n_clusters=5, nodes_per_segment=12, seed=6)
    xyz = np.random.default_rng(0).uniform(0, 50_000, (len(data), 3))
    write_parquet(tmp_path / "e.parquet", data, xyz)
    write_csvzip(tmp_path / "store", data, xyz)
    from_parquet = drive(read_embeddings(tmp_path / "e.parquet"))
    from_zip = drive(read_embeddings(tmp_path / "store", num_shards=50))
    assert len(from_parquet) == len(from_zip) == len(data)
    for read in (from_parquet, from_zip):
        a = drive(build_similarity_index(read, "segment")).query(3, 6)
        b = drive(build_similarity_index(data, "segment")).query(3, 6)
        assert [r.segment_id for r in a] == [r.segment_id for r in b]
        # CSV text holds the embeddings to a few significant digits.
        np.testing.assert_allclose([r.distance for r in a], [r.distance for r in b], rtol=1e-3)
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        drive(read_embeddings(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no CSV ZIP shards"):
        drive(read_embeddings(tmp_path / "empty"))


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("similar")
    data = clustered_embeddings(1_600, 64, n_clusters=N_CLUSTERS, nodes_per_segment=16, seed=8)
    xyz = np.random.default_rng(1).uniform(0, 50_000, (len(data), 3))
    write_parquet(folder / "e.parquet", data, xyz)
    write_csvzip(folder / "store", data, xyz)
    return folder


def run_cli(*args: str) -> int:
    from segscope.app.cli import main

    return main(list(args))


@pytest.mark.parametrize("store", ["e.parquet", "store"])
@pytest.mark.parametrize("level", ["segment", "node"])
def test_cli_prints_and_writes_the_ranked_table(stores, store, level, tmp_path, capsys):
    import csv

    out = tmp_path / "similar.csv"
    extra = ["--shards", "50"] if store == "store" else []
    code = run_cli(
        "similar", "--embeddings", str(stores / store), "--segment", "7", "-k", "6", "--level", level,
        "--out", str(out), *extra,
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("\t") == ["rank", "segment_id", "distance", "n_nodes", "hits"]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    segments = [int(r["segment_id"]) for r in rows]
    # 100 segments in 20 clusters: the query's 4 cluster mates come first.
    assert 7 not in segments and {cluster_of(s) for s in segments[:4]} == {cluster_of(7)}
    assert cluster_of(segments[4]) != cluster_of(7)
    assert [line.split("\t")[1] for line in printed[1:]] == [str(s) for s in segments]
    # An existing table is kept unless --force.
    assert run_cli("similar", "--embeddings", str(stores / store), "--segment", "7", "--out", str(out), *extra) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_cli_unknown_segment_is_one_line(stores, capsys):
    assert run_cli("similar", "--embeddings", str(stores / "e.parquet"), "--segment", "123456789") == 2
    err = capsys.readouterr().err.strip()
    # After the reading progress bar, one line and no traceback.
    assert err.splitlines()[-1].startswith("segscope similar: error: segment 123456789 is not in")
    assert "Traceback" not in err


def test_cli_missing_store_is_one_line(tmp_path, capsys):
    assert run_cli("similar", "--embeddings", str(tmp_path / "nothing.parquet"), "--segment", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("segscope similar: error:") and "not found" in err.splitlines()[-1]
    assert "Traceback" not in err


# -- the app's Qt-free finder over the plot's points ---------------------------------------------


class FakeViewer:
    """What link_find_similar asks of the 3-D view (the real bridge's methods of those names)."""

    def __init__(self):
        self.highlighted = []

    def highlight_segments(self, segment_ids):
        self.highlighted.append(list(segment_ids))


@pytest.fixture
def finder():
    from segscope.app.events import connect
    from segscope.app.find_similar import FindSimilar
    from segscope.app.jobs import JobRunner
    from segscope.app.plot_controller import PlotController

    runner = JobRunner(name="test-similar")
    finder = FindSimilar(PlotController(), runner, k=5)
    finder.answers, finder.errors = [], []
    connect(finder.events.results, finder.answers.append)
    connect(finder.events.error, finder.errors.append)
    yield finder
    finder.shutdown()
    runner.shutdown()


def plot_points(plot, data: EmbeddingSet, rows=slice(None)) -> None:
    n = len(data.segment_ids[rows])
    plot.add_points(data.segment_ids[rows], data.node_ids[rows], np.zeros((n, 3)), data.embeddings[rows])


def answer(finder):
    assert finder.wait_idle(30)
    assert not finder.errors, finder.errors
    return finder.answers[-1]


@pytest.mark.parametrize("level", ["segment", "node"])
def test_finder_answers_from_the_plot_and_follows_streaming_segments(finder, level):
    data = clustered_embeddings(3_200, 64, n_clusters=N_CLUSTERS, nodes_per_segment=16, seed=9)
    plot_points(finder.plot, data, slice(0, 1_600))  # segments 1..100
    finder.level = level
    assert finder.find([7])
    first = answer(finder)
    assert first.query_segments == (7,) and first.level == level and first.n_segments == 100
    assert 7 not in first.segment_ids and {cluster_of(s) for s in first.segment_ids[:4]} == {cluster_of(7)}
    # Segments 101..200 stream in (a batch at a time, as embedding does): indexed without a rebuild.
    for start in range(1_600, 3_200, 400):
        plot_points(finder.plot, data, slice(start, start + 400))
    assert finder.wait_idle(30)
    assert len(finder._indexes.node) == finder.plot.n_points == 3_200
    finder.find([7])
    second = answer(finder)
    assert second.n_segments == 200 and len(second.results) == 5
    assert {cluster_of(s) for s in second.segment_ids} == {cluster_of(7)}
    assert any(s > 100 for s in second.segment_ids)


def test_finder_segment_means_follow_new_nodes_of_a_segment(finder):
    data = clustered_embeddings(320, 16, n_clusters=4, nodes_per_segment=16, seed=10)
    plot_points(finder.plot, data)
    finder.find([1])
    assert 2 not in answer(finder).segment_ids[:3]
    # Segment 2 (another cluster) gets 784 more nodes on segment 1's mean: its mean moves next to it.
    mean_1 = data.embeddings[data.segment_ids == 1].mean(axis=0)
    finder.plot.add_points(2, np.arange(100, 884), np.zeros((784, 3)), np.tile(mean_1, (784, 1)))
    finder.find([1])
    assert answer(finder).results[0].segment_id == 2
    assert answer(finder).results[0].n_nodes == 800


def test_finder_queries_a_plot_selection_without_its_segments(finder):
    data = clustered_embeddings(1_600, 64, n_clusters=N_CLUSTERS, nodes_per_segment=16, seed=11)
    plot_points(finder.plot, data)
    rows = finder.plot.segment_rows([3, 23])[:20]  # nodes of two segments of one cluster
    assert finder.find_like_rows(rows, level="node")
    result = answer(finder)
    assert result.query_segments == (3, 23) and "20 selected nodes of 2 segments" in result.description
    assert not {3, 23} & set(result.segment_ids)
    assert {cluster_of(s) for s in result.segment_ids[:3]} == {cluster_of(3)}


def test_finder_says_why_it_cannot_answer(finder):
    assert not finder.find([42])  # nothing plotted
    assert "segment 42 has no embeddings yet" in finder.errors[-1]
    assert not finder.find_like_rows([])
    assert "select points" in finder.errors[-1]
    assert not finder.find([])


def test_finder_drops_the_index_when_the_plot_is_cleared(finder):
    data = clustered_embeddings(800, 64, n_clusters=5, nodes_per_segment=16, seed=12)
    plot_points(finder.plot, data)
    finder.find([1])
    answer(finder)
    finder.plot.clear()  # other data opened
    other = clustered_embeddings(320, 64, n_clusters=5, nodes_per_segment=16, seed=13)
    shifted = EmbeddingSet(other.segment_ids + 1_000, other.node_ids, other.embeddings)
    plot_points(finder.plot, shifted)
    finder.find([1_001])
    result = answer(finder)
    assert result.n_segments == 20 and all(s > 1_000 for s in result.segment_ids)


def test_link_find_similar_selects_the_answer_in_the_plot_and_in_3d(finder):
    from segscope.app.find_similar import SIMILAR_ORIGIN
    from segscope.app.wiring import link_find_similar

    viewer = FakeViewer()
    unlink = link_find_similar(finder, viewer)
    data = clustered_embeddings(800, 64, n_clusters=5, nodes_per_segment=16, seed=14)
    plot_points(finder.plot, data)
    finder.find([2])
    result = answer(finder)
    wanted = {2, *result.segment_ids}
    assert finder.plot.selected_segments == wanted and finder.plot.selection_origin == SIMILAR_ORIGIN
    assert viewer.highlighted[-1] == [2, *result.segment_ids]
    unlink()
