"""The driver's part of a pipeline run: which segments, the job description, what is left to do.

No Beam import here: listing segments and checking inputs happen before any runner starts,
so a wrong path fails in a second instead of on a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from segscope.analysis.dataset import dataset_beside
from segscope.analysis.pipeline.job import EmbedJob
from segscope.analysis.progress import Progress

log = logging.getLogger(__name__)


def default_skeletons(segmentation_url: str) -> str | None:
    """The skeleton folder a local precomputed segmentation names in its ``info``, if it exists."""
    from segscope.analysis.artefacts import local_folder, named_skeleton_folder

    folder = local_folder(segmentation_url)
    if folder is None or not folder.is_dir():
        return None
    named = named_skeleton_folder(folder)
    return str(named) if named is not None and named.is_dir() else None


def read_segment_table(path: str | Path) -> list[int]:
    """Segment ids of a file: a Parquet or CSV table's ``segment_id`` column, else a text list.

    Text lists take one or more ids per line (comma or space separated, ``#`` comments).

    Raises
    ------
    FileNotFoundError, ValueError
        No such file; a table without ``segment_id``; a token that is not an id.
    """
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"no segment table {path}")
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pv

            table = pv.read_csv(path)
        if "segment_id" not in table.column_names:
            raise ValueError(f"{path} has no segment_id column (columns: {', '.join(table.column_names)})")
        ids = [int(v) for v in table.column("segment_id").to_pylist() if v is not None]
        bad = [v for v in ids if not 0 < v < 2**64]
        if bad:
            raise ValueError(f"{path}: segment id {bad[0]} is not in 1..2^64-1")
        if not ids:
            raise ValueError(f"{path} lists no segment ids")
        return list(dict.fromkeys(ids))
    from segscope.analysis.segment_list import read_segment_ids_file

    return read_segment_ids_file(path)


def list_segments(
    segmentation_url: str,
    segments: Sequence[int] | str,
    *,
    skeletons: str | None = None,
    box_vox=None,
    min_voxels: int = 1,
) -> Generator[Progress, None, tuple[list[int], dict[int, tuple[int, int, int]]]]:
    """The segments to embed and, where a scan found them, one voxel of each (seeds).

    ``segments`` is a list of ids, a path (Parquet/CSV table or text list, see
    :func:`read_segment_table`), or ``"all"``: the SegScope dataset's segments table when the
    segmentation has one, else every segment a chunked scan of the segmentation finds (in
    ``box_vox``, with at least ``min_voxels`` voxels; :func:`segscope.analysis.segment_list.enumerate_segments`).

    Raises
    ------
    ValueError
        No segment found.
    """
    if not isinstance(segments, str):
        return [int(s) for s in segments], {}
    if segments != "all":
        return read_segment_table(segments), {}
    dataset = dataset_beside(segmentation_url)
    if dataset is not None and box_vox is None and min_voxels <= 1:
        table = Path(dataset["path"]) / "segments.parquet"
        if table.is_file():
            return read_segment_table(table), {}
    if skeletons and box_vox is None and min_voxels <= 1:
        from segscope.analysis.skeleton_sources import open_skeleton_source

        ids = open_skeleton_source(skeletons).segment_ids()
        if ids:
            return ids, {}
    from segscope.analysis.segment_list import enumerate_segments
    from segscope.analysis.volume import open_volume

    segmentation = open_volume(segmentation_url)
    found = yield from enumerate_segments(segmentation, box_vox=box_vox, min_voxels=min_voxels)
    if not len(found):
        raise ValueError(f"no segment with at least {min_voxels} voxels in {segmentation_url}")
    ids = [int(i) for i in found.ids]
    seeds = {s: (int(v[0]), int(v[1]), int(v[2])) for s, v in zip(ids, found.seed_vox)}
    return ids, seeds


def make_job(
    image: str,
    segmentation: str,
    out: str | Path,
    encoder_path: str | Path,
    *,
    precision: str = "auto",
    skeletons: str | None = None,
    classifiers: str | Path | None = None,
    **settings: Any,
) -> EmbedJob:
    """An :class:`EmbedJob` with the encoder's config and the provenance filled in.

    Checks what a worker would trip over later: the volumes open, the encoder reads, the
    classifiers match it. ``skeletons`` defaults to the folder a local segmentation names.
    ``settings`` are the other :class:`EmbedJob` fields.

    Raises
    ------
    FileNotFoundError, ValueError
        A volume, encoder or classifier folder that cannot be read, or classifiers made for
        another encoder.
    """
    from segscope.analysis.encoder import open_encoder
    from segscope.analysis.provenance import DATASET_KEYS, classifier_hashes, model_sha256
    from segscope.analysis.volume import open_volume

    open_volume(image)
    open_volume(segmentation)
    encoder = open_encoder(encoder_path, precision="float32")
    provenance: dict[str, Any] = {"model": str(encoder_path), "model_sha256": model_sha256(encoder_path)}
    from segscope.analysis import __version__

    provenance["segscope_version"] = __version__
    dataset = dataset_beside(segmentation)
    if dataset is not None:
        provenance["dataset"] = {key: dataset.get(key) for key in DATASET_KEYS}
    if classifiers:
        from segscope.analysis.artefacts import read_classifier_folder

        summary = read_classifier_folder(classifiers)
        _check_classifiers(summary, encoder_path)
        labelled: dict[str, Any] = {"folder": str(summary.folder), "files": classifier_hashes(summary.folder)}
        for info in (summary.compartment, summary.cell_type):
            if info is not None:
                labelled[info.task] = {
                    "classes": list(info.class_names),
                    "radius_nm": info.radius_nm,
                    "ood_threshold": info.ood_threshold,
                }
        provenance["classifiers"] = labelled
    if skeletons is None:
        skeletons = default_skeletons(segmentation)
    return EmbedJob(
        image=str(image),
        segmentation=str(segmentation),
        out=str(out),
        encoder_path=str(encoder_path),
        encoder_config=encoder.encoder_config.to_dict(),
        precision=precision,
        skeletons=skeletons,
        classifiers=None if classifiers is None else str(classifiers),
        provenance=provenance,
        **settings,
    )


def _check_classifiers(summary, encoder_path) -> None:
    """Refuse classifiers whose manifest names another encoder's sha256 (as ``segscope embed`` does)."""
    from segscope.analysis.artefacts import classifier_encoder_mismatch

    mismatch = classifier_encoder_mismatch(summary, encoder_path)
    if mismatch:
        raise ValueError(f"refusing the classifiers: {mismatch}")
