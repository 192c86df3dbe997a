"""SegCLR and SegScope artefacts on disk: what they are and where the shipped ones are.

Encoders (a SegScope ``.keras`` file or a SegCLR TensorFlow checkpoint), classifier folders
(``classifiers.json`` and the ``.npz`` files it names), the demo model and classifiers
shipped in ``assets/``, and local folders named by URLs. Everything here reads metadata
only (no Keras, no TensorFlow), so the CLI and the app can check their inputs at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CLASSIFIER_MANIFEST = "classifiers.json"
CLASSIFIER_TASKS = ("compartment", "cell_type")


@dataclass(frozen=True)
class ClassifierInfo:
    """One loaded classifier, as ``classifiers.json`` and the file's metadata describe it.

    Attributes
    ----------
    task : str
        ``"compartment"`` (per node) or ``"cell_type"`` (per segment).
    path : str
        The ``.npz`` file.
    class_names : tuple of str
    radius_nm : float
        Aggregation radius (nm) of the embeddings it takes: 0 for node embeddings,
        10,000 for SegCLR's ``aggregated_10um``.
    ood_threshold : float
        Dempster-Shafer uncertainty above which a prediction is out of distribution.
    num_features : int
        Embedding width ``D`` it takes.
    config : str
        Classifier config name (``"BERT_SMALL_SNGP_v1"``...).
    """

    task: str
    path: str
    class_names: tuple[str, ...]
    radius_nm: float
    ood_threshold: float
    num_features: int
    config: str


@dataclass(frozen=True)
class ClassifierSummary:
    """The classifiers in use (either may be None when the folder holds only one).

    ``encoder`` is the file name and ``encoder_sha256`` the hash
    (:func:`segscope.analysis.provenance.model_sha256`) of the encoder whose embeddings they
    were trained on, when ``classifiers.json`` records them; see
    :func:`classifier_encoder_mismatch`.
    """

    folder: str
    compartment: ClassifierInfo | None = None
    cell_type: ClassifierInfo | None = None
    encoder: str | None = None
    encoder_sha256: str | None = None


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
    except (OSError, ValueError, RecursionError) as exc:
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
        from segscope.analysis import compartment_codes

        compartment_codes(compartment.class_names, f"{compartment.path}: the compartment classifier")
    encoders = {str(manifest[task]["encoder"]) for task in infos if manifest[task].get("encoder")}
    hashes = {str(manifest[task]["encoder_sha256"]) for task in infos if manifest[task].get("encoder_sha256")}
    if len(hashes) > 1:
        raise ValueError(f"{manifest_path}: its classifiers were trained on different encoders ({sorted(hashes)})")
    return ClassifierSummary(
        str(folder),
        compartment,
        infos.get("cell_type"),
        encoder=encoders.pop() if len(encoders) == 1 else None,
        encoder_sha256=hashes.pop() if hashes else None,
    )


def copy_classifier_folder(summary: ClassifierSummary, destination: str | os.PathLike, *, force: bool = False) -> Path:
    """Copy the classifiers ``summary`` describes (manifest and ``.npz`` files) to ``destination``.

    What a user exports after training in the app, for ``segscope embed --classifiers``
    or a colleague's ``segscope open --classifiers``. The copy is all or nothing (a
    temporary sibling renamed into place) and is read back before it counts.

    Raises
    ------
    FileExistsError
        ``destination`` exists and ``force`` is False.
    FileNotFoundError, ValueError
        The source folder changed since it was loaded (a file missing or unreadable).
    """
    import json
    import shutil

    from segscope.analysis.export.atomic import atomic_folder

    source = Path(summary.folder)
    manifest = source / CLASSIFIER_MANIFEST
    files = [manifest] + [Path(info.path) for info in (summary.compartment, summary.cell_type) if info is not None]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is gone: the loaded classifiers cannot be copied")
    entries = json.loads(manifest.read_text())
    with atomic_folder(Path(destination), force=force) as staging:
        for task, info in (("compartment", summary.compartment), ("cell_type", summary.cell_type)):
            if info is not None:
                # The manifest may name a file in a subfolder; the copy keeps them side by side.
                shutil.copy2(info.path, staging / Path(info.path).name)
                entries[task]["file"] = Path(info.path).name
        (staging / CLASSIFIER_MANIFEST).write_text(json.dumps(entries, indent=1))
        read_classifier_folder(staging)
    return Path(destination)


def classifier_encoder_mismatch(summary: ClassifierSummary, encoder_path: str | os.PathLike) -> str | None:
    """Why ``summary``'s classifiers do not fit the encoder at ``encoder_path``, or None when they do.

    Classifiers read embeddings of the encoder they were trained on; another encoder's
    embeddings give plausible-looking but meaningless predictions. The manifest's
    ``encoder_sha256`` is compared with the encoder's hash; a manifest without one cannot
    be checked (None, logged).
    """
    if not summary.encoder_sha256:
        log.info("%s records no encoder_sha256: cannot check which encoder it was trained on", summary.folder)
        return None
    actual = cached_model_sha256(encoder_path)
    if actual == summary.encoder_sha256:
        return None
    trained_on = f"{summary.encoder} " if summary.encoder else ""
    return (
        f"the classifiers in {summary.folder} were trained on encoder {trained_on}(sha256 "
        f"{summary.encoder_sha256[:12]}...), not on {Path(encoder_path).name} (sha256 {actual[:12]}...): "
        "their predictions would be meaningless"
    )


_MODEL_HASHES: dict[tuple[str, float, int], str] = {}


def cached_model_sha256(encoder_path: str | os.PathLike) -> str:
    """:func:`segscope.analysis.provenance.model_sha256`, remembered per path, modification time and size.

    Encoders can be hundreds of MB: the app hashes one on its worker when loading it, so the
    check on the Qt thread (:func:`classifier_encoder_mismatch`) finds the hash ready.
    """
    from segscope.analysis.provenance import model_sha256

    path = str(Path(encoder_path).resolve())
    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime, stat.st_size)
    except OSError:  # a checkpoint prefix, not a file
        key = (path, 0.0, -1)
    if key not in _MODEL_HASHES:
        _MODEL_HASHES[key] = model_sha256(path)
    return _MODEL_HASHES[key]


def find_demo_classifiers() -> Path | None:
    """The shipped classifier folder (``assets/classifiers`` with its manifest), if any."""
    from segscope.analysis.paths import assets_dir

    folder = assets_dir() / "classifiers"
    return folder if (folder / CLASSIFIER_MANIFEST).is_file() else None


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


def local_folder(url: str) -> Path | None:
    """The local folder a path or ``file://`` URL names; None for a remote URL (``gs://``, ``https://``...).

    The URL may carry a ``precomputed://`` prefix.
    """
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


def named_skeleton_folder(segmentation_dir: Path) -> Path | None:
    """The skeleton folder a precomputed segmentation's ``info`` names, if any."""
    import json

    info_path = segmentation_dir / "info"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    name = info.get("skeletons") if isinstance(info, dict) else None
    return segmentation_dir / name if isinstance(name, str) else None
