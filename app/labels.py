"""Manual labels of nodes and segments, with undo and redo, no Qt.

Users label what they select: plot points (skeleton nodes, keyed by segment id and node
id) or whole segments (keyed by segment id). The labels colour the plot and the 3-D view
and go into exports as training data for a later retrain, so every change is one
undoable command and nothing is ever silently dropped.

A node's *effective* label is its own label, else its segment's label, else ``""``.

Keys
----
Segment ids are nonzero uint64 (Neuroglancer's segment ids); node ids are int64 skeleton
(or embedding store) node ids, unique within their segment. Labels are non-empty strings
of at most :data:`MAX_LABEL_LENGTH` characters without control characters; surrounding
whitespace is stripped. ``None`` or ``""`` as a label removes labels.

Events
------
:meth:`LabelStore.subscribe` callbacks receive one :class:`LabelChange` after each
assignment, undo, redo and reset that changed something. A change of a segment's own
label changes the effective label of every node of that segment: views should redraw all
of ``LabelChange.affected_segment_ids``.

Persistence
-----------
:meth:`LabelStore.to_dict` / :meth:`LabelStore.from_dict` hold the labels only (JSON-safe,
ids as ints); the undo history is not saved.

Like :class:`segscope.app.state.SessionState`, a store is not thread-safe: mutate it from one
thread.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psygnal import Signal, SignalGroup

from segscope.app.events import connect

log = logging.getLogger(__name__)

#: Longest label accepted (characters).
MAX_LABEL_LENGTH = 64
#: Version of the :meth:`LabelStore.to_dict` layout.
FORMAT_VERSION = 1
#: Commands kept for undo; the oldest are forgotten beyond this.
DEFAULT_UNDO_LIMIT = 500

_NONE = -1  # label code of "no label"
# Unicode categories refused in labels: control characters and line/paragraph separators
# would break CSV rows, legends and menus.
_REFUSED_CATEGORIES = {"Cc", "Zl", "Zp"}


def validate_label(label: str | None) -> str:
    """``label`` stripped of surrounding whitespace; ``""`` for None or ``""`` (no label).

    Raises
    ------
    ValueError
        For a non-string, a label of only whitespace, one longer than
        :data:`MAX_LABEL_LENGTH` characters, or one holding control characters.
    """
    if label is None:
        return ""
    if not isinstance(label, str):
        raise ValueError(f"a label must be a string, got {type(label).__name__} {label!r}")
    if label == "":
        return ""
    text = label.strip()
    if not text:
        raise ValueError(f"label {label!r} is only whitespace; use None or '' to remove labels")
    if len(text) > MAX_LABEL_LENGTH:
        raise ValueError(f"label {text[:20]!r}... has {len(text)} characters; at most {MAX_LABEL_LENGTH} allowed")
    bad = sorted({c for c in text if unicodedata.category(c) in _REFUSED_CATEGORIES})
    if bad:
        raise ValueError(f"label {text!r} holds control characters {bad}")
    return text


def _id_array(values: Any, name: str, what: str) -> np.ndarray:
    """``values`` as a 1-D integer array (a scalar becomes ``[1]``), unchecked in range."""
    array = np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer {what}, got dtype {array.dtype}")
    return array


def _segment_ids(values: Any, name: str = "segment_ids") -> np.ndarray:
    """``values`` as a 1-D uint64 array of nonzero segment ids (a scalar becomes ``[1]``)."""
    array = _id_array(values, name, "segment ids")
    if array.size == 0:
        return np.zeros(0, dtype=np.uint64)
    # Compare as Python ints: numpy compares mixed uint64/int64 through float64.
    # (uint64 arrays cannot hold 2**64 or more; larger Python ints arrive as dtype object.)
    if int(array.min()) <= 0:
        bad = array[array <= 0][:5]
        raise ValueError(f"{name} must be nonzero uint64 segment ids, got {bad.tolist()}")
    return array.astype(np.uint64)


def _node_ids(values: Any, name: str = "node_ids") -> np.ndarray:
    """``values`` as a 1-D int64 array (a scalar becomes ``[1]``)."""
    array = _id_array(values, name, "node ids")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit int64, got {int(array.max())}")
    return array.astype(np.int64)


def _keys(segment_ids: Any, node_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Segment and node ids of ``N`` nodes; a single segment id applies to every node."""
    nodes = _node_ids(node_ids)
    segments = _segment_ids(segment_ids)
    if len(segments) == 1 and len(nodes) != 1:
        segments = np.full(len(nodes), segments[0], dtype=np.uint64)
    if len(segments) != len(nodes):
        raise ValueError(f"{len(segments)} segment ids for {len(nodes)} node ids")
    return segments, nodes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True, eq=False)
class LabelChange:
    """What one assignment, undo, redo or reset changed.

    Attributes
    ----------
    action : str
        ``"assign"``, ``"undo"``, ``"redo"``, ``"reset"`` or ``"load"`` (a whole new set).
    text : str
        The command's description (``'label 12 nodes "axon"'``).
    segment_ids : tuple of int
        Segments whose own label changed.
    node_segment_ids : numpy.ndarray
        uint64 ``[n]`` segment ids of the nodes whose own label changed.
    node_ids : numpy.ndarray
        int64 ``[n]`` their node ids.
    """

    action: str
    text: str
    segment_ids: tuple[int, ...] = ()
    node_segment_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    node_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def affected_segment_ids(self) -> frozenset[int]:
        """Segments in which some node's effective label may have changed."""
        return frozenset(self.segment_ids) | frozenset(int(s) for s in np.unique(self.node_segment_ids))


@dataclass(eq=False)
class _Command:
    """One undoable change: ``keys`` went from ``old`` label codes to the ``new`` code.

    For node commands ``segments``/``nodes`` are parallel key arrays; for segment
    commands ``nodes`` is None.
    """

    text: str
    segments: np.ndarray
    nodes: np.ndarray | None
    old: np.ndarray
    new: int


class LabelEvents(SignalGroup):
    """Events of :class:`LabelStore`."""

    #: (LabelChange) after every edit, undo, redo, load or reset.
    changed = Signal(object)


class LabelStore:
    """Manual labels of nodes and segments with an undo/redo history.

    Parameters
    ----------
    undo_limit : int
        Most commands kept for undo.
    """

    def __init__(self, undo_limit: int = DEFAULT_UNDO_LIMIT) -> None:
        if undo_limit < 1:
            raise ValueError(f"undo_limit must be at least 1, got {undo_limit}")
        self._undo_limit = int(undo_limit)
        # Labels are stored as codes into ``_vocab`` (append-only, so first-use order).
        self._vocab: list[str] = []
        self._code: dict[str, int] = {}
        self._nodes: dict[int, dict[int, int]] = {}  # segment id -> node id -> code
        self._segments: dict[int, int] = {}  # segment id -> code
        # Per segment, node ids sorted with their codes, for vectorised lookups; rebuilt
        # lazily for segments whose labels changed.
        self._sorted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._undo: list[_Command] = []
        self._redo: list[_Command] = []
        self.events = LabelEvents()

    # -- events ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[LabelChange], Any]) -> Callable[[], None]:
        """Call ``callback(change)`` after every change; returns a function that unsubscribes."""
        return connect(self.events.changed, callback)

    def _emit(self, change: LabelChange) -> None:
        self.events.changed.emit(change)

    # -- codes -------------------------------------------------------------------------

    def _code_of(self, label: str) -> int:
        if not label:
            return _NONE
        code = self._code.get(label)
        if code is None:
            code = self._code[label] = len(self._vocab)
            self._vocab.append(label)
        return code

    def _lookup(self, label: str) -> int:
        """Code of ``label`` without registering it (-2 for a label never used: matches nothing)."""
        return _NONE if not label else self._code.get(label, -2)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        """Label strings of ``codes`` (object array, ``""`` for no label)."""
        table = np.array([*self._vocab, ""], dtype=object)  # code -1 picks the last entry
        return table[codes]

    # -- assigning ---------------------------------------------------------------------

    def assign_nodes(self, label: str | None, segment_ids: Any, node_ids: Any) -> bool:
        """Label nodes (``None`` or ``""``: remove their labels) as one undoable command.

        Parameters
        ----------
        label : str or None
        segment_ids : int or array of int
            uint64 ``[N]`` segment id of each node, or one id for all of them.
        node_ids : array of int
            int64 ``[N]`` node ids. Repeated (segment, node) pairs count once.

        Returns
        -------
        bool
            False (and nothing recorded) when no node's label changes.

        Raises
        ------
        ValueError
            For an invalid label, invalid ids, or lengths that do not match.
        """
        text = validate_label(label)
        segments, nodes = _keys(segment_ids, node_ids)
        if not len(nodes):
            return False
        segments, nodes = _unique_pairs(segments, nodes)
        old = self._node_codes(segments, nodes)
        changed = old != self._lookup(text)
        if not changed.any():
            return False
        new = self._code_of(text)  # only now: a no-op must not fix a label's first-use order
        n = int(changed.sum())
        description = f'label {_plural(n, "node")} "{text}"' if text else f"remove labels of {_plural(n, 'node')}"
        command = _Command(description, segments[changed], nodes[changed], old[changed], new)
        self._push(command)
        self._apply(command, undo=False)
        self._emit(self._change("assign", command))
        return True

    def assign_segments(self, label: str | None, segment_ids: Any) -> bool:
        """Label whole segments (``None`` or ``""``: remove their labels) as one undoable command.

        Node labels are kept: a node's own label takes precedence over its segment's.

        Returns
        -------
        bool
            False (and nothing recorded) when no segment's label changes.

        Raises
        ------
        ValueError
            For an invalid label or invalid segment ids.
        """
        text = validate_label(label)
        segments = np.unique(_segment_ids(segment_ids))
        if not len(segments):
            return False
        old = np.array([self._segments.get(s, _NONE) for s in segments.tolist()], dtype=np.int64)
        changed = old != self._lookup(text)
        if not changed.any():
            return False
        new = self._code_of(text)
        segments, old = segments[changed], old[changed]
        if len(segments) == 1:
            what = f"segment {int(segments[0])}"
            description = f'label {what} "{text}"' if text else f"remove label of {what}"
        else:
            what = f"{len(segments)} segments"
            description = f'label {what} "{text}"' if text else f"remove labels of {what}"
        command = _Command(description, segments, None, old, new)
        self._push(command)
        self._apply(command, undo=False)
        self._emit(self._change("assign", command))
        return True

    def _push(self, command: _Command) -> None:
        self._undo.append(command)
        del self._undo[: -self._undo_limit]
        self._redo.clear()  # a new command forks history: the undone branch is gone

    def _apply(self, command: _Command, *, undo: bool) -> None:
        codes = command.old if undo else np.full(len(command.segments), command.new, dtype=np.int64)
        if command.nodes is None:
            for segment, code in zip(command.segments.tolist(), codes.tolist()):
                if code == _NONE:
                    self._segments.pop(segment, None)
                else:
                    self._segments[segment] = code
            return
        for segment, node, code in zip(command.segments.tolist(), command.nodes.tolist(), codes.tolist()):
            labels = self._nodes.get(segment)
            if code == _NONE:
                if labels is not None:
                    labels.pop(node, None)
                    if not labels:
                        del self._nodes[segment]
            else:
                if labels is None:
                    labels = self._nodes[segment] = {}
                labels[node] = code
        for segment in np.unique(command.segments).tolist():
            self._sorted.pop(segment, None)

    def _change(self, action: str, command: _Command) -> LabelChange:
        if command.nodes is None:
            return LabelChange(action, command.text, segment_ids=tuple(command.segments.tolist()))
        return LabelChange(
            action, command.text, node_segment_ids=command.segments.copy(), node_ids=command.nodes.copy()
        )

    # -- undo and redo -----------------------------------------------------------------

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def undo_text(self) -> str:
        """Description of the command :meth:`undo` would revert (``""`` when none)."""
        return self._undo[-1].text if self._undo else ""

    @property
    def redo_text(self) -> str:
        """Description of the command :meth:`redo` would repeat (``""`` when none)."""
        return self._redo[-1].text if self._redo else ""

    def undo(self) -> bool:
        """Revert the last command; False when there is none."""
        if not self._undo:
            return False
        command = self._undo.pop()
        self._apply(command, undo=True)
        self._redo.append(command)
        self._emit(self._change("undo", command))
        return True

    def redo(self) -> bool:
        """Repeat the last undone command; False when there is none."""
        if not self._redo:
            return False
        command = self._redo.pop()
        self._apply(command, undo=False)
        self._undo.append(command)
        self._emit(self._change("redo", command))
        return True

    def _everything(self, action: str, text: str, also: LabelChange | None = None) -> LabelChange:
        """A change naming every labelled segment and node (plus ``also``'s)."""
        segments = tuple(self._segments) + (also.segment_ids if also else ())
        node_segments = [s for s, d in self._nodes.items() for _ in d]
        nodes = [n for d in self._nodes.values() for n in d]
        return LabelChange(
            action,
            text,
            segment_ids=tuple(dict.fromkeys(segments)),
            node_segment_ids=np.concatenate(
                [np.array(node_segments, dtype=np.uint64), also.node_segment_ids if also else np.zeros(0, np.uint64)]
            ),
            node_ids=np.concatenate(
                [np.array(nodes, dtype=np.int64), also.node_ids if also else np.zeros(0, np.int64)]
            ),
        )

    def _replace_all(self, vocab: list[str], code: dict[str, int], nodes: dict, segments: dict) -> None:
        self._vocab, self._code, self._nodes, self._segments = vocab, code, nodes, segments
        self._sorted.clear()
        self._undo.clear()
        self._redo.clear()

    def reset(self) -> None:
        """Drop every label and the undo history (a new dataset was opened); not undoable."""
        had = self._everything("reset", "remove all labels")
        self._replace_all([], {}, {}, {})
        if had.segment_ids or len(had.node_ids):
            self._emit(had)

    # -- queries -----------------------------------------------------------------------

    def _sorted_nodes(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._sorted.get(segment)
        if cached is None:
            labels = self._nodes.get(segment, {})
            ids = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
            codes = np.fromiter(labels.values(), dtype=np.int64, count=len(labels))
            order = np.argsort(ids)
            cached = self._sorted[segment] = (ids[order], codes[order])
        return cached

    def _node_codes(self, segments: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Own label codes (int64 ``[N]``, -1 = none) of validated keys."""
        codes = np.full(len(nodes), _NONE, dtype=np.int64)
        if not self._nodes or not len(nodes):
            return codes
        unique, inverse = np.unique(segments, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
        for k, segment in enumerate(unique.tolist()):
            if segment not in self._nodes:
                continue
            rows = order[bounds[k] : bounds[k + 1]]
            ids, labels = self._sorted_nodes(segment)
            position = np.minimum(np.searchsorted(ids, nodes[rows]), len(ids) - 1)
            hit = ids[position] == nodes[rows]
            codes[rows[hit]] = labels[position[hit]]
        return codes

    def node_labels(self, segment_ids: Any, node_ids: Any) -> np.ndarray:
        """Own labels of ``N`` nodes: object ``[N]`` of str, ``""`` = none.

        ``segment_ids`` is uint64 ``[N]`` or one id for all; ``node_ids`` int64 ``[N]``.
        Vectorised per distinct segment (100k nodes take milliseconds).
        """
        segments, nodes = _keys(segment_ids, node_ids)
        return self._decode(self._node_codes(segments, nodes))

    def segment_label(self, segment_id: int) -> str:
        """The segment's own label (``""`` = none)."""
        segment = int(_segment_ids(segment_id, "segment_id")[0])
        code = self._segments.get(segment, _NONE)
        return "" if code == _NONE else self._vocab[code]

    def effective_node_labels(self, segment_ids: Any, node_ids: Any) -> np.ndarray:
        """Each node's own label, else its segment's label, else ``""`` (object ``[N]``)."""
        segments, nodes = _keys(segment_ids, node_ids)
        codes = self._node_codes(segments, nodes)
        missing = codes == _NONE
        if missing.any() and self._segments:
            unique, inverse = np.unique(segments[missing], return_inverse=True)
            inherited = np.array([self._segments.get(s, _NONE) for s in unique.tolist()], dtype=np.int64)
            codes[missing] = inherited[inverse]
        return self._decode(codes)

    def segment_node_labels(self, segment_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Node ids (int64, ascending) of one segment's labelled nodes and their labels (object)."""
        segment = int(_segment_ids(segment_id, "segment_id")[0])
        ids, codes = self._sorted_nodes(segment)
        return ids.copy(), self._decode(codes)

    def labels(self) -> list[str]:
        """Labels in use (by a node or a segment), in the order they were first used."""
        used = set(self._segments.values())
        for labels in self._nodes.values():
            used.update(labels.values())
        return [label for code, label in enumerate(self._vocab) if code in used]

    @property
    def n_labelled_nodes(self) -> int:
        """Nodes with a label of their own (not counting those labelled through their segment)."""
        return sum(len(labels) for labels in self._nodes.values())

    @property
    def n_labelled_segments(self) -> int:
        """Segments with a label of their own."""
        return len(self._segments)

    @property
    def labelled_segment_ids(self) -> list[int]:
        """Segments with a segment label or at least one labelled node, ascending."""
        return sorted(set(self._segments) | set(self._nodes))

    # -- persistence -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The labels as JSON-safe data (ids as ints); the undo history is not included.

        Layout: ``{"version": 1, "labels": [...first-use order...], "segments":
        [[segment_id, label], ...], "nodes": [[segment_id, node_id, label], ...]}``,
        segments and nodes in ascending id order.
        """
        segments = [[segment, self._vocab[code]] for segment, code in sorted(self._segments.items())]
        nodes = [
            [segment, node, self._vocab[code]]
            for segment in sorted(self._nodes)
            for node, code in sorted(self._nodes[segment].items())
        ]
        return {"version": FORMAT_VERSION, "labels": self.labels(), "segments": segments, "nodes": nodes}

    @classmethod
    def from_dict(cls, data: Any, undo_limit: int = DEFAULT_UNDO_LIMIT) -> LabelStore:
        """A store holding the labels of :meth:`to_dict`'s output, with an empty history.

        Raises
        ------
        ValueError
            For anything that is not that layout, naming the bad entry (``nodes[3]``...):
            an unknown version, a bad id or label, or a key given twice.
        """
        if not isinstance(data, dict):
            raise ValueError(f"labels must be a JSON object, got {type(data).__name__}")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"labels format version {version!r} is not supported (expected {FORMAT_VERSION})")
        unknown = sorted(set(data) - {"version", "labels", "segments", "nodes"})
        if unknown:
            raise ValueError(f"labels have unknown keys {unknown}")
        store = cls(undo_limit=undo_limit)
        order = _entries(data, "labels")
        for i, label in enumerate(order):
            store._code_of(_entry_label(label, f"labels[{i}]"))
        for i, entry in enumerate(_entries(data, "segments")):
            where = f"segments[{i}]"
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"{where} must be [segment_id, label], got {entry!r}")
            segment = _entry_id(entry[0], where, segment=True)
            if segment in store._segments:
                raise ValueError(f"{where}: segment {segment} is labelled twice")
            store._segments[segment] = store._code_of(_entry_label(entry[1], where))
        for i, entry in enumerate(_entries(data, "nodes")):
            where = f"nodes[{i}]"
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"{where} must be [segment_id, node_id, label], got {entry!r}")
            segment = _entry_id(entry[0], where, segment=True)
            node = _entry_id(entry[1], where, segment=False)
            labels = store._nodes.setdefault(segment, {})
            if node in labels:
                raise ValueError(f"{where}: node {node} of segment {segment} is labelled twice")
            labels[node] = store._code_of(_entry_label(entry[2], where))
        return store

    def load_dict(self, data: Any) -> None:
        """Replace every label with those of :meth:`to_dict`'s output, in place.

        For a saved session reopening into this window; the undo history is dropped.

        Subscribers hear one ``"load"`` change naming the old and the new labels' keys.

        Raises
        ------
        ValueError
            As :meth:`from_dict`; the store is left unchanged then.
        """
        loaded = LabelStore.from_dict(data, undo_limit=self._undo_limit)
        old = self._everything("reset", "")
        self._replace_all(loaded._vocab, loaded._code, loaded._nodes, loaded._segments)
        change = self._everything("load", "load labels", also=old)
        if change.segment_ids or len(change.node_ids):
            self._emit(change)


def _unique_pairs(segments: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (segment, node) pairs, sorted by segment then node."""
    order = np.lexsort((nodes, segments))
    segments, nodes = segments[order], nodes[order]
    keep = np.ones(len(nodes), dtype=bool)
    keep[1:] = (segments[1:] != segments[:-1]) | (nodes[1:] != nodes[:-1])
    return segments[keep], nodes[keep]


def _entries(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"labels[{key!r}] must be a list, got {type(value).__name__}")
    return value


def _entry_id(value: Any, where: str, *, segment: bool) -> int:
    # bool is an int subclass; a JSON true/false is never an id.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: ids must be integers, got {value!r}")
    value = int(value)
    if segment and not 0 < value < 2**64:
        raise ValueError(f"{where}: segment id {value} is not a nonzero uint64")
    if not segment and not -(2**63) <= value < 2**63:
        raise ValueError(f"{where}: node id {value} does not fit int64")
    return value


def _entry_label(value: Any, where: str) -> str:
    try:
        label = validate_label(value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not label:
        raise ValueError(f"{where}: empty label")
    return label
