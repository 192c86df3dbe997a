"""The bridge between SegScope's session state and a Neuroglancer viewer (no Qt).

The viewer is neuroglancer's own Python-backed viewer, served on 127.0.0.1 only; the Qt
window shows its page in a web view. Three kinds of traffic cross the bridge:

* **Clicks in**: a double click on a segment (2-D or 3-D panel) runs the custom action
  :data:`SELECT_ACTION` on neuroglancer's server thread. The handler only snapshots the
  segment id and the mouse position (nm) into a :class:`ClickEvent` and hands it to
  ``on_click``; it never touches the session state or waits (the Qt app forwards it with a
  queued signal).
* **Data out**: local volumes are served to the page by a static file server bound to
  127.0.0.1; remote ``gs://``/``http(s)://`` sources go to the page as they are.
* **State out**: selection, node annotations and segment colours are written with
  ``viewer.txn()`` on the bridge's own writer thread, so no caller waits on neuroglancer's
  lock. Writes are keyed and coalesced (only the newest pending write of a key runs), and
  each one compares the wanted layer contents with the viewer's current state first and
  skips the transaction when they already agree. Nothing here listens to viewer-state
  changes, so a write can never echo back into the session state.

Annotation layers
-----------------
:data:`NODES_LAYER` holds one point per embedding centre of the selected segment: grey
while its embedding is pending, yellow once embedded, and the colour of its *predicted*
subcompartment when a subcompartment classifier has labelled it. :data:`GROUND_TRUTH_LAYER`
(hidden by default) shows the dataset's own compartment labels, when it has any, for
comparison. The selected segment's colour is its predicted cell type's colour, or magenta
(:data:`app.state.OOD_COLOUR`) when it is flagged out of distribution; a flagged segment
also gets a layer whose *name* says so in the layer bar (:data:`OOD_LAYER_PREFIX`), holding
a magenta box around its nodes (2-D and 3-D) with the score in its description.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np

from analysis import COMPARTMENTS
from app.state import (
    COMPARTMENT_COLOURS,
    EMBEDDED_COLOUR,
    OOD_COLOUR,
    PENDING_COLOUR,
    UNKNOWN_COMPARTMENT,
    SegmentRecord,
    SessionState,
)

log = logging.getLogger(__name__)

#: Name of the custom neuroglancer action bound to a double click in the data views.
SELECT_ACTION = "segscope-select-segment"
#: Input event that triggers :data:`SELECT_ACTION` (neuroglancer's own "select segment").
SELECT_EVENT = "at:dblclick0"
IMAGE_LAYER = "image"
SEGMENTATION_LAYER = "segmentation"
NODES_LAYER = "segscope nodes"
GROUND_TRUTH_LAYER = "ground truth compartments (dataset)"
#: Start of the name of the layer that flags an out-of-distribution segment.
OOD_LAYER_PREFIX = "OUT OF DISTRIBUTION"
#: Margin (nm) of the flag box around the segment's nodes.
OOD_BOX_MARGIN_NM = 1000.0

#: Marker diameters (screen pixels) of pending, embedded and labelled nodes.
PENDING_SIZE, EMBEDDED_SIZE, LABELLED_SIZE = 5.0, 7.0, 9.0

_NODE_SHADER = """
void main() {
  setColor(prop_color());
  setPointMarkerSize(prop_size());
  setPointMarkerBorderWidth(1.0);
  setPointMarkerBorderColor(vec4(0.0, 0.0, 0.0, 1.0));
}
"""

_DRIVER_PREFIX = {
    "neuroglancer_precomputed": "precomputed://",
    "zarr": "zarr://",
    "zarr3": "zarr3://",
    "n5": "n5://",
}

#: Colours for cell types (picked by a hash of the name, so stable across runs). No
#: magenta or violet: magenta means "out of distribution" and must stay unambiguous.
_CELL_TYPE_PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#46f0f0",
                      "#bcf60c", "#fabebe", "#008080", "#9a6324", "#aaffc3", "#808000")

_NM_PER_UNIT = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3}


@dataclass(frozen=True)
class ClickEvent:
    """What the user double-clicked, snapshotted on neuroglancer's server thread.

    Attributes
    ----------
    segment_id : int or None
        Segment under the cursor in the segmentation layer; None over background.
    position_nm : numpy.ndarray or None
        float64 ``[3]`` xyz nm of the mouse; None when the cursor was outside the data.
    """

    segment_id: int | None
    position_nm: np.ndarray | None


def cell_type_colour(name: str, class_names: Sequence[str] = ()) -> str:
    """A stable display colour for a cell-type name.

    With the classifier's ``class_names``, classes get distinct colours by their position
    (the palette has 12); otherwise a hash of the name picks one (same name, same colour,
    every run, but two names may share one).
    """
    if name in class_names:
        return _CELL_TYPE_PALETTE[list(class_names).index(name) % len(_CELL_TYPE_PALETTE)]
    digest = hashlib.md5(name.encode("utf-8")).digest()
    return _CELL_TYPE_PALETTE[digest[0] % len(_CELL_TYPE_PALETTE)]


def _dimension_scales_nm(dimensions) -> np.ndarray:
    """nm per unit of each of the viewer's x, y, z dimensions."""
    scales = []
    for name in ("x", "y", "z"):
        index = list(dimensions.names).index(name)
        unit = dimensions.units[index]
        if unit not in _NM_PER_UNIT:
            raise ValueError(f"viewer dimension {name} has unit {unit!r}, not a length")
        scales.append(float(dimensions.scales[index]) * _NM_PER_UNIT[unit])
    return np.asarray(scales)


def click_event_from_action(action_state, segmentation_layer: str = SEGMENTATION_LAYER) -> ClickEvent:
    """Read a :class:`ClickEvent` out of a neuroglancer ``ActionState``.

    The mouse position comes in the viewer's global coordinates (one unit per dimension
    scale); it is converted to nm with the dimensions recorded in the same action state.
    """
    segment_id = None
    selected = action_state.selected_values.get(segmentation_layer) if action_state.selected_values else None
    value = getattr(selected, "value", None)
    if value is not None:
        # A SegmentIdMapEntry carries the raw volume value as ``key`` (``value`` is its
        # equivalence-mapped id); cutouts mask the raw volume, so the key is what we want.
        raw = value.key if hasattr(value, "key") else value
        if int(raw) != 0:
            segment_id = int(raw)
    position_nm = None
    mouse = action_state.mouse_voxel_coordinates
    viewer_state = action_state.viewer_state
    if mouse is not None and viewer_state is not None and viewer_state.dimensions is not None:
        try:
            position_nm = np.asarray(mouse, dtype=np.float64)[:3] * _dimension_scales_nm(viewer_state.dimensions)
        except (ValueError, IndexError):
            log.warning("cannot convert mouse position %s to nm", mouse)
    return ClickEvent(segment_id, position_nm)


@dataclass(frozen=True)
class LayerSources:
    """Where the page loads the dataset from (neuroglancer source URLs) and its geometry.

    Attributes
    ----------
    image, segmentation : str
        Neuroglancer data source URLs (``precomputed://http://127.0.0.1:.../image``...).
    skeletons : str or None
        An extra skeleton source for the segmentation layer (when not named in its info).
    voxel_size_nm : numpy.ndarray
        ``[3]`` xyz nm: the viewer's dimension scales.
    centre_nm : numpy.ndarray
        ``[3]`` xyz nm where the view starts.
    """

    image: str
    segmentation: str
    skeletons: str | None
    voxel_size_nm: np.ndarray
    centre_nm: np.ndarray


class _KeyedWriter:
    """A thread that runs keyed jobs, newest per key only, in first-request order."""

    def __init__(self, name: str):
        self._pending: dict[str, Callable[[], None]] = {}
        self._condition = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        with self._condition:
            if self._closed:
                return
            self._pending[key] = fn  # replaces an older pending write of the same key
            self._condition.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or running; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                key = next(iter(self._pending))
                fn = self._pending.pop(key)
                self._busy = True
            try:
                fn()
            except Exception:
                log.exception("neuroglancer write %r failed", key)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


class NeuroglancerBridge:
    """A neuroglancer viewer bound to 127.0.0.1, wired to SegScope's session state.

    Parameters
    ----------
    on_click
        Called with a :class:`ClickEvent` on neuroglancer's server thread whenever the
        user double-clicks in a 2-D or 3-D panel. It must return quickly.
    bind_address
        Address of neuroglancer's server and of the local file servers.
    """

    def __init__(self, on_click: Callable[[ClickEvent], None], *, bind_address: str = "127.0.0.1"):
        import neuroglancer

        self._neuroglancer = neuroglancer
        self._bind_address = bind_address
        neuroglancer.set_server_bind_address(bind_address, 0)
        self.viewer = neuroglancer.Viewer()
        self._on_click = on_click
        self._file_servers: dict[str, Any] = {}
        self._writer = _KeyedWriter("segscope-neuroglancer-writer")
        self._unsubscribe: list[Callable[[], None]] = []
        self._state: SessionState | None = None
        self.writes = 0  # transactions actually committed (skipped no-op writes excluded)
        self.viewer.actions.add(SELECT_ACTION, self._handle_select_action)
        with self.viewer.config_state.txn() as s:
            s.input_event_bindings.data_view[SELECT_EVENT] = SELECT_ACTION
            s.show_ui_controls = True
            s.show_panel_borders = True

    @property
    def url(self) -> str:
        """The page to load (``http://127.0.0.1:PORT/v/TOKEN/``)."""
        return self.viewer.get_viewer_url()

    # -- clicks ----------------------------------------------------------------------------

    def _handle_select_action(self, action_state) -> None:
        # Server thread: snapshot and hand over; the consumer decides what to do.
        event = click_event_from_action(action_state, SEGMENTATION_LAYER)
        log.debug("double click: segment %s at %s nm", event.segment_id, event.position_nm)
        self._on_click(event)

    # -- data sources ----------------------------------------------------------------------

    def source_url(self, url: str, driver: str) -> str:
        """The neuroglancer source URL for a volume opened from ``url`` by ``driver``.

        Local folders are served by a static file server on the bind address.

        Raises
        ------
        ValueError
            For a driver or URL scheme neuroglancer cannot read.
        """
        if driver not in _DRIVER_PREFIX:
            raise ValueError(f"neuroglancer cannot display {driver} volumes ({url!r})")
        return _DRIVER_PREFIX[driver] + self.http_url(url)

    def http_url(self, url: str) -> str:
        """``url`` as the page can fetch it: local paths become http://127.0.0.1 URLs."""
        for prefix in ("precomputed://", "zarr://", "zarr2://", "zarr3://", "n5://"):
            if url.startswith(prefix):
                url = url[len(prefix):]
        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        if scheme in ("gs", "s3", "http", "https"):
            return url.rstrip("/")
        if scheme not in ("", "file"):
            raise ValueError(f"neuroglancer cannot load {url!r} (scheme {scheme!r})")
        path = Path(parsed.path if scheme == "file" else url).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"no such folder {path}")
        return self._serve_folder(path)

    def _serve_folder(self, path: Path) -> str:
        key = str(path)
        server = self._file_servers.get(key)
        if server is None:
            from neuroglancer.static_file_server import StaticFileServer

            server = StaticFileServer(static_dir=key, bind_address=self._bind_address, daemon=True)
            self._file_servers[key] = server
            log.debug("serving %s at %s", path, server.url)
        return server.url

    def show_dataset(self, sources: LayerSources, *, layout: str = "xy-3d") -> None:
        """Replace the viewer's layers with image, segmentation (and skeletons) and the
        annotation layers, centred on ``sources.centre_nm``."""
        neuroglancer = self._neuroglancer
        voxel = np.asarray(sources.voxel_size_nm, dtype=np.float64)
        dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=voxel.tolist())
        nm_space = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[1, 1, 1])
        segmentation_sources = [sources.segmentation]
        if sources.skeletons:
            segmentation_sources.append(sources.skeletons)
        with self.viewer.txn() as s:
            s.dimensions = dimensions
            s.position = (np.asarray(sources.centre_nm) / voxel).tolist()
            s.layers.clear()
            s.layers[IMAGE_LAYER] = neuroglancer.ImageLayer(source=sources.image)
            s.layers[SEGMENTATION_LAYER] = neuroglancer.SegmentationLayer(
                source=segmentation_sources, selected_alpha=0.35, not_selected_alpha=0.05,
                hide_segment_zero=True,
            )
            s.layers[GROUND_TRUTH_LAYER] = neuroglancer.LocalAnnotationLayer(
                dimensions=nm_space, annotation_properties=_node_properties(), shader=_NODE_SHADER,
            )
            s.layers[GROUND_TRUTH_LAYER].visible = False
            s.layers[NODES_LAYER] = neuroglancer.LocalAnnotationLayer(
                dimensions=nm_space, annotation_properties=_node_properties(), shader=_NODE_SHADER,
            )
            s.selected_layer.layer = SEGMENTATION_LAYER
            s.layout = layout
        self.writes += 1

    def show_source(self, source, *, layout: str = "xy-3d") -> None:
        """Show a :class:`app.controller.DataSource` (serving its local folders).

        Raises
        ------
        ValueError, FileNotFoundError
            When neuroglancer cannot load one of its volumes.
        """
        sources = LayerSources(
            image=self.source_url(source.image_url, source.image.info.driver),
            segmentation=self.source_url(source.segmentation_url, source.segmentation.info.driver),
            skeletons=None if source.neuroglancer_skeletons is None
            else "precomputed://" + self.http_url(source.neuroglancer_skeletons),
            voxel_size_nm=np.asarray(source.segmentation.voxel_size_nm, dtype=np.float64),
            centre_nm=np.asarray(source.centre_nm, dtype=np.float64),
        )
        self._writer.submit("dataset", lambda: self.show_dataset(sources, layout=layout))

    def set_layout(self, layout: str) -> None:
        """Change the panel layout (``"xy"``, ``"3d"``, ``"xy-3d"``, ``"4panel"``...)."""
        self._writer.submit("layout", lambda: self._write_if_changed(
            lambda s: s.layout.type == layout, lambda s: setattr(s, "layout", layout)))

    def set_view(self, centre_nm: Sequence[float], cross_section_scale: float | None = None) -> None:
        """Move the view to ``centre_nm`` (xyz nm); optionally zoom the 2-D panels."""
        def apply(s) -> None:
            scales = _dimension_scales_nm(s.dimensions)
            s.position = (np.asarray(centre_nm, dtype=np.float64) / scales).tolist()
            if cross_section_scale is not None:
                s.cross_section_scale = cross_section_scale

        self._writer.submit("view", lambda: self._write(apply))

    # -- following the session state -------------------------------------------------------

    def attach(self, state: SessionState) -> None:
        """Mirror ``state`` into the viewer from now on (subscribes to its events).

        Handlers run on the thread that mutates the state; they copy what they need and
        queue the write, so they return in microseconds.
        """
        self._state = state
        self._unsubscribe += [
            state.subscribe("segment", self._on_segment),
            state.subscribe("centres", self._on_centres),
            state.subscribe("embeddings", lambda record, _indices: self._on_nodes_changed(record)),
            state.subscribe("predictions", self._on_predictions),
        ]

    def _on_segment(self, record: SegmentRecord | None) -> None:
        segment_id = None if record is None else record.segment_id
        self._writer.submit("segments", lambda: self._write_selection(segment_id))
        self._writer.submit("nodes", lambda: self._write_nodes(NODES_LAYER, []))
        self._writer.submit("ground_truth", lambda: self._write_nodes(GROUND_TRUTH_LAYER, []))
        self._writer.submit("ood_flag", lambda: self._write_ood_flag(None))

    def _on_centres(self, record: SegmentRecord) -> None:
        self._on_nodes_changed(record)
        truth = ground_truth_annotations(record)
        self._writer.submit("ground_truth", lambda: self._write_nodes(GROUND_TRUTH_LAYER, truth))

    def _on_nodes_changed(self, record: SegmentRecord) -> None:
        nodes = node_annotations(record)
        self._writer.submit("nodes", lambda: self._write_nodes(NODES_LAYER, nodes))

    def _on_predictions(self, record: SegmentRecord) -> None:
        self._on_nodes_changed(record)
        summary = None if self._state is None else self._state.classifiers
        class_names = () if summary is None or summary.cell_type is None else summary.cell_type.class_names
        colour = segment_colour(record, class_names)
        segment_id = record.segment_id
        self._writer.submit("segment_colour", lambda: self._write_segment_colour(segment_id, colour))
        flag = ood_flag(record)
        self._writer.submit("ood_flag", lambda: self._write_ood_flag(flag))

    # -- writes (writer thread) ------------------------------------------------------------

    def _write(self, apply: Callable[[Any], None]) -> None:
        with self.viewer.txn() as s:
            apply(s)
        self.writes += 1

    def _write_if_changed(self, is_current: Callable[[Any], bool], apply: Callable[[Any], None]) -> bool:
        """Apply a change unless the viewer already shows it (compare first, then txn)."""
        if is_current(self.viewer.state):
            return False
        self._write(apply)
        return True

    def _write_selection(self, segment_id: int | None) -> None:
        wanted = set() if segment_id is None else {int(segment_id)}

        def is_current(s) -> bool:
            layer = s.layers[SEGMENTATION_LAYER] if SEGMENTATION_LAYER in s.layers else None
            return layer is None or {int(v) for v in layer.segments} == wanted

        def apply(s) -> None:
            s.layers[SEGMENTATION_LAYER].segments = wanted

        self._write_if_changed(is_current, apply)

    def _write_nodes(self, layer_name: str, annotations: list[dict]) -> None:
        def is_current(s) -> bool:
            if layer_name not in s.layers:
                return True
            return [a.to_json() for a in s.layers[layer_name].annotations] == annotations

        def apply(s) -> None:
            s.layers[layer_name].annotations = annotations

        self._write_if_changed(is_current, apply)

    def _write_segment_colour(self, segment_id: int, colour: str | None) -> None:
        def is_current(s) -> bool:
            if SEGMENTATION_LAYER not in s.layers:
                return True
            colours = s.layers[SEGMENTATION_LAYER].segment_colors
            return colours.get(np.uint64(segment_id)) == colour

        def apply(s) -> None:
            colours = s.layers[SEGMENTATION_LAYER].segment_colors
            if colour is None:
                colours.pop(np.uint64(segment_id), None)
            else:
                colours[np.uint64(segment_id)] = colour

        self._write_if_changed(is_current, apply)

    def _write_ood_flag(self, flag: tuple[str, dict] | None) -> None:
        """Show ``flag`` (layer name, box annotation) as the only flag layer; None: none."""
        neuroglancer = self._neuroglancer

        def is_current(s) -> bool:
            names = [layer.name for layer in s.layers if layer.name.startswith(OOD_LAYER_PREFIX)]
            if flag is None:
                return not names
            return names == [flag[0]] and [a.to_json() for a in s.layers[flag[0]].annotations] == [flag[1]]

        def apply(s) -> None:
            for name in [layer.name for layer in s.layers if layer.name.startswith(OOD_LAYER_PREFIX)]:
                if flag is not None and name == flag[0]:
                    # Same segment, new score: change the box in place; re-creating the
                    # layer would make the page rebuild its layer panel.
                    s.layers[name].annotations = [flag[1]]
                    return
                del s.layers[name]
            if flag is not None:
                nm_space = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[1, 1, 1])
                s.layers[flag[0]] = neuroglancer.LocalAnnotationLayer(
                    dimensions=nm_space, annotation_properties=_flag_properties(), shader=_FLAG_SHADER,
                    annotations=[flag[1]])

        self._write_if_changed(is_current, apply)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every queued write is in the viewer state (tests, shutdown)."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        """Stop the writer thread and the file servers; unsubscribe from the state."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._writer.close()
        for server in self._file_servers.values():
            try:
                server.request_stop()
            except Exception:  # already stopped
                log.debug("file server stop failed", exc_info=True)
        self._file_servers.clear()
        try:
            self.viewer.actions.remove(SELECT_ACTION, self._handle_select_action)
        except KeyError:
            pass


def _node_properties() -> list:
    import neuroglancer

    return [
        neuroglancer.AnnotationPropertySpec(id="color", type="rgb", default=PENDING_COLOUR),
        neuroglancer.AnnotationPropertySpec(id="size", type="float32", default=PENDING_SIZE),
        neuroglancer.AnnotationPropertySpec(
            id="compartment", type="uint8", default=UNKNOWN_COMPARTMENT,
            enum_values=list(range(len(COMPARTMENTS))) + [UNKNOWN_COMPARTMENT],
            enum_labels=list(COMPARTMENTS) + ["unknown"],
        ),
    ]


_FLAG_SHADER = """
void main() {
  setColor(prop_color());
}
"""


def _flag_properties() -> list:
    import neuroglancer

    return [neuroglancer.AnnotationPropertySpec(id="color", type="rgb", default=OOD_COLOUR)]


def ood_flag(record: SegmentRecord) -> tuple[str, dict] | None:
    """The flag layer of an out-of-distribution segment: its name and a box annotation
    (neuroglancer JSON, nm) around the segment's centres; None when not flagged."""
    if not record.ood_flagged or record.positions_nm is None or not len(record.positions_nm):
        return None
    lo = record.positions_nm.min(axis=0) - OOD_BOX_MARGIN_NM
    hi = record.positions_nm.max(axis=0) + OOD_BOX_MARGIN_NM
    threshold = "" if record.ood_threshold is None else f" > threshold {record.ood_threshold:.2f}"
    name = f"{OOD_LAYER_PREFIX}: segment {record.segment_id}"
    box = {
        "type": "axis_aligned_bounding_box",
        "id": f"ood-{record.segment_id}",
        "pointA": [float(v) for v in lo],
        "pointB": [float(v) for v in hi],
        "description": (f"segment {record.segment_id} is out of distribution: cell-type uncertainty "
                        f"{record.ood_score:.2f}{threshold}"),
        "props": [OOD_COLOUR],
    }
    return name, box


def _point(segment_id: int, node_id: int, position_nm: np.ndarray, colour: str, size: float,
           code: int) -> dict:
    return {
        "type": "point",
        "id": f"{segment_id}-{node_id}",
        "point": [float(v) for v in position_nm],
        "props": [colour, float(size), int(code)],
    }


def node_annotations(record: SegmentRecord) -> list[dict]:
    """Point annotations (neuroglancer JSON, nm) for the centres of ``record``.

    Colour and size say how far each centre has come: pending (grey), embedded (yellow),
    or labelled by a classifier (its predicted compartment's colour).
    """
    if record.node_ids is None or record.positions_nm is None:
        return []
    embedded = record.embedded if record.embedded is not None else np.zeros(record.n_centres, bool)
    predicted = record.predicted
    points = []
    for i, (node_id, position) in enumerate(zip(record.node_ids, record.positions_nm)):
        code = UNKNOWN_COMPARTMENT if predicted is None else int(predicted[i])
        if code != UNKNOWN_COMPARTMENT:
            colour, size = COMPARTMENT_COLOURS[COMPARTMENTS[code]], LABELLED_SIZE
        elif embedded[i]:
            colour, size = EMBEDDED_COLOUR, EMBEDDED_SIZE
        else:
            colour, size = PENDING_COLOUR, PENDING_SIZE
        points.append(_point(record.segment_id, int(node_id), position, colour, size, code))
    return points


def ground_truth_annotations(record: SegmentRecord) -> list[dict]:
    """Point annotations of the dataset's own compartment labels at the centres."""
    if record.ground_truth is None or record.positions_nm is None:
        return []
    points = []
    for node_id, position, code in zip(record.node_ids, record.positions_nm, record.ground_truth):
        code = int(code)
        known = code != UNKNOWN_COMPARTMENT
        colour = COMPARTMENT_COLOURS[COMPARTMENTS[code]] if known else PENDING_COLOUR
        points.append(_point(record.segment_id, int(node_id), position, colour,
                             LABELLED_SIZE if known else PENDING_SIZE, code))
    return points


def segment_colour(record: SegmentRecord, class_names: Sequence[str] = ()) -> str | None:
    """The selected segment's colour: OOD magenta, else its cell type's, else None."""
    if record.ood_flagged:
        return OOD_COLOUR
    if record.cell_type is not None:
        return cell_type_colour(record.cell_type, class_names)
    return None

