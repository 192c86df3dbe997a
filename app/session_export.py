"""The session's export: every archived segment with its predictions and manual labels.

:func:`session_tables` turns the session's segment records (:attr:`SessionState.records
<segscope.app.state.SessionState.records>`) and its :class:`~segscope.app.labels.LabelStore` into the export
data model (:class:`~segscope.analysis.export.NodeTable`, :class:`~segscope.analysis.export.SegmentTable`,
:class:`~segscope.analysis.export.Provenance`); :func:`export_session` writes them with
:func:`segscope.analysis.export.export_bundle` (Neuroglancer annotations and segment properties, a
viewer state, Parquet/CSV tables, a CAVE-style cell-type table, SWC skeletons).

What goes in
------------
One node row per *embedded* centre of every record (centres still waiting for their
embedding are left out: they have nothing to say yet), in the record's centre order, and
one segment row per record with at least one embedded centre, ascending segment id.
Records with no embedded centre are skipped with a log line. A node's ``manual_label`` is
its own label, else its segment's (:meth:`LabelStore.effective_node_labels`); the segment
row carries the segment's own label.

Labelled context nodes: the plot also shows context points (a precomputed table's nodes,
not in any record), and the user labels them like any other point. Pass them as
:class:`ContextNodes` (plain arrays, captured where the plot lives): every labelled one
that no record exports becomes a node row too, with its position and the predictions the
context carries, and each of their segments a segment row (its context cell type and OOD
score). Labels of nodes and segments that are still not exported (no embedding anywhere in
the session) are reported in the log, never silently dropped from view.

SWC skeletons: the records' centres are a thinned subset of skeleton nodes, so pass
``skeletons`` whose edges join the embedded centres (:func:`segscope.analysis.centres.contract_skeleton`
of ``DataSource.skeleton(segment_id)`` and the record's embedded ``node_ids``), not the
skeleton's own edges.

No Qt. The tables are built when :func:`export_session` is called (a snapshot: call it on
the thread that owns the state); the generator it returns only writes files, so it can
run on a worker.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT
from segscope.analysis.artefacts import ClassifierSummary
from segscope.analysis.export import ALL_PARTS, NOT_PREDICTED, ExportResult, NodeTable, Provenance, SegmentTable
from segscope.analysis.export.bundle import TABLE_FORMATS, SkeletonEdges, check_export_options, export_bundle
from segscope.analysis.progress import Progress
from segscope.app.labels import LabelStore
from segscope.app.state import DatasetSummary, ModelSummary, SegmentRecord

log = logging.getLogger(__name__)

#: The message of the ValueError raised when no record has an embedded node.
NOTHING_TO_EXPORT = "nothing to export: no segment has embeddings yet"


@dataclass(frozen=True)
class ContextNodes:
    """Plotted context points (not in any record), as plain arrays of one length ``k``.

    A snapshot of the plot's rows (:class:`~segscope.app.plot_controller.PlotController`
    arrays) taken on the thread that owns the plot; :meth:`from_plot` takes the labelled
    ones.

    Attributes
    ----------
    segment_id : numpy.ndarray
        uint64 ``[k]``.
    node_id : numpy.ndarray
        int64 ``[k]``.
    xyz_nm : numpy.ndarray
        float64 ``[k, 3]`` x, y, z nm.
    compartment : numpy.ndarray
        uint8 ``[k]`` codes into :data:`~segscope.analysis.COMPARTMENTS`, 255 unknown.
    cell_type : numpy.ndarray
        object ``[k]`` of str, ``""`` unknown (the context table's call for the segment).
    ood_score : numpy.ndarray
        float32 ``[k]``, NaN unknown.
    """

    segment_id: np.ndarray
    node_id: np.ndarray
    xyz_nm: np.ndarray
    compartment: np.ndarray
    cell_type: np.ndarray
    ood_score: np.ndarray

    def __post_init__(self) -> None:
        k = len(np.asarray(self.segment_id).reshape(-1))
        columns = {
            "segment_id": (np.uint64, (k,)),
            "node_id": (np.int64, (k,)),
            "xyz_nm": (np.float64, (k, 3)),
            "compartment": (np.uint8, (k,)),
            "cell_type": (object, (k,)),
            "ood_score": (np.float32, (k,)),
        }
        for name, (dtype, shape) in columns.items():
            values = np.asarray(getattr(self, name), dtype=dtype)
            if name == "xyz_nm":
                values = values.reshape(-1, 3) if values.size or k == 0 else values
            if values.shape != shape:
                raise ValueError(f"context {name} has shape {values.shape}, expected {shape}")
            object.__setattr__(self, name, values)

    def __len__(self) -> int:
        return len(self.segment_id)

    @classmethod
    def empty(cls) -> ContextNodes:
        """No context nodes."""
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros((0, 3)),
            np.zeros(0, np.uint8),
            np.zeros(0, object),
            np.zeros(0, np.float32),
        )

    @classmethod
    def from_plot(cls, plot: Any) -> ContextNodes:
        """The labelled context rows of ``plot`` (a ``PlotController``), copied.

        Context rows are those added as ``background``; labelled means the plot shows a
        manual label on the point (its own or its segment's). Call it on the plot's thread.
        """
        rows = np.flatnonzero(np.asarray(plot.background, bool) & (np.asarray(plot.manual_labels, object) != ""))
        names = np.asarray([*plot.cell_type_names, ""], dtype=object)
        codes = np.asarray(plot.cell_type_codes, np.int64)[rows]
        return cls(
            np.asarray(plot.segment_ids)[rows].copy(),
            np.asarray(plot.node_ids)[rows].copy(),
            np.asarray(plot.xyz_nm)[rows].copy(),
            np.asarray(plot.compartments)[rows].copy(),
            names[np.where(codes < 0, len(names) - 1, codes)],
            np.asarray(plot.ood_scores)[rows].copy(),
        )


def _records_list(records: Mapping[int, SegmentRecord] | Iterable[SegmentRecord]) -> list[SegmentRecord]:
    values = list(records.values()) if isinstance(records, Mapping) else list(records)
    for value in values:
        if not isinstance(value, SegmentRecord):
            raise ValueError(f"records must be SegmentRecord objects, got {type(value).__name__}")
    ids = [int(r.segment_id) for r in values]
    repeated = sorted(i for i, count in collections.Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"segments {repeated} appear in more than one record")
    return values


def _embedded_rows(record: SegmentRecord) -> np.ndarray:
    """Centre indices (int64) of the record's embedded centres; empty when none."""
    if record.node_ids is None or record.positions_nm is None or record.embedded is None:
        return np.zeros(0, dtype=np.int64)
    n = record.n_centres
    # A record restored from a saved session may be inconsistent: name it, never IndexError.
    shapes = {
        "embedded": (record.embedded, (n,)),
        "positions_nm": (record.positions_nm, (n, 3)),
        "predicted": (record.predicted, (n,)),
        "predicted_probability": (record.predicted_probability, (n,)),
        "predicted_uncertainty": (record.predicted_uncertainty, (n,)),
    }
    for name, (values, shape) in shapes.items():
        if values is not None and np.shape(values) != shape:
            raise ValueError(
                f"segment {record.segment_id}: {name} has shape {np.shape(values)}, expected {shape} "
                f"for its {n} centres"
            )
    return np.flatnonzero(record.embedded)


def _node_arrays(record: SegmentRecord, rows: np.ndarray) -> dict[str, np.ndarray]:
    """One record's node columns for centres ``rows`` (compartment codes as NodeTable wants)."""
    n, k = len(rows), len(COMPARTMENTS)
    compartment = np.full(n, NOT_PREDICTED, dtype=np.int16)
    probability = np.full((n, k), np.nan, dtype=np.float32)
    ood = np.full(n, np.nan, dtype=np.float32)
    if record.predicted is not None:
        codes = record.predicted[rows].astype(np.int16)
        known = codes != UNKNOWN_COMPARTMENT
        compartment[known] = codes[known]
        # The record keeps only the predicted class's probability: the other classes'
        # columns stay NaN (unknown), not 0.
        if record.predicted_probability is not None:
            probability[np.flatnonzero(known), codes[known]] = record.predicted_probability[rows][known]
    # A node's OOD score is its segment's (the cell-type classifier's, over the segment's
    # nodes), as in `segscope embed`'s node table and the plot's OOD colouring.
    if record.ood_score is not None:
        ood[:] = record.ood_score
    if record.node_ids is None or record.positions_nm is None:
        raise ValueError(f"segment {record.segment_id} has no centres")  # callers pass embedded records
    return {
        "segment_id": np.full(n, record.segment_id, dtype=np.uint64),
        "node_id": record.node_ids[rows],
        "xyz_nm": record.positions_nm[rows],
        "compartment": compartment,
        "compartment_probability": probability,
        "ood_score": ood,
    }


def _cell_type_names(records: Sequence[SegmentRecord], given: Sequence[str] | None) -> tuple[str, ...]:
    """Cell-type classes: ``given`` (the classifier's order) plus any others the records name.

    The others follow in first-seen order, so every record's cell type has a column.
    """
    names = list(given or ())
    for record in records:
        for name in [*(record.cell_type_probabilities or {}), *([record.cell_type] if record.cell_type else [])]:
            if name not in names:
                names.append(name)
    return tuple(names)


def session_tables(
    records: Mapping[int, SegmentRecord] | Iterable[SegmentRecord],
    labels: LabelStore,
    *,
    dataset_name: str,
    model_name: str,
    checkpoint_sha256: str = "",
    aggregation_radius_nm: float | None = None,
    ood_threshold: float | None = None,
    cell_type_names: Sequence[str] | None = None,
    context: ContextNodes | None = None,
) -> tuple[NodeTable, SegmentTable, Provenance]:
    """Node, segment and provenance tables of the session's archived segments.

    Parameters
    ----------
    records
        Segment id -> :class:`~segscope.app.state.SegmentRecord` (``SessionState.records``), or the
        records themselves.
    labels
        The session's manual labels.
    dataset_name, model_name, checkpoint_sha256, aggregation_radius_nm
        Provenance (``aggregation_radius_nm`` in nm: the cell-type classifier's input).
    ood_threshold
        Provenance's OOD threshold; default: the records' own threshold when they agree.
    cell_type_names
        Cell-type class order of the segment table (the cell-type classifier's classes);
        classes the records name beyond these are appended.
    context
        Plotted context nodes (:class:`ContextNodes`): those with a manual label (their
        own or their segment's) that no record exports are exported too, after the
        records' nodes, with their segments.

    Returns
    -------
    NodeTable, SegmentTable, Provenance
        Node positions in nm, ``[N, 3]`` x, y, z.

    Raises
    ------
    ValueError
        ``"nothing to export: no segment has embeddings yet"`` when no record has an
        embedded centre and no context node is labelled; records that are not SegmentRecords or repeat a segment id;
        record arrays that disagree (the NodeTable/SegmentTable checks name the column).
    """
    if not isinstance(labels, LabelStore):
        raise ValueError(f"labels must be a LabelStore, got {type(labels).__name__}")
    chosen: list[tuple[SegmentRecord, np.ndarray]] = []
    for record in sorted(_records_list(records), key=lambda r: int(r.segment_id)):
        rows = _embedded_rows(record)
        if not len(rows):
            log.info(
                "segment %s not exported: none of its %d centres has an embedding yet",
                record.segment_id,
                record.n_centres,
            )
            continue
        chosen.append((record, rows))
    parts = [_node_arrays(record, rows) for record, rows in chosen]
    extra = _labelled_context(context, labels, parts)
    if not chosen and extra is None:
        raise ValueError(NOTHING_TO_EXPORT)
    if extra is not None:
        parts.append(extra)
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    columns["manual_label"] = labels.effective_node_labels(columns["segment_id"], columns["node_id"])
    nodes = NodeTable(**columns)

    exported = [record for record, _ in chosen]
    record_ids = {int(r.segment_id) for r in exported}
    context_ids = sorted({int(s) for s in (extra["segment_id"] if extra is not None else [])} - record_ids)
    segment_ids = np.array(sorted(record_ids | set(context_ids)), dtype=np.uint64)
    by_id = {int(r.segment_id): r for r in exported}
    forgotten = sorted(set(labels.labelled_segment_ids) - {int(s) for s in segment_ids})
    if forgotten:
        log.warning(
            "labels of segments %s are not exported: those segments have no embedded nodes in this session",
            forgotten[:20],
        )
    missing = _unexported_node_labels(labels, nodes, {int(s) for s in segment_ids})
    if missing:
        log.warning(
            "%d labelled nodes of exported segments are not exported (not embedded, not plotted): %s",
            len(missing),
            missing[:10],
        )
    context_calls = _context_segment_calls(context, context_ids)
    type_names = _cell_type_names(exported, cell_type_names)
    type_names += tuple(dict.fromkeys(c for c, _ in context_calls.values() if c and c not in type_names))
    type_probability = np.full((len(segment_ids), len(type_names)), np.nan, dtype=np.float32)
    cell_types, ood_scores = [], []
    ood = np.zeros(len(segment_ids), bool)
    for row, segment_id in enumerate(segment_ids.tolist()):
        segment_record = by_id.get(segment_id)
        if segment_record is None:  # a context segment: its call from the context table
            cell_type, score = context_calls[segment_id]
            cell_types.append(cell_type)
            ood_scores.append(score)
            continue
        for name, value in (segment_record.cell_type_probabilities or {}).items():
            type_probability[row, type_names.index(name)] = value
        cell_types.append(segment_record.cell_type or "")
        ood_scores.append(np.nan if segment_record.ood_score is None else segment_record.ood_score)
        ood[row] = bool(segment_record.ood_flagged)
    segments = SegmentTable(
        segment_id=segment_ids,
        cell_type_names=type_names,
        cell_type=np.array(cell_types, dtype=object),
        cell_type_probability=type_probability,
        ood_score=np.array(ood_scores, dtype=np.float32),
        ood=ood,
        compartment_node_counts=nodes.compartment_counts(segment_ids),
        manual_label=np.array([labels.segment_label(int(s)) for s in segment_ids], dtype=object),
    )

    if ood_threshold is None:
        thresholds = {r.ood_threshold for r in exported if r.ood_threshold is not None}
        if len(thresholds) == 1:
            ood_threshold = thresholds.pop()
        elif thresholds:
            log.warning(
                "segments were flagged with different OOD thresholds %s; provenance records none", sorted(thresholds)
            )
    provenance = Provenance(
        model_name=model_name,
        checkpoint_sha256=checkpoint_sha256,
        aggregation_radius_nm=aggregation_radius_nm,
        ood_threshold=ood_threshold,
        dataset=dataset_name,
    )
    log.info(
        "session export: %d nodes (%d labelled, %d of them context nodes) of %d segments",
        len(nodes),
        int(np.count_nonzero(nodes.manual_label != "")),
        0 if extra is None else len(extra["segment_id"]),
        len(segments),
    )
    return nodes, segments, provenance


def _labelled_context(
    context: ContextNodes | None, labels: LabelStore, parts: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray] | None:
    """Node columns of ``context``'s labelled nodes that ``parts`` (the records') lack; None if none.

    Sorted by segment id, then node id.
    """
    if context is None or not len(context):
        return None
    keep = labels.effective_node_labels(context.segment_id, context.node_id) != ""
    if parts:
        seen = {
            (int(s), int(n))
            for p in parts
            for s, n in zip(p["segment_id"].tolist(), p["node_id"].tolist(), strict=True)
        }
        keep &= np.fromiter(
            ((s, n) not in seen for s, n in zip(context.segment_id.tolist(), context.node_id.tolist(), strict=True)),
            bool,
            len(context),
        )
    rows = np.flatnonzero(keep)
    if not len(rows):
        return None
    _, first = np.unique(
        np.column_stack([context.segment_id[rows].astype(np.int64), context.node_id[rows]]), axis=0, return_index=True
    )
    rows = rows[np.sort(first)]  # a pair plotted twice is written once
    rows = rows[np.lexsort((context.node_id[rows], context.segment_id[rows]))]
    codes = context.compartment[rows].astype(np.int16)
    known = codes < len(COMPARTMENTS)
    return {
        "segment_id": context.segment_id[rows],
        "node_id": context.node_id[rows],
        "xyz_nm": context.xyz_nm[rows],
        "compartment": np.where(known, codes, NOT_PREDICTED).astype(np.int16),
        # The context tables carry no class probabilities: NaN (unknown).
        "compartment_probability": np.full((len(rows), len(COMPARTMENTS)), np.nan, dtype=np.float32),
        "ood_score": context.ood_score[rows],
    }


def _unexported_node_labels(labels: LabelStore, nodes: NodeTable, segment_ids: set[int]) -> list[tuple[int, int]]:
    """(segment, node) of the node labels of ``segment_ids`` that ``nodes`` lacks."""
    missing = []
    for segment_id in sorted(segment_ids):
        labelled, _ = labels.segment_node_labels(segment_id)
        if len(labelled):
            exported = nodes.node_id[nodes.rows_of(segment_id)]
            missing += [(segment_id, int(n)) for n in np.setdiff1d(labelled, exported)]
    return missing


def _context_segment_calls(context: ContextNodes | None, segment_ids: Sequence[int]) -> dict[int, tuple[str, float]]:
    """Segment id -> (cell type, OOD score) from its context nodes: the commonest call, the median score."""
    calls: dict[int, tuple[str, float]] = {}
    for segment_id in segment_ids:
        assert context is not None  # only context segments are asked for
        rows = context.segment_id == np.uint64(segment_id)
        names = [str(n) for n in context.cell_type[rows] if n]
        scores = context.ood_score[rows]
        scores = scores[np.isfinite(scores)]
        cell_type = collections.Counter(names).most_common(1)[0][0] if names else ""
        calls[segment_id] = (cell_type, float(np.median(scores)) if len(scores) else float("nan"))
    return calls


def _usable_skeletons(skeletons: Mapping[int, SkeletonEdges], nodes: NodeTable) -> dict[int, SkeletonEdges]:
    """The skeletons whose edges join exported nodes only; the others are left out with a log line.

    SWC needs every node an edge names, and a segment may be half embedded.
    """
    usable = {}
    for segment_id, skeleton in skeletons.items():
        segment_id = int(segment_id)
        rows = nodes.rows_of(segment_id)
        if not len(rows):
            log.info("no SWC for segment %s: it is not exported", segment_id)
            continue
        edges = np.asarray(skeleton.edges, dtype=np.int64).reshape(-1, 2)
        missing = np.setdiff1d(edges, nodes.node_id[rows])
        if len(missing):
            log.warning(
                "no SWC for segment %s: its edges name nodes %s that are not exported "
                "(not embedded yet, or not centres)",
                segment_id,
                missing[:10].tolist(),
            )
            continue
        usable[segment_id] = skeleton
    return usable


def _checkpoint_sha256(source: str) -> str:
    """SHA-256 of the encoder's weights when ``source`` names local files, else ``""``."""
    from segscope.analysis.provenance import model_sha256

    if not source:
        return ""
    try:
        return model_sha256(source)
    except FileNotFoundError:  # a remote or vanished checkpoint: no hash, nothing to warn about
        return ""
    except OSError as error:  # provenance is worth a warning, not a failed export
        log.warning("cannot hash the encoder %s for provenance: %s", source, error)
        return ""


def export_session(
    folder: str | Path,
    records: Mapping[int, SegmentRecord] | Iterable[SegmentRecord],
    labels: LabelStore,
    *,
    dataset: DatasetSummary | None,
    model: ModelSummary | None = None,
    classifiers: ClassifierSummary | None = None,
    parts: Sequence[str] = ALL_PARTS,
    table_formats: Sequence[str] = TABLE_FORMATS,
    skeletons: Mapping[int, SkeletonEdges] | None = None,
    serve_url: str | None = None,
    force: bool = False,
    context: ContextNodes | None = None,
) -> Generator[Progress, None, ExportResult]:
    """Export the session's archived segments and labels as one bundle folder.

    Checks the input and builds the tables when called (bad input raises at once), and
    returns a generator that writes the bundle with
    :func:`segscope.analysis.export.export_bundle`, yielding :class:`~segscope.analysis.progress.Progress`
    and returning the :class:`~segscope.analysis.export.ExportResult`.

    Parameters
    ----------
    folder
        Bundle folder to create (replaced only with ``force``).
    records
        The session's segment records (:attr:`~segscope.app.state.SessionState.records`, or
        a snapshot of them, :meth:`segscope.app.session.Session.records_snapshot`).
    labels
        The session's manual labels.
    dataset, model, classifiers
        What is open: the dataset (voxel size nm ``(x, y, z)``, image and segmentation
        URLs, name; None: nothing to export), the encoder and the classifiers.
    parts, table_formats, skeletons, serve_url, force
        As in :func:`segscope.analysis.export.export_bundle`. A skeleton is written only when its
        edges join exported nodes (node ids of the records' embedded centres); others are
        left out with a log line.
    context
        The plot's labelled context nodes (:meth:`ContextNodes.from_plot`): exported with
        their labels, positions and predictions (see :func:`session_tables`).

    Raises
    ------
    ValueError
        No dataset open; unknown parts or table formats; nothing to export
        (``"nothing to export: no segment has embeddings yet"``).
    FileExistsError
        From the generator: ``folder`` exists and ``force`` is False.
    """
    if dataset is None:
        raise ValueError("nothing to export: no dataset is open")
    check_export_options(parts, table_formats)
    cell_type = classifiers.cell_type if classifiers is not None else None
    nodes, segments, provenance = session_tables(
        records,
        labels,
        dataset_name=dataset.name,
        model_name=model.name if model is not None else "",
        aggregation_radius_nm=None if cell_type is None else cell_type.radius_nm,
        ood_threshold=None if cell_type is None else cell_type.ood_threshold,
        cell_type_names=None if cell_type is None else cell_type.class_names,
        context=context,
    )
    if skeletons:
        skeletons = _usable_skeletons(skeletons, nodes)
    model_source = model.source if model is not None else ""
    return _write(
        folder,
        nodes,
        segments,
        provenance,
        model_source,
        dataset.voxel_size_nm,
        dataset.image_url,
        dataset.segmentation_url,
        parts,
        table_formats,
        skeletons,
        serve_url,
        force,
    )


def _write(
    folder,
    nodes,
    segments,
    provenance,
    model_source,
    voxel_size_nm,
    image_url,
    segmentation_url,
    parts,
    table_formats,
    skeletons,
    serve_url,
    force,
) -> Generator[Progress, None, ExportResult]:
    # Hashing the weights reads a file: done here, on whichever thread drives the export.
    sha = _checkpoint_sha256(model_source)
    if sha:
        provenance = replace(provenance, checkpoint_sha256=sha)
    return (
        yield from export_bundle(
            folder,
            nodes,
            segments,
            provenance,
            voxel_size_nm=voxel_size_nm,
            image_url=image_url,
            segmentation_url=segmentation_url,
            serve_url=serve_url,
            skeletons=skeletons,
            parts=parts,
            table_formats=table_formats,
            force=force,
        )
    )


def skeleton_edges(source, records: Mapping[int, SegmentRecord]) -> dict[int, SkeletonEdges]:
    """Segment id -> skeleton edges joining each record's embedded nodes, for SWC.

    The values are :class:`segscope.analysis.export.SkeletonEdges` along each segment's
    skeleton; segments without a skeleton are left out.

    ``source`` is the open :class:`segscope.app.controller.DataSource` (reads skeleton files: call
    it on a worker).
    """
    from segscope.analysis.centres import contract_skeleton

    edges = {}
    for segment_id, record in records.items():
        skeleton = source.skeleton(segment_id) if source is not None else None
        if skeleton is None or record.node_ids is None or record.embedded is None or record.positions_nm is None:
            continue
        node_ids = record.node_ids[record.embedded]
        # Store node ids (a precomputed CSV ZIP's) need not be skeleton indices: use them
        # only where they are, i.e. where they point at the node at the same position.
        n = len(skeleton.nodes_nm)
        if (
            len(node_ids) == 0
            or node_ids.min() < 0
            or node_ids.max() >= n
            or not np.allclose(skeleton.nodes_nm[node_ids], record.positions_nm[record.embedded], atol=1.0)
        ):
            log.info("segment %d: node ids are not skeleton indices; no SWC", segment_id)
            continue
        pairs = contract_skeleton(n, skeleton.edges, node_ids)
        if len(pairs):
            edges[segment_id] = SkeletonEdges(pairs)
    return edges
