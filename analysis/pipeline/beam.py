"""The embedding pipeline as an Apache Beam graph, and how it is run (imports ``apache_beam``).

Graph (stage names as the runners show them)::

    ReadTodo       the driver's list of (shard, segment, seed) lines to do (a text file in
                   the output folder, so a list of millions of segments is read in splits)
    Spread         Reshuffle: segments spread over workers
    Centres        skeleton (given, cached or kimimaro) -> centres
    Chunks         a segment's centres in chunks of one forward call
    Embed          RunInference: the encoder and volumes are loaded once per worker process;
                   batches of chunks (several segments) are cut through TensorStore (one
                   read shared by each chunk's centres) on the engine's reader thread while
                   the model runs, as in-process embedding overlaps them
    GroupByShard   all embedded chunks of a shard
    WriteShards    classifiers, CSV ZIP shard, Parquet part, aggregated stores, marker

Runner: ``--runner`` and every other Beam pipeline option pass through. Without
``--runner`` the job runs on Beam's FnApiRunner (the local batch runner behind
``DirectRunner``), in this process, or in ``--direct_num_workers N`` worker processes.
``DirectRunner`` itself first tries the Prism runner, which downloads a Go binary from
GitHub on first use; the default skips that so the local runner works offline.

Metrics (namespace ``segscope``): counters ``segments``, ``nodes``, ``shards_written``,
``empty_segments``; distributions ``centres_ms`` (per segment), ``cutouts_ms`` (per chunk,
on the reader thread, overlapping inference), ``inference_ms`` (per RunInference batch,
cutting included), ``write_ms`` (per shard); summed they give each stage's time. RunInference adds its own
(``RunInference`` namespace: ``inference_batch_latency_micro_secs``, ``load_model_latency_milli_secs``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from segscope.analysis.pipeline import stages
from segscope.analysis.pipeline.job import EmbedJob, ShardTask, count_markers
from segscope.analysis.progress import Progress, RateMeter

log = logging.getLogger(__name__)

NAMESPACE = "segscope"
#: Name of the runner used when no ``--runner`` is given.
LOCAL_RUNNER = "local"
TODO_NAME = "todo.txt"
#: Cutouts per chunk and per model batch when the job does not set a batch size (CPU-sized:
#: the demo encoder's default CPU batch; a GPU worker splits nothing, it runs the batch whole).
DEFAULT_CHUNK = 16
#: Chunks per RunInference batch: the engine cuts the next chunk while the model runs one.
BATCH_CHUNKS = 8
#: Shards per pipeline run (see :func:`run_embed`).
DEFAULT_WAVE_SHARDS = 1000


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


class CentresFn(beam.DoFn):
    """``(shard, segment id, seed or None)`` -> :class:`~segscope.analysis.pipeline.stages.SegmentNodes`."""

    def __init__(self, job: EmbedJob):
        self.job = job
        self.segments = Metrics.counter(NAMESPACE, "segments")
        self.empty = Metrics.counter(NAMESPACE, "empty_segments")
        self.timing = Metrics.distribution(NAMESPACE, "centres_ms")

    def setup(self) -> None:
        _, segmentation = stages.open_volumes(self.job)
        self.skeletons = stages.open_skeletons(self.job, segmentation)

    def process(self, element):
        shard, segment_id, seed = element
        started = time.perf_counter()
        nodes = stages.segment_nodes(self.job, self.skeletons, shard, segment_id, seed)
        self.timing.update(_elapsed_ms(started))
        self.segments.inc()
        if not len(nodes.node_ids):
            self.empty.inc()
        yield nodes


class SegClrModelHandler(ModelHandler):
    """RunInference's handle on the SegCLR encoder and the volumes: loaded once per worker process.

    Batches are lists of :class:`~segscope.analysis.pipeline.stages.NodeChunk` weighing up
    to ``max_cutouts`` centres in all. Each batch is cut (TensorStore, one shared read per
    chunk) on the engine's reader thread while the model runs the previous forward call.
    """

    def __init__(self, job: EmbedJob, max_cutouts: int):
        super().__init__(min_batch_size=1, max_batch_size=max_cutouts, element_size_fn=lambda chunk: max(1, len(chunk)))
        self.job = job
        self.timing = Metrics.distribution(NAMESPACE, "inference_ms")
        self.cut_timing = Metrics.distribution(NAMESPACE, "cutouts_ms")
        self.nodes = Metrics.counter(NAMESPACE, "nodes")

    def load_model(self):
        embedder = stages.load_embedder(self.job)
        log.info("worker %d loaded the encoder (%s)", os.getpid(), embedder.encoder.precision)
        return embedder

    def run_inference(self, batch, model, inference_args=None):
        started = time.perf_counter()
        cut_seconds: list[float] = []
        out = stages.embed_chunks(model, batch, self.job.batch_size, cut_seconds=cut_seconds)
        # Metrics are per thread: recorded here, not on the reader thread that cut.
        for seconds in cut_seconds:
            self.cut_timing.update(round(seconds * 1000))
        self.timing.update(_elapsed_ms(started))
        self.nodes.inc(sum(len(c.node_ids) for c in out))
        return out

    def get_num_bytes(self, batch) -> int:
        return sum(chunk.positions_nm.nbytes for chunk in batch)

    def get_metrics_namespace(self) -> str:
        return "RunInference"


class WriteShardFn(beam.DoFn):
    """``(shard, embedded chunks)`` -> the shard's files and its completion marker."""

    def __init__(self, job: EmbedJob):
        self.job = job
        self.written = Metrics.counter(NAMESPACE, "shards_written")
        self.timing = Metrics.distribution(NAMESPACE, "write_ms")

    def setup(self) -> None:
        self.predictor = stages.load_predictor(self.job)
        self.precision = ""
        if self.job.precision != "auto":
            from segscope.analysis.encoder.config import normalise_precision

            self.precision = normalise_precision(self.job.precision)
        else:
            from segscope.analysis.inference import resolve_precision

            self.precision = resolve_precision("auto")

    def process(self, element):
        shard, chunks = element
        started = time.perf_counter()
        rows = stages.assemble_shard(shard, chunks)
        marker = stages.write_shard(self.job, rows, self.predictor, precision=self.precision)
        self.timing.update(_elapsed_ms(started))
        self.written.inc()
        log.info("shard %d: %d segments, %d nodes written", shard, len(rows.segments), marker.nodes)
        yield marker


def _parse_todo(line: str) -> tuple[int, int, tuple[int, int, int] | None]:
    parts = [int(p) for p in line.split()]
    seed = (parts[2], parts[3], parts[4]) if len(parts) == 5 else None
    return parts[0], parts[1], seed


def write_todo(path: str | Path, tasks: Sequence[ShardTask]) -> int:
    """Write ``shard segment [x y z]`` lines for every segment of ``tasks`` (atomically); returns the count."""
    from segscope.analysis.export.atomic import atomic_file

    count = 0
    with atomic_file(path, force=True) as tmp, open(tmp, "w") as handle:
        for task in tasks:
            for index, segment_id in enumerate(task.segment_ids):
                seed = task.seed_of(index)
                extra = "" if seed is None else " {} {} {}".format(*seed)
                handle.write(f"{task.shard} {segment_id}{extra}\n")
                count += 1
    return count


def build_pipeline(pipeline: beam.Pipeline, job: EmbedJob, todo_path: str) -> beam.PCollection:
    """Add the embedding stages to ``pipeline``; returns the PCollection of shard markers."""
    chunk = int(job.batch_size or DEFAULT_CHUNK)
    return (
        pipeline
        | "ReadTodo" >> beam.io.ReadFromText(str(todo_path))
        | "Parse" >> beam.Map(_parse_todo)
        | "Spread" >> beam.Reshuffle()
        | "Centres" >> beam.ParDo(CentresFn(job))
        | "Chunks" >> beam.FlatMap(stages.node_chunks, chunk)
        | "Embed" >> RunInference(SegClrModelHandler(job, chunk * BATCH_CHUNKS))
        | "KeyByShard" >> beam.Map(lambda embedded: (embedded.shard, embedded))
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShardFn(job))
    )


def _option_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (last one wins)."""
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def pipeline_options(beam_args: Sequence[str]) -> tuple[PipelineOptions, Any]:
    """``(options, runner)`` for Beam's command-line flags.

    No ``--runner`` (or ``--runner local``): the FnApiRunner in this process, or in
    ``--direct_num_workers`` worker processes (multi_processing unless
    ``--direct_running_mode`` says otherwise). Any other ``--runner`` is Beam's to resolve.
    """
    args = list(beam_args)
    runner_name = _option_value(args, "--runner")
    runner: Any = None
    if runner_name is None or runner_name.lower() == LOCAL_RUNNER:
        args = [a for i, a in enumerate(args) if not _is_runner_flag(args, i)]
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
        workers = _option_value(args, "--direct_num_workers")
        if workers is not None and int(workers) != 1 and _option_value(args, "--direct_running_mode") is None:
            args.append("--direct_running_mode=multi_processing")
    options = PipelineOptions(args)
    if runner is None:
        runner = options.view_as(StandardOptions).runner
    elif options.view_as(DirectOptions).direct_num_workers is None:
        options.view_as(DirectOptions).direct_num_workers = 1
    return options, runner


def _is_runner_flag(args: Sequence[str], index: int) -> bool:
    arg = args[index]
    if arg == "--runner" or arg.startswith("--runner="):
        return True
    return index > 0 and args[index - 1] == "--runner"


@dataclass
class RunSummary:
    """What a run did: shards written and skipped, counters and stage times from Beam's metrics.

    ``stage_ms`` maps a stage (``centres``, ``cutouts``, ``inference``, ``write``) to
    ``(sum, count)`` of its per-element milliseconds; empty where the runner does not
    report metrics.
    """

    shards_written: int
    shards_skipped: int
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)
    stage_ms: dict[str, tuple[int, int]] = field(default_factory=dict)


def _query_metrics(result) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    from apache_beam.metrics.metric import MetricsFilter

    counters: dict[str, int] = {}
    stage_ms: dict[str, tuple[int, int]] = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except (NotImplementedError, AttributeError):  # some runners keep no metrics
        return counters, stage_ms
    for counter in found.get("counters", []):
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + int(counter.committed or counter.attempted or 0)
    for dist in found.get("distributions", []):
        value = dist.committed or dist.attempted
        if value is None:
            continue
        name = dist.key.metric.name.removesuffix("_ms")
        total, count = stage_ms.get(name, (0, 0))
        stage_ms[name] = (total + int(value.sum), count + int(value.count))
    return counters, stage_ms


def run_embed(
    job: EmbedJob,
    todo: Sequence[ShardTask],
    skipped: int = 0,
    beam_args: Iterable[str] = (),
    *,
    wave_shards: int = DEFAULT_WAVE_SHARDS,
    poll_s: float = 1.0,
) -> Generator[Progress, None, RunSummary]:
    """Run the pipeline on ``todo`` (shards not finished yet), ``wave_shards`` shards at a time.

    A batch runner writes nothing until the group-by-shard has seen every element, so one
    pipeline over all shards would lose everything to a kill near its end; each wave is its
    own pipeline, so a kill loses at most the wave in flight (at the price of one worker
    start-up per wave). Each wave runs on a helper thread; this generator yields a
    :class:`~segscope.analysis.progress.Progress` every ``poll_s`` seconds counting the
    shard markers written so far (``unit`` "shards") and returns a :class:`RunSummary`
    with the metrics of all waves summed.

    Raises
    ------
    Exception
        Whatever the pipeline raised (a worker's error, re-raised by the runner); the waves
        before it are finished and marked.
    """
    if wave_shards < 1:
        raise ValueError(f"wave_shards must be >= 1, got {wave_shards}")
    started = time.perf_counter()
    layout = job.layout
    total = len(todo)
    if not todo:
        yield Progress(0, 0, "shards", f"nothing to do: {skipped} shards already finished")
        return RunSummary(0, skipped, time.perf_counter() - started)
    options, runner = pipeline_options(list(beam_args))
    shards = {task.shard for task in todo}
    segments = sum(len(task.segment_ids) for task in todo)
    waves = [todo[i : i + wave_shards] for i in range(0, total, wave_shards)]
    meter = RateMeter()
    counters: dict[str, int] = {}
    stage_ms: dict[str, tuple[int, int]] = {}
    for number, wave in enumerate(waves, 1):
        message = f"{segments} segments in {total} shards ({skipped} already finished)"
        if len(waves) > 1:
            message += f", wave {number}/{len(waves)}"
        todo_path = layout.root / TODO_NAME
        write_todo(todo_path, wave)
        outcome = _start_pipeline(job, str(todo_path), options, runner)
        yield Progress(count_markers(layout, shards), total, "shards", message)
        while outcome["thread"].is_alive():
            outcome["thread"].join(poll_s)
            done = count_markers(layout, shards)
            yield Progress(done, total, "shards", message, rate=meter.rate(done))
        if "error" in outcome:
            raise outcome["error"]
        wave_counters, wave_ms = _query_metrics(outcome["result"])
        for name, value in wave_counters.items():
            counters[name] = counters.get(name, 0) + value
        for name, (ms, count) in wave_ms.items():
            old_ms, old_count = stage_ms.get(name, (0, 0))
            stage_ms[name] = (old_ms + ms, old_count + count)
        missing = [t.shard for t in wave if not layout.marker(t.shard).is_file()]
        if missing:
            raise RuntimeError(
                f"the pipeline finished but {len(missing)} shards of its wave have no completion marker "
                f"(first: shard {missing[0]})"
            )
    return RunSummary(count_markers(layout, shards), skipped, time.perf_counter() - started, counters, stage_ms)


def _start_pipeline(job: EmbedJob, todo_path: str, options: PipelineOptions, runner: Any) -> dict[str, Any]:
    """Run one pipeline on a daemon thread; the dict gets ``result`` or ``error`` when it ends."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            pipeline = beam.Pipeline(runner=runner, options=options)
            build_pipeline(pipeline, job, todo_path)
            result = pipeline.run()
            result.wait_until_finish()
            outcome["result"] = result
        except BaseException as exc:  # handed to the driving generator, which re-raises it
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, name="segscope-beam-pipeline", daemon=True)
    outcome["thread"].start()
    return outcome
