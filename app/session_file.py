"""Session files: save and restore a SegScope session, autosave it, recover it after a crash.

Qt-free: the main window builds a :class:`SessionDocument` from the session state and hands
it here with the session's :class:`segscope.app.state.SegmentRecord` objects; nothing in this module
touches a widget.

A saved session is two files side by side:

``<stem>.segscope.json``
    A :class:`SessionDocument`: data sources, model, classifiers, selections, labels and plot
    settings. Small, human-readable, versioned (``format``/``version``), validated on load.
``<stem>.records.npz``
    The sidecar: every analysed segment's record (centres, embeddings, predictions), in one
    NumPy ``.npz`` archive (stored, not deflated: see ``_write_npz``) read without pickle. It is what lets a restored
    session redraw its plot points and export without recomputing embeddings.

Both are written atomically (build aside, rename into place), the sidecar first, so a reader
never sees a half-written file nor a JSON whose sidecar is missing.

Sidecar layout (every key is a plain array; ``R`` records)
----------------------------------------------------------
``format``, ``version``
    ``"segscope-records"``, 1.
``session_saved_at``
    (only in sidecars written by :func:`save_session`) the JSON's ``saved_at``, to notice a
    JSON and a sidecar from different saves.
``segment_id``
    uint64 ``[R]``.
``<field>__shape``, ``<field>__data``
    For each array field of :class:`~segscope.app.state.SegmentRecord` (``click_nm``, ``node_ids``,
    ``positions_nm``, ``ground_truth``, ``embeddings``, ``embedded``, ``predicted``,
    ``predicted_probability``, ``predicted_uncertainty``): int64 ``[R, ndim]`` shapes (a row
    of -1 where the field is None) and the records' arrays flattened and concatenated in
    record order, in the field's documented dtype. Records may differ in ``N`` and in ``D``
    (a session can switch encoders).
``skeleton_node_count``, ``embedding_source``, ``prediction_note``
    int64 / fixed-width unicode ``[R]``.
``<field>`` and ``<field>__present``
    For the optional scalars (``cell_type``, ``cell_type_probability``, ``ood_score``,
    ``ood_flagged``, ``ood_threshold``): the value (a filler where absent) and whether it is
    there, so None survives the round trip.
``cell_type_probabilities``
    unicode ``[R]``, each a JSON object (``"null"`` for None).

Autosave and crash recovery
---------------------------
:class:`AutosaveManager` keeps ``running-<pid>.json`` markers and ``autosave-<pid>.*`` files
in ``user_cache_dir()/"sessions"``. A clean exit removes both; an autosave whose process died
(or whose marker vanished) is offered by :meth:`AutosaveManager.recoverable` at the next
launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import socket
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis.export.atomic import atomic_file
from segscope.analysis.paths import user_cache_dir
from segscope.app.state import SegmentRecord

log = logging.getLogger(__name__)

#: ``format`` and ``version`` of the session JSON this module writes and reads.
SESSION_FORMAT = "segscope-session"
SESSION_VERSION = 1
#: ``format`` and ``version`` stored inside the records sidecar.
RECORDS_FORMAT = "segscope-records"
RECORDS_VERSION = 1
#: File name endings of the two files of a saved session.
JSON_SUFFIX = ".segscope.json"
RECORDS_SUFFIX = ".records.npz"

#: Array fields of SegmentRecord in the sidecar: dtype and number of dimensions.
_ARRAY_FIELDS: dict[str, tuple[type, int]] = {
    "click_nm": (np.float64, 1),
    "node_ids": (np.int64, 1),
    "positions_nm": (np.float64, 2),
    "ground_truth": (np.uint8, 1),
    "embeddings": (np.float32, 2),
    "embedded": (np.bool_, 1),
    "predicted": (np.uint8, 1),
    "predicted_probability": (np.float32, 1),
    "predicted_uncertainty": (np.float32, 1),
}
#: Scalar fields of SegmentRecord that may be None: the Python type of their value.
_OPTIONAL_SCALARS: dict[str, type] = {
    "cell_type": str,
    "cell_type_probability": float,
    "ood_score": float,
    "ood_flagged": bool,
    "ood_threshold": float,
}
#: Every SegmentRecord field the sidecar stores (tests check this covers the dataclass).
RECORD_FIELDS: tuple[str, ...] = (
    "segment_id",
    *_ARRAY_FIELDS,
    "skeleton_node_count",
    "embedding_source",
    "prediction_note",
    *_OPTIONAL_SCALARS,
    "cell_type_probabilities",
)

_DOCUMENT_KEYS = (
    "format",
    "version",
    "saved_at",
    "dataset",
    "precomputed",
    "model_path",
    "classifiers_folder",
    "current_segment",
    "selected_segments",
    "selected_nodes",
    "labels",
    "plot",
    "records_file",
)
_COORDINATES = ("nm", "voxels")


class SessionFileError(ValueError):
    """A session file (JSON or records sidecar) that cannot be read as one.

    Attributes
    ----------
    source : str
        The file (or ``"session document"`` for a document built in code).
    field : str or None
        The offending field or sidecar key, when one is to blame.
    problem : str
        What is wrong with it.
    """

    def __init__(self, source: str | os.PathLike, field: str | None, problem: str):
        self.source = os.fspath(source)
        self.field = field
        self.problem = problem
        where = self.source if field is None else f"{self.source}: field {field!r}"
        super().__init__(f"{where}: {problem}")


def _utc_now() -> str:
    # Microseconds so that two saves within one second still get distinct stamps (the
    # sidecar's copy of the stamp is how a JSON/sidecar mismatch is noticed).
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _location(value: Any, source: str, name: str, *, optional: bool = False) -> str | None:
    """A URL as given (anything with ``://``), a local path made absolute."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise SessionFileError(
            source, name, f"expected a non-empty path or URL string{' or null' if optional else ''}, got {value!r}"
        )
    if "://" in value:
        return value
    # Relative paths would mean something else once the app runs from another folder.
    return os.path.abspath(os.path.expanduser(value))


def _string(value: Any, source: str, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise SessionFileError(source, name, f"expected a string{' or null' if optional else ''}, got {value!r}")
    return value


def _segment_id(value: Any, source: str, name: str) -> int:
    if not _is_int(value) or not 0 < int(value) < 2**64:
        raise SessionFileError(source, name, f"expected a nonzero uint64 segment id, got {value!r}")
    return int(value)


def _sequence(value: Any, source: str, name: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise SessionFileError(source, name, f"expected a list, got {type(value).__name__}")
    return list(value)


def _json_safe(value: Any, source: str, name: str) -> Any:
    """Return ``value`` as plain JSON data (tuples become lists, NumPy scalars Python ones)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if _is_int(value):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise SessionFileError(source, name, f"holds {value}, which JSON cannot store")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, source, f"{name}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SessionFileError(source, name, f"has key {key!r}; JSON object keys must be strings")
            out[key] = _json_safe(item, source, f"{name}.{key}")
        return out
    raise SessionFileError(source, name, f"holds a {type(value).__name__} ({value!r}), which is not JSON data")


def _mapping(value: Any, source: str, name: str) -> dict:
    if isinstance(value, DatasetRef | PrecomputedRef):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise SessionFileError(source, name, f"expected an object, got {type(value).__name__}")
    return dict(value)


def _exact_keys(value: dict, keys: tuple[str, ...], optional: tuple[str, ...], source: str, name: str) -> None:
    for key in keys:
        if key not in value and key not in optional:
            raise SessionFileError(source, f"{name}.{key}" if name else key, "missing")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise SessionFileError(
            source,
            f"{name}.{unknown[0]}" if name else unknown[0],
            f"unexpected field (this SegScope reads {SESSION_FORMAT} version {SESSION_VERSION})",
        )


@dataclass(frozen=True)
class DatasetRef:
    """The data sources of a session, as :meth:`segscope.app.controller.DataSource.open` takes them.

    URLs are kept as given; local paths are stored absolute.

    Attributes
    ----------
    name : str
    image_url, segmentation_url : str
    skeletons_url : str or None
    """

    name: str
    image_url: str
    segmentation_url: str
    skeletons_url: str | None = None

    def __post_init__(self) -> None:
        checked = _dataset_fields(dataclasses.asdict(self), "session document", "dataset")
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_summary(cls, summary: Any) -> DatasetRef:
        """Build from anything with ``name``, ``image_url``, ``segmentation_url`` and ``skeletons_url`` attributes.

        Such as :class:`segscope.app.state.DatasetSummary`.
        """
        return cls(
            name=summary.name,
            image_url=summary.image_url,
            segmentation_url=summary.segmentation_url,
            skeletons_url=summary.skeletons_url,
        )


@dataclass(frozen=True)
class PrecomputedRef:
    """A SegCLR CSV ZIP embedding store, as :class:`segscope.app.controller.PrecomputedEmbeddings` takes it.

    Attributes
    ----------
    location : str
        Folder (stored absolute) or URL of the store.
    coordinates : str
        ``"nm"`` or ``"voxels"``.
    num_shards, bytewidth : int
        The store's shard function.
    """

    location: str
    coordinates: str = "nm"
    num_shards: int = 10_000
    bytewidth: int = 64

    def __post_init__(self) -> None:
        checked = _precomputed_fields(dataclasses.asdict(self), "session document", "precomputed")
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_embeddings(cls, embeddings: Any) -> PrecomputedRef:
        """Build from an open :class:`segscope.app.controller.PrecomputedEmbeddings`."""
        store = embeddings.store
        return cls(
            location=os.fspath(embeddings.location),
            coordinates=store.coordinates,
            num_shards=store.num_shards,
            bytewidth=store.bytewidth,
        )


def _dataset_fields(value: Any, source: str, name: str) -> dict:
    value = _mapping(value, source, name)
    _exact_keys(value, ("name", "image_url", "segmentation_url", "skeletons_url"), (), source, name)
    return {
        "name": _string(value["name"], source, f"{name}.name"),
        "image_url": _location(value["image_url"], source, f"{name}.image_url"),
        "segmentation_url": _location(value["segmentation_url"], source, f"{name}.segmentation_url"),
        "skeletons_url": _location(value["skeletons_url"], source, f"{name}.skeletons_url", optional=True),
    }


def _precomputed_fields(value: Any, source: str, name: str) -> dict:
    value = _mapping(value, source, name)
    _exact_keys(value, ("location", "coordinates", "num_shards", "bytewidth"), (), source, name)
    if value["coordinates"] not in _COORDINATES:
        raise SessionFileError(
            source, f"{name}.coordinates", f"expected one of {_COORDINATES}, got {value['coordinates']!r}"
        )
    for key in ("num_shards", "bytewidth"):
        if not _is_int(value[key]) or int(value[key]) <= 0:
            raise SessionFileError(source, f"{name}.{key}", f"expected a positive integer, got {value[key]!r}")
    return {
        "location": _location(value["location"], source, f"{name}.location"),
        "coordinates": value["coordinates"],
        "num_shards": int(value["num_shards"]),
        "bytewidth": int(value["bytewidth"]),
    }


def _document_fields(value: Mapping, source: str) -> dict:
    """Validate every field of a session document; return them as plain JSON data."""
    value = dict(value)
    _exact_keys(value, _DOCUMENT_KEYS, (), source, "")
    if value["format"] != SESSION_FORMAT:
        raise SessionFileError(
            source, "format", f"expected {SESSION_FORMAT!r}, got {value['format']!r}: not a SegScope session file"
        )
    version = value["version"]
    if not _is_int(version):
        raise SessionFileError(source, "version", f"expected an integer, got {version!r}")
    if version != SESSION_VERSION:
        hint = "written by a newer SegScope; " if version > SESSION_VERSION else ""
        raise SessionFileError(
            source,
            "version",
            f"{hint}version {version} is not supported (this SegScope reads version {SESSION_VERSION})",
        )
    saved_at = _string(value["saved_at"], source, "saved_at")
    try:
        stamp = datetime.datetime.fromisoformat(saved_at or "")  # none or bad: no stamp
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise SessionFileError(source, "saved_at", f"expected an ISO 8601 time with a UTC offset, got {saved_at!r}")

    current = value["current_segment"]
    selected_nodes = []
    for i, pair in enumerate(_sequence(value["selected_nodes"], source, "selected_nodes")):
        where = f"selected_nodes[{i}]"
        pair = _sequence(pair, source, where)
        if len(pair) != 2:
            raise SessionFileError(source, where, f"expected [segment_id, node_id], got {pair!r}")
        node = pair[1]
        if not _is_int(node) or not 0 <= int(node) < 2**63:
            raise SessionFileError(source, where, f"expected a non-negative int64 node id, got {node!r}")
        selected_nodes.append([_segment_id(pair[0], source, where), int(node)])
    labels = _json_safe(value["labels"], source, "labels")
    plot = _json_safe(value["plot"], source, "plot")
    for name, data in (("labels", labels), ("plot", plot)):
        if not isinstance(data, dict):
            raise SessionFileError(source, name, f"expected an object, got {type(data).__name__}")
    records_file = _string(value["records_file"], source, "records_file", optional=True)
    if records_file is not None and (
        not records_file or records_file in (".", "..") or "/" in records_file or "\\" in records_file
    ):
        # A bare name beside the JSON: a session file must not point reads elsewhere.
        raise SessionFileError(
            source, "records_file", f"expected a file name beside the session file, got {records_file!r}"
        )
    return {
        "format": SESSION_FORMAT,
        "version": SESSION_VERSION,
        "saved_at": saved_at,
        "dataset": _dataset_fields(value["dataset"], source, "dataset"),
        "precomputed": (
            None if value["precomputed"] is None else _precomputed_fields(value["precomputed"], source, "precomputed")
        ),
        "model_path": _location(value["model_path"], source, "model_path", optional=True),
        "classifiers_folder": _location(value["classifiers_folder"], source, "classifiers_folder", optional=True),
        "current_segment": None if current is None else _segment_id(current, source, "current_segment"),
        "selected_segments": [
            _segment_id(s, source, f"selected_segments[{i}]")
            for i, s in enumerate(_sequence(value["selected_segments"], source, "selected_segments"))
        ],
        "selected_nodes": selected_nodes,
        "labels": labels,
        "plot": plot,
        "records_file": records_file,
    }


@dataclass(kw_only=True)
class SessionDocument:
    """What a session file holds, apart from the per-segment records (JSON-safe).

    Construction validates and normalises every field (local paths become absolute, tuples
    lists), raising :class:`SessionFileError` naming the field; :meth:`to_json` validates
    again, so fields changed after construction are checked too.

    Attributes
    ----------
    format : str
        Always ``"segscope-session"``.
    version : int
        Always 1.
    saved_at : str
        ISO 8601 UTC time of the save (set by :func:`save_session`).
    dataset : DatasetRef
    precomputed : PrecomputedRef or None
        The precomputed embedding store in use, if any.
    model_path : str or None
        Encoder weights file.
    classifiers_folder : str or None
    current_segment : int or None
        The selected segment (what the 3-D view and panels show).
    selected_segments : list of int
        Segments selected in the plot or the 3-D view.
    selected_nodes : list of [int, int]
        ``[segment_id, node_id]`` of the selected plot points.
    labels : dict
        :meth:`segscope.app.labels.LabelStore.to_dict` output, stored as is.
    plot : dict
        Plot settings (``colour_mode``, ``tool``, ``hidden_segments``, ``view_range``
        ``[[x0, x1], [y0, y1]]`` in plot units, or None); any JSON data.
    records_file : str or None
        File name of the records sidecar beside the JSON (set by :func:`save_session`).
    """

    format: str = SESSION_FORMAT
    version: int = SESSION_VERSION
    saved_at: str = field(default_factory=_utc_now)
    dataset: DatasetRef
    precomputed: PrecomputedRef | None = None
    model_path: str | None = None
    classifiers_folder: str | None = None
    current_segment: int | None = None
    selected_segments: list[int] = field(default_factory=list)
    selected_nodes: list[list[int]] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    plot: dict = field(default_factory=dict)
    records_file: str | None = None

    def __post_init__(self) -> None:
        self._apply(_document_fields(self._raw(), "session document"))

    def _raw(self) -> dict:
        return {key: getattr(self, key) for key in _DOCUMENT_KEYS}

    def _apply(self, checked: dict) -> None:
        for key, value in checked.items():
            if key == "dataset":
                value = DatasetRef(**value)
            elif key == "precomputed" and value is not None:
                value = PrecomputedRef(**value)
            setattr(self, key, value)

    def to_dict(self) -> dict:
        """The document as plain JSON data (validated)."""
        return _document_fields(self._raw(), "session document")

    def to_json(self) -> str:
        """The document as indented JSON text ending in a newline.

        Raises
        ------
        SessionFileError
            For a field changed since construction to something invalid.
        """
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike = "session document") -> SessionDocument:
        """Validate parsed JSON data; errors name ``source`` and the bad field."""
        source = os.fspath(source)
        if not isinstance(data, Mapping):
            raise SessionFileError(source, None, f"expected a JSON object, got {type(data).__name__}")
        checked = _document_fields(data, source)
        checked["dataset"] = DatasetRef(**checked["dataset"])
        if checked["precomputed"] is not None:
            checked["precomputed"] = PrecomputedRef(**checked["precomputed"])
        return cls(**checked)

    @classmethod
    def from_json(cls, text: str | bytes, source: str | os.PathLike = "<string>") -> SessionDocument:
        """Parse and validate session JSON.

        Raises
        ------
        SessionFileError
            Not JSON, not a SegScope session, an unsupported version, a missing or unexpected
            field, or a field of the wrong type; the message names ``source`` and the field.
        """
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise SessionFileError(source, None, f"not valid JSON ({exc})") from exc
        except RecursionError:
            raise SessionFileError(source, None, "JSON nested too deeply to read") from None
        return cls.from_dict(data, source)


# -- records sidecar -------------------------------------------------------------------


def _str_array(values: list[Any], name: str) -> np.ndarray:
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"record field {name} must be a string, got {value!r}")
    return np.array(values, dtype=np.str_) if values else np.zeros(0, dtype="<U1")


def _cast(value: Any, dtype: type, ndim: int, segment_id: int, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"segment {segment_id}: {name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.dtype == dtype:
        return array
    cast: np.ndarray = array.astype(dtype)
    # Refuse silent changes (float64 -> float32 rounding, 300 -> uint8): the promise is an
    # exact round trip, and the state keeps these dtypes anyway.
    if not np.array_equal(cast, array, equal_nan=array.dtype.kind in "fc" and cast.dtype.kind in "fc"):
        raise ValueError(
            f"segment {segment_id}: {name} has dtype {array.dtype} with values that "
            f"{np.dtype(dtype).name} cannot hold exactly"
        )
    return cast


def _records_arrays(records: list[SegmentRecord]) -> dict[str, np.ndarray]:
    """The sidecar's arrays for ``records`` (layout in the module docstring)."""
    n = len(records)
    out: dict[str, np.ndarray] = {
        "format": np.array(RECORDS_FORMAT),
        "version": np.array(RECORDS_VERSION, dtype=np.int64),
        "segment_id": np.array([_segment_id(r.segment_id, "records", "segment_id") for r in records], dtype=np.uint64),
    }
    for name, (dtype, ndim) in _ARRAY_FIELDS.items():
        shapes = np.full((n, ndim), -1, dtype=np.int64)
        parts = []
        for i, record in enumerate(records):
            value = getattr(record, name)
            if value is None:
                continue
            array = _cast(value, dtype, ndim, record.segment_id, name)
            shapes[i] = array.shape
            parts.append(array.ravel())
        out[f"{name}__shape"] = shapes
        out[f"{name}__data"] = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    out["skeleton_node_count"] = np.array([int(r.skeleton_node_count) for r in records], dtype=np.int64)
    out["embedding_source"] = _str_array([r.embedding_source for r in records], "embedding_source")
    out["prediction_note"] = _str_array([r.prediction_note for r in records], "prediction_note")
    for name, kind in _OPTIONAL_SCALARS.items():
        values = [getattr(r, name) for r in records]
        out[f"{name}__present"] = np.array([v is not None for v in values], dtype=bool)
        if kind is str:
            out[name] = _str_array(["" if v is None else v for v in values], name)
        elif kind is bool:
            out[name] = np.array([bool(v) for v in values], dtype=bool)
        else:
            out[name] = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    out["cell_type_probabilities"] = _str_array(
        [
            json.dumps(
                None
                if r.cell_type_probabilities is None
                else {str(k): float(v) for k, v in r.cell_type_probabilities.items()}
            )
            for r in records
        ],
        "cell_type_probabilities",
    )
    return out


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Stored, not deflated (np.savez, not savez_compressed): embeddings are float32 noise to
    # zlib, so deflating 100k nodes x 64 D took 2.2-2.6 s for a 7 % smaller file, against
    # 0.08 s stored; an autosave must not freeze the window. Zip CRCs still catch corruption.
    # A file object, not a name: np.savez would append ".npz" to atomic_file's temporary.
    with open(path, "wb") as file:  # atomic_file fsyncs it before the rename
        np.savez(file, allow_pickle=False, **arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # An open file, not a name: np.load(path) leaves the file open when the zip is bad.
        with open(path, "rb") as file:
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
                raise SessionFileError(path, None, "not a records archive (.npz)")
            with archive:
                # Read every member now: NpzFile is lazy, and a truncated member must fail here.
                return {key: archive[key] for key in archive.files}
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"records file {path} does not exist") from exc
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, SessionFileError):
            raise
        if "Object arrays cannot be loaded" in str(exc):
            raise SessionFileError(path, None, "holds pickled Python objects, which SegScope never loads") from exc
        if "allow_pickle" in str(exc):  # numpy's wording for any file that is not .npy/.npz
            raise SessionFileError(path, None, "not a records archive (.npz)") from exc
        raise SessionFileError(path, None, f"corrupt or truncated records file ({type(exc).__name__}: {exc})") from exc
    except MemoryError:
        raise SessionFileError(path, None, "declares arrays too large to hold in memory") from None


def _records_from_arrays(arrays: dict[str, np.ndarray], source: Path) -> list[SegmentRecord]:
    def get(key: str) -> np.ndarray:
        if key not in arrays:
            raise SessionFileError(source, key, "missing from the records file")
        return arrays[key]

    if get("format").shape != () or str(get("format")) != RECORDS_FORMAT:
        raise SessionFileError(source, "format", f"expected {RECORDS_FORMAT!r}: not a SegScope records file")
    version = get("version")
    if version.shape != () or int(version) != RECORDS_VERSION:
        raise SessionFileError(
            source,
            "version",
            f"records version {version} is not supported (this SegScope reads version {RECORDS_VERSION})",
        )
    segment_ids = get("segment_id")
    n = len(segment_ids)

    def per_record(key: str, kind: str) -> np.ndarray:
        value = get(key)
        if value.ndim != 1 or len(value) != n or value.dtype.kind != kind:
            raise SessionFileError(
                source, key, f"expected {n} values of kind {kind!r}, got {value.dtype} {value.shape}"
            )
        return value

    kwargs: list[dict[str, Any]] = [{"segment_id": int(s)} for s in per_record("segment_id", "u")]
    for name, (dtype, ndim) in _ARRAY_FIELDS.items():
        shapes, data = get(f"{name}__shape"), get(f"{name}__data")
        if shapes.shape != (n, ndim) or shapes.dtype.kind != "i":
            raise SessionFileError(
                source, f"{name}__shape", f"expected int [{n}, {ndim}], got {shapes.dtype} {shapes.shape}"
            )
        if data.dtype != dtype or data.ndim != 1:
            raise SessionFileError(
                source, f"{name}__data", f"expected 1-D {np.dtype(dtype).name}, got {data.dtype} {data.shape}"
            )
        absent = (shapes == -1).all(axis=1)
        if (shapes[~absent] < 0).any():
            raise SessionFileError(source, f"{name}__shape", "holds negative sizes")
        sizes = np.where(absent, 0, np.prod(shapes, axis=1))
        if int(sizes.sum()) != len(data):
            raise SessionFileError(
                source, f"{name}__data", f"holds {len(data)} values, the shapes need {int(sizes.sum())}"
            )
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for i in range(n):
            kwargs[i][name] = None if absent[i] else data[offsets[i] : offsets[i + 1]].reshape(shapes[i]).copy()
    counts = per_record("skeleton_node_count", "i")
    sources = per_record("embedding_source", "U")
    notes = per_record("prediction_note", "U")
    for i in range(n):
        kwargs[i].update(
            skeleton_node_count=int(counts[i]), embedding_source=str(sources[i]), prediction_note=str(notes[i])
        )
    for name, kind in _OPTIONAL_SCALARS.items():
        present = per_record(f"{name}__present", "b")
        values = per_record(name, {str: "U", bool: "b", float: "f"}[kind])
        for i in range(n):
            kwargs[i][name] = kind(values[i]) if present[i] else None
    for i, text in enumerate(per_record("cell_type_probabilities", "U")):
        try:
            probabilities = json.loads(str(text))
        except ValueError as exc:
            raise SessionFileError(source, "cell_type_probabilities", f"record {i}: not JSON ({exc})") from exc
        except RecursionError:
            raise SessionFileError(source, "cell_type_probabilities", f"record {i}: nested too deeply") from None
        if probabilities is not None and not isinstance(probabilities, dict):
            raise SessionFileError(source, "cell_type_probabilities", f"record {i}: expected an object or null")
        kwargs[i]["cell_type_probabilities"] = probabilities
    return [SegmentRecord(**k) for k in kwargs]


def save_records(path: str | os.PathLike, records: Iterable[SegmentRecord]) -> Path:
    """Write ``records`` to one ``.npz`` file, atomically (replacing ``path``).

    Every field of :class:`~segscope.app.state.SegmentRecord` is stored (layout in the module
    docstring); :func:`load_records` reads them back exactly, None included.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        For a record whose arrays have the wrong number of dimensions or values their
        documented dtype cannot hold exactly, or a non-string text field.
    FileNotFoundError
        When the parent folder does not exist.
    """
    path = Path(path)
    arrays = _records_arrays(list(records))
    with atomic_file(path, force=True) as temporary:
        _write_npz(temporary, arrays)
    return path


def load_records(path: str | os.PathLike) -> list[SegmentRecord]:
    """Read the records :func:`save_records` wrote, in order (no pickle is ever loaded).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist (the message names it).
    SessionFileError
        For a corrupt or truncated file, or one that is not a SegScope records file.
    """
    path = Path(path)
    return _records_from_arrays(_read_npz(path), path)


# -- whole sessions ----------------------------------------------------------------------


def session_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The ``(<stem>.segscope.json, <stem>.records.npz)`` pair for a session path.

    ``path`` may end in ``.segscope.json``, ``.json`` or nothing: ``a/b``, ``a/b.json`` and
    ``a/b.segscope.json`` all give ``a/b.segscope.json`` and ``a/b.records.npz``.
    """
    path = Path(path)
    name = path.name
    for suffix in (JSON_SUFFIX, ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name:
        raise ValueError(f"session path {path} has no name before its suffix")
    return path.with_name(name + JSON_SUFFIX), path.with_name(name + RECORDS_SUFFIX)


def save_session(path: str | os.PathLike, document: SessionDocument, records: Iterable[SegmentRecord] = ()) -> Path:
    """Save a session: ``<stem>.segscope.json`` plus, with records, ``<stem>.records.npz``.

    The document is written with ``saved_at`` set to now and ``records_file`` naming the
    sidecar (None without records; a sidecar left by an earlier save is then removed).
    Existing files are replaced. Both files are built aside and renamed into place, the
    sidecar first: a failure while writing leaves the previous session untouched, and a
    reader never sees a JSON whose sidecar is missing.

    Returns
    -------
    Path
        The JSON file.

    Raises
    ------
    SessionFileError
        For an invalid document (nothing is written).
    ValueError
        For a record that cannot be stored exactly (nothing is written).
    FileNotFoundError
        When the folder does not exist.
    """
    json_path, records_path = session_paths(path)
    records = list(records)
    stamped = dataclasses.replace(document, saved_at=_utc_now(), records_file=records_path.name if records else None)
    # Serialise everything before touching the disk: invalid input writes nothing.
    text = stamped.to_json()
    arrays = None
    if records:
        arrays = _records_arrays(records)
        arrays["session_saved_at"] = np.array(stamped.saved_at)
    with atomic_file(json_path, force=True) as json_temporary:
        json_temporary.write_text(text, encoding="utf-8")
        if arrays is not None:
            with atomic_file(records_path, force=True) as records_temporary:
                _write_npz(records_temporary, arrays)
    if arrays is None:
        with contextlib.suppress(FileNotFoundError):
            records_path.unlink()
    log.info("saved session %s (%d records)", json_path, len(records))
    return json_path


def load_session(path: str | os.PathLike) -> tuple[SessionDocument, list[SegmentRecord]]:
    """Load a session :func:`save_session` wrote: its document and its records.

    ``path`` is the ``.segscope.json`` file (or its stem).

    Raises
    ------
    FileNotFoundError
        When the JSON, or the sidecar it names, does not exist (the message names it).
    SessionFileError
        For an invalid JSON document or a corrupt sidecar (the message names the file).
    """
    json_path = Path(path)
    if not json_path.exists() and not json_path.name.endswith(".json"):
        json_path = session_paths(json_path)[0]
    try:
        raw = json_path.read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"session file {json_path} does not exist") from exc
    document = SessionDocument.from_json(raw, json_path)
    records: list[SegmentRecord] = []
    if document.records_file is not None:
        records_path = json_path.with_name(document.records_file)
        arrays = _read_npz_for_session(records_path, json_path)
        stamp = arrays.pop("session_saved_at", None)
        if stamp is not None and str(stamp) != document.saved_at:
            # Only a crash between the two renames of save_session gets here: the records
            # are newer than the document. Load both rather than lose either.
            log.warning(
                "records file %s was saved at %s, session file %s at %s",
                records_path,
                stamp,
                json_path,
                document.saved_at,
            )
        records = _records_from_arrays(arrays, records_path)
    return document, records


def _read_npz_for_session(records_path: Path, json_path: Path) -> dict[str, np.ndarray]:
    try:
        return _read_npz(records_path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"records file {records_path} named by session file {json_path} does not exist"
        ) from exc


# -- autosave and crash recovery -------------------------------------------------------


@dataclass(frozen=True)
class RecoveryCandidate:
    """An autosave left by a SegScope that did not exit cleanly.

    Attributes
    ----------
    path : Path
        The autosave's ``.segscope.json``.
    saved_at : str
        ISO 8601 UTC time of the autosave (the file's modification time when the JSON
        cannot be read; :meth:`AutosaveManager.adopt` then reports why).
    pid : int
        Process id of the SegScope that wrote it.
    """

    path: Path
    saved_at: str
    pid: int


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unsure: never offer a live session's autosave
    return True


def _process_identity(pid: int) -> str | None:
    """``"<boot id>:<start time>"`` of a live process (Linux), None where unknown.

    A pid alone is not an identity: after a crash the pid may be reused, and after a reboot
    (a power cut) low pids certainly are. The kernel's boot id and the process's start time
    (clock ticks since boot, field 22 of ``/proc/<pid>/stat``) tell the two apart.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and ')'
    if len(fields) < 20:
        return None
    return f"{boot_id}:{fields[19]}"


def _content_hash(document: SessionDocument, records: list[SegmentRecord]) -> str:
    """A digest of what an autosave would hold, ignoring its time stamp."""
    digest = hashlib.blake2b(digest_size=20)
    data = document.to_dict()
    data.pop("saved_at")
    data.pop("records_file")
    digest.update(json.dumps(data, sort_keys=True).encode())
    for record in records:
        digest.update(b"\x00record")
        for name in RECORD_FIELDS:
            value = getattr(record, name)
            digest.update(name.encode())
            if isinstance(value, np.ndarray):
                digest.update(f"{value.dtype.str}{value.shape}".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


class AutosaveManager:
    """Autosave this process's session and offer the autosaves of crashed ones.

    Files live in ``directory``: ``running-<pid>.json`` (a marker: pid, started_at, host and,
    on Linux, the process's boot id and start time) while a SegScope runs,
    ``autosave-<pid>.segscope.json`` and ``autosave-<pid>.records.npz`` once it autosaved.
    A clean exit (:meth:`finish`) removes all three, so an autosave is recoverable when its
    marker names a dead process on this host, or when its marker is gone.

    Parameters
    ----------
    directory
        Default ``user_cache_dir() / "sessions"`` (``$SEGSCOPE_CACHE_DIR`` moves it).
    pid
        This process's id (tests pass others to play a second SegScope).

    Notes
    -----
    Not thread-safe: call it from one thread. Two SegScopes that launch together must not
    both offer the same crashed autosave: the one that offers it first claims it (:meth:`claim`:
    an exclusive ``flock`` on ``claim-<pid>.lock``, which the system frees if the claimer
    dies), and the other skips it. Where ``fcntl`` is missing (Windows) claims always
    succeed, and the second to adopt an autosave gets FileNotFoundError.
    """

    def __init__(self, directory: str | os.PathLike | None = None, pid: int | None = None):
        self.directory = Path(directory) if directory is not None else user_cache_dir() / "sessions"
        self.pid = os.getpid() if pid is None else int(pid)
        self.host = socket.gethostname()
        self._last_hash: str | None = None
        self._claims: dict[int, int] = {}  # crashed pid -> file descriptor holding its lock

    @property
    def marker_path(self) -> Path:
        return self.directory / f"running-{self.pid}.json"

    @property
    def autosave_path(self) -> Path:
        return self.directory / f"autosave-{self.pid}{JSON_SUFFIX}"

    def start(self) -> None:
        """Write this process's running marker (and forget stale markers of dead ones)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = {"pid": self.pid, "started_at": _utc_now(), "host": self.host, "process": _process_identity(self.pid)}
        with atomic_file(self.marker_path, force=True) as temporary:
            temporary.write_text(json.dumps(marker) + "\n", encoding="utf-8")
        self._remove_stale_markers()

    def autosave(self, document: SessionDocument, records: Iterable[SegmentRecord] = ()) -> Path | None:
        """Save the session as this process's autosave, unless nothing changed since last time.

        Cheap when nothing changed: a content hash of the document (its time stamp aside)
        and of the records is compared with the last write's. Writes the running marker
        first if :meth:`start` was not called (or the marker vanished).

        Returns
        -------
        Path or None
            The autosave's JSON, or None when the write was skipped.
        """
        records = list(records)
        digest = _content_hash(document, records)
        on_disk = self.autosave_path.is_file() and self.marker_path.is_file()
        if digest == self._last_hash and on_disk:
            log.debug("autosave skipped: session unchanged")
            return None
        if not self.marker_path.is_file():
            self.start()
        path = save_session(self.autosave_path, document, records)
        self._last_hash = digest
        return path

    def finish(self) -> None:
        """Clean exit: remove this process's autosave, then its marker; drop its claims."""
        for descriptor in self._claims.values():
            os.close(descriptor)
        self._claims.clear()
        self._remove_session_files(self.autosave_path)
        with contextlib.suppress(FileNotFoundError):
            self.marker_path.unlink()
        self._last_hash = None

    def recoverable(self) -> list[RecoveryCandidate]:
        """Autosaves of SegScopes that did not exit cleanly, newest first (never this one's).

        An autosave qualifies when its marker names a process of this host that no longer
        exists (or whose pid now belongs to another process: a reboot, a reused pid), or
        when its marker is gone. Markers of other hosts (a shared home folder)
        count as alive: their processes cannot be checked from here.
        """
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"autosave-*{JSON_SUFFIX}"):
            match = re.fullmatch(rf"autosave-(\d+){re.escape(JSON_SUFFIX)}", path.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == self.pid or self._owner_alive(pid):
                continue
            found.append(RecoveryCandidate(path=path, saved_at=self._saved_at(path), pid=pid))
        found.sort(key=lambda c: datetime.datetime.fromisoformat(c.saved_at), reverse=True)
        return found

    def claim(self, candidate: RecoveryCandidate) -> bool:
        """Reserve a crashed session's autosave for this process; False when another SegScope holds it.

        Another SegScope holds it while it is offering or restoring it.

        The claim is an exclusive, non-blocking ``flock`` held until :meth:`release` (or
        :meth:`finish`, or this process's end, crash included).
        """
        if candidate.pid in self._claims:
            return True
        try:
            import fcntl
        except ImportError:  # no flock here: unreserved (see the class notes)
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._claim_path(candidate.pid), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            log.info("autosave %s is being recovered by another SegScope; not offered", candidate.path)
            return False
        self._claims[candidate.pid] = descriptor
        return True

    def release(self, candidate: RecoveryCandidate) -> None:
        """Give up this process's claim on ``candidate`` (no error if it holds none)."""
        descriptor = self._claims.pop(candidate.pid, None)
        if descriptor is not None:
            os.close(descriptor)  # closing the descriptor drops the lock

    def _claim_path(self, pid: int) -> Path:
        return self.directory / f"claim-{pid}.lock"

    def discard(self, candidate: RecoveryCandidate) -> None:
        """Delete a crashed session's autosave, its marker and (if this process holds it) its claim file."""
        if candidate.pid == self.pid:
            raise ValueError(f"{candidate.path} is this process's own autosave; use finish()")
        self._remove_session_files(candidate.path)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"running-{candidate.pid}.json").unlink()
        if candidate.pid in self._claims:
            # Under our lock: whoever opens the name later finds no autosave to go with it.
            with contextlib.suppress(FileNotFoundError):
                self._claim_path(candidate.pid).unlink()
        log.info("discarded autosave %s", candidate.path)

    def adopt(self, candidate: RecoveryCandidate) -> tuple[SessionDocument, list[SegmentRecord]]:
        """Load a crashed session's autosave and take it over.

        The loaded session is first saved as this process's autosave, and only then are the
        old files removed: a crash at any point leaves the work on disk.

        Raises
        ------
        FileNotFoundError, SessionFileError
            When the autosave cannot be loaded; its files are then left as they are.
        """
        if candidate.pid == self.pid:
            raise ValueError(f"{candidate.path} is this process's own autosave")
        document, records = load_session(candidate.path)
        self._last_hash = None  # force the write even if an identical session was saved
        self.autosave(document, records)
        self.discard(candidate)
        log.info("recovered session from %s", candidate.path)
        return document, records

    # -- helpers -------------------------------------------------------------------------

    def _read_marker(self, pid: int) -> dict | None:
        try:
            marker = json.loads((self.directory / f"running-{pid}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by the pid alone
        return marker if isinstance(marker, dict) else {}

    def _owner_alive(self, pid: int) -> bool:
        marker = self._read_marker(pid)
        if marker is None:
            return False  # no marker and no clean finish: the owner crashed or lost track
        if marker.get("host", self.host) != self.host:
            return True
        if not _pid_alive(pid):
            return False
        recorded, current = marker.get("process"), _process_identity(pid)
        # A different boot or start time: the pid now belongs to another process.
        return recorded is None or current is None or recorded == current

    def _saved_at(self, path: Path) -> str:
        try:
            return SessionDocument.from_json(path.read_bytes(), path).saved_at
        except (OSError, ValueError) as exc:
            log.warning("autosave %s cannot be read (%s); offering it by its file time", path, exc)
            mtime = path.stat().st_mtime if path.exists() else 0.0
            return datetime.datetime.fromtimestamp(mtime, datetime.UTC).isoformat()

    def _remove_stale_markers(self) -> None:
        for marker in self.directory.glob("running-*.json"):
            match = re.fullmatch(r"running-(\d+)\.json", marker.name)
            if match is None or int(match.group(1)) == self.pid:
                continue
            pid = int(match.group(1))
            autosave = self.directory / f"autosave-{pid}{JSON_SUFFIX}"
            if not autosave.exists() and not self._owner_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()

    @staticmethod
    def _remove_session_files(json_path: Path) -> None:
        # JSON first: a JSON without its sidecar would be an error, a lone sidecar is inert.
        _, records_path = session_paths(json_path)
        for path in (json_path, records_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
