"""Whole-volume SegCLR embedding as an Apache Beam batch pipeline (``segscope pipeline embed``).

The pipeline runs the in-process code (:mod:`segscope.analysis.inference`,
:mod:`segscope.analysis.volume`, :mod:`segscope.analysis.centres`,
:mod:`segscope.analysis.classify.segments`, :mod:`segscope.analysis.csvzip`,
:mod:`segscope.analysis.aggregate`) as Beam stages, so the local runner on a laptop and
Flink, Spark or Dataflow on a cluster compute the same numbers as ``segscope embed``:

    list segments (driver) -> group by SegCLR shard, drop finished shards
    -> centres (skeleton: given, cached or kimimaro) -> masked cutouts (TensorStore, one
    read shared by nearby centres) -> RunInference (encoder loaded once per worker process,
    batches across segments) -> group by shard -> optional classifiers -> write the shard:
    CSV ZIP (SegCLR layout) and/or Parquet, optional radius-aggregated CSV ZIP stores, then
    the shard's completion marker.

Modules
-------
* :mod:`.job`: the job description (:class:`~.job.EmbedJob`), the output folder's
  layout, the run manifest and per-shard completion markers, shard planning.
* :mod:`.stages`: the per-element compute each stage runs (no Beam import; testable alone).
* :mod:`.beam`: the Beam graph and the runner options (imports ``apache_beam``: the
  ``beam`` extra, ``pip install -e '.[beam]'``).
"""
