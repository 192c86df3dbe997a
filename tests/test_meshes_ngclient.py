"""Neuroglancer's own JavaScript client reads SegScope's meshes (QtWebEngine, offscreen).

A small segmentation with meshes named in its info (and segment properties, which must stay
valid), and a mesh-only source as the app adds for a volume without meshes, are served over
HTTP from localhost; the client selects a segment and the test reads the vertices it decoded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("PyQt6.QtWebEngineWidgets")
pytest.importorskip("pytestqt")

from segscope.analysis.meshes import cached_segment_mesh, link_meshes, mesh_volume, read_mesh
from segscope.analysis.progress import drive
from segscope.analysis.volume import open_volume, write_volume

from ngclient import NeuroglancerPage, segment_label_script, serve_directory

pytestmark = [pytest.mark.qt, pytest.mark.timeout(180)]

VOXEL = (8.0, 8.0, 40.0)
BALL, TUBE = 2**35 + 3, 77  # one id above 2^32


def mesh_loaded_script(layer_name: str, segment_id: int) -> str:
    """JavaScript: the vertices the client decoded for one segment over all the layer's mesh sources.

    Value: ``{"vertices": n, "min": [x, y, z], "max": [...], "sources": k}`` once fragments
    arrived, ``{"pending": reason}`` before, ``{"error": message}`` when a source failed.
    """
    return f"""(() => {{
  const managed = viewer.layerManager.getLayerByName({json.dumps(layer_name)});
  if (managed === undefined || managed.layer === null) return {{pending: "no layer"}};
  for (const ds of managed.layer.dataSources) {{
    const ls = ds.loadState;
    if (ls !== undefined && ls.error !== undefined) return {{error: String(ls.error.message || ls.error)}};
  }}
  const meshLayers = managed.layer.renderLayers.filter((r) => r.meshShaderManager !== undefined);
  if (meshLayers.length === 0) return {{pending: "no mesh layer"}};
  let n = 0, sources = 0;
  const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  for (const r of meshLayers) {{
    const fragments = r.source.fragmentSource;
    if (fragments === undefined) continue;
    let found = false;
    for (const [key, chunk] of fragments.chunks) {{
      if (!key.startsWith("{int(segment_id)}/") || chunk.meshData === undefined) continue;
      const p = chunk.meshData.vertexPositions;
      found = true;
      n += p.length / 3;
      for (let i = 0; i < p.length; i += 3) for (let j = 0; j < 3; ++j) {{
        lo[j] = Math.min(lo[j], p[i + j]); hi[j] = Math.max(hi[j], p[i + j]);
      }}
    }}
    if (found) sources += 1;
  }}
  if (n === 0) return {{pending: "no fragment"}};
  return {{vertices: n, min: lo, max: hi, sources: sources}};
}})()"""


def labelled_folder(root):
    """A uint64 segmentation (voxel offset (4, 0, 2)) with a ball and a tube, and segment properties."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (64, 48, 24)], indexing="ij"), -1)
    labels = np.zeros((64, 48, 24), np.uint64)
    labels[np.linalg.norm((grid + 0.5 - [20, 24, 12]) * [1, 1, 5], axis=-1) <= 10] = BALL
    labels[30:62, 20:26, 10:14] = TUBE
    path = root / "segmentation"
    write_volume(path, labels, VOXEL, segmentation=True, chunk_size=(32, 32, 16), voxel_offset=(4, 0, 2))
    (path / "props").mkdir()
    (path / "props" / "info").write_text(
        json.dumps(
            {
                "@type": "neuroglancer_segment_properties",
                "inline": {
                    "ids": [str(BALL), str(TUBE)],
                    "properties": [{"id": "label", "type": "label", "values": ["the ball", "the tube"]}],
                },
            }
        )
    )
    info = json.loads((path / "info").read_text())
    (path / "info").write_text(json.dumps({**info, "segment_properties": "props"}))
    return path


def show(page, source, segment, position_vox):
    import neuroglancer

    with page.viewer.txn() as s:
        s.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=list(VOXEL))
        s.position = list(position_vox)
        s.layers["segmentation"] = neuroglancer.SegmentationLayer(source=source, segments=[segment])
        s.layout = "3d"


def test_neuroglancer_client_reads_the_meshes_a_segmentation_names(qapp, tmp_path):
    path = labelled_folder(tmp_path)
    drive(mesh_volume(open_volume(path), path / "mesh", block_vox=(32, 32, 32)))
    link_meshes(path)
    with serve_directory(tmp_path) as base_url, NeuroglancerPage() as page:
        for segment, label in ((BALL, "the ball"), (TUBE, "the tube")):
            show(page, f"precomputed://{base_url}/segmentation", segment, (30, 24, 14))
            loaded = page.wait_for(
                mesh_loaded_script("segmentation", segment), lambda v: v is not None and "pending" not in v
            )
            assert "error" not in loaded, loaded
            mesh = read_mesh(path / "mesh", segment)
            # The client decoded every fragment of the segment (the tube spans blocks), in nm.
            assert loaded["vertices"] == mesh.n_vertices
            np.testing.assert_allclose(loaded["min"], mesh.vertices_nm.min(axis=0), rtol=1e-6)
            np.testing.assert_allclose(loaded["max"], mesh.vertices_nm.max(axis=0), rtol=1e-6)
            # The segmentation's own segment properties are still read beside the meshes.
            assert page.wait_for(segment_label_script("segmentation", segment), timeout_s=20) == label


def test_neuroglancer_client_reads_a_mesh_only_source_beside_a_segmentation_without_meshes(qapp, tmp_path):
    path = labelled_folder(tmp_path)
    segmentation = open_volume(path)
    click_nm = (np.array([50, 22, 13]) + 0.5) * VOXEL  # in the tube
    folder, result = drive(cached_segment_mesh(segmentation, TUBE, click_nm, tmp_path / "cache"))
    assert result is not None and not result.truncated
    with serve_directory(tmp_path) as base_url, NeuroglancerPage() as page:
        sources = [f"precomputed://{base_url}/segmentation", f"precomputed://{base_url}/cache/{folder.name}"]
        show(page, sources, TUBE, (50, 22, 13))
        loaded = page.wait_for(mesh_loaded_script("segmentation", TUBE), lambda v: v is not None and "pending" not in v)
        assert "error" not in loaded, loaded
        assert loaded["sources"] == 1 and loaded["vertices"] == result.mesh.n_vertices
        np.testing.assert_allclose(loaded["min"], result.mesh.vertices_nm.min(axis=0), rtol=1e-6)
