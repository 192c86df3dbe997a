"""Skeleton dataclass checks and the Neuroglancer precomputed skeleton round trip."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from segscope.analysis.skeletons import (
    UNKNOWN_COMPARTMENT,
    Skeleton,
    decode_skeleton,
    encode_skeleton,
    read_precomputed_skeleton,
    read_skeleton_info,
    skeleton_info,
    write_precomputed_skeletons,
)


def _skeleton(segment_id: int = 2**40 + 7, n: int = 5) -> Skeleton:
    rng = np.random.default_rng(3)
    nodes = rng.uniform(0, 8000, size=(n, 3))
    edges = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)
    return Skeleton(
        segment_id=segment_id,
        nodes_nm=nodes,
        edges=edges,
        compartment=np.array([0, 1, 2, 3, UNKNOWN_COMPARTMENT][:n], dtype=np.uint8),
        radius_nm=rng.uniform(50, 500, size=n),
    )


def test_round_trip_through_precomputed_files(tmp_path):
    a = _skeleton(2**40 + 7)
    b = _skeleton(123, n=3)
    assert write_precomputed_skeletons(tmp_path, [a, b]) == 2
    info = read_skeleton_info(tmp_path)
    assert info["@type"] == "neuroglancer_skeletons"
    assert [x["id"] for x in info["vertex_attributes"]] == ["radius", "compartment"]
    for original in (a, b):
        back = read_precomputed_skeleton(tmp_path, original.segment_id)
        # Positions are float32 on disk.
        np.testing.assert_allclose(back.nodes_nm, original.nodes_nm, rtol=1e-6)
        np.testing.assert_array_equal(back.edges, original.edges)
        np.testing.assert_array_equal(back.compartment, original.compartment)
        np.testing.assert_allclose(back.radius_nm, original.radius_nm, rtol=1e-6)


def test_binary_layout_matches_neuroglancer_spec():
    s = _skeleton(n=2)
    info = skeleton_info()
    data = encode_skeleton(s, info)
    n_vertices, n_edges = struct.unpack_from("<II", data, 0)
    assert (n_vertices, n_edges) == (2, 1)
    positions = np.frombuffer(data, "<f4", 6, 8).reshape(2, 3)
    np.testing.assert_allclose(positions, s.nodes_nm, rtol=1e-6)
    assert tuple(np.frombuffer(data, "<u4", 2, 32)) == (0, 1)
    radius = np.frombuffer(data, "<f4", 2, 40)
    np.testing.assert_allclose(radius, s.radius_nm, rtol=1e-6)
    # Compartment codes travel as float32 (WebGL has no uint8 vertex attributes).
    assert tuple(np.frombuffer(data, "<f4", 2, 48)) == (0.0, 1.0)
    assert len(data) == 56


def test_neuroglancer_python_encoder_agrees():
    ng_skeleton = pytest.importorskip("neuroglancer.skeleton")
    s = _skeleton(n=4)
    source = ng_skeleton.SkeletonSource.__new__(ng_skeleton.SkeletonSource)
    source.vertex_attributes = {
        "radius": ng_skeleton.VertexAttributeInfo(data_type=np.float32, num_components=1),
        "compartment": ng_skeleton.VertexAttributeInfo(data_type=np.float32, num_components=1),
    }
    theirs = ng_skeleton.Skeleton(
        s.nodes_nm, s.edges, {"radius": s.radius_nm, "compartment": s.compartment.astype(np.float32)}
    ).encode(source)
    assert encode_skeleton(s, skeleton_info()) == theirs


def test_decode_rejects_wrong_length():
    s = _skeleton()
    data = encode_skeleton(s, skeleton_info())
    with pytest.raises(ValueError, match="bytes"):
        decode_skeleton(s.segment_id, data + b"\0", skeleton_info())
    with pytest.raises(ValueError, match="truncated"):
        decode_skeleton(s.segment_id, data[:-3], skeleton_info())


def test_missing_skeleton_is_a_key_error_naming_the_id(tmp_path):
    write_precomputed_skeletons(tmp_path, [_skeleton(5)])
    with pytest.raises(KeyError, match="99"):
        read_precomputed_skeleton(tmp_path, 99)


def test_info_checks(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_skeleton_info(tmp_path)
    (tmp_path / "info").write_text(json.dumps({"@type": "neuroglancer_multiscale_volume"}))
    with pytest.raises(ValueError, match="neuroglancer_skeletons"):
        read_skeleton_info(tmp_path)


def test_mixed_attributes_are_refused(tmp_path):
    a = _skeleton(1)
    b = Skeleton(2, np.zeros((1, 3)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="radii"):
        write_precomputed_skeletons(tmp_path, [a, b])


def test_validation_and_lengths():
    with pytest.raises(ValueError, match="edge indices"):
        Skeleton(1, np.zeros((2, 3)), [[0, 2]])
    with pytest.raises(ValueError, match="nonzero uint64"):
        Skeleton(0, np.zeros((1, 3)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="compartment codes"):
        Skeleton(1, np.zeros((2, 3)), [[0, 1]], compartment=[0, 9])
    s = Skeleton(1, [[0, 0, 0], [300, 400, 0], [300, 400, 1200]], [[0, 1], [1, 2]])
    np.testing.assert_allclose(s.edge_lengths_nm(), [500.0, 1200.0])
    assert s.path_length_nm() == pytest.approx(1700.0)
    assert s.compartment_names() == ["unknown"] * 3
