"""The neuroglancer bridge, headless: click actions, selection and annotation writes."""

from __future__ import annotations

import numpy as np
import pytest

from app.neuroglancer_bridge import (
    GROUND_TRUTH_LAYER,
    NODES_LAYER,
    SEGMENTATION_LAYER,
    SELECT_ACTION,
    SELECT_EVENT,
    LayerSources,
    NeuroglancerBridge,
    cell_type_colour,
)
from app.state import COMPARTMENT_COLOURS, EMBEDDED_COLOUR, OOD_COLOUR, PENDING_COLOUR, SessionState

VOXEL = np.array([32.0, 32.0, 40.0])


@pytest.fixture
def bridge():
    clicks = []
    b = NeuroglancerBridge(clicks.append)
    b.clicks = clicks
    b.show_dataset(LayerSources("precomputed://http://127.0.0.1:9/image",
                                "precomputed://http://127.0.0.1:9/segmentation", None, VOXEL,
                                np.array([1000.0, 1000.0, 1000.0])))
    yield b
    b.close()


def fake_action(bridge, value, mouse_voxels):
    """What neuroglancer's client sends when the bound event fires."""
    return {"selectedValues": {SEGMENTATION_LAYER: {"value": value}} if value is not None else {},
            "mousePosition": mouse_voxels, "viewerState": bridge.viewer.state.to_json()}


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
    state.set_centres(12, [4, 8], np.array([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]),
                      ground_truth=[1, 255])
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
    # A classifier's classes get distinct colours, by position.
    names = [f"type{i}" for i in range(12)]
    assert len({cell_type_colour(name, names) for name in names}) == 12


def test_local_folders_are_served_on_localhost(bridge, tmp_path):
    (tmp_path / "info").write_text("{}")
    url = bridge.source_url(str(tmp_path), "neuroglancer_precomputed")
    assert url.startswith("precomputed://http://127.0.0.1:")
    import urllib.request

    with urllib.request.urlopen(url[len("precomputed://"):] + "/info", timeout=5) as reply:
        assert reply.read() == b"{}"
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
    with pytest.raises(FileNotFoundError):
        bridge.source_url(str(tmp_path / "missing"), "neuroglancer_precomputed")
    with pytest.raises(ValueError, match="cannot display"):
        bridge.source_url(str(tmp_path), "tiff")


def _flag_layers(bridge) -> list[str]:
    from app.neuroglancer_bridge import OOD_LAYER_PREFIX

    return [layer.name for layer in bridge.viewer.state.layers if layer.name.startswith(OOD_LAYER_PREFIX)]


def test_ood_segment_gets_a_named_flag_layer_with_a_box_and_loses_it_when_in_distribution(bridge):
    state = SessionState()
    bridge.attach(state)
    state.select_segment(12, [0.0, 0.0, 0.0])
    state.set_centres(12, [4, 8], np.array([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]]))
    state.add_embeddings(12, [0, 1], np.ones((2, 4)))
    state.set_predictions(12, predicted=[0, 1], cell_type="pyramidal", cell_type_probability=0.6,
                          ood_score=0.48, ood_flagged=True, ood_threshold=0.2)
    assert bridge.flush()
    assert _flag_layers(bridge) == ["OUT OF DISTRIBUTION: segment 12"]
    (box,) = annotations(bridge, "OUT OF DISTRIBUTION: segment 12")
    assert box["type"] == "axis_aligned_bounding_box"
    np.testing.assert_allclose(box["pointA"], [-900.0, -800.0, -700.0])
    np.testing.assert_allclose(box["pointB"], [1400.0, 1500.0, 1600.0])
    assert "uncertainty 0.48 > threshold 0.20" in box["description"]
    assert bridge.viewer.state.layers[SEGMENTATION_LAYER].segment_colors[np.uint64(12)] == OOD_COLOUR

    # A new score for the same segment changes the box, not the layer list; the same score
    # (to the shown precision) writes nothing.
    state.set_predictions(12, ood_score=0.55, ood_flagged=True, ood_threshold=0.2)
    assert bridge.flush()
    assert _flag_layers(bridge) == ["OUT OF DISTRIBUTION: segment 12"]
    assert "uncertainty 0.55" in annotations(bridge, "OUT OF DISTRIBUTION: segment 12")[0]["description"]
    writes = bridge.writes
    state.set_predictions(12, ood_score=0.5501, ood_flagged=True, ood_threshold=0.2)
    assert bridge.flush()
    assert bridge.writes == writes

    # In distribution: the cell type's colour and no flag.
    state.set_predictions(12, cell_type="pyramidal", cell_type_probability=0.9, ood_score=0.1,
                          ood_flagged=False, ood_threshold=0.2)
    assert bridge.flush()
    assert _flag_layers(bridge) == []
    assert bridge.viewer.state.layers[SEGMENTATION_LAYER].segment_colors[np.uint64(12)] \
        == cell_type_colour("pyramidal")

    # Selecting another segment drops a flag too.
    state.set_predictions(12, ood_score=0.9, ood_flagged=True)
    assert bridge.flush() and _flag_layers(bridge)
    state.select_segment(13)
    assert bridge.flush()
    assert _flag_layers(bridge) == []


def test_no_cell_type_colour_can_be_mistaken_for_the_ood_magenta():
    def rgb(colour):
        return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)

    for name in [f"type{i}" for i in range(200)] + ["pyramidal", "interneuron", "astrocyte"]:
        assert np.abs(rgb(cell_type_colour(name)) - rgb(OOD_COLOUR)).max() > 100
