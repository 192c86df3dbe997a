"""Synapses: contact sites, the demo's synapse table and layer, reading user tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segscope.analysis.dataset import open_dataset
from segscope.analysis.synapses import (
    SynapseTable,
    SynapseTableError,
    contact_sites,
    read_synapse_table,
    write_synapse_table,
)


def test_contact_sites_of_a_hand_made_volume():
    seg = np.zeros((4, 3, 2), np.uint64)
    seg[0:2] = 7
    seg[2:4] = 5
    seg[3, 2, 1] = 9
    contacts = contact_sites(seg, (10.0, 20.0, 30.0))
    assert contacts.pairs.tolist() == [[5, 7], [5, 9]]
    assert contacts.n_faces.tolist() == [6, 3]  # 3 x 2 faces at x = 2; 9 meets 5 at (2,2,1), (3,1,1), (3,2,0)
    faces = contacts.face_xyz_nm[: contacts.face_start[1]]
    assert np.allclose(faces[:, 0], 20.0)  # the plane between voxels x = 1 and x = 2


def test_demo_synapses_lie_on_faces_between_their_segments(demo96_dir):
    dataset = open_dataset(demo96_dir)
    synapses = read_synapse_table(demo96_dir / "synapses.parquet")
    assert len(synapses) > 50
    seg = dataset.segmentation.read_all()
    vox = synapses.xyz_nm / dataset.voxel_size_nm
    on_face = np.isclose(vox, np.round(vox))  # exactly one axis lies on a voxel boundary
    assert (on_face.sum(axis=1) == 1).all()
    lo = np.floor(vox - 0.5 * on_face).astype(int)
    hi = lo + on_face
    sides = {frozenset((int(a), int(b))) for a, b in zip(seg[tuple(lo.T)], seg[tuple(hi.T)])}
    pairs = {frozenset((int(a), int(b))) for a, b in zip(synapses.pre, synapses.post)}
    assert pairs == sides or pairs <= sides
    per_row = [frozenset((int(seg[tuple(a)]), int(seg[tuple(b)]))) for a, b in zip(lo, hi)]
    assert per_row == [frozenset((int(a), int(b))) for a, b in zip(synapses.pre, synapses.post)]


def test_glia_make_no_synapses_and_rules_are_recorded(demo96_dir):
    dataset = open_dataset(demo96_dir)
    synapses = read_synapse_table(demo96_dir / "synapses.parquet")
    types = dict(zip(dataset.segment_ids.tolist(), dataset.segments["cell_type"].to_pylist()))
    partners = {types[int(s)] for s in np.concatenate([synapses.pre, synapses.post])}
    assert partners == {"excitatory", "inhibitory"}
    meta = json.loads((demo96_dir / "dataset.json").read_text())["synapses"]
    assert meta["count"] == len(synapses)
    assert meta["planted_motif"]["motif"] == "reciprocal"


def test_demo_annotation_layer_relates_synapses_to_both_partners(demo96_dir):
    info = json.loads((demo96_dir / "synapses" / "info").read_text())
    assert info["@type"] == "neuroglancer_annotations_v1"
    assert [r["id"] for r in info["relationships"]] == ["pre_segment", "post_segment"]
    synapses = read_synapse_table(demo96_dir / "synapses.parquet")
    pre = int(synapses.pre[0])
    data = (demo96_dir / "synapses" / "rel_pre_segment" / str(pre)).read_bytes()
    count = int(np.frombuffer(data[:8], "<u8")[0])
    assert count == int((synapses.pre == np.uint64(pre)).sum())


def test_csv_round_trip_keeps_ids_above_2_to_the_63(tmp_path):
    table = SynapseTable(
        np.array([2**63 + 5, 3], np.uint64), np.array([4, 2**64 - 1], np.uint64), np.array([[1.5, 2, 3], [4, 5, 6.25]])
    )
    for name in ("s.csv", "s.parquet"):
        back = read_synapse_table(write_synapse_table(tmp_path / name, table))
        assert back.pre.tolist() == table.pre.tolist() and back.post.tolist() == table.post.tolist()
        assert np.array_equal(back.xyz_nm, table.xyz_nm)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pre_segment,post_segment,x_nm,y_nm\n1,2,3,4\n", "lacks column"),
        ("pre_segment,post_segment,x_nm,y_nm,z_nm\n0,2,3,4,5\n", "0 or negative"),
        ("pre_segment,post_segment,x_nm,y_nm,z_nm\n1,2,3,,5\n", "empty values"),
        ("pre_segment,post_segment,x_nm,y_nm,z_nm\n1,2,3,inf,5\n", "infinite"),
        ("pre_segment,post_segment,x_nm,y_nm,z_nm\n1,x,3,4,5\n", "not a readable"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(SynapseTableError, match=message):
        read_synapse_table(path)


def test_missing_table_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        read_synapse_table(tmp_path / "nope.csv")
