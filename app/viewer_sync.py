"""Keep the user's changes in the Neuroglancer page when they cross the bridge's writes.

The problem
-----------
neuroglancer's page posts its state to the Python server with the server generation it
last saw (``pg``). If the server state changed since (the bridge wrote), the server
answers 412 and the page drops its change, expecting the server's newer state over its
event stream. Two things then go wrong:

* the user's change (a camera move, a layer toggle) is lost, although it did not touch
  what the bridge wrote (hover rings, node layers, segment colours);
* the page reads a POST's reply after awaiting its body, so an event-stream message can
  slip in between: the page applies the new server state, then overwrites its record of
  the server generation with the older one from the reply. Every later post is then
  refused (its ``pg`` is stale) and nothing is resent (the server already sent that
  state): the page's changes vanish until the bridge happens to write again, which then
  resets the page to the server's state. This is what made a page camera move "never reach
  Python" in the Qt tests.

The fix
-------
:func:`merging_viewer` makes a ``neuroglancer.Viewer`` whose ``set_state`` (what the
server's state handler calls for a page post) merges instead of refusing: a three-way
merge of the post against the state at the page's ``pg`` and the current state. A
top-level key, or a layer's key (layers matched by name), that the page changed and the
server did not takes the page's value; everything else keeps the server's. The merge gets
a fresh generation, so the server sends it back to the page, which then holds the merged
state and the right generation. When ``pg`` is too old to be remembered the post is
refused as before, but the generation is bumped so the page is sent the current state and
can post again.

The server keeps the states of recent generations to merge against. Consecutive states
share every value that did not change (an equality check: 5 ms for a 20,000-point layer,
against 90 ms for hashing its JSON), so the history costs little more than one state.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

#: Generations whose states are kept: a page is at most a few generations behind.
HISTORY = 32

_MISSING = object()


def _named_layers(layers: Any) -> dict[str, dict] | None:
    """``{name: layer}`` of a list of uniquely named layer dicts (absent: empty), else None."""
    if layers is _MISSING:
        layers = []
    if not isinstance(layers, list) or not all(isinstance(layer, dict) and "name" in layer for layer in layers):
        return None
    named = {str(layer["name"]): layer for layer in layers}
    return named if len(named) == len(layers) else None


def share_unchanged(state: dict, previous: dict | None) -> dict:
    """``state`` with every value that equals ``previous``'s replaced by ``previous``'s object.

    ``state`` is a raw viewer state (JSON dict); the values compared are every top-level
    value and every layer's value.

    Equal content, so merging sees no difference; but a history of states then holds
    each unchanged (possibly huge) annotation list once.
    """
    if not previous:
        return state
    shared = {
        key: previous[key] if key in previous and previous[key] == value else value
        for key, value in state.items()
        if key != "layers"
    }
    if "layers" in state:
        layers, old = _named_layers(state["layers"]), _named_layers(previous.get("layers", _MISSING))
        if layers is None or old is None:
            same = previous.get("layers", _MISSING) == state["layers"]
            shared["layers"] = previous["layers"] if same else state["layers"]
        else:
            shared["layers"] = [
                {
                    key: old[name][key] if name in old and key in old[name] and old[name][key] == value else value
                    for key, value in layer.items()
                }
                for name, layer in layers.items()
            ]
    return shared


#: Layer keys whose values are sets of ids (in any order): when both sides changed one,
#: both sides' additions and removals apply.
SET_KEYS = frozenset({"segments"})


def _merge_keys(base: dict, server: dict, client: dict, set_keys: frozenset[str] = frozenset()) -> dict:
    """Three-way merge of ``base``, ``server`` and ``client``, key by key.

    Each key gets the client's value where only the client changed it, else the server's;
    for ``set_keys`` changed on both sides, the server's set plus the client's additions
    minus its removals.
    """
    merged = {}
    for key in list(server) + [k for k in client if k not in server]:
        b_value = base.get(key, _MISSING)
        s_value, c_value = server.get(key, _MISSING), client.get(key, _MISSING)
        client_changed, server_changed = not _same(c_value, b_value), not _same(s_value, b_value)
        if (
            client_changed
            and server_changed
            and key in set_keys
            and all(isinstance(v, list) for v in (b_value, s_value, c_value))
        ):
            value = _merge_sets(b_value, s_value, c_value)
        else:
            value = c_value if client_changed and not server_changed else s_value
        if value is not _MISSING:
            merged[key] = value
    return merged


def _merge_sets(base: list, server: list, client: list) -> list:
    """``server`` with the ids ``client`` added since ``base``, without those it removed."""
    key = json.dumps  # ids are JSON scalars (strings, in neuroglancer's state): hashable text
    base_ids, client_ids = {key(v) for v in base}, {key(v) for v in client}
    removed, added = base_ids - client_ids, client_ids - base_ids
    merged = [v for v in server if key(v) not in removed]
    present = {key(v) for v in merged}
    return merged + [v for v in client if key(v) in added and key(v) not in present]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if a is _MISSING or b is _MISSING:
        return False
    return a == b


def merge_client_state(base: dict, server: dict, client: dict) -> dict:
    """Three-way merge of a page's posted state into the server's (raw JSON dicts).

    Parameters
    ----------
    base
        The server state the page's change was based on.
    server
        The server's current state.
    client
        The state the page posted.

    Returns
    -------
    dict
        The merged state: keys and per-layer keys (layers matched by name) that the page
        changed since ``base`` and the server did not take the page's values; the rest,
        conflicts included, the server's, except a layer's ``segments`` changed on both
        sides, which keeps both sides' additions and removals. Layers the page added are appended; layers it
        removed are removed unless the server changed them meanwhile. The page's layer
        order is kept when the server's order did not change.
    """
    merged = _merge_keys(
        {k: v for k, v in base.items() if k != "layers"},
        {k: v for k, v in server.items() if k != "layers"},
        {k: v for k, v in client.items() if k != "layers"},
    )
    base_value = base.get("layers", _MISSING)
    server_value, client_value = server.get("layers", _MISSING), client.get("layers", _MISSING)
    base_layers = _named_layers(base_value)
    server_layers, client_layers = _named_layers(server_value), _named_layers(client_value)
    if base_layers is None or server_layers is None or client_layers is None:
        # Layers that cannot be matched by name merge as one value.
        whole = _merge_keys({"layers": base_value}, {"layers": server_value}, {"layers": client_value})
        if "layers" in whole:
            merged["layers"] = whole["layers"]
        return merged
    layers: dict[str, dict] = {}
    for name, layer in server_layers.items():
        if name not in client_layers:
            removed_by_client = name in base_layers
            if not (removed_by_client and _same(layer, base_layers[name])):
                layers[name] = layer
        elif name in base_layers:
            layers[name] = _merge_keys(base_layers[name], layer, client_layers[name], SET_KEYS)
        else:  # added on both sides since base: the server's
            layers[name] = layer
    for name, layer in client_layers.items():
        if name not in server_layers and name not in base_layers:
            layers[name] = layer  # the page added it
    order = list(client_layers) if list(server_layers) == list(base_layers) else list(server_layers)
    ordered = [name for name in order if name in layers] + [name for name in layers if name not in order]
    if server_value is not _MISSING or ordered:
        merged["layers"] = [layers[name] for name in ordered]
    return merged


def merging_viewer(history: int = HISTORY):
    """A ``neuroglancer.Viewer`` whose page posts merge with the server's changes instead of being refused.

    See the module notes.

    Attributes on the viewer: ``merges`` (posts merged so far) and ``resyncs`` (posts
    refused because their base was forgotten, after which the page was sent the state).
    """
    import neuroglancer
    from neuroglancer.random_token import make_random_token
    from neuroglancer.trackable_state import ConcurrentModificationError

    class MergingViewer(neuroglancer.Viewer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.merges = 0
            self.resyncs = 0
            self._history: collections.OrderedDict[str, dict] = collections.OrderedDict()
            self._history_lock = threading.Lock()
            # Called under the shared state's lock for every change, so each generation is
            # recorded before any post can name it.
            self.shared_state.add_changed_callback(self._remember)

        def _remember(self) -> None:
            raw, generation = self.shared_state.raw_state_and_generation
            if not isinstance(raw, dict):
                return
            with self._history_lock:
                previous = next(reversed(self._history.values()), None)
                self._history[generation] = share_unchanged(raw, previous)
                while len(self._history) > history:
                    self._history.popitem(last=False)

        def set_state(self, new_state, generation=None, existing_generation=None):
            shared = self.shared_state
            # The shared state's own (re-entrant) lock: the merge reads and writes atomically
            # with respect to the bridge's transactions, which hold it too.
            with shared._lock:
                try:
                    return shared.set_state(new_state, generation, existing_generation)
                except ConcurrentModificationError:
                    with self._history_lock:
                        base = self._history.get(existing_generation)
                    server = shared.raw_state
                    if base is None or not isinstance(new_state, dict) or not isinstance(server, dict):
                        self.resyncs += 1
                        log.info("page state based on a forgotten generation: sending it the current state")
                        shared.set_state(server, generation=make_random_token())
                        raise
                    merged = merge_client_state(base, server, new_state)
                    self.merges += 1
                    # A fresh generation (not the page's): the server sends the merge back.
                    return shared.set_state(merged, generation=make_random_token())

    return MergingViewer()
