"""Node, segment and CAVE-style cell-type tables in Parquet and CSV, with provenance.

Missing values are nulls in both formats (empty fields in CSV): a compartment or cell type
that was not predicted, an OOD score or probability that is NaN, an empty manual label.

Provenance: Parquet files carry it in the schema metadata under ``segscope_provenance``
(JSON). CSV files carry it in a sidecar ``<name>.provenance.json`` beside ``<name>.csv``
(leading ``#`` lines would break most CSV readers). Both are written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS
from segscope.analysis.export.atomic import atomic_file, check_writable
from segscope.analysis.export.model import NOT_PREDICTED, NodeTable, Provenance, SegmentTable

log = logging.getLogger(__name__)

PROVENANCE_KEY = b"segscope_provenance"
#: Name of a CAVE table's classification system when the caller gives none.
DEFAULT_CLASSIFICATION_SYSTEM = "segscope"


def _nullable_float(values: np.ndarray):
    import pyarrow as pa

    values = np.asarray(values, dtype=np.float32)
    return pa.array(values, mask=~np.isfinite(values), type=pa.float32())


def _nullable_string(values: Sequence[str] | np.ndarray):
    import pyarrow as pa

    return pa.array([v if v else None for v in values], type=pa.string())


def probability_column(prefix: str, name: str) -> str:
    """Column name of the probability of class ``name`` (``prefix`` + ``name``, e.g. ``p_axon``)."""
    return f"{prefix}{name}"


def node_arrow_table(nodes: NodeTable, provenance: Provenance | None = None):
    """``nodes`` as a pyarrow Table, one row per node (row order kept).

    Columns: ``annotation_id`` (uint64: the row, = the Neuroglancer annotation id),
    ``segment_id`` (uint64), ``node_id`` (int64), ``x_nm, y_nm, z_nm`` (float64),
    ``compartment`` (string), ``p_<compartment>`` (float32), ``ood_score`` (float32),
    ``manual_label`` (string).
    """
    import pyarrow as pa

    names = np.array(COMPARTMENTS, dtype=object)
    compartment = [names[c] if c != NOT_PREDICTED else None for c in nodes.compartment]
    columns = {
        "annotation_id": pa.array(np.arange(len(nodes), dtype=np.uint64)),
        "segment_id": pa.array(nodes.segment_id, type=pa.uint64()),
        "node_id": pa.array(nodes.node_id, type=pa.int64()),
        "x_nm": pa.array(nodes.xyz_nm[:, 0]),
        "y_nm": pa.array(nodes.xyz_nm[:, 1]),
        "z_nm": pa.array(nodes.xyz_nm[:, 2]),
        "compartment": pa.array(compartment, type=pa.string()),
    }
    for code, name in enumerate(COMPARTMENTS):
        columns[probability_column("p_", name)] = _nullable_float(nodes.compartment_probability[:, code])
    columns["ood_score"] = _nullable_float(nodes.ood_score)
    columns["manual_label"] = _nullable_string(nodes.manual_label)
    table = pa.table(columns)
    return _with_provenance(table, provenance)


def segment_arrow_table(segments: SegmentTable, provenance: Provenance | None = None):
    """``segments`` as a pyarrow Table.

    Columns: ``segment_id`` (uint64), ``cell_type`` (string), ``p_<cell type>`` (float32),
    ``ood_score`` (float32), ``ood`` (bool), ``n_<compartment>`` (int64), ``manual_label``.
    The cell-type class order is also stored as schema metadata ``segscope_cell_types``.
    """
    import pyarrow as pa

    columns = {
        "segment_id": pa.array(segments.segment_id, type=pa.uint64()),
        "cell_type": _nullable_string(segments.cell_type),
    }
    for column, name in enumerate(segments.cell_type_names):
        key = probability_column("p_", name)
        if key in columns or key in ("p_ood_score",):
            raise ValueError(f"cell type {name!r} gives a column name {key!r} that is already used")
        columns[key] = _nullable_float(segments.cell_type_probability[:, column])
    columns["ood_score"] = _nullable_float(segments.ood_score)
    columns["ood"] = pa.array(segments.ood, type=pa.bool_())
    for code, name in enumerate(COMPARTMENTS):
        columns[f"n_{name}"] = pa.array(segments.compartment_node_counts[:, code], type=pa.int64())
    columns["manual_label"] = _nullable_string(segments.manual_label)
    table = pa.table(columns)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"segscope_cell_types": json.dumps(list(segments.cell_type_names)).encode()}
    )
    return _with_provenance(table, provenance)


def representative_points(nodes: NodeTable, segment_ids: np.ndarray) -> np.ndarray:
    """One position per segment (float64 ``[S, 3]`` nm): CAVE's ``pt_position`` source.

    The mean of the segment's soma nodes when it has any (cell-type tables point at the
    soma), else the segment's node nearest its node centroid. NaN rows for segments
    without nodes.
    """
    points = np.full((len(segment_ids), 3), np.nan)
    soma = COMPARTMENTS.index("soma") if "soma" in COMPARTMENTS else None
    for row, segment_id in enumerate(segment_ids):
        rows = nodes.rows_of(segment_id)
        if not len(rows):
            continue
        xyz = nodes.xyz_nm[rows]
        if soma is not None and (nodes.compartment[rows] == soma).any():
            soma_xyz = xyz[nodes.compartment[rows] == soma]
            # The soma node nearest the soma centroid: a point inside the cell, not between lobes.
            centre = soma_xyz.mean(axis=0)
            points[row] = soma_xyz[np.argmin(np.linalg.norm(soma_xyz - centre, axis=1))]
        else:
            centre = xyz.mean(axis=0)
            points[row] = xyz[np.argmin(np.linalg.norm(xyz - centre, axis=1))]
    return points


def cave_cell_type_table(
    segments: SegmentTable,
    nodes: NodeTable,
    voxel_size_nm: Sequence[float],
    *,
    classification_system: str = DEFAULT_CLASSIFICATION_SYSTEM,
    include_ood: bool = False,
    provenance: Provenance | None = None,
):
    """A CAVE-style cell-type table (``cell_type_local`` schema) as a pyarrow Table.

    Columns: ``id`` (int64, 1-based row id), ``valid`` (bool, True), ``pt_position``
    (list of 3 int64 voxels, x, y, z, of :func:`representative_points`), ``pt_root_id``
    (uint64 segment id), ``classification_system``, ``cell_type``.

    Segments with no cell type or no nodes are left out, and so are segments flagged OOD
    unless ``include_ood`` (a flagged call is by definition not to be trusted).
    """
    import pyarrow as pa

    voxel = np.asarray(voxel_size_nm, dtype=np.float64)
    if voxel.shape != (3,) or not (voxel > 0).all():
        raise ValueError(f"voxel_size_nm must be 3 positive numbers, got {voxel_size_nm!r}")
    points = representative_points(nodes, segments.segment_id)
    keep = (segments.cell_type != "") & np.isfinite(points).all(axis=1)
    if not include_ood:
        dropped = int((keep & segments.ood).sum())
        if dropped:
            log.info("CAVE table: leaving out %d segments flagged OOD", dropped)
        keep &= ~segments.ood
    no_nodes = int(((segments.cell_type != "") & ~np.isfinite(points).all(axis=1)).sum())
    if no_nodes:
        log.warning("CAVE table: %d segments with a cell type have no nodes and are left out", no_nodes)
    # nm -> voxel containing the point (nm = voxel * voxel_size, corner convention).
    voxels = np.floor(points[keep] / voxel).astype(np.int64)
    count = int(keep.sum())
    table = pa.table(
        {
            "id": pa.array(np.arange(1, count + 1, dtype=np.int64)),
            "valid": pa.array(np.ones(count, dtype=bool)),
            "pt_position": pa.array(voxels.tolist(), type=pa.list_(pa.int64(), 3)),
            "pt_root_id": pa.array(segments.segment_id[keep], type=pa.uint64()),
            "classification_system": pa.array([classification_system] * count, type=pa.string()),
            "cell_type": pa.array(list(segments.cell_type[keep]), type=pa.string()),
        }
    )
    table = table.replace_schema_metadata({b"segscope_voxel_size_nm": json.dumps(voxel.tolist()).encode()})
    return _with_provenance(table, provenance)


def _with_provenance(table, provenance: Provenance | None):
    if provenance is None:
        return table
    metadata = dict(table.schema.metadata or {})
    metadata[PROVENANCE_KEY] = provenance.to_json().encode()
    return table.replace_schema_metadata(metadata)


def provenance_sidecar(csv_path: str | Path) -> Path:
    """``<name>.provenance.json`` beside ``<name>.csv``."""
    path = Path(csv_path)
    return path.with_name(path.stem + ".provenance.json")


def write_table(path: str | Path, table, *, force: bool = False) -> Path:
    """Write a pyarrow Table as Parquet (``.parquet``) or CSV (``.csv``), atomically.

    Provenance in the schema metadata goes into the Parquet metadata, or, for CSV, into
    the sidecar :func:`provenance_sidecar`. List columns are written to CSV as JSON lists
    (``"[1, 2, 3]"``). Returns the path.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        with atomic_file(path, force=force) as temporary:
            pq.write_table(table, temporary)
        return path
    if suffix != ".csv":
        raise ValueError(f"table path must end in .parquet or .csv, got {path}")
    metadata = table.schema.metadata or {}
    sidecar = provenance_sidecar(path)
    provenance = metadata.get(PROVENANCE_KEY)
    check_writable(path, force)
    if provenance is not None:
        check_writable(sidecar, force)
    for index, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type):
            values = table.column(index).to_pylist()
            as_json = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
            table = table.set_column(index, field.name, as_json)
    # The sidecar goes first: a CSV is never seen without the provenance it was written with.
    if provenance is not None:
        with atomic_file(sidecar, force=force) as temporary:
            temporary.write_bytes(json.dumps(json.loads(provenance), indent=1, sort_keys=True).encode())
    with atomic_file(path, force=force) as temporary:
        pacsv.write_csv(table.replace_schema_metadata(None), temporary)
    return path


def read_provenance(path: str | Path) -> Provenance | None:
    """Provenance of a table written by :func:`write_table` (None when it has none)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() == ".parquet":
        metadata = pq.read_schema(path).metadata or {}
        text = metadata.get(PROVENANCE_KEY)
        return Provenance.from_json(text) if text is not None else None
    sidecar = provenance_sidecar(path)
    return Provenance.from_json(sidecar.read_text()) if sidecar.is_file() else None


def read_table(path: str | Path):
    """Read a table written by :func:`write_table` as a pyarrow Table.

    CSV columns get the types the writer used (ids as uint64/int64, strings as strings).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() == ".parquet":
        return pq.read_table(path)
    with pacsv.open_csv(path) as reader:
        header = reader.schema.names
    types = {}
    for name in header:
        if name in ("segment_id", "annotation_id", "pt_root_id"):
            types[name] = pa.uint64()
        elif name in ("node_id", "id") or name.startswith("n_"):
            types[name] = pa.int64()
        elif name in ("compartment", "cell_type", "manual_label", "classification_system", "pt_position"):
            types[name] = pa.string()
        elif name.startswith("p_") or name == "ood_score":
            types[name] = pa.float32()
    return pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )


def _strings(column) -> np.ndarray:
    return np.array(["" if v is None else v for v in column.to_pylist()], dtype=object)


def _floats(column) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls become NaN


def node_table_from_arrow(table) -> NodeTable:
    """Rebuild a :class:`NodeTable` from :func:`node_arrow_table` output (or its CSV)."""
    missing = [c for c in ("segment_id", "node_id", "x_nm", "y_nm", "z_nm") if c not in table.column_names]
    if missing:
        raise KeyError(f"node table lacks columns {missing}")
    lookup = {name: code for code, name in enumerate(COMPARTMENTS)}
    compartment = np.full(table.num_rows, NOT_PREDICTED, dtype=np.int16)
    if "compartment" in table.column_names:
        names = _strings(table.column("compartment"))
        unknown = sorted({n for n in names if n and n not in lookup})
        if unknown:
            raise ValueError(f"unknown compartments {unknown}; expected {COMPARTMENTS}")
        compartment = np.array([lookup.get(n, NOT_PREDICTED) for n in names], dtype=np.int16)
    probability = np.full((table.num_rows, len(COMPARTMENTS)), np.nan, dtype=np.float32)
    for code, name in enumerate(COMPARTMENTS):
        key = probability_column("p_", name)
        if key in table.column_names:
            probability[:, code] = _floats(table.column(key))
    return NodeTable(
        segment_id=table.column("segment_id").to_numpy().astype(np.uint64),
        node_id=table.column("node_id").to_numpy().astype(np.int64),
        xyz_nm=np.stack([table.column(c).to_numpy() for c in ("x_nm", "y_nm", "z_nm")], axis=1),
        compartment=compartment,
        compartment_probability=probability,
        ood_score=_floats(table.column("ood_score")) if "ood_score" in table.column_names else None,
        manual_label=_strings(table.column("manual_label")) if "manual_label" in table.column_names else None,
    )


def segment_table_from_arrow(table, cell_type_names: Sequence[str] | None = None) -> SegmentTable:
    """Rebuild a :class:`SegmentTable` from :func:`segment_arrow_table` output (or its CSV).

    The cell-type class order comes from the Parquet metadata, else ``cell_type_names``,
    else the ``p_*`` columns in order.
    """
    if "segment_id" not in table.column_names:
        raise KeyError("segment table lacks the segment_id column")
    metadata = table.schema.metadata or {}
    if cell_type_names is None and b"segscope_cell_types" in metadata:
        cell_type_names = json.loads(metadata[b"segscope_cell_types"])
    if cell_type_names is None:
        cell_type_names = [c[2:] for c in table.column_names if c.startswith("p_")]
    probability = (
        np.stack([_floats(table.column(probability_column("p_", name))) for name in cell_type_names], axis=1)
        if cell_type_names
        else None
    )
    counts = np.stack([table.column(f"n_{name}").to_numpy() for name in COMPARTMENTS], axis=1)
    return SegmentTable(
        segment_id=table.column("segment_id").to_numpy().astype(np.uint64),
        cell_type_names=tuple(cell_type_names),
        cell_type=_strings(table.column("cell_type")),
        cell_type_probability=probability,
        ood_score=_floats(table.column("ood_score")),
        ood=table.column("ood").to_numpy(zero_copy_only=False).astype(bool),
        compartment_node_counts=counts.astype(np.int64),
        manual_label=_strings(table.column("manual_label")),
    )


def read_node_table(path: str | Path) -> tuple[NodeTable, Provenance | None]:
    """A node table written by :func:`write_table` (Parquet or CSV) and its provenance."""
    return node_table_from_arrow(read_table(path)), read_provenance(path)


def read_segment_table(
    path: str | Path, cell_type_names: Sequence[str] | None = None
) -> tuple[SegmentTable, Provenance | None]:
    """A segment table written by :func:`write_table` (Parquet or CSV) and its provenance.

    CSV keeps no class order: pass ``cell_type_names`` or get the ``p_*`` column order.
    """
    return segment_table_from_arrow(read_table(path), cell_type_names), read_provenance(path)


def embeddings_arrow_table(
    segment_ids: np.ndarray,
    node_ids: np.ndarray,
    xyz_nm: np.ndarray,
    embeddings: np.ndarray,
    predictions: dict[str, np.ndarray] | None,
    provenance: dict,
):
    """The pyarrow Table of ``segscope embed``'s Parquet output (also the Beam pipeline's).

    Parameters
    ----------
    segment_ids, node_ids
        ``[N]`` segment (uint64) and node (int64) of each row.
    xyz_nm
        float ``[N, 3]`` node positions (nm, xyz).
    embeddings
        float32 ``[N, D]``.
    predictions
        Columns of :func:`segscope.analysis.classify.segments.predict_node_rows`, or None.
    provenance
        Stored as JSON under :data:`segscope.analysis.provenance.PROVENANCE_KEY`.

    Returns
    -------
    pyarrow.Table
        Columns segment_id, node_id, x_nm, y_nm, z_nm, e0..e{D-1} (float32), then with
        predictions compartment, compartment_probability, cell_type, cell_type_probability,
        ood_score, ood (the segment's flag; null where not predicted).
    """
    import pyarrow as pa

    from segscope.analysis.provenance import PROVENANCE_KEY

    columns = {
        "segment_id": pa.array(segment_ids, pa.uint64()),
        "node_id": pa.array(node_ids, pa.int64()),
        "x_nm": xyz_nm[:, 0],
        "y_nm": xyz_nm[:, 1],
        "z_nm": xyz_nm[:, 2],
    }
    for d in range(embeddings.shape[1]):
        columns[f"e{d}"] = pa.array(embeddings[:, d], pa.float32())
    if predictions is not None:
        columns["compartment"] = pa.array(predictions["compartment"], pa.string()).dictionary_encode()
        columns["compartment_probability"] = pa.array(predictions["compartment_probability"], pa.float32())
        columns["cell_type"] = pa.array(predictions["cell_type"], pa.string()).dictionary_encode()
        columns["cell_type_probability"] = pa.array(predictions["cell_type_probability"], pa.float32())
        columns["ood_score"] = pa.array(predictions["ood_score"], pa.float32())
        columns["ood"] = pa.array(predictions["ood"], pa.bool_())
    return pa.table(columns).replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance)})
