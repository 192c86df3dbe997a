"""Find similar segments: nearest neighbours over node and segment embeddings (faiss).

Two levels, one metric
----------------------
* ``"segment"``: one vector per segment, the mean of its node embeddings (optionally of
  their radius aggregates, :func:`segscope.analysis.aggregate.aggregate_embeddings`, the
  inputs SegCLR's cell-type classifiers take). A query is the segment's own vector.
* ``"node"``: one vector per node. A query is the segment's nodes (at most
  :data:`MAX_QUERY_NODES` of them); each finds its nearest nodes of other segments, and a
  candidate segment's distance is the mean over the query nodes of the distance to its
  nearest node (a query node that did not reach the candidate counts its farthest
  retrieved distance, a lower bound of the true one).

Distances are Euclidean (L2), in embedding units. SegCLR's embeddings are not
L2-normalised (``docs/segclr-reference.md`` s.1: only the 16-d projection is, inside the
loss), their norm carries information, and the paper's kNN classifiers on them use
Euclidean distance; cosine would throw the norm away.

Indexes
-------
Up to :data:`EXACT_MAX_VECTORS` vectors are searched exactly (``faiss.IndexFlatL2``: at
that size one 64-d query is a millisecond or two). Above, an HNSW graph
(``faiss.IndexHNSWFlat``, ``M`` :data:`HNSW_M`, ``efConstruction``
:data:`HNSW_EF_CONSTRUCTION`, ``efSearch`` :data:`HNSW_EF_SEARCH`); its recall@10 against
exact search is measured by ``benchmarks/bench_similar.py``. Both accept new vectors
(:meth:`VectorIndex.add`), so an index can follow segments as they stream in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segscope.analysis.arrays import group_rows
from segscope.analysis.progress import Progress, RateMeter

log = logging.getLogger(__name__)

Level = Literal["segment", "node"]
LEVELS: tuple[str, ...] = ("segment", "node")
IndexKind = Literal["auto", "flat", "hnsw"]

#: Up to this many vectors the index is exact (flat); above, HNSW ("auto" indexes).
EXACT_MAX_VECTORS = 50_000
#: HNSW graph degree, construction and search beam widths (see the module docstring).
HNSW_M = 32
# efConstruction 80 left a fifth of 10^6 clustered vectors' true neighbours unreachable
# (recall@10 0.82 at any efSearch, a known HNSW trait at that scale); 200 gave 0.996.
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
#: A node-level query uses at most this many of the segment's nodes (evenly spaced).
MAX_QUERY_NODES = 256
#: A node-level query widens each query node's neighbour list up to this many nodes when
#: fewer than k segments show up (the nearest segments are large).
MAX_NEIGHBOURS_PER_NODE = 4096
#: Vectors added to an index per progress report.
ADD_BATCH = 50_000

__all__ = [
    "EXACT_MAX_VECTORS",
    "LEVELS",
    "EmbeddingSet",
    "SimilarSegment",
    "SimilarityIndex",
    "VectorIndex",
    "build_similarity_index",
    "build_vector_index",
    "clustered_embeddings",
    "read_embeddings",
    "recall_at_k",
    "segment_embeddings",
]


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingSet:
    """Node embeddings of many segments, one row per node.

    Attributes
    ----------
    segment_ids : numpy.ndarray
        uint64 ``[N]``.
    node_ids : numpy.ndarray
        int64 ``[N]``.
    embeddings : numpy.ndarray
        float32 ``[N, D]``.
    xyz_nm : numpy.ndarray or None
        float64 ``[N, 3]`` node positions, x, y, z in nm; None when unknown (a voxel store
        read without a voxel size).
    source : str
        Where they were read from (for messages).
    """

    segment_ids: np.ndarray
    node_ids: np.ndarray
    embeddings: np.ndarray
    xyz_nm: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.segment_ids)
        if self.embeddings.ndim != 2 or len(self.embeddings) != n or len(self.node_ids) != n:
            raise ValueError(
                f"embedding set of {self.source or 'arrays'}: segment_ids [{n}], node_ids "
                f"{list(self.node_ids.shape)} and embeddings {list(self.embeddings.shape)} do not match"
            )
        if self.xyz_nm is not None and self.xyz_nm.shape != (n, 3):
            raise ValueError(f"xyz_nm must be [{n}, 3], got {list(self.xyz_nm.shape)}")

    def __len__(self) -> int:
        return len(self.segment_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def read_embeddings(
    location: str | os.PathLike,
    *,
    num_shards: int = 10_000,
    bytewidth: int = 64,
    coordinates: Literal["voxels", "nm"] = "nm",
    voxel_size_nm: Any = None,
) -> Generator[Progress, None, EmbeddingSet]:
    """Read node embeddings: a ``segscope embed`` Parquet or a SegCLR CSV ZIP store.

    Parameters
    ----------
    location
        A ``*.parquet`` file, or a CSV ZIP store folder / URL (every shard is read).
    num_shards, bytewidth
        The store's shard function (SegCLR's H01 and MICrONS v117/v343: 10,000 / 64).
    coordinates
        What the store's x, y, z hold (``"nm"`` as ``segscope embed`` writes them, or
        ``"voxels"`` as SegCLR's plain releases do).
    voxel_size_nm
        x, y, z voxel size (nm) of a voxel store; without it such a store's positions
        stay unknown (``xyz_nm`` None), which only radius aggregation needs.

    Yields
    ------
    Progress
        One per shard (unit ``"shards"``), or one for a Parquet file.

    Raises
    ------
    FileNotFoundError
        Nothing at ``location``.
    ValueError, KeyError
        Not an embedding table or store; an empty store; rows of different widths.
    """
    text = str(location)
    if text.lower().endswith(".parquet"):
        from segscope.analysis.projection import read_embedding_table

        yield Progress(0, 1, "files", f"reading {Path(text).name}")
        table = read_embedding_table(text)
        yield Progress(1, 1, "files", f"read {len(table)} node embeddings")
        return EmbeddingSet(table.segment_ids, table.node_ids, table.embeddings, table.xyz_nm, source=text)

    from segscope.analysis.csvzip import CsvZipStore

    store = CsvZipStore(location, num_shards=num_shards, bytewidth=bytewidth, coordinates=coordinates)
    if store.local_dir is not None and not store.local_dir.is_dir():
        raise FileNotFoundError(f"no embedding store at {text} (expected a .parquet file or a CSV ZIP folder)")
    scale = None
    if coordinates == "voxels" and voxel_size_nm is not None:
        scale = np.asarray(voxel_size_nm, dtype=np.float64).reshape(3)
    shards = store.shards()
    if not shards:
        raise ValueError(f"{text} holds no CSV ZIP shards ({{shard}}.zip below {num_shards})")
    segments: list[np.ndarray] = []
    nodes: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    values: list[np.ndarray] = []
    meter = RateMeter()
    for done, shard in enumerate(shards, start=1):
        for segment_id, node_ids, xyz, embeddings in store.iter_shard(shard):
            if values and embeddings.shape[1] != values[0].shape[1]:
                raise ValueError(
                    f"{text}: segment {segment_id} has {embeddings.shape[1]}-d embeddings, "
                    f"earlier segments {values[0].shape[1]}-d"
                )
            segments.append(np.full(len(node_ids), segment_id, np.uint64))
            nodes.append(np.asarray(node_ids, np.int64))
            positions.append(np.asarray(xyz, np.float64))
            values.append(np.asarray(embeddings, np.float32))
        yield Progress(done, len(shards), "shards", f"read shard {shard}", rate=meter.rate(done))
    if not values:
        raise ValueError(f"{text}: its shards hold no segments")
    xyz_all = np.concatenate(positions)
    xyz_nm = None if coordinates == "voxels" and scale is None else (xyz_all * scale if scale is not None else xyz_all)
    return EmbeddingSet(np.concatenate(segments), np.concatenate(nodes), np.concatenate(values), xyz_nm, source=text)


def segment_embeddings(data: EmbeddingSet, radius_nm: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vector per segment: the mean of its nodes' embeddings.

    With ``radius_nm``, the mean of the nodes' radius aggregates
    (:func:`segscope.analysis.aggregate.aggregate_embeddings`, what cell-type classifiers
    are trained on), which weighs the segment's densely sampled parts more.

    Returns
    -------
    segment_ids : uint64 ``[S]`` ascending
    vectors : float32 ``[S, D]``
    node_counts : int64 ``[S]``
    """
    groups = group_rows(data.segment_ids)
    ids = np.fromiter((segment for segment, _ in groups), np.uint64, len(groups))
    counts = np.fromiter((len(rows) for _, rows in groups), np.int64, len(groups))
    vectors = np.empty((len(groups), data.dim), np.float32)
    if radius_nm is None:
        if groups:
            # Sum in float64: a segment of 10^5 nodes loses precision in float32.
            order = np.concatenate([rows for _, rows in groups])
            starts = np.r_[0, np.cumsum(counts)[:-1]]
            sums = np.add.reduceat(data.embeddings[order].astype(np.float64), starts, axis=0)
            vectors[:] = sums / counts[:, None]
        return ids, vectors, counts
    from segscope.analysis.aggregate import aggregate_embeddings

    if data.xyz_nm is None:
        raise ValueError(
            f"{data.source or 'these embeddings'}: node positions in nm are unknown "
            "(a voxel store needs its voxel size) so they cannot be aggregated by radius"
        )
    for i, (_, rows) in enumerate(groups):
        vectors[i] = aggregate_embeddings(data.xyz_nm[rows], data.embeddings[rows], radius_nm).mean(axis=0)
    return ids, vectors, counts


# -- the vector index --------------------------------------------------------------------------


def _faiss() -> Any:
    """The faiss module (imported on first use; its type stubs lack the search parameters)."""
    import faiss

    return faiss


#: Queries per search below which faiss searches on one thread (see :func:`_threads_for`).
PARALLEL_MIN_QUERIES = 64


@contextlib.contextmanager
def _threads_for(n_queries: int) -> Iterator[None]:
    """Search a few queries on one OpenMP thread, then restore faiss's thread count.

    A node-level query searches 16-256 vectors: OpenMP's threads wait on each other at every
    barrier, and on a busy 2-core machine (the app's TensorFlow and UMAP children, other
    users) 16 queries took 16-34 ms on 2 threads and 3 ms on one. The setting is
    process-wide: SegScope searches from one worker thread at a time.
    """
    if n_queries >= PARALLEL_MIN_QUERIES:
        yield
        return
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_vectors(values: Any, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise ValueError(f"{what} must be [n, {dim or 'D'}], got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


class VectorIndex:
    """A faiss L2 index over float32 vectors whose ids are their row numbers (0, 1, ...).

    Parameters
    ----------
    dim
        Vector width.
    kind
        ``"flat"`` (exact) or ``"hnsw"``.
    m, ef_construction, ef_search
        HNSW parameters (ignored by ``"flat"``).
    """

    def __init__(
        self,
        dim: int,
        kind: Literal["flat", "hnsw"] = "flat",
        *,
        m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
    ) -> None:
        faiss = _faiss()
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"index kind must be 'flat' or 'hnsw', got {kind!r}")
        self.dim = int(dim)
        self.kind = kind
        self.ef_search = int(ef_search)
        if kind == "hnsw":
            self._index: Any = faiss.IndexHNSWFlat(self.dim, int(m))
            self._index.hnsw.efConstruction = int(ef_construction)
            self._index.hnsw.efSearch = self.ef_search
        else:
            self._index = faiss.IndexFlatL2(self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: Any) -> np.ndarray:
        """Append vectors ``[n, dim]``; returns their ids (int64 ``[n]``)."""
        array = _as_vectors(vectors, self.dim)
        start = len(self)
        self._index.add(array)
        return np.arange(start, start + len(array), dtype=np.int64)

    def vectors(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` (float32 ``[n, dim]``)."""
        keys = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(keys) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_batch(keys)

    def search(self, queries: Any, k: int, *, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored vectors of each query.

        Parameters
        ----------
        queries
            float ``[q, dim]``.
        k
            Neighbours per query.
        exclude
            Ids never returned (int ``[e]``), for example the query segment's own nodes.

        Returns
        -------
        distances : float32 ``[q, k]``
            Euclidean distances, ascending; ``inf`` where fewer than ``k`` were found.
        ids : int64 ``[q, k]``
            Their ids; -1 where none.
        """
        faiss = _faiss()
        array = _as_vectors(queries, self.dim, "queries")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        selector = None
        if exclude is not None and len(np.asarray(exclude)):
            banned = np.unique(np.asarray(exclude, dtype=np.int64))
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(banned))
        if self.kind == "hnsw":
            params: Any = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if selector is not None:
                params.sel = selector
        else:
            params = None if selector is None else faiss.SearchParameters(sel=selector)
        if len(self) == 0:
            return np.full((len(array), k), np.inf, np.float32), np.full((len(array), k), -1, np.int64)
        with _threads_for(len(array)):
            squared, ids = self._index.search(array, k, params=params)
        distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
        distances[ids < 0] = np.inf
        return distances, ids.astype(np.int64)


def _resolve_kind(kind: str, n: int) -> Literal["flat", "hnsw"]:
    if kind == "auto":
        return "flat" if n <= EXACT_MAX_VECTORS else "hnsw"
    if kind not in ("flat", "hnsw"):
        raise ValueError(f"index kind must be 'auto', 'flat' or 'hnsw', got {kind!r}")
    return kind  # type: ignore[return-value]


def build_vector_index(
    vectors: Any, *, kind: IndexKind = "auto", batch: int = ADD_BATCH, **hnsw: int
) -> Generator[Progress, None, VectorIndex]:
    """Index ``vectors`` (float ``[N, D]``), yielding a Progress per ``batch`` added.

    ``kind`` ``"auto"`` is exact up to :data:`EXACT_MAX_VECTORS` vectors, HNSW above;
    ``hnsw`` are :class:`VectorIndex`'s ``m``, ``ef_construction``, ``ef_search``.
    """
    array = _as_vectors(vectors)
    index = VectorIndex(array.shape[1], _resolve_kind(kind, len(array)), **hnsw)
    meter = RateMeter()
    total = len(array)
    yield Progress(0, total, "vectors", f"building a {index.kind} index of {total} vectors")
    for start in range(0, total, batch):
        index.add(array[start : start + batch])
        done = min(start + batch, total)
        yield Progress(done, total, "vectors", f"indexed {done} of {total}", rate=meter.rate(done))
    return index


# -- segments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimilarSegment:
    """One answer of a similarity query.

    Attributes
    ----------
    rank : int
        1 for the nearest.
    segment_id : int
    distance : float
        Euclidean distance in embedding units (node level: the mean over the query nodes,
        see the module docstring).
    n_nodes : int
        Nodes of that segment in the index.
    hits : int
        Node level: query nodes that found this segment among their neighbours; segment
        level: 1.
    """

    rank: int
    segment_id: int
    distance: float
    n_nodes: int
    hits: int = 1


@dataclass
class SimilarityIndex:
    """Segments searchable by similarity at one level (see the module docstring).

    Build with :func:`build_similarity_index`; grow with :meth:`add`. Not thread-safe: use
    from one thread at a time.

    Attributes
    ----------
    level : str
        ``"segment"`` or ``"node"``.
    index : VectorIndex
    row_segments : numpy.ndarray
        uint64 ``[N]`` segment of each indexed vector (row = faiss id).
    radius_nm : float or None
        Segment level: the aggregation radius of its vectors (None: plain means).
    """

    level: Level
    index: VectorIndex
    row_segments: np.ndarray
    radius_nm: float | None = None
    _rows: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _counts: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if not self._rows:
            self._remember(self.row_segments, 0)

    def _remember(self, segments: np.ndarray, start: int) -> None:
        for segment, rows in group_rows(segments):
            rows = rows + start
            previous = self._rows.get(segment)
            self._rows[segment] = rows if previous is None else np.concatenate([previous, rows])

    @property
    def n_segments(self) -> int:
        return len(self._rows)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, segment_id: object) -> bool:
        return isinstance(segment_id, (int, np.integer)) and int(segment_id) in self._rows

    def node_count(self, segment_id: int) -> int:
        """Nodes of ``segment_id`` in the index (node level: its rows; segment level: as given)."""
        if self.level == "node":
            rows = self._rows.get(int(segment_id))
            return 0 if rows is None else len(rows)
        return self._counts.get(int(segment_id), 0)

    def add(self, segment_ids: Any, vectors: Any, node_counts: Any = None) -> None:
        """Index more vectors: node embeddings (node level) or segment vectors (segment level).

        At the segment level a segment already indexed gets a new row; the old one is
        excluded from answers from then on (rebuild to drop it).
        """
        segments = np.asarray(segment_ids, dtype=np.uint64).reshape(-1)
        array = _as_vectors(vectors, self.index.dim)
        if len(segments) != len(array):
            raise ValueError(f"{len(segments)} segment ids for {len(array)} vectors")
        start = len(self.index)
        if self.level == "segment":
            for segment in segments.tolist():
                self._rows.pop(int(segment), None)  # the newest row of a segment is its vector
        self.index.add(array)
        self.row_segments = np.concatenate([self.row_segments, segments])
        self._remember(segments, start)
        if node_counts is not None:
            for segment, count in zip(segments.tolist(), np.asarray(node_counts).reshape(-1).tolist()):
                self._counts[int(segment)] = int(count)

    def _stale_rows(self) -> np.ndarray:
        """Segment level: rows replaced by a newer vector of their segment."""
        if self.level != "segment" or len(self._rows) == len(self.row_segments):
            return np.zeros(0, np.int64)
        live = np.zeros(len(self.row_segments), bool)
        live[np.concatenate(list(self._rows.values()))] = True
        return np.flatnonzero(~live)

    def query_vectors(self, segment_id: int) -> np.ndarray:
        """The vectors a query for ``segment_id`` searches with (float32 ``[q, D]``).

        Raises
        ------
        KeyError
            The segment is not in the index.
        """
        rows = self._rows.get(int(segment_id))
        if rows is None:
            raise KeyError(f"segment {int(segment_id)} is not in the index ({self.n_segments} segments)")
        if len(rows) > MAX_QUERY_NODES:
            rows = rows[np.linspace(0, len(rows) - 1, MAX_QUERY_NODES).astype(np.int64)]
        return self.index.vectors(rows)

    def query(self, segment_id: int, k: int = 20) -> list[SimilarSegment]:
        """The ``k`` segments most similar to ``segment_id`` (itself left out), nearest first.

        Raises
        ------
        KeyError
            The segment is not in the index.
        """
        return self.query_by_vectors(self.query_vectors(segment_id), k, exclude_segments=(int(segment_id),))

    def query_by_vectors(
        self, vectors: Any, k: int = 20, *, exclude_segments: Iterable[int] = ()
    ) -> list[SimilarSegment]:
        """The ``k`` segments nearest to ``vectors`` (float ``[q, D]``), ``exclude_segments`` left out.

        At the segment level the query is the mean of ``vectors`` (one segment's vector, or
        a plot selection's nodes); at the node level each vector is a query node (at most
        :data:`MAX_QUERY_NODES`, evenly spaced).
        """
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = _as_vectors(vectors, self.index.dim, "query vectors")
        if len(queries) == 0:
            raise ValueError("no query vectors")
        excluded_ids = [int(s) for s in exclude_segments]
        parts = [self._rows[s] for s in excluded_ids if s in self._rows]
        banned = np.concatenate([*parts, self._stale_rows()]) if parts else self._stale_rows()
        if self.level == "segment":
            query = queries.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
            distances, ids = self.index.search(query, k, exclude=banned)
            found = ids[0] >= 0
            return [
                SimilarSegment(rank, int(segment), float(distance), self.node_count(int(segment)))
                for rank, (segment, distance) in enumerate(
                    zip(self.row_segments[ids[0][found]], distances[0][found]), start=1
                )
            ]
        if len(queries) > MAX_QUERY_NODES:
            queries = queries[np.linspace(0, len(queries) - 1, MAX_QUERY_NODES).astype(np.int64)]
        # Enough neighbours per query node that k segments show up even when each candidate
        # segment contributes several nearby nodes (about 16 per segment in SegCLR's releases).
        per_node = max(4 * k, 32)
        reachable = self.n_segments - sum(1 for s in set(excluded_ids) if s in self._rows)
        while True:
            distances, ids = self.index.search(queries, per_node, exclude=banned)
            ranked = _rank_segments(distances, ids, self.row_segments, k, self.node_count)
            # A dense neighbourhood (a few large segments near the query) can fill every
            # query node's list: widen it until k segments show up or all were reachable.
            if len(ranked) >= min(k, reachable) or per_node >= min(len(self.index), MAX_NEIGHBOURS_PER_NODE):
                return ranked
            per_node *= 4


def _rank_segments(distances: np.ndarray, ids: np.ndarray, row_segments: np.ndarray, k: int, node_count) -> list:
    """Rank the segments reached by node queries (mean capped nearest-node distance)."""
    n_queries = len(distances)
    finite = np.where(np.isfinite(distances), distances, np.nan)
    cap = np.nanmax(finite, axis=1)  # each query node's farthest retrieved distance
    cap = np.where(np.isfinite(cap), cap, 0.0)
    query_of = np.repeat(np.arange(n_queries), distances.shape[1])
    flat_ids = ids.reshape(-1)
    keep = flat_ids >= 0
    if not keep.any():
        return []
    query_of, flat_ids, flat_d = query_of[keep], flat_ids[keep], distances.reshape(-1)[keep]
    segments = row_segments[flat_ids]
    # The nearest node of each (query node, segment) pair: sort by pair then distance.
    order = np.lexsort((flat_d, segments, query_of))
    query_of, segments, flat_d = query_of[order], segments[order], flat_d[order]
    first = np.r_[True, (query_of[1:] != query_of[:-1]) | (segments[1:] != segments[:-1])]
    query_of, segments, flat_d = query_of[first], segments[first], flat_d[first]
    unique, inverse = np.unique(segments, return_inverse=True)
    found_sum = np.bincount(inverse, weights=flat_d, minlength=len(unique))
    cap_of_found = np.bincount(inverse, weights=cap[query_of], minlength=len(unique))
    hits = np.bincount(inverse, minlength=len(unique))
    score = (found_sum + (cap.sum() - cap_of_found)) / n_queries
    ranking = np.lexsort((-hits, score))[:k]
    return [
        SimilarSegment(rank, int(unique[i]), float(score[i]), node_count(int(unique[i])), int(hits[i]))
        for rank, i in enumerate(ranking, start=1)
    ]


def build_similarity_index(
    data: EmbeddingSet,
    level: Level = "segment",
    *,
    radius_nm: float | None = None,
    kind: IndexKind = "auto",
    **hnsw: int,
) -> Generator[Progress, None, SimilarityIndex]:
    """Index ``data`` at ``level`` (see the module docstring), yielding Progress as it goes.

    ``radius_nm`` (segment level only): aggregate node embeddings over this radius before
    averaging them (:func:`segment_embeddings`). ``kind`` and ``hnsw``: see
    :func:`build_vector_index`.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if len(data) == 0:
        raise ValueError(f"{data.source or 'the embedding set'} holds no node embeddings")
    if level == "node":
        if radius_nm is not None:
            raise ValueError("radius_nm applies to the segment level only")
        index = yield from build_vector_index(data.embeddings, kind=kind, **hnsw)
        return SimilarityIndex("node", index, np.asarray(data.segment_ids, np.uint64).copy())
    yield Progress(0, 0, "segments", "averaging node embeddings per segment")
    segment_ids, vectors, counts = segment_embeddings(data, radius_nm)
    index = yield from build_vector_index(vectors, kind=kind, **hnsw)
    result = SimilarityIndex("segment", index, segment_ids, radius_nm=radius_nm)
    result._counts.update(zip(segment_ids.tolist(), counts.tolist()))
    return result


# -- synthetic data and measuring recall -------------------------------------------------------


def clustered_embeddings(
    n_nodes: int,
    dim: int = 64,
    *,
    n_clusters: int = 100,
    nodes_per_segment: int = 16,
    intrinsic_dim: int = 8,
    noise: float = 0.05,
    walk_step: float | None = None,
    seed: int = 0,
) -> EmbeddingSet:
    """Random clustered node embeddings grouped into segments, for tests and benchmarks.

    Each cluster (a "cell type") is a random centre plus a random ``intrinsic_dim``-d
    subspace along which its points spread (unit scale), plus isotropic noise of std
    ``noise``: learned embeddings occupy low-dimensional manifolds, while uniform 64-d
    Gaussians would make every point almost equidistant from every other. Segments are
    runs of ``nodes_per_segment`` nodes of one cluster (about 16 in SegCLR's releases).
    Segment ``s`` (ids from 1) belongs to cluster ``(s - 1) % n_clusters``. No positions.

    With ``walk_step`` None the nodes are independent draws of their cluster. With a step,
    each segment is a random walk in its cluster's subspace (a random start, then steps of
    std ``walk_step`` per latent axis), as SegCLR's consecutive nodes are: cutouts 4 um wide
    centred 1.5 um apart along a neurite overlap, so neighbouring nodes embed alike.
    """
    rng = np.random.default_rng(seed)
    n_segments = max(1, math.ceil(n_nodes / nodes_per_segment))
    centres = rng.normal(0.0, 3.0, (n_clusters, dim)).astype(np.float32)
    bases = rng.normal(0.0, 1.0 / math.sqrt(intrinsic_dim), (n_clusters, intrinsic_dim, dim)).astype(np.float32)
    segment_ids = np.repeat(np.arange(1, n_segments + 1, dtype=np.uint64), nodes_per_segment)[:n_nodes]
    cluster = ((segment_ids - 1) % n_clusters).astype(np.int64)
    embeddings = rng.normal(0.0, noise, (n_nodes, dim)).astype(np.float32)
    latent = rng.normal(0.0, 1.0, (n_nodes, intrinsic_dim)).astype(np.float32)
    if walk_step is not None:
        # Row i of a segment: its first node's draw plus the sum of i steps.
        first = np.flatnonzero(np.r_[True, segment_ids[1:] != segment_ids[:-1]])
        steps = rng.normal(0.0, float(walk_step), (n_nodes, intrinsic_dim)).astype(np.float32)
        steps[first] = 0.0
        walked = np.cumsum(steps, axis=0)
        start_of = np.repeat(first, np.diff(np.r_[first, n_nodes]))
        latent = latent[start_of] + walked - walked[start_of]
    for c, rows in group_rows(cluster):
        embeddings[rows] += centres[c] + latent[rows] @ bases[c]
    node_ids = np.arange(n_nodes, dtype=np.int64) % nodes_per_segment
    return EmbeddingSet(segment_ids, node_ids, embeddings, None, source=f"clustered_embeddings(seed={seed})")


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of ``exact`` ids (int ``[q, k]``) found in the same row of ``approximate``."""
    approximate, exact = np.asarray(approximate), np.asarray(exact)
    if approximate.shape[0] != exact.shape[0]:
        raise ValueError("approximate and exact answers must have one row per query")
    found = [
        len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approximate, exact)
    ]
    return float(np.mean(found)) if found else 0.0
