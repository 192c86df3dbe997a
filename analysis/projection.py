"""2-D projections of SegCLR embeddings for the live plot: PCA at once, UMAP when ready.

Pure compute, no Qt. The plot shows a PCA layout immediately (:func:`fit_pca`, a few
milliseconds), replaces it with UMAP when a background fit (:func:`fit_umap`) finishes,
and places points that arrive later with :meth:`UmapModel.transform` instead of refitting.

Two costs shape this module (design.md, measured on the 2-core machine):

* ``import umap`` runs ``umap/__init__.py``, which imports TensorFlow for its parametric
  variant (7-8 s, and TensorFlow must never load in the GUI process: it crashes beside
  QtWebEngine's software WebGL). Importing ``umap.umap_`` still runs that ``__init__``, so
  :func:`umap_module` hides TensorFlow and Keras from it for the duration of the import.
* numba compiles UMAP's kernels on first use (about 65 s for a fit, 105-121 s for a
  ``transform``) unless its disk cache is warm. :func:`configure_numba_cache` points numba
  at a persistent folder in the user cache before numba is imported, and :func:`warm_up`
  pays the compile cost on a tiny problem, on a background thread at launch
  (:func:`start_warm_up_thread`).

Arrays: embeddings are float ``[N, D]``; layouts are float32 ``[N, 2]`` in arbitrary
projection units (x, y).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segscope.analysis import UNKNOWN_COMPARTMENT
from segscope.analysis.paths import user_cache_dir
from segscope.analysis.progress import Progress, drive

log = logging.getLogger(__name__)

_umap_lock = threading.Lock()
_umap_module = None


# -- numba and the umap import ---------------------------------------------------------------


def configure_numba_cache() -> Path:
    """Give numba a persistent cache folder, ``user_cache_dir()/numba``, and return it.

    Must run before numba is first imported to take effect through the environment; when
    numba is already loaded its config is updated in place as well. A ``NUMBA_CACHE_DIR``
    the user set wins.
    """
    configured = os.environ.get("NUMBA_CACHE_DIR")
    path = Path(configured) if configured else user_cache_dir() / "numba"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    numba_config: Any = sys.modules.get("numba.core.config")  # a module whose attributes we set
    if numba_config is not None and getattr(numba_config, "CACHE_DIR", None) != str(path):
        # numba read its config at import; caching decorators consult CACHE_DIR when they
        # first compile, so updating it here still moves every later cache write.
        numba_config.CACHE_DIR = str(path)
    return path


def umap_module():
    """Import and return ``umap.umap_`` without letting it import TensorFlow.

    ``umap/__init__.py`` tries ``umap.parametric_umap``, which imports TensorFlow and
    Keras; blocking both names for the duration of the import makes that optional part
    fail with the ImportError umap already handles. Names already imported are left alone.
    Thread-safe; the numba cache is configured first.
    """
    global _umap_module
    with _umap_lock:
        if _umap_module is not None:
            return _umap_module
        configure_numba_cache()
        blocked = [name for name in ("tensorflow", "keras") if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
        try:
            started = time.perf_counter()
            _umap_module = importlib.import_module("umap.umap_")
            numba_threadsafe()
            # A few kernels use dynamic globals and cannot be cached; numba says so once per
            # compile, which is expected here and not the user's concern.
            from numba.core.errors import NumbaWarning

            warnings.filterwarnings("ignore", message=".*Cannot cache compiled function", category=NumbaWarning)
            cached = _cache_umap_kernels()
            log.debug("umap kernels now cached on disk: %d", cached)
            log.debug("imported umap.umap_ in %.1f s", time.perf_counter() - started)
        finally:
            for name in blocked:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
        return _umap_module


def _cache_umap_kernels() -> int:
    """Turn on numba's disk cache for umap's and pynndescent's kernels that lack ``cache=True``.

    umap-learn caches only a few of its kernels, so every new process recompiled the fit
    path (about a minute of CPU on this machine) even with a warm cache folder. Kernels
    numba cannot cache (for example ones closing over other jitted functions) only log a
    warning and compile as before. Returns how many dispatchers were switched.
    """
    from numba.core.caching import FunctionCache
    from numba.core.dispatcher import Dispatcher

    switched = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("umap.", "pynndescent.")):
            continue
        for value in list(vars(module).values()):
            if (
                isinstance(value, Dispatcher)
                and not isinstance(value._cache, FunctionCache)
                and getattr(value.py_func, "__module__", None) == name
            ):  # each once, in its own module
                value.enable_caching()
                switched += 1
    return switched


_threadsafe: bool | None = None


def numba_threadsafe() -> bool:
    """True when numba may run parallel kernels from two threads at once.

    numba's fallback ``workqueue`` threading layer aborts the process on concurrent
    launches; its OpenMP and TBB layers are thread-safe. Where one of them loads, the
    threading layer is pinned to ``"threadsafe"`` (unless the user chose one).
    """
    global _threadsafe
    if _threadsafe is None:
        import numba

        chosen = os.environ.get("NUMBA_THREADING_LAYER", "")
        available = False
        for pool in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
            try:
                importlib.import_module(pool)
            except ImportError:
                continue
            available = True
            break
        if available and chosen in ("", "default"):
            numba.config.THREADING_LAYER = "threadsafe"
        _threadsafe = available and chosen not in ("workqueue",)
    return _threadsafe


def numba_cache_is_warm() -> bool:
    """True when the numba cache folder already holds compiled umap kernels."""
    folder = configure_numba_cache()
    return any(folder.glob("pynndescent_*/*.nbi")) and any(
        folder.glob("umap_*/layouts.*optimize_layout_euclidean*.nbi")
    )


# -- PCA ---------------------------------------------------------------------------------------


def _as_embeddings(embeddings: Any, name: str = "embeddings") -> np.ndarray:
    values = np.asarray(embeddings, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return values


# None until probed, then a threadpoolctl.ThreadpoolController, or False without threadpoolctl.
_blas_controller: Any = None
_blas_controller_lock = threading.Lock()


def prepare_blas_control() -> None:
    """Build the BLAS thread controller now, so the first PCA does not pay for it.

    threadpoolctl finds the BLAS libraries by scanning ``/proc/self/maps`` and resolving
    every loaded library: 11-13 ms on a quiet machine with Qt WebEngine loaded, and
    longer while other threads hold the GIL (it stood out in a stack sample of a 125 ms
    Qt-thread gap), which the first PCA would otherwise spend on the Qt thread. The app
    calls this from a background thread at start-up; it is idempotent and thread-safe.
    """
    global _blas_controller
    with _blas_controller_lock:
        if _blas_controller is not None:
            return
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controller = False
            return
        _blas_controller = ThreadpoolController()


def _single_threaded_blas():
    """A context that runs BLAS/LAPACK on one thread (a no-op without threadpoolctl).

    A 64 x 64 eigendecomposition right after a BLAS product took 50-75 ms with OpenBLAS's
    threads on the busy 2-core machine, 1 ms on one thread.
    """
    prepare_blas_control()
    if _blas_controller is False:
        import contextlib

        return contextlib.nullcontext()
    return _blas_controller.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class PcaModel:
    """A fitted 2-D PCA projection.

    Attributes
    ----------
    mean : numpy.ndarray
        float32 ``[D]``, the fitted embeddings' mean.
    components : numpy.ndarray
        float32 ``[2, D]``, unit principal axes, sign fixed so each axis's largest
        loading is positive (the layout is deterministic).
    explained_variance : numpy.ndarray
        float32 ``[2]``.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def transform(self, embeddings: Any) -> np.ndarray:
        """Project float ``[N, D]`` embeddings to a float32 ``[N, 2]`` layout."""
        values = _as_embeddings(embeddings)
        if values.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings are {values.shape[1]}-d, the PCA was fitted on {self.mean.shape[0]}-d")
        # einsum, not matmul: a [N, 64] x [64, 2] BLAS call was 3x slower on the busy
        # 2-core machine (thread start-up for a tiny output).
        offset = self.components @ self.mean
        return (np.einsum("nd,kd->nk", values, self.components) - offset).astype(np.float32)


def fit_pca(embeddings: Any, n_components: int = 2, *, max_fit_rows: int = 5_000) -> PcaModel:
    """Fit a PCA on float ``[N, D]`` embeddings (N >= 1).

    Uses the ``D x D`` covariance's eigenvectors. Above ``max_fit_rows`` points it is
    fitted on a fixed random subset (seeded, so still deterministic): the axes barely
    change, and the fit stays in milliseconds at 100k points on a loaded machine.
    """
    values = _as_embeddings(embeddings)
    if len(values) == 0:
        raise ValueError("cannot fit a PCA on zero embeddings")
    if len(values) > max_fit_rows:
        values = values[np.sort(np.random.default_rng(0).choice(len(values), max_fit_rows, replace=False))]
    if values.shape[1] < n_components:
        raise ValueError(f"{values.shape[1]}-d embeddings have fewer than {n_components} components")
    mean = values.mean(axis=0, dtype=np.float64)
    centred = values - mean.astype(np.float32)
    with _single_threaded_blas():
        covariance = (centred.T @ centred).astype(np.float64) / max(len(values) - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    components = eigenvectors[:, order].T
    signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(axis=1)])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    return PcaModel(
        mean=mean.astype(np.float32),
        components=components.astype(np.float32),
        explained_variance=np.maximum(eigenvalues[order], 0).astype(np.float32),
    )


# -- UMAP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UmapSettings:
    """Parameters of a UMAP fit.

    ``n_epochs`` None lets umap choose (200 above 10k points, 500 below);
    ``approximate`` forces NNDescent neighbours even for small data (what makes
    ``transform`` fast); ``seed`` None runs in parallel but not reproducibly.
    """

    n_neighbors: int = 15
    min_dist: float = 0.1
    n_epochs: int | None = None
    seed: int | None = 0
    approximate: bool = True


@dataclass
class UmapModel:
    """A fitted UMAP: its layout of the fitted points and a ``transform`` for new ones.

    Attributes
    ----------
    layout : numpy.ndarray
        float32 ``[N, 2]``, the fitted points in fit order.
    fit_seconds : float
        Wall time of the fit.
    """

    reducer: Any = field(repr=False)
    layout: np.ndarray
    fit_seconds: float
    settings: UmapSettings

    @property
    def n_points(self) -> int:
        return len(self.layout)

    @property
    def dim(self) -> int:
        return int(self.reducer._raw_data.shape[1])

    def transform(self, embeddings: Any) -> np.ndarray:
        """Place float ``[M, D]`` new embeddings in this layout; float32 ``[M, 2]``.

        Does not refit: the existing points stay where they are.
        """
        values = _as_embeddings(embeddings)
        if values.shape[1] != self.dim:
            raise ValueError(f"embeddings are {values.shape[1]}-d, the UMAP was fitted on {self.dim}-d")
        if len(values) == 0:
            return np.zeros((0, 2), np.float32)
        return np.asarray(self.reducer.transform(values), dtype=np.float32)


def fit_umap(
    embeddings: Any,
    settings: UmapSettings = UmapSettings(),
    *,
    init: np.ndarray | None = None,
    prepare_transform: bool = True,
) -> Generator[Progress, None, UmapModel]:
    """Fit UMAP on float ``[N, D]`` embeddings; a generator (a report per stage).

    Parameters
    ----------
    init : numpy.ndarray, optional
        float ``[N, 2]`` starting layout (for a refit: the current positions), which keeps
        the new layout close to the old one so the plot can animate between them.
    prepare_transform : bool
        Also prepare the model for ``transform`` now, so the first placement of new
        points is as fast as the later ones (``fit_seconds`` excludes this).

    Raises
    ------
    ValueError
        For fewer points than ``n_neighbors + 1``, bad shapes or non-finite values.
    """
    values = _as_embeddings(embeddings)
    if len(values) <= settings.n_neighbors:
        raise ValueError(f"UMAP needs more than n_neighbors={settings.n_neighbors} points, got {len(values)}")
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != (len(values), 2) or not np.isfinite(init).all():
            raise ValueError(f"init must be a finite [{len(values)}, 2] layout, got {init.shape}")
    yield Progress(0, 3, "steps", "loading UMAP")
    umap_ = umap_module()
    reducer = umap_.UMAP(
        n_neighbors=settings.n_neighbors,
        min_dist=settings.min_dist,
        n_epochs=settings.n_epochs,
        random_state=settings.seed,
        force_approximation_algorithm=settings.approximate,
        init="spectral" if init is None else init,
        n_jobs=1 if settings.seed is not None else -1,
    )
    yield Progress(1, 3, "steps", f"fitting UMAP on {len(values)} points")
    started = time.perf_counter()
    layout = np.asarray(reducer.fit_transform(values), dtype=np.float32)
    seconds = time.perf_counter() - started
    if prepare_transform:
        # The first transform prepares the neighbour index for queries (about 1.5 s at
        # 100k points): pay it here, in the background, not when new points arrive.
        yield Progress(2, 3, "steps", "preparing UMAP transform")
        reducer.transform(values[:1])
    log.info("UMAP fit of %d points in %.1f s", len(values), seconds)
    yield Progress(3, 3, "steps", f"UMAP fitted in {seconds:.1f} s")
    return UmapModel(reducer=reducer, layout=layout, fit_seconds=seconds, settings=settings)


@dataclass(frozen=True)
class Similarity:
    """A 2-D similarity transform (rotation or reflection, uniform scale, shift).

    ``apply(points) = (points - source_mean) @ rotation * scale + target_mean`` on float
    ``[N, 2]`` points.
    """

    rotation: np.ndarray
    scale: float
    source_mean: np.ndarray
    target_mean: np.ndarray

    @classmethod
    def identity(cls) -> Similarity:
        return cls(np.eye(2), 1.0, np.zeros(2), np.zeros(2))

    @classmethod
    def fit(cls, layout: np.ndarray, reference: np.ndarray) -> Similarity:
        """The similarity that best maps ``layout`` onto ``reference`` (Procrustes).

        Both are float ``[N, 2]`` with rows in the same order.
        """
        source = np.asarray(layout, dtype=np.float64)
        target = np.asarray(reference, dtype=np.float64)
        if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2:
            raise ValueError(f"layouts must both be [N, 2], got {source.shape} and {target.shape}")
        if len(source) < 3:
            return cls.identity()
        source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
        a, b = source - source_mean, target - target_mean
        u, singular, vt = np.linalg.svd(a.T @ b)
        norm = (a**2).sum()
        return cls(u @ vt, float(singular.sum() / norm) if norm > 0 else 1.0, source_mean, target_mean)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """float32 ``[N, 2]``."""
        points = np.asarray(points, dtype=np.float64)
        return (((points - self.source_mean) @ self.rotation) * self.scale + self.target_mean).astype(np.float32)


def align_layout(layout: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate, reflect, scale and shift ``layout`` to best match ``reference`` (Procrustes).

    Both are float ``[N, 2]`` with rows in the same order. UMAP layouts are only defined
    up to such a similarity, so aligning a refit to the current picture keeps the
    animation between them to real changes. Points placed later by the model's
    ``transform`` need the same mapping: use :meth:`Similarity.fit` and keep it.
    Returns float32 ``[N, 2]``.
    """
    return Similarity.fit(layout, reference).apply(layout)


# -- warm-up -----------------------------------------------------------------------------------


def warm_up(
    n_points: int = 300, dim: int = 16, settings: UmapSettings = UmapSettings(seed=None), data_seed: int = 0
) -> dict[str, float]:
    """Compile UMAP's numba kernels (fit and transform) on a tiny problem.

    Pass the ``settings`` the real fits will use: umap compiles separate parallel and
    serial kernels, and a seed makes it serial (and pins numba to one thread for the
    whole process). Only ``n_epochs`` is overridden (20). With a warm disk cache this
    takes seconds to tens of seconds (a few pynndescent kernels can never be cached);
    cold, one to four minutes on 2 cores. Returns seconds spent importing, fitting and
    transforming, and whether the cache was warm beforehand (1.0 or 0.0).
    """
    was_warm = numba_cache_is_warm()
    started = time.perf_counter()
    umap_module()
    imported = time.perf_counter()
    rng = np.random.default_rng(data_seed)
    centres = rng.normal(0, 4, size=(3, dim))
    data = (centres[rng.integers(0, 3, n_points)] + rng.normal(size=(n_points, dim))).astype(np.float32)
    model = drive(fit_umap(data[: n_points - 20], replace(settings, n_epochs=20)))
    fitted = time.perf_counter()
    model.transform(data[n_points - 20 :])
    done = time.perf_counter()
    timings = {
        "import_s": imported - started,
        "fit_s": fitted - imported,
        "transform_s": done - fitted,
        "cache_was_warm": float(was_warm),
    }
    log.info("UMAP warm-up: %s", timings)
    return timings


def start_warm_up_thread(on_done: Callable[[dict[str, float] | BaseException], None] | None = None) -> threading.Thread:
    """Run :func:`warm_up` on a daemon thread (at app launch) and return the thread.

    ``on_done`` receives the timings, or the exception if the warm-up failed; it runs on
    the warm-up thread.
    """

    def run() -> None:
        try:
            result: dict[str, float] | BaseException = warm_up()
        except Exception as exc:  # a failed warm-up only means the first fit compiles
            log.warning("UMAP warm-up failed: %s", exc)
            result = exc
        if on_done is not None:
            on_done(result)

    thread = threading.Thread(target=run, name="segscope-umap-warm-up", daemon=True)
    thread.start()
    return thread


# -- precomputed embeddings as context ---------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingTable:
    """Node embeddings read from a table, for the plot's background context.

    Attributes
    ----------
    segment_ids : numpy.ndarray
        uint64 ``[N]``.
    node_ids : numpy.ndarray
        int64 ``[N]``.
    xyz_nm : numpy.ndarray
        float64 ``[N, 3]`` xyz nm.
    embeddings : numpy.ndarray
        float32 ``[N, D]``.
    compartments : numpy.ndarray or None
        uint8 ``[N]`` predicted subcompartment of each node, indexing
        ``analysis.COMPARTMENTS``; 255 where unknown. None when the table has no
        ``compartment`` column.
    cell_types : numpy.ndarray or None
        object ``[N]`` str: the predicted cell type of each node's segment, ``""`` where
        unknown. None without a ``cell_type`` column.
    ood_scores : numpy.ndarray or None
        float32 ``[N]``: each node's segment's out-of-distribution score (mean
        Dempster-Shafer uncertainty), NaN where unknown. None without an ``ood_score``
        column.
    """

    segment_ids: np.ndarray
    node_ids: np.ndarray
    xyz_nm: np.ndarray
    embeddings: np.ndarray
    compartments: np.ndarray | None = None
    cell_types: np.ndarray | None = None
    ood_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.segment_ids)


def _strings(column) -> np.ndarray:
    """An object ``[N]`` array of the str of a (possibly dictionary-encoded) string column, nulls as ``""``."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    return np.asarray(column.fill_null("").to_pylist(), dtype=object)


def read_embedding_table(path: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0) -> EmbeddingTable:
    """Read a Parquet written by ``segscope embed`` (segment_id, node_id, x_nm, y_nm, z_nm, e0..).

    Prediction columns (``segscope embed --classifiers``) fill the optional fields when
    present: ``compartment`` (name; unknown or null names become 255),
    ``cell_type`` (name; null becomes ``""``) and ``ood_score`` (NaN stays unknown).
    Files without them still read, with those fields None.

    ``max_rows`` keeps a random subset of that many rows (seeded), for plots that should
    stay light.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    KeyError
        When a required column is missing (the message names it and the file).
    ValueError
        When ``path`` is not a readable Parquet file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segscope.analysis import COMPARTMENTS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding table not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from exc
    names = table.column_names
    missing = [name for name in ("segment_id", "node_id", "x_nm", "y_nm", "z_nm", "e0") if name not in names]
    if missing:
        raise KeyError(f"{path} lacks columns {missing} (expected segscope embed's Parquet)")
    dims = sorted(int(name[1:]) for name in names if name[:1] == "e" and name[1:].isdigit())
    if dims != list(range(len(dims))):
        raise KeyError(f"{path}: embedding columns are not e0..e{len(dims) - 1}")
    rows = np.arange(table.num_rows)
    if max_rows is not None and table.num_rows > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, max_rows, replace=False))
        table = table.take(rows)
    embeddings = np.stack([table.column(f"e{d}").to_numpy() for d in dims], axis=1).astype(np.float32)
    xyz = np.stack([table.column(f"{axis}_nm").to_numpy() for axis in "xyz"], axis=1).astype(np.float64)
    compartments = cell_types = ood_scores = None
    if "compartment" in names:
        code_of = {name: code for code, name in enumerate(COMPARTMENTS)}
        compartments = np.fromiter(
            (code_of.get(name, UNKNOWN_COMPARTMENT) for name in _strings(table.column("compartment"))),
            dtype=np.uint8,
            count=table.num_rows,
        )
    if "cell_type" in names:
        cell_types = _strings(table.column("cell_type"))
    if "ood_score" in names:
        ood_scores = table.column("ood_score").cast(pa.float32()).fill_null(np.nan).to_numpy().astype(np.float32)
    return EmbeddingTable(
        segment_ids=table.column("segment_id").to_numpy().astype(np.uint64),
        node_ids=table.column("node_id").to_numpy().astype(np.int64),
        xyz_nm=xyz,
        embeddings=embeddings,
        compartments=compartments,
        cell_types=cell_types,
        ood_scores=ood_scores,
    )
