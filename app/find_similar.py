"""Find similar segments in a session, without Qt: the index, its upkeep, the queries.

:class:`FindSimilar` answers "which segments look like this one?" over what the session
has embedded: every point of the plot model (:class:`~segscope.app.plot_controller.PlotController`:
the context table's nodes and the analysed segments' nodes). It keeps a
:class:`~segscope.analysis.similar.SimilarityIndex` per level on a job runner's worker
thread:

* built on the first query (exact up to 50,000 vectors, HNSW above: see
  :mod:`segscope.analysis.similar`), then kept up to date: new plot points (a segment
  streaming in) are added to the node index and change their segments' mean vectors in
  the segment index, batch by batch, on the same worker; clearing the plot (other data
  opened) drops both;
* queried by segment id (the 3-D view's shift+right-click, the segment panel, the Segment
  menu) or by a plot selection (its nodes; their segments are left out of the answer).

Answers arrive on ``events.results`` (:class:`SimilarResults`) on the thread ``post``
delivers to (the Qt main thread in the app); :func:`segscope.app.wiring.link_find_similar`
selects them in 3-D and in the plot. The index lives only on the worker: the owner thread
sends it copies of new points, so neither thread ever waits on the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from psygnal import Signal, SignalGroup

from segscope.analysis.progress import Progress
from segscope.analysis.similar import EXACT_MAX_VECTORS, LEVELS, SimilarityIndex, SimilarSegment, VectorIndex
from segscope.app.jobs import JobRunner, JobUpdate
from segscope.app.plot_controller import PlotController

log = logging.getLogger(__name__)

#: The job lanes of the index upkeep and of queries on the runner.
SYNC_LANE = "similar-index"
QUERY_LANE = "similar-query"
#: Origin of the plot selection a result makes (not sent back to 3-D as a plot selection).
SIMILAR_ORIGIN = "similar"
#: The 3-D binding: shift + right click on a segment finds segments like it (a plain right
#: click is neuroglancer's "move to mouse position").
FIND_SIMILAR_ACTION = "segscope-find-similar"
FIND_SIMILAR_EVENT = "at:shift+mousedown2"


@dataclass(frozen=True)
class SimilarResults:
    """One answer of :meth:`FindSimilar.find`.

    Attributes
    ----------
    query_segments : tuple of int
        The segment(s) asked about (left out of ``results``).
    description : str
        What was asked, for a title ("segment 12", "3 selected nodes of 2 segments").
    level : str
        ``"segment"`` or ``"node"``.
    results : list of SimilarSegment
        Nearest first.
    n_segments : int
        Segments in the index when it answered.
    index_kind : str
        ``"flat"`` (exact) or ``"hnsw"``.
    seconds : float
        Time from the request to the answer (index upkeep included).
    """

    query_segments: tuple[int, ...]
    description: str
    level: str
    results: list[SimilarSegment]
    n_segments: int
    index_kind: str
    seconds: float

    @property
    def segment_ids(self) -> list[int]:
        """The answers' segment ids, nearest first."""
        return [r.segment_id for r in self.results]


class FindSimilarEvents(SignalGroup):
    """Events of :class:`FindSimilar` (on the thread ``post`` delivers to)."""

    #: (SimilarResults) a query was answered.
    results = Signal(object)
    #: (str) a query could not be answered (no embeddings yet, unknown segment...).
    error = Signal(str)
    #: (str) what the finder is doing ("indexing 4,535 nodes…"), "" when idle.
    status = Signal(str)


class _Indexes:
    """The worker thread's indexes: node vectors by plot row, per-segment means."""

    def __init__(self) -> None:
        self.node: SimilarityIndex | None = None
        self.segment: SimilarityIndex | None = None
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.rows = 0  # plot rows [0, rows) are indexed

    def add(self, segment_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Index plot rows ``[rows, rows + len(segment_ids))``."""
        from segscope.analysis.arrays import group_rows

        if self.node is None:
            self.node = SimilarityIndex("node", VectorIndex(embeddings.shape[1]), np.zeros(0, np.uint64))
            self.segment = SimilarityIndex("segment", VectorIndex(embeddings.shape[1]), np.zeros(0, np.uint64))
        self.node = _grown(self.node, segment_ids, embeddings)
        changed = []
        for segment, picks in group_rows(segment_ids):
            total = embeddings[picks].sum(axis=0, dtype=np.float64)
            previous = self.sums.get(segment)
            self.sums[segment] = total if previous is None else previous + total
            self.counts[segment] = self.counts.get(segment, 0) + len(picks)
            changed.append(segment)
        ids = np.asarray(changed, np.uint64)
        means = np.stack([self.sums[s] / self.counts[s] for s in changed]).astype(np.float32)
        counts = np.asarray([self.counts[s] for s in changed], np.int64)
        assert self.segment is not None
        stale = len(self.segment) - self.segment.n_segments
        if stale + len(changed) > max(1_000, self.segment.n_segments):
            # Replaced segment vectors pile up as segments stream in: start afresh.
            ids = np.asarray(list(self.sums), np.uint64)
            means = np.stack([self.sums[int(s)] / self.counts[int(s)] for s in ids]).astype(np.float32)
            counts = np.asarray([self.counts[int(s)] for s in ids], np.int64)
            self.segment = SimilarityIndex("segment", _new_index(embeddings.shape[1], len(ids)), np.zeros(0, np.uint64))
        self.segment = _grown(self.segment, ids, means, counts)
        self.rows += len(segment_ids)


def _new_index(dim: int, n: int) -> VectorIndex:
    return VectorIndex(dim, "flat" if n <= EXACT_MAX_VECTORS else "hnsw")


def _grown(index: SimilarityIndex, segment_ids: np.ndarray, vectors: np.ndarray, counts: Any = None) -> SimilarityIndex:
    """``index`` with the vectors added; rebuilt as HNSW when it outgrows exact search."""
    n = len(index) + len(vectors)
    if index.index.kind == "flat" and n > EXACT_MAX_VECTORS:
        old = index.index.vectors(np.arange(len(index)))
        rebuilt = SimilarityIndex(index.level, VectorIndex(index.index.dim, "hnsw"), np.zeros(0, np.uint64))
        live = np.ones(len(index), bool)
        if index.level == "segment":
            live[:] = False
            for segment in index._rows:
                live[index._rows[segment]] = True
        segments = index.row_segments[live]
        old_counts = [index.node_count(int(s)) for s in segments] if index.level == "segment" else None
        rebuilt.add(segments, old[live], old_counts)
        index = rebuilt
    index.add(segment_ids, vectors, counts)
    return index


class FindSimilar:
    """Similarity search over a plot model's points (see the module docstring).

    Parameters
    ----------
    plot
        The session's plot model; read on the thread that owns it.
    runner
        The job runner whose worker builds, updates and queries the index (one worker,
        so the index is never touched by two threads).
    k
        Segments per answer.
    level
        ``"segment"`` (per-segment means) or ``"node"``.
    """

    def __init__(self, plot: PlotController, runner: JobRunner, *, k: int = 20, level: str = "segment"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.plot = plot
        self.runner = runner
        self.k = int(k)
        self.level = level
        self.events = FindSimilarEvents()
        #: The last answer (None before the first).
        self.last: SimilarResults | None = None
        self._indexes = _Indexes()  # touched only by jobs on the runner's worker
        self._sent = 0  # plot rows sent to the worker so far
        self._active = False  # the index exists (a query was asked): keep it current
        self._epoch = 0
        self._unsubscribe = [
            plot.subscribe("points", self._on_points, name=SIMILAR_ORIGIN),
            plot.subscribe("cleared", self._on_cleared, name=SIMILAR_ORIGIN),
        ]

    def shutdown(self) -> None:
        """Stop listening to the plot (the runner is its owner's to stop)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    # -- keeping the index current -----------------------------------------------------

    def _on_points(self, _rows: Any) -> None:
        if self._active:
            self._send_new_points()

    def _on_cleared(self) -> None:
        # Other data: a fresh index. Jobs in flight hold the old one and finish on it unseen.
        self._indexes = _Indexes()
        self._sent = 0
        self._active = False
        self.runner.cancel(QUERY_LANE)

    def _send_new_points(self) -> None:
        """Copy the plot's rows not sent yet to the worker, which indexes them."""
        plot = self.plot
        start, stop = self._sent, plot.n_points
        if stop <= start:
            return
        segments = plot.segment_ids[start:stop].copy()
        embeddings = np.ascontiguousarray(plot.embeddings[start:stop], dtype=np.float32).copy()
        self._sent = stop
        indexes = self._indexes

        def sync():
            yield Progress(0, len(segments), "nodes", f"indexing {len(segments):,} nodes")
            if indexes.rows == start:
                indexes.add(segments, embeddings)
            else:  # an earlier batch failed: this index cannot be trusted to match the rows
                raise RuntimeError(f"similarity index holds {indexes.rows} rows, expected {start}")
            return len(segments)

        def on_update(update: JobUpdate) -> None:
            if update.event == "failed":
                self.events.error.emit(f"Indexing embeddings for Find similar failed: {update.error}")
                if self._indexes is indexes:  # start afresh at the next query
                    self._indexes, self._sent = _Indexes(), 0

        self.runner.submit(f"indexing {len(segments)} nodes", sync, on_update, kind=SYNC_LANE, supersede=False)

    # -- queries -----------------------------------------------------------------------

    def find(self, segment_ids: Iterable[int], *, k: int | None = None, level: str | None = None) -> bool:
        """Find the segments most similar to ``segment_ids`` (their embedded nodes).

        Several segments are queried together (node level: all their nodes; segment level:
        the mean of their means). False (and ``events.error``) when none of them has an
        embedded point yet.
        """
        segments = tuple(sorted({int(s) for s in segment_ids}))
        rows = self.plot.segment_rows(segments)
        if not segments:
            self.events.error.emit("Find similar: no segment chosen.")
            return False
        if len(rows) == 0:
            names = ", ".join(str(s) for s in segments[:3]) + ("…" if len(segments) > 3 else "")
            self.events.error.emit(
                f"Find similar: segment {names} has no embeddings yet; double-click it to embed it first."
            )
            return False
        description = f"segment {segments[0]}" if len(segments) == 1 else f"{len(segments)} segments"
        return self._submit(segments, rows, description, k, level, by_segment=True)

    def find_like_rows(self, rows: Any, *, k: int | None = None, level: str | None = None) -> bool:
        """Find the segments most similar to plot points ``rows`` (a lasso); their segments are left out."""
        rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if len(rows) == 0:
            self.events.error.emit("Find similar: select points in the plot first (Rect or Lasso).")
            return False
        segments = tuple(sorted(int(s) for s in np.unique(self.plot.segment_ids[rows])))
        description = f"{len(rows):,} selected node{'s' if len(rows) != 1 else ''} of {len(segments)} segment" + (
            "s" if len(segments) != 1 else ""
        )
        return self._submit(segments, rows, description, k, level, by_segment=False)

    def _submit(
        self, segments: tuple[int, ...], rows: np.ndarray, description: str, k, level, *, by_segment: bool
    ) -> bool:
        k = self.k if k is None else int(k)
        level = self.level if level is None else level
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self._active = True
        self._send_new_points()  # the index catches up first (same worker, in order)
        queries = np.ascontiguousarray(self.plot.embeddings[rows], dtype=np.float32).copy()
        started = time.perf_counter()
        indexes = self._indexes

        def query():
            yield Progress(0, 1, "queries", f"finding segments like {description}")
            index = indexes.node if level == "node" else indexes.segment
            if index is None:
                raise LookupError("nothing is indexed yet")
            vectors = queries
            if level == "segment" and by_segment and any(s in index for s in segments):
                # The mean of the segments' means: each segment weighs the same, however many nodes.
                vectors = np.concatenate([index.query_vectors(s) for s in segments if s in index])
            results = index.query_by_vectors(vectors, k, exclude_segments=segments)
            return SimilarResults(segments, description, level, results, index.n_segments, index.index.kind, 0.0)

        def on_update(update: JobUpdate) -> None:
            if update.event == "started":
                self.events.status.emit(f"Finding segments like {description}…")
            elif update.event == "finished":
                result: SimilarResults = update.result
                result = SimilarResults(**{**result.__dict__, "seconds": time.perf_counter() - started})
                self.last = result
                self.events.status.emit("")
                self.events.results.emit(result)
            elif update.event == "failed":
                self.events.status.emit("")
                self.events.error.emit(f"Find similar failed: {update.error}")
            elif update.event == "cancelled":
                self.events.status.emit("")

        self.runner.submit(f"find similar to {description}", query, on_update, kind=QUERY_LANE)
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the runner is idle (headless use and tests)."""
        return self.runner.wait_idle(timeout)


def bind_find_similar_action(bridge, on_request: Callable[[int | None], Any]) -> Callable[[], None]:
    """Bind shift + right click in the 3-D and 2-D views to ``on_request(segment_id or None)``.

    ``bridge`` is the :class:`~segscope.app.neuroglancer_bridge.NeuroglancerBridge`.
    ``on_request`` runs on neuroglancer's server thread: post the work to the thread that
    owns the session. Returns a function that unbinds.
    """
    from segscope.app.neuroglancer_bridge import SEGMENTATION_LAYER, click_event_from_action

    viewer = bridge.viewer

    def handle(action_state) -> None:
        event = click_event_from_action(action_state, SEGMENTATION_LAYER)
        on_request(event.segment_id)

    viewer.actions.add(FIND_SIMILAR_ACTION, handle)
    with viewer.config_state.txn() as s:
        s.input_event_bindings.data_view[FIND_SIMILAR_EVENT] = FIND_SIMILAR_ACTION

    def unbind() -> None:
        viewer.actions.remove(FIND_SIMILAR_ACTION, handle)

    return unbind
