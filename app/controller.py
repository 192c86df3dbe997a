"""The app's controller (no Qt): data sources, the encoder, and click-to-embed jobs.

:class:`AppController` turns user intents (a click on a segment, cancel) into jobs on the
:class:`~segscope.app.jobs.JobRunner` and feeds their results into :class:`~segscope.app.state.SessionState`;
views (the Qt window, the Neuroglancer bridge) only subscribe to the state.

Superseding policy
------------------
Clicking another segment **supersedes** the running embedding job instead of queueing
behind it: the user wants the segment they just clicked, and a queue of stale segments
would delay that answer by the full cost of every earlier click. The superseded job stops
before its next batch, and its late updates are dropped (the runner's generation
counter), so the panel and the 3-D view only ever show the segment now selected.

Predictions and precomputed embeddings
--------------------------------------
Classifiers (a folder with ``classifiers.json``, see :func:`read_classifier_folder`) load
into the compute process after the encoder; every embedding batch then comes back with
its nodes' predicted subcompartments and the segment's updated cell-type call. With a
CSV ZIP store (:class:`PrecomputedEmbeddings`), a clicked segment found in the store
uses the store's nodes and embeddings instead of computing (only the classifiers run);
a segment the store lacks is computed as usual.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from segscope.analysis.progress import Progress
from segscope.app.jobs import JobRunner, JobUpdate
from segscope.app.state import (
    ClassifierInfo,
    ClassifierSummary,
    DatasetSummary,
    JobStatus,
    ModelSummary,
    SessionState,
)

log = logging.getLogger(__name__)

EMBED_LANE = "embed"
MODEL_LANE = "model"
#: Centres embedded in the first forward call, so the nearest node is labelled at once.
FIRST_BATCH = 2


class SourceError(ValueError):
    """A data source given to the app is missing, unreadable or inconsistent."""


# -- data sources ------------------------------------------------------------------------


class DataSource:
    """What the app shows and embeds: an image, a segmentation and optional skeletons.

    Use :meth:`open`. Volumes are :class:`segscope.analysis.volume.Volume` objects (``[x, y, z]``);
    skeletons come from an unsharded precomputed skeleton folder, positions in nm.
    """

    def __init__(
        self,
        name: str,
        image,
        segmentation,
        image_url: str,
        segmentation_url: str,
        skeletons_dir: Path | None,
        skeleton_info: dict | None,
        neuroglancer_skeletons: str | None,
    ):
        self.name = name
        self.image = image
        self.segmentation = segmentation
        self.image_url = image_url
        self.segmentation_url = segmentation_url
        self.skeletons_dir = skeletons_dir
        self.skeleton_info = skeleton_info
        #: Extra skeleton source for neuroglancer when the segmentation's info names none.
        self.neuroglancer_skeletons = neuroglancer_skeletons

    @classmethod
    def open(
        cls, image_url: str, segmentation_url: str, skeletons_url: str | None = None, *, name: str | None = None
    ) -> "DataSource":
        """Open and check the sources (reads metadata only).

        Skeletons default to the folder the segmentation's ``info`` names (``"skeletons"``)
        when it is local and present; without skeletons, centres are sampled from masks.

        Raises
        ------
        SourceError
            Missing or unreadable volumes, mismatched voxel sizes or shapes, an image that
            is not uint8, unreadable or remote skeletons.
        """
        from segscope.analysis.skeletons import read_skeleton_info
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
        skeletons_dir = None
        neuroglancer_skeletons = None
        seg_dir = _local_folder(segmentation_url)
        named = _named_skeletons(seg_dir) if seg_dir is not None else None
        if skeletons_url is not None:
            skeletons_dir = _local_folder(skeletons_url)
            if skeletons_dir is None:
                raise SourceError(f"skeletons must be a local folder for now, got {skeletons_url!r}")
            if named is None or named.resolve() != skeletons_dir.resolve():
                # Neuroglancer finds the info's own skeletons; others need a second source.
                neuroglancer_skeletons = str(skeletons_dir)
        elif named is not None and named.is_dir():
            skeletons_dir = named
        info = None
        if skeletons_dir is not None:
            try:
                info = read_skeleton_info(skeletons_dir)
            except (OSError, ValueError) as exc:
                raise SourceError(f"cannot read skeletons at {skeletons_dir}: {exc}") from exc
        return cls(
            name or Path(str(segmentation_url).rstrip("/")).parent.name or "data",
            image,
            segmentation,
            str(image_url),
            str(segmentation_url),
            skeletons_dir,
            info,
            neuroglancer_skeletons,
        )

    @classmethod
    def open_dataset_folder(cls, path: str | os.PathLike) -> "DataSource":
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
        attributes = (self.skeleton_info or {}).get("vertex_attributes", [])
        return any(a.get("id") == "compartment" for a in attributes)

    def summary(self) -> DatasetSummary:
        return DatasetSummary(
            name=self.name,
            image_url=self.image_url,
            segmentation_url=self.segmentation_url,
            skeletons_url=None if self.skeletons_dir is None else str(self.skeletons_dir),
            voxel_size_nm=tuple(float(v) for v in self.segmentation.voxel_size_nm),
            shape_vox=tuple(int(v) for v in self.segmentation.shape),
            has_ground_truth=self.has_ground_truth,
        )

    def skeleton(self, segment_id: int):
        """The segment's :class:`segscope.analysis.skeletons.Skeleton`, or None without one."""
        from segscope.analysis.skeletons import read_precomputed_skeleton

        if self.skeletons_dir is None:
            return None
        try:
            return read_precomputed_skeleton(self.skeletons_dir, segment_id, self.skeleton_info)
        except KeyError:
            log.info("segment %d has no skeleton in %s", segment_id, self.skeletons_dir)
            return None

    @property
    def centre_nm(self) -> np.ndarray:
        """Centre of the segmentation's bounds, xyz nm."""
        lo, hi = self.segmentation.bounds_nm
        return (np.asarray(lo) + np.asarray(hi)) / 2.0


def _local_folder(url: str) -> Path | None:
    from urllib.parse import urlparse

    for prefix in ("precomputed://",):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    parsed = urlparse(url)
    if parsed.scheme.lower() == "file":
        return Path(parsed.path)
    if parsed.scheme == "":
        return Path(url).expanduser()
    return None


def _named_skeletons(segmentation_dir: Path) -> Path | None:
    """The skeleton folder a precomputed segmentation's ``info`` names, if any."""
    import json

    info_path = segmentation_dir / "info"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    name = info.get("skeletons") if isinstance(info, dict) else None
    return segmentation_dir / name if isinstance(name, str) else None


# -- the encoder ---------------------------------------------------------------------------


def find_demo_model() -> Path | None:
    """The trained demo encoder shipped in ``assets/`` (a SegScope ``.keras`` file), if any."""
    from segscope.analysis.encoder import read_encoder_config
    from segscope.analysis.paths import assets_dir

    root = assets_dir()
    if not root.is_dir():
        return None
    for path in sorted(root.rglob("*.keras")):
        try:
            read_encoder_config(path)
        except (OSError, ValueError):
            continue
        return path
    return None


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Check that ``path`` names an encoder SegScope can load, without importing Keras.

    Accepts a SegScope ``.keras`` file or a SegCLR TensorFlow checkpoint (prefix,
    ``.index`` file or folder).

    Raises
    ------
    FileNotFoundError, ValueError
        With a message naming the problem.
    """
    from segscope.analysis.encoder import read_encoder_config, resolve_checkpoint_prefix

    path = Path(path).expanduser()
    if path.suffix == ".keras":
        read_encoder_config(path)
        return path
    return Path(resolve_checkpoint_prefix(path))


def load_encoder_job(path: Path, engine, *, trained: bool = True) -> Generator[Progress, None, ModelSummary]:
    """Load an encoder into ``engine`` (a :class:`segscope.app.compute_process.ComputeProcess`).

    The engine also runs the model once on blank cutouts of the batch sizes a click uses,
    so TensorFlow traces its graphs now rather than on the user's first click.
    """
    summary = yield from engine.load(path, warm_up_batches=(FIRST_BATCH,))
    return ModelSummary(
        name=summary["name"],
        source=str(path),
        trained=trained,
        embedding_dim=int(summary["embedding_dim"]),
        input_size_vox=tuple(summary["input_size_vox"]),
        voxel_size_nm=tuple(summary["voxel_size_nm"]),
    )


# -- classifiers ----------------------------------------------------------------------------

CLASSIFIER_MANIFEST = "classifiers.json"
CLASSIFIER_TASKS = ("compartment", "cell_type")


def read_classifier_folder(folder: str | os.PathLike) -> ClassifierSummary:
    """Describe the classifiers in ``folder`` without loading Keras.

    ``folder/classifiers.json`` maps a task (``"compartment"``, ``"cell_type"``) to
    ``{"file": name of the .npz beside it, "radius_nm": aggregation radius of the
    embeddings it takes}`` (what ``segscope evaluate --save-classifiers`` writes). Other
    keys and tasks are ignored.

    Raises
    ------
    FileNotFoundError
        No folder, no manifest, or a classifier file it names is missing.
    ValueError
        The manifest is not valid JSON, names no known task, lacks ``file`` or
        ``radius_nm``, or a file is not a SegScope classifier.
    """
    import json

    from segscope.analysis.classify import read_classifier_metadata

    folder = Path(folder).expanduser()
    manifest_path = folder / CLASSIFIER_MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"no classifier folder {folder}")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CLASSIFIER_MANIFEST} (which classifier is which)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{manifest_path} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not any(task in manifest for task in CLASSIFIER_TASKS):
        raise ValueError(f"{manifest_path} names none of the tasks {', '.join(CLASSIFIER_TASKS)}")
    infos: dict[str, ClassifierInfo] = {}
    for task in CLASSIFIER_TASKS:
        entry = manifest.get(task)
        if entry is None:
            continue
        try:
            path = folder / str(entry["file"])
            radius = float(entry["radius_nm"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{manifest_path}: entry {task!r} needs 'file' and 'radius_nm' ({exc})") from exc
        if not np.isfinite(radius) or radius < 0:
            raise ValueError(f"{manifest_path}: {task} radius_nm must be >= 0, got {radius}")
        metadata = read_classifier_metadata(path)
        infos[task] = ClassifierInfo(
            task=task,
            path=str(path),
            class_names=tuple(str(n) for n in metadata["class_names"]),
            radius_nm=radius,
            ood_threshold=float(metadata["ood_threshold"]),
            num_features=int(metadata["num_features"]),
            config=str(metadata["config"]["name"]),
        )
    compartment = infos.get("compartment")
    if compartment is not None:
        from segscope.analysis import COMPARTMENTS

        unknown = [name for name in compartment.class_names if name not in COMPARTMENTS]
        if unknown:
            raise ValueError(
                f"{compartment.path}: the compartment classifier predicts {unknown}, "
                f"not subcompartments SegScope knows ({', '.join(COMPARTMENTS)})"
            )
    encoders = {str(manifest[task]["encoder"]) for task in infos if manifest[task].get("encoder")}
    return ClassifierSummary(
        str(folder), compartment, infos.get("cell_type"), encoder=encoders.pop() if len(encoders) == 1 else None
    )


def find_demo_classifiers() -> Path | None:
    """The shipped classifier folder (``assets/classifiers`` with its manifest), if any."""
    from segscope.analysis.paths import assets_dir

    folder = assets_dir() / "classifiers"
    return folder if (folder / CLASSIFIER_MANIFEST).is_file() else None


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
        self, location: str | os.PathLike, *, coordinates: str = "nm", num_shards: int = 10_000, bytewidth: int = 64
    ):
        from segscope.analysis.csvzip import CsvZipStore

        self.store = CsvZipStore(location, num_shards=num_shards, bytewidth=bytewidth, coordinates=coordinates)
        self.location = self.store.location

    @classmethod
    def open(cls, location: str | os.PathLike, **options) -> "PrecomputedEmbeddings":
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
        """``(node_ids int64 [N], xyz_nm float64 [N, 3], embeddings float32 [N, D])`` of a
        segment, or None when the store does not hold it."""
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
    spacing_nm: float | None = None,
    precomputed: "PrecomputedEmbeddings | None" = None,
) -> Generator[Progress, None, int]:
    """Centres of a segment, then their embeddings, nearest to the click first.

    Yields one report with a :class:`SegmentCentres` payload, then one per forward call
    with a :class:`segscope.app.compute_process.PredictedBatch` payload (indices into the centre
    order, predictions when classifiers are loaded). ``engine`` is a
    :class:`segscope.app.compute_process.ComputeProcess` (None: stop after the centres unless the
    embeddings are precomputed). ``spacing_nm`` is the distance between centres along the
    skeleton (default SegCLR's 1500 nm). When ``precomputed`` holds the segment, its
    nodes and embeddings are used in one batch and only the classifiers run. Returns the
    number of centres embedded.
    """
    from segscope.analysis.centres import SEGCLR_SPACING_NM, order_by_distance, segment_centres

    skeleton = source.skeleton(segment_id)
    note = ""
    stored = None
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
                note=f"precomputed ({precomputed.location})",
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

    centres = segment_centres(
        source.segmentation,
        segment_id,
        skeleton_nodes_nm=None if skeleton is None else skeleton.nodes_nm,
        skeleton_edges=None if skeleton is None else skeleton.edges,
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
            0 if skeleton is None else skeleton.n_nodes,
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
        )
    )


def _store_ground_truth(skeleton, node_ids: np.ndarray, positions_nm: np.ndarray) -> np.ndarray | None:
    """The dataset's compartment labels of a store's nodes, when its node ids are the
    skeleton's (in range, and at the same places within 1 nm); otherwise None."""
    if skeleton is None or skeleton.compartment is None or not len(node_ids):
        return None
    if node_ids.min() < 0 or node_ids.max() >= skeleton.n_nodes:
        return None
    if not np.allclose(skeleton.nodes_nm[node_ids], positions_nm, atol=1.0):
        return None
    return skeleton.compartment[node_ids]


# -- the controller ----------------------------------------------------------------------------


class AppController:
    """Connects user intents, jobs and the session state (call from one thread).

    Parameters
    ----------
    state
        The session state it mutates.
    runner
        The job runner (its ``post`` decides on which thread updates arrive).
    spacing_nm
        Distance between embedding centres along a skeleton (nm); SegCLR's 1500 when None.
    """

    def __init__(self, state: SessionState, runner: JobRunner, *, spacing_nm: float | None = None):
        self.state = state
        self.runner = runner
        self.spacing_nm = spacing_nm
        self.source: DataSource | None = None
        self.precomputed: PrecomputedEmbeddings | None = None
        self.engine = None  # ComputeProcess, started by load_model or load_classifiers
        self.model_path: Path | None = None  # the encoder asked for last (sessions record it)
        self._model_job = None
        self._classifier_job = None
        self._embed_job = None
        self._click_times: dict[int, float] = {}

    # -- set-up --------------------------------------------------------------------------

    def open_source(self, source: DataSource, *, precomputed: PrecomputedEmbeddings | None = None) -> None:
        """Show a new data source (cancels work on the previous one).

        ``precomputed`` is a CSV ZIP store of this data's embeddings; a store opened with
        earlier data is dropped, since segment ids only mean something within one dataset.
        """
        self.runner.cancel(EMBED_LANE)
        self.source = source
        self.precomputed = precomputed
        self.state.set_dataset(source.summary())
        self.state.set_job(None)
        store = f" Precomputed embeddings: {precomputed.location}." if precomputed is not None else ""
        self.state.show_status(f"Opened {source.name}. Double-click a segment to embed it.{store}")

    def _ensure_engine(self):
        from segscope.app.compute_process import ComputeProcess

        if self.engine is None:
            self.engine = ComputeProcess()
        return self.engine

    def load_model(self, path: Path | None, *, trained: bool = True) -> None:
        """Load the encoder at ``path`` on the worker; None: embedding unavailable."""
        self.model_path = path
        if path is None:
            self.state.set_model(
                None,
                "No trained model found in assets/ and no --checkpoint given: "
                "segments can be selected but not embedded.",
            )
            self.state.show_status(self.state.model_message)
            return
        self.state.set_model(None, f"Loading model {path.name}…")
        self.state.show_status(self.state.model_message)
        engine = self._ensure_engine()
        self._model_job = self.runner.submit(
            f"loading model {path.name}",
            lambda: load_encoder_job(path, engine, trained=trained),
            self._on_model_update,
            kind=MODEL_LANE,
            supersede=False,
        )

    def load_classifiers(self, summary: ClassifierSummary | None, message: str = "") -> None:
        """Load the classifiers ``summary`` describes (see :func:`read_classifier_folder`)
        into the compute process on the worker; None: no predictions, ``message`` says why.

        Loading queues behind the model on the same worker, so clicks made meanwhile wait
        for both and their first batch already carries predictions.
        """
        if summary is None:
            self.state.set_classifiers(None, message or "No classifiers loaded: nodes are not labelled.")
            return
        self.state.set_classifiers(None, f"Loading classifiers from {summary.folder}…")
        engine = self._ensure_engine()
        self._classifier_job = self.runner.submit(
            "loading classifiers",
            lambda: load_classifiers_job(summary, engine),
            self._on_classifier_update,
            kind=MODEL_LANE,
            supersede=False,
        )

    def _on_classifier_update(self, update: JobUpdate) -> None:
        if update.event == "finished":
            summary: ClassifierSummary = update.result
            tasks = [
                name
                for name, info in (("subcompartments", summary.compartment), ("cell types", summary.cell_type))
                if info is not None
            ]
            self.state.set_classifiers(summary, f"Classifiers: {' and '.join(tasks)} from {summary.folder}")
            self.state.show_status(f"Classifiers ready: {' and '.join(tasks)}.{self._encoder_mismatch()}")
        elif update.event == "failed":
            message = f"Could not load the classifiers: {update.error}"
            self.state.set_classifiers(None, message)
            self.state.show_error(message)

    def _encoder_mismatch(self) -> str:
        """A warning when the classifiers were trained on another encoder's embeddings."""
        summary, model = self.state.classifiers, self.state.model
        if summary is None or summary.encoder is None or model is None:
            return ""
        if Path(model.source).name == summary.encoder:
            return ""
        return (
            f" Note: the classifiers were trained on embeddings of {summary.encoder}, not of "
            f"{Path(model.source).name}; their predictions may mean little."
        )

    def _on_model_update(self, update: JobUpdate) -> None:
        if update.event == "finished":
            summary: ModelSummary = update.result
            note = "" if summary.trained else " (untrained weights: embeddings are not meaningful)"
            self.state.set_model(summary, f"Model {summary.name} from {Path(summary.source).name}{note}")
            self.state.show_status(f"Model ready: {summary.name}{note}.")
        elif update.event == "failed":
            message = f"Could not load the model: {update.error}"
            self.state.set_model(None, message)
            self.state.show_error(message)

    # -- clicks and jobs -------------------------------------------------------------------

    def handle_click(self, segment_id: int | None, position_nm=None) -> None:
        """A double click in the viewer: select and embed the segment under the cursor."""
        if segment_id is None:
            self.state.show_status("No segment under the cursor.")
            return
        self.select_segment(segment_id, position_nm)

    def select_segment(self, segment_id: int, click_nm=None) -> None:
        """Select ``segment_id`` and start embedding it (superseding any running job)."""
        if self.source is None:
            self.state.show_error("Open a dataset first.")
            return
        record = self.state.select_segment(segment_id, click_nm)
        source = self.source
        engine = self.engine
        click = None if record.click_nm is None else record.click_nm.copy()
        name = f"segment {record.segment_id}"
        holder: dict[str, Any] = {}

        precomputed = self.precomputed

        def make():
            job = holder["job"]
            return embed_segment_job(
                source,
                engine,
                record.segment_id,
                click,
                cancel=lambda: job.cancel_requested,
                spacing_nm=self.spacing_nm,
                precomputed=precomputed,
            )

        job = self.runner.submit(name, make, self._on_embed_update, kind=EMBED_LANE, supersede=True)
        holder["job"] = job
        self._embed_job = job
        self._click_times[job.id] = time.perf_counter()
        waiting = any(j is not None and not j.done for j in (self._model_job, self._classifier_job))
        self.state.set_job(
            JobStatus(
                job.id,
                name,
                "queued",
                unit="cutouts",
                message="waiting for the model and classifiers to load" if waiting else "",
            )
        )

    def cancel(self) -> bool:
        """Cancel the running embedding job; False when none is running."""
        if self._embed_job is None or self._embed_job.done or self.state.job is None or not self.state.job.active:
            return False
        self._embed_job.cancel()
        self.state.update_job(self._embed_job.id, state="cancelling", message="cancelling…")
        return True

    def _on_embed_update(self, update: JobUpdate) -> None:
        job = update.job
        segment = self.state.segment
        segment_id = None if segment is None else segment.segment_id
        if update.event == "started":
            self.state.update_job(
                job.id, state="cancelling" if job.cancel_requested else "running", message="finding centres"
            )
        elif update.event == "progress":
            report = update.progress
            payload = report.payload
            if isinstance(payload, SegmentCentres):
                self.state.set_centres(
                    payload.segment_id,
                    payload.node_ids,
                    payload.positions_nm,
                    skeleton_node_count=payload.skeleton_node_count,
                    ground_truth=payload.ground_truth,
                    embedding_source=payload.embedding_source,
                )
                if payload.note:
                    self.state.show_status(f"Segment {payload.segment_id}: {payload.note}.")
            elif payload is not None and segment_id is not None:
                self._store_batch(segment_id, payload)
            state = "cancelling" if job.cancel_requested else "running"
            self.state.update_job(
                job.id,
                state=state,
                done=report.done,
                total=report.total,
                unit=report.unit,
                rate=report.rate,
                message=report.message,
            )
        elif update.event == "finished":
            elapsed = time.perf_counter() - self._click_times.pop(job.id, time.perf_counter())
            total = segment.n_centres if segment is not None else 0
            if segment is not None and segment.embedding_source == "precomputed":
                self.state.update_job(
                    job.id, state="finished", done=update.result, total=total, message=f"precomputed, {elapsed:.1f} s"
                )
                self.state.show_status(
                    f"Segment {segment_id}: {update.result} precomputed embeddings "
                    f"in {elapsed:.1f} s.{self._prediction_summary(segment)}"
                )
            elif self.state.model is None:
                self.state.update_job(job.id, state="finished", done=0, total=total, message="no model: centres only")
                self.state.show_status(
                    f"Segment {segment_id}: {total} centres. {self.state.model_message or 'No model loaded.'}"
                )
            else:
                self.state.update_job(
                    job.id, state="finished", done=update.result, total=total, message=f"done in {elapsed:.1f} s"
                )
                self.state.show_status(
                    f"Embedded {update.result} centres of segment {segment_id} "
                    f"in {elapsed:.1f} s.{self._prediction_summary(segment)}"
                )
        elif update.event == "cancelled":
            self._click_times.pop(job.id, None)
            done = segment.n_embedded if segment is not None else 0
            self.state.update_job(job.id, state="cancelled", done=done, message=f"cancelled after {done} cutouts")
            self.state.show_status(
                f"Cancelled: {done} of {segment.n_centres if segment else 0} centres of segment {segment_id} embedded."
            )
        elif update.event == "failed":
            self._click_times.pop(job.id, None)
            self.state.update_job(job.id, state="failed", message=str(update.error))
            self.state.show_error(f"Embedding segment {segment_id} failed: {update.error}")

    def _store_batch(self, segment_id: int, batch) -> None:
        """Put one :class:`~segscope.app.compute_process.PredictedBatch` into the state."""
        if not self.state.add_embeddings(segment_id, batch.indices, batch.embeddings):
            return
        predictions = batch.predictions
        if predictions is not None:
            calls, cell = predictions.compartments, predictions.cell_type
            changes: dict[str, Any] = {"note": predictions.note}
            if calls is not None:
                changes.update(
                    predicted=calls.codes,
                    indices=calls.indices,
                    probability=calls.probability,
                    uncertainty=calls.uncertainty,
                )
            if cell is not None:
                changes.update(
                    cell_type=cell.name,
                    cell_type_probability=min(max(cell.probability, 0.0), 1.0),
                    cell_type_probabilities=cell.probabilities,
                    ood_score=cell.ood_score,
                    ood_flagged=cell.ood_flagged,
                    ood_threshold=cell.threshold,
                )
            self.state.set_predictions(segment_id, **changes)
        self.state.announce_batch(segment_id, batch.indices)

    @staticmethod
    def _prediction_summary(segment) -> str:
        if segment is None or segment.cell_type is None:
            return ""
        text = f" Cell type {segment.cell_type} (p = {segment.cell_type_probability:.2f})"
        if segment.ood_flagged:
            text += f", OUT OF DISTRIBUTION (uncertainty {segment.ood_score:.2f})"
        return text + "."

    def shutdown(self) -> None:
        """Stop the worker and the compute process (idempotent)."""
        self.runner.shutdown(wait=True, timeout=5.0)
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
