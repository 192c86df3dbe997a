"""The session's segment archive (SessionState.records) and the session export."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.artefacts import ClassifierInfo, ClassifierSummary
from segscope.analysis.centres import contract_skeleton
from segscope.analysis.export import NOT_PREDICTED, SkeletonEdges, read_node_table, read_segment_table
from segscope.analysis.progress import drive
from segscope.app.labels import LabelStore
from segscope.app.session_export import NOTHING_TO_EXPORT, export_session as _export_session, session_tables
from segscope.app.state import UNKNOWN_COMPARTMENT, DatasetSummary, ModelSummary, SegmentRecord, SessionState

AXON, DENDRITE, SOMA = (COMPARTMENTS.index(n) for n in ("axon", "dendrite", "soma"))
IMAGE_URL = "precomputed://file:///data/demo/image"
SEGMENTATION_URL = "precomputed://file:///data/demo/segmentation"


def export_session(folder, state, labels, **options):
    """Export a SessionState's records as the service does."""
    return _export_session(
        folder,
        state.records,
        labels,
        dataset=state.dataset,
        model=state.model,
        classifiers=state.classifiers,
        **options,
    )


def _dataset(name: str = "demo") -> DatasetSummary:
    return DatasetSummary(
        name=name,
        image_url=IMAGE_URL,
        segmentation_url=SEGMENTATION_URL,
        skeletons_url=None,
        voxel_size_nm=(8.0, 8.0, 40.0),
        shape_vox=(256, 256, 64),
    )


def _positions(n: int, offset: float) -> np.ndarray:
    return np.column_stack([np.arange(n) * 100.0 + offset, np.full(n, 2000.0), np.full(n, 400.0)])


@pytest.fixture
def session(tmp_path) -> SessionState:
    """Three segments selected in turn: 11 partly embedded with predictions, 22 embedded
    without classifiers, 33 selected last and not embedded yet."""
    weights = tmp_path / "encoder.keras"
    weights.write_bytes(b"not really weights")
    state = SessionState()
    state.set_dataset(_dataset())
    state.set_model(ModelSummary("segscope_lite", str(weights), True, 8, (65, 65, 65), (32.0, 32.0, 32.0)))
    cell_type = ClassifierInfo("cell_type", "ct.npz", ("basket", "pyramidal"), 10_000.0, 0.4, 8, "SNGP")
    state.set_classifiers(ClassifierSummary(str(tmp_path), cell_type=cell_type))

    state.select_segment(11, click_nm=[0, 2000, 400])
    state.set_centres(11, [5, 6, 7, 8], _positions(4, 0.0))
    state.add_embeddings(11, [0, 1, 3], np.ones((3, 8)))  # centre 2 (node 7) still pending
    state.set_predictions(
        11,
        predicted=[AXON, AXON, DENDRITE, UNKNOWN_COMPARTMENT],
        probability=[0.9, 0.8, 0.7, np.nan],
        uncertainty=[0.1, 0.2, 0.3, np.nan],
        cell_type="pyramidal",
        cell_type_probability=0.75,
        cell_type_probabilities={"basket": 0.25, "pyramidal": 0.75},
        ood_score=0.55,
        ood_flagged=True,
        ood_threshold=0.4,
    )

    state.select_segment(22)
    state.set_centres(22, [1, 2], _positions(2, 5000.0))
    state.add_embeddings(22, [0, 1], np.zeros((2, 8)))

    state.select_segment(33)
    state.set_centres(33, [1, 2, 3], _positions(3, 9000.0))
    return state


@pytest.fixture
def labels() -> LabelStore:
    store = LabelStore()
    store.assign_nodes("bouton", 11, [6])
    store.assign_segments("chandelier?", 22)
    store.assign_nodes("spine", 22, [2])
    return store


# ------------------------------------------------------------------------- the archive


def test_every_selected_segment_is_archived(session):
    assert sorted(session.records) == [11, 22, 33]
    assert session.segment is session.records[33]
    assert session.records[11].n_embedded == 3 and session.records[11].cell_type == "pyramidal"


def test_selecting_again_replaces_the_archived_record(session):
    old = session.records[11]
    record = session.select_segment(11)
    assert session.records[11] is record is not old and record.n_centres == 0
    assert sorted(session.records) == [11, 22, 33]


def test_opening_a_dataset_clears_the_archive(session):
    session.set_dataset(_dataset("other"))
    assert session.records == {} and session.segment is None


def test_restore_record_archives_without_selecting(session):
    heard = []
    session.subscribe("segment", heard.append)
    restored = SegmentRecord(
        segment_id=44, node_ids=np.array([1]), positions_nm=np.zeros((1, 3)), embedded=np.array([True])
    )
    session.restore_record(restored)
    assert session.records[44] is restored and session.segment.segment_id == 33 and heard == []
    replacement = SegmentRecord(segment_id=22)
    session.restore_record(replacement)
    assert session.records[22] is replacement


def test_restore_record_refuses_bad_input(session):
    with pytest.raises(TypeError, match="SegmentRecord"):
        session.restore_record({"segment_id": 5})
    with pytest.raises(ValueError, match="nonzero uint64"):
        session.restore_record(SegmentRecord(segment_id=0))
    with pytest.raises(ValueError, match="segment 33 is selected"):
        session.restore_record(SegmentRecord(segment_id=33))
    assert session.records[33] is session.segment


# ---------------------------------------------------------------------------- the tables


def test_session_tables_hold_embedded_nodes_predictions_and_labels(session, labels):
    nodes, segments, provenance = session_tables(
        session.records,
        labels,
        dataset_name="demo",
        model_name="segscope_lite",
        cell_type_names=("basket", "pyramidal"),
    )

    # 11: centres 0, 1, 3 (node 7 is pending), then 22; 33 has no embeddings
    assert nodes.segment_id.tolist() == [11, 11, 11, 22, 22]
    assert nodes.node_id.tolist() == [5, 6, 8, 1, 2]
    np.testing.assert_allclose(nodes.xyz_nm[2], [300.0, 2000.0, 400.0])
    assert nodes.compartment.tolist() == [AXON, AXON, NOT_PREDICTED, NOT_PREDICTED, NOT_PREDICTED]
    np.testing.assert_allclose(nodes.compartment_probability[:2, AXON], [0.9, 0.8], rtol=1e-6)
    assert np.isnan(nodes.compartment_probability[:2, DENDRITE]).all()  # not known, not 0
    assert np.isnan(nodes.compartment_probability[2:]).all()
    # A node's OOD score is its segment's, as in embed's node table and the plot.
    np.testing.assert_allclose(nodes.ood_score[:3], 0.55, rtol=1e-6)
    assert np.isnan(nodes.ood_score[3:]).all()  # segment 22 has no cell-type call
    assert nodes.manual_label.tolist() == ["", "bouton", "", "chandelier?", "spine"]

    assert segments.segment_id.tolist() == [11, 22]
    assert segments.cell_type_names == ("basket", "pyramidal")
    assert segments.cell_type.tolist() == ["pyramidal", ""]
    np.testing.assert_allclose(segments.cell_type_probability[0], [0.25, 0.75])
    assert np.isnan(segments.cell_type_probability[1]).all()
    np.testing.assert_allclose(segments.ood_score[0], 0.55)
    assert segments.ood.tolist() == [True, False]
    assert segments.compartment_node_counts[0, AXON] == 2 and segments.compartment_node_counts.sum() == 2
    assert segments.manual_label.tolist() == ["", "chandelier?"]
    assert provenance.dataset == "demo" and provenance.model_name == "segscope_lite"
    assert provenance.ood_threshold == 0.4  # from the records, which agree


def test_session_tables_name_cell_types_the_classifier_does_not(session, labels):
    _, segments, _ = session_tables(session.records.values(), labels, dataset_name="d", model_name="m")
    assert segments.cell_type_names == ("basket", "pyramidal")  # from the record's probabilities
    session.records[22].cell_type = "glia"
    _, segments, _ = session_tables(
        session.records, labels, dataset_name="d", model_name="m", cell_type_names=("pyramidal",)
    )
    assert segments.cell_type_names == ("pyramidal", "basket", "glia")
    assert segments.cell_type.tolist() == ["pyramidal", "glia"]


def test_nothing_embedded_is_an_error(labels):
    state = SessionState()
    state.set_dataset(_dataset())
    state.select_segment(5)
    state.set_centres(5, [1], _positions(1, 0.0))
    with pytest.raises(ValueError, match=NOTHING_TO_EXPORT):
        session_tables(state.records, labels, dataset_name="d", model_name="m")
    with pytest.raises(ValueError, match=NOTHING_TO_EXPORT):
        session_tables({}, labels, dataset_name="d", model_name="m")
    with pytest.raises(ValueError, match=NOTHING_TO_EXPORT):
        export_session("unused", state, labels)


def test_session_tables_refuse_bad_input(session, labels):
    with pytest.raises(ValueError, match="LabelStore"):
        session_tables(session.records, {"11": "axon"}, dataset_name="d", model_name="m")
    with pytest.raises(ValueError, match="SegmentRecord"):
        session_tables([session.records[11], "x"], labels, dataset_name="d", model_name="m")
    with pytest.raises(ValueError, match=r"segments \[11\] appear in more than one record"):
        session_tables([session.records[11], session.records[11]], labels, dataset_name="d", model_name="m")
    broken = session.records[22]
    broken.positions_nm = broken.positions_nm[:1]  # a record whose arrays disagree
    with pytest.raises(ValueError, match=r"segment 22: positions_nm has shape \(1, 3\), expected \(2, 3\)"):
        session_tables(session.records, labels, dataset_name="d", model_name="m")


# ---------------------------------------------------------------------------- the export


def test_export_session_writes_a_bundle_that_reads_back(session, labels, tmp_path):
    folder = tmp_path / "bundle"
    result = drive(export_session(folder, session, labels))
    assert result.folder == folder
    assert {"annotations", "segment_properties", "state", "tables", "cave"} <= set(result.files)

    nodes, provenance = read_node_table(folder / "nodes.parquet")
    assert nodes.node_id.tolist() == [5, 6, 8, 1, 2]
    assert nodes.manual_label.tolist() == ["", "bouton", "", "chandelier?", "spine"]
    assert [COMPARTMENTS[c] if c >= 0 else None for c in nodes.compartment] == ["axon", "axon", None, None, None]
    assert provenance.dataset == "demo" and provenance.model_name == "segscope_lite"
    assert provenance.aggregation_radius_nm == 10_000.0 and provenance.ood_threshold == 0.4
    assert provenance.checkpoint_sha256 == hashlib.sha256(b"not really weights").hexdigest()

    segments, _ = read_segment_table(folder / "segments.parquet")
    assert segments.segment_id.tolist() == [11, 22]
    assert segments.cell_type.tolist() == ["pyramidal", ""]
    assert segments.cell_type_names == ("basket", "pyramidal")
    assert segments.manual_label.tolist() == ["", "chandelier?"]
    assert segments.ood.tolist() == [True, False]
    csv_nodes, _ = read_node_table(folder / "nodes.csv")
    assert csv_nodes.manual_label.tolist() == nodes.manual_label.tolist()

    state = json.loads((folder / "state.json").read_text())
    sources = json.dumps(state)
    assert IMAGE_URL.split("://", 1)[1] in sources and SEGMENTATION_URL.split("://", 1)[1] in sources


def test_exported_annotations_carry_the_labels(session, labels, tmp_path):
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    folder = tmp_path / "bundle"
    drive(export_session(folder, session, labels, parts=("annotations",), table_formats=("csv",)))
    info = json.loads((folder / "annotations" / "info").read_text())
    assert info["annotation_type"] == "POINT"
    spec = {p["id"]: p for p in info["properties"]}
    assert spec["manual_label"]["enum_labels"] == ["none", "bouton", "chandelier?", "spine"]
    reader = AnnotationReader((folder / "annotations").resolve().as_uri() + "/")
    position = [p["id"] for p in info["properties"]].index("manual_label")
    names = spec["manual_label"]["enum_labels"]
    got = [names[int(reader.by_id[row].props[position])] for row in range(5)]
    assert got == ["none", "bouton", "none", "chandelier?", "spine"]
    assert len(reader.relationships["segment"][22]) == 2


def test_export_session_writes_swc_only_for_skeletons_of_exported_nodes(session, labels, tmp_path):
    skeletons = {
        22: SkeletonEdges(np.array([[1, 2]])),
        11: SkeletonEdges(np.array([[5, 6], [6, 7], [7, 8]])),  # node 7 is not embedded
        33: SkeletonEdges(np.array([[1, 2]])),  # not exported
    }
    result = drive(export_session(tmp_path / "b", session, labels, parts=("swc",), skeletons=skeletons))
    assert result.files["swc"] == ["skeletons/22.swc"]
    assert (tmp_path / "b" / "skeletons" / "22.swc").is_file()


def test_export_session_refuses_bad_input_and_keeps_existing_output(session, labels, tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        drive(export_session(folder, session, labels))
    assert (folder / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown export parts"):
        export_session(tmp_path / "x", session, labels, parts=("pdf",))
    with pytest.raises(ValueError, match="unknown table formats"):
        export_session(tmp_path / "x", session, labels, table_formats=("xlsx",))
    assert not (tmp_path / "x").exists()
    result = drive(export_session(folder, session, labels, parts=("tables",), force=True))
    assert sorted(result.files["tables"]) == ["nodes.csv", "nodes.parquet", "segments.csv", "segments.parquet"]
    assert not (folder / "mine.txt").exists()


def test_export_without_a_dataset_is_an_error(labels):
    with pytest.raises(ValueError, match="no dataset is open"):
        export_session("unused", SessionState(), labels)


def test_contracted_skeletons_make_swc_of_a_half_embedded_segment(session, labels, tmp_path):
    # segment 11's centres 5, 6, 8 are embedded, 7 is not: join what is there
    edges = np.array([[i, i + 1] for i in range(10)])
    embedded = session.records[11].node_ids[session.records[11].embedded]
    skeletons = {11: SkeletonEdges(contract_skeleton(11, edges, embedded))}
    result = drive(export_session(tmp_path / "b", session, labels, parts=("swc",), skeletons=skeletons))
    assert result.files["swc"] == ["skeletons/11.swc"]
    rows = [
        line.split()
        for line in (tmp_path / "b" / "skeletons" / "11.swc").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(rows) == 3 and sorted(int(r[6]) for r in rows).count(-1) == 1  # one tree, one root


def test_skeleton_edges_join_embedded_skeleton_nodes_and_skip_store_node_ids():
    from types import SimpleNamespace

    from segscope.analysis.skeletons import Skeleton
    from segscope.app.session_export import skeleton_edges

    # A Y-shaped skeleton: 0-1-2-3 trunk and 2-4-5 branch.
    nodes = np.array([[0, 0, 0], [100, 0, 0], [200, 0, 0], [300, 0, 0], [200, 100, 0], [200, 200, 0]], float)
    skeleton = Skeleton(5, nodes, np.array([[0, 1], [1, 2], [2, 3], [2, 4], [4, 5]]))
    source = SimpleNamespace(skeleton=lambda segment_id: skeleton if segment_id in (5, 6) else None)
    kept = np.array([0, 3, 5, 2])
    embedded = np.array([True, True, True, False])  # node 2 not embedded yet
    computed = SegmentRecord(5, node_ids=kept, positions_nm=nodes[kept], embedded=embedded)
    # Node ids of a CSV ZIP store: same positions, other numbering -> no SWC.
    stored = SegmentRecord(6, node_ids=np.array([10, 11, 12, 13]), positions_nm=nodes[kept], embedded=embedded)
    no_skeleton = SegmentRecord(7, node_ids=kept, positions_nm=nodes[kept], embedded=embedded)
    edges = skeleton_edges(source, {5: computed, 6: stored, 7: no_skeleton})
    assert list(edges) == [5]
    assert sorted(map(tuple, edges[5].edges.tolist())) == [(3, 0), (5, 0)]


# ------------------------------------------------------------- labelled context nodes


def _context_plot():
    """A plot with segment 11's record nodes and context points of segments 11, 55 and 66."""
    from segscope.app.plot_controller import PlotController

    plot = PlotController()
    plot.add_points(11, [5, 6, 8], _positions(3, 0.0), np.ones((3, 8)))
    # Context: 55 (three nodes), 66 (two), and a context copy of 11's node 6 plus its node 9.
    segments = np.array([55, 55, 55, 66, 66, 11, 11], np.uint64)
    nodes = np.array([1, 2, 3, 1, 2, 6, 9], np.int64)
    plot.add_points(
        segments,
        nodes,
        _positions(7, 20_000.0),
        np.zeros((7, 8)),
        compartments=[0, 1, 255, 2, 2, 0, 1],
        background=True,
    )
    plot.set_point_predictions(
        plot.rows_of(segments, nodes),
        cell_types=["basket"] * 3 + ["astro", "astro"] + [""] * 2,
        ood_scores=[0.1, 0.2, 0.3, 0.9, 0.7, 0.5, 0.5],
    )
    return plot


def test_labelled_context_nodes_are_exported_with_positions_and_predictions(session, labels):
    from segscope.app.session_export import ContextNodes

    plot = _context_plot()
    plot.label_lookup = labels.effective_node_labels
    labels.assign_nodes("bouton", 55, [2])
    labels.assign_nodes("spine", 11, [9])  # a context node of a segment with a record
    labels.assign_segments("astro!", 66)  # a segment label reaches every context node of 66
    plot.refresh_manual_labels()
    context = ContextNodes.from_plot(plot)
    # Only labelled context rows are captured (11's node 6 is the record's own point).
    assert sorted(zip(context.segment_id.tolist(), context.node_id.tolist())) == [
        (11, 9),
        (55, 2),
        (66, 1),
        (66, 2),
    ]

    nodes, segments, _ = session_tables(
        session.records,
        labels,
        dataset_name="demo",
        model_name="m",
        cell_type_names=("basket", "pyramidal"),
        context=context,
    )
    pairs = list(zip(nodes.segment_id.tolist(), nodes.node_id.tolist()))
    assert pairs == [(11, 5), (11, 6), (11, 8), (22, 1), (22, 2), (11, 9), (55, 2), (66, 1), (66, 2)]
    labelled = {pair: label for pair, label in zip(pairs, nodes.manual_label.tolist()) if label}
    assert labelled == {
        (11, 6): "bouton",
        (22, 1): "chandelier?",
        (22, 2): "spine",
        (11, 9): "spine",
        (55, 2): "bouton",
        (66, 1): "astro!",
        (66, 2): "astro!",
    }
    # Every label the user made is in the table, with the node's position and predictions.
    row = pairs.index((55, 2))
    np.testing.assert_allclose(nodes.xyz_nm[row], [20_100.0, 2000.0, 400.0])
    assert nodes.compartment[row] == DENDRITE and nodes.ood_score[row] == pytest.approx(0.2)
    assert nodes.compartment[pairs.index((66, 1))] == SOMA
    assert np.isnan(nodes.compartment_probability[row]).all()

    assert segments.segment_id.tolist() == [11, 22, 55, 66]
    assert segments.cell_type.tolist() == ["pyramidal", "", "basket", "astro"]
    assert segments.cell_type_names == ("basket", "pyramidal", "astro")
    np.testing.assert_allclose(segments.ood_score[2:], [0.2, 0.8], rtol=1e-6)
    assert segments.ood.tolist() == [True, False, False, False]
    assert segments.manual_label.tolist() == ["", "chandelier?", "", "astro!"]
    assert segments.compartment_node_counts[2, DENDRITE] == 1 and segments.compartment_node_counts[3, SOMA] == 2


def test_labelled_context_nodes_alone_are_enough_to_export(labels, tmp_path):
    from segscope.app.session_export import ContextNodes

    plot = _context_plot()
    store = LabelStore()
    plot.label_lookup = store.effective_node_labels
    store.assign_nodes("bouton", 55, [1, 3])
    plot.refresh_manual_labels()
    state = SessionState()
    state.set_dataset(_dataset())
    result = drive(
        export_session(tmp_path / "b", state, store, table_formats=("csv",), context=ContextNodes.from_plot(plot))
    )
    table, _ = read_node_table(tmp_path / "b" / "nodes.csv")
    assert table.node_id.tolist() == [1, 3] and table.manual_label.tolist() == ["bouton", "bouton"]
    assert "nodes.csv" in result.files["tables"]
    with pytest.raises(ValueError, match="nothing to export"):
        session_tables({}, store, dataset_name="d", model_name="m", context=ContextNodes.empty())


def test_context_nodes_refuse_mismatched_arrays():
    from segscope.app.session_export import ContextNodes

    with pytest.raises(ValueError, match="xyz_nm"):
        ContextNodes(
            np.array([1], np.uint64),
            np.array([1]),
            np.zeros((2, 3)),
            np.array([0]),
            np.array([""], object),
            np.array([0.0]),
        )


def test_labels_left_out_of_the_export_are_reported(session, labels, caplog):
    labels.assign_nodes("pending?", 11, [7])  # node 7 of segment 11 has no embedding yet
    labels.assign_segments("gone", 99)  # a segment with nothing embedded
    with caplog.at_level("WARNING", logger="segscope.app.session_export"):
        nodes, _, _ = session_tables(session.records, labels, dataset_name="d", model_name="m")
    assert 7 not in nodes.node_id[nodes.rows_of(11)].tolist()
    assert "1 labelled nodes of exported segments are not exported" in caplog.text and "(11, 7)" in caplog.text
    assert "labels of segments [99] are not exported" in caplog.text
