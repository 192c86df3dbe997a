"""Exports: data model validation, Neuroglancer annotations/properties/state, tables, SWC, atomicity."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.export import (
    NodeTable,
    Provenance,
    SegmentTable,
    SkeletonEdges,
    build_viewer_state,
    cave_cell_type_table,
    export_bundle,
    node_arrow_table,
    node_table_from_arrow,
    read_node_table,
    read_provenance,
    read_segment_table,
    read_swc,
    read_table,
    segment_arrow_table,
    segment_table_from_arrow,
    skeletons_from_edges_table,
    swc_text,
    tables_from_ground_truth,
    write_node_annotations,
    write_segment_properties,
    write_swc,
    write_table,
)
from segscope.analysis.export.annotations import build_spatial_index, spatial_bounds
from segscope.analysis.export.atomic import atomic_file, atomic_folder
from segscope.analysis.progress import drive

SOMA, AXON, DENDRITE, GLIA = (COMPARTMENTS.index(n) for n in ("soma", "axon", "dendrite", "glia"))


# ----------------------------------------------------------------------------- fixtures


def make_nodes(seed: int = 0, sizes=(120, 80, 40), segment_ids=(7, 2**40 + 9, 11)) -> NodeTable:
    """Nodes of a few segments, each a chain along x with random compartments."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    segment_id = np.repeat(np.array(segment_ids, dtype=np.uint64), sizes)
    node_id = np.concatenate([np.arange(s) for s in sizes])
    xyz = rng.uniform([0, 0, 0], [20_000, 15_000, 4_000], size=(n, 3))
    compartment = rng.integers(-1, len(COMPARTMENTS), size=n)
    probability = rng.dirichlet(np.ones(len(COMPARTMENTS)), size=n).astype(np.float32)
    probability[compartment == -1] = np.nan
    ood = rng.random(n).astype(np.float32)
    ood[::7] = np.nan
    labels = np.array(["", "", "spine", "bouton", "axon? check"], dtype=object)[rng.integers(0, 5, size=n)]
    return NodeTable(segment_id, node_id, xyz, compartment, probability, ood, labels)


def make_segments(nodes: NodeTable) -> SegmentTable:
    ids = nodes.segment_ids()
    names = ("layer 2/3 pyramidal", "basket", "Basket")  # two names differ only by case
    probability = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [np.nan, np.nan, np.nan]], dtype=np.float32)[: len(ids)]
    return SegmentTable.from_nodes(
        nodes,
        cell_type_names=names,
        cell_type=["layer 2/3 pyramidal", "basket", ""][: len(ids)],
        cell_type_probability=probability,
        ood_score=np.array([0.05, 0.93, np.nan], dtype=np.float32)[: len(ids)],
        ood=np.array([False, True, False])[: len(ids)],
        manual_label=["", "checked by AB", ""][: len(ids)],
    )


@pytest.fixture
def nodes() -> NodeTable:
    return make_nodes()


@pytest.fixture
def segments(nodes) -> SegmentTable:
    return make_segments(nodes)


@pytest.fixture
def provenance() -> Provenance:
    return Provenance(
        model_name="segclr-demo",
        checkpoint_sha256="ab" * 32,
        aggregation_radius_nm=10_000.0,
        ood_threshold=0.5,
        dataset="demo://synthetic",
    )


# ------------------------------------------------------------------ a small spec decoder

_SIZES = {
    "float32": ("<f4", 4),
    "int32": ("<i4", 4),
    "uint32": ("<u4", 4),
    "int16": ("<i2", 2),
    "uint16": ("<u2", 2),
    "int8": ("<i1", 1),
    "uint8": ("<u1", 1),
}


class SpecDecoder:
    """Decodes a precomputed annotation folder straight from annotations.md (independent of the writer).

    Properties are laid out by the spec's rule (4-byte types, then 2-byte, then 1-byte, each
    group in info order), not by trusting the info order.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.info = json.loads((folder / "info").read_text())
        self.rank = len(self.info["dimensions"])
        specs = self.info["properties"]
        order = sorted(range(len(specs)), key=lambda i: -_SIZES[specs[i]["type"]][1])
        offset = 4 * self.rank
        self.layout = {}
        for i in order:
            fmt, size = _SIZES[specs[i]["type"]]
            offset += -offset % size
            self.layout[specs[i]["id"]] = (fmt, offset)
            offset += size
        self.record_bytes = offset + (-offset % 4)

    def _record(self, data: bytes, start: int) -> dict:
        point = np.frombuffer(data, "<f4", self.rank, start)
        props = {name: np.frombuffer(data, fmt, 1, start + offset)[0] for name, (fmt, offset) in self.layout.items()}
        return {"point": point, **props}

    def read_uint64_index(self, entry: dict, key: int) -> bytes:
        """One value of a by-id or relationship index, unsharded (a file) or sharded."""
        if "sharding" not in entry:
            return (self.folder / entry["key"] / str(key)).read_bytes()
        import tensorstore as ts

        store = ts.KvStore.open(
            {
                "driver": "neuroglancer_uint64_sharded",
                "base": (self.folder / entry["key"]).resolve().as_uri() + "/",
                "metadata": entry["sharding"],
            }
        ).result()
        result = store.read(struct.pack(">Q", key)).result()
        if result.state != "value":
            raise FileNotFoundError(f"{entry['key']}: no entry {key}")
        return result.value

    def multiple(self, path: Path | bytes) -> list[dict]:
        data = path if isinstance(path, bytes) else path.read_bytes()
        (count,) = struct.unpack_from("<Q", data, 0)
        assert len(data) == 8 + count * (self.record_bytes + 8), f"{path}: size does not match count {count}"
        records = [self._record(data, 8 + i * self.record_bytes) for i in range(count)]
        ids = np.frombuffer(data, "<u8", count, 8 + count * self.record_bytes)
        for record, annotation_id in zip(records, ids):
            record["id"] = int(annotation_id)
        return records

    def single(self, annotation_id: int) -> dict:
        data = self.read_uint64_index(self.info["by_id"], annotation_id)
        record = self._record(data, 0)
        offset = self.record_bytes
        related = []
        for _ in self.info["relationships"]:
            (count,) = struct.unpack_from("<I", data, offset)
            related.append(np.frombuffer(data, "<u8", count, offset + 4).tolist())
            offset += 4 + 8 * count
        assert offset == len(data), "trailing bytes in a by-id entry"
        record["related"] = related
        return record

    def related(self, relationship: str, segment_id: int) -> list[dict]:
        entry = next(r for r in self.info["relationships"] if r["id"] == relationship)
        return self.multiple(self.read_uint64_index(entry, segment_id))

    def spatial_levels(self):
        for level in self.info["spatial"]:
            cells = {}
            for path in (self.folder / level["key"]).iterdir():
                cells[tuple(int(c) for c in path.name.split("_"))] = self.multiple(path)
            yield level, cells


def enum_label(info: dict, prop_id: str, value) -> str:
    spec = next(p for p in info["properties"] if p["id"] == prop_id)
    return spec["enum_labels"][spec["enum_values"].index(int(value))]


# ----------------------------------------------------------------------------- model


def test_node_table_fills_defaults_and_counts_compartments():
    nodes = NodeTable([5, 5, 6], [0, 1, 0], np.zeros((3, 3)), compartment=[SOMA, -1, AXON])
    assert nodes.compartment_probability.shape == (3, len(COMPARTMENTS))
    assert np.isnan(nodes.compartment_probability).all() and np.isnan(nodes.ood_score).all()
    assert list(nodes.manual_label) == ["", "", ""]
    counts = nodes.compartment_counts([6, 5, 99])
    assert counts[0, AXON] == 1 and counts[1, SOMA] == 1 and counts.sum() == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(node_id=[0, 1]), ValueError, "node_id has 2 entries"),
        (dict(xyz_nm=[[0, 0, 0], [np.nan, 0, 0], [1, 1, 1]]), ValueError, "NaN or infinite"),
        (dict(compartment=[0, 4, 1]), ValueError, "compartment codes"),
        (dict(node_id=[0, 0, 1], segment_id=[3, 3, 3]), ValueError, "unique"),
        (dict(segment_id=[1.5, 2, 3]), TypeError, "segment_id must hold integers"),
        (dict(segment_id=[-1, 2, 3]), ValueError, "segment_id values"),
        (dict(compartment_probability=np.zeros((3, 2))), ValueError, "compartment_probability must have shape"),
        (dict(manual_label=["a", 3, ""]), TypeError, r"manual_label\[1\]"),
    ],
)
def test_node_table_rejects_bad_input(kwargs, error, match):
    base = dict(segment_id=[1, 2, 3], node_id=[0, 1, 2], xyz_nm=np.zeros((3, 3)))
    with pytest.raises(error, match=match):
        NodeTable(**{**base, **kwargs})


def test_segment_table_rejects_unknown_cell_type_and_duplicates():
    with pytest.raises(ValueError, match="not in cell_type_names"):
        SegmentTable([1, 2], cell_type_names=("a",), cell_type=["a", "b"])
    with pytest.raises(ValueError, match="segment_id must be unique"):
        SegmentTable([1, 1])
    with pytest.raises(ValueError, match="compartment_node_counts"):
        SegmentTable([1], compartment_node_counts=[[-1, 0, 0, 0]])


def test_provenance_json_round_trip_and_validation(provenance):
    again = Provenance.from_json(provenance.to_json())
    assert again == provenance
    assert again.created.endswith("+00:00")
    with pytest.raises(ValueError, match="64 hex digits"):
        Provenance(checkpoint_sha256="xyz")
    with pytest.raises(ValueError, match="not valid JSON"):
        Provenance.from_json("{")


def test_tables_from_ground_truth(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "segment_id": pa.array([4, 4, 9], pa.uint64()),
                "node_id": [0, 1, 0],
                "x_nm": [1.0, 2.0, 3.0],
                "y_nm": [0.0, 0.0, 0.0],
                "z_nm": [5.0, 5.0, 5.0],
                "compartment": ["soma", "axon", "unknown"],
            }
        ),
        tmp_path / "nodes.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "segment_id": pa.array([4, 9], pa.uint64()),
                "cell_id": [1, 2],
                "cell_type": ["pyr", None],
                "n_voxels": [10, 20],
                "n_nodes": [2, 1],
            }
        ),
        tmp_path / "segments.parquet",
    )
    nodes, segments = tables_from_ground_truth(tmp_path / "nodes.parquet", tmp_path / "segments.parquet")
    assert nodes.compartment.tolist() == [SOMA, AXON, -1]
    assert nodes.compartment_probability[0, SOMA] == 1 and np.isnan(nodes.compartment_probability[2]).all()
    assert segments.cell_type.tolist() == ["pyr", ""] and segments.cell_type_names == ("pyr",)
    assert segments.compartment_node_counts[0, SOMA] == 1 and segments.compartment_node_counts[1].sum() == 0
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        tables_from_ground_truth(tmp_path / "missing.parquet", tmp_path / "segments.parquet")
    _, ordered = tables_from_ground_truth(tmp_path / "nodes.parquet", tmp_path / "segments.parquet", ("inh", "pyr"))
    assert ordered.cell_type_names == ("inh", "pyr") and ordered.cell_type_probability[0].tolist() == [0, 1]

    pq.write_table(
        pa.table({"segment_id": pa.array([9, 4, 4], pa.uint64()), "node_a": [0, 0, 1], "node_b": [0, 1, 2]}),
        tmp_path / "edges.parquet",
    )
    skeletons = skeletons_from_edges_table(tmp_path / "edges.parquet")
    assert sorted(skeletons) == [4, 9]
    assert skeletons[4].edges.tolist() == [[0, 1], [1, 2]]


# ----------------------------------------------------------------------------- annotations


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_annotations_round_trip_by_id_and_relationships(tmp_path, nodes, sharded):
    info = drive(write_node_annotations(tmp_path / "ann", nodes, limit=25, sharded=sharded))
    assert ("sharding" in info["by_id"]) == sharded
    assert ("sharding" in info["relationships"][0]) == sharded
    decoder = SpecDecoder(tmp_path / "ann")
    assert decoder.info == info
    assert info["annotation_type"] == "POINT" and info["dimensions"]["x"] == [1e-9, "m"]
    labels = {p["id"]: p for p in info["properties"]}
    assert labels["compartment"]["enum_labels"] == ["none", *COMPARTMENTS]
    assert labels["manual_label"]["enum_labels"] == ["none", "axon? check", "bouton", "spine"]

    for row in range(len(nodes)):
        record = decoder.single(row)
        np.testing.assert_allclose(record["point"], nodes.xyz_nm[row], rtol=1e-6)
        assert record["related"] == [[int(nodes.segment_id[row])]]
        assert record["compartment"] == nodes.compartment[row]
        assert record["node_id"] == nodes.node_id[row]
        for code, name in enumerate(COMPARTMENTS):
            np.testing.assert_equal(record[f"p_{name}"], nodes.compartment_probability[row, code])
        np.testing.assert_equal(record["ood_score"], nodes.ood_score[row])
        expected_label = nodes.manual_label[row] or "none"
        assert enum_label(info, "manual_label", record["manual_label"]) == expected_label

    for segment_id in nodes.segment_ids():
        related = decoder.related("segment", int(segment_id))
        rows = nodes.rows_of(segment_id)
        assert sorted(r["id"] for r in related) == rows.tolist()
        for record in related:
            np.testing.assert_allclose(record["point"], nodes.xyz_nm[record["id"]], rtol=1e-6)
    with pytest.raises(FileNotFoundError):
        decoder.related("segment", 12345)


def test_spatial_index_levels_cover_each_annotation_once(tmp_path, nodes):
    limit = 25
    info = drive(write_node_annotations(tmp_path / "ann", nodes, limit=limit))
    decoder = SpecDecoder(tmp_path / "ann")
    lower, upper = np.array(info["lower_bound"]), np.array(info["upper_bound"])
    stored = nodes.xyz_nm.astype(np.float32)
    assert (stored >= lower).all() and (stored < upper).all()
    assert len(info["spatial"]) >= 3, "with a small limit the index must have several levels"
    seen = []
    previous_chunk = None
    for level, cells in decoder.spatial_levels():
        chunk, grid = np.array(level["chunk_size"]), np.array(level["grid_shape"])
        np.testing.assert_allclose(chunk * grid, upper - lower)
        if previous_chunk is not None:  # each level's chunks evenly divide the previous level's
            ratio = previous_chunk / chunk
            assert set(np.round(ratio, 9)) <= {1.0, 2.0}
        previous_chunk = chunk
        for cell, records in cells.items():
            assert len(records) <= level["limit"]
            cell_lower = lower + np.array(cell) * chunk
            for record in records:
                assert (record["point"] >= cell_lower - 1e-3).all()
                assert (record["point"] <= cell_lower + chunk + 1e-3).all()
                seen.append(record["id"])
    assert sorted(seen) == list(range(len(nodes)))
    top_level = next(decoder.spatial_levels())[1][(0, 0, 0)]
    assert len(top_level) == limit
    top_ids = [r["id"] for r in top_level]
    assert top_ids != sorted(top_ids), "cell lists must be shuffled, not in table order"
    assert len({int(nodes.segment_id[i]) for i in top_ids}) > 1, "the coarsest level must sample all segments"


def test_spatial_index_terminates_on_coincident_points():
    points = np.zeros((50, 3))
    levels = build_spatial_index(points, *spatial_bounds(points), limit=3, rng=np.random.default_rng(0))
    emitted = np.concatenate([rows for level in levels for _, rows in level.cells])
    assert sorted(emitted.tolist()) == list(range(50))
    assert levels[-1].limit >= max(len(rows) for _, rows in levels[-1].cells)


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_annotations_read_by_neuroglancer_python_reader(tmp_path, nodes, sharded):
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    drive(write_node_annotations(tmp_path / "ann", nodes, limit=30, sharded=sharded))
    reader = AnnotationReader((tmp_path / "ann").resolve().as_uri() + "/")
    everything = list(reader.get_within_spatial_bounds())
    assert sorted(int(a.id) for a in everything) == list(range(len(nodes)))
    segment = int(nodes.segment_id[-1])
    assert len(reader.relationships["segment"][segment]) == len(nodes.rows_of(segment))
    annotation = reader.by_id[3]
    np.testing.assert_allclose(annotation.point, nodes.xyz_nm[3], rtol=1e-6)
    assert [int(s) for s in annotation.segments[0]] == [int(nodes.segment_id[3])]


def test_annotations_are_deterministic_for_a_seed(tmp_path, nodes):
    drive(write_node_annotations(tmp_path / "a", nodes, limit=20, seed=3))
    drive(write_node_annotations(tmp_path / "b", nodes, limit=20, seed=3))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)


def test_empty_node_table_writes_a_valid_empty_layer(tmp_path):
    empty = NodeTable(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros((0, 3)))
    info = drive(write_node_annotations(tmp_path / "ann", empty))
    assert info["spatial"][0]["limit"] >= 1 and info["spatial"][0]["grid_shape"] == [1, 1, 1]
    assert list((tmp_path / "ann" / "by_id").iterdir()) == []


# ----------------------------------------------------------------------------- segment properties


def check_segment_properties_schema(info: dict) -> None:
    """The rules of neuroglancer's segment_properties.md and its client's parser."""
    assert info["@type"] == "neuroglancer_segment_properties"
    inline = info["inline"]
    ids = inline["ids"]
    assert all(isinstance(i, str) and 0 <= int(i) < 2**64 for i in ids)
    kinds = [p["type"] for p in inline["properties"]]
    assert set(kinds) <= {"label", "description", "string", "tags", "number"}
    for single in ("label", "description", "tags"):
        assert kinds.count(single) <= 1
    assert len({p["id"] for p in inline["properties"]}) == len(kinds)
    for prop in inline["properties"]:
        assert len(prop["values"]) == len(ids)
        if prop["type"] == "tags":
            assert "description" not in prop
            tags = prop["tags"]
            assert all(" " not in t and not t.startswith("#") for t in tags)
            assert len({t.lower() for t in tags}) == len(tags)
            assert len(prop["tag_descriptions"]) == len(tags)
            for value in prop["values"]:
                assert value == sorted(set(value)) and all(0 <= v < len(tags) for v in value)
        elif prop["type"] == "number":
            assert prop["data_type"] in {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"}
            assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in prop["values"])
        else:
            assert all(isinstance(v, str) for v in prop["values"])


def test_segment_properties_json(tmp_path, segments):
    info = write_segment_properties(tmp_path / "props", segments)
    on_disk = json.loads((tmp_path / "props" / "info").read_text())
    assert on_disk == info
    check_segment_properties_schema(info)
    props = {p["id"]: p for p in info["inline"]["properties"]}
    assert info["inline"]["ids"] == [str(int(s)) for s in segments.segment_id]
    assert props["label"]["values"] == ["layer 2/3 pyramidal", "checked by AB?", ""]
    tags = props["tags"]["tags"]
    row_tags = [[tags[i] for i in v] for v in props["tags"]["values"]]
    assert row_tags[0] == ["layer_2/3_pyramidal"]
    assert sorted(row_tags[1]) == ["basket", "ood"]
    assert row_tags[2] == []
    assert props["ood_score"]["values"][2] == -1.0
    np.testing.assert_allclose(props["ood_score"]["values"][:2], [0.05, 0.93], rtol=1e-6)
    assert props["n_nodes"]["values"] == segments.compartment_node_counts.sum(axis=1).tolist()
    assert props["n_soma"]["values"] == segments.compartment_node_counts[:, SOMA].tolist()
    assert "p=0.70" in props["description"]["values"][0]


# ----------------------------------------------------------------------------- viewer state


def test_viewer_state_loads_into_neuroglancer(tmp_path):
    import neuroglancer

    state = build_viewer_state(
        annotations="http://localhost:9000/bundle/annotations",
        image="gs://bucket/em",
        segmentation="https://host/seg/",
        segment_properties="http://localhost:9000/bundle/segment_properties",
        voxel_size_nm=(8, 8, 40),
        position_nm=(800, 1600, 4000),
        selected_segments=[7],
    )
    again = neuroglancer.ViewerState(json.loads(json.dumps(state.to_json())))
    layers = {layer.name: layer for layer in again.layers}
    assert set(layers) == {"image", "segmentation", "nodes"}
    assert layers["image"].layer.source[0].url == "precomputed://gs://bucket/em"
    assert [s.url for s in layers["segmentation"].layer.source] == [
        "precomputed://https://host/seg",
        "precomputed://http://localhost:9000/bundle/segment_properties",
    ]
    assert list(layers["segmentation"].layer.segments) == [7]
    nodes_layer = layers["nodes"].layer
    assert nodes_layer.linked_segmentation_layer["segment"] == "segmentation"
    assert list(nodes_layer.filter_by_segmentation) == ["segment"]
    assert "prop_compartment()" in nodes_layer.shader
    assert list(again.dimensions.scales) == pytest.approx([8e-9, 8e-9, 40e-9])
    np.testing.assert_allclose(again.position, [100, 200, 100])


def test_viewer_state_local_paths_become_file_uris(tmp_path):
    state = build_viewer_state(annotations=tmp_path / "ann")
    assert state.layers["nodes"].source[0].url == f"precomputed://{(tmp_path / 'ann').resolve().as_uri()}"
    with pytest.raises(ValueError, match="voxel_size_nm"):
        build_viewer_state(annotations="http://x/a", voxel_size_nm=(0, 1, 1))


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_node_and_segment_tables_round_trip(tmp_path, nodes, segments, provenance, fmt):
    write_table(tmp_path / f"nodes.{fmt}", node_arrow_table(nodes, provenance))
    write_table(tmp_path / f"segments.{fmt}", segment_arrow_table(segments, provenance))
    node_table = read_table(tmp_path / f"nodes.{fmt}")
    assert node_table.column_names[:7] == [
        "annotation_id",
        "segment_id",
        "node_id",
        "x_nm",
        "y_nm",
        "z_nm",
        "compartment",
    ]
    back = node_table_from_arrow(node_table)
    np.testing.assert_array_equal(back.segment_id, nodes.segment_id)
    np.testing.assert_array_equal(back.node_id, nodes.node_id)
    np.testing.assert_allclose(back.xyz_nm, nodes.xyz_nm, rtol=1e-12)
    np.testing.assert_array_equal(back.compartment, nodes.compartment)
    np.testing.assert_allclose(back.compartment_probability, nodes.compartment_probability, rtol=1e-6)
    np.testing.assert_allclose(back.ood_score, nodes.ood_score, rtol=1e-6)
    assert back.manual_label.tolist() == nodes.manual_label.tolist()
    assert node_table.column("compartment").null_count == int((nodes.compartment == -1).sum())

    segment_table = read_table(tmp_path / f"segments.{fmt}")
    seg_back = segment_table_from_arrow(segment_table, None if fmt == "parquet" else segments.cell_type_names)
    np.testing.assert_array_equal(seg_back.segment_id, segments.segment_id)
    assert seg_back.cell_type_names == segments.cell_type_names
    assert seg_back.cell_type.tolist() == segments.cell_type.tolist()
    np.testing.assert_allclose(seg_back.cell_type_probability, segments.cell_type_probability, rtol=1e-6)
    np.testing.assert_array_equal(seg_back.ood, segments.ood)
    np.testing.assert_array_equal(seg_back.compartment_node_counts, segments.compartment_node_counts)
    assert seg_back.manual_label.tolist() == segments.manual_label.tolist()

    for name in ("nodes", "segments"):
        assert read_provenance(tmp_path / f"{name}.{fmt}") == provenance
    again, again_provenance = read_node_table(tmp_path / f"nodes.{fmt}")
    assert again_provenance == provenance and len(again) == len(nodes)
    seg_again, _ = read_segment_table(tmp_path / f"segments.{fmt}", segments.cell_type_names)
    assert seg_again.cell_type.tolist() == segments.cell_type.tolist()
    if fmt == "csv":
        assert json.loads((tmp_path / "nodes.provenance.json").read_text())["model_name"] == "segclr-demo"
        assert not (tmp_path / "nodes.csv").read_text().startswith("#")


def test_cave_cell_type_table(tmp_path, nodes, segments, provenance):
    # Put a clear soma into the first segment: its representative point must be a soma node.
    rows = nodes.rows_of(segments.segment_id[0])
    compartment = nodes.compartment.copy()
    compartment[rows] = DENDRITE
    compartment[rows[:3]] = SOMA
    xyz = nodes.xyz_nm.copy()
    xyz[rows[:3]] = [[800.0, 1600.0, 4000.0], [816.0, 1600.0, 4000.0], [2000.0, 1600.0, 4000.0]]
    nodes = NodeTable(nodes.segment_id, nodes.node_id, xyz, compartment)
    voxel = (8.0, 8.0, 40.0)
    table = cave_cell_type_table(segments, nodes, voxel, classification_system="demo_types", provenance=provenance)
    assert table.column_names == ["id", "valid", "pt_position", "pt_root_id", "classification_system", "cell_type"]
    # Segment 2 is flagged OOD and segment 3 has no cell type: only segment 1 remains.
    assert table.column("pt_root_id").to_pylist() == [int(segments.segment_id[0])]
    assert table.column("cell_type").to_pylist() == ["layer 2/3 pyramidal"]
    assert table.column("valid").to_pylist() == [True]
    assert table.column("classification_system").to_pylist() == ["demo_types"]
    assert table.column("pt_position").to_pylist() == [[102, 200, 100]]  # soma node at 816 nm (nearest centroid)
    with_ood = cave_cell_type_table(segments, nodes, voxel, include_ood=True)
    assert with_ood.column("pt_root_id").to_pylist() == [int(s) for s in segments.segment_id[:2]]
    assert with_ood.column("id").to_pylist() == [1, 2]

    write_table(tmp_path / "cell_types.parquet", table)
    write_table(tmp_path / "cell_types.csv", table)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "cell_types.parquet").column("pt_position").to_pylist() == [[102, 200, 100]]
    csv = read_table(tmp_path / "cell_types.csv")
    assert [json.loads(v) for v in csv.column("pt_position").to_pylist()] == [[102, 200, 100]]
    assert read_provenance(tmp_path / "cell_types.csv") == provenance


def test_write_table_refuses_unknown_suffix(tmp_path, nodes):
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        write_table(tmp_path / "nodes.xlsx", node_arrow_table(nodes))


# ----------------------------------------------------------------------------- SWC


def test_swc_parents_types_and_root():
    # A Y-shaped skeleton: 0-1-2 (axon), 1-3-4 (dendrite); node 3 is soma, so it is the root.
    node_ids = np.array([0, 1, 2, 3, 4])
    xyz = np.arange(15, dtype=float).reshape(5, 3)
    edges = np.array([[0, 1], [1, 2], [1, 3], [3, 4]])
    compartment = np.array([AXON, AXON, -1, SOMA, GLIA])
    text = swc_text(node_ids, xyz, edges, compartment, radius_nm=[1, 2, 3, 4, 5])
    rows = np.array([line.split() for line in text.splitlines() if not line.startswith("#")], dtype=float)
    sample, kind, parent = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 6].astype(int)
    assert sample[0] == 4 and parent[0] == -1  # node 3 (sample 4) is the root
    by_sample = dict(zip(sample, parent))
    assert by_sample == {4: -1, 2: 4, 5: 4, 1: 2, 3: 2}
    position = {s: i for i, s in enumerate(sample)}
    assert all(position[p] < position[s] for s, p in by_sample.items() if p != -1)
    assert dict(zip(sample, kind)) == {1: 2, 2: 2, 3: 0, 4: 1, 5: 7}
    np.testing.assert_allclose(rows[position[5], 2:6], [12, 13, 14, 5])
    assert "7 glia" in text


def test_swc_forest_cycles_and_bad_edges(tmp_path):
    node_ids = np.array([10, 11, 12, 20, 21])
    xyz = np.zeros((5, 3))
    # Component {10, 11, 12} has a cycle; {20, 21} has no soma: rooted at its lowest-id leaf.
    edges = np.array([[10, 11], [11, 12], [12, 10], [20, 21]])
    path = write_swc(tmp_path / "s.swc", node_ids, xyz, edges)
    rows = read_swc(path)
    assert len(rows) == 5
    roots = rows[rows[:, 6] == -1, 0].astype(int).tolist()
    assert roots == [11, 21]  # node 10 and node 20 (+1)
    assert (rows[:, 1] == 0).all()  # no compartments: undefined
    with pytest.raises(FileExistsError, match=r"s\.swc"):
        write_swc(tmp_path / "s.swc", node_ids, xyz, edges)
    with pytest.raises(ValueError, match="node id 99"):
        swc_text(node_ids, xyz, np.array([[10, 99]]))
    with pytest.raises(ValueError, match="node ids >= 0"):
        swc_text(np.array([-1, 0]), np.zeros((2, 3)), np.array([[-1, 0]]))


# ----------------------------------------------------------------------------- atomicity and bundle


def test_atomic_writes_refuse_to_overwrite_and_leave_nothing_on_failure(tmp_path, segments):
    target = tmp_path / "props"
    write_segment_properties(target, segments)
    before = (target / "info").read_bytes()
    with pytest.raises(FileExistsError, match=str(target)):
        write_segment_properties(target, segments)

    # PT012 is waived below: the failure under test has to be raised inside the atomic block.
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target, force=True) as work:  # noqa: PT012
        (work / "info").write_text("half")
        raise RuntimeError("boom")
    assert (target / "info").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["props"]

    with pytest.raises(RuntimeError, match="boom"), atomic_file(tmp_path / "file.txt") as temporary:  # noqa: PT012
        temporary.write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["props"]

    smaller = SegmentTable(segments.segment_id[:1])
    write_segment_properties(target, smaller, force=True)
    assert json.loads((target / "info").read_text())["inline"]["ids"] == [str(int(segments.segment_id[0]))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["props"]
    assert oct((target / "info").stat().st_mode & 0o777) != oct(0o600)


def test_export_bundle_writes_every_part(tmp_path, nodes, segments, provenance):
    chain = nodes.rows_of(segments.segment_id[0])
    edges = np.stack([nodes.node_id[chain][:-1], nodes.node_id[chain][1:]], axis=1)
    reports = []
    result = drive(
        export_bundle(
            tmp_path / "bundle",
            nodes,
            segments,
            provenance,
            voxel_size_nm=(8, 8, 40),
            image_url="https://data/em",
            segmentation_url="https://data/seg",
            serve_url="http://localhost:8000/bundle",
            skeletons={int(segments.segment_id[0]): SkeletonEdges(edges, radius_nm={0: 50.0})},
            spatial_limit=40,
        ),
        reports.append,
    )
    bundle = tmp_path / "bundle"
    assert result.folder == bundle
    expected = {
        "provenance.json",
        "state.json",
        "nodes.parquet",
        "nodes.csv",
        "segments.parquet",
        "segments.csv",
        "cell_types.parquet",
        "cell_types.csv",
        "nodes.provenance.json",
        "segments.provenance.json",
        "cell_types.provenance.json",
        "annotations",
        "segment_properties",
        "skeletons",
    }
    assert {p.name for p in bundle.iterdir()} == expected
    assert [r.done for r in reports if r.payload is None] == [1, 2, 3, 4, 5, 6]
    state = json.loads((bundle / "state.json").read_text())
    sources = [s["url"] for layer in state["layers"] for s in layer["source"]]
    assert "precomputed://http://localhost:8000/bundle/annotations" in sources
    assert "precomputed://http://localhost:8000/bundle/segment_properties" in sources
    swc = read_swc(bundle / "skeletons" / f"{int(segments.segment_id[0])}.swc")
    assert len(swc) == len(chain) and (swc[:, 6] == -1).sum() == 1
    assert swc[swc[:, 0] == 1, 5].tolist() == [50.0]
    assert Provenance.from_json((bundle / "provenance.json").read_text()) == provenance
    assert len(SpecDecoder(bundle / "annotations").related("segment", int(segments.segment_id[1]))) == len(
        nodes.rows_of(segments.segment_id[1])
    )
    with pytest.raises(FileExistsError, match="bundle"):
        drive(export_bundle(bundle, nodes, segments, provenance, voxel_size_nm=(8, 8, 40)))


def test_export_bundle_failure_keeps_previous_bundle(tmp_path, nodes, segments, provenance, monkeypatch):
    bundle = tmp_path / "bundle"
    drive(export_bundle(bundle, nodes, segments, provenance, voxel_size_nm=(8, 8, 40), parts=("tables",)))
    before = (bundle / "nodes.parquet").read_bytes()

    import segscope.analysis.export.bundle as bundle_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "write_segment_properties", broken)
    with pytest.raises(OSError, match="disk full"):
        drive(export_bundle(bundle, nodes, segments, provenance, voxel_size_nm=(8, 8, 40), force=True))
    assert (bundle / "nodes.parquet").read_bytes() == before
    assert not (bundle / "annotations").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_export_bundle_rejects_segments_missing_from_the_segment_table(tmp_path, nodes, segments, provenance):
    partial = SegmentTable(segments.segment_id[:1])
    with pytest.raises(ValueError, match="no row in the segment table"):
        drive(export_bundle(tmp_path / "b", nodes, partial, provenance, voxel_size_nm=(8, 8, 40)))
    with pytest.raises(ValueError, match="unknown export parts"):
        drive(export_bundle(tmp_path / "b", nodes, segments, provenance, voxel_size_nm=(8, 8, 40), parts=("x",)))
    assert not (tmp_path / "b").exists()
