"""The demo's context embeddings: a precomputed table of every demo segment, if it still fits.

``assets/demo_context.parquet`` holds the node embeddings of the whole default demo dataset
(seed 0), made with the shipped demo encoder and labelled by the shipped classifiers
(``segscope embed --segments all --classifiers``; ``scripts/build_demo_assets.sh``). Its
Parquet metadata key ``segscope_provenance`` records what it was made from (see
:func:`provenance_problems`). The plot shows it as background context when the app opens
the demo, but only when it still describes what the user sees: the same synthetic data
(generator version, seed, volume size) and the same encoder and classifier files (sha256).
Anything else would place context points that mean something different from the user's
own, so :func:`find_demo_context` says no and why.

No Qt, no TensorFlow; pyarrow is imported only to read the Parquet footer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: File name of the asset in ``assets/``.
DEMO_CONTEXT_NAME = "demo_context.parquet"
#: Parquet schema metadata key holding the provenance JSON (``segscope embed`` writes it).
PROVENANCE_KEY = b"segscope_provenance"
#: Keys of ``dataset.json`` that must equal the asset's record for the data to be the same.
DATASET_KEYS = ("name", "generator_version", "seed", "size_vox", "voxel_size_nm")


def _update_from_file(digest, path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):  # 1 MiB at a time, not whole files
            digest.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    _update_from_file(digest, path)
    return digest.hexdigest()


def model_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of an encoder: a ``.keras`` file's bytes, or a TensorFlow checkpoint's files.

    A checkpoint's files are ``PREFIX.*`` in name order, concatenated (``ckpt-1`` never takes
    in ``ckpt-10``'s).

    Raises
    ------
    FileNotFoundError
        When ``path`` is neither a file nor the prefix of any checkpoint file.
    """
    import glob

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = [f for f in sorted(path.parent.glob(glob.escape(path.name) + ".*")) if f.is_file()]
    if not files:
        raise FileNotFoundError(f"no encoder file or checkpoint {path}.* found")
    digest = hashlib.sha256()
    for file in files:
        _update_from_file(digest, file)
    return digest.hexdigest()


def classifier_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of a classifier folder's ``classifiers.json`` and the files it names.

    Raises
    ------
    FileNotFoundError
        No manifest, or a file it names is missing.
    ValueError
        The manifest is not a JSON object.
    """
    folder = Path(folder)
    manifest_path = folder / "classifiers.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} has no classifiers.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{manifest_path} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} is not a JSON object")
    names = {"classifiers.json"}
    names.update(str(entry["file"]) for entry in manifest.values() if isinstance(entry, dict) and "file" in entry)
    hashes = {}
    for name in sorted(names):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{manifest_path} names {name}, which is not in {folder}")
        hashes[name] = file_sha256(folder / name)
    return hashes


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The ``segscope_provenance`` record of an embedding Parquet (reads only its footer).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not Parquet, or has no readable provenance record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding table not found: {path}")
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from exc
    if PROVENANCE_KEY not in metadata:
        raise ValueError(f"{path} has no {PROVENANCE_KEY.decode()} metadata")
    try:
        record = json.loads(metadata[PROVENANCE_KEY])
    except ValueError as exc:
        raise ValueError(f"{path}: its provenance is not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its provenance is not a JSON object")
    return record


def provenance_problems(
    record: dict[str, Any],
    dataset_meta: dict[str, Any],
    *,
    encoder_sha256: str | None,
    classifier_sha256: dict[str, str] | None,
) -> list[str]:
    """Why a context table's provenance ``record`` does not fit the data and models in use.

    Parameters
    ----------
    record
        The table's provenance: ``dataset`` (the :data:`DATASET_KEYS` of the dataset it was
        embedded from), ``model_sha256``, and ``classifiers.files`` (``{name: sha256}``).
    dataset_meta
        The opened dataset's ``dataset.json``.
    encoder_sha256
        sha256 of the encoder in use (:func:`model_sha256`); None: not compared (the
        dataset alone is checked).
    classifier_sha256
        :func:`classifier_hashes` of the classifier folder in use; None when the app runs
        without classifiers (the table's labels are then not compared).

    Returns
    -------
    list of str
        Empty when the table fits; otherwise one short reason per mismatch.
    """
    problems = []
    made_from = record.get("dataset")
    if not isinstance(made_from, dict):
        problems.append("it does not record which dataset it was embedded from")
    else:
        for key in DATASET_KEYS:
            if made_from.get(key) != dataset_meta.get(key):
                problems.append(
                    f"it was made from {key} {made_from.get(key)!r}, this dataset has {dataset_meta.get(key)!r}"
                )
    if encoder_sha256 is not None and record.get("model_sha256") != encoder_sha256:
        problems.append("it was embedded by another encoder (sha256 differs)")
    if classifier_sha256 is not None:
        labelled = (record.get("classifiers") or {}).get("files")
        if labelled is None:
            problems.append("it carries no classifier labels")
        elif labelled != classifier_sha256:
            problems.append("it was labelled by other classifiers (sha256 differs)")
    return problems


@dataclass(frozen=True)
class DemoContext:
    """The answer of :func:`find_demo_context`.

    Attributes
    ----------
    path : pathlib.Path or None
        The context table to show (an ``segscope.analysis.projection.read_embedding_table`` input),
        or None when there is none that fits.
    reason : str
        Why there is none (one line for the status bar); empty when ``path`` is set.
    """

    path: Path | None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.path is not None


_SHIPPED: Any = object()


def find_demo_context(
    dataset_folder: str | os.PathLike,
    *,
    encoder_path: str | os.PathLike | None = _SHIPPED,
    classifiers_folder: str | os.PathLike | None = _SHIPPED,
    context_path: str | os.PathLike | None = None,
) -> DemoContext:
    """The shipped context embeddings if they describe ``dataset_folder`` and the models in use.

    Parameters
    ----------
    dataset_folder
        The SegScope dataset being opened (its ``dataset.json`` is read).
    encoder_path
        The encoder in use (default: the shipped demo encoder). None: no encoder, so no
        context.
    classifiers_folder
        The classifier folder in use (default: the shipped one). None: the app runs
        without classifiers, so the table's labels are not compared.
    context_path
        The table to check (default: ``assets/demo_context.parquet``).

    Returns
    -------
    DemoContext
        ``path`` set when everything matches; otherwise ``path`` None and ``reason`` saying
        what differs (also logged at INFO). Never raises for a missing or unreadable file.
    """
    from segscope.analysis.paths import assets_dir

    context = Path(context_path) if context_path is not None else assets_dir() / DEMO_CONTEXT_NAME

    def no(reason: str) -> DemoContext:
        log.info("no demo context embeddings: %s", reason)
        return DemoContext(None, reason)

    if encoder_path is _SHIPPED or classifiers_folder is _SHIPPED:
        from segscope.analysis.artefacts import find_demo_classifiers, find_demo_model

        if encoder_path is _SHIPPED:
            encoder_path = find_demo_model()
        if classifiers_folder is _SHIPPED:
            classifiers_folder = find_demo_classifiers()
    if encoder_path is None:
        return no("no encoder is loaded")
    meta_path = Path(dataset_folder) / "dataset.json"
    try:
        dataset_meta = json.loads(meta_path.read_text())
        if not isinstance(dataset_meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return no(f"{Path(dataset_folder)} is not a SegScope dataset (no dataset.json)")
    except (OSError, ValueError) as exc:
        return no(f"{meta_path} is not readable: {exc}")
    try:
        record = read_provenance(context)
    except (FileNotFoundError, ValueError) as exc:
        return no(str(exc))
    # Other data: say so before hashing a (possibly large) checkpoint at launch.
    problems = provenance_problems(record, dataset_meta, encoder_sha256=None, classifier_sha256=None)
    if problems:
        return no(f"{context.name} does not fit: " + "; ".join(problems))
    try:
        encoder_hash = model_sha256(encoder_path)
        classifier_hash = None if classifiers_folder is None else classifier_hashes(classifiers_folder)
    except (OSError, ValueError) as exc:
        return no(f"cannot fingerprint the models in use: {exc}")
    problems = provenance_problems(record, dataset_meta, encoder_sha256=encoder_hash, classifier_sha256=classifier_hash)
    if problems:
        return no(f"{context.name} does not fit: " + "; ".join(problems))
    return DemoContext(context)
