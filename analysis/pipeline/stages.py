"""The compute of each pipeline stage, one element at a time, without Beam.

Each function is what one Beam stage runs per element (see :mod:`segscope.analysis.pipeline.beam`);
they call the same library code as ``segscope embed``: skeletons from
:class:`segscope.analysis.skeleton_sources.SegmentSkeletons`, centres from
:func:`segscope.analysis.centres.skeleton_centres`, cutouts from
:func:`segscope.analysis.volume.cut_masked` (one read shared by nearby centres), embeddings from
:func:`segscope.analysis.inference.stream_embeddings` (device choice, out-of-memory halving),
predictions from :func:`segscope.analysis.classify.segments.predict_segment`, stores from
:class:`segscope.analysis.csvzip.CsvZipStore` and :func:`segscope.analysis.aggregate.aggregate_embeddings`.
Positions are nm, x, y, z.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segscope.analysis.pipeline.job import EmbedJob, ShardMarker, read_marker, write_marker

log = logging.getLogger(__name__)


@dataclass
class SegmentNodes:
    """A segment's cutout centres (output of the centres stage).

    ``node_ids`` int64 ``[n]`` (skeleton node indices), ``positions_nm`` float64 ``[n, 3]``.
    """

    shard: int
    segment_id: int
    node_ids: np.ndarray
    positions_nm: np.ndarray


@dataclass
class NodeChunk:
    """Consecutive centres of one segment, cut and embedded together (output of the chunk stage).

    ``chunk`` numbers the chunks of a segment from 0; ``len()`` is the number of centres,
    the chunk's weight when batching for the model.
    """

    shard: int
    segment_id: int
    chunk: int
    node_ids: np.ndarray
    positions_nm: np.ndarray

    def __len__(self) -> int:
        return len(self.node_ids)


@dataclass
class EmbeddedChunk:
    """Embeddings of one :class:`NodeChunk` (float32 ``[b, D]``)."""

    shard: int
    segment_id: int
    chunk: int
    node_ids: np.ndarray
    positions_nm: np.ndarray
    embeddings: np.ndarray


# -- inputs, opened once per worker -------------------------------------------------------


def open_volumes(job: EmbedJob):
    """``(image, segmentation)`` :class:`segscope.analysis.volume.Volume` pair of the job."""
    from segscope.analysis.volume import open_volume

    return open_volume(job.image), open_volume(job.segmentation)


def open_skeletons(job: EmbedJob, segmentation):
    """The job's :class:`~segscope.analysis.skeleton_sources.SegmentSkeletons` (given source, cache, kimimaro)."""
    from segscope.analysis.skeleton_sources import SegmentSkeletons, open_skeleton_source

    given = open_skeleton_source(job.skeletons) if job.skeletons else None
    return SegmentSkeletons(segmentation, given, max_box_vox=job.skeleton_box_vox)


def encoder_config(job: EmbedJob):
    """The job's :class:`~segscope.analysis.encoder.config.EncoderConfig` (no Keras import)."""
    from segscope.analysis.encoder.config import EncoderConfig

    return EncoderConfig.from_dict(dict(job.encoder_config))


def load_encoder(job: EmbedJob):
    """The encoder, in the job's precision resolved for this worker's device."""
    from segscope.analysis.encoder import open_encoder

    return open_encoder(job.encoder_path, precision=job.precision)


def load_predictor(job: EmbedJob):
    """The classifiers' :class:`~segscope.analysis.classify.segments.SegmentPredictor`, or None."""
    if not job.classifiers:
        return None
    from segscope.analysis.artefacts import read_classifier_folder
    from segscope.analysis.classify.segments import load_segment_predictor

    summary = read_classifier_folder(job.classifiers)
    entries = [
        {"task": info.task, "path": info.path, "radius_nm": info.radius_nm}
        for info in (summary.compartment, summary.cell_type)
        if info is not None
    ]
    predictor, _ = load_segment_predictor(entries)
    return predictor


# -- stages -------------------------------------------------------------------------------


def segment_nodes(
    job: EmbedJob, skeletons, shard: int, segment_id: int, seed_vox: Sequence[int] | None = None
) -> SegmentNodes:
    """Centres of one segment: its skeleton (given, cached or skeletonised) thinned to the job's spacing."""
    from segscope.analysis.centres import skeleton_centres
    from segscope.analysis.progress import drive

    found = drive(skeletons.resolve(int(segment_id), seed_vox=seed_vox))
    if found.origin == "truncated":
        log.warning("segment %d: %s", segment_id, found.note)
    centres = skeleton_centres(
        int(segment_id), found.skeleton.nodes_nm, found.skeleton.edges, spacing_nm=job.spacing_nm
    )
    return SegmentNodes(int(shard), int(segment_id), centres.node_ids, centres.positions_nm)


def node_chunks(nodes: SegmentNodes, chunk_size: int) -> Iterator[NodeChunk]:
    """A segment's centres, ``chunk_size`` at a time (each chunk is cut with one shared read).

    A segment without centres gives one empty chunk, so its shard still hears of it.
    """
    n = len(nodes.node_ids)
    if n == 0:
        yield NodeChunk(nodes.shard, nodes.segment_id, 0, nodes.node_ids, nodes.positions_nm)
        return
    for chunk, start in enumerate(range(0, n, chunk_size)):
        pick = slice(start, start + chunk_size)
        yield NodeChunk(nodes.shard, nodes.segment_id, chunk, nodes.node_ids[pick], nodes.positions_nm[pick])


@dataclass
class Embedder:
    """What a worker loads once: the encoder and the volumes it cuts from."""

    encoder: Any
    image: Any
    segmentation: Any


def load_embedder(job: EmbedJob) -> Embedder:
    """The job's encoder (see :func:`load_encoder`) and volumes."""
    image, segmentation = open_volumes(job)
    return Embedder(load_encoder(job), image, segmentation)


def embed_chunks(
    embedder: Embedder, chunks: Sequence[NodeChunk], batch_size: int | None = None, *, cut_seconds: list | None = None
) -> list[EmbeddedChunk]:
    """Cut and embed a batch of chunks (of any segments) with the in-process engine.

    :func:`segscope.analysis.inference.stream_embeddings` runs the forward calls
    (``batch_size`` cutouts each, default sized for the device, halved on out-of-memory
    errors) while its reader thread cuts the next chunks with
    :func:`segscope.analysis.volume.cut_masked`, as ``segscope embed`` overlaps reading and
    compute. ``cut_seconds``, when given, receives the reader's time per chunk.
    """
    from segscope.analysis.inference import stream_embeddings
    from segscope.analysis.progress import drive
    from segscope.analysis.volume import cut_masked

    config = embedder.encoder.encoder_config
    size = tuple(int(v) for v in config.input_size_vox)
    downsample = config.downsample_from(embedder.image.voxel_size_nm)
    sizes = [len(c) for c in chunks]
    starts = np.cumsum([0, *sizes])
    total = int(starts[-1])

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk, start in zip(chunks, starts):
            if not len(chunk):
                continue
            began = time.perf_counter()
            cutouts = cut_masked(
                embedder.image,
                embedder.segmentation,
                chunk.segment_id,
                chunk.positions_nm,
                size,
                downsample=downsample,
            )
            if cut_seconds is not None:
                cut_seconds.append(time.perf_counter() - began)
            yield np.arange(start, start + len(chunk)), cutouts

    embeddings = drive(stream_embeddings(embedder.encoder, batches(), total, batch_size=batch_size, prefetch=2))
    return [
        EmbeddedChunk(c.shard, c.segment_id, c.chunk, c.node_ids, c.positions_nm, embeddings[start : start + n])
        for c, start, n in zip(chunks, starts, sizes)
    ]


@dataclass
class ShardRows:
    """The rows of one shard, segments ascending, each segment's nodes in centre order.

    ``segment_ids`` uint64 ``[N]``, ``node_ids`` int64 ``[N]``, ``xyz_nm`` float64
    ``[N, 3]``, ``embeddings`` float32 ``[N, D]``; ``segments`` the segment ids heard of
    (with or without nodes), ascending.
    """

    shard: int
    segments: tuple[int, ...]
    segment_ids: np.ndarray
    node_ids: np.ndarray
    xyz_nm: np.ndarray
    embeddings: np.ndarray

    def groups(self) -> list[tuple[int, np.ndarray]]:
        """``[(segment id, rows)]`` of the segments with nodes."""
        from segscope.analysis.arrays import group_rows

        return group_rows(self.segment_ids)


def assemble_shard(shard: int, chunks: Iterable[EmbeddedChunk]) -> ShardRows:
    """Put a shard's chunks (arriving in any order) back into segment and centre order.

    Raises
    ------
    ValueError
        Chunks of one segment repeat or leave a gap (a runner delivered an incomplete group).
    """
    by_segment: dict[int, dict[int, EmbeddedChunk]] = {}
    dim = None
    for chunk in chunks:
        parts = by_segment.setdefault(int(chunk.segment_id), {})
        if chunk.chunk in parts:
            raise ValueError(f"shard {shard}: chunk {chunk.chunk} of segment {chunk.segment_id} arrived twice")
        parts[chunk.chunk] = chunk
        if len(chunk.embeddings):
            dim = chunk.embeddings.shape[1]
    seg, nodes, xyz, emb = [], [], [], []
    for segment_id in sorted(by_segment):
        parts = by_segment[segment_id]
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"shard {shard}: segment {segment_id} has chunks {sorted(parts)}, not 0..{len(parts) - 1}")
        for index in range(len(parts)):
            part = parts[index]
            if len(part.node_ids):
                seg.append(np.full(len(part.node_ids), segment_id, np.uint64))
                nodes.append(np.asarray(part.node_ids, np.int64))
                xyz.append(np.asarray(part.positions_nm, np.float64).reshape(-1, 3))
                emb.append(np.asarray(part.embeddings, np.float32))
    if seg:
        return ShardRows(
            int(shard),
            tuple(sorted(by_segment)),
            np.concatenate(seg),
            np.concatenate(nodes),
            np.concatenate(xyz),
            np.concatenate(emb),
        )
    return ShardRows(
        int(shard),
        tuple(sorted(by_segment)),
        np.zeros(0, np.uint64),
        np.zeros(0, np.int64),
        np.zeros((0, 3)),
        np.zeros((0, dim or 0), np.float32),
    )


def predict_rows(predictor, rows: ShardRows) -> dict[str, np.ndarray]:
    """Classifier columns for every row, as ``segscope embed --classifiers`` writes them.

    See :func:`segscope.analysis.classify.segments.predict_node_rows`.

    Raises
    ------
    ValueError
        A classifier could not label a segment (its note names why).
    """
    from segscope.analysis.classify.segments import predict_node_rows
    from segscope.analysis.progress import drive

    columns, _ = drive(predict_node_rows(predictor, rows.segment_ids, rows.xyz_nm, rows.embeddings))
    return columns


def node_table(rows: ShardRows, predictions: dict[str, np.ndarray] | None, provenance: dict[str, Any]):
    """``segscope embed``'s Parquet table (see ``embeddings_arrow_table`` in export.tables)."""
    from segscope.analysis.export.tables import embeddings_arrow_table

    return embeddings_arrow_table(
        rows.segment_ids, rows.node_ids, rows.xyz_nm, rows.embeddings, predictions, provenance
    )


def write_shard(job: EmbedJob, rows: ShardRows, predictor=None, *, precision: str = "") -> ShardMarker:
    """Write a shard's outputs, each atomically, then its completion marker.

    Order: CSV ZIP shard, Parquet part, aggregated stores, marker. A shard already holding
    segments from an earlier run keeps them (same-id members are replaced); the marker
    lists them all.
    """
    import pyarrow.parquet as pq

    from segscope.analysis.aggregate import aggregate_embeddings
    from segscope.analysis.csvzip import CsvZipStore
    from segscope.analysis.export.atomic import atomic_file

    started = time.perf_counter()
    layout = job.layout
    groups = rows.groups()

    def store(folder) -> CsvZipStore:
        return CsvZipStore(folder, job.num_shards, job.bytewidth, coordinates="nm")

    if "csvzip" in job.formats and groups:
        store(layout.csvzip).write_many(
            {s: (rows.node_ids[r], rows.xyz_nm[r], rows.embeddings[r]) for s, r in groups}, overwrite=True
        )
    if "parquet" in job.formats and groups:
        predictions = predict_rows(predictor, rows) if predictor is not None else None
        provenance = dict(job.provenance, precision=precision, coordinates="nm", spacing_nm=job.spacing_nm)
        provenance["segments"] = len(groups)
        layout.parquet.mkdir(parents=True, exist_ok=True)
        with atomic_file(layout.parquet_part(rows.shard), force=True) as tmp:
            pq.write_table(node_table(rows, predictions, provenance), tmp, compression="zstd")
    for radius in job.aggregate_radii_nm:
        if groups:
            store(layout.aggregated(radius)).write_many(
                {
                    s: (
                        rows.node_ids[r],
                        rows.xyz_nm[r],
                        aggregate_embeddings(rows.xyz_nm[r], rows.embeddings[r], radius),
                    )
                    for s, r in groups
                },
                overwrite=True,
            )
    with_nodes = {s for s, _ in groups}
    earlier = read_marker(layout, rows.shard)
    segments = set(rows.segments) | set(earlier.segment_ids if earlier else ())
    marker = ShardMarker(
        rows.shard,
        tuple(sorted(segments)),
        len(rows.segment_ids),
        tuple(s for s in rows.segments if s not in with_nodes),
        precision,
        time.perf_counter() - started,
    )
    write_marker(layout, marker)
    return marker
