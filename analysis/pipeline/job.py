"""What a pipeline run computes, where it writes, and which shards are already finished.

The output folder (``--out``) holds::

    pipeline.json                 the run's settings; a rerun with other settings is refused
    csvzip/{shard}.zip            node embeddings, SegCLR's CSV ZIP layout, nm coordinates
    parquet/shard-{shard}.parquet the same rows as Parquet (``segscope embed``'s columns)
    aggregated_10um/{shard}.zip   radius-aggregated embeddings (one store per radius)
    done/{shard}.json             completion marker of a shard, written after all its files

Every file of a shard is written aside and renamed into place, and the marker only after
all of them: a killed run leaves shards that are whole and marked, whole and unmarked (redone
on the rerun), or absent, never a marker over missing or partial files. A rerun skips the
shards whose marker lists every segment the run asks for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segscope.analysis.centres import SEGCLR_SPACING_NM
from segscope.analysis.csvzip import shard_for_segment

log = logging.getLogger(__name__)

#: Output formats of the node embeddings.
FORMATS = ("csvzip", "parquet")
MANIFEST_NAME = "pipeline.json"
MANIFEST_FORMAT = "segscope-pipeline-embed"
#: Settings that change what a shard holds; a rerun must match them to reuse finished shards.
_RESULT_SETTINGS = (
    "image",
    "segmentation",
    "skeletons",
    "spacing_nm",
    "precision",
    "formats",
    "aggregate_radii_nm",
    "num_shards",
    "bytewidth",
)


@dataclass(frozen=True)
class EmbedJob:
    """Everything the workers need; plain data, pickled into every stage.

    Attributes
    ----------
    image, segmentation : str
        Volume URLs or paths, read by the workers through TensorStore.
    out : str
        Output folder (see the module docstring); a folder every worker can write
        (local disk for the local runner, a shared file system on a cluster).
    encoder_path : str
        ``.keras`` file or SegCLR checkpoint prefix, readable by every worker.
    encoder_config : dict
        :meth:`segscope.analysis.encoder.config.EncoderConfig.to_dict` of that encoder (the
        cutout stage needs its input size and voxel size without loading Keras).
    precision : str
        ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``auto`` is resolved
        by each worker for its own device.
    skeletons : str or None
        A skeleton source (precomputed folder, SWC folder, node table); segments without a
        skeleton there are skeletonised with kimimaro on the worker.
    skeleton_box_vox : int or None
        Largest box edge (voxels) a segment is skeletonised in (None: the library default).
    spacing_nm : float
        Centre spacing along the skeleton (nm).
    batch_size : int or None
        Cutouts per forward call (None: sized for the worker's device).
    classifiers : str or None
        Classifier folder (``classifiers.json``); adds prediction columns to Parquet.
    formats : tuple of str
        Any of :data:`FORMATS`.
    aggregate_radii_nm : tuple of float
        Radii (nm) of the aggregated stores written beside the node embeddings.
    num_shards, bytewidth : int
        SegCLR's shard function parameters (10,000 / 64 as H01 and MICrONS v117/v343).
    provenance : dict
        Recorded in ``pipeline.json`` and the Parquet metadata (encoder and classifier
        hashes, dataset).
    """

    image: str
    segmentation: str
    out: str
    encoder_path: str
    encoder_config: Mapping[str, Any]
    precision: str = "auto"
    skeletons: str | None = None
    skeleton_box_vox: int | None = None
    spacing_nm: float = SEGCLR_SPACING_NM
    batch_size: int | None = None
    classifiers: str | None = None
    formats: tuple[str, ...] = ("csvzip",)
    aggregate_radii_nm: tuple[float, ...] = ()
    num_shards: int = 10_000
    bytewidth: int = 64
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if not self.formats or unknown:
            raise ValueError(f"formats must be some of {FORMATS}, got {list(self.formats)}")
        if self.classifiers and "parquet" not in self.formats:
            raise ValueError("classifiers write prediction columns, which only the Parquet output holds")
        if not self.spacing_nm > 0:
            raise ValueError(f"spacing_nm must be positive, got {self.spacing_nm}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for radius in self.aggregate_radii_nm:
            if not radius > 0:
                raise ValueError(f"aggregation radii must be positive (nm), got {radius}")

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(Path(self.out))

    def settings(self) -> dict[str, Any]:
        """The settings a rerun must share to reuse finished shards, plus the model hashes."""
        out = {key: _jsonable(getattr(self, key)) for key in _RESULT_SETTINGS}
        out["encoder_sha256"] = self.provenance.get("model_sha256")
        out["classifier_files"] = self.provenance.get("classifiers", {}).get("files")
        return out


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def radius_name(radius_nm: float) -> str:
    """Folder name of an aggregated store: ``aggregated_10um`` for 10,000 nm (SegCLR's names)."""
    return f"aggregated_{radius_nm / 1000:g}um"


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside a pipeline's output folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def csvzip(self) -> Path:
        return self.root / "csvzip"

    @property
    def parquet(self) -> Path:
        return self.root / "parquet"

    @property
    def markers(self) -> Path:
        return self.root / "done"

    def aggregated(self, radius_nm: float) -> Path:
        return self.root / radius_name(radius_nm)

    def parquet_part(self, shard: int) -> Path:
        return self.parquet / f"shard-{int(shard)}.parquet"

    def marker(self, shard: int) -> Path:
        return self.markers / f"{int(shard)}.json"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: the requested segments of one shard.

    ``seeds_vox`` holds, per segment, one voxel (absolute, xyz) where a segment scan found
    it, or None; it seeds skeletonisation without another scan.
    """

    shard: int
    segment_ids: tuple[int, ...]
    seeds_vox: tuple[tuple[int, int, int] | None, ...] = ()

    def seed_of(self, index: int) -> tuple[int, int, int] | None:
        return self.seeds_vox[index] if self.seeds_vox else None


def plan_shards(
    segment_ids: Iterable[int],
    num_shards: int = 10_000,
    bytewidth: int = 64,
    seeds_vox: Mapping[int, Sequence[int]] | None = None,
) -> list[ShardTask]:
    """Group segments by SegCLR's shard function; shards ascending, ids in the given order.

    Raises
    ------
    ValueError
        A segment id outside 1..2^64-1.
    """
    by_shard: dict[int, list[int]] = {}
    for segment_id in dict.fromkeys(int(s) for s in segment_ids):
        if not 0 < segment_id < 2**64:
            raise ValueError(f"segment id {segment_id} is not in 1..2^64-1")
        by_shard.setdefault(shard_for_segment(segment_id, num_shards, bytewidth), []).append(segment_id)
    tasks = []
    for shard in sorted(by_shard):
        ids = tuple(by_shard[shard])
        seeds: tuple = ()
        if seeds_vox is not None:
            seeds = tuple(_seed(seeds_vox.get(s)) for s in ids)
        tasks.append(ShardTask(shard, ids, seeds))
    return tasks


def _seed(value: Sequence[int] | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    x, y, z = (int(v) for v in value)
    return (x, y, z)


@dataclass(frozen=True)
class ShardMarker:
    """What a finished shard holds (``done/{shard}.json``)."""

    shard: int
    segment_ids: tuple[int, ...]
    nodes: int
    empty_segments: tuple[int, ...] = ()
    precision: str = ""
    seconds: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["segment_ids"] = list(self.segment_ids)
        data["empty_segments"] = list(self.empty_segments)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ShardMarker:
        data = json.loads(text)
        return cls(
            int(data["shard"]),
            tuple(int(s) for s in data["segment_ids"]),
            int(data["nodes"]),
            tuple(int(s) for s in data.get("empty_segments", ())),
            str(data.get("precision", "")),
            float(data.get("seconds", 0.0)),
        )


def read_marker(layout: OutputLayout, shard: int) -> ShardMarker | None:
    """The shard's marker, or None when it is absent or unreadable (then the shard is redone)."""
    path = layout.marker(shard)
    try:
        return ShardMarker.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable completion marker %s (%s): the shard is redone", path, exc)
        return None


def write_marker(layout: OutputLayout, marker: ShardMarker) -> None:
    """Write the marker atomically (after every file of the shard is in place)."""
    from segscope.analysis.export.atomic import atomic_file

    layout.markers.mkdir(parents=True, exist_ok=True)
    with atomic_file(layout.marker(marker.shard), force=True) as tmp:
        tmp.write_text(marker.to_json())


def split_finished(layout: OutputLayout, tasks: Sequence[ShardTask]) -> tuple[list[ShardTask], list[ShardTask]]:
    """``(to do, finished)``: a shard is finished when its marker lists every segment asked for."""
    todo, finished = [], []
    present = {p.name for p in layout.markers.iterdir()} if layout.markers.is_dir() else set()
    for task in tasks:
        marker = read_marker(layout, task.shard) if f"{task.shard}.json" in present else None
        if marker is not None and set(task.segment_ids) <= set(marker.segment_ids):
            finished.append(task)
        else:
            todo.append(task)
    return todo, finished


def count_markers(layout: OutputLayout, shards: set[int]) -> int:
    """How many of ``shards`` have a marker now (the driver's progress line polls this)."""
    if not layout.markers.is_dir():
        return 0
    names = {f"{s}.json" for s in shards}
    return sum(1 for entry in os.scandir(layout.markers) if entry.name in names)


def prepare_output(job: EmbedJob, *, force: bool = False) -> None:
    """Create the output folder and its manifest, or check a rerun against the manifest.

    Raises
    ------
    ValueError
        The folder holds a run with other settings (naming them), or something that is not
        a pipeline output, and ``force`` is not set. With ``force`` the completion markers
        are removed, so every shard is computed again and its files replaced.
    """
    from segscope.analysis.export.atomic import atomic_file

    layout = job.layout
    settings = job.settings()
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "settings": settings, "provenance": dict(job.provenance)}
    if layout.manifest.is_file():
        try:
            old = json.loads(layout.manifest.read_text())
            old_settings = old["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{layout.manifest} is not a readable pipeline manifest ({exc})") from None
        changed = sorted(k for k in settings if old_settings.get(k) != settings[k])
        if changed and not force:
            detail = "; ".join(f"{k}: {old_settings.get(k)!r} then, {settings[k]!r} now" for k in changed)
            raise ValueError(
                f"{layout.root} holds a run with other settings ({detail}); use another --out, "
                "or --force to compute every shard again"
            )
    elif layout.root.is_dir() and any(layout.root.iterdir()) and not force:
        raise ValueError(f"{layout.root} exists and is not a pipeline output; use another --out or --force")
    if force and layout.markers.is_dir():
        shutil.rmtree(layout.markers)
    layout.root.mkdir(parents=True, exist_ok=True)
    with atomic_file(layout.manifest, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
