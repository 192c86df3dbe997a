"""One call that writes every export of a set of annotated segments into one folder.

Layout of the bundle folder (built aside and renamed into place as a whole)::

    annotations/            Neuroglancer precomputed point annotations (one per node)
    segment_properties/     Neuroglancer segment properties (info)
    state.json              Neuroglancer viewer state opening everything together
    nodes.parquet, nodes.csv            per-node table
    segments.parquet, segments.csv      per-segment table
    cell_types.parquet, cell_types.csv  CAVE-style cell-type table
    *.provenance.json       provenance of the CSV tables
    provenance.json         provenance of the whole bundle
    skeletons/<segment id>.swc          when skeleton edges are given
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segscope.analysis.export.annotations import DEFAULT_SPATIAL_LIMIT, write_node_annotations
from segscope.analysis.export.atomic import atomic_folder
from segscope.analysis.export.model import NodeTable, Provenance, SegmentTable
from segscope.analysis.export.neuroglancer_layers import (
    build_viewer_state,
    write_segment_properties,
    write_viewer_state,
)
from segscope.analysis.export.swc import write_swc
from segscope.analysis.export.tables import (
    DEFAULT_CLASSIFICATION_SYSTEM,
    cave_cell_type_table,
    node_arrow_table,
    segment_arrow_table,
    write_table,
)
from segscope.analysis.progress import Progress

log = logging.getLogger(__name__)

#: Every part :func:`export_bundle` can write.
ALL_PARTS = ("annotations", "segment_properties", "state", "tables", "cave", "swc")
TABLE_FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class SkeletonEdges:
    """A segment's skeleton for SWC export.

    Attributes
    ----------
    edges : numpy.ndarray
        int ``[E, 2]`` pairs of node ids (the node table's ``node_id``).
    radius_nm : dict or None
        Optional node id -> radius (nm); missing nodes get 0.
    """

    edges: np.ndarray
    radius_nm: Mapping[int, float] | None = None


def skeletons_from_edges_table(edges_parquet: str | Path) -> dict[int, SkeletonEdges]:
    """Skeleton edges per segment from a dataset's ``edges.parquet`` (segment_id, node_a, node_b)."""
    import pyarrow.parquet as pq

    if not Path(edges_parquet).is_file():
        raise FileNotFoundError(f"edge table not found: {edges_parquet}")
    table = pq.read_table(edges_parquet)
    missing = [c for c in ("segment_id", "node_a", "node_b") if c not in table.column_names]
    if missing:
        raise KeyError(f"{edges_parquet} lacks columns {missing}")
    segment = table.column("segment_id").to_numpy().astype(np.uint64)
    pairs = np.stack([table.column(c).to_numpy().astype(np.int64) for c in ("node_a", "node_b")], axis=1)
    order = np.argsort(segment, kind="stable")
    ids, starts = np.unique(segment[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(i): SkeletonEdges(pairs[order[a:b]]) for i, a, b in zip(ids, starts, ends)}


@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote: part name -> path(s), relative to ``folder``."""

    folder: Path
    files: dict[str, list[str]] = field(default_factory=dict)


def _bundle_url(base_url: str | None, folder: Path, name: str) -> str:
    if base_url:
        return f"{base_url.rstrip('/')}/{name}"
    return str(folder / name)


def check_export_options(parts: Sequence[str], table_formats: Sequence[str]) -> None:
    """Raise ValueError naming any unknown part or table format (before any work starts).

    Parts must be in :data:`ALL_PARTS`, table formats in :data:`TABLE_FORMATS`.
    """
    unknown = sorted(set(parts) - set(ALL_PARTS))
    if unknown:
        raise ValueError(f"unknown export parts {unknown}; choose from {ALL_PARTS}")
    unknown = sorted(set(table_formats) - set(TABLE_FORMATS))
    if unknown:
        raise ValueError(f"unknown table formats {unknown}; choose from {TABLE_FORMATS}")


def export_bundle(
    folder: str | Path,
    nodes: NodeTable,
    segments: SegmentTable,
    provenance: Provenance,
    *,
    voxel_size_nm: Sequence[float],
    image_url: str | None = None,
    segmentation_url: str | None = None,
    serve_url: str | None = None,
    skeletons: Mapping[int, SkeletonEdges] | None = None,
    parts: Sequence[str] = ALL_PARTS,
    table_formats: Sequence[str] = TABLE_FORMATS,
    classification_system: str = DEFAULT_CLASSIFICATION_SYSTEM,
    include_ood_in_cave: bool = False,
    spatial_limit: int = DEFAULT_SPATIAL_LIMIT,
    sharded: bool | None = None,
    force: bool = False,
) -> Generator[Progress, None, ExportResult]:
    """Write the export bundle (generator yielding Progress; returns :class:`ExportResult`).

    Parameters
    ----------
    folder
        Bundle folder to create; an existing one is replaced only with ``force``.
    nodes, segments, provenance
        What to export. Every segment of ``nodes`` should have a row in ``segments``.
    voxel_size_nm
        x, y, z voxel size of the dataset (nm): CAVE ``pt_position`` voxels and the viewer
        state's dimensions.
    image_url, segmentation_url
        Sources of the dataset's image and segmentation for the viewer state.
    serve_url
        URL the bundle folder will be served from (e.g. ``http://localhost:8000/bundle``);
        the state refers to the exported layers through it. Default: the folder's local path
        (``file://``), readable by the neuroglancer Python package but not by a browser.
    skeletons
        Segment id -> :class:`SkeletonEdges`, for the SWC part (segments without one are skipped).
    parts
        Subset of :data:`ALL_PARTS` to write.
    table_formats
        Subset of ``("parquet", "csv")``.
    classification_system, include_ood_in_cave
        See :func:`segscope.analysis.export.tables.cave_cell_type_table`.
    spatial_limit
        Most annotations per spatial index cell.
    sharded
        Shard the annotation indexes (default: above
        :data:`segscope.analysis.export.annotations.SHARD_ABOVE` nodes). Sharded layers need a server
        that answers HTTP range requests (cloud buckets and common web servers do).
    force
        Replace an existing bundle folder.
    """
    check_export_options(parts, table_formats)
    missing = np.setdiff1d(nodes.segment_ids(), segments.segment_id)
    if len(missing):
        raise ValueError(f"segments {missing[:10].tolist()} have nodes but no row in the segment table")
    if "swc" in parts and not skeletons:
        log.info("no skeletons given: SWC part skipped")
    folder = Path(folder)
    result = ExportResult(folder)
    steps = [p for p in ALL_PARTS if p in parts]
    total = len(steps)

    def done(step: int, message: str) -> Progress:
        return Progress(step, total, "parts", message)

    with atomic_folder(folder, force=force) as work:
        (work / "provenance.json").write_text(json.dumps(provenance.to_dict(), indent=1, sort_keys=True))
        result.files["provenance"] = ["provenance.json"]
        for step, part in enumerate(steps, start=1):
            if part == "annotations":
                for report in write_node_annotations(work / "annotations", nodes, limit=spatial_limit, sharded=sharded):
                    yield Progress(step - 1, total, "parts", f"annotations: {report.message}", payload=report)
                result.files[part] = ["annotations/"]
            elif part == "segment_properties":
                write_segment_properties(work / "segment_properties", segments)
                result.files[part] = ["segment_properties/"]
            elif part == "state":
                has_properties = "segment_properties" in parts
                # Open on the first segment that has nodes, centred on them.
                with_nodes = [s for s in segments.segment_id if len(nodes.rows_of(s))][:1]
                selected = with_nodes or [int(s) for s in segments.segment_id[:1]]
                position = nodes.xyz_nm[nodes.rows_of(with_nodes[0])].mean(axis=0) if with_nodes else None
                state = build_viewer_state(
                    annotations=_bundle_url(serve_url, folder, "annotations"),
                    image=image_url,
                    segmentation=segmentation_url,
                    segment_properties=_bundle_url(serve_url, folder, "segment_properties") if has_properties else None,
                    voxel_size_nm=voxel_size_nm,
                    position_nm=position,
                    selected_segments=[int(s) for s in selected],
                )
                write_viewer_state(work / "state.json", state)
                result.files[part] = ["state.json"]
            elif part == "tables":
                names = []
                for name, table in (
                    ("nodes", node_arrow_table(nodes, provenance)),
                    ("segments", segment_arrow_table(segments, provenance)),
                ):
                    for fmt in table_formats:
                        write_table(work / f"{name}.{fmt}", table)
                        names.append(f"{name}.{fmt}")
                result.files[part] = names
            elif part == "cave":
                table = cave_cell_type_table(
                    segments,
                    nodes,
                    voxel_size_nm,
                    classification_system=classification_system,
                    include_ood=include_ood_in_cave,
                    provenance=provenance,
                )
                result.files[part] = []
                for fmt in table_formats:
                    write_table(work / f"cell_types.{fmt}", table)
                    result.files[part].append(f"cell_types.{fmt}")
            elif part == "swc" and skeletons:
                swc_dir = work / "skeletons"
                swc_dir.mkdir()
                written = []
                for segment_id, skeleton in skeletons.items():
                    rows = nodes.rows_of(segment_id)
                    if not len(rows):
                        raise ValueError(f"skeleton given for segment {segment_id}, which has no nodes")
                    node_ids = nodes.node_id[rows]
                    radius = None
                    if skeleton.radius_nm:
                        radius = np.array([skeleton.radius_nm.get(int(i), 0.0) for i in node_ids])
                    name = f"skeletons/{int(segment_id)}.swc"
                    write_swc(
                        work / name,
                        node_ids,
                        nodes.xyz_nm[rows],
                        skeleton.edges,
                        nodes.compartment[rows],
                        radius,
                        header=[
                            f"segment {int(segment_id)}",
                            f"model {provenance.model_name}",
                            f"dataset {provenance.dataset}",
                        ],
                    )
                    written.append(name)
                result.files[part] = written
            yield done(step, part)
    log.info("export bundle written to %s (%s)", folder, ", ".join(result.files))
    return result
