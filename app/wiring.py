"""Where SegScope's parts are connected to each other: one place, not inside a view.

The session model links its own sub-models (:mod:`segscope.app.session`). What is linked
here is the model to the 3-D view (the Neuroglancer bridge) and to the plot dock:

* plot -> 3-D: a selection made in the plot selects its segments in the segmentation layer
  and rings its nodes; the hovered point gets a marker on its node; a clicked point moves
  the 3-D view to its node;
* 3-D -> plot: segments selected in Neuroglancer's own controls light up their points
  (origin ``"3d"``, never sent back). The bridge calls back on neuroglancer's server
  thread, so the change is posted to the thread that owns the model;
* labels -> the plot's label bar and the 3-D "manual labels" layer (through the dock);
* Find similar -> plot and 3-D: an answer selects its segments in both; shift + right click
  in 3-D asks (:func:`link_find_similar`);
* the session -> the plot view: restored plot settings (tool, view range); the plot view ->
  the session: its tool and view range, saved with the session.

This module imports no Qt: it connects psygnal events of the Qt-free models and the Qt
signals of the views it is handed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from segscope.app.events import connect
from segscope.app.jobs import Post
from segscope.app.plot_controller import PLOT_ORIGIN, VIEW_3D_ORIGIN, PlotController, PointInfo, Selection
from segscope.app.session import Session

if TYPE_CHECKING:
    from segscope.app.find_similar import FindSimilar
    from segscope.app.neuroglancer_bridge import NeuroglancerBridge
    from segscope.app.views.embedding_plot import EmbeddingPlotDock

log = logging.getLogger(__name__)


def link_plot_to_viewer(plot: PlotController, viewer: NeuroglancerBridge, post: Post) -> Callable[[], None]:
    """Link the plot model and the 3-D view both ways (see the module docstring).

    Returns a function that undoes the links.
    """
    from segscope.app.neuroglancer_bridge import MAX_SELECTED_NODES as ring_limit

    def on_selection(selection: Selection) -> None:
        if selection.origin == PLOT_ORIGIN:
            viewer.highlight_segments(sorted(selection.segment_ids))
        # The plot's own node selections are ringed in 3-D; a selection made elsewhere (3-D,
        # a restored session) is whole segments, already shown there, so the rings go.
        rows = selection.rows if selection.origin == PLOT_ORIGIN else np.zeros(0, np.int64)
        if len(rows) > ring_limit:  # the bridge's subsample, taken before building tuples
            rows = rows[np.linspace(0, len(rows) - 1, ring_limit).astype(np.int64)]
        viewer.show_selected_nodes(
            [(int(plot.segment_ids[r]), int(plot.node_ids[r]), tuple(map(float, plot.xyz_nm[r]))) for r in rows]
        )

    def node(info: PointInfo | None):
        return None if info is None else (info.segment_id, info.node_id, info.xyz_nm)

    def select_from_3d(segments: frozenset[int]) -> None:
        def select() -> None:
            plot.select_segments(segments, VIEW_3D_ORIGIN)

        post(select)  # called on neuroglancer's server thread: the model changes on its own

    undo = [
        connect(plot.events.selection, on_selection),  # every origin: 3-D and session ones clear the rings
        connect(plot.events.hover, lambda info: viewer.highlight_node(node(info)), name=VIEW_3D_ORIGIN),
        connect(plot.events.activate, lambda info: viewer.highlight_node(node(info), move=True), name=VIEW_3D_ORIGIN),
        viewer.on_segments_changed(select_from_3d),
    ]

    def unlink() -> None:
        for u in undo:
            u()

    return unlink


def link_plot_dock(
    session: Session,
    dock: EmbeddingPlotDock,
    *,
    viewer: NeuroglancerBridge | None = None,
    post: Post | None = None,
    report: Callable[[str], Any] | None = None,
) -> None:
    """Link an embedding plot dock (built on ``session.plot``) to the session and, when given, the 3-D ``viewer``.

    Parameters
    ----------
    session
        The session; ``dock.plot.controller`` must be ``session.plot``.
    dock
        The :class:`~segscope.app.views.embedding_plot.EmbeddingPlotDock`.
    viewer
        The Neuroglancer bridge, or None.
    post
        Runs a function on the thread that owns the session (default: the plot's invoker).
    report
        Shows a one-line message (the status bar).
    """
    plot = dock.plot
    if plot.controller is not session.plot:
        raise ValueError("the plot dock must be built on the session's plot model (session.plot)")
    if viewer is not None:
        link_plot_to_viewer(session.plot, viewer, post or plot.invoker.post)
    dock.attach_labels(
        session.labels,
        show_labels=None if viewer is None else viewer.show_labels,
        current_segment=session.current_segment_id,
        report=report or (lambda message: log.info("%s", message)),
    )
    connect(session.events.plot_settings, plot.apply_view_settings)

    def keep_view(settings: dict) -> None:
        session.plot_view = dict(settings)

    plot.viewChanged.connect(keep_view)
    keep_view(plot.view_settings())


def link_find_similar(finder: FindSimilar, viewer: Any = None, post: Post | None = None) -> Callable[[], None]:
    """Show Find similar answers in the plot and in 3-D, and let shift + right click in 3-D ask.

    An answer selects the query segment(s) and the top-k segments in the plot (origin
    :data:`~segscope.app.find_similar.SIMILAR_ORIGIN`) and in the segmentation layer.
    ``viewer`` is the Neuroglancer bridge (None headless); its find-similar action runs on
    neuroglancer's server thread and is ``post``-ed to the thread that owns the session.
    Returns a function that undoes the links.
    """
    from segscope.app.find_similar import SIMILAR_ORIGIN, bind_find_similar_action

    def on_results(result) -> None:
        segments = [*result.query_segments, *result.segment_ids]
        finder.plot.select_segments(segments, SIMILAR_ORIGIN)
        if viewer is not None:
            viewer.highlight_segments(segments)

    undo = [connect(finder.events.results, on_results)]
    if viewer is not None and post is not None:

        def on_request(segment_id: int | None) -> None:
            if segment_id is None:
                post(lambda: finder.events.error.emit("Find similar: no segment under the cursor."))
            else:

                def find() -> None:
                    finder.find([segment_id])

                post(find)

        undo.append(bind_find_similar_action(viewer, on_request))

    def unlink() -> None:
        for u in undo:
            u()

    return unlink
