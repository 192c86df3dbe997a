"""Data sources, encoder and classifier loading, and the click-to-embed job (no Qt).

:class:`DataSource` opens an image, a segmentation and skeletons; :func:`embed_segment_job`
is the generator one click runs (centres, cutouts, batched inference in the compute
process, predictions), with :class:`PrecomputedEmbeddings` standing in for the encoder
when a CSV ZIP store holds the segment. :func:`load_encoder_job`,
:func:`read_classifier_folder` and :func:`load_classifiers_job` prepare the compute process.
:class:`segscope.app.service.SessionService` runs them on its worker and puts the results
into the session model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from segscope.analysis.artefacts import ClassifierSummary, local_folder, named_skeleton_folder
from segscope.analysis.progress import Progress
from segscope.app.state import DatasetSummary, ModelSummary

log = logging.getLogger(__name__)

EMBED_LANE = "embed"
MODEL_LANE = "model"
#: Centres embedded in the first forward call, so the nearest node is labelled at once.
FIRST_BATCH = 2


def _xyz(values) -> tuple:
    """Three values as an (x, y, z) tuple (ValueError for any other count)."""
    x, y, z = values
    return (x, y, z)


class SourceError(ValueError):
    """A data source given to the app is missing, unreadable or inconsistent."""


# -- data sources ------------------------------------------------------------------------


class DataSource:
    """What the app shows and embeds: an image, a segmentation and optional skeletons.

    Use :meth:`open`. Volumes are :class:`segscope.analysis.volume.Volume` objects (``[x, y, z]``);
    skeletons come from a :class:`segscope.analysis.skeleton_sources.SkeletonSource`
    (precomputed folder, SWC folder or node table), positions in nm. A segment without one is
    skeletonised on demand (:meth:`skeleton_job`) inside a box of at most
    ``skeleton_box_vox`` voxels per axis and cached in the user cache.
    """

    def __init__(
        self,
        name: str,
        image,
        segmentation,
        image_url: str,
        segmentation_url: str,
        skeletons,
        neuroglancer_skeletons: str | None,
        *,
        skeleton_box_vox: int | None = None,
    ):
        from segscope.analysis.skeleton_sources import SegmentSkeletons

        self.name = name
        self.image = image
        self.segmentation = segmentation
        self.image_url = image_url
        self.segmentation_url = segmentation_url
        #: The user's skeletons (a SkeletonSource), or None.
        self.skeletons = skeletons
        #: Extra skeleton source for neuroglancer when the segmentation's info names none.
        self.neuroglancer_skeletons = neuroglancer_skeletons
        self.segment_skeletons = SegmentSkeletons(segmentation, skeletons, max_box_vox=skeleton_box_vox)

    @property
    def skeletons_dir(self) -> Path | None:
        """The folder or file the user's skeletons come from, or None."""
        return None if self.skeletons is None else Path(self.skeletons.location)

    @property
    def skeleton_info(self) -> dict | None:
        """The precomputed skeleton ``info`` of the user's skeletons, when they are precomputed."""
        return getattr(self.skeletons, "info", None)

    @classmethod
    def open(
        cls,
        image_url: str,
        segmentation_url: str,
        skeletons_url: str | None = None,
        *,
        name: str | None = None,
        skeleton_box_vox: int | None = None,
    ) -> DataSource:
        """Open and check the sources (reads metadata only).

        Skeletons default to the folder the segmentation's ``info`` names (``"skeletons"``)
        when it is local and present; ``skeletons_url`` may also name a folder of
        ``ID.swc`` files or a CSV/Parquet node table. Segments without a skeleton are
        skeletonised when clicked, in a box of at most ``skeleton_box_vox`` voxels per axis
        (default :data:`segscope.analysis.skeletonise.DEFAULT_MAX_BOX_VOX`).

        Raises
        ------
        SourceError
            Missing or unreadable volumes, mismatched voxel sizes or shapes, an image that
            is not uint8, unreadable or remote skeletons.
        """
        from segscope.analysis.skeleton_sources import open_skeleton_source
        from segscope.analysis.volume import open_volume

        volumes = []
        for role, url in (("image", image_url), ("segmentation", segmentation_url)):
            try:
                volumes.append(open_volume(url))
            except (ValueError, OSError) as exc:
                raise SourceError(f"cannot open the {role} {url!r}: {exc}") from exc
        image, segmentation = volumes
        if image.dtype != np.uint8:
            raise SourceError(f"the image {image_url!r} is {image.dtype}; SegCLR needs uint8 EM")
        if not np.issubdtype(segmentation.dtype, np.integer):
            raise SourceError(f"the segmentation {segmentation_url!r} is {segmentation.dtype}, not integer ids")
        if not np.allclose(image.voxel_size_nm, segmentation.voxel_size_nm):
            raise SourceError(
                f"image and segmentation voxel sizes differ: {image.voxel_size_nm.tolist()} vs "
                f"{segmentation.voxel_size_nm.tolist()} nm"
            )
        skeletons_location: str | None = None
        seg_dir = local_folder(segmentation_url)
        named = named_skeleton_folder(seg_dir) if seg_dir is not None else None
        if skeletons_url is not None:
            if local_folder(skeletons_url) is None:
                raise SourceError(f"skeletons must be a local folder or file for now, got {skeletons_url!r}")
            skeletons_location = skeletons_url
        elif named is not None and named.is_dir():
            skeletons_location = str(named)
        skeletons = None
        neuroglancer_skeletons = None
        if skeletons_location is not None:
            try:
                skeletons = open_skeleton_source(skeletons_location)
            except (OSError, ValueError) as exc:
                raise SourceError(f"cannot read skeletons at {skeletons_location}: {exc}") from exc
            folder = skeletons.precomputed_folder
            if folder is not None and (named is None or named.resolve() != folder.resolve()):
                # Neuroglancer finds the info's own skeletons; others need a second source.
                neuroglancer_skeletons = str(folder)
        try:
            return cls(
                name or Path(str(segmentation_url).rstrip("/")).parent.name or "data",
                image,
                segmentation,
                str(image_url),
                str(segmentation_url),
                skeletons,
                neuroglancer_skeletons,
                skeleton_box_vox=skeleton_box_vox,
            )
        except ValueError as exc:
            raise SourceError(str(exc)) from exc

    @classmethod
    def open_dataset_folder(cls, path: str | os.PathLike) -> DataSource:
        """Open a SegScope dataset folder (``dataset.json``, image, segmentation, skeletons).

        Raises
        ------
        SourceError
            When the folder is not a readable dataset.
        """
        from segscope.analysis.dataset import open_dataset

        try:
            dataset = open_dataset(path)
            meta = dataset.meta
        except (OSError, ValueError) as exc:
            raise SourceError(str(exc)) from exc
        folder = Path(path)
        skeletons = meta.get("skeletons")
        return cls.open(
            str(folder / meta["image"]),
            str(folder / meta["segmentation"]),
            str(folder / skeletons) if skeletons else None,
            name=dataset.name,
        )

    @property
    def has_ground_truth(self) -> bool:
        """Whether the skeletons carry per-node compartment labels."""
        return self.skeletons is not None and self.skeletons.has_compartments

    def summary(self) -> DatasetSummary:
        return DatasetSummary(
            name=self.name,
            image_url=self.image_url,
            segmentation_url=self.segmentation_url,
            skeletons_url=None if self.skeletons_dir is None else str(self.skeletons_dir),
            voxel_size_nm=_xyz(float(v) for v in self.segmentation.voxel_size_nm),
            shape_vox=_xyz(int(v) for v in self.segmentation.shape),
            has_ground_truth=self.has_ground_truth,
        )

    def skeleton(self, segment_id: int):
        """The segment's :class:`segscope.analysis.skeletons.Skeleton` (given or cached), or None.

        Never skeletonises (that is :meth:`skeleton_job`, which a click runs).
        """
        if self.skeletons is not None:
            skeleton = self.skeletons.get(segment_id)
            if skeleton is not None:
                return skeleton
        cache = self.segment_skeletons.cache
        return None if cache is None else cache.get(segment_id)

    def skeleton_job(self, segment_id: int, click_nm=None):
        """Generator: the segment's skeleton, made with kimimaro around ``click_nm`` when no source has one.

        Returns a :class:`segscope.analysis.skeleton_sources.SegmentSkeleton`.
        """
        return self.segment_skeletons.resolve(segment_id, click_nm=click_nm)

    @property
    def centre_nm(self) -> np.ndarray:
        """Centre of the segmentation's bounds, xyz nm."""
        lo, hi = self.segmentation.bounds_nm
        return (np.asarray(lo) + np.asarray(hi)) / 2.0


# -- the encoder ---------------------------------------------------------------------------


def load_encoder_job(
    path: Path, engine, *, trained: bool = True, precision: str = "auto", batch_size: int | None = None
) -> Generator[Progress, None, ModelSummary]:
    """Load an encoder into ``engine`` (a :class:`segscope.app.compute_process.ComputeProcess`).

    ``precision`` is ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``; the
    summary says which one the engine resolved it to. The engine also runs the model once
    on blank cutouts of the batch sizes a click uses, so TensorFlow traces its graphs now
    rather than on the user's first click (``batch_size``: the one :func:`embed_segment_job`
    is given, None: the engine's default, which it always traces).
    """
    warm_up = (FIRST_BATCH,) if batch_size is None else (FIRST_BATCH, int(batch_size))
    summary = yield from engine.load(path, warm_up_batches=warm_up, precision=precision)
    from segscope.analysis.artefacts import cached_model_sha256

    try:
        cached_model_sha256(path)  # here on the worker, for the classifier check on the Qt thread
    except OSError as exc:
        log.warning("cannot hash the encoder %s: %s", path, exc)
    return ModelSummary(
        name=summary["name"],
        source=str(path),
        trained=trained,
        embedding_dim=int(summary["embedding_dim"]),
        input_size_vox=tuple(summary["input_size_vox"]),
        voxel_size_nm=tuple(summary["voxel_size_nm"]),
        precision=str(summary["precision"]),
    )


# -- classifiers ----------------------------------------------------------------------------


def load_classifiers_job(summary: ClassifierSummary, engine) -> Generator[Progress, None, ClassifierSummary]:
    """Load the classifiers ``summary`` describes into ``engine`` (the compute process)."""
    entries = [
        {"task": info.task, "path": info.path, "radius_nm": info.radius_nm}
        for info in (summary.compartment, summary.cell_type)
        if info is not None
    ]
    yield from engine.load_classifiers(entries)
    return summary


# -- precomputed embeddings ---------------------------------------------------------------------


class PrecomputedEmbeddings:
    """A SegCLR CSV ZIP store of node embeddings the app uses instead of computing.

    Parameters
    ----------
    location
        Folder or URL of the store (``{shard}.zip`` files).
    coordinates
        ``"nm"`` (what ``segscope embed --out DIR`` writes, and SegCLR's ``*_nm_coord*``
        variants) or ``"voxels"`` (SegCLR's plain variants), converted to nm with the
        dataset's voxel size.
    num_shards, bytewidth
        The store's shard function (10,000 / 64 for H01 and MICrONS v117/v343).
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        coordinates: Literal["voxels", "nm"] = "nm",
        num_shards: int = 10_000,
        bytewidth: int = 64,
    ):
        from segscope.analysis.csvzip import CsvZipStore

        self.store = CsvZipStore(location, num_shards=num_shards, bytewidth=bytewidth, coordinates=coordinates)
        self.location = self.store.location

    @classmethod
    def open(cls, location: str | os.PathLike, **options) -> PrecomputedEmbeddings:
        """Open and check a store.

        Raises
        ------
        SourceError
            For a local folder that does not exist or holds no ``{shard}.zip`` file.
        """
        text = os.fspath(location)
        try:
            embeddings = cls(location, **options)
        except ValueError as exc:
            raise SourceError(f"--embeddings {text}: {exc}") from exc
        folder = embeddings.store.local_dir
        if folder is not None:
            if not folder.is_dir():
                raise SourceError(f"--embeddings: no folder {folder}")
            if not any(folder.glob("*.zip")):
                raise SourceError(f"--embeddings: {folder} holds no CSV ZIP shards ({{shard}}.zip files)")
        return embeddings

    def read(self, segment_id: int, voxel_size_nm) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Read a segment's nodes and embeddings from the store.

        Returns ``(node_ids int64 [N], xyz_nm float64 [N, 3], embeddings float32 [N, D])``
        of the segment, or None when the store does not hold it.
        """
        try:
            node_ids, xyz, embeddings = self.store.read(segment_id)
        except KeyError:
            return None
        xyz = np.asarray(xyz, dtype=np.float64)
        if self.store.coordinates == "voxels":
            xyz = xyz * np.asarray(voxel_size_nm, dtype=np.float64)
        return np.asarray(node_ids, dtype=np.int64), xyz, np.asarray(embeddings, dtype=np.float32)


# -- the click-to-embed job ------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentCentres:
    """Payload of an embedding job's first report: the segment's centres.

    Attributes
    ----------
    segment_id : int
    node_ids : numpy.ndarray
        int64 ``[N]`` skeleton node of each centre, nearest the click first.
    positions_nm : numpy.ndarray
        float64 ``[N, 3]`` xyz nm.
    skeleton_node_count : int
    ground_truth : numpy.ndarray or None
        uint8 ``[N]`` dataset compartment labels of the centres.
    embedding_source : str
        ``"computed"`` or ``"precomputed"`` (the nodes and embeddings of a CSV ZIP store).
    note : str
        Something the user should know about where the embeddings come from.
    """

    segment_id: int
    node_ids: np.ndarray
    positions_nm: np.ndarray
    skeleton_node_count: int
    ground_truth: np.ndarray | None
    embedding_source: str = "computed"
    note: str = ""


def embed_segment_job(
    source: DataSource,
    engine,
    segment_id: int,
    click_nm: np.ndarray | None,
    *,
    cancel: Callable[[], bool] | None = None,
    first_batch: int = FIRST_BATCH,
    batch_size: int | None = None,
    spacing_nm: float | None = None,
    precomputed: PrecomputedEmbeddings | None = None,
) -> Generator[Progress, None, int]:
    """Centres of a segment, then their embeddings, nearest to the click first.

    Yields one report with a :class:`SegmentCentres` payload, then one per forward call
    with a :class:`segscope.app.compute_process.PredictedBatch` payload (indices into the centre
    order, predictions when classifiers are loaded). ``engine`` is a
    :class:`segscope.app.compute_process.ComputeProcess` (None: stop after the centres unless the
    embeddings are precomputed). ``spacing_nm`` is the distance between centres along the
    skeleton (default SegCLR's 1500 nm). ``first_batch`` cutouts go in the first forward call,
    the rest ``batch_size`` per call (None: the engine's default). When ``precomputed`` holds the segment, its
    nodes and embeddings are used in one batch and only the classifiers run. Returns the
    number of centres embedded.
    """
    from segscope.analysis.centres import SEGCLR_SPACING_NM, order_by_distance, skeleton_centres

    skeleton = source.skeleton(segment_id)
    note = ""
    stored = None
    store_location = None if precomputed is None else precomputed.location
    if precomputed is not None:
        try:
            stored = precomputed.read(segment_id, source.segmentation.voxel_size_nm)
        except (OSError, ValueError) as exc:
            note = f"precomputed embeddings unreadable ({exc}); computing instead"
            log.warning("segment %d: %s", segment_id, note)
        if stored is None and not note:
            note = f"not in {precomputed.location}; computing"
    if stored is not None and len(stored[0]):
        node_ids, positions, embeddings = stored
        order = np.arange(len(node_ids)) if click_nm is None else order_by_distance(positions, click_nm)
        node_ids, positions, embeddings = node_ids[order], positions[order], embeddings[order]
        truth = _store_ground_truth(skeleton, node_ids, positions)
        total = len(node_ids)
        yield Progress(
            0,
            total,
            "nodes",
            f"segment {segment_id}: {total} precomputed nodes",
            payload=SegmentCentres(
                int(segment_id),
                node_ids,
                positions,
                0 if skeleton is None else skeleton.n_nodes,
                truth,
                embedding_source="precomputed",
                note=f"precomputed ({store_location})",
            ),
        )
        predictions = None
        if engine is not None and getattr(engine, "classifiers_loaded", False):
            predictions = engine.predict(positions, embeddings)
        from segscope.app.compute_process import PredictedBatch

        yield Progress(
            total,
            total,
            "nodes",
            f"segment {segment_id}: precomputed",
            payload=PredictedBatch(np.arange(total, dtype=np.int64), embeddings, predictions),
        )
        return total

    if skeleton is None:
        found = yield from source.skeleton_job(segment_id, click_nm)
        skeleton = found.skeleton
        if found.note:
            note = f"{note}; {found.note}" if note else found.note
    centres = skeleton_centres(
        segment_id,
        skeleton.nodes_nm,
        skeleton.edges,
        click_nm=click_nm,
        spacing_nm=SEGCLR_SPACING_NM if spacing_nm is None else spacing_nm,
    )
    truth = None
    if skeleton is not None and skeleton.compartment is not None:
        truth = skeleton.compartment[centres.node_ids]
    total = len(centres)
    yield Progress(
        0,
        total,
        "cutouts",
        f"segment {segment_id}: {total} centres",
        payload=SegmentCentres(
            int(segment_id),
            centres.node_ids,
            centres.positions_nm,
            skeleton.n_nodes,
            truth,
            note=note,
        ),
    )
    if engine is None or not engine.loaded or total == 0:
        return 0
    return (
        yield from engine.embed(
            source.image_url,
            source.segmentation_url,
            segment_id,
            centres.positions_nm,
            cancel=cancel,
            first_batch=first_batch,
            batch_size=batch_size,
        )
    )


def _store_ground_truth(skeleton, node_ids: np.ndarray, positions_nm: np.ndarray) -> np.ndarray | None:
    """The dataset's compartment labels of a store's nodes, or None when its node ids are not the skeleton's.

    The node ids count as the skeleton's when they are in range and the nodes sit at the
    same places within 1 nm.
    """
    if skeleton is None or skeleton.compartment is None or not len(node_ids):
        return None
    if node_ids.min() < 0 or node_ids.max() >= skeleton.n_nodes:
        return None
    if not np.allclose(skeleton.nodes_nm[node_ids], positions_nm, atol=1.0):
        return None
    return skeleton.compartment[node_ids]


# -- the controller ----------------------------------------------------------------------------
