"""Exports of annotated nodes and segments for other tools.

- Neuroglancer: precomputed point annotations (:func:`write_node_annotations`), segment
  properties (:func:`write_segment_properties`) and a viewer state opening them with the
  image and segmentation (:func:`build_viewer_state`);
- tables in Parquet and CSV with provenance, and a CAVE-style cell-type table
  (:mod:`segscope.analysis.export.tables`);
- SWC skeletons with subcompartment type codes (:func:`write_swc`);
- :func:`export_bundle` writes all of them into one folder (what ``segscope export`` calls).

Every writer is atomic (built aside, renamed into place) and refuses to replace existing
output unless given ``force=True`` (FileExistsError naming the path).

Nothing here imports neuroglancer or pyarrow at module import time.
"""

from segscope.analysis.export.annotations import (
    AnnotationProperty,
    node_annotation_properties,
    write_node_annotations,
    write_point_annotations,
)
from segscope.analysis.export.atomic import atomic_file, atomic_folder
from segscope.analysis.export.bundle import (
    ALL_PARTS,
    ExportResult,
    SkeletonEdges,
    export_bundle,
    skeletons_from_edges_table,
)
from segscope.analysis.export.model import NOT_PREDICTED, NodeTable, Provenance, SegmentTable, tables_from_ground_truth
from segscope.analysis.export.neuroglancer_layers import (
    build_viewer_state,
    segment_properties_json,
    write_segment_properties,
    write_viewer_state,
)
from segscope.analysis.export.swc import SWC_TYPE_OF_COMPARTMENT, read_swc, swc_text, write_swc
from segscope.analysis.export.tables import (
    cave_cell_type_table,
    node_arrow_table,
    node_table_from_arrow,
    read_node_table,
    read_provenance,
    read_segment_table,
    read_table,
    segment_arrow_table,
    segment_table_from_arrow,
    write_table,
)

__all__ = [
    "ALL_PARTS",
    "NOT_PREDICTED",
    "SWC_TYPE_OF_COMPARTMENT",
    "AnnotationProperty",
    "ExportResult",
    "NodeTable",
    "Provenance",
    "SegmentTable",
    "SkeletonEdges",
    "atomic_file",
    "atomic_folder",
    "build_viewer_state",
    "cave_cell_type_table",
    "export_bundle",
    "node_annotation_properties",
    "node_arrow_table",
    "node_table_from_arrow",
    "read_node_table",
    "read_provenance",
    "read_segment_table",
    "read_swc",
    "read_table",
    "segment_arrow_table",
    "segment_properties_json",
    "segment_table_from_arrow",
    "skeletons_from_edges_table",
    "swc_text",
    "tables_from_ground_truth",
    "write_node_annotations",
    "write_point_annotations",
    "write_segment_properties",
    "write_swc",
    "write_table",
    "write_viewer_state",
]
