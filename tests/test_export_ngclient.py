"""Neuroglancer's own JavaScript client reads the exported layers (QtWebEngine, offscreen).

The exported annotation layer and segment properties are served over HTTP from localhost;
the client, served by the neuroglancer package, opens the viewer state that SegScope
exports. Selecting a segment in the linked segmentation layer makes the client fetch that
segment's nodes through the relationship index; the test reads how many annotations the
client decoded, and the segment's label from the segment properties.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("PyQt6.QtWebEngineWidgets")
pytest.importorskip("pytestqt")

from segscope.analysis import COMPARTMENTS
from segscope.analysis.export import (
    NodeTable,
    SegmentTable,
    build_viewer_state,
    write_node_annotations,
    write_segment_properties,
)
from segscope.analysis.progress import drive

from ngclient import (
    NeuroglancerPage,
    annotation_by_id_script,
    annotation_count_script,
    segment_label_script,
    serve_directory,
)

pytestmark = [pytest.mark.qt, pytest.mark.timeout(180)]

SEGMENTS = {5: 37, 2**33 + 1: 52, 900: 11}  # segment id -> number of nodes (one above 2^32)


def exported_layers(folder, sharded=False):
    rng = np.random.default_rng(4)
    ids = np.repeat(np.array(list(SEGMENTS), dtype=np.uint64), list(SEGMENTS.values()))
    n = len(ids)
    nodes = NodeTable(
        segment_id=ids,
        node_id=np.concatenate([np.arange(k) for k in SEGMENTS.values()]),
        xyz_nm=rng.uniform([0, 0, 0], [8000, 8000, 2000], size=(n, 3)),
        compartment=rng.integers(-1, len(COMPARTMENTS), size=n),
        ood_score=rng.random(n),
        manual_label=np.where(rng.random(n) < 0.2, "checked", ""),
    )
    cell_types = {5: "basket", 900: "", 2**33 + 1: "pyramidal"}
    segments = SegmentTable.from_nodes(
        nodes, cell_type_names=("pyramidal", "basket"), cell_type=[cell_types[int(s)] for s in nodes.segment_ids()]
    )
    # A small limit gives a multi-level spatial index, as a real export has.
    drive(write_node_annotations(folder / "annotations", nodes, limit=16, sharded=sharded))
    write_segment_properties(folder / "segment_properties", segments)
    return nodes


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_neuroglancer_client_loads_exported_annotations(qapp, tmp_path, sharded):
    nodes = exported_layers(tmp_path, sharded)
    with serve_directory(tmp_path) as base_url, NeuroglancerPage() as page:
        first, second = 2**33 + 1, 900
        state = build_viewer_state(
            annotations=f"{base_url}/annotations",
            segment_properties=f"{base_url}/segment_properties",
            voxel_size_nm=(8, 8, 40),
            position_nm=nodes.xyz_nm.mean(axis=0),
            selected_segments=[first],
        )
        page.viewer.set_state(state)

        loaded = page.wait_for(
            annotation_count_script("nodes", 0, first), lambda v: v is not None and "pending" not in v, timeout_s=60
        )
        assert "error" not in loaded, loaded
        assert loaded["count"] == SEGMENTS[first]
        assert sorted(int(i) for i in loaded["ids"]) == nodes.rows_of(first).tolist()
        # The client shows the label followed by the segment's tags.
        assert page.wait_for(segment_label_script("segmentation", first), timeout_s=20) == "pyramidal #pyramidal"

        # By id (the index Neuroglancer reads on hover/selection): position, properties in
        # info order, and the related segment, which only this index stores.
        row = int(nodes.rows_of(second)[3])
        annotation = page.wait_for(
            annotation_by_id_script("nodes", row), lambda v: v is not None and "pending" not in v, timeout_s=30
        )
        assert annotation.get("related") == [[str(second)]], annotation
        np.testing.assert_allclose(annotation["point"], nodes.xyz_nm[row], rtol=1e-6)
        info = json.loads((tmp_path / "annotations" / "info").read_text())
        props = dict(zip((p["id"] for p in info["properties"]), annotation["properties"]))
        assert props["compartment"] == nodes.compartment[row]
        assert props["node_id"] == nodes.node_id[row]
        assert props["ood_score"] == pytest.approx(nodes.ood_score[row], rel=1e-6)
        absent = page.wait_for(
            annotation_by_id_script("nodes", 10**6), lambda v: v is not None and "pending" not in v, timeout_s=20
        )
        assert absent == {"missing": True}

        with page.viewer.txn() as txn:
            txn.layers["segmentation"].segments = {second}
        loaded = page.wait_for(
            annotation_count_script("nodes", 0, second), lambda v: v is not None and "pending" not in v, timeout_s=30
        )
        assert loaded.get("count") == SEGMENTS[second], loaded


SPATIAL_IDS_SCRIPT = """(() => {
  const managed = viewer.layerManager.getLayerByName("nodes");
  if (managed === undefined || managed.layer === null) return null;
  const states = managed.layer.annotationStates.states;
  if (states.length === 0) return null;
  const levels = [];
  for (const source of states[0].source.spatiallyIndexedSources) {
    const ids = [];
    for (const chunk of source.chunks.values()) {
      if (chunk.data !== undefined) ids.push(...chunk.data.serializedAnnotations.typeToIds[0]);
    }
    levels.push(ids);
  }
  return levels;
})()"""


def test_neuroglancer_client_reads_every_spatial_index_level(qapp, tmp_path):
    """Without a segment filter the client draws from the spatial index: with the whole layer
    in the 3-D view it loads every level, and together they hold each node exactly once."""
    nodes = exported_layers(tmp_path)
    with serve_directory(tmp_path) as base_url, NeuroglancerPage() as page:
        page.viewer.set_state(
            build_viewer_state(
                annotations=f"{base_url}/annotations", voxel_size_nm=(8, 8, 40), position_nm=nodes.xyz_nm.mean(axis=0)
            )
        )
        levels = page.wait_for(
            SPATIAL_IDS_SCRIPT, lambda v: bool(v) and sum(len(ids) for ids in v) >= len(nodes), timeout_s=60
        )
        assert len(levels) >= 3, "the export should have a multi-level spatial index"
        all_ids = sorted(int(i) for ids in levels for i in ids)
        assert all_ids == list(range(len(nodes)))
