"""The Qt-free session model: links between its sub-models, documents, restore."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from segscope.analysis.artefacts import ClassifierInfo, ClassifierSummary
from segscope.app.session import Session
from segscope.app.session_file import load_session, save_session
from segscope.app.state import DatasetSummary


def _summary(tmp_path) -> DatasetSummary:
    return DatasetSummary(
        name="demo",
        image_url=str(tmp_path / "image"),
        segmentation_url=str(tmp_path / "segmentation"),
        skeletons_url=None,
        voxel_size_nm=(32.0, 32.0, 40.0),
        shape_vox=(96, 96, 96),
    )


def _source(summary: DatasetSummary):
    """A stand-in DataSource: what the session reads of one (URLs and the summary)."""
    return SimpleNamespace(
        image_url=summary.image_url, segmentation_url=summary.segmentation_url, summary=lambda: summary
    )


def _stream(session: Session, segment_id: int, n: int, offset: float) -> None:
    """What an embedding job does to the state: centres, embeddings, predictions, the batch."""
    state = session.state
    state.select_segment(segment_id)
    state.set_centres(segment_id, np.arange(n) * 2, np.arange(n * 3, dtype=float).reshape(n, 3) * 100)
    indices = np.arange(n)
    state.add_embeddings(segment_id, indices, np.full((n, 4), offset) + np.eye(n, 4))
    state.set_predictions(segment_id, predicted=np.arange(n) % 3, cell_type="basket", ood_score=0.2)
    state.announce_batch(segment_id, indices)


@pytest.fixture
def session(tmp_path) -> Session:
    session = Session()
    session.set_source(_source(_summary(tmp_path)))
    session.model_path = tmp_path / "model.keras"
    _stream(session, 7, 5, 0.0)
    _stream(session, 9, 3, 3.0)
    session.state.select_segment(11)  # selected, nothing embedded: not part of the saved session
    return session


def test_embedded_batches_predictions_and_labels_reach_the_plot_model(session):
    plot = session.plot
    assert plot.n_points == 8
    rows = plot.segment_rows([7])
    np.testing.assert_array_equal(plot.compartments[rows], np.arange(5) % 3)
    assert plot.cell_type_names == ["basket"] and np.allclose(plot.ood_scores, 0.2)
    session.labels.assign_nodes("spine", [7, 7], [0, 2])
    assert list(plot.manual_labels[rows]) == ["spine", "spine", "", "", ""]  # node ids 0 and 2 of 0, 2, 4, 6, 8
    session.labels.undo()
    assert list(plot.manual_labels[rows]) == [""] * 5


def test_classifier_classes_order_the_plot_colours_and_selection_follows_3d(session):
    info = ClassifierInfo("cell_type", "t.npz", ("pyramidal", "basket"), 10_000.0, 0.5, 4, "c")
    session.state.set_classifiers(ClassifierSummary("f", cell_type=info))
    assert session.plot.cell_type_class_names == ("pyramidal", "basket")
    session.state.select_segment(9)  # a double click in 3-D
    assert session.plot.selected_segments == frozenset({9})


def test_new_data_drops_labels_and_points(session, tmp_path):
    session.labels.assign_segments("glia", [9])
    seen = []
    session.events.source.connect(seen.append)
    other = _summary(tmp_path / "other")
    session.set_source(_source(other))
    assert seen and session.state.dataset == other
    assert session.plot.n_points == 0 and session.labels.n_labelled_segments == 0
    assert session.state.records == {}


def test_document_round_trip_restores_records_labels_selection_and_plot(session, tmp_path):
    session.labels.assign_nodes("spine", [7, 7], [0, 2])
    session.labels.assign_segments("glia", [9])
    assert [r.segment_id for r in session.records()] == [7, 9]
    session.plot.set_class_hidden("glia")  # a legend class hidden in the subcompartment mode
    session.plot.set_colour_mode("cell type")
    session.plot.select_rows(session.plot.rows_of([7], [2]), origin="plot")
    session.plot.hide_segments([9])
    session.plot_view = {"tool": "lasso", "view_range": [[0.0, 1.0], [2.0, 3.0]]}

    document = session.document()
    assert document.current_segment == 11 and document.selected_nodes == [[7, 2]]
    assert document.model_path.endswith("model.keras")
    assert document.plot == {
        "tool": "lasso",
        "view_range": [[0.0, 1.0], [2.0, 3.0]],
        "colour_mode": "cell type",
        "hidden_segments": [9],
        "hidden_classes": {"subcompartment": ["glia"]},
    }
    path = save_session(tmp_path / "a.segscope.json", document, list(session.records_snapshot().values()))
    loaded, records = load_session(path)

    fresh = Session()
    fresh.set_source(_source(_summary(tmp_path)))
    assert fresh.has_same_data(loaded)
    as_urls = Session()  # the same folders named as file:// URLs with a Neuroglancer prefix
    as_urls.set_source(
        SimpleNamespace(
            image_url=f"precomputed://file://{tmp_path / 'image'}",
            segmentation_url=f"file://{tmp_path / 'segmentation'}",
            summary=lambda: session.state.dataset,
        )
    )
    assert as_urls.has_same_data(loaded)
    other = Session()
    other.set_source(
        SimpleNamespace(image_url="gs://o/i", segmentation_url="gs://o/s", summary=lambda: session.state.dataset)
    )
    assert not other.has_same_data(loaded)

    fresh.state.select_segment(7)  # a live record of a saved segment is replaced by the saved one
    shown, restored = [], []
    fresh.events.plot_settings.connect(shown.append)
    fresh.events.restored.connect(lambda document, records: restored.append(len(records)))
    fresh.restore(loaded, records)
    assert restored == [2] and shown[0]["tool"] == "lasso"
    assert sorted(fresh.state.records) == [7, 9]
    np.testing.assert_array_equal(fresh.state.records[7].embeddings, session.state.records[7].embeddings)
    plot = fresh.plot
    assert plot.n_points == 8 and plot.colour_mode == "cell type" and plot.hidden_segments == frozenset({9})
    assert plot.hidden_classes_by_mode() == {"subcompartment": ["glia"]}
    assert not plot.can_undo_hide  # a restored hide is the session's state, not an edit to undo
    rows = plot.segment_rows([7])
    assert list(plot.manual_labels[rows]) == ["spine", "spine", "", "", ""]  # node ids 0 and 2 of 0, 2, 4, 6, 8
    assert (plot.manual_labels[plot.segment_rows([9])] == "glia").all()
    assert plot.selected_segments == frozenset({7}) and len(plot.selected_rows) == 1
    assert fresh.plot_view == {"tool": "lasso", "view_range": [[0.0, 1.0], [2.0, 3.0]]}


def test_unreadable_labels_are_reported_and_the_rest_restored(session, tmp_path):
    document = session.document()
    broken = type(document)(**{**document.__dict__, "labels": {"nodes": "nonsense"}})
    errors = []
    fresh = Session()
    fresh.state.events.error.connect(errors.append)
    fresh.set_source(_source(_summary(tmp_path)))
    fresh.restore(broken, session.records())
    assert errors and "labels are unreadable" in errors[0]
    assert fresh.plot.n_points == 8


def test_nothing_open_cannot_be_saved():
    with pytest.raises(ValueError, match="no data is open"):
        Session().document()


def test_colours_are_the_same_before_and_after_a_restore(tmp_path):
    """Cell-type colours follow the name: not the classifier (loaded or not) nor arrival order."""
    from segscope.analysis.colours import cell_type_colour, hex_rgba

    modes = ("cell type", "subcompartment", "manual label")

    def point_colours(s: Session) -> dict[tuple[str, int, int], tuple[int, ...]]:
        shown = {}
        mode = s.plot.colour_mode
        for each in modes:
            s.plot.set_colour_mode(each)
            colours = s.plot.colours()
            rgba = colours.palette[colours.index]
            for seg, node, c in zip(s.plot.segment_ids, s.plot.node_ids, rgba, strict=True):
                shown[each, int(seg), int(node)] = tuple(int(v) for v in c)
        s.plot.set_colour_mode(mode)
        return shown

    info = ClassifierInfo("cell_type", "t.npz", ("astrocyte", "excitatory", "inhibitory"), 10_000.0, 0.5, 4, "c")
    session = Session()
    session.set_source(_source(_summary(tmp_path)))
    session.state.set_classifiers(ClassifierSummary("f", cell_type=info))
    for segment_id, cell_type, offset in ((7, "excitatory", 0.0), (9, "astrocyte", 3.0)):
        _stream(session, segment_id, 4, offset)
        session.state.set_predictions(segment_id, cell_type=cell_type)
    assert session.plot.cell_type_names == ["basket", "excitatory", "astrocyte"]  # first-seen order
    session.labels.assign_nodes("spine", [7], [0])
    session.plot.set_colour_mode("cell type")
    before = point_colours(session)
    path = save_session(tmp_path / "c.segscope.json", session.document(), list(session.records_snapshot().values()))

    fresh = Session()
    fresh.set_source(_source(_summary(tmp_path)))
    # Restored records come back in another order and with no classifier loaded yet.
    loaded, records = load_session(path)
    fresh.restore(loaded, records[::-1])
    assert fresh.plot.cell_type_class_names == () and fresh.plot.colour_mode == "cell type"
    assert fresh.plot.cell_type_names == ["astrocyte", "excitatory"]  # another first-seen order
    assert point_colours(fresh) == before
    fresh.state.set_classifiers(ClassifierSummary("f", cell_type=info))
    assert point_colours(fresh) == before
    colours = fresh.plot.colours()
    excitatory = colours.palette[colours.index[fresh.plot.segment_rows([7])[0]]]
    assert tuple(excitatory[:3]) == hex_rgba(cell_type_colour("excitatory"))[:3]
