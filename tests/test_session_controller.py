"""Between the live session and a saved one: the document, same-data check, and replay."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from segscope.app.labels import LabelStore
from segscope.app.plot_controller import PlotController
from segscope.app.session_controller import (
    build_document,
    replay_into_plot,
    restore_records,
    same_data,
    session_records,
)
from segscope.app.session_file import load_session, save_session
from segscope.app.state import DatasetSummary, SessionState


def _state(tmp_path) -> SessionState:
    state = SessionState()
    state.set_dataset(
        DatasetSummary(
            name="demo",
            image_url=str(tmp_path / "image"),
            segmentation_url=str(tmp_path / "segmentation"),
            skeletons_url=None,
            voxel_size_nm=(32.0, 32.0, 40.0),
            shape_vox=(96, 96, 96),
        )
    )
    for segment_id, n, offset in ((7, 5, 0.0), (9, 3, 3.0)):
        state.select_segment(segment_id)
        state.set_centres(segment_id, np.arange(n) * 2, np.arange(n * 3, dtype=float).reshape(n, 3) * 100)
        state.add_embeddings(segment_id, np.arange(n), np.full((n, 4), offset) + np.eye(n, 4))
        state.set_predictions(segment_id, predicted=np.arange(n) % 3, cell_type="basket", ood_score=0.2)
    state.select_segment(11)  # selected, nothing embedded: not part of the saved session
    return state


def _controller(state, tmp_path):
    source = SimpleNamespace(image_url=state.dataset.image_url, segmentation_url=state.dataset.segmentation_url)
    return SimpleNamespace(source=source, precomputed=None, model_path=tmp_path / "model.keras")


def test_document_round_trip_restores_records_labels_and_plot(tmp_path):
    state = _state(tmp_path)
    controller = _controller(state, tmp_path)
    labels = LabelStore()
    labels.assign_nodes("spine", [7, 7], [0, 2])
    labels.assign_segments("glia", [9])
    assert [r.segment_id for r in session_records(state)] == [7, 9]

    document = build_document(
        state,
        controller,
        labels,
        plot_settings={"colour_mode": "cell type"},
        selected_segments=[9],
        selected_nodes=[(7, 2)],
    )
    assert document.current_segment == 11 and document.selected_nodes == [[7, 2]]
    assert document.model_path.endswith("model.keras") and document.plot == {"colour_mode": "cell type"}
    path = save_session(tmp_path / "a.segscope.json", document, session_records(state))
    loaded, records = load_session(path)
    assert same_data(loaded, controller)
    assert not same_data(
        loaded, SimpleNamespace(source=SimpleNamespace(image_url="gs://other/image", segmentation_url="gs://other/seg"))
    )

    fresh = SessionState()
    fresh.set_dataset(state.dataset)
    fresh.select_segment(7)  # a live record of a saved segment is replaced by the saved one
    restored = restore_records(fresh, records)
    assert fresh.segment is None and sorted(fresh.records) == [7, 9]
    np.testing.assert_array_equal(fresh.records[7].embeddings, state.records[7].embeddings)
    plot = PlotController()
    restored_labels = LabelStore()
    restored_labels.load_dict(loaded.labels)
    plot.label_lookup = restored_labels.effective_node_labels
    assert replay_into_plot(plot, restored) == 8
    rows = plot.segment_rows([7])
    np.testing.assert_array_equal(plot.compartments[rows], np.arange(5) % 3)
    assert plot.cell_type_names == ["basket"] and np.allclose(plot.ood_scores, 0.2)
    assert list(plot.manual_labels[rows]) == ["spine", "spine", "", "", ""]  # nodes 0, 2 of 0, 2, 4, 6, 8
    assert (plot.manual_labels[plot.segment_rows([9])] == "glia").all()


def test_nothing_open_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="no data is open"):
        build_document(SessionState(), SimpleNamespace(source=None, precomputed=None), LabelStore())
