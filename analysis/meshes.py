"""Surface meshes of segments (zmesh) in Neuroglancer's precomputed legacy mesh format.

Meshing is zmesh's marching cubes on the label volume followed by its quadric-error
simplification. Vertices are nanometres in the volume's global frame: the face between
voxels ``i - 1`` and ``i`` lies at ``i * voxel_size_nm`` (the project's convention, a voxel
``v`` spans ``[v, v + 1) * voxel_size_nm``), so a mesh wraps its mask's voxels exactly up to
the simplification error.

On-disk format (Neuroglancer ``src/datasource/precomputed/meshes.md``, legacy
single-resolution)::

    MESH/info           {"@type": "neuroglancer_legacy_mesh"[, "segment_properties": "REL"]}
    MESH/<id>:0         manifest, JSON {"fragments": ["<id>_<x>_<y>_<z>", ...]}
    MESH/<id>_<x>_<y>_<z>
                        one fragment: uint32le num_vertices, float32le [num_vertices, 3]
                        xyz nm, uint32le [num_triangles, 3] vertex indices

A segmentation names its mesh folder with ``"mesh": "mesh"`` in its ``info``
(:func:`link_meshes`); a mesh folder can also be a data source of its own
(``precomputed://URL``), which is how the app shows meshes made on the fly.

Why the legacy format rather than the multi-resolution (``neuroglancer_multilod_draco``),
optionally sharded, one: the multi-resolution format needs Draco-encoded fragments split on
an octree per level of detail (a Draco encoder is not among SegScope's dependencies), and
pays off on large datasets where a whole neuron is too heavy to load at full resolution.
SegScope's meshes are of a demo volume (about a thousand segments, a few tens of MB) and of
single segments cut from a bounded box around a click: one resolution is all they have,
and the legacy files are written with numpy alone and read by every Neuroglancer.
Fragments are per block (:func:`mesh_volume` streams a volume in blocks), as Neuroglancer's
legacy format intends for meshes computed in parallel pieces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segscope.analysis.progress import Progress
from segscope.analysis.skeletonise import grow_segment_box

log = logging.getLogger(__name__)

MESH_INFO_TYPE = "neuroglancer_legacy_mesh"
#: The mesh folder's name inside a segmentation folder (``"mesh"`` in its info).
MESH_FOLDER = "mesh"
#: zmesh's triangle reduction target (10x fewer triangles; vertices move at most ``max_error_nm``).
DEFAULT_REDUCTION_FACTOR = 10
#: Voxels (x, y, z) meshed at once by :func:`mesh_volume`: bounds memory for large volumes.
DEFAULT_BLOCK_VOX = (256, 256, 256)
#: Largest box edge (voxels per axis) a segment is meshed in around a click: the same limit
#: as skeletons made on demand (``segscope.analysis.skeletonise``), so one box serves both.
DEFAULT_MAX_BOX_VOX = 512


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh of one segment.

    Attributes
    ----------
    segment_id : int
    vertices_nm : numpy.ndarray
        float32 ``[V, 3]`` xyz positions in nm (global frame).
    faces : numpy.ndarray
        uint32 ``[F, 3]`` vertex indices of each triangle.
    """

    segment_id: int
    vertices_nm: np.ndarray
    faces: np.ndarray

    @property
    def n_vertices(self) -> int:
        return len(self.vertices_nm)

    @property
    def n_faces(self) -> int:
        return len(self.faces)


def encode_fragment(vertices_nm: np.ndarray, faces: np.ndarray) -> bytes:
    """Bytes of one legacy mesh fragment (``vertices_nm`` float ``[V, 3]`` nm, ``faces`` ``[F, 3]``)."""
    vertices = np.ascontiguousarray(vertices_nm, dtype="<f4").reshape(-1, 3)
    triangles = np.ascontiguousarray(faces, dtype="<u4").reshape(-1, 3)
    if len(triangles) and int(triangles.max()) >= len(vertices):
        raise ValueError(f"a triangle names vertex {int(triangles.max())} of {len(vertices)}")
    return np.uint32(len(vertices)).astype("<u4").tobytes() + vertices.tobytes() + triangles.tobytes()


def decode_fragment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (float32 ``[V, 3]`` nm) and faces (uint32 ``[F, 3]``) of a legacy fragment.

    Raises ValueError when the bytes are not a well-formed fragment.
    """
    if len(data) < 4:
        raise ValueError(f"mesh fragment of {len(data)} bytes has no vertex count")
    n = int(np.frombuffer(data, "<u4", 1)[0])
    rest = len(data) - 4 - 12 * n
    if rest < 0 or rest % 12:
        raise ValueError(f"mesh fragment of {len(data)} bytes does not hold {n} vertices and whole triangles")
    vertices = np.frombuffer(data, "<f4", 3 * n, 4).reshape(n, 3).astype(np.float32)
    faces = np.frombuffer(data, "<u4", rest // 4, 4 + 12 * n).reshape(-1, 3).astype(np.uint32)
    if len(faces) and int(faces.max()) >= n:
        raise ValueError(f"mesh fragment names vertex {int(faces.max())} of {n}")
    return vertices, faces


def mesh_labels(
    labels_xyz: np.ndarray,
    voxel_size_nm: Sequence[float] | np.ndarray,
    *,
    offset_vox: Sequence[int] | np.ndarray = (0, 0, 0),
    segment_ids: Iterable[int] | None = None,
    reduction_factor: int = DEFAULT_REDUCTION_FACTOR,
    max_error_nm: float | None = None,
) -> Iterator[Mesh]:
    """Mesh the labels of an ``[x, y, z]`` block, one :class:`Mesh` per label, in id order.

    Parameters
    ----------
    labels_xyz
        Integer labels, 0 = background. Surfaces touching the block's faces stay open
        there (pad with zeros to close them).
    voxel_size_nm
        Voxel size (x, y, z) in nm.
    offset_vox
        Absolute voxel (x, y, z) of ``labels_xyz[0, 0, 0]``.
    segment_ids
        Only these labels (all nonzero ones when None).
    reduction_factor
        zmesh's triangle reduction target; 0 keeps the marching-cubes surface.
    max_error_nm
        Largest distance (nm) simplification may move a vertex; None: zmesh's default (one
        voxel).
    """
    import zmesh

    labels = np.asarray(labels_xyz)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)  # a mask: its voxels are label 1
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected a 3-D [x, y, z] integer label block, got {labels.dtype} {labels.shape}")
    voxel = np.asarray(voxel_size_nm, dtype=np.float64).reshape(3)
    offset_nm = np.asarray(offset_vox, dtype=np.float64).reshape(3) * voxel
    wanted = None if segment_ids is None else np.unique(np.asarray(list(segment_ids), dtype=labels.dtype))
    if wanted is not None:
        labels = np.where(np.isin(labels, wanted), labels, 0).astype(labels.dtype)
    mesher = zmesh.Mesher(tuple(voxel.tolist()))
    mesher.mesh(np.ascontiguousarray(labels), close=False)
    try:
        for label in sorted(int(v) for v in mesher.ids()):
            if label == 0:
                continue
            # voxel_centered: voxel i's centre at (i + 0.5) * voxel, so faces lie on voxel corners.
            mesh = mesher.get(
                label, normals=False, reduction_factor=reduction_factor, max_error=max_error_nm, voxel_centered=True
            )
            mesher.erase(label)
            if len(mesh.faces) == 0:
                continue
            vertices = (np.asarray(mesh.vertices, dtype=np.float64) + offset_nm).astype(np.float32)
            yield Mesh(label, vertices, np.asarray(mesh.faces, dtype=np.uint32).reshape(-1, 3))
    finally:
        mesher.clear()


# --------------------------------------------------------------------------------------
# Writing and reading mesh folders
# --------------------------------------------------------------------------------------


def mesh_info(segment_properties: str | None = None) -> dict:
    """The mesh folder's ``info``; ``segment_properties`` is a path relative to it."""
    info: dict = {"@type": MESH_INFO_TYPE}
    if segment_properties is not None:
        info["segment_properties"] = segment_properties
    return info


def _write_manifest(directory: Path, segment_id: int, fragments: Sequence[str]) -> None:
    (directory / f"{segment_id}:0").write_text(json.dumps({"fragments": list(fragments)}))


def _fragment_name(segment_id: int, block_lo: Sequence[int] | np.ndarray) -> str:
    return f"{segment_id}_" + "_".join(str(int(v)) for v in block_lo)


def write_mesh_folder(
    directory: str | os.PathLike, meshes: Iterable[Mesh], *, segment_properties: str | None = None
) -> int:
    """Write whole meshes (one fragment each) as a legacy mesh folder; returns how many.

    ``directory`` is created if needed; existing files of the same names are replaced.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "info").write_text(json.dumps(mesh_info(segment_properties)) + "\n")
    count = 0
    seen: set[int] = set()
    for mesh in meshes:
        if mesh.segment_id in seen:
            raise ValueError(f"two meshes for segment {mesh.segment_id}")
        seen.add(mesh.segment_id)
        name = _fragment_name(mesh.segment_id, (0, 0, 0))
        (directory / name).write_bytes(encode_fragment(mesh.vertices_nm, mesh.faces))
        _write_manifest(directory, mesh.segment_id, [name])
        count += 1
    return count


def read_mesh(directory: str | os.PathLike, segment_id: int) -> Mesh:
    """A segment's mesh from a legacy mesh folder, all its fragments joined.

    Raises
    ------
    KeyError
        The folder has no manifest for the segment.
    ValueError
        The manifest or a fragment is malformed.
    """
    directory = Path(directory)
    segment_id = int(segment_id)
    manifest_path = directory / f"{segment_id}:0"
    if not manifest_path.is_file():
        raise KeyError(f"no mesh of segment {segment_id} in {directory}")
    try:
        fragments = json.loads(manifest_path.read_text())["fragments"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path} is not a mesh manifest: {error}") from error
    vertices, faces, base = [], [], 0
    for name in fragments:
        v, f = decode_fragment((directory / str(name)).read_bytes())
        vertices.append(v)
        faces.append(f + np.uint32(base))
        base += len(v)
    return Mesh(
        segment_id,
        np.concatenate(vertices) if vertices else np.zeros((0, 3), np.float32),
        np.concatenate(faces) if faces else np.zeros((0, 3), np.uint32),
    )


def link_meshes(segmentation_dir: str | os.PathLike, mesh_folder: str = MESH_FOLDER) -> dict:
    """Name ``mesh_folder`` (relative) as the meshes of a local precomputed segmentation.

    Only the ``"mesh"`` key of its ``info`` changes; every other key (``"skeletons"``,
    ``"segment_properties"``, scales...) is kept. The info is replaced in one rename.
    Returns the new info.
    """
    info_path = Path(segmentation_dir) / "info"
    info = json.loads(info_path.read_text())
    if not isinstance(info, dict) or info.get("type") != "segmentation":
        raise ValueError(f"{info_path} is not a precomputed segmentation info")
    info["mesh"] = mesh_folder
    tmp = info_path.with_name(".info.mesh.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)
    return info


def named_mesh(segmentation_url: str) -> str | None:
    """The mesh folder a precomputed segmentation's ``info`` names (``"mesh"``), or None.

    Only precomputed volumes name meshes; zarr and n5 have none. Local paths, ``file://``,
    ``gs://`` and ``http(s)://`` URLs (a ``precomputed://`` prefix allowed) are read.
    """
    from segscope.analysis.volume import _read_key, _split_prefix, kvstore_spec

    driver, url = _split_prefix(str(segmentation_url))
    if driver not in (None, "neuroglancer_precomputed"):
        return None
    try:
        raw = _read_key(kvstore_spec(url), "info")
        info = json.loads(raw) if raw is not None else None
    except (OSError, ValueError) as error:
        log.info("cannot read the info of %s (no meshes assumed): %s", segmentation_url, error)
        return None
    name = info.get("mesh") if isinstance(info, dict) else None
    return name if isinstance(name, str) and name else None


# --------------------------------------------------------------------------------------
# Whole volumes (streamed in blocks)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshSummary:
    """What :func:`mesh_volume` wrote.

    Attributes
    ----------
    directory : Path
    n_segments, n_fragments, n_vertices, n_faces : int
    seconds : float
        Wall time of the whole run (reading, meshing, simplifying, writing).
    """

    directory: Path
    n_segments: int
    n_fragments: int
    n_vertices: int
    n_faces: int
    seconds: float


def mesh_volume(
    segmentation,
    directory: str | os.PathLike,
    *,
    segment_ids: Iterable[int] | None = None,
    block_vox: Sequence[int] = DEFAULT_BLOCK_VOX,
    reduction_factor: int = DEFAULT_REDUCTION_FACTOR,
    max_error_nm: float | None = None,
    segment_properties: str | None = None,
) -> Generator[Progress, None, MeshSummary]:
    """Mesh a segmentation volume into a legacy mesh folder, block by block.

    Each block of ``block_vox`` voxels is read with one voxel of overlap (so the surfaces of
    neighbouring blocks meet) and zero padding at the volume's faces (so meshes close
    there); each segment gets one fragment per block it occupies and a manifest listing
    them. Memory is bounded by the block, not the volume. Yields progress per block and
    every few hundred segments; returns a :class:`MeshSummary`.

    Parameters
    ----------
    segmentation
        A :class:`segscope.analysis.volume.Volume` of integer labels.
    directory
        The mesh folder to fill (created; an existing ``info`` and same-named files are
        replaced). Use :func:`link_meshes` to name it in the segmentation's info.
    segment_ids
        Only these segments (all when None).
    """
    start = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    voxel = np.asarray(segmentation.voxel_size_nm, dtype=np.float64)
    origin = np.asarray(segmentation.origin_vox, dtype=np.int64)
    end = origin + np.asarray(segmentation.shape, dtype=np.int64)
    block = np.asarray(block_vox, dtype=np.int64).reshape(3)
    if np.any(block < 8):
        raise ValueError(f"block_vox must be at least 8 voxels per axis, got {list(block_vox)}")
    wanted = None if segment_ids is None else sorted({int(s) for s in segment_ids})
    grid = [range(int(a), int(b), int(s)) for a, b, s in zip(origin, end, block)]
    corners = [np.array([x, y, z], dtype=np.int64) for x in grid[0] for y in grid[1] for z in grid[2]]
    fragments: dict[int, list[str]] = {}
    n_vertices = n_faces = 0
    for index, lo in enumerate(corners):
        hi = np.minimum(lo + block, end)
        pad_lo = (lo == origin).astype(np.int64)  # a zero layer before the volume's first voxel
        read_lo, read_hi = lo - pad_lo, hi + 1  # Volume.read fills outside the volume with zeros
        labels = segmentation.read(read_lo, read_hi)
        for k, mesh in enumerate(
            mesh_labels(
                labels,
                voxel,
                offset_vox=read_lo,
                segment_ids=wanted,
                reduction_factor=reduction_factor,
                max_error_nm=max_error_nm,
            )
        ):
            name = _fragment_name(mesh.segment_id, lo)
            (directory / name).write_bytes(encode_fragment(mesh.vertices_nm, mesh.faces))
            fragments.setdefault(mesh.segment_id, []).append(name)
            n_vertices += mesh.n_vertices
            n_faces += mesh.n_faces
            if k % 200 == 199:
                yield Progress(index, len(corners), "blocks", f"meshed {len(fragments)} segments")
        del labels
        yield Progress(index + 1, len(corners), "blocks", f"meshed {len(fragments)} segments")
    for segment_id, names in fragments.items():
        _write_manifest(directory, segment_id, names)
    (directory / "info").write_text(json.dumps(mesh_info(segment_properties)) + "\n")
    summary = MeshSummary(
        directory,
        len(fragments),
        sum(len(v) for v in fragments.values()),
        n_vertices,
        n_faces,
        time.perf_counter() - start,
    )
    log.info(
        "meshed %d segments (%d triangles) into %s in %.1f s",
        summary.n_segments,
        summary.n_faces,
        directory,
        summary.seconds,
    )
    return summary


# --------------------------------------------------------------------------------------
# One segment around a point, in a growing box
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentMesh:
    """A segment's mesh made from a bounded box (:func:`mesh_segment_around`).

    Attributes
    ----------
    mesh : Mesh
    lo_vox, hi_vox : numpy.ndarray
        The box meshed (absolute voxels, xyz, ``[lo, hi)``).
    truncated : bool
        The segment goes on outside the box (the mesh is closed at the box's faces).
    seconds : float
        Wall time: reading the box (growth included) and meshing.
    read_seconds : float
        Of which reading the box.
    """

    mesh: Mesh
    lo_vox: np.ndarray
    hi_vox: np.ndarray
    truncated: bool
    seconds: float
    read_seconds: float


def mesh_segment_around(
    segmentation,
    segment_id: int,
    centre_nm: Sequence[float] | np.ndarray,
    *,
    initial_box_vox: Sequence[int] | None = None,
    max_box_vox: int | Sequence[int] = DEFAULT_MAX_BOX_VOX,
    reduction_factor: int = DEFAULT_REDUCTION_FACTOR,
    max_error_nm: float | None = None,
) -> Generator[Progress, None, SegmentMesh]:
    """Mesh one segment from a box around ``centre_nm`` (xyz nm) grown by :func:`grow_segment_box`.

    The mask is padded with background so the mesh is closed, also where the box cuts the
    segment (``truncated``). Yields progress per box read and before meshing.
    """
    start = time.perf_counter()
    voxel = np.asarray(segmentation.voxel_size_nm, dtype=np.float64)
    centre_vox = np.floor(np.asarray(centre_nm, dtype=np.float64).reshape(3) / voxel).astype(np.int64)
    box = yield from grow_segment_box(
        segmentation, segment_id, centre_vox, initial_box_vox=initial_box_vox, max_box_vox=max_box_vox
    )
    read_seconds = time.perf_counter() - start
    yield Progress(1, 2, "steps", f"meshing segment {int(segment_id)} in {(box.hi_vox - box.lo_vox).tolist()} voxels")
    padded = np.pad(box.mask.view(np.uint8), 1)
    meshes = list(
        mesh_labels(
            padded, voxel, offset_vox=box.lo_vox - 1, reduction_factor=reduction_factor, max_error_nm=max_error_nm
        )
    )
    del padded
    if not meshes:
        raise ValueError(f"segment {int(segment_id)} gave an empty mesh")
    mesh = Mesh(int(segment_id), meshes[0].vertices_nm, meshes[0].faces)
    seconds = time.perf_counter() - start
    yield Progress(2, 2, "steps", f"meshed segment {int(segment_id)}: {mesh.n_faces} triangles in {seconds:.2f} s")
    return SegmentMesh(mesh, box.lo_vox, box.hi_vox, box.truncated, seconds, read_seconds)


#: Bumped whenever meshes written to the cache would change (meshing parameters, format).
_CACHE_VERSION = 1


def mesh_cache_dir(segmentation, root: str | os.PathLike | None = None) -> Path:
    """The folder caching the meshes made on the fly from ``segmentation`` (created on first write).

    Keyed by the volume's URL, shape, origin, voxel size and dtype, so a different volume
    at the same URL does not reuse the meshes of the old one. ``root`` defaults to
    ``<user cache>/meshes``.
    """
    if root is None:
        from segscope.analysis.paths import user_cache_dir

        root = user_cache_dir() / "meshes"
    text = json.dumps(
        {
            "url": str(segmentation.url),
            "shape": [int(v) for v in segmentation.shape],
            "origin": [int(v) for v in segmentation.origin_vox],
            "voxel_nm": [float(v) for v in segmentation.voxel_size_nm],
            "dtype": str(segmentation.dtype),
            "version": _CACHE_VERSION,
        },
        sort_keys=True,
    )
    return Path(root) / hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_segment_mesh(
    segmentation,
    segment_id: int,
    centre_nm: Sequence[float] | np.ndarray,
    cache_dir: str | os.PathLike,
    **options,
) -> Generator[Progress, None, tuple[Path, SegmentMesh | None]]:
    """A mesh-only precomputed source of one segment under ``cache_dir``, made once.

    The source is the folder ``cache_dir/<segment_id>`` (a legacy mesh folder with its
    ``info``), written aside and renamed into place, so a reader never sees half a mesh.
    Returns the folder and the :class:`SegmentMesh` (None when it was already cached).
    ``options`` go to :func:`mesh_segment_around`.
    """
    from segscope.analysis.export.atomic import atomic_folder

    folder = Path(cache_dir) / str(int(segment_id))
    if (folder / f"{int(segment_id)}:0").is_file():
        return folder, None
    result = yield from mesh_segment_around(segmentation, segment_id, centre_nm, **options)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(folder) as work:
            write_mesh_folder(work, [result.mesh])
            (work / "segscope-mesh.json").write_text(
                json.dumps(
                    {
                        "segment_id": int(segment_id),
                        "box_vox": [result.lo_vox.tolist(), result.hi_vox.tolist()],
                        "truncated": result.truncated,
                        "seconds": round(result.seconds, 3),
                    }
                )
            )
    except FileExistsError:
        log.debug("mesh of segment %s was cached meanwhile", segment_id)
    return folder, result
