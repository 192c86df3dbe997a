"""Skeletons of segments and their Neuroglancer precomputed encoding.

A skeleton is a graph of nodes (physical positions in nm, ``[N, 3]`` xyz) joined by
edges (``[E, 2]`` node indices), optionally with a subcompartment code and a radius per
node. The on-disk format is Neuroglancer's unsharded precomputed skeletons
(``src/neuroglancer/datasource/precomputed/skeletons.md``):

* ``DIR/info``: ``{"@type": "neuroglancer_skeletons", "transform": [12 numbers],
  "vertex_attributes": [{"id", "data_type", "num_components"}, ...]}``;
* ``DIR/<segment id in base 10>``: ``uint32le num_vertices``, ``uint32le num_edges``,
  ``float32le positions [num_vertices, 3]`` (nm here: the transform is the identity),
  ``uint32le edges [num_edges, 2]``, then each vertex attribute in ``info`` order,
  ``num_vertices * num_components`` little-endian values.

SegScope writes a ``"radius"`` (float32, nm) and a ``"compartment"`` (float32 holding the
integer index into ``analysis.COMPARTMENTS``; ``UNKNOWN_COMPARTMENT`` for unlabelled nodes)
attribute; WebGL, and so Neuroglancer, cannot use uint8 vertex attributes.
Node ids are the vertex indices.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT

log = logging.getLogger(__name__)


#: The 3 x 4 row-major identity transform: stored vertex positions are already nm.
_IDENTITY_TRANSFORM = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]

_ATTRIBUTE_DTYPES = {
    "float32": "<f4",
    "int8": "i1",
    "uint8": "u1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
}


@dataclass
class Skeleton:
    """Skeleton of one segment.

    Attributes
    ----------
    segment_id : int
        The segment's id (nonzero uint64 value).
    nodes_nm : np.ndarray
        float64 ``[N, 3]`` node positions, xyz in nm.
    edges : np.ndarray
        int64 ``[E, 2]`` pairs of indices into ``nodes_nm``.
    compartment : np.ndarray or None
        uint8 ``[N]`` codes indexing ``analysis.COMPARTMENTS`` (``UNKNOWN_COMPARTMENT``
        where unlabelled), or None when the skeleton carries no labels.
    radius_nm : np.ndarray or None
        float32 ``[N]`` approximate neurite radius at each node in nm, or None.
    """

    segment_id: int
    nodes_nm: np.ndarray
    edges: np.ndarray
    compartment: np.ndarray | None = None
    radius_nm: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.segment_id = int(self.segment_id)
        if not 0 < self.segment_id < 2**64:
            raise ValueError(f"segment id {self.segment_id} is not a nonzero uint64")
        self.nodes_nm = np.asarray(self.nodes_nm, dtype=np.float64).reshape(-1, 3)
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        n = len(self.nodes_nm)
        if self.edges.size and (self.edges.min() < 0 or self.edges.max() >= n):
            raise ValueError(
                f"skeleton {self.segment_id}: edge indices must lie in [0, {n}), "
                f"got range [{self.edges.min()}, {self.edges.max()}]"
            )
        if self.compartment is not None:
            self.compartment = np.asarray(self.compartment, dtype=np.uint8).reshape(-1)
            if len(self.compartment) != n:
                raise ValueError(f"skeleton {self.segment_id}: {len(self.compartment)} compartment codes for {n} nodes")
            bad = (self.compartment >= len(COMPARTMENTS)) & (self.compartment != UNKNOWN_COMPARTMENT)
            if bad.any():
                raise ValueError(
                    f"skeleton {self.segment_id}: compartment codes must index "
                    f"{COMPARTMENTS} or be {UNKNOWN_COMPARTMENT}, "
                    f"got {sorted(set(self.compartment[bad].tolist()))}"
                )
        if self.radius_nm is not None:
            self.radius_nm = np.asarray(self.radius_nm, dtype=np.float32).reshape(-1)
            if len(self.radius_nm) != n:
                raise ValueError(f"skeleton {self.segment_id}: {len(self.radius_nm)} radii for {n} nodes")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes_nm)

    def edge_lengths_nm(self) -> np.ndarray:
        """Length of every edge in nm, float64 ``[E]``."""
        a = self.nodes_nm[self.edges[:, 0]]
        b = self.nodes_nm[self.edges[:, 1]]
        return np.linalg.norm(b - a, axis=1)

    def path_length_nm(self) -> float:
        """Total cable length in nm (sum of edge lengths)."""
        return float(self.edge_lengths_nm().sum())

    def compartment_names(self) -> list[str]:
        """Compartment name per node (``"unknown"`` where unlabelled or no labels)."""
        if self.compartment is None:
            return ["unknown"] * self.n_nodes
        return [COMPARTMENTS[c] if c < len(COMPARTMENTS) else "unknown" for c in self.compartment]


def skeleton_info(*, with_radius: bool = True, with_compartment: bool = True) -> dict:
    """The precomputed skeleton ``info`` document SegScope writes."""
    attributes = []
    if with_radius:
        attributes.append({"id": "radius", "data_type": "float32", "num_components": 1})
    if with_compartment:
        # float32, not uint8: Neuroglancer's client rejects uint8 vertex attributes
        # ("Data type not supported by WebGL") and fails the whole segmentation source.
        attributes.append({"id": "compartment", "data_type": "float32", "num_components": 1})
    return {
        "@type": "neuroglancer_skeletons",
        "transform": list(_IDENTITY_TRANSFORM),
        "vertex_attributes": attributes,
    }


def encode_skeleton(skeleton: Skeleton, info: dict) -> bytes:
    """Encode one skeleton in the precomputed binary layout described by ``info``."""
    positions = np.ascontiguousarray(skeleton.nodes_nm, dtype="<f4")
    edges = np.ascontiguousarray(skeleton.edges, dtype="<u4")
    parts = [struct.pack("<II", len(positions), len(edges)), positions.tobytes(), edges.tobytes()]
    for attribute in info.get("vertex_attributes", []):
        name = attribute["id"]
        dtype = np.dtype(_ATTRIBUTE_DTYPES[attribute["data_type"]])
        components = int(attribute["num_components"])
        if name == "radius":
            values = skeleton.radius_nm
        elif name == "compartment":
            values = skeleton.compartment
        else:
            raise ValueError(f"SegScope cannot fill skeleton vertex attribute {name!r}")
        if values is None:
            raise ValueError(f"skeleton {skeleton.segment_id} has no {name!r} values but the info lists it")
        values = np.ascontiguousarray(values, dtype=dtype).reshape(len(positions), components)
        parts.append(values.tobytes())
    return b"".join(parts)


def decode_skeleton(segment_id: int, data: bytes, info: dict) -> Skeleton:
    """Decode one precomputed skeleton file (the inverse of ``encode_skeleton``).

    Raises ValueError when the byte count does not match the header and ``info``.
    """
    if len(data) < 8:
        raise ValueError(f"skeleton {segment_id}: {len(data)} bytes is too short for a header")
    n_vertices, n_edges = struct.unpack_from("<II", data, 0)
    offset = 8
    positions = np.frombuffer(data, dtype="<f4", count=3 * n_vertices, offset=offset)
    offset += positions.nbytes
    edges = np.frombuffer(data, dtype="<u4", count=2 * n_edges, offset=offset)
    offset += edges.nbytes
    attributes: dict[str, np.ndarray] = {}
    for attribute in info.get("vertex_attributes", []):
        dtype = np.dtype(_ATTRIBUTE_DTYPES[attribute["data_type"]])
        count = n_vertices * int(attribute["num_components"])
        if offset + count * dtype.itemsize > len(data):
            raise ValueError(f"skeleton {segment_id}: truncated attribute {attribute['id']!r}")
        attributes[attribute["id"]] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"skeleton {segment_id}: {len(data)} bytes but header and info describe {offset}")
    transform = np.asarray(info.get("transform", _IDENTITY_TRANSFORM), dtype=np.float64)
    nodes = positions.reshape(-1, 3).astype(np.float64)
    if not np.array_equal(transform, _IDENTITY_TRANSFORM):
        matrix = transform.reshape(3, 4)
        nodes = nodes @ matrix[:, :3].T + matrix[:, 3]
    radius = attributes.get("radius")
    compartment = attributes.get("compartment")
    return Skeleton(
        segment_id=segment_id,
        nodes_nm=nodes,
        edges=edges.reshape(-1, 2).astype(np.int64),
        compartment=None if compartment is None else compartment.astype(np.uint8),
        radius_nm=None if radius is None else radius.astype(np.float32),
    )


def write_precomputed_skeletons(directory: str | Path, skeletons: Iterable[Skeleton]) -> int:
    """Write skeletons as an unsharded Neuroglancer precomputed skeleton source.

    The ``radius`` and ``compartment`` vertex attributes are written when every skeleton
    has them (a mix is refused: Neuroglancer needs one layout for the whole source).
    Returns the number of skeletons written.
    """
    directory = Path(directory)
    skeletons = list(skeletons)
    with_radius = bool(skeletons) and all(s.radius_nm is not None for s in skeletons)
    with_compartment = bool(skeletons) and all(s.compartment is not None for s in skeletons)
    if any(s.radius_nm is not None for s in skeletons) and not with_radius:
        raise ValueError("some skeletons have radii and some do not; give all or none")
    if any(s.compartment is not None for s in skeletons) and not with_compartment:
        raise ValueError("some skeletons have compartments and some do not; give all or none")
    info = skeleton_info(with_radius=with_radius, with_compartment=with_compartment)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "info").write_text(json.dumps(info, indent=2) + "\n")
    seen: set[int] = set()
    for skeleton in skeletons:
        if skeleton.segment_id in seen:
            raise ValueError(f"two skeletons for segment {skeleton.segment_id}")
        seen.add(skeleton.segment_id)
        (directory / str(skeleton.segment_id)).write_bytes(encode_skeleton(skeleton, info))
    log.debug("wrote %d skeletons to %s", len(skeletons), directory)
    return len(skeletons)


def read_skeleton_info(directory: str | Path) -> dict:
    """Read and check the ``info`` of a precomputed skeleton source."""
    path = Path(directory) / "info"
    if not path.is_file():
        raise FileNotFoundError(f"no precomputed skeleton info at {path}")
    info = json.loads(path.read_text())
    if info.get("@type") != "neuroglancer_skeletons":
        raise ValueError(f"{path} is not a neuroglancer_skeletons info (@type={info.get('@type')!r})")
    if "sharding" in info and info["sharding"] is not None:
        raise ValueError(f"{path}: sharded skeleton sources are not supported")
    for attribute in info.get("vertex_attributes", []):
        if attribute.get("data_type") not in _ATTRIBUTE_DTYPES:
            raise ValueError(f"{path}: unsupported attribute data type in {attribute}")
    return info


def read_precomputed_skeleton(directory: str | Path, segment_id: int, info: dict | None = None) -> Skeleton:
    """Read the skeleton of ``segment_id`` from an unsharded precomputed source.

    Raises KeyError naming the id when the source has no skeleton for it.
    """
    directory = Path(directory)
    if info is None:
        info = read_skeleton_info(directory)
    path = directory / str(int(segment_id))
    if not path.is_file():
        raise KeyError(f"no skeleton for segment {int(segment_id)} in {directory}")
    return decode_skeleton(int(segment_id), path.read_bytes(), info)


def write_precomputed_skeleton(directory: str | Path, skeleton: Skeleton) -> None:
    """Add one skeleton to a precomputed skeleton folder, creating it and its ``info`` when new.

    The skeleton is encoded with the folder's ``info`` (a new folder gets the attributes the
    skeleton carries); each file is replaced atomically, so a reader never sees half of one.

    Raises
    ------
    ValueError
        When the folder's ``info`` lists an attribute the skeleton lacks.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info_path = directory / "info"
    if info_path.is_file():
        info = read_skeleton_info(directory)
    else:
        info = skeleton_info(
            with_radius=skeleton.radius_nm is not None, with_compartment=skeleton.compartment is not None
        )
        _write_atomically(info_path, (json.dumps(info, indent=2) + "\n").encode())
    _write_atomically(directory / str(skeleton.segment_id), encode_skeleton(skeleton, info))


def _write_atomically(path: Path, data: bytes) -> None:
    from segscope.analysis.export.atomic import atomic_file

    with atomic_file(path, force=True) as temporary:
        temporary.write_bytes(data)
