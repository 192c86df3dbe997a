"""Between the live session and a saved one (no Qt): what goes into a session file, and
how a loaded one is put back.

A session file (:mod:`segscope.app.session_file`) names the data sources, the model and
classifiers, the 3-D and plot selections, the manual labels and the plot settings; its
sidecar holds every analysed segment's record (embeddings, predictions), so reopening
shows the same points and predictions without embedding anything again.

The window calls these functions on the Qt thread and does the file I/O on a worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from segscope.app.state import SegmentRecord, SessionState

log = logging.getLogger(__name__)


def _local_or_url(text: str | None) -> str | None:
    """Absolute path for a local path; URLs (``scheme://``) as given."""
    if text is None:
        return None
    text = str(text)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def session_records(state: SessionState) -> list[SegmentRecord]:
    """The session's analysed segments that have at least one embedding, by id."""
    return [record for _, record in sorted(state.records.items()) if record.n_embedded]


def build_document(
    state: SessionState,
    controller,
    labels,
    *,
    plot_settings: dict | None = None,
    selected_segments: Iterable[int] = (),
    selected_nodes: Iterable[tuple[int, int]] = (),
):
    """A :class:`segscope.app.session_file.SessionDocument` of the live session.

    Parameters
    ----------
    state, controller, labels
        The window's :class:`SessionState`, :class:`segscope.app.controller.AppController` and
        :class:`segscope.app.labels.LabelStore`.
    plot_settings
        The plot's settings (colour mode, tool, view range).
    selected_segments, selected_nodes
        The plot's selection: segment ids and (segment id, node id) pairs.

    Raises
    ------
    ValueError
        When no data is open.
    """
    from segscope.app.session_file import DatasetRef, PrecomputedRef, SessionDocument

    if controller.source is None or state.dataset is None:
        raise ValueError("no data is open: nothing to save")
    model_path = getattr(controller, "model_path", None)
    classifiers = state.classifiers
    return SessionDocument(
        dataset=DatasetRef.from_summary(state.dataset),
        precomputed=None if controller.precomputed is None else PrecomputedRef.from_embeddings(controller.precomputed),
        model_path=None if model_path is None else str(model_path),
        classifiers_folder=None if classifiers is None else str(classifiers.folder),
        current_segment=None if state.segment is None else int(state.segment.segment_id),
        selected_segments=sorted(int(s) for s in selected_segments),
        selected_nodes=[[int(s), int(n)] for s, n in selected_nodes],
        labels=labels.to_dict(),
        plot=dict(plot_settings or {}),
    )


def same_data(document, controller) -> bool:
    """Whether ``document`` was saved on the data the controller has open."""
    source = controller.source
    if source is None:
        return False
    dataset = document.dataset
    return _local_or_url(dataset.image_url) == _local_or_url(source.image_url) and _local_or_url(
        dataset.segmentation_url
    ) == _local_or_url(source.segmentation_url)


def restore_records(state: SessionState, records: Iterable[SegmentRecord]) -> list[SegmentRecord]:
    """Put saved segment records back into the session archive (not selected)."""
    restored = []
    for record in records:
        if state.segment is not None and state.segment.segment_id == record.segment_id:
            state.clear_segment()  # the saved record replaces the live one of the same segment
        state.restore_record(record)
        restored.append(record)
    return restored


def replay_into_plot(plot_controller, records: Iterable[SegmentRecord]) -> int:
    """Plot the embedded nodes of ``records`` with their predictions; returns points added."""
    added = 0
    for record in records:
        if record.embedded is None or record.node_ids is None or not record.embedded.any():
            continue
        rows = np.flatnonzero(record.embedded)
        compartments = None if record.predicted is None else record.predicted[rows]
        new = plot_controller.add_points(
            record.segment_id,
            record.node_ids[rows],
            record.positions_nm[rows],
            record.embeddings[rows],
            compartments=compartments,
        )
        added += len(new)
        plot_controller.set_segment_labels(record.segment_id, cell_type=record.cell_type, ood_score=record.ood_score)
    return added
