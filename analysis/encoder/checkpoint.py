"""Reading and writing SegCLR TensorFlow checkpoints by variable name.

Two layouts exist (``shared/docs/segclr-reference.md`` section 1):

* name-based (TF1 ``Saver``): keys are the TF1 names, ``base_model_0/resnet18/...``;
* object-based (TF2 ``tf.train.Checkpoint``, the published ``*.training_tf2resaved-1``
  files): ``_tf1_style_var_store/_vars/<name>/.ATTRIBUTES/VARIABLE_VALUE`` with ``/``
  inside ``<name>`` escaped as ``.S`` (and ``.`` as ``..``).

Both are read into ``{tf1_name: array}`` and matched against the Keras layers, whose
names are the TF1 scopes (see :mod:`segscope.analysis.encoder.model`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

OBJECT_PREFIX = "_tf1_style_var_store/_vars/"
OBJECT_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"

# Batch-renormalisation state of SegCLR's block BNs: only used while training.
_TRAINING_ONLY_SUFFIXES = ("/renorm_mean", "/renorm_stddev", "/moving_stddev")


class CheckpointMismatchError(ValueError):
    """A checkpoint's variables do not fit the encoder: lists missing and mis-shaped ones."""

    def __init__(self, path: str, missing: list[str], misshaped: list[tuple[str, tuple, tuple]]):
        self.path = path
        self.missing = missing
        self.misshaped = misshaped
        lines = [f"checkpoint {path!r} does not match the encoder:"]
        if missing:
            lines.append(
                f"  {len(missing)} missing variable(s): "
                + ", ".join(missing[:20])
                + (" ..." if len(missing) > 20 else "")
            )
        for name, got, want in misshaped[:20]:
            lines.append(f"  mis-shaped {name}: checkpoint {list(got)}, encoder expects {list(want)}")
        if len(misshaped) > 20:
            lines.append(f"  ... and {len(misshaped) - 20} more mis-shaped variables")
        super().__init__("\n".join(lines))


def _unescape_object_name(name: str) -> str:
    """Undo TensorFlow's object-graph escaping: ``.S`` -> ``/``, ``..`` -> ``.``."""

    def replace(match: re.Match) -> str:
        char = match.group(1)
        if char == "S":
            return "/"
        if char == ".":
            return "."
        raise ValueError(f"unknown escape '.{char}' in checkpoint key {name!r}")

    return re.sub(r"\.(.)", replace, name)


def _escape_object_name(name: str) -> str:
    return name.replace(".", "..").replace("/", ".S")


def resolve_checkpoint_prefix(path: str | os.PathLike) -> str:
    """Turn a checkpoint prefix, its ``.index`` file, or the folder holding it into a prefix.

    A folder is resolved through its ``checkpoint`` state file, else its single ``*.index``.

    Raises
    ------
    FileNotFoundError
        Nothing there, or a folder without (or with several, ambiguous) checkpoints.
    """
    text = os.fspath(path)
    if "://" not in text:
        p = Path(text).expanduser()
        if p.is_dir():
            state = p / "checkpoint"
            if state.is_file():
                match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(), re.M)
                if match:
                    prefix = Path(match.group(1))
                    prefix = prefix if prefix.is_absolute() else p / prefix
                    if Path(f"{prefix}.index").is_file():
                        return str(prefix)
                    # Saved on another machine: the state file may hold a foreign absolute
                    # path; fall back to the folder's own index files.
                    logger.debug("checkpoint state points to missing %s", prefix)
            indexes = sorted(p.glob("*.index"))
            if len(indexes) == 1:
                return str(indexes[0])[: -len(".index")]
            if not indexes:
                raise FileNotFoundError(f"no TensorFlow checkpoint (*.index) in folder {p}")
            raise FileNotFoundError(
                f"folder {p} holds {len(indexes)} checkpoints and no usable 'checkpoint' file; "
                f"pass one prefix: {', '.join(i.name[:-6] for i in indexes)}"
            )
        if text.endswith(".index") and p.is_file():
            return text[: -len(".index")]
        if text.endswith(".data-00000-of-00001") and p.is_file():
            return text[: -len(".data-00000-of-00001")]
        if not Path(f"{text}.index").is_file():
            raise FileNotFoundError(
                f"no TensorFlow checkpoint at {text!r} (expected {text}.index, or a folder holding a checkpoint)"
            )
    return text


class CheckpointContents:
    """The variables of one checkpoint under their TF1 names, read lazily.

    Attributes
    ----------
    prefix : str
        Resolved checkpoint prefix.
    layout : str
        ``"object"`` or ``"name"``.
    shapes : dict[str, tuple]
        TF1 name -> shape.
    """

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self.prefix = resolve_checkpoint_prefix(path)
        try:
            self._reader = tf.train.load_checkpoint(self.prefix)
        except (tf.errors.OpError, ValueError) as exc:
            raise ValueError(f"{self.prefix!r} is not a readable TensorFlow checkpoint: {exc}") from exc
        raw = self._reader.get_variable_to_shape_map()
        self._keys: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        object_keys = [k for k in raw if k.startswith(OBJECT_PREFIX) and k.endswith(OBJECT_SUFFIX)]
        self.layout = "object" if object_keys else "name"
        if object_keys:
            for key in object_keys:
                name = _unescape_object_name(key[len(OBJECT_PREFIX) : -len(OBJECT_SUFFIX)])
                self._keys[name] = key
                self.shapes[name] = tuple(raw[key])
        else:
            for key, shape in raw.items():
                self._keys[key] = key
                self.shapes[key] = tuple(shape)
        logger.debug("checkpoint %s: %s layout, %d variables", self.prefix, self.layout, len(self.shapes))

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def read(self, name: str) -> np.ndarray:
        """The value of TF1 variable ``name``."""
        return np.asarray(self._reader.get_tensor(self._keys[name]))


def match_variables(contents: CheckpointContents, expected: dict[str, tuple]) -> None:
    """Raise :class:`CheckpointMismatchError` unless every expected variable is present with the expected shape."""
    missing = sorted(n for n in expected if n not in contents.shapes)
    misshaped = sorted(
        (n, contents.shapes[n], tuple(shape))
        for n, shape in expected.items()
        if n in contents.shapes and tuple(contents.shapes[n]) != tuple(shape)
    )
    if missing or misshaped:
        raise CheckpointMismatchError(contents.prefix, missing, misshaped)
    unused = [n for n in contents.shapes if n not in expected and not n.endswith(_TRAINING_ONLY_SUFFIXES)]
    if unused:
        logger.debug(
            "checkpoint %s: %d variables not used by the encoder, e.g. %s", contents.prefix, len(unused), unused[:5]
        )


def assign_from_checkpoint(variables: dict, contents: CheckpointContents) -> None:
    """Copy checkpoint values into ``variables`` (TF1 name -> Keras variable), checked first."""
    match_variables(contents, {name: tuple(v.shape) for name, v in variables.items()})
    for name, variable in variables.items():
        variable.assign(contents.read(name).astype(variable.dtype, copy=False))


def write_checkpoint(values: dict[str, np.ndarray], prefix: str | os.PathLike, *, layout: str = "name") -> str:
    """Write ``{tf1_name: array}`` as a TensorFlow checkpoint SegCLR's code can read.

    Parameters
    ----------
    layout
        ``"name"``: TF1 ``Saver`` keys (plus a ``checkpoint`` state file);
        ``"object"``: the ``_tf1_style_var_store`` layout of the published files.

    Returns
    -------
    str
        The checkpoint prefix written.
    """
    import tensorflow as tf

    prefix = os.fspath(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    variables = {name: tf.Variable(np.asarray(value), name=name.replace("/", "_")) for name, value in values.items()}
    if layout == "name":
        saver = tf.compat.v1.train.Saver(var_list=variables)
        return saver.save(None, prefix, write_meta_graph=False)
    if layout == "object":
        store = tf.Module()
        # tf.Module tracks dict entries by key; TensorFlow escapes '/' in keys as '.S'.
        store._vars = dict(variables)
        checkpoint = tf.train.Checkpoint(_tf1_style_var_store=store)
        return checkpoint.write(prefix)
    raise ValueError(f"layout must be 'name' or 'object', got {layout!r}")


def rename_checkpoint(
    src: str | os.PathLike,
    dst_prefix: str | os.PathLike,
    *,
    layout: str = "name",
    drop: Iterable[str] = (),
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> str:
    """Copy a checkpoint into another layout, optionally dropping or altering variables.

    Used to turn the published object-based files into TF1 name-based ones (and by tests
    to make deliberately broken checkpoints).
    """
    contents = CheckpointContents(src)
    dropped = set(drop)
    values = {}
    for name in contents.names():
        if name in dropped or name in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"):
            continue
        value = contents.read(name)
        values[name] = transform(name, value) if transform else value
    return write_checkpoint(values, dst_prefix, layout=layout)
