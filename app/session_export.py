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
row carries the segment's own label. Labels of segments that are not exported are
reported in the log, never silently dropped from view.

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
from dataclasses import replace
from pathlib import Path

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
        # The compartment classifier's Dempster-Shafer uncertainty is the node's OOD score.
        if record.predicted_uncertainty is not None:
            ood[known] = record.predicted_uncertainty[rows][known]
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

    Returns
    -------
    NodeTable, SegmentTable, Provenance
        Node positions in nm, ``[N, 3]`` x, y, z.

    Raises
    ------
    ValueError
        ``"nothing to export: no segment has embeddings yet"`` when no record has an
        embedded centre; records that are not SegmentRecords or repeat a segment id;
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
    if not chosen:
        raise ValueError(NOTHING_TO_EXPORT)

    parts = [_node_arrays(record, rows) for record, rows in chosen]
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    columns["manual_label"] = labels.effective_node_labels(columns["segment_id"], columns["node_id"])
    nodes = NodeTable(**columns)

    exported = [record for record, _ in chosen]
    segment_ids = np.array([r.segment_id for r in exported], dtype=np.uint64)
    forgotten = sorted(set(labels.labelled_segment_ids) - {int(s) for s in segment_ids})
    if forgotten:
        log.warning(
            "labels of segments %s are not exported: those segments have no embedded nodes in this session",
            forgotten[:20],
        )
    type_names = _cell_type_names(exported, cell_type_names)
    type_probability = np.full((len(exported), len(type_names)), np.nan, dtype=np.float32)
    for row, record in enumerate(exported):
        for name, value in (record.cell_type_probabilities or {}).items():
            type_probability[row, type_names.index(name)] = value
    segments = SegmentTable(
        segment_id=segment_ids,
        cell_type_names=type_names,
        cell_type=np.array([r.cell_type or "" for r in exported], dtype=object),
        cell_type_probability=type_probability,
        ood_score=np.array([np.nan if r.ood_score is None else r.ood_score for r in exported], dtype=np.float32),
        ood=np.array([bool(r.ood_flagged) for r in exported], dtype=bool),
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
        "session export: %d nodes (%d labelled) of %d segments",
        len(nodes),
        int(np.count_nonzero(nodes.manual_label != "")),
        len(segments),
    )
    return nodes, segments, provenance


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
