"""Page posts that cross the bridge's writes merge instead of being dropped (segscope.app.viewer_sync)."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest

from segscope.app.viewer_sync import merge_client_state, merging_viewer, share_unchanged


def base_state() -> dict:
    return {
        "position": [1.0, 2.0, 3.0],
        "crossSectionScale": 1.0,
        "layout": "xy-3d",
        "layers": [
            {"type": "image", "name": "em", "source": "precomputed://em", "visible": True},
            {"type": "segmentation", "name": "seg", "source": "precomputed://seg", "segments": ["1"]},
            {"type": "annotation", "name": "hover", "annotations": []},
        ],
    }


def layer(state: dict, name: str) -> dict:
    return next(item for item in state["layers"] if item["name"] == name)


def test_changes_on_different_keys_and_layers_are_both_kept():
    base = base_state()
    server = copy.deepcopy(base)
    layer(server, "hover")["annotations"] = [{"type": "point", "id": "h", "point": [5, 5, 5]}]
    layer(server, "seg")["segments"] = ["7"]
    client = copy.deepcopy(base)
    client["position"] = [11, 22, 33]
    layer(client, "em")["visible"] = False
    merged = merge_client_state(base, server, client)
    assert merged["position"] == [11, 22, 33]
    assert layer(merged, "em")["visible"] is False
    assert layer(merged, "seg")["segments"] == ["7"]
    assert layer(merged, "hover")["annotations"] == layer(server, "hover")["annotations"]
    assert [item["name"] for item in merged["layers"]] == ["em", "seg", "hover"]


def test_a_key_both_sides_changed_keeps_the_server_value_and_segment_sets_merge():
    base = base_state()
    layer(base, "seg")["segments"] = ["1", "2"]
    server, client = copy.deepcopy(base), copy.deepcopy(base)
    server["position"] = [0, 0, 0]
    client["position"] = [9, 9, 9]
    layer(server, "em")["visible"] = False
    layer(client, "em")["visible"] = "maybe"
    # The bridge selects 7 (and drops 2) while the user adds 3 and removes 1 in the page.
    layer(server, "seg")["segments"] = ["1", "7"]
    layer(client, "seg")["segments"] = ["2", "3"]
    merged = merge_client_state(base, server, client)
    assert merged["position"] == [0, 0, 0] and layer(merged, "em")["visible"] is False
    assert layer(merged, "seg")["segments"] == ["7", "3"]


def test_layers_added_removed_and_reordered_by_the_page():
    base = base_state()
    server = copy.deepcopy(base)
    layer(server, "hover")["annotations"] = [{"type": "point", "id": "h", "point": [5, 5, 5]}]
    server["layers"].append({"type": "annotation", "name": "labels", "annotations": []})
    client = copy.deepcopy(base)
    client["layers"] = [layer(client, "seg"), layer(client, "em"), layer(client, "hover")]  # reordered
    client["layers"].append({"type": "annotation", "name": "mine", "annotations": []})
    # The server added a layer, so its order wins; the page's new layer is appended.
    merged = merge_client_state(base, server, client)
    assert [item["name"] for item in merged["layers"]] == ["em", "seg", "hover", "labels", "mine"]
    # The page removes "em" (unchanged on the server: gone) and "hover" (changed: kept).
    client = copy.deepcopy(base)
    client["layers"] = [layer(client, "seg")]
    merged = merge_client_state(base, server, client)
    assert [item["name"] for item in merged["layers"]] == ["seg", "hover", "labels"]
    # With the server's layers untouched, the page's order stands.
    reordered = copy.deepcopy(base)
    reordered["layers"].reverse()
    merged = merge_client_state(base, copy.deepcopy(base), reordered)
    assert [item["name"] for item in merged["layers"]] == ["hover", "seg", "em"]


def test_unnamed_layers_merge_as_one_value():
    base = {"position": [0, 0, 0], "layers": {"em": {"type": "image"}}}  # neuroglancer's dict form
    server = copy.deepcopy(base)
    client = copy.deepcopy(base)
    client["layers"] = {"em": {"type": "image", "visible": False}}
    assert merge_client_state(base, server, client)["layers"] == client["layers"]
    server["layers"] = {"em": {"type": "image", "opacity": 0.5}}
    assert merge_client_state(base, server, client)["layers"] == server["layers"]


def test_history_shares_unchanged_values_between_generations():
    first = base_state()
    layer(first, "hover")["annotations"] = [{"type": "point", "id": str(i), "point": [i, 0, 0]} for i in range(100)]
    second = copy.deepcopy(first)
    layer(second, "seg")["segments"] = ["7"]
    layer(second, "hover")["visible"] = False
    shared = share_unchanged(second, first)
    assert shared == second  # the same content...
    # ...holding the unchanged objects of the previous state, not copies.
    assert shared["position"] is first["position"]
    assert layer(shared, "hover")["annotations"] is layer(first, "hover")["annotations"]
    assert layer(shared, "seg")["segments"] is layer(second, "seg")["segments"]
    assert share_unchanged(second, None) is second


@pytest.fixture
def viewer():
    import neuroglancer

    neuroglancer.set_server_bind_address("127.0.0.1", 0)
    viewer = merging_viewer()
    viewer.set_state(base_state())
    return viewer


def post_state(viewer, state: dict, client_generation: int, previous: str) -> tuple[int, str | None]:
    """What the page does: POST its state to the server's state handler; (status, generation)."""
    url = viewer.get_viewer_url()
    prefix, token = url.rstrip("/").rsplit("/v/", 1)
    body = json.dumps({"s": state, "g": client_generation, "pg": previous, "c": "page"}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{prefix}/state/{token}", data=body), timeout=30) as reply:
            return reply.status, json.loads(reply.read())["g"]
    except urllib.error.HTTPError as error:
        return error.code, None


def test_the_servers_state_handler_merges_a_post_that_crossed_a_bridge_write(viewer):
    """The race of the page's reply handling: its post is based on an older generation
    although it already shows the bridge's write. neuroglancer alone answers 412 and the
    page stays stuck; the merging viewer keeps both changes and moves on."""
    page_state, based_on = viewer.shared_state.raw_state_and_generation
    page_state = copy.deepcopy(page_state)
    with viewer.txn() as s:  # the bridge writes
        s.layers["seg"].segments = {7}
    layer(page_state, "seg")["segments"] = ["7"]  # the page shows it...
    page_state["position"] = [11, 22, 33]  # ...and the user moves
    status, generation = post_state(viewer, page_state, 5, based_on)
    assert status == 200 and viewer.merges == 1
    assert not generation.startswith("page/")  # a fresh generation: the page is sent the merge
    assert generation == viewer.shared_state.state_generation
    assert list(viewer.state.position) == [11, 22, 33]
    assert {int(v) for v in viewer.state.layers["seg"].segments} == {7}
    # An up-to-date post goes through as neuroglancer's own does.
    page_state["crossSectionScale"] = 2.0
    status, generation = post_state(viewer, page_state, 6, generation)
    assert status == 200 and generation == "page/6" and viewer.merges == 1


def test_a_post_based_on_a_forgotten_generation_is_refused_and_the_page_resent(viewer):
    before = viewer.shared_state.state_generation
    status, _ = post_state(viewer, base_state(), 1, "no-such-generation")
    assert status == 412 and viewer.resyncs == 1
    # A new generation, same content: the event stream sends the page the current state.
    assert viewer.shared_state.state_generation != before
    assert viewer.shared_state.raw_state == base_state()
