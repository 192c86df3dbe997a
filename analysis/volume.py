"""Image and segmentation volumes through TensorStore, and SegCLR-style masked cutouts.

Every array here is indexed ``[x, y, z]`` in *absolute* voxel coordinates of the volume
(TensorStore's domain, so a precomputed ``voxel_offset`` is honoured). Physical positions
are nanometres, ``nm = voxel * voxel_size_nm``; the point ``p`` (nm) lies in voxel
``floor(p / voxel_size_nm)``.

Sources are given as a local path, ``file://``, ``gs://`` or ``http(s)://`` URL, optionally
with a Neuroglancer-style format prefix (``precomputed://``, ``zarr://``, ``zarr2://``,
``zarr3://``, ``n5://``). Without a prefix the format is detected from the metadata files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

#: Format prefixes (as Neuroglancer writes them) -> TensorStore driver.
_PREFIX_DRIVERS = {
    "precomputed": "neuroglancer_precomputed",
    "zarr": "zarr",
    "zarr2": "zarr",
    "zarr3": "zarr3",
    "n5": "n5",
}
#: Metadata file that identifies each driver, in detection order.
_DRIVER_MARKERS = (
    ("neuroglancer_precomputed", "info"),
    ("zarr3", "zarr.json"),
    ("zarr", ".zarray"),
    ("n5", "attributes.json"),
)
#: Bytes of decoded chunks TensorStore may keep per process (shared by all volumes).
_CACHE_BYTES = 512 * 1024**2
#: Largest block (native voxels) read at once when cutouts share a read.
_MAX_SHARED_READ_VOXELS = 256**3

_context_lock = threading.Lock()
_shared_context = None


class VolumeError(ValueError):
    """A volume source is missing, unreadable, of an unsupported format, or inconsistent."""


class SegmentNotFoundError(KeyError):
    """A segment id has no voxels where it was expected."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "segment not found"


def _context():
    """One TensorStore context (and chunk cache) for the whole process."""
    global _shared_context
    import tensorstore as ts

    with _context_lock:
        if _shared_context is None:
            _shared_context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
        return _shared_context


def reset_chunk_cache() -> None:
    """Start a fresh chunk cache for volumes opened from now on (benchmarks, tests)."""
    global _shared_context
    with _context_lock:
        _shared_context = None


def _split_prefix(url: str) -> tuple[str | None, str]:
    """Split a Neuroglancer-style ``format://`` prefix off a source URL."""
    head, sep, rest = url.partition("://")
    if sep and head in _PREFIX_DRIVERS:
        return _PREFIX_DRIVERS[head], rest
    return None, url


def kvstore_spec(url: str) -> dict | str:
    """TensorStore kvstore spec for a local path or a file/gs/http(s)/s3 URL (a folder).

    Raises
    ------
    VolumeError
        For URL schemes TensorStore cannot read.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else url
        return {"driver": "file", "path": str(Path(path).expanduser().resolve()) + "/"}
    if scheme in ("gs", "s3"):
        return url.rstrip("/") + "/"
    if scheme in ("http", "https"):
        return {"driver": "http", "base_url": url.rstrip("/") + "/"}
    raise VolumeError(f"unsupported URL scheme {scheme!r} in {url!r} (use a path, file://, gs://, s3:// or http(s)://)")


#: Seconds a remote store may take to answer one metadata read or open (``$SEGSCOPE_REMOTE_TIMEOUT_S``).
REMOTE_TIMEOUT_S = 30.0


def remote_timeout_s() -> float:
    """The deadline (s) for one remote metadata read or open: ``$SEGSCOPE_REMOTE_TIMEOUT_S`` or 30."""
    try:
        value = float(os.environ.get("SEGSCOPE_REMOTE_TIMEOUT_S", REMOTE_TIMEOUT_S))
    except ValueError:
        return REMOTE_TIMEOUT_S
    return value if value > 0 else REMOTE_TIMEOUT_S


def _wait(future, kvstore: dict | str, what: str, timeout_s: float | None = None):
    """``future.result()``, with :func:`remote_timeout_s` as the deadline for a remote store.

    TensorStore retries a refused or silent server with back-off for minutes; a user should
    read one line instead (local files get no deadline: a large local read may be slow).
    ``timeout_s`` overrides the deadline (a large chunk read gets more). A future that misses
    its deadline is cancelled, so TensorStore stops retrying it.
    """
    if _is_local(kvstore):
        return future.result()
    timeout = remote_timeout_s() if timeout_s is None else timeout_s
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            future.cancel()
        raise VolumeError(
            f"{what}: no answer within {timeout:g} s (is the server up? set SEGSCOPE_REMOTE_TIMEOUT_S to wait longer)"
        ) from None


# Hosts that answered a connection in this process; probed once each.
_reachable_hosts: set[tuple[str, int]] = set()
_REMOTE_ENDPOINTS = {"gs": ("storage.googleapis.com", 443), "s3": ("s3.amazonaws.com", 443)}


def remote_endpoint(kvstore: dict | str) -> tuple[str, int] | None:
    """The ``(host, port)`` a remote kvstore spec reads from, or None for local files."""
    if _is_local(kvstore):
        return None
    url = kvstore["base_url"] if isinstance(kvstore, dict) else kvstore
    parsed = urlparse(str(url))
    scheme = parsed.scheme.lower()
    if scheme in _REMOTE_ENDPOINTS:
        return _REMOTE_ENDPOINTS[scheme]
    if parsed.hostname is None:
        return None
    try:
        port = parsed.port
    except ValueError:
        raise VolumeError(f"bad port in {url!r}") from None
    return parsed.hostname, port or (443 if scheme == "https" else 80)


def _indirect_route() -> bool:
    # Behind a proxy, or with a custom GCS/S3 endpoint, a direct connect says nothing about
    # what TensorStore will reach; the read deadlines still apply.
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "TENSORSTORE_GCS_HTTP_URL", "AWS_ENDPOINT_URL")
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in names)


def check_reachable(kvstore: dict | str, url: str) -> None:
    """Fail fast when a remote store's host cannot be resolved or refuses connections.

    TensorStore retries a refused connection (and, for gs:// without network, its credential
    lookup) for minutes; one TCP connect with a short deadline answers in at most a few
    seconds. A host that accepts is remembered for the process. Raises VolumeError.
    """
    import socket

    endpoint = remote_endpoint(kvstore)
    if endpoint is None or endpoint in _reachable_hosts or _indirect_route():
        return
    host, port = endpoint
    deadline = min(5.0, remote_timeout_s())
    try:
        with socket.create_connection((host, port), timeout=deadline):
            pass
    except socket.gaierror as exc:
        raise VolumeError(f"cannot reach {url!r}: host {host} not found ({exc.strerror}; no network?)") from None
    except TimeoutError:
        raise VolumeError(
            f"cannot reach {url!r}: {host}:{port} did not accept a connection within {deadline:g} s"
        ) from None
    except OSError as exc:
        raise VolumeError(f"cannot reach {url!r}: {host}:{port}: {exc.strerror or exc}") from None
    _reachable_hosts.add(endpoint)


def _is_local(kvstore: dict | str) -> TypeGuard[dict]:
    return isinstance(kvstore, dict) and kvstore.get("driver") == "file"


def _read_key(kvstore: dict | str, key: str) -> bytes | None:
    """Read one small key (metadata file) from a kvstore; None when absent."""
    if _is_local(kvstore):
        path = Path(kvstore["path"]) / key
        return path.read_bytes() if path.is_file() else None
    import tensorstore as ts

    where = kvstore.get("base_url", kvstore) if isinstance(kvstore, dict) else kvstore
    check_reachable(kvstore, where)
    store = _wait(ts.KvStore.open(kvstore, context=_context()), kvstore, f"opening {where}")
    result = _wait(store.read(key), kvstore, f"reading {where}{key}")
    return bytes(result.value) if result.state == "value" else None


def _detect_driver(url: str, kvstore: dict | str) -> str:
    if _is_local(kvstore) and not Path(kvstore["path"]).exists():
        raise VolumeError(f"volume not found: {url!r} does not exist")
    for driver, marker in _DRIVER_MARKERS:
        try:
            if _read_key(kvstore, marker) is not None:
                return driver
        except VolumeError:
            raise
        except Exception as exc:  # network errors: report them with the URL
            raise VolumeError(f"cannot read {marker!r} of volume {url!r}: {exc}") from exc
    raise VolumeError(
        f"unsupported or missing volume format at {url!r}: no Neuroglancer precomputed 'info', "
        "zarr '.zarray'/'zarr.json' or n5 'attributes.json' found"
    )


def _precomputed_scale_index(kvstore: dict | str, resolution_nm: Sequence[float] | None, url: str) -> int:
    """Index of the precomputed scale with the requested resolution (0 when not asked)."""
    if resolution_nm is None:
        return 0
    raw = _read_key(kvstore, "info")
    if raw is None:
        raise VolumeError(f"precomputed volume {url!r} has no info file")
    scales = json.loads(raw)["scales"]
    wanted = np.asarray(resolution_nm, dtype=float)
    for index, scale in enumerate(scales):
        if np.allclose(scale["resolution"], wanted):
            return index
    available = [scale["resolution"] for scale in scales]
    raise VolumeError(f"volume {url!r} has no scale at {list(wanted)} nm; available: {available}")


@dataclass(frozen=True)
class VolumeInfo:
    """Metadata of an opened volume (all xyz order)."""

    url: str
    driver: str
    dtype: np.dtype
    origin_vox: np.ndarray
    shape: np.ndarray
    voxel_size_nm: np.ndarray

    @property
    def bounds_nm(self) -> np.ndarray:
        """``[[xmin, ymin, zmin], [xmax, ymax, zmax]]`` in nm (max exclusive)."""
        return np.stack([self.origin_vox, self.origin_vox + self.shape]) * self.voxel_size_nm


@dataclass(frozen=True)
class PrecomputedChunkFiles:
    """The chunk files of a local, unsharded precomputed scale: one file per chunk.

    TensorStore's ``storage_statistics`` cannot answer for such volumes (it fails on a
    doubled key path, or reports stored chunks as missing when the path is relative), so
    which chunks exist is read from the file names, the precomputed format's
    ``{key}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}`` (absolute voxels, the upper bounds clipped to
    the volume).

    Attributes
    ----------
    folder : Path
        The scale's folder.
    offset_vox, size_vox, chunk_vox : numpy.ndarray
        int64 ``[3]`` xyz: the scale's ``voxel_offset``, ``size`` and chunk size (voxels).
    """

    folder: Path
    offset_vox: np.ndarray
    size_vox: np.ndarray
    chunk_vox: np.ndarray

    @classmethod
    def of_scale(cls, root: Path, scale: dict) -> PrecomputedChunkFiles | None:
        """For one ``scales`` entry of the info file under ``root``; None when sharded."""
        if scale.get("sharding"):
            return None
        return cls(
            root / scale["key"],
            np.asarray(scale.get("voxel_offset", [0, 0, 0]), dtype=np.int64),
            np.asarray(scale["size"], dtype=np.int64),
            np.asarray(scale["chunk_sizes"][0], dtype=np.int64),
        )

    def any_stored(self, lo_vox: np.ndarray, hi_vox: np.ndarray) -> bool:
        """Whether a chunk file exists for any chunk meeting ``[lo, hi)`` (absolute voxels, within the volume)."""
        first = (np.asarray(lo_vox) - self.offset_vox) // self.chunk_vox
        last = (np.asarray(hi_vox) - 1 - self.offset_vox) // self.chunk_vox
        end = self.offset_vox + self.size_vox
        for index in itertools.product(*(range(a, b + 1) for a, b in zip(first.tolist(), last.tolist()))):
            lo = self.offset_vox + np.asarray(index, dtype=np.int64) * self.chunk_vox
            hi = np.minimum(lo + self.chunk_vox, end)
            name = "_".join(f"{a}-{b}" for a, b in zip(lo.tolist(), hi.tolist()))
            if (self.folder / name).is_file():
                return True
        return False


class Volume:
    """A 3-D image or segmentation opened through TensorStore, indexed ``[x, y, z]``.

    Use :func:`open_volume` to make one.
    """

    def __init__(self, store, info: VolumeInfo, chunk_files: PrecomputedChunkFiles | None = None):
        self._store = store
        self.info = info
        self._chunk_files = chunk_files

    # Convenience accessors; all xyz order.
    url = property(lambda self: self.info.url)
    dtype = property(lambda self: self.info.dtype)
    shape = property(lambda self: tuple(int(v) for v in self.info.shape))
    origin_vox = property(lambda self: self.info.origin_vox)
    voxel_size_nm = property(lambda self: self.info.voxel_size_nm)
    bounds_nm = property(lambda self: self.info.bounds_nm)

    def __repr__(self) -> str:
        return (
            f"Volume({self.url!r}, {self.info.driver}, shape={self.shape}, "
            f"voxel_size_nm={self.voxel_size_nm.tolist()}, dtype={self.dtype})"
        )

    def read(self, lo_vox: Sequence[int] | np.ndarray, hi_vox: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read the box ``[lo, hi)`` (absolute voxels, xyz); zeros outside the volume.

        Returns
        -------
        numpy.ndarray
            Shape ``hi - lo``, indexed ``[x, y, z]``, dtype of the volume.
        """
        lo = np.asarray(lo_vox, dtype=np.int64)
        hi = np.asarray(hi_vox, dtype=np.int64)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(hi < lo):
            raise ValueError(f"bad read box lo={lo.tolist()} hi={hi.tolist()}")
        clip_lo = np.maximum(lo, self.info.origin_vox)
        clip_hi = np.minimum(hi, self.info.origin_vox + self.info.shape)
        if np.all(clip_lo == lo) and np.all(clip_hi == hi):
            return self._read_inside(lo, hi)
        out = np.zeros(tuple(hi - lo), dtype=self.dtype)
        if np.any(clip_hi <= clip_lo):
            return out
        dst = tuple(slice(a, b) for a, b in zip(clip_lo - lo, clip_hi - lo))
        out[dst] = self._read_inside(clip_lo, clip_hi)
        return out

    def _read_inside(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Read a box that lies entirely inside the volume (absolute voxels)."""
        future = self._store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].read()
        return _wait(
            future, self._kvstore, f"reading {self.url} voxels {lo.tolist()}..{hi.tolist()}", self._deadline(lo, hi)
        )

    @property
    def _kvstore(self) -> dict | str:
        # What _wait needs to tell local from remote reads (a chunk read gets a deadline).
        spec = getattr(self, "_kvstore_cache", None)
        if spec is None:
            spec = self._kvstore_cache = kvstore_spec(_split_prefix(self.url)[1])
        return spec

    def _deadline(self, lo: np.ndarray, hi: np.ndarray) -> float:
        # The metadata deadline plus the box's bytes at 1 MB/s, a floor no working link is under.
        size = int(np.prod((hi - lo).astype(object))) * self.dtype.itemsize
        return remote_timeout_s() + size / 1e6

    def in_memory(self) -> Volume:
        """A copy of this volume held in RAM (same metadata), for fast random access in training."""
        return _ArrayVolume(self.read_all(), self.info)

    def read_all(self) -> np.ndarray:
        """The whole volume as one ``[x, y, z]`` array (small volumes only)."""
        return self.read(self.info.origin_vox, self.info.origin_vox + self.info.shape)

    def nm_to_voxel(self, points_nm: np.ndarray) -> np.ndarray:
        """Voxels (int64 ``[..., 3]``) containing the points ``[..., 3]`` given in nm."""
        return np.floor(np.asarray(points_nm, dtype=np.float64) / self.voxel_size_nm).astype(np.int64)

    def contains_voxel(self, voxels: np.ndarray) -> np.ndarray:
        """Boolean ``[...]``: which voxels ``[..., 3]`` lie inside the volume."""
        voxels = np.asarray(voxels)
        lo = self.info.origin_vox
        return np.all((voxels >= lo) & (voxels < lo + self.info.shape), axis=-1)

    @property
    def chunk_shape(self) -> tuple[int, int, int] | None:
        """Shape (xyz voxels) of the storage's read chunks, or None when unknown (in-memory volumes)."""
        try:
            shape = self._store.chunk_layout.read_chunk.shape
        except (AttributeError, ValueError):
            return None
        if shape is None or len(shape) < 3 or any(v is None or v < 1 for v in shape[:3]):
            return None
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def is_stored(self, lo_vox: Sequence[int] | np.ndarray, hi_vox: Sequence[int] | np.ndarray) -> bool | None:
        """Whether any chunk of the box ``[lo, hi)`` (absolute voxels) is stored; None when the driver cannot say.

        A box with nothing stored reads as the fill value (background), so scans skip it.
        """
        lo = np.maximum(np.asarray(lo_vox, dtype=np.int64), self.info.origin_vox)
        hi = np.minimum(np.asarray(hi_vox, dtype=np.int64), self.info.origin_vox + self.info.shape)
        if np.any(hi <= lo):
            return False
        if self._chunk_files is not None:
            return self._chunk_files.any_stored(lo, hi)
        if self._store is None:
            return None
        try:
            region = self._store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            statistics = region.storage_statistics(query_not_stored=True).result()
        except Exception as exc:  # some drivers and versions cannot list chunks
            log.debug("storage statistics unavailable for %s: %s", self.url, exc)
            return None
        return not statistics.not_stored


class _ArrayVolume(Volume):
    """A volume held as a numpy ``[x, y, z]`` array; reads are plain slicing."""

    def __init__(self, array: np.ndarray, info: VolumeInfo):
        super().__init__(None, info)
        self._array = array

    def _read_inside(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        a, b = lo - self.info.origin_vox, hi - self.info.origin_vox
        return self._array[a[0] : b[0], a[1] : b[1], a[2] : b[2]].copy()

    def in_memory(self) -> Volume:
        return self


def open_volume(
    url: str | os.PathLike,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    resolution_nm: Sequence[float] | None = None,
    axes: str | None = None,
) -> Volume:
    """Open an image or segmentation volume by path or URL.

    Parameters
    ----------
    url
        Local path, ``file://``, ``gs://``, ``s3://`` or ``http(s)://`` URL, optionally with a
        ``precomputed://``, ``zarr://``, ``zarr3://`` or ``n5://`` prefix.
    voxel_size_nm
        Voxel size (x, y, z nm) for formats whose metadata lacks units (plain zarr v2);
        when the metadata has units, a different value is an error.
    resolution_nm
        Pick the precomputed scale with this resolution (x, y, z nm); finest when None.
    axes
        Axis order of a stored array without dimension labels (``"xyz"`` or ``"zyx"``,
        optionally with a trailing ``"c"``); labelled arrays are reordered to xyz by label.

    Raises
    ------
    VolumeError
        Missing source, unknown format, unreadable metadata, unknown voxel size, more than
        one channel.
    """
    import tensorstore as ts

    url = os.fspath(url)
    driver, location = _split_prefix(url)
    kvstore = kvstore_spec(location)
    if driver is None:
        driver = _detect_driver(url, kvstore)
    spec: dict = {"driver": driver, "kvstore": kvstore, "open": True}
    chunk_files = None
    if driver == "neuroglancer_precomputed":
        spec["scale_index"] = _precomputed_scale_index(kvstore, resolution_nm, url)
        chunk_files = _local_chunk_files(kvstore, spec["scale_index"])
    check_reachable(kvstore, url)
    try:
        store = _wait(ts.open(spec, read=True, context=_context()), kvstore, f"opening volume {url!r}")
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"cannot open volume {url!r} as {driver}: {exc}") from exc

    store, units = _to_xyz(store, axes, url)
    meta_voxel = _voxel_size_from_units(units)
    if meta_voxel is None:
        if voxel_size_nm is None:
            raise VolumeError(f"voxel size of {url!r} is not in its metadata; pass voxel_size_nm")
        voxel = np.asarray(voxel_size_nm, dtype=np.float64)
    else:
        voxel = meta_voxel
        if voxel_size_nm is not None and not np.allclose(voxel, voxel_size_nm):
            raise VolumeError(
                f"voxel size {list(voxel_size_nm)} nm given for {url!r}, but its metadata says {voxel.tolist()} nm"
            )
    if voxel.shape != (3,) or not np.all(np.isfinite(voxel)) or np.any(voxel <= 0) or np.any(voxel > 1e9):
        # -1, 0 or 1e308 nm would give negative, empty or infinite physical bounds downstream.
        raise VolumeError(f"voxel size of {url!r} must be three positive numbers up to 1e9 nm, got {voxel.tolist()}")
    info = VolumeInfo(
        url=url,
        driver=driver,
        dtype=np.dtype(store.dtype.numpy_dtype),
        origin_vox=np.asarray(store.domain.inclusive_min, dtype=np.int64),
        shape=np.asarray(store.domain.shape, dtype=np.int64),
        voxel_size_nm=voxel,
    )
    log.debug("opened %r", info)
    return Volume(store, info, chunk_files)


def _local_chunk_files(kvstore: dict | str, scale_index: int) -> PrecomputedChunkFiles | None:
    """The chunk files of a local, unsharded precomputed scale (None otherwise or when unreadable)."""
    if not _is_local(kvstore):
        return None
    try:
        root = Path(kvstore["path"])
        scale = json.loads((root / "info").read_bytes())["scales"][scale_index]
        return PrecomputedChunkFiles.of_scale(root, scale)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None  # open_volume reports a broken info file itself


def _to_xyz(store, axes: str | None, url: str):
    """Reorder a TensorStore to x, y, z (dropping a single channel); return it and its units."""
    import tensorstore as ts

    labels = tuple(label.lower() for label in store.domain.labels)
    if {"x", "y", "z"} <= set(labels):
        order = [labels.index(a) for a in "xyz"]
        extra = [i for i in range(store.rank) if i not in order]
    else:
        axes = (axes or ("xyzc" if store.rank == 4 else "xyz")).lower()
        if len(axes) != store.rank or sorted(axes.replace("c", "")) != ["x", "y", "z"]:
            raise VolumeError(f"volume {url!r} has {store.rank} unlabelled dimensions; pass axes= (e.g. 'zyx')")
        order = [axes.index(a) for a in "xyz"]
        extra = [i for i in range(store.rank) if i not in order]
    for dim in extra:
        if store.domain[dim].size != 1:
            raise VolumeError(
                f"volume {url!r} has {store.domain[dim].size} channels; SegScope reads one-channel volumes"
            )
    units = store.dimension_units
    xyz_units = [units[i] for i in order] if units is not None else [None] * 3
    store = store[ts.d[tuple(order + extra)].transpose[:]]
    for _ in extra:
        store = store[..., store.domain[-1].inclusive_min]
    return store, xyz_units


def _voxel_size_from_units(units) -> np.ndarray | None:
    """Voxel size (nm per voxel) from TensorStore units, or None where any axis lacks a length unit."""
    scale_to_nm = {"nm": 1.0, "um": 1e3, "µm": 1e3, "m": 1e9, "mm": 1e6, "pm": 1e-3}
    sizes = []
    for unit in units:
        if unit is None or unit.base_unit not in scale_to_nm:
            return None
        sizes.append(unit.multiplier * scale_to_nm[unit.base_unit])
    return np.asarray(sizes, dtype=np.float64)


def write_volume(
    path: str | os.PathLike,
    array_xyz: np.ndarray,
    voxel_size_nm: Sequence[float] | np.ndarray,
    *,
    segmentation: bool = False,
    chunk_size: Sequence[int] = (64, 64, 64),
    voxel_offset: Sequence[int] = (0, 0, 0),
    extra_info: dict | None = None,
) -> None:
    """Write a 3-D array as a single-scale Neuroglancer precomputed volume.

    Parameters
    ----------
    path
        Local folder to create (must not exist or be empty).
    array_xyz
        ``[x, y, z]`` array; uint8 (image) or an unsigned integer segmentation.
    voxel_size_nm
        Voxel size (x, y, z) in nm.
    segmentation
        Write a segmentation layer (``compressed_segmentation`` encoding, uint32/uint64).
    extra_info
        Extra top-level keys merged into ``info`` (e.g. ``{"skeletons": "skeletons"}``).
    """
    import tensorstore as ts

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"refusing to write volume into non-empty folder {path}")
    array = np.asarray(array_xyz)
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D [x, y, z] array, got shape {array.shape}")
    if segmentation and array.dtype not in (np.uint32, np.uint64):
        raise ValueError(f"segmentation must be uint32 or uint64, got {array.dtype}")
    scale = {
        "size": list(array.shape),
        "resolution": [float(v) for v in voxel_size_nm],
        "voxel_offset": [int(v) for v in voxel_offset],
        "chunk_size": [int(v) for v in chunk_size],
        "encoding": "compressed_segmentation" if segmentation else "raw",
    }
    if segmentation:
        scale["compressed_segmentation_block_size"] = [8, 8, 8]
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": kvstore_spec(str(path)),
        "multiscale_metadata": {
            "type": "segmentation" if segmentation else "image",
            "data_type": array.dtype.name,
            "num_channels": 1,
        },
        "scale_metadata": scale,
        "create": True,
    }
    store = ts.open(spec).result()
    store[..., 0].write(array).result()
    if extra_info:
        info_path = path / "info"
        info = json.loads(info_path.read_text())
        info.update(extra_info)
        tmp = info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, info_path)


# --------------------------------------------------------------------------------------
# Masked cutouts
# --------------------------------------------------------------------------------------


def _check_pair(image: Volume, segmentation: Volume) -> None:
    if not np.allclose(image.voxel_size_nm, segmentation.voxel_size_nm):
        raise VolumeError(
            f"image voxel size {image.voxel_size_nm.tolist()} nm differs from segmentation "
            f"{segmentation.voxel_size_nm.tolist()} nm; open both at the same resolution"
        )
    if image.dtype != np.uint8:
        raise VolumeError(f"image {image.url!r} is {image.dtype}, expected uint8 EM")
    if not np.issubdtype(segmentation.dtype, np.integer):
        raise VolumeError(f"segmentation {segmentation.url!r} is {segmentation.dtype}, expected integer ids")


def cutout_origins(
    volume: Volume,
    centres_nm: np.ndarray,
    size_vox: Sequence[int] | np.ndarray,
    downsample: Sequence[int] | np.ndarray = (1, 1, 1),
) -> np.ndarray:
    """Native-voxel corner ``[N, 3]`` of each centre's cutout box.

    The output voxel ``size // 2`` of a cutout (native block of ``downsample`` voxels)
    contains the centre point. The box spans ``size * downsample`` native voxels.

    Raises
    ------
    ValueError
        When a centre lies outside the volume (its index and position are named).
    """
    centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(centres)):
        raise ValueError("centres contain NaN or infinite coordinates")
    centre_vox = volume.nm_to_voxel(centres)
    inside = volume.contains_voxel(centre_vox)
    if not np.all(inside):
        bad = int(np.flatnonzero(~inside)[0])
        lo, hi = volume.bounds_nm
        raise ValueError(
            f"centre {bad} at {centres[bad].tolist()} nm lies outside the volume "
            f"{volume.url!r} (bounds {lo.tolist()} to {hi.tolist()} nm)"
        )
    size = np.asarray(size_vox, dtype=np.int64)
    factor = np.asarray(downsample, dtype=np.int64)
    return centre_vox - (size // 2) * factor - factor // 2


def _group_boxes(origins: np.ndarray, extent: np.ndarray) -> list[np.ndarray]:
    """Group boxes ``[origin, origin + extent)`` whose union read is no larger than separate reads.

    Greedy in the given order, so the first (nearest) centres stay in the first groups.
    Returns a list of index arrays.
    """
    remaining = list(range(len(origins)))
    box_volume = float(np.prod(extent))
    groups = []
    while remaining:
        first = remaining.pop(0)
        members = [first]
        lo = origins[first].copy()
        hi = lo + extent
        keep = []
        for index in remaining:
            new_lo = np.minimum(lo, origins[index])
            new_hi = np.maximum(hi, origins[index] + extent)
            union = float(np.prod(new_hi - new_lo))
            # Share the read when it costs no more than separate reads would.
            if union <= box_volume * (len(members) + 1) and union <= _MAX_SHARED_READ_VOXELS:
                members.append(index)
                lo, hi = new_lo, new_hi
            else:
                keep.append(index)
        remaining = keep
        groups.append(np.asarray(members))
    return groups


def _block_mean_uint8(block: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Downsample ``[x, y, z]`` uint8 by block means, rounded half up.

    Sums strided views axis by axis in integers: several times faster than a float mean
    over a reshaped view, which matters for training reads.
    """
    if np.all(factor == 1):
        return block
    shape = np.asarray(block.shape) // factor
    n = int(np.prod(factor))
    # uint16 holds sums of up to 257 uint8 values and halves the memory traffic.
    acc_dtype = np.uint16 if n <= 257 else np.uint32
    acc = block[: shape[0] * factor[0], : shape[1] * factor[1], : shape[2] * factor[2]].astype(acc_dtype)
    for axis, f in enumerate(int(v) for v in factor):
        if f > 1:
            lead = (slice(None),) * axis
            acc = sum((acc[(*lead, slice(k, None, f))] for k in range(1, f)), start=acc[(*lead, slice(0, None, f))])
    return ((acc + n // 2) // n).astype(np.uint8)


def cut_em_and_mask(
    image: Volume,
    segmentation: Volume,
    segment_id: int,
    centres_nm: np.ndarray,
    size_vox: Sequence[int] = (129, 129, 129),
    *,
    downsample: Sequence[int] = (1, 1, 1),
    shared_reads: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the unmasked EM and the segment's mask around each centre.

    Training augments the EM before masking (SegCLR's gray jitter), so it needs both
    parts; inference uses :func:`cut_masked`. Parameters as in :func:`cut_masked`.

    Returns
    -------
    em : numpy.ndarray
        uint8 ``[N, x, y, z]`` EM (block-averaged when downsampling), 0 beyond the volume.
    mask : numpy.ndarray
        bool ``[N, x, y, z]``, True where the segmentation (each block's central voxel when
        downsampling) equals ``segment_id``.
    """
    _check_pair(image, segmentation)
    size = np.asarray(size_vox, dtype=np.int64)
    factor = np.asarray(downsample, dtype=np.int64)
    if size.shape != (3,) or np.any(size < 1) or factor.shape != (3,) or np.any(factor < 1):
        raise ValueError(f"bad cutout size {size_vox} or downsample factor {downsample}")
    segment_id = int(segment_id)
    if segment_id < 0 or segment_id >= 2**64:
        raise ValueError(f"segment id {segment_id} is not a uint64")
    origins = cutout_origins(segmentation, centres_nm, size, factor)
    extent = size * factor
    em_out = np.zeros((len(origins), *size), dtype=np.uint8)
    mask_out = np.zeros((len(origins), *size), dtype=bool)
    seg_value = np.asarray(segment_id).astype(segmentation.dtype)
    if shared_reads:
        groups = _group_boxes(origins, extent)
    else:
        groups = [np.array([i]) for i in range(len(origins))]
    centre_pick = tuple(slice(f // 2, None, f) for f in factor)
    for members in groups:
        lo = origins[members].min(axis=0)
        hi = origins[members].max(axis=0) + extent
        em_block = image.read(lo, hi)
        mask_block = segmentation.read(lo, hi) == seg_value
        for index in members:
            box = tuple(slice(o, o + e) for o, e in zip(origins[index] - lo, extent))
            em_out[index] = _block_mean_uint8(em_block[box], factor)
            mask_out[index] = mask_block[box][centre_pick]
    return em_out, mask_out


def cut_masked(
    image: Volume,
    segmentation: Volume,
    segment_id: int,
    centres_nm: np.ndarray,
    size_vox: Sequence[int] = (129, 129, 129),
    *,
    downsample: Sequence[int] = (1, 1, 1),
    shared_reads: bool = True,
    require_segment: bool = True,
) -> np.ndarray:
    """Cut SegCLR inputs: masked EM around each centre.

    Parameters
    ----------
    image, segmentation
        Volumes at the same voxel size; the image uint8.
    segment_id
        The segment to keep; every other voxel is 0.
    centres_nm
        ``[N, 3]`` centres (x, y, z nm), each inside the volume.
    size_vox
        Output cutout size ``(x, y, z)`` in output voxels; the centre is at ``size // 2``.
    downsample
        Integer factor per axis from native to output voxels: EM is block-averaged, the
        segmentation takes each block's central voxel, then the mask is applied.
    shared_reads
        Read one union block for nearby centres instead of one block per centre.
    require_segment
        Raise :class:`SegmentNotFoundError` when a cutout holds no voxel of the segment.

    Returns
    -------
    numpy.ndarray
        uint8 ``[N, x, y, z]``: ``where(seg == segment_id, em, 0)``, zero beyond the volume.
    """
    em, mask = cut_em_and_mask(
        image, segmentation, segment_id, centres_nm, size_vox, downsample=downsample, shared_reads=shared_reads
    )
    if require_segment:
        empty = ~mask.reshape(len(mask), -1).any(axis=1)
        if np.any(empty):
            index = int(np.flatnonzero(empty)[0])
            centre = np.asarray(centres_nm, dtype=float).reshape(-1, 3)[index]
            raise SegmentNotFoundError(
                f"segment {int(segment_id)} has no voxels in {segmentation.url!r} within the "
                f"{tuple(int(v) for v in size_vox)} cutout centred at {centre.tolist()} nm"
            )
    em *= mask
    return em


def iter_cutout_batches(
    image: Volume,
    segmentation: Volume,
    segment_id: int,
    centres_nm: np.ndarray,
    batch_size: int,
    size_vox: Sequence[int] = (129, 129, 129),
    *,
    downsample: Sequence[int] = (1, 1, 1),
    shared_reads: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices [b], cutouts uint8 [b, x, y, z])`` in the order of ``centres_nm``.

    Centres are validated up front, so a bad centre fails before any batch is produced.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    centres = np.asarray(centres_nm, dtype=np.float64).reshape(-1, 3)
    cutout_origins(segmentation, centres, size_vox, downsample)
    for start in range(0, len(centres), batch_size):
        indices = np.arange(start, min(start + batch_size, len(centres)))
        yield (
            indices,
            cut_masked(
                image,
                segmentation,
                segment_id,
                centres[indices],
                size_vox,
                downsample=downsample,
                shared_reads=shared_reads,
            ),
        )
