"""The neuroglancer bridge, headless: click actions, selection and annotation writes."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import numpy as np
import pytest

from segscope.analysis.colours import COMPARTMENT_COLOURS, EMBEDDED_COLOUR, OOD_COLOUR, PENDING_COLOUR
from segscope.app.neuroglancer_bridge import (
    GROUND_TRUTH_LAYER,
    NODES_LAYER,
    SEGMENTATION_LAYER,
    SELECT_ACTION,
    SELECT_EVENT,
    LayerSources,
    NeuroglancerBridge,
    cell_type_colour,
)
from segscope.app.state import SessionState

VOXEL = np.array([32.0, 32.0, 40.0])


@pytest.fixture
def bridge():
    clicks = []
    b = NeuroglancerBridge(clicks.append)
    b.clicks = clicks
    b.show_dataset(
        LayerSources(
            "precomputed://http://127.0.0.1:9/image",
            "precomputed://http://127.0.0.1:9/segmentation",
            None,
            VOXEL,
            np.array([1000.0, 1000.0, 1000.0]),
        )
    )
    yield b
    b.close()


def fake_action(bridge, value, mouse_voxels):
    """What neuroglancer's client sends when the bound event fires."""
    return {
        "selectedValues": {SEGMENTATION_LAYER: {"value": value}} if value is not None else {},
        "mousePosition": mouse_voxels,
        "viewerState": bridge.viewer.state.to_json(),
    }


def test_server_binds_to_localhost_and_binds_the_click(bridge):
    assert bridge.url.startswith("http://127.0.0.1:")
    bindings = bridge.viewer.config_state.state.input_event_bindings.data_view
    assert bindings[SELECT_EVENT] == SELECT_ACTION


def test_click_handler_reports_segment_and_position_in_nm(bridge):
    bridge.viewer.actions.invoke(SELECT_ACTION, fake_action(bridge, "12", [10, 20, 30]))
    assert len(bridge.clicks) == 1
    assert bridge.clicks[0].segment_id == 12
    np.testing.assert_allclose(bridge.clicks[0].position_nm, [320.0, 640.0, 1200.0])


def test_click_on_background_or_mapped_segment(bridge):
    bridge.viewer.actions.invoke(SELECT_ACTION, fake_action(bridge, "0", [1, 1, 1]))
    bridge.viewer.actions.invoke(SELECT_ACTION, fake_action(bridge, {"key": "77", "value": "5"}, [1, 1, 1]))
    bridge.viewer.actions.invoke(SELECT_ACTION, fake_action(bridge, None, None))
    assert [c.segment_id for c in bridge.clicks] == [None, 77, None]
    assert bridge.clicks[2].position_nm is None


def annotations(bridge, layer):
    return [a.to_json() for a in bridge.viewer.state.layers[layer].annotations]


def test_state_changes_reach_the_viewer(bridge):
    state = SessionState()
    bridge.attach(state)
    state.select_segment(12, [0.0, 0.0, 0.0])
    state.set_centres(12, [4, 8], np.array([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]), ground_truth=[1, 255])
    assert bridge.flush()
    viewer_state = bridge.viewer.state
    assert {int(s) for s in viewer_state.layers[SEGMENTATION_LAYER].segments} == {12}
    nodes = annotations(bridge, NODES_LAYER)
    assert [n["id"] for n in nodes] == ["12-4", "12-8"]
    assert nodes[0]["point"] == [100.0, 200.0, 300.0]
    assert [n["props"][0] for n in nodes] == [PENDING_COLOUR, PENDING_COLOUR]
    truth = annotations(bridge, GROUND_TRUTH_LAYER)
    assert truth[0]["props"][0] == COMPARTMENT_COLOURS["dendrite"]
    assert not viewer_state.layers[GROUND_TRUTH_LAYER].visible

    state.add_embeddings(12, [1], np.ones((1, 4)))
    assert bridge.flush()
    assert [n["props"][0] for n in annotations(bridge, NODES_LAYER)] == [PENDING_COLOUR, EMBEDDED_COLOUR]

    state.set_predictions(12, predicted=[0, 255], ood_score=0.95, ood_flagged=True)
    assert bridge.flush()
    nodes = annotations(bridge, NODES_LAYER)
    assert nodes[0]["props"][0] == COMPARTMENT_COLOURS["axon"] and nodes[0]["props"][2] == 0
    assert nodes[1]["props"][0] == EMBEDDED_COLOUR
    colours = bridge.viewer.state.layers[SEGMENTATION_LAYER].segment_colors
    assert colours[np.uint64(12)] == OOD_COLOUR

    state.clear_segment()
    assert bridge.flush()
    assert list(bridge.viewer.state.layers[SEGMENTATION_LAYER].segments) == []
    assert annotations(bridge, NODES_LAYER) == []


def test_unchanged_state_is_not_written_again(bridge):
    state = SessionState()
    bridge.attach(state)
    state.select_segment(5)
    state.set_centres(5, [0], np.zeros((1, 3)))
    assert bridge.flush()
    writes = bridge.writes
    generation = bridge.viewer.shared_state.state_generation
    # The same content again (an echo of the same update) commits no transaction.
    state._emit("centres", state.segment)
    state._emit("segment", state.segment)
    state._emit("centres", state.segment)
    assert bridge.flush()
    assert bridge.writes == writes
    assert bridge.viewer.shared_state.state_generation == generation


def test_cell_type_colours_are_stable():
    assert cell_type_colour("astrocyte") == cell_type_colour("astrocyte")
    assert cell_type_colour("astrocyte").startswith("#")
    # The known cell types have fixed colours; a classifier's other classes get distinct
    # colours (as many as the palette has).
    assert cell_type_colour("excitatory", ("inhibitory", "excitatory")) == cell_type_colour("excitatory")
    names = [f"type{i}" for i in range(4)]
    assert len({cell_type_colour(name, names) for name in names}) == 4


def test_local_folders_are_served_on_localhost(bridge, tmp_path):
    (tmp_path / "info").write_text("{}")
    url = bridge.source_url(str(tmp_path), "neuroglancer_precomputed")
    assert url.startswith("precomputed://http://127.0.0.1:")
    import urllib.request

    with urllib.request.urlopen(url[len("precomputed://") :] + "/info", timeout=5) as reply:
        assert reply.read() == b"{}"
        assert "Access-Control-Allow-Origin" not in reply.headers  # never "*" (segscope.app.file_server)
    page = urlparse(bridge.viewer.get_viewer_url())
    origin = f"{page.scheme}://{page.netloc}"
    request = urllib.request.Request(url[len("precomputed://") :] + "/info", headers={"Origin": origin})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Access-Control-Allow-Origin"] == origin
    with pytest.raises(FileNotFoundError):
        bridge.source_url(str(tmp_path / "missing"), "neuroglancer_precomputed")
    with pytest.raises(ValueError, match="cannot display"):
        bridge.source_url(str(tmp_path), "tiff")


def _flag_layers(bridge) -> list[str]:
    from segscope.app.neuroglancer_bridge import OOD_LAYER_PREFIX

    return [layer.name for layer in bridge.viewer.state.layers if layer.name.startswith(OOD_LAYER_PREFIX)]


def test_ood_segment_gets_a_named_flag_layer_with_a_box_and_loses_it_when_in_distribution(bridge):
    state = SessionState()
    bridge.attach(state)
    state.select_segment(12, [0.0, 0.0, 0.0])
    state.set_centres(12, [4, 8], np.array([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]))
    state.add_embeddings(12, [0, 1], np.ones((2, 4)))
    state.set_predictions(
        12,
        predicted=[0, 1],
        cell_type="pyramidal",
        cell_type_probability=0.6,
        ood_score=0.48,
        ood_flagged=True,
        ood_threshold=0.2,
    )
    assert bridge.flush()
    assert _flag_layers(bridge) == ["OUT OF DISTRIBUTION: segment 12"]
    (box,) = annotations(bridge, "OUT OF DISTRIBUTION: segment 12")
    assert box["type"] == "axis_aligned_bounding_box"
    np.testing.assert_allclose(box["pointA"], [-900.0, -800.0, -700.0])
    np.testing.assert_allclose(box["pointB"], [1400.0, 1500.0, 1600.0])
    assert "OOD score 0.48 > threshold 0.20" in box["description"]
    assert bridge.viewer.state.layers[SEGMENTATION_LAYER].segment_colors[np.uint64(12)] == OOD_COLOUR

    # A new score for the same segment changes the box, not the layer list; the same score
    # (to the shown precision) writes nothing.
    state.set_predictions(12, ood_score=0.55, ood_flagged=True, ood_threshold=0.2)
    assert bridge.flush()
    assert _flag_layers(bridge) == ["OUT OF DISTRIBUTION: segment 12"]
    assert "OOD score 0.55" in annotations(bridge, "OUT OF DISTRIBUTION: segment 12")[0]["description"]
    writes = bridge.writes
    state.set_predictions(12, ood_score=0.5501, ood_flagged=True, ood_threshold=0.2)
    assert bridge.flush()
    assert bridge.writes == writes

    # In distribution: the cell type's colour and no flag.
    state.set_predictions(
        12, cell_type="pyramidal", cell_type_probability=0.9, ood_score=0.1, ood_flagged=False, ood_threshold=0.2
    )
    assert bridge.flush()
    assert _flag_layers(bridge) == []
    assert bridge.viewer.state.layers[SEGMENTATION_LAYER].segment_colors[np.uint64(12)] == cell_type_colour("pyramidal")

    # Selecting another segment drops a flag too.
    state.set_predictions(12, ood_score=0.9, ood_flagged=True)
    assert bridge.flush() and _flag_layers(bridge)
    state.select_segment(13)
    assert bridge.flush()
    assert _flag_layers(bridge) == []


def test_no_cell_type_colour_can_be_mistaken_for_the_ood_magenta():
    def rgb(colour):
        return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)

    for name in [f"type{i}" for i in range(200)] + ["pyramidal", "interneuron", "astrocyte"]:
        assert np.abs(rgb(cell_type_colour(name)) - rgb(OOD_COLOUR)).max() > 100


# -- links with the embedding plot ---------------------------------------------------------


def selected(bridge) -> set[int]:
    return {int(s) for s in bridge.viewer.state.layers[SEGMENTATION_LAYER].segments}


def test_highlight_segments_selects_exactly_those_and_the_last_request_wins(bridge):
    state = SessionState()
    bridge.attach(state)
    bridge.highlight_segments([3, 4, np.uint64(2**40 + 5)])
    assert bridge.flush()
    assert selected(bridge) == {3, 4, 2**40 + 5}

    # The session's single segment and a lasso share one writer key: the newer one wins.
    bridge.highlight_segments([1, 2])
    state.select_segment(9)
    assert bridge.flush()
    assert selected(bridge) == {9}
    state.select_segment(10)
    bridge.highlight_segments({1, 2})
    assert bridge.flush()
    assert selected(bridge) == {1, 2}

    bridge.highlight_segments([])
    assert bridge.flush()
    assert selected(bridge) == set()


@pytest.mark.parametrize("bad", [-1, 2.5, "x", None, 2**64])
def test_highlight_segments_rejects_bad_ids_and_writes_nothing(bridge, bad):
    bridge.highlight_segments([7])
    assert bridge.flush()
    with pytest.raises(ValueError, match="segment id"):
        bridge.highlight_segments([8, bad])
    assert bridge.flush()
    assert selected(bridge) == {7}


def hold_writer(bridge):
    """Block the writer thread until the returned event is set (to queue writes up)."""
    import threading

    release = threading.Event()
    bridge._writer.submit("test-hold", lambda: release.wait(10))
    return release


def test_highlight_node_rings_one_node_coalesced_and_can_move_the_view(bridge):
    from segscope.app.neuroglancer_bridge import HOVER_LAYER

    release = hold_writer(bridge)
    writes = bridge.writes
    for i in range(50):  # a mouse sweeping over the plot
        bridge.highlight_node((12, i, (100.0 + i, 200.0, 300.0)))
    release.set()
    assert bridge.flush()
    assert bridge.writes == writes + 1  # only the newest hover reached the viewer
    (ring,) = annotations(bridge, HOVER_LAYER)
    assert ring["point"] == [149.0, 200.0, 300.0]
    assert ring["segments"] == [["12"]]
    assert bridge.viewer.state.layers[HOVER_LAYER].pick is False  # never steals the double click
    position = list(bridge.viewer.state.position)

    bridge.highlight_node((12, 3, [640.0, 320.0, 400.0]), move=True)
    assert bridge.flush()
    np.testing.assert_allclose(bridge.viewer.state.position, [20.0, 10.0, 10.0])  # nm / VOXEL
    assert position != list(bridge.viewer.state.position)

    bridge.highlight_node(None)
    assert bridge.flush()
    assert HOVER_LAYER in bridge.viewer.state.layers and annotations(bridge, HOVER_LAYER) == []
    writes = bridge.writes
    bridge.highlight_node(None)
    assert bridge.flush()
    assert bridge.writes == writes

    with pytest.raises(ValueError, match="position"):
        bridge.highlight_node((12, 3, [1.0, np.nan, 2.0]))


def test_selected_nodes_are_ringed_subsampled_beyond_the_limit_and_cleared(bridge):
    from segscope.app.neuroglancer_bridge import MAX_SELECTED_NODES, SELECTION_LAYER

    bridge.show_selected_nodes([(12, 4, (100.0, 200.0, 300.0)), (13, 8, (400.0, 500.0, 600.0))])
    assert bridge.flush()
    rings = annotations(bridge, SELECTION_LAYER)
    assert [r["point"] for r in rings] == [[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]
    assert [r["segments"] for r in rings] == [[["12"]], [["13"]]] and len({r["id"] for r in rings}) == 2
    assert bridge.viewer.state.layers[SELECTION_LAYER].pick is False
    many = [(12, i, (float(i), 0.0, 0.0)) for i in range(3 * MAX_SELECTED_NODES)]
    bridge.show_selected_nodes(many)
    assert bridge.flush()
    rings = annotations(bridge, SELECTION_LAYER)
    assert len(rings) == MAX_SELECTED_NODES and rings[0]["point"][0] == 0.0 and rings[-1]["point"][0] == len(many) - 1
    bridge.show_selected_nodes([])
    assert bridge.flush()
    assert annotations(bridge, SELECTION_LAYER) == []


def test_manual_labels_layer_colours_describes_and_links_each_node(bridge):
    from segscope.app.neuroglancer_bridge import LABELS_LAYER

    order = ["bouton", "axon", "spine"]
    points = [
        (12, 4, (100.0, 200.0, 300.0), "spine"),
        (12, 8, np.array([400.0, 500.0, 600.0]), "axon"),
        (2**40 + 9, None, [1.0, 2.0, 3.0], "bouton"),
    ]  # a label of a whole segment
    bridge.show_labels(points, order)
    assert bridge.flush()
    layer = bridge.viewer.state.layers[LABELS_LAYER]
    assert dict(layer.linked_segmentation_layer) == {"segments": SEGMENTATION_LAYER}
    shown = annotations(bridge, LABELS_LAYER)
    assert [a["id"] for a in shown] == ["label-12-4", "label-12-8", f"label-{2**40 + 9}"]
    assert [a["description"] for a in shown] == ["spine", "axon", "bouton"]
    assert [a["segments"] for a in shown] == [[["12"]], [["12"]], [[str(2**40 + 9)]]]
    # "bouton" and "spine" take the first two palette colours in list order; "axon" its compartment's.
    assert [a["props"][0] for a in shown] == ["#bcf60c", COMPARTMENT_COLOURS["axon"], "#0077ff"]
    assert shown[1]["props"][0] == COMPARTMENT_COLOURS["axon"]
    assert shown[1]["point"] == [400.0, 500.0, 600.0]

    # The same labels again write nothing; a user-hidden layer stays hidden on an update.
    writes = bridge.writes
    bridge.show_labels(points, order)
    assert bridge.flush() and bridge.writes == writes
    with bridge.viewer.txn() as s:
        s.layers[LABELS_LAYER].visible = False
    bridge.show_labels(points[:2], order)
    assert bridge.flush()
    assert len(annotations(bridge, LABELS_LAYER)) == 2
    assert not bridge.viewer.state.layers[LABELS_LAYER].visible

    bridge.show_labels([], order)
    assert bridge.flush()
    assert LABELS_LAYER not in bridge.viewer.state.layers


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([(1, 2, (0.0, 0.0, 0.0), "")], "no label"),
        ([(1, 2, (0.0, 0.0), "axon")], "position"),
        ([(1, 2, (0.0, 0.0, 0.0))], "not \\(segment_id"),
        ([(1, 2, (0.0, 0.0, 0.0), "a"), (1, 2, (1.0, 0.0, 0.0), "b")], "labelled twice"),
        ([(-3, 2, (0.0, 0.0, 0.0), "a")], "segment id"),
    ],
)
def test_manual_labels_reject_malformed_points(bridge, points, message):
    with pytest.raises(ValueError, match=message):
        bridge.show_labels(points)


#: What md5 of the label text picks for labels outside the list (a run-to-run constant).
FREE_LABEL_COLOURS = ["#aaffc3", "#ffa500", "#fabebe"]


def test_label_colours_are_deterministic_distinct_and_never_the_ood_magenta():
    from segscope.analysis.colours import label_colour

    def rgb(colour):
        return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)

    names = [f"label {i}" for i in range(12)]
    colours = [label_colour(name, names) for name in names]
    assert colours[:3] == ["#0077ff", "#bcf60c", "#fabebe"]  # palette order = list order
    assert len(set(colours)) == 12
    assert label_colour("label 0", names[::-1]) == colours[11]  # another order, other colours
    # Compartment names keep their compartment's colour and take no palette slot.
    assert label_colour("soma", ["soma", "spine"]) == COMPARTMENT_COLOURS["soma"]
    assert label_colour("spine", ["soma", "spine"]) == label_colour("spine", ["spine"])
    reserved = [OOD_COLOUR, PENDING_COLOUR, EMBEDDED_COLOUR, *COMPARTMENT_COLOURS.values()]
    for colour in colours:
        assert min(np.linalg.norm(rgb(colour) - rgb(other)) for other in reserved) >= 75
    for i, a in enumerate(colours):
        for b in colours[i + 1 :]:
            assert np.linalg.norm(rgb(a) - rgb(b)) >= 75
    # Labels outside the list still get a stable, non-magenta colour.
    assert [label_colour(f"free {i}") for i in range(3)] == FREE_LABEL_COLOURS  # pinned: stable across runs
    for name in [f"free {i}" for i in range(100)]:
        assert np.abs(rgb(label_colour(name)) - rgb(OOD_COLOUR)).max() > 100


# -- exported bundles ---------------------------------------------------------------------


def write_bundle(folder, *, segment_properties=True, shift=0.0):
    from segscope.analysis.export import NodeTable, SegmentTable, write_node_annotations, write_segment_properties
    from segscope.analysis.progress import drive

    folder.mkdir(exist_ok=True)
    nodes = NodeTable(
        np.array([7, 7, 9], np.uint64),
        [0, 1, 0],
        np.array([[100.0, 200.0, 300.0], [150.0, 200.0, 300.0], [900.0, 800.0, 700.0]]) + shift,
        compartment=[0, 1, -1],
    )
    drive(write_node_annotations(folder / "annotations", nodes, force=True))
    if segment_properties:
        write_segment_properties(folder / "segment_properties", SegmentTable.from_nodes(nodes), force=True)
    return folder


def fetch(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read()


def segmentation_urls(bridge):
    return [source.url for source in bridge.viewer.state.layers[SEGMENTATION_LAYER].source]


def test_exported_layer_is_served_linked_and_brings_segment_properties(bridge, tmp_path):
    from segscope.app.neuroglancer_bridge import EXPORTED_LAYER

    bundle = write_bundle(tmp_path / "bundle")
    source = bridge.add_exported_layer(bundle)
    assert source.startswith("precomputed://http://127.0.0.1:") and source.endswith("/annotations")
    http = source[len("precomputed://") :]
    assert fetch(http + "/info") == (bundle / "annotations" / "info").read_bytes()
    assert bridge.flush()
    layer = bridge.viewer.state.layers[EXPORTED_LAYER]
    assert [s.url for s in layer.source] == [source]
    assert dict(layer.linked_segmentation_layer) == {"segment": SEGMENTATION_LAYER}
    assert "prop_compartment" in layer.shader
    properties = source[: -len("annotations")] + "segment_properties"
    assert segmentation_urls(bridge) == ["precomputed://http://127.0.0.1:9/segmentation", properties]
    assert fetch(properties[len("precomputed://") :] + "/info") == (bundle / "segment_properties" / "info").read_bytes()

    # The same bundle again: same URL, nothing written.
    writes = bridge.writes
    assert bridge.add_exported_layer(bundle) == source
    assert bridge.flush() and bridge.writes == writes

    # Re-exported into the same folder: a new URL (the page caches by URL) replaces the
    # layer and the properties source.
    write_bundle(bundle, shift=10.0)
    renewed = bridge.add_exported_layer(bundle)
    assert renewed != source
    assert bridge.flush()
    assert [s.url for s in bridge.viewer.state.layers[EXPORTED_LAYER].source] == [renewed]
    assert segmentation_urls(bridge) == [
        "precomputed://http://127.0.0.1:9/segmentation",
        renewed[: -len("annotations")] + "segment_properties",
    ]
    assert fetch(renewed[len("precomputed://") :] + "/info") == (bundle / "annotations" / "info").read_bytes()
    assert [layer.name for layer in bridge.viewer.state.layers].count(EXPORTED_LAYER) == 1


def test_exported_layer_without_segment_properties_and_bad_folders(bridge, tmp_path):
    bundle = write_bundle(tmp_path / "plain", segment_properties=False)
    source = bridge.add_exported_layer(bundle, name="colleague's nodes")
    assert bridge.flush()
    assert [s.url for s in bridge.viewer.state.layers["colleague's nodes"].source] == [source]
    assert segmentation_urls(bridge) == ["precomputed://http://127.0.0.1:9/segmentation"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no annotations/"):
        bridge.add_exported_layer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        bridge.add_exported_layer(tmp_path / "missing")
    (tmp_path / "odd" / "annotations").mkdir(parents=True)
    (tmp_path / "odd" / "annotations" / "info").write_text('{"@type": "neuroglancer_multiscale_volume"}')
    with pytest.raises(ValueError, match="not a neuroglancer_annotations_v1"):
        bridge.add_exported_layer(tmp_path / "odd")
    with pytest.raises(ValueError, match="cannot name"):
        bridge.add_exported_layer(bundle, name=SEGMENTATION_LAYER)


# -- the user's selection in the page -----------------------------------------------------


def test_segments_changed_in_the_page_are_reported_but_not_the_bridges_own_writes(bridge):
    reports = []
    stop = bridge.on_segments_changed(reports.append)

    bridge.highlight_segments([1, 2])  # the bridge's own write: no report
    assert bridge.flush()
    assert reports == []

    with bridge.viewer.txn() as s:  # the user ctrl+clicks segment 3
        s.layers[SEGMENTATION_LAYER].segments = {1, 2, 3}
    assert reports == [frozenset({1, 2, 3})]

    with bridge.viewer.txn() as s:  # camera moves and other layers: no report
        s.position = [5.0, 6.0, 7.0]
        s.layers[SEGMENTATION_LAYER].segment_colors[np.uint64(3)] = "#00ff00"
    bridge.highlight_node((1, 0, (0.0, 0.0, 0.0)))
    assert bridge.flush()
    assert reports == [frozenset({1, 2, 3})]

    with bridge.viewer.txn() as s:  # the user undoes it: back to what the bridge wrote
        s.layers[SEGMENTATION_LAYER].segments = {1, 2}
    assert reports[-1] == frozenset({1, 2})

    # The page echoing the bridge's write (a new generation, the same set in its own
    # order) is no change.
    bridge.highlight_segments([4, 6])
    assert bridge.flush()
    raw = bridge.viewer.state.to_json()
    layer = next(layer for layer in raw["layers"] if layer["name"] == SEGMENTATION_LAYER)
    layer["segments"] = sorted(layer["segments"], reverse=True)
    bridge.viewer.set_state(raw, generation="client/1")
    assert bridge.viewer.shared_state.state_generation == "client/1"
    assert len(reports) == 2

    stop()
    with bridge.viewer.txn() as s:
        s.layers[SEGMENTATION_LAYER].segments = {5}
    assert len(reports) == 2


def test_a_failing_segments_listener_does_not_break_the_viewer(bridge):
    def broken(_ids):
        raise RuntimeError("listener bug")

    reports = []
    bridge.on_segments_changed(broken)
    bridge.on_segments_changed(reports.append)
    with bridge.viewer.txn() as s:
        s.layers[SEGMENTATION_LAYER].segments = {8}
    assert reports == [frozenset({8})]
    assert selected(bridge) == {8}
    bridge.close()  # removes the viewer callback
    with bridge.viewer.txn() as s:
        s.layers[SEGMENTATION_LAYER].segments = {9}
    assert reports == [frozenset({8})]


# -- clutter: layers, level of detail, the OOD flag on top, clicks through annotations ------


def test_a_double_click_on_an_annotation_reaches_the_segment_behind_it(bridge):
    from segscope.app.neuroglancer_bridge import LABELS_LAYER, SELECTION_LAYER

    def over_annotation(layer, annotation_id, segmentation_value=None):
        action = fake_action(bridge, segmentation_value, [1, 1, 1])
        action["selectedValues"][layer] = {"annotationId": annotation_id, "annotationSource": 0}
        return action

    # Over a label disc in 3-D the segmentation layer has no value: the disc's segment is taken.
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation(LABELS_LAYER, f"label-{2**40 + 9}-4"))
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation(LABELS_LAYER, "label-13"))  # a segment label
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation(NODES_LAYER, "12-8"))
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation("OUT OF DISTRIBUTION: segment 5", "ood-5"))
    # The segment under the mouse, when there is one, wins; ids of others name no segment.
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation(NODES_LAYER, "12-8", "44"))
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation("exported nodes", "17"))
    bridge.viewer.actions.invoke(SELECT_ACTION, over_annotation(SELECTION_LAYER, "hover"))
    assert [c.segment_id for c in bridge.clicks] == [2**40 + 9, 13, 12, 5, 44, None, None]


def test_a_double_click_on_an_exported_node_reaches_its_segment(bridge, tmp_path):
    from segscope.analysis.export import NodeTable, node_arrow_table, write_table

    folder = write_bundle(tmp_path / "bundle")  # annotation ids are rows of its node table
    nodes = NodeTable(np.array([7, 7, 9], np.uint64), [0, 1, 0], np.zeros((3, 3)))
    write_table(folder / "nodes.csv", node_arrow_table(nodes))
    bridge.add_exported_layer(folder, "mine")
    bridge.add_exported_layer(write_bundle(tmp_path / "bare"), "no table")
    assert bridge.flush()
    for layer, annotation_id in [("mine", "2"), ("mine", "0"), ("mine", "3"), ("no table", "1")]:
        action = fake_action(bridge, None, [1, 1, 1])
        action["selectedValues"][layer] = {"annotationId": annotation_id}
        bridge.viewer.actions.invoke(SELECT_ACTION, action)
    assert [c.segment_id for c in bridge.clicks] == [9, 7, None, None]


@pytest.mark.parametrize(
    ("annotation_id", "segment"),
    [
        ("12-8", 12),
        ("label-12-8", 12),
        ("label-12", 12),
        ("ood-7", 7),
        ("hover", None),
        ("selected-3", None),
        ("17", None),
        ("label-x-1", None),
        ("0-1", None),
        ("1-2-3", None),
        (None, None),
        (f"{2**64}-1", None),
    ],
)
def test_segment_of_annotation_reads_the_bridges_ids(annotation_id, segment):
    from segscope.app.neuroglancer_bridge import segment_of_annotation

    assert segment_of_annotation(annotation_id) == segment


def _layer_bar(bridge) -> list[str]:
    """The layers the layer bar shows (archived ones are only in the layer list panel)."""
    return [layer.name for layer in bridge.viewer.state.layers if not layer.archived]


def test_one_lasso_label_export_and_ood_click_leave_few_layers_with_the_flag_last(bridge, tmp_path):
    from segscope.app.neuroglancer_bridge import EXPORTED_LAYER, LABELS_LAYER, SELECTION_LAYER

    state = SessionState()
    bridge.attach(state)
    state.select_segment(12, [0.0, 0.0, 0.0])
    state.set_centres(12, [4, 8], np.array([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]), ground_truth=[1, 255])
    state.add_embeddings(12, [0, 1], np.ones((2, 4)))
    state.set_predictions(12, predicted=[0, 1], cell_type="excitatory", ood_score=0.9, ood_flagged=True)
    assert bridge.flush()
    # A lasso (segments and rings), the hover ring, a label and an export come after the flag.
    bridge.highlight_segments([12, 13])
    bridge.show_selected_nodes([(12, 4, (100.0, 200.0, 300.0)), (13, 1, (0.0, 0.0, 0.0))])
    bridge.highlight_node((12, 4, (100.0, 200.0, 300.0)))
    bridge.show_labels([(12, 4, (100.0, 200.0, 300.0), "spine")])
    bridge.add_exported_layer(write_bundle(tmp_path / "bundle"))
    assert bridge.flush()

    layers = bridge.viewer.state.layers
    assert _layer_bar(bridge) == [
        "image",
        SEGMENTATION_LAYER,
        NODES_LAYER,
        SELECTION_LAYER,
        LABELS_LAYER,
        EXPORTED_LAYER,
        "OUT OF DISTRIBUTION: segment 12",  # last: drawn over the others
    ]
    assert layers[GROUND_TRUTH_LAYER].archived and len(annotations(bridge, GROUND_TRUTH_LAYER)) == 2
    # Hover and selection rings share one layer: the hover ring is the bigger one.
    rings = annotations(bridge, SELECTION_LAYER)
    assert [r["id"] for r in rings] == ["selected-0", "selected-1", "hover"]
    assert rings[2]["props"][0] > rings[0]["props"][0]
    bridge.highlight_node(None)
    assert bridge.flush()
    assert [r["id"] for r in annotations(bridge, SELECTION_LAYER)] == ["selected-0", "selected-1"]
    bridge.show_selected_nodes([])
    bridge.highlight_node((13, 1, (0.0, 0.0, 0.0)))
    assert bridge.flush()
    assert [r["id"] for r in annotations(bridge, SELECTION_LAYER)] == ["hover"]


def test_labels_are_drawn_sparsely_and_in_full_on_the_selected_segments(bridge):
    from segscope.app.neuroglancer_bridge import (
        LABEL_SIZE_ELSEWHERE,
        LABEL_SIZE_SELECTED,
        LABELS_LAYER,
        MAX_LABEL_MARKERS_ELSEWHERE,
        MAX_LABELS_DRAWN,
    )

    # 400 labelled context segments of 3 nodes each (a lasso over the context, labelled),
    # and segment 5 with 2 x 300 labelled nodes.
    points = [(1000 + s, n, (float(s), float(n), 0.0), "glia?") for s in range(400) for n in range(3)]
    points += [(5, n, (float(n), 5.0, 5.0), "spine" if n % 2 else "bouton") for n in range(600)]
    bridge.show_labels(points)
    assert bridge.flush()
    shown = annotations(bridge, LABELS_LAYER)
    # Nothing selected: one small disc per segment and label, at most so many.
    assert len(shown) == MAX_LABEL_MARKERS_ELSEWHERE
    assert len({a["segments"][0][0] for a in shown}) == MAX_LABEL_MARKERS_ELSEWHERE
    assert shown[0]["description"] == "glia? (3 labelled nodes)" and shown[0]["id"] == "label-1000-0"
    assert {a["props"][1] for a in shown} == {LABEL_SIZE_ELSEWHERE}

    # Selecting segment 5 (a double click, a lasso, or in the page) draws its labels in full.
    bridge.highlight_segments([5])
    assert bridge.flush()
    shown = annotations(bridge, LABELS_LAYER)
    assert len(shown) == MAX_LABELS_DRAWN
    assert all(a["segments"] == [["5"]] and a["props"][1] == LABEL_SIZE_SELECTED for a in shown)
    assert shown[0]["description"] == "bouton"
    # A small selected segment leaves room for markers elsewhere.
    bridge.show_labels([p for p in points if p[0] != 5 or p[1] < 4])
    assert bridge.flush()
    shown = annotations(bridge, LABELS_LAYER)
    assert [a["id"] for a in shown[:4]] == [f"label-5-{n}" for n in range(4)]
    assert len(shown) == 4 + MAX_LABEL_MARKERS_ELSEWHERE

    state = SessionState()
    bridge.attach(state)
    state.select_segment(1001)
    assert bridge.flush()
    shown = annotations(bridge, LABELS_LAYER)
    assert [a["id"] for a in shown[:3]] == ["label-1001-0", "label-1001-1", "label-1001-2"]
    assert [a["description"] for a in shown[:3]] == ["glia?"] * 3

    # A few labels are all drawn, small off the selected segments.
    few = [(1000 + s, 0, (float(s), 0.0, 0.0), "glia?") for s in range(MAX_LABEL_MARKERS_ELSEWHERE)]
    bridge.show_labels(few)
    assert bridge.flush()
    shown = annotations(bridge, LABELS_LAYER)
    assert len(shown) == len(few) and [a["description"] for a in shown] == ["glia?"] * len(few)
    assert [a["props"][1] for a in shown[:3]] == [LABEL_SIZE_ELSEWHERE, LABEL_SIZE_SELECTED, LABEL_SIZE_ELSEWHERE]


# -- the same, with Neuroglancer's own client in the page ---------------------------------

_VISIBLE_SEGMENTS_JS = (
    'Array.from(viewer.layerManager.getLayerByName("segmentation").layer.displayState'
    ".segmentationGroupState.value.visibleSegments).map(String).sort()"
)


def _shader_error_js(layer: str) -> str:
    """null once the layer's annotation shader compiled, its message on failure."""
    return (
        f'(() => {{ const l = viewer.layerManager.getLayerByName("{layer}"); if (!l || !l.layer) return "no layer";'
        " const e = l.layer.annotationDisplayState.shaderError.value;"
        ' return e === undefined ? "not compiled" : (e === null ? null : String(e.message || e)); })()'
    )


@pytest.fixture
def web_qapp(request):
    """pytest-qt's QApplication, created after QtWebEngine is imported (which it must be)."""
    pytest.importorskip("PyQt6.QtWebEngineWidgets")
    pytest.importorskip("pytestqt")
    return request.getfixturevalue("qapp")


@pytest.mark.qt
@pytest.mark.timeout(180)
def test_the_page_draws_the_new_layers_and_reports_only_the_users_selection(web_qapp, bridge, tmp_path):
    from segscope.app.neuroglancer_bridge import EXPORTED_LAYER, HOVER_LAYER, LABELS_LAYER

    from ngclient import NeuroglancerPage
    from test_export_ngclient import SPATIAL_IDS_SCRIPT

    reports = []
    bridge.on_segments_changed(reports.append)
    bundle = write_bundle(tmp_path / "bundle")
    with NeuroglancerPage(bridge.viewer) as page:
        bridge.highlight_segments([1, 2])
        bridge.highlight_node((1, 0, (1000.0, 1000.0, 1000.0)))
        bridge.show_labels([(1, 0, (1000.0, 1000.0, 1000.0), "spine"), (2, 3, (1100.0, 1000.0, 1000.0), "axon")])
        bridge.add_exported_layer(bundle)
        assert bridge.flush()
        assert page.wait_for(_VISIBLE_SEGMENTS_JS, lambda v: v == ["1", "2"], timeout_s=30)
        for layer in (HOVER_LAYER, LABELS_LAYER, EXPORTED_LAYER):
            assert (
                page.wait_for(_shader_error_js(layer), lambda v: v not in ("no layer", "not compiled"), timeout_s=30)
                is None
            ), layer
        # The client fetched the exported annotations from the bridge's file server.
        levels = page.wait_for(
            SPATIAL_IDS_SCRIPT.replace('"nodes"', f'"{EXPORTED_LAYER}"'),
            lambda v: v is not None and sum(map(len, v)) >= 3,
            timeout_s=30,
        )
        assert sorted(int(i) for level in levels for i in level) == [0, 1, 2]
        assert reports == []  # the bridge's writes and the page's echoes of them

        # The user adds segment 3 in the page.
        page.evaluate(
            '(viewer.layerManager.getLayerByName("segmentation").layer.displayState'
            ".segmentationGroupState.value.visibleSegments.add(3n), 0)"
        )
        page._run_until(lambda: bool(reports), time.monotonic() + 20, "the page's selection to reach Python")
        assert reports == [frozenset({1, 2, 3})]

        # The bridge selects 7; the page shows it and echoes its state. A camera move made
        # in the page afterwards reaches Python after any such echo (one ordered channel).
        bridge.highlight_segments([7])
        assert bridge.flush()
        assert page.wait_for(_VISIBLE_SEGMENTS_JS, lambda v: v == ["7"], timeout_s=30)
        # The move reaches Python even when the page's post crosses the bridge's write (the
        # race segscope.app.viewer_sync merges; plain neuroglancer drops every later page change).
        page.evaluate("(viewer.position.value = Float32Array.of(11, 22, 33), 0)")
        page._run_until(
            lambda: np.allclose(bridge.viewer.state.position, [11, 22, 33]),
            time.monotonic() + 20,
            "the page's camera move to reach Python",
        )
        assert reports == [frozenset({1, 2, 3})]


_PAGE_LAYERS_JS = "viewer.layerManager.managedLayers.map(l => [l.name, !!l.archived])"


@pytest.mark.qt
@pytest.mark.timeout(180)
def test_the_page_keeps_the_flag_last_and_the_ground_truth_out_of_the_layer_bar(web_qapp, bridge):
    from segscope.app.neuroglancer_bridge import LABELS_LAYER, SELECTION_LAYER

    from ngclient import NeuroglancerPage

    state = SessionState()
    bridge.attach(state)
    with NeuroglancerPage(bridge.viewer) as page:
        state.select_segment(12, [0.0, 0.0, 0.0])
        state.set_centres(12, [4, 8], np.array([[1000.0, 1000.0, 1000.0], [1100.0, 1000.0, 1000.0]]))
        state.add_embeddings(12, [0, 1], np.ones((2, 4)))
        state.set_predictions(12, predicted=[0, 1], ood_score=0.9, ood_flagged=True)
        assert bridge.flush()
        bridge.show_labels([(12, 4, (1000.0, 1000.0, 1000.0), "spine")])
        bridge.show_selected_nodes([(12, 4, (1000.0, 1000.0, 1000.0))])
        assert bridge.flush()
        expected = [
            ["image", False],
            [SEGMENTATION_LAYER, False],
            [GROUND_TRUTH_LAYER, True],
            [NODES_LAYER, False],
            [LABELS_LAYER, False],
            [SELECTION_LAYER, False],
            ["OUT OF DISTRIBUTION: segment 12", False],
        ]
        assert page.wait_for(_PAGE_LAYERS_JS, lambda v: v == expected, timeout_s=30) == expected
        for layer in (LABELS_LAYER, SELECTION_LAYER, "OUT OF DISTRIBUTION: segment 12"):
            assert (
                page.wait_for(_shader_error_js(layer), lambda v: v not in ("no layer", "not compiled"), timeout_s=30)
                is None
            ), layer


_PANEL_CENTRE_JS = (
    "(() => { const e = document.querySelector('.neuroglancer-rendered-data-panel');"
    " if (!e) return null; const r = e.getBoundingClientRect();"
    " return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; })()"
)
_SELECTED_JS = "viewer.layerSelectedValues.toJSON()"


def _mouse(page, kind, x: float, y: float) -> None:
    """A real mouse event on the web view's render widget (what a user's mouse sends)."""
    from PyQt6.QtCore import QEvent, QPointF, Qt
    from PyQt6.QtGui import QMouseEvent
    from PyQt6.QtWidgets import QApplication

    target = page.view.focusProxy() or page.view
    point = QPointF(x, y)
    global_point = QPointF(target.mapToGlobal(point.toPoint()))
    types = {
        "move": (QEvent.Type.MouseMove, Qt.MouseButton.NoButton, Qt.MouseButton.NoButton),
        "press": (QEvent.Type.MouseButtonPress, Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton),
        "release": (QEvent.Type.MouseButtonRelease, Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton),
        "double": (QEvent.Type.MouseButtonDblClick, Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton),
    }
    event_type, button, buttons = types[kind]
    event = QMouseEvent(event_type, point, global_point, button, buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(target, event)


@pytest.mark.qt
@pytest.mark.timeout(180)
def test_a_real_double_click_on_a_label_disc_selects_its_segment(web_qapp, bridge):
    from segscope.app.neuroglancer_bridge import LABELS_LAYER

    from ngclient import NeuroglancerPage

    centre = [1000.0, 1000.0, 1000.0]  # the view's centre (the fixture's dataset)
    bridge.show_labels([(77, 3, centre, "spine")])
    bridge.set_layout("xy")
    bridge.set_view(centre)
    assert bridge.flush()
    with NeuroglancerPage(bridge.viewer) as page:
        # One panel ("xy" layout), as wide as the page: the disc is drawn at its centre.
        x, y, _width, _ = page.wait_for(_PANEL_CENTRE_JS, lambda v: v is not None and v[2] > 600, timeout_s=30)
        # Hover until the page picks the disc (its selection state names the annotation).
        picked = None
        deadline = time.monotonic() + 30
        while picked is None and time.monotonic() < deadline:
            _mouse(page, "move", x, y)
            values = page.evaluate(_SELECTED_JS) or {}
            picked = (values.get(LABELS_LAYER) or {}).get("annotationId")
            page._run_until(lambda: False, time.monotonic() + 0.2, None)
        mouse = page.evaluate("Array.from(viewer.mouseState.position)")
        assert picked == "label-77-3", (values, mouse)
        # The segmentation has no data here (its source does not load): only the disc is under the mouse.
        for kind in ("press", "release", "double", "release"):
            _mouse(page, kind, x, y)
        page._run_until(lambda: bool(bridge.clicks), time.monotonic() + 20, "the double click to reach Python")
        assert bridge.clicks[-1].segment_id == 77
