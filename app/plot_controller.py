"""The live embedding plot's model and logic, without Qt.

:class:`PlotController` holds the plotted points (one per embedded skeleton node: segment
id, node id, xyz nm, embedding, labels), their current 2-D layout, the colour mode, and
the selection and hover state. It answers the questions the view asks (which point is
under the cursor, which points lie in a rectangle or lasso, which colour each point gets)
and tells subscribers what changed. :class:`ProjectionScheduler` keeps the layout current:
PCA at once, UMAP from a background fit, new points placed with ``transform``.

Linking without echo loops
--------------------------
Every change of selection, hover or activation carries its *origin* (``"plot"``,
``"3d"``, ``"session"``...). Subscribers register with a name, and a change is never
delivered to the subscriber whose name is its origin: the 3-D link subscribes as ``"3d"``
and so never hears back the selections it made itself. A change that changes nothing
(the same rows, the same segments, the same hovered point) emits nothing at all; and an
external selection of exactly the segments already selected keeps the plot's finer
node-level selection instead of widening it, so a lasso that went out to 3-D as segments
and came back as segments stays the lasso.

Events (callback arguments)
---------------------------
``"points"``     (rows)               int64 ``[k]`` rows added (new points, layout NaN)
``"layout"``     (LayoutChange)       positions changed (``animate``: a refit finished)
``"colours"``    ()                   colour mode, predictions or manual labels changed
``"selection"``  (Selection)          the selected rows changed
``"hover"``      (PointInfo or None)  the point under the cursor changed
``"activate"``   (PointInfo)          a point was clicked
``"cleared"``    ()                   every point was dropped (:meth:`PlotController.clear`)
``"visibility"`` (frozenset of int)   hidden segments or hidden legend classes changed
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from psygnal import Signal, SignalGroup
from scipy.spatial import cKDTree

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT
from segscope.analysis.arrays import group_rows
from segscope.analysis.colours import (
    CATEGORY_COLOURS,
    COMPARTMENT_COLOURS,
    OOD_BINS,
    UNKNOWN_RGBA,
    cell_type_colour,
    hex_rgba,
    label_colour,
    ood_bin_colours,
)
from segscope.analysis.progress import Progress
from segscope.analysis.projection import PcaModel, Similarity, UmapModel, UmapSettings, fit_pca, prepare_blas_control
from segscope.app.events import connect, emitting_from
from segscope.app.jobs import JobRunner, JobUpdate, Post

log = logging.getLogger(__name__)

#: Origins of selection, hover and activation changes ("no echo", see the module docstring).
PLOT_ORIGIN = "plot"
VIEW_3D_ORIGIN = "3d"
SESSION_ORIGIN = "session"

COLOUR_MODES: tuple[str, ...] = ("subcompartment", "cell type", "OOD score", "segment", "manual label")
#: Colour modes whose legend lists classes (with counts; a click hides a class).
LEGEND_MODES: tuple[str, ...] = ("subcompartment", "cell type", "manual label")


class PlotEvents(SignalGroup):
    """Events of :class:`PlotController`.

    Each may carry the change's origin, see :func:`segscope.app.events.emitting_from`.
    """

    #: (rows int64 [k]) new points were added.
    points = Signal(object)
    #: (LayoutChange) points moved.
    layout = Signal(object)
    #: () colours or the colour mode changed.
    colours = Signal()
    #: (Selection) the selection changed.
    selection = Signal(object)
    #: (PointInfo or None) the hovered point changed.
    hover = Signal(object)
    #: (PointInfo) a point was clicked.
    activate = Signal(object)
    #: () every point was dropped.
    cleared = Signal()
    #: (frozenset of int) the hidden segments changed.
    visibility = Signal(object)


PLOT_EVENTS: tuple[str, ...] = tuple(PlotEvents().signals)


@dataclass(frozen=True)
class PointInfo:
    """One plotted point: what the 3-D view needs to highlight it.

    ``xyz_nm`` is ``(x, y, z)`` nm; ``row`` indexes the controller's arrays.
    """

    row: int
    segment_id: int
    node_id: int
    xyz_nm: tuple[float, float, float]


@dataclass(frozen=True)
class Selection:
    """A selection change.

    Attributes
    ----------
    rows : numpy.ndarray
        int64 ``[k]`` selected rows, ascending.
    segment_ids : frozenset of int
        Segments with at least one selected point (or selected from outside).
    node_ids : numpy.ndarray
        int64 ``[k]`` node id of each selected row.
    origin : str
        Who made the change (``"plot"``, ``"3d"``...).
    """

    rows: np.ndarray
    segment_ids: frozenset[int]
    node_ids: np.ndarray
    origin: str


@dataclass(frozen=True)
class LayoutChange:
    """Positions changed: ``rows`` (None: all), the projection ``kind``, whether to animate."""

    rows: np.ndarray | None
    kind: str
    animate: bool


@dataclass(frozen=True)
class LegendEntry:
    """One legend class: its text, colour (uint8 RGBA), point count and whether it is hidden."""

    label: str
    rgba: tuple[int, int, int, int]
    count: int
    hidden: bool


@dataclass(frozen=True)
class PointColours:
    """Per-point colours as indices into a small shared palette.

    Attributes
    ----------
    index : numpy.ndarray
        uint8 ``[N]`` palette entry of each point.
    palette : numpy.ndarray
        uint8 ``[P, 4]`` RGBA, P <= 20.
    labels : list of str
        Legend text of each palette entry.
    value_range : tuple of float or None
        ``(low, high)`` OOD score of the first and last bin (OOD mode only), for the
        colour bar.
    """

    index: np.ndarray
    palette: np.ndarray
    labels: list[str]
    value_range: tuple[float, float] | None = None


class PlotController:
    """Points, layout, colours, selection and hover of the embedding plot (no Qt).

    Mutate from one thread (the Qt main thread in the app).
    """

    def __init__(self) -> None:
        self._reset_points()
        #: ``(segment_ids uint64 [k], node_ids int64 [k]) -> object [k] str``: the manual
        #: label each point shows (the session's LabelStore); new points ask it too.
        self.label_lookup: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        #: The cell-type classifier's class names: colours follow their order, as in 3-D
        #: (:func:`segscope.analysis.colours.cell_type_colour`).
        self.cell_type_class_names: tuple[str, ...] = ()
        self.colour_mode = COLOUR_MODES[0]
        self.events = PlotEvents()

    def _reset_points(self) -> None:
        self.segment_ids = np.zeros(0, np.uint64)
        self.node_ids = np.zeros(0, np.int64)
        self.xyz_nm = np.zeros((0, 3), np.float64)
        # float32 [N, D]; D is fixed by the first points (0 while there are none).
        self.embeddings = np.zeros((0, 0), np.float32)
        self.compartments = np.zeros(0, np.uint8)
        self.ood_scores = np.zeros(0, np.float32)
        self.cell_type_codes = np.zeros(0, np.int16)  # -1: unknown; else index in cell_type_names
        self.cell_type_names: list[str] = []
        self.background = np.zeros(0, bool)
        self.manual_labels = np.zeros(0, object)  # str per point, "" unlabelled
        self.layout = np.zeros((0, 2), np.float32)  # NaN until placed
        self.layout_kind = "none"
        self.selected = np.zeros(0, bool)
        # Rows not drawn, hit or selected: those of hidden segments or of hidden legend classes.
        self.hidden = np.zeros(0, bool)
        self._segment_hidden = np.zeros(0, bool)  # rows of hidden segments only
        self._hidden_segments: set[int] = set()
        self._hide_history: list[frozenset[int]] = []  # each hide, for undo_hide
        self._hidden_classes: dict[str, set[str]] = {}  # colour mode -> legend labels hidden
        self.hovered: int | None = None
        self._selected_segments: frozenset[int] = frozenset()
        self._selection_origin = ""
        self._segment_rows: dict[int, np.ndarray] = {}
        self._tree: cKDTree | None = None
        self._tree_rows: np.ndarray | None = None
        self._tree_stale = np.zeros(0, bool)  # rows whose position moved since the tree was built
        self._tree_extra = np.zeros(0, np.int64)  # those rows, searched directly

    def clear(self) -> None:
        """Drop every point, its layout and the selection; emits ``"cleared"``.

        Called when other data was opened: segment ids of the old data mean nothing there.
        """
        self._reset_points()
        self._emit("cleared")

    # -- observers -------------------------------------------------------------------------

    def subscribe(self, event: str, callback: Callable[..., Any], *, name: str | None = None) -> Callable[[], None]:
        """Call ``callback`` on ``event``, except for changes whose origin is ``name``.

        Returns a function that unsubscribes.

        Raises
        ------
        KeyError
            For an unknown event name.
        """
        if event not in PLOT_EVENTS:
            raise KeyError(f"unknown plot event {event!r}; known: {', '.join(PLOT_EVENTS)}")
        return connect(self.events[event], callback, name=name)

    def _emit(self, event: str, *args: Any, origin: str | None = None) -> None:
        with emitting_from(origin):  # never echo a change back to where it came from
            self.events[event].emit(*args)

    # -- points ----------------------------------------------------------------------------

    @property
    def n_points(self) -> int:
        return len(self.segment_ids)

    def add_points(
        self,
        segment_ids: Any,
        node_ids: Any,
        xyz_nm: Any,
        embeddings: Any,
        *,
        compartments: Any = None,
        background: bool = False,
    ) -> np.ndarray:
        """Add (or update) points; returns int64 ``[k]`` rows of the new points only.

        A (segment, node) pair already plotted gets its embedding and position replaced
        (and keeps its row and layout until the next placement).

        Parameters
        ----------
        segment_ids : array_like
            ``[k]`` uint64 segment ids, or one id for all.
        node_ids : array_like
            int64 ``[k]`` skeleton node ids.
        xyz_nm : array_like
            float ``[k, 3]`` node positions, xyz nm.
        embeddings : array_like
            float ``[k, D]``.
        compartments : array_like, optional
            uint8 ``[k]`` compartment codes (255 unknown).
        background : bool
            Context points (precomputed embeddings) rather than the session's own.

        Raises
        ------
        ValueError
            For mismatched lengths, a different embedding width, or non-finite values.
        """
        node_ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
        k = len(node_ids)
        segments = np.broadcast_to(np.asarray(segment_ids, dtype=np.uint64), (k,)).copy()
        xyz = np.asarray(xyz_nm, dtype=np.float64).reshape(k, 3) if k else np.zeros((0, 3))
        values = np.asarray(embeddings, dtype=np.float32)
        if values.ndim != 2 or len(values) != k:
            raise ValueError(f"embeddings must be [{k}, D], got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if self.n_points and values.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embeddings are {values.shape[1]}-d, the plot holds {self.embeddings.shape[1]}-d")
        codes = (
            np.full(k, UNKNOWN_COMPARTMENT, np.uint8)
            if compartments is None
            else np.asarray(compartments, dtype=np.uint8).reshape(k)
        )
        if k == 0:
            return np.zeros(0, np.int64)

        existing = self.rows_of(segments, node_ids)
        old = existing >= 0
        if old.any():
            rows = existing[old]
            self.embeddings[rows] = values[old]
            self.xyz_nm[rows] = xyz[old]
            if compartments is not None:
                self.compartments[rows] = codes[old]
        if not background and self._hidden_segments:
            # The user asked for these segments again (a click, a restored session).
            self.show_segments(self._hidden_segments.intersection(int(s) for s in np.unique(segments)))
        new = ~old
        n_new = int(new.sum())
        start = self.n_points
        new_rows = np.arange(start, start + n_new, dtype=np.int64)
        if n_new:
            self.segment_ids = np.concatenate([self.segment_ids, segments[new]])
            self.node_ids = np.concatenate([self.node_ids, node_ids[new]])
            self.xyz_nm = np.concatenate([self.xyz_nm, xyz[new]])
            self.embeddings = values[new].copy() if not start else np.concatenate([self.embeddings, values[new]])
            self.compartments = np.concatenate([self.compartments, codes[new]])
            self.ood_scores = np.concatenate([self.ood_scores, np.full(n_new, np.nan, np.float32)])
            self.cell_type_codes = np.concatenate([self.cell_type_codes, np.full(n_new, -1, np.int16)])
            self.background = np.concatenate([self.background, np.full(n_new, bool(background))])
            labels = np.full(n_new, "", object)
            if self.label_lookup is not None:
                labels = np.asarray(self.label_lookup(segments[new], node_ids[new]), dtype=object)
            self.manual_labels = np.concatenate([self.manual_labels, labels])
            self.layout = np.concatenate([self.layout, np.full((n_new, 2), np.nan, np.float32)])
            hidden = np.isin(segments[new], np.fromiter(self._hidden_segments, np.uint64, len(self._hidden_segments)))
            self._segment_hidden = np.concatenate([self._segment_hidden, hidden])
            self.hidden = np.concatenate([self.hidden, hidden])
            grows_selection = (
                np.isin(segments[new], np.fromiter(self._selected_segments, np.uint64, len(self._selected_segments)))
                & ~hidden
            )
            self.selected = np.concatenate([self.selected, grows_selection])
            for segment, picks in group_rows(segments[new]):
                rows_of_segment = new_rows[picks]
                previous = self._segment_rows.get(segment)
                self._segment_rows[segment] = (
                    rows_of_segment if previous is None else np.concatenate([previous, rows_of_segment])
                )
            self._emit("points", new_rows)
            if grows_selection.any():
                # Points streaming in for a segment selected elsewhere join its selection;
                # the change keeps that selection's origin, so it is not sent back there.
                self._emit("selection", self._selection(self._selection_origin), origin=self._selection_origin)
            if self.hidden_classes:
                self._update_hidden()  # new points of a hidden legend class stay hidden
        return new_rows

    def rows_of(self, segment_ids: Any, node_ids: Any) -> np.ndarray:
        """int64 row of each (segment, node) pair, -1 where it is not plotted."""
        node_ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
        segments = np.broadcast_to(np.asarray(segment_ids, dtype=np.uint64), node_ids.shape)
        result = np.full(len(node_ids), -1, np.int64)
        for segment, picks in group_rows(segments):
            rows = self._segment_rows.get(segment)
            if rows is None:
                continue
            order = np.argsort(self.node_ids[rows], kind="stable")
            sorted_nodes = self.node_ids[rows][order]
            where = np.minimum(np.searchsorted(sorted_nodes, node_ids[picks]), len(sorted_nodes) - 1)
            found = sorted_nodes[where] == node_ids[picks]
            result[picks[found]] = rows[order[where[found]]]
        return result

    def segment_rows(self, segment_ids: Iterable[int]) -> np.ndarray:
        """int64 rows of every point of the given segments, ascending."""
        parts = [self._segment_rows[int(s)] for s in segment_ids if int(s) in self._segment_rows]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    # -- hiding segments -------------------------------------------------------------------

    @property
    def hidden_segments(self) -> frozenset[int]:
        """Segments whose points are hidden (kept, and still part of every UMAP fit)."""
        return frozenset(self._hidden_segments)

    def hide_segments(self, segment_ids: Iterable[int], *, undoable: bool = True) -> int:
        """Hide the points of ``segment_ids`` and drop them from the selection; emits ``"visibility"``.

        The segments may be plotted or not yet. Returns how many segments became hidden.
        An ``undoable`` hide is remembered: :meth:`undo_hide` shows its segments again.

        Hidden points are not drawn, hit, or selected by a rectangle, lasso or a 3-D
        selection. They stay in the plot's data: UMAP keeps fitting on them (the layout
        of the rest does not jump), labels and exports keep them, and
        :meth:`show_segments` brings them back as they were.
        """
        segments = {int(s) for s in segment_ids} - self._hidden_segments
        if not segments:
            return 0
        self._hidden_segments |= segments
        if undoable:
            self._hide_history.append(frozenset(segments))
        self._set_visibility(segments, True)
        if self._selected_segments & segments or self.selected[self.hidden].any():
            # A change made in the plot: the 3-D view follows (deselects those segments).
            self.selected &= ~self.hidden
            self._selected_segments = self._selected_segments - segments
            self._selection_origin = "plot"
            self._emit("selection", self._selection("plot"))
        if self.hovered is not None and self.hidden[self.hovered]:
            self.hover(None)
        return len(segments)

    def show_segments(self, segment_ids: Iterable[int] | None = None) -> int:
        """Show hidden ``segment_ids`` again (None: every hidden segment); returns how many."""
        segments = (
            set(self._hidden_segments)
            if segment_ids is None
            else ({int(s) for s in segment_ids} & self._hidden_segments)
        )
        if not segments:
            return 0
        self._hidden_segments -= segments
        self._set_visibility(segments, False)
        return len(segments)

    def hide_selection(self) -> tuple[int, int]:
        """Hide the selected segments (undoable); returns (segments, points) that became hidden."""
        segments = set(self._selected_segments) - self._hidden_segments
        rows = self.segment_rows(segments)
        points = int((~self.hidden[rows]).sum())
        return self.hide_segments(segments), points

    @property
    def can_undo_hide(self) -> bool:
        """Whether :meth:`undo_hide` would show anything."""
        return any(hide & self._hidden_segments for hide in self._hide_history)

    def undo_hide(self) -> tuple[int, int]:
        """Show the segments of the last hide that are still hidden; returns (segments, points) shown.

        Hides whose segments were all shown since (:meth:`show_segments`) are skipped.
        """
        while self._hide_history:
            segments = self._hide_history.pop() & self._hidden_segments
            if segments:
                points = len(self.segment_rows(segments))
                return self.show_segments(segments), points
        return 0, 0

    def _set_visibility(self, segments: set[int], hidden: bool) -> None:
        self._segment_hidden[self.segment_rows(segments)] = hidden
        self.hidden = self._segment_hidden | self._class_mask()
        self._tree = None  # the tree holds visible points only
        self._emit("visibility", frozenset(self._hidden_segments))

    # -- legend classes (cellxgene-style: click a legend entry to hide its points) ---------

    @property
    def hidden_classes(self) -> frozenset[str]:
        """Legend labels of the current colour mode whose points are hidden."""
        return frozenset(self._hidden_classes.get(self.colour_mode, ()))

    def legend(self, colours: PointColours | None = None) -> list[LegendEntry]:
        """The current colour mode's legend: one entry per class with its count and visibility.

        Only categorical modes (:data:`LEGEND_MODES`) have entries. ``count`` is the class's
        points outside hidden segments (its hidden points included, so a hidden class still
        says how many it holds). ``colours`` is :meth:`colours`, when the caller has it.
        """
        if self.colour_mode not in LEGEND_MODES:
            return []
        colours = self.colours() if colours is None else colours
        counts = np.bincount(colours.index[~self._segment_hidden], minlength=len(colours.palette))
        hidden = self.hidden_classes
        entries = []
        for label, rgba, count in zip(colours.labels, colours.palette, counts):
            r, g, b, a = (int(v) for v in rgba)
            entries.append(LegendEntry(label, (r, g, b, a), int(count), label in hidden))
        return entries

    def legend_rows(self, label: str, colours: PointColours | None = None) -> np.ndarray:
        """int64 rows of the legend class ``label`` in the current colour mode (empty: no such class)."""
        if self.colour_mode not in LEGEND_MODES:
            return np.zeros(0, np.int64)
        colours = self.colours() if colours is None else colours
        entries = [i for i, name in enumerate(colours.labels) if name == label]
        return np.flatnonzero(np.isin(colours.index, entries))

    def set_class_hidden(self, label: str, hidden: bool = True) -> bool:
        """Hide (or show) the points of the legend class ``label`` of the current colour mode.

        Hidden classes belong to their colour mode: in another mode every class shows, and
        coming back hides them again. They are not hit or selected, like hidden segments.
        Emits ``"visibility"``; False when nothing changed.

        Raises
        ------
        ValueError
            In a colour mode without a categorical legend (OOD score, segment).
        """
        if self.colour_mode not in LEGEND_MODES:
            raise ValueError(f"colour mode {self.colour_mode!r} has no legend classes to hide")
        classes = self._hidden_classes.setdefault(self.colour_mode, set())
        if (label in classes) == hidden:
            return False
        if hidden:
            classes.add(label)
        else:
            classes.discard(label)
        self._update_hidden(always_emit=True)
        return True

    def toggle_class(self, label: str) -> bool:
        """Hide a shown legend class or show a hidden one; returns whether it is hidden now."""
        hidden = label not in self.hidden_classes
        self.set_class_hidden(label, hidden)
        return hidden

    def show_classes(self) -> int:
        """Show every hidden legend class of the current colour mode; returns how many."""
        classes = self._hidden_classes.pop(self.colour_mode, set())
        if classes:
            self._update_hidden(always_emit=True)
        return len(classes)

    def hidden_classes_by_mode(self) -> dict[str, list[str]]:
        """Every colour mode's hidden legend classes (JSON-safe, for saved sessions)."""
        return {mode: sorted(labels) for mode, labels in self._hidden_classes.items() if labels}

    def restore_hidden_classes(self, by_mode: dict[str, list[str]]) -> None:
        """Replace the hidden legend classes with :meth:`hidden_classes_by_mode`'s output.

        Modes without a categorical legend are ignored. Emits ``"visibility"``.

        Raises
        ------
        ValueError
            When ``by_mode`` is not a mapping of mode -> list of labels.
        """
        if not isinstance(by_mode, dict) or not all(isinstance(v, list) for v in by_mode.values()):
            raise ValueError(f"hidden classes must map colour modes to label lists, got {by_mode!r}")
        self._hidden_classes = {
            mode: {str(label) for label in labels} for mode, labels in by_mode.items() if mode in LEGEND_MODES
        }
        self._update_hidden(always_emit=True)

    def _class_mask(self) -> np.ndarray:
        hidden = self.hidden_classes
        if not hidden or not self.n_points:
            return np.zeros(self.n_points, bool)
        colours = self.colours()
        entries = [i for i, name in enumerate(colours.labels) if name in hidden]
        return np.isin(colours.index, entries)

    def _update_hidden(self, *, always_emit: bool = False) -> None:
        """Recompute the hidden rows (segments and classes); newly hidden ones leave the selection and hover."""
        hidden = self._segment_hidden | self._class_mask()
        if np.array_equal(hidden, self.hidden) and not always_emit:
            return
        self.hidden = hidden
        self._tree = None
        lost = self.selected & hidden
        if lost.any():
            self.selected = self.selected & ~hidden
            still = {int(s) for s in np.unique(self.segment_ids[self.selected])}
            gone = {int(s) for s in np.unique(self.segment_ids[lost])} - still
            self._selected_segments = self._selected_segments - gone
            self._selection_origin = PLOT_ORIGIN
            self._emit("selection", self._selection(PLOT_ORIGIN))
        if self.hovered is not None and self.hovered < len(hidden) and hidden[self.hovered]:
            self.hover(None)
        self._emit("visibility", frozenset(self._hidden_segments))

    def _colours_changed(self) -> None:
        """Colours changed: classes hidden in the legend follow their points' new classes."""
        if self._hidden_classes:
            self._update_hidden()
        self._emit("colours")

    def point(self, row: int) -> PointInfo:
        """The point at ``row``.

        Raises
        ------
        IndexError
            For a row outside ``[0, n_points)``.
        """
        if not 0 <= row < self.n_points:
            raise IndexError(f"row {row} outside [0, {self.n_points})")
        x, y, z = (float(v) for v in self.xyz_nm[row])
        return PointInfo(int(row), int(self.segment_ids[row]), int(self.node_ids[row]), (x, y, z))

    def describe_point(self, row: int) -> str:
        """A hover tooltip's text: segment and node ids, predictions and the manual label of ``row``."""
        info = self.point(row)
        code = int(self.compartments[row])
        compartment = COMPARTMENTS[code] if code < len(COMPARTMENTS) else "unknown"
        type_code = int(self.cell_type_codes[row])
        cell_type = self.cell_type_names[type_code] if 0 <= type_code < len(self.cell_type_names) else "unknown"
        ood = float(self.ood_scores[row])
        label = str(self.manual_labels[row]) if self.manual_labels[row] else "none"
        lines = [
            f"segment {info.segment_id} · node {info.node_id}" + (" (context)" if self.background[row] else ""),
            f"compartment: {compartment}",
            f"cell type: {cell_type}",
            f"OOD score: {ood:.3f}" if np.isfinite(ood) else "OOD score: unknown",
            f"manual label: {label}",
        ]
        return "\n".join(lines)

    def describe_selection(self) -> str:
        """Say what is selected ("1,234 points of 5 segments selected"); "" when nothing is."""
        n_points, n_segments = len(self.selected_rows), len(self._selected_segments)
        if not n_points and not n_segments:
            return ""
        return (
            f"{n_points:,} point{'s' if n_points != 1 else ''} of "
            f"{n_segments:,} segment{'s' if n_segments != 1 else ''} selected"
        )

    # -- labels and colours ----------------------------------------------------------------

    def set_compartments(self, segment_id: int, node_ids: Any, codes: Any) -> None:
        """Set compartment codes (uint8, 255 unknown) of a segment's plotted nodes."""
        rows = self.rows_of(segment_id, node_ids)
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
        if len(codes) != len(rows):
            raise ValueError(f"{len(codes)} codes for {len(rows)} nodes")
        self.compartments[rows[rows >= 0]] = codes[rows >= 0]
        self._colours_changed()

    def set_segment_labels(
        self, segment_id: int, *, cell_type: str | None = None, ood_score: float | None = None
    ) -> None:
        """Set the cell type and/or OOD score of every point of a segment."""
        rows = self.segment_rows([segment_id])
        if cell_type is not None:
            if cell_type not in self.cell_type_names:
                self.cell_type_names.append(cell_type)
            self.cell_type_codes[rows] = self.cell_type_names.index(cell_type)
        if ood_score is not None:
            self.ood_scores[rows] = float(ood_score)
        self._colours_changed()

    def set_point_predictions(self, rows: Any, *, cell_types: Any = None, ood_scores: Any = None) -> None:
        """Set per-point cell types and/or OOD scores of ``rows`` at once.

        Cell types are str (``""`` unknown), OOD scores NaN when unknown; one call sets a
        context table's thousands of segments.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if cell_types is not None:
            names = np.asarray(cell_types, dtype=object).reshape(-1)
            if len(names) != len(rows):
                raise ValueError(f"{len(names)} cell types for {len(rows)} rows")
            for name in dict.fromkeys(n for n in names if n):
                if name not in self.cell_type_names:
                    self.cell_type_names.append(str(name))
            lookup = {name: code for code, name in enumerate(self.cell_type_names)}
            self.cell_type_codes[rows] = np.fromiter(
                (lookup.get(n, -1) if n else -1 for n in names), np.int16, len(names)
            )
        if ood_scores is not None:
            scores = np.asarray(ood_scores, dtype=np.float32).reshape(-1)
            if len(scores) != len(rows):
                raise ValueError(f"{len(scores)} OOD scores for {len(rows)} rows")
            self.ood_scores[rows] = scores
        self._colours_changed()

    def refresh_manual_labels(self) -> None:
        """Ask :attr:`label_lookup` again for every point's manual label; emits ``"colours"`` when any changed.

        Called after an edit, undo or redo.
        """
        if self.label_lookup is None or not self.n_points:
            return
        labels = np.asarray(self.label_lookup(self.segment_ids, self.node_ids), dtype=object)
        if len(labels) != self.n_points:
            raise ValueError(f"label lookup returned {len(labels)} labels for {self.n_points} points")
        if not np.array_equal(labels, self.manual_labels):
            self.manual_labels = labels
            self._colours_changed()

    def manual_label_names(self) -> list[str]:
        """Manual labels in use, sorted (the legend's order)."""
        return sorted({str(label) for label in self.manual_labels if label})

    def set_colour_mode(self, mode: str) -> None:
        """Colour points by ``mode`` (one of :data:`COLOUR_MODES`).

        Raises
        ------
        ValueError
            For an unknown mode.
        """
        if mode not in COLOUR_MODES:
            raise ValueError(f"unknown colour mode {mode!r}; choose from {', '.join(COLOUR_MODES)}")
        if mode != self.colour_mode:
            self.colour_mode = mode
            self._colours_changed()

    def colours(self) -> PointColours:
        """Per-point palette indices for the current colour mode (at most 20 colours)."""
        n = self.n_points
        unknown = np.array([UNKNOWN_RGBA], np.uint8)
        if self.colour_mode == "subcompartment":
            palette = np.array(
                [hex_rgba(COMPARTMENT_COLOURS[name]) for name in COMPARTMENTS] + [UNKNOWN_RGBA], np.uint8
            )
            index = np.where(self.compartments < len(COMPARTMENTS), self.compartments, len(COMPARTMENTS))
            return PointColours(index.astype(np.uint8), palette, [*COMPARTMENTS, "unknown"])
        if self.colour_mode == "cell type":
            names = self.cell_type_names[: len(CATEGORY_COLOURS)]
            codes = self.cell_type_codes.astype(np.int64)
            # Beyond the palette, types share the last colour rather than adding brushes.
            codes = np.where(codes >= len(names), len(names) - 1, codes)
            index = np.where(codes < 0, len(names), codes)
            colours = [cell_type_colour(name, self.cell_type_class_names) for name in names]
            palette = np.array([hex_rgba(c) for c in colours] + [UNKNOWN_RGBA], np.uint8)
            return PointColours(index.astype(np.uint8), palette, [*names, "unknown"])
        if self.colour_mode == "OOD score":
            scores = self.ood_scores
            known = np.isfinite(scores)
            palette = np.concatenate([ood_bin_colours(), unknown])
            if not known.any():
                return PointColours(np.full(n, OOD_BINS, np.uint8), palette, [""] * OOD_BINS + ["unknown"], None)
            low, high = float(scores[known].min()), float(scores[known].max())
            span = high - low if high > low else 1.0
            bins = np.clip(((np.nan_to_num(scores, nan=low) - low) / span * OOD_BINS).astype(np.int64), 0, OOD_BINS - 1)
            index = np.where(known, bins, OOD_BINS)
            labels = [f"{low + span * (b + 0.5) / OOD_BINS:.3g}" for b in range(OOD_BINS)] + ["unknown"]
            return PointColours(index.astype(np.uint8), palette, labels, (low, high))
        if self.colour_mode == "manual label":
            in_use = self.manual_label_names()
            names = in_use[: len(CATEGORY_COLOURS)]
            lookup = {name: i for i, name in enumerate(names)}
            # Labels beyond the palette share the last colour rather than adding brushes.
            index = np.fromiter(
                (lookup.get(label, len(names) - 1) if label else len(names) for label in self.manual_labels),
                np.int64,
                n,
            )
            colours = [label_colour(name, in_use) for name in names]
            palette = np.array([hex_rgba(c) for c in colours] + [(90, 90, 90, 110)], np.uint8)
            return PointColours(index.astype(np.uint8), palette, [*names, "unlabelled"])
        # Segment mode: a stable colour per id (Knuth's multiplicative hash), shared palette.
        palette = np.array([hex_rgba(c) for c in CATEGORY_COLOURS], np.uint8)
        hashed = (self.segment_ids * np.uint64(2654435761)) >> np.uint64(7)
        index = (hashed % np.uint64(len(CATEGORY_COLOURS))).astype(np.uint8)
        return PointColours(index, palette, ["segment"] * len(CATEGORY_COLOURS))

    # -- layout ----------------------------------------------------------------------------

    def set_layout(self, rows: Any, positions: Any, *, kind: str | None = None, animate: bool = False) -> None:
        """Set float ``[k, 2]`` positions of ``rows`` (None: all rows)."""
        positions = np.asarray(positions, dtype=np.float32)
        if rows is None:
            if positions.shape != (self.n_points, 2):
                raise ValueError(f"positions must be [{self.n_points}, 2], got {positions.shape}")
            self.layout = positions.copy()
        else:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if positions.shape != (len(rows), 2):
                raise ValueError(f"positions must be [{len(rows)}, 2], got {positions.shape}")
            self.layout[rows] = positions
        if kind is not None:
            self.layout_kind = kind
        self._layout_changed(rows)
        self._emit("layout", LayoutChange(None if rows is None else rows, self.layout_kind, animate))

    def _kd_tree(self) -> tuple[cKDTree | None, np.ndarray]:
        if self._tree is None:
            placed = np.flatnonzero(np.isfinite(self.layout).all(axis=1) & ~self.hidden)
            self._tree_rows = placed
            self._tree = cKDTree(self.layout[placed]) if len(placed) else None
            self._tree_stale = np.zeros(self.n_points, bool)
            self._tree_extra = np.zeros(0, np.int64)
        assert self._tree_rows is not None  # set with the tree
        return self._tree, self._tree_rows

    def _layout_changed(self, rows: np.ndarray | None) -> None:
        """Keep the KD-tree through small changes: changed rows are searched by brute force.

        Rebuilding costs about 70 ms at 100k points and 1 s at 1M, too much on every
        placed batch; the tree is rebuilt lazily once a tenth of the rows (or 20k) changed.
        """
        if self._tree is None:
            return
        if rows is None:
            self._tree = None
            return
        stale = np.zeros(self.n_points, bool)
        stale[: len(self._tree_stale)] = self._tree_stale
        stale[rows] = True
        extra = np.union1d(self._tree_extra, rows)
        if len(extra) > max(20_000, self.n_points // 10):
            self._tree = None
            return
        self._tree_stale, self._tree_extra = stale, extra

    def hit_test(self, x: float, y: float, radius: float) -> int | None:
        """Row of the placed point nearest ``(x, y)`` within ``radius`` (layout units), or None.

        A KD-tree answers in microseconds where pyqtgraph's ``pointsAt`` takes 350 ms at
        100k points; rows moved since the tree was built are checked directly.
        """
        tree, rows = self._kd_tree()
        best_row, best_distance = None, np.inf
        if tree is not None:
            k = min(8, len(rows))
            distances, indices = tree.query((x, y), k=k, distance_upper_bound=radius)
            for distance, index in zip(np.atleast_1d(distances), np.atleast_1d(indices)):
                if not np.isfinite(distance):
                    break
                row = int(rows[index])
                if not self._tree_stale[row]:
                    best_row, best_distance = row, float(distance)
                    break
            else:
                if k and np.isfinite(np.atleast_1d(distances)[-1]):
                    # All k nearest moved away since the build: rebuild and ask again.
                    self._tree = None
                    return self.hit_test(x, y, radius)
        if len(self._tree_extra):
            extra = self._tree_extra[~self.hidden[self._tree_extra]]
            distances = np.hypot(self.layout[extra, 0] - x, self.layout[extra, 1] - y)
            distances = np.where(np.isfinite(distances), distances, np.inf)
            nearest = int(np.argmin(distances))
            if distances[nearest] <= radius and distances[nearest] < best_distance:
                best_row = int(extra[nearest])
        return best_row

    def rows_in_rectangle(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """int64 rows of visible placed points inside the rectangle (corners in any order)."""
        (xa, xb), (ya, yb) = sorted((x0, x1)), sorted((y0, y1))
        x, y = self.layout[:, 0], self.layout[:, 1]
        return np.flatnonzero((x >= xa) & (x <= xb) & (y >= ya) & (y <= yb) & ~self.hidden)

    def rows_in_polygon(self, vertices: Any) -> np.ndarray:
        """int64 rows of placed points inside a closed polygon (float ``[M, 2]``, M >= 3).

        Even-odd rule, vectorised over the points inside the polygon's bounding box.
        """
        polygon = np.asarray(vertices, dtype=np.float64)
        if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
            raise ValueError(f"a lasso needs [M >= 3, 2] vertices, got {polygon.shape}")
        lo, hi = polygon.min(axis=0), polygon.max(axis=0)
        candidates = self.rows_in_rectangle(lo[0], lo[1], hi[0], hi[1])
        px = self.layout[candidates, 0].astype(np.float64)
        py = self.layout[candidates, 1].astype(np.float64)
        inside = np.zeros(len(candidates), bool)
        xa, ya = polygon[:, 0], polygon[:, 1]
        xb, yb = np.roll(xa, -1), np.roll(ya, -1)
        for i in range(len(polygon)):
            crosses = (ya[i] > py) != (yb[i] > py)
            if not crosses.any():
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = xa[i] + (py - ya[i]) * (xb[i] - xa[i]) / (yb[i] - ya[i])
            inside ^= crosses & (px < x_at)
        return candidates[inside]

    # -- selection, hover, activation ------------------------------------------------------

    @property
    def selected_rows(self) -> np.ndarray:
        return np.flatnonzero(self.selected)

    @property
    def selected_segments(self) -> frozenset[int]:
        return self._selected_segments

    @property
    def selection_origin(self) -> str:
        """Who made the current selection: ``"plot"``, or ``"3d"`` for the segment clicked in 3-D..."""
        return self._selection_origin

    def _selection(self, origin: str) -> Selection:
        rows = self.selected_rows
        return Selection(rows, self._selected_segments, self.node_ids[rows].copy(), origin)

    def select_rows(self, rows: Any, origin: str) -> bool:
        """Select exactly ``rows`` (and their segments), hidden rows left out; False when nothing changed."""
        rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_points):
            raise IndexError(f"rows must lie in [0, {self.n_points})")
        rows = rows[~self.hidden[rows]]
        mask = np.zeros(self.n_points, bool)
        mask[rows] = True
        segments = frozenset(int(s) for s in np.unique(self.segment_ids[rows]))
        if np.array_equal(mask, self.selected) and segments == self._selected_segments:
            return False
        self.selected, self._selected_segments, self._selection_origin = mask, segments, origin
        self._emit("selection", self._selection(origin), origin=origin)
        return True

    def select_segments(self, segment_ids: Iterable[int], origin: str) -> bool:
        """Select every point of ``segment_ids`` (a selection made elsewhere, e.g. in 3-D).

        Selecting exactly the segments already selected changes nothing (the plot keeps a
        finer node-level selection of them). Segments without points yet are remembered:
        their points join the selection as they stream in. False when nothing changed.
        """
        segments = frozenset(int(s) for s in segment_ids)
        if segments == self._selected_segments:
            return False
        mask = np.zeros(self.n_points, bool)
        mask[self.segment_rows(segments)] = True
        mask &= ~self.hidden
        self.selected, self._selected_segments, self._selection_origin = mask, segments, origin
        self._emit("selection", self._selection(origin), origin=origin)
        return True

    def clear_selection(self, origin: str) -> bool:
        return self.select_segments((), origin)

    def hover(self, row: int | None, origin: str = "plot") -> bool:
        """Mark ``row`` (None: nothing) as under the cursor; False when unchanged."""
        if row == self.hovered:
            return False
        self.hovered = row
        self._emit("hover", None if row is None else self.point(row), origin=origin)
        return True

    def activate(self, row: int, origin: str = "plot") -> PointInfo:
        """A click on ``row``: tells subscribers (the 3-D view moves there)."""
        info = self.point(row)
        self._emit("activate", info, origin=origin)
        return info


# -- keeping the layout current ----------------------------------------------------------------


class SchedulerEvents(SignalGroup):
    """Events of :class:`ProjectionScheduler`."""

    status = Signal(str)


class ProjectionScheduler:
    """Keeps a :class:`PlotController`'s layout current: PCA now, UMAP when ready.

    * New points are placed at once: by the PCA model before the first UMAP, by the
      UMAP model's ``transform`` after (on a background worker; points that arrive while
      a placement runs are batched into the next one).
    * A UMAP fit runs in the background when there are ``min_points`` points, and again
      when the count has grown by ``refit_growth`` since the last fit. It starts from the
      current layout, and its result is aligned to it (Procrustes), so the plot animates
      between similar pictures. Points added during a fit are placed by the new model.
    * The numba compile cost is paid by a warm-up job queued first (``start``).

    Fits and placements run on two :class:`~segscope.app.jobs.JobRunner` threads so that a
    minute-long refit does not hold back new points; ``post`` delivers their results on
    the controller's thread (a queued Qt signal in the app).

    ``backend`` does the UMAP work those threads ask for: by default
    :class:`~segscope.app.projection_process.LocalProjectionBackend` (numba in this process, on the
    worker threads); :class:`~segscope.app.projection_process.ProcessProjectionBackend` runs it in
    a child process, so numba's compiler never holds this process's GIL (the GUI thread
    stalled during warm-up and fits otherwise). The scheduler does not close a backend it
    is given. When the backend loses the model (its process died), the next placement
    fails with :class:`~segscope.app.projection_process.ModelNotFoundError` and a refit starts.
    """

    def __init__(
        self,
        controller: PlotController,
        post: Post | None = None,
        *,
        settings: UmapSettings = UmapSettings(seed=None),  # noqa: B008 - frozen dataclass, immutable
        min_points: int = 60,
        refit_growth: float = 1.5,
        warm_up: bool = True,
        backend: Any = None,
    ):
        from segscope.app.projection_process import LocalProjectionBackend

        self.backend = LocalProjectionBackend() if backend is None else backend
        self.controller = controller
        self.settings = settings
        self.min_points = max(int(min_points), settings.n_neighbors + 2)
        self.refit_growth = float(refit_growth)
        self._warm_up = warm_up
        self._fit_runner = JobRunner(post, name="segscope-umap-fit")
        self._place_runner = JobRunner(post, name="segscope-umap-place")
        self.pca: PcaModel | None = None
        self._pca_points = 0
        self.umap: UmapModel | None = None  # or the backend's model (same interface)
        self._alignment = Similarity.identity()  # model coordinates -> plot coordinates
        self._model_generation = 0
        self._fitting = False
        self._fit_retried = False  # a fit lost to a dead projection child was retried once
        self._placing = False
        self._pending: list[np.ndarray] = []
        self.warm_up_result: dict[str, float] | None = None
        self.last_fit_seconds: float | None = None
        self.status = "PCA"
        #: ``status`` (str) when the projection status changes.
        self.events = SchedulerEvents()
        unsubscribe = [
            controller.subscribe("points", self._on_points, name="projection"),
            controller.subscribe("cleared", self._on_cleared, name="projection"),
        ]
        self._unsubscribe = lambda: [u() for u in unsubscribe]
        # The first PCA runs on the Qt thread; its BLAS probe should not.
        threading.Thread(target=prepare_blas_control, name="segscope-blas-probe", daemon=True).start()

    @property
    def layout_label(self) -> str:
        """What the plot shows: "PCA", or "UMAP of N points (fit X s)"."""
        if self.umap is None:
            return "PCA"
        return f"UMAP of {self.umap.n_points} points (fit {self.umap.fit_seconds:.1f} s)"

    def on_status(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` when the projection status changes ("UMAP (fitting)"...)."""
        connect(self.events.status, callback)

    def _set_status(self, text: str) -> None:
        self.status = text
        self.events.status.emit(text)

    def start(self) -> None:
        """Queue the numba warm-up on the fit worker (call at launch)."""
        if self._warm_up:
            backend, settings = self.backend, self.settings

            def job():
                yield Progress(0, 1, "steps", "compiling UMAP")
                return backend.warm_up(settings)  # the same kernels (parallel or not) as the fits

            self._fit_runner.submit("UMAP warm-up", job, self._on_warm_up, kind="warm-up")

    def _on_warm_up(self, update: JobUpdate) -> None:
        if update.event == "finished":
            self.warm_up_result = update.result
        elif update.event == "failed":
            log.warning("UMAP warm-up failed: %s", update.error)

    @property
    def busy(self) -> bool:
        return self._fitting or self._placing or bool(self._pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until both workers are idle (headless use and tests)."""
        return self._fit_runner.wait_idle(timeout) and self._place_runner.wait_idle(timeout)

    def shutdown(self) -> None:
        self._unsubscribe()
        self._fit_runner.shutdown(wait=False)
        self._place_runner.shutdown(wait=False)

    def _on_cleared(self) -> None:
        """The controller dropped its points: forget the models.

        Fits and placements in flight finish but are ignored (their generations are stale).
        """
        self._model_generation += 1
        self.pca, self._pca_points, self.umap = None, 0, None
        self._alignment = Similarity.identity()
        self._pending = []
        self._set_status("PCA")

    # -- points arrive -----------------------------------------------------------------

    def _on_points(self, rows: np.ndarray) -> None:
        controller = self.controller
        if self.umap is None:
            if self.pca is None or controller.n_points >= 2 * self._pca_points:
                # Refit the PCA while it is cheap and the data has doubled (ms at 100k).
                self.pca = fit_pca(controller.embeddings)
                self._pca_points = controller.n_points
                controller.set_layout(None, self.pca.transform(controller.embeddings), kind="pca")
            else:
                controller.set_layout(rows, self.pca.transform(controller.embeddings[rows]))
        else:
            self._pending.append(rows)
            self._schedule_placement()
        self.request_fit(force=False)

    def request_fit(self, *, force: bool = True) -> bool:
        """Start a UMAP fit if one is due (or ``force``) and none runs; True if started."""
        controller = self.controller
        n = controller.n_points
        if self._fitting or n < self.min_points:
            return False
        if not force and self.umap is not None and n < self.refit_growth * self.umap.n_points:
            return False
        embeddings = controller.embeddings[:n].copy()
        layout = controller.layout[:n].astype(np.float64)
        init = layout if np.isfinite(layout).all() and np.ptp(layout, axis=0).min() > 0 else None
        settings, backend = self.settings, self.backend
        if settings.n_epochs is None:
            # A refit starts from the current layout, so fewer epochs suffice; on 2 cores
            # umap's default 200 epochs at 100k points take over a minute.
            settings = replace(settings, n_epochs=200 if n <= 10_000 else 100 if n <= 50_000 else 50)

        def job():
            yield Progress(0, 1, "steps", f"fitting UMAP on {n} points")
            return backend.fit(embeddings, settings, init)

        self._fitting = True
        self._set_status(f"{self.layout_label} · fitting UMAP on {n} points")
        # A fit finishing after the points were cleared (the generation moved on) is stale.
        generation = self._model_generation
        self._fit_runner.submit(
            f"UMAP fit of {n} points", job, lambda update: self._on_fit(update, generation), kind="fit"
        )
        return True

    def _on_fit(self, update: JobUpdate, generation: int) -> None:
        if not update.terminal:
            return
        self._fitting = False
        if generation != self._model_generation:
            log.info("UMAP fit of points since cleared: ignored")
            self.request_fit(force=False)
            return
        if update.event != "finished":
            if update.event == "failed":
                from segscope.app.child_process import ChildProcessFailure

                log.warning("UMAP fit failed: %s", update.error)
                if isinstance(update.error, ChildProcessFailure) and not self._fit_retried:
                    # The projection child died or hung: the next request starts a new one, so
                    # fit again once at once rather than leave the plot on PCA until more points.
                    self._fit_retried = True
                    self._set_status(f"{self.layout_label} · UMAP process lost ({update.error}); fitting again")
                    self.request_fit(force=True)
                    return
                self._set_status(
                    f"{self.layout_label} · UMAP failed: {update.error}. "
                    "A new fit starts when more segments are embedded."
                )
            return
        self._fit_retried = False
        model: UmapModel = update.result
        controller = self.controller
        fitted = np.arange(model.n_points)
        current = controller.layout[: model.n_points]
        # Show the new layout in the current picture's frame, and place later points in
        # that same frame (transform returns the model's own coordinates).
        alignment = Similarity.fit(model.layout, current) if np.isfinite(current).all() else Similarity.identity()
        layout = alignment.apply(model.layout)
        self.umap, self._alignment = model, alignment
        self._model_generation += 1
        self.last_fit_seconds = model.fit_seconds
        controller.set_layout(fitted, layout, kind="umap", animate=True)
        self._set_status(self.layout_label)
        # Everything after the fitted rows (including points placed by the old model) is
        # placed again by the new one.
        self._pending = [np.arange(model.n_points, controller.n_points, dtype=np.int64)]
        self._schedule_placement()
        self.request_fit(force=False)

    def _schedule_placement(self) -> None:
        if self._placing or self.umap is None:
            return
        rows = np.unique(np.concatenate(self._pending)) if self._pending else np.zeros(0, np.int64)
        self._pending = []
        if len(rows) == 0:
            return
        model, generation, alignment = self.umap, self._model_generation, self._alignment
        embeddings = self.controller.embeddings[rows].copy()

        def job():
            yield Progress(0, len(rows), "points", "placing new points")
            return alignment.apply(model.transform(embeddings))

        def on_update(update: JobUpdate) -> None:
            if not update.terminal:
                return
            self._placing = False
            if update.event == "finished" and generation == self._model_generation:
                self.controller.set_layout(rows, update.result)
            elif update.event == "failed":
                from segscope.app.projection_process import ModelNotFoundError

                log.warning("placing %d points failed: %s", len(rows), update.error)
                if isinstance(update.error, ModelNotFoundError) and generation == self._model_generation:
                    # The backend lost the model (its process died): only a refit places points again.
                    self._pending.append(rows)
                    self.request_fit(force=True)
                    return
            self._schedule_placement()

        self._placing = True
        # A backend says whether a transform may run beside a fit: numba's fallback
        # threading layer aborts on concurrent launches; the child process serialises them.
        runner = self._place_runner if self.backend.concurrent_transforms else self._fit_runner
        runner.submit(f"placing {len(rows)} points", job, on_update, kind="place", supersede=False)
