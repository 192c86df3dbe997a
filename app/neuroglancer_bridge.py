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
  skips the transaction when they already agree.
* **Selection in**: :meth:`NeuroglancerBridge.on_segments_changed` is the one listener on
  viewer-state changes. It reports the segmentation layer's selected segments when the
  *user* changed them in the page (layer panel, ctrl+click), never for the bridge's own
  writes, so a plot -> 3-D -> plot round trip cannot loop.

Selected segments
-----------------
Two callers set the segmentation layer's selected (visible) segments: the session state's
``"segment"`` event (one segment, or none) and :meth:`NeuroglancerBridge.highlight_segments`
(several, from a plot lasso). Both are writes under the same writer key, so the last one
requested wins and an older pending one is dropped.

Annotation layers
-----------------
:data:`NODES_LAYER` holds one point per embedding centre of the selected segment: grey
while its embedding is pending, near white once embedded, and the colour of its *predicted*
subcompartment when a subcompartment classifier has labelled it. :data:`GROUND_TRUTH_LAYER`
shows the dataset's own compartment labels, when it has any, for comparison; it is
*archived* (listed in the layer list panel, not in the layer bar, until the user shows
it). The selected segment's colour is its predicted cell type's colour, or magenta
(:data:`segscope.app.state.OOD_COLOUR`) when it is flagged out of distribution; a flagged segment
also gets a layer whose *name* says so in the layer bar (:data:`OOD_LAYER_PREFIX`), holding
a magenta box around its nodes (2-D and 3-D) with the score in its description.

:data:`SELECTION_LAYER` (also :data:`HOVER_LAYER`: one layer for both) rings the nodes of a
plot rectangle or lasso (:meth:`~NeuroglancerBridge.show_selected_nodes`, beside their
segments selected by :meth:`~NeuroglancerBridge.highlight_segments`) and, bigger, the node
under the plot's cursor (:meth:`~NeuroglancerBridge.highlight_node`);
:data:`LABELS_LAYER` shows the manually labelled nodes coloured by :func:`label_colour`
(the plot uses the same rule), sparsely (:func:`sparse_labels`): every labelled node of the
segments selected in the viewer, and elsewhere one small disc per segment and label, at
most :data:`MAX_LABELS_DRAWN` in all; :meth:`~NeuroglancerBridge.add_exported_layer` adds
an export bundle's precomputed annotations, served from the local file server.

Meshes
------
The selected segment is drawn in 3-D as its surface mesh, semi-transparent
(:data:`MESH_OBJECT_ALPHA`), so its coloured nodes show through it. A segmentation whose
``info`` names meshes (``"mesh"``, as the demo's does) brings them itself. For one that
does not, the bridge meshes the selected segment on its own mesher thread
(:func:`segscope.analysis.meshes.cached_segment_mesh`: zmesh in a box around the click,
grown while the segment touches its faces, up to the skeleton box limit,
:attr:`NeuroglancerBridge.mesh_max_box_vox`),
caches it in the user cache, serves the cache folder from the local file server and adds
the segment's mesh folder as an extra source of the segmentation layer (replacing the
previous segment's). ``events.mesh_status`` reports each result (:class:`MeshStatus`,
with the time it took).

Layer order: the flag layer of an out-of-distribution segment is kept last, so it is drawn
over the others. A double click over an annotation that hides the segment under it (3-D
panel) still reaches that segment: :func:`click_event_from_action` falls back to the
segment the annotation's id names (:func:`segment_of_annotation`); the rings are not
pickable at all.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from psygnal import Signal, SignalGroup

from segscope.analysis import COMPARTMENTS, UNKNOWN_COMPARTMENT
from segscope.analysis.colours import (
    COMPARTMENT_COLOURS,
    EMBEDDED_COLOUR,
    OOD_COLOUR,
    PENDING_COLOUR,
    cell_type_colour,
    label_colour,
)
from segscope.app.events import connect
from segscope.app.state import SegmentRecord, SessionState

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
#: Nodes selected in the embedding plot (rectangle or lasso), ringed in white, and the node
#: under the plot's cursor, with a bigger, thicker ring: one layer for both.
SELECTION_LAYER = "plot selection"
#: The hover ring's layer (the selection's: fewer layers in the layer bar).
HOVER_LAYER = SELECTION_LAYER
#: Most selected nodes drawn (a lasso over a large plot can take tens of thousands).
MAX_SELECTED_NODES = 5_000
#: Layer with the manually labelled nodes (sparse: :func:`sparse_labels`).
LABELS_LAYER = "manual labels"
#: Most label discs drawn at once (level of detail: hundreds of discs hide the 3-D view).
MAX_LABELS_DRAWN = 300
#: Of those, most discs for segments not selected in the viewer (one per segment and label).
MAX_LABEL_MARKERS_ELSEWHERE = 100
#: Disc diameters (screen pixels): labels on selected segments, one-per-label markers elsewhere.
LABEL_SIZE_SELECTED, LABEL_SIZE_ELSEWHERE = 7.0, 5.0
#: Default name of the layer of an export bundle's annotations.
EXPORTED_LAYER = "exported nodes"
_BRIDGE_LAYERS = (
    IMAGE_LAYER,
    SEGMENTATION_LAYER,
    NODES_LAYER,
    GROUND_TRUTH_LAYER,
    SELECTION_LAYER,
    LABELS_LAYER,
)

#: Opacity of the selected segments' meshes in 3-D: the nodes inside stay visible.
MESH_OBJECT_ALPHA = 0.45

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


def _dimension_scales_nm(dimensions) -> np.ndarray:
    """Nanometres per unit of each of the viewer's x, y, z dimensions."""
    scales = []
    for name in ("x", "y", "z"):
        index = list(dimensions.names).index(name)
        unit = dimensions.units[index]
        if unit not in _NM_PER_UNIT:
            raise ValueError(f"viewer dimension {name} has unit {unit!r}, not a length")
        scales.append(float(dimensions.scales[index]) * _NM_PER_UNIT[unit])
    return np.asarray(scales)


def click_event_from_action(
    action_state,
    segmentation_layer: str = SEGMENTATION_LAYER,
    annotation_segment: Callable[[str, Any], int | None] | None = None,
) -> ClickEvent:
    """Read a :class:`ClickEvent` out of a neuroglancer ``ActionState``.

    The mouse position comes in the viewer's global coordinates (one unit per dimension
    scale); it is converted to nm with the dimensions recorded in the same action state.
    When the segmentation layer has no segment under the mouse but an annotation of
    another layer is (the 3-D panel picks the annotation), the segment is the one the
    annotation's id names: ``annotation_segment(layer_name, annotation_id)``, by default
    :func:`segment_of_annotation` of the id.
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
    if segment_id is None and action_state.selected_values:
        # Over an annotation (a label disc, a node) the 3-D panel picks the annotation, not
        # the segment's mesh behind it: take the segment the annotation belongs to.
        segment_id = _segment_under_annotation(
            action_state.selected_values,
            segmentation_layer,
            annotation_segment or (lambda _layer, annotation_id: segment_of_annotation(annotation_id)),
        )
    position_nm = None
    mouse = action_state.mouse_voxel_coordinates
    viewer_state = action_state.viewer_state
    if mouse is not None and viewer_state is not None and viewer_state.dimensions is not None:
        try:
            position_nm = np.asarray(mouse, dtype=np.float64)[:3] * _dimension_scales_nm(viewer_state.dimensions)
        except (ValueError, IndexError):
            log.warning("cannot convert mouse position %s to nm", mouse)
    return ClickEvent(segment_id, position_nm)


def segment_of_annotation(annotation_id: Any) -> int | None:
    """The segment id an annotation id of this bridge names; None for others.

    Node and ground-truth points are ``"<segment>-<node>"``, labels ``"label-<segment>"`` or
    ``"label-<segment>-<node>"``, the OOD box ``"ood-<segment>"``.
    """
    if not isinstance(annotation_id, str):
        return None
    parts = annotation_id.split("-")
    if parts[0] in ("label", "ood"):
        parts = parts[1:]
    elif len(parts) != 2:
        return None  # exported (numeric) ids, rings ("hover", "selected-i")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 2:
        return None
    segment = int(parts[0])
    return segment if 0 < segment < 2**64 else None


def _segment_under_annotation(
    selected_values: Any, segmentation_layer: str, annotation_segment: Callable[[str, Any], int | None]
) -> int | None:
    for name in list(selected_values.keys()):
        if name == segmentation_layer:
            continue
        selection = selected_values.get(name)
        raw = selection.to_json() if hasattr(selection, "to_json") else selection
        if isinstance(raw, dict) and raw.get("annotationId") is not None:
            segment = annotation_segment(name, raw["annotationId"])
            if segment is not None:
                return segment
    return None


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
        self._pending: dict[str, Callable[[], object]] = {}
        self._condition = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, fn: Callable[[], object]) -> None:
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


@dataclass(frozen=True)
class MeshStatus:
    """The outcome of meshing a selected segment on the fly (``events.mesh_status``).

    Attributes
    ----------
    segment_id : int
    source : str or None
        The mesh source added to the segmentation layer; None when meshing failed.
    seconds : float
        Time to read the box and mesh it (0 when the mesh came from the cache).
    cached : bool
        The mesh was made earlier (this session or a previous one).
    truncated : bool
        The segment goes on beyond the box limit: the mesh shows the part inside the box.
    error : str
        Why there is no mesh (empty on success).
    """

    segment_id: int
    source: str | None
    seconds: float = 0.0
    cached: bool = False
    truncated: bool = False
    error: str = ""


@dataclass
class _MeshTarget:
    """The shown segmentation, for meshing on the fly (None ``volume``: nothing to mesh from)."""

    volume: Any
    own_meshes: bool
    cache_dir: Path | None


class BridgeEvents(SignalGroup):
    """Events of :class:`NeuroglancerBridge` (emitted on the thread that committed the change)."""

    #: (frozenset of int) the user changed the segmentation layer's selected segments.
    segments_changed = Signal(object)
    #: (ClickEvent) the user double-clicked in a data panel.
    clicked = Signal(object)
    #: (MeshStatus) a selected segment was meshed on the fly, or could not be (mesher thread).
    mesh_status = Signal(object)


class NeuroglancerBridge:
    """A neuroglancer viewer bound to 127.0.0.1, wired to SegScope's session state.

    Parameters
    ----------
    on_click
        Connected to ``events.clicked``: called with a :class:`ClickEvent` on neuroglancer's
        server thread whenever the user double-clicks in a 2-D or 3-D panel. It must return
        quickly (post the work to the thread that owns the session).
    bind_address
        Address of neuroglancer's server and of the local file servers.
    mesh_cache_root
        Where meshes made on the fly are cached (default ``<user cache>/meshes``).
    """

    def __init__(
        self,
        on_click: Callable[[ClickEvent], None] | None = None,
        *,
        bind_address: str = "127.0.0.1",
        mesh_cache_root: str | Path | None = None,
    ):
        import neuroglancer

        from segscope.analysis.meshes import DEFAULT_MAX_BOX_VOX
        from segscope.app.viewer_sync import merging_viewer

        self._neuroglancer = neuroglancer
        self._bind_address = bind_address
        neuroglancer.set_server_bind_address(bind_address, 0)
        # Page changes that cross the bridge's writes are merged, not dropped (segscope.app.viewer_sync).
        self.viewer = merging_viewer()
        self._file_servers: dict[str, Any] = {}
        self._writer = _KeyedWriter("segscope-neuroglancer-writer")
        # Meshing on the fly runs here, off the Qt thread and off the writer (it takes seconds).
        self._mesher = _KeyedWriter("segscope-mesher")
        self._mesh_cache_root = mesh_cache_root
        self._mesh_target: _MeshTarget | None = None  # set and read on the mesher thread
        self._mesh_wanted: int | None = None  # the selected segment (latest request wins)
        self._mesh_pending_centres: int | None = None  # selected without a click: mesh at a centre
        self._mesh_sources: set[str] = set()  # on-the-fly sources this bridge added
        #: Largest box edge (voxels: one number or x, y, z) a segment is meshed in when its
        #: volume has no meshes; :meth:`show_source` takes the source's skeleton box limit.
        self.mesh_max_box_vox: int | Sequence[int] = DEFAULT_MAX_BOX_VOX
        self._unsubscribe: list[Callable[[], None]] = []
        self._state: SessionState | None = None
        self.writes = 0  # transactions actually committed (skipped no-op writes excluded)
        # Export bundles: folder -> (stamp of annotations/info, server); a re-export gets a
        # new server, hence a new URL, because the page caches what it loaded by URL.
        self._bundle_servers: dict[str, tuple[tuple[int, int], Any]] = {}
        # Segment-property sources this bridge added to the segmentation layer, by layer name.
        self._property_sources: dict[str, str] = {}
        self.events = BridgeEvents()
        if on_click is not None:
            connect(self.events.clicked, on_click)
        self._listener_lock = threading.Lock()
        self._listening = False
        self._seen_segments_json: tuple | None = None
        self._seen_segments: frozenset[int] = frozenset()
        # Set while this bridge commits a transaction: change callbacks run synchronously on
        # the committing thread, so they can tell the bridge's own writes from the user's.
        self._own_write = threading.local()
        # What the rings and label layers show, read by their writes on the writer thread.
        self._layers_lock = threading.Lock()
        self._hover_ring: list[dict] = []
        self._selected_rings: list[dict] = []
        self._labels: list[dict] = []
        self._shown_segments: frozenset[int] = frozenset()
        # Exported layers: name -> segment id of each annotation id (the node table's rows).
        self._exported_segments: dict[str, np.ndarray] = {}
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
        event = click_event_from_action(action_state, SEGMENTATION_LAYER, self._annotation_segment)
        log.debug("double click: segment %s at %s nm", event.segment_id, event.position_nm)
        self.events.clicked.emit(event)

    def _annotation_segment(self, layer: str, annotation_id: Any) -> int | None:
        """The segment of an annotation the page picked: by the id, or an exported layer's table."""
        exported = self._exported_segments.get(layer)
        if exported is not None:
            try:
                row = int(annotation_id)
            except (TypeError, ValueError):
                return None
            return int(exported[row]) if 0 <= row < len(exported) else None
        return segment_of_annotation(annotation_id)

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
                url = url[len(prefix) :]
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

    def _serve_bundle(self, folder: Path, info_path: Path) -> str:
        """Serve an export bundle; a new server (new URL) once its annotations changed."""
        stat = info_path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns)  # an atomic re-export renames a new folder in
        key = str(folder)
        served = self._bundle_servers.get(key)
        if served is not None and served[0] == stamp:
            return served[1].url
        from segscope.app.file_server import LocalFileServer  # Host and Origin checked, CORS for the viewer only

        server = LocalFileServer(static_dir=key, bind_address=self._bind_address, daemon=True)
        self._bundle_servers[key] = (stamp, server)
        if served is not None:
            _stop_server(served[1])
        log.debug("serving export bundle %s at %s", folder, server.url)
        return server.url

    def _serve_folder(self, path: Path) -> str:
        key = str(path)
        server = self._file_servers.get(key)
        if server is None:
            from segscope.app.file_server import LocalFileServer

            server = LocalFileServer(static_dir=key, bind_address=self._bind_address, daemon=True)
            self._file_servers[key] = server
            log.debug("serving %s at %s", path, server.url)
        return server.url

    def show_dataset(self, sources: LayerSources, *, layout: str = "xy-3d") -> None:
        """Replace the viewer's layers with those of a dataset, centred on ``sources.centre_nm``.

        The new layers are the image, the segmentation (and skeletons) and the annotation
        layers.
        """
        neuroglancer = self._neuroglancer
        voxel = np.asarray(sources.voxel_size_nm, dtype=np.float64)
        dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=voxel.tolist())
        nm_space = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[1, 1, 1])
        segmentation_sources = [sources.segmentation]
        if sources.skeletons:
            segmentation_sources.append(sources.skeletons)

        def apply(s) -> None:
            s.dimensions = dimensions
            s.position = (np.asarray(sources.centre_nm) / voxel).tolist()
            s.layers.clear()
            s.layers[IMAGE_LAYER] = neuroglancer.ImageLayer(source=sources.image)
            s.layers[SEGMENTATION_LAYER] = neuroglancer.SegmentationLayer(
                source=segmentation_sources,
                selected_alpha=0.35,
                not_selected_alpha=0.05,
                hide_segment_zero=True,
                object_alpha=MESH_OBJECT_ALPHA,
            )
            s.layers[GROUND_TRUTH_LAYER] = neuroglancer.LocalAnnotationLayer(
                dimensions=nm_space,
                annotation_properties=_node_properties(),
                shader=_NODE_SHADER,
            )
            # Rarely used: archived (in the layer list panel, not the layer bar).
            s.layers[GROUND_TRUTH_LAYER].archived = True
            s.layers[NODES_LAYER] = neuroglancer.LocalAnnotationLayer(
                dimensions=nm_space,
                annotation_properties=_node_properties(),
                shader=_NODE_SHADER,
            )
            s.selected_layer.layer = SEGMENTATION_LAYER
            s.layout = layout
            self._property_sources.clear()  # the segmentation layer was replaced
            self._mesh_sources.clear()

        self._write(apply)

    def show_source(self, source, *, layout: str = "xy-3d") -> None:
        """Show a :class:`segscope.app.controller.DataSource` (serving its local folders).

        Raises
        ------
        ValueError, FileNotFoundError
            When neuroglancer cannot load one of its volumes.
        """
        sources = LayerSources(
            image=self.source_url(source.image_url, source.image.info.driver),
            segmentation=self.source_url(source.segmentation_url, source.segmentation.info.driver),
            skeletons=None
            if source.neuroglancer_skeletons is None
            else "precomputed://" + self.http_url(source.neuroglancer_skeletons),
            voxel_size_nm=np.asarray(source.segmentation.voxel_size_nm, dtype=np.float64),
            centre_nm=np.asarray(source.centre_nm, dtype=np.float64),
        )
        self._writer.submit("dataset", lambda: self.show_dataset(sources, layout=layout))
        segmentation, url = source.segmentation, source.segmentation_url
        # One limit for the boxes of skeletons and meshes made on demand (--skeleton-box-vox).
        limit = getattr(getattr(source, "segment_skeletons", None), "max_box_vox", None)
        if limit is not None:
            self.mesh_max_box_vox = limit
        # Reading the info may wait on a remote store: on the mesher thread, before any mesh.
        self._mesher.submit("target", lambda: self._set_mesh_target(segmentation, url))

    def set_layout(self, layout: str) -> None:
        """Change the panel layout (``"xy"``, ``"3d"``, ``"xy-3d"``, ``"4panel"``...)."""
        self._writer.submit(
            "layout",
            lambda: self._write_if_changed(lambda s: s.layout.type == layout, lambda s: setattr(s, "layout", layout)),
        )

    def set_view(self, centre_nm: Sequence[float], cross_section_scale: float | None = None) -> None:
        """Move the view to ``centre_nm`` (xyz nm); optionally zoom the 2-D panels."""

        def apply(s) -> None:
            scales = _dimension_scales_nm(s.dimensions)
            s.position = (np.asarray(centre_nm, dtype=np.float64) / scales).tolist()
            if cross_section_scale is not None:
                s.cross_section_scale = cross_section_scale

        self._writer.submit("view", lambda: self._write(apply))

    # -- links with the embedding plot -----------------------------------------------------

    def highlight_segments(self, segment_ids: Iterable[int]) -> None:
        """Make exactly ``segment_ids`` the selected (visible) segments of the segmentation layer.

        For example the segments of a plot lasso; an empty iterable selects none.

        Shares its writer key with the session's ``"segment"`` event: whichever of the two
        was requested last is what the viewer ends up showing.

        Raises
        ------
        ValueError
            When an id is not an integer in ``[0, 2**64)``.
        """
        wanted = frozenset(_segment_id(value) for value in segment_ids)
        self._writer.submit("segments", lambda: self._write_selection(wanted))
        self._show_labels_of(wanted)

    def _show_labels_of(self, segments: frozenset[int]) -> None:
        """Draw the labels of ``segments`` (now selected in the viewer) in full, others sparsely."""
        with self._layers_lock:
            changed = segments != self._shown_segments
            self._shown_segments = segments
            labelled = bool(self._labels)
        if changed and labelled:
            self._writer.submit("labels", self._write_labels)

    def highlight_node(self, point: tuple[int, int, Sequence[float]] | None, *, move: bool = False) -> None:
        """Ring one node in the 3-D and 2-D views (the node under the plot's cursor).

        Parameters
        ----------
        point
            ``(segment_id, node_id, xyz_nm)`` with ``xyz_nm`` the node's x, y, z in nm; None
            clears the ring. Calls are coalesced: while writes are pending only the newest
            hover is written, so calling this on every mouse move is fine.
        move
            Also centre the view on the node (:meth:`set_view`).

        Raises
        ------
        ValueError
            When the segment id or the position is malformed.
        """
        annotations = [] if point is None else [hover_annotation(*point)]
        with self._layers_lock:
            self._hover_ring = annotations
        self._writer.submit("rings", self._write_rings)
        if move and annotations:
            self.set_view(annotations[0]["point"])

    def show_selected_nodes(self, points: Sequence[tuple[int, int, Sequence[float]]]) -> None:
        """Ring the nodes selected in the plot in :data:`SELECTION_LAYER`; an empty list clears it.

        Beyond :data:`MAX_SELECTED_NODES` an even subsample is drawn.

        Parameters
        ----------
        points
            ``(segment_id, node_id, xyz_nm)`` per node, ``xyz_nm`` x, y, z in nm.

        Raises
        ------
        ValueError
            When a segment id or a position is malformed.
        """
        points = list(points)
        if len(points) > MAX_SELECTED_NODES:
            points = [points[i] for i in np.linspace(0, len(points) - 1, MAX_SELECTED_NODES).astype(int)]
        annotations = [
            dict(hover_annotation(*point), id=f"selected-{i}", props=list(_SELECTED_RING))
            for i, point in enumerate(points)
        ]
        with self._layers_lock:
            self._selected_rings = annotations
        self._writer.submit("rings", self._write_rings)

    def show_labels(
        self, points: Sequence[tuple[int, int | None, Sequence[float], str]], labels_in_order: Sequence[str] = ()
    ) -> None:
        """Show the manually labelled nodes in :data:`LABELS_LAYER`, coloured by label.

        Drawn sparsely (:func:`sparse_labels`): all labelled nodes of the segments selected
        in the viewer, one small disc per segment and label elsewhere, at most
        :data:`MAX_LABELS_DRAWN`; a change of the selected segments redraws them.

        Parameters
        ----------
        points
            ``(segment_id, node_id, xyz_nm, label)`` per labelled node, ``xyz_nm`` in nm
            (x, y, z); ``node_id`` None marks a label of the whole segment, drawn at
            ``xyz_nm``. Each point carries its segment id, so the layer is linked to the
            segmentation layer (selecting a point's segment from its annotation works). An
            empty list removes the layer.
        labels_in_order
            Every label in use, in the order :func:`label_colour` assigns colours (pass the
            plot's list so both views agree).

        Raises
        ------
        ValueError
            For a malformed point, an empty label, or two points with the same node.
        """
        annotations = label_annotations(points, labels_in_order)
        with self._layers_lock:
            self._labels = annotations
        self._writer.submit("labels", self._write_labels)

    def add_exported_layer(self, bundle_folder: str | Path, name: str = EXPORTED_LAYER) -> str:
        """Show an export bundle's ``annotations/`` as a precomputed annotation layer.

        The bundle folder is served by a local static file server (a re-export into the
        same folder gets a new URL, so the page does not show what it cached of the old
        one); the layer ``name`` is added or replaced and linked to the segmentation layer
        through the bundle's relationships (``segment``). When the bundle has
        ``segment_properties/``, they become an extra source of the segmentation layer
        (labels and tags beside the segment ids), replacing one this bridge added earlier
        under the same layer name.

        Returns
        -------
        str
            The layer's source URL, ``precomputed://http://127.0.0.1:PORT/TOKEN/annotations``.

        Raises
        ------
        FileNotFoundError
            When ``bundle_folder`` or its ``annotations/info`` does not exist.
        ValueError
            When ``annotations/info`` is not a Neuroglancer annotation info.
        """
        if not isinstance(name, str) or not name or name in _BRIDGE_LAYERS or name.startswith(OOD_LAYER_PREFIX):
            raise ValueError(f"cannot name the exported layer {name!r}: empty or one of the bridge's own layers")
        folder = Path(bundle_folder).expanduser().resolve()
        info_path = folder / "annotations" / "info"
        if not folder.is_dir():
            raise FileNotFoundError(f"no export bundle folder {folder}")
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{folder} has no annotations/ folder with an info file "
                f"(not an export bundle, or exported without annotations)"
            )
        try:
            info = json.loads(info_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {info_path}: {error}") from error
        if not isinstance(info, dict) or info.get("@type") != "neuroglancer_annotations_v1":
            raise ValueError(f"{info_path} is not a neuroglancer_annotations_v1 info")
        relationships = [str(r["id"]) for r in info.get("relationships", []) if isinstance(r, dict) and "id" in r]
        property_ids = {str(p.get("id")) for p in info.get("properties", []) if isinstance(p, dict)}
        base = self._serve_bundle(folder, info_path)
        source = f"precomputed://{base}/annotations"
        properties_source = (
            f"precomputed://{base}/segment_properties" if (folder / "segment_properties" / "info").is_file() else None
        )

        def write() -> None:
            self._write_exported_layer(name, source, relationships, "compartment" in property_ids, properties_source)
            # Its annotation ids are the bundle's node-table rows: their segments let a double
            # click on an exported node reach the segment behind it.
            segments = _bundle_node_segments(folder)
            if segments is None:
                self._exported_segments.pop(name, None)
            else:
                self._exported_segments[name] = segments

        self._writer.submit(f"exported:{name}", write)
        return source

    def on_segments_changed(self, callback: Callable[[frozenset[int]], None]) -> Callable[[], None]:
        """Call ``callback(segment_ids)`` when the user changes the segmentation layer's selected segments.

        The changes are those made in the page (layer panel, ctrl+click, ...).

        ``segment_ids`` is the new frozenset of selected (visible) ids. It is called on the
        thread that committed the change (neuroglancer's server thread for the page's
        changes) while neuroglancer holds its state lock: it must return quickly and must
        not write the viewer itself (queueing a write, e.g. :meth:`highlight_segments`, is
        fine; a ``viewer.txn()`` there would deadlock).

        It is called only when the set differs from the one seen last, and never for the
        bridge's own writes: the viewer's change callback fires on every state change
        (camera moves included), so it first compares the raw segment list with the last
        one, which costs next to nothing. It reports a change *back* to what the bridge last
        wrote too (a user undoing their own ctrl+click must reach the plot).

        Returns
        -------
        callable
            Call it to stop listening.
        """
        with self._listener_lock:
            unsubscribe = connect(self.events.segments_changed, callback)
            if not self._listening:
                raw = self.viewer.shared_state.raw_state
                self._seen_segments_json = _raw_segments(raw)
                self._seen_segments = _visible_ids(self._seen_segments_json)
                self.viewer.shared_state.add_changed_callback(self._on_viewer_state_changed)
                self._listening = True

        return unsubscribe

    def _on_viewer_state_changed(self) -> None:
        # Runs synchronously inside neuroglancer's set_state, on the committing thread.
        segments_json = _raw_segments(self.viewer.shared_state.raw_state)
        if segments_json == self._seen_segments_json:
            return  # camera move, annotation write...: the selection did not change
        self._seen_segments_json = segments_json
        current = _visible_ids(segments_json)
        if current == self._seen_segments:
            return  # same set in another order, or a hidden (starred) segment changed
        self._seen_segments = current
        if getattr(self._own_write, "active", False):
            return  # this bridge's own write: reporting it would echo it back
        self._show_labels_of(current)
        self.events.segments_changed.emit(current)

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
        wanted = frozenset() if record is None else frozenset({int(record.segment_id)})
        self._request_mesh(record)
        self._writer.submit("segments", lambda: self._write_selection(wanted))
        self._show_labels_of(wanted)
        self._writer.submit("nodes", lambda: self._write_annotation_layer(NODES_LAYER, []))
        self._writer.submit("ground_truth", lambda: self._write_annotation_layer(GROUND_TRUTH_LAYER, []))
        self._writer.submit("ood_flag", lambda: self._write_ood_flag(None))

    def _on_centres(self, record: SegmentRecord) -> None:
        self._on_nodes_changed(record)
        if self._mesh_pending_centres == record.segment_id and record.positions_nm is not None:
            if len(record.positions_nm):
                self._mesh_pending_centres = None
                self._submit_mesh(record.segment_id, np.asarray(record.positions_nm[0], dtype=np.float64))
        truth = ground_truth_annotations(record)
        self._writer.submit("ground_truth", lambda: self._write_annotation_layer(GROUND_TRUTH_LAYER, truth))

    def _on_nodes_changed(self, record: SegmentRecord) -> None:
        nodes = node_annotations(record)
        self._writer.submit("nodes", lambda: self._write_annotation_layer(NODES_LAYER, nodes))

    def _on_predictions(self, record: SegmentRecord) -> None:
        self._on_nodes_changed(record)
        summary = None if self._state is None else self._state.classifiers
        class_names = () if summary is None or summary.cell_type is None else summary.cell_type.class_names
        colour = segment_colour(record, class_names)
        segment_id = record.segment_id
        self._writer.submit("segment_colour", lambda: self._write_segment_colour(segment_id, colour))
        flag = ood_flag(record)
        self._writer.submit("ood_flag", lambda: self._write_ood_flag(flag))

    # -- meshes made on the fly (mesher thread) --------------------------------------------

    def _set_mesh_target(self, segmentation, url: str) -> None:
        from segscope.analysis.meshes import mesh_cache_dir, named_mesh

        own = named_mesh(url) is not None
        cache = None if own else mesh_cache_dir(segmentation, self._mesh_cache_root)
        self._mesh_target = _MeshTarget(segmentation, own, cache)
        log.debug("segmentation %s: %s", url, "its own meshes" if own else f"meshes made on the fly in {cache}")

    def _request_mesh(self, record: SegmentRecord | None) -> None:
        """Mesh the newly selected segment (at its click, or at its first centre once known)."""
        self._mesh_pending_centres = None
        if record is None:
            self._mesh_wanted = None
            self._writer.submit("mesh_source", lambda: self._write_mesh_source(None))
            return
        segment_id = int(record.segment_id)
        self._mesh_wanted = segment_id
        if record.click_nm is not None:
            self._submit_mesh(segment_id, np.asarray(record.click_nm, dtype=np.float64))
        elif record.positions_nm is not None and len(record.positions_nm):
            self._submit_mesh(segment_id, np.asarray(record.positions_nm[0], dtype=np.float64))
        else:
            self._mesh_pending_centres = segment_id

    def _submit_mesh(self, segment_id: int, position_nm: np.ndarray) -> None:
        self._mesher.submit("mesh", lambda: self._make_mesh(segment_id, position_nm))

    def _make_mesh(self, segment_id: int, position_nm: np.ndarray) -> None:
        from segscope.analysis.meshes import cached_segment_mesh
        from segscope.analysis.progress import drive

        target = self._mesh_target
        if target is None or target.own_meshes or target.cache_dir is None or self._mesh_wanted != segment_id:
            return  # the volume brings its meshes, none is shown, or another segment was selected since
        try:
            folder, result = drive(
                cached_segment_mesh(
                    target.volume, segment_id, position_nm, target.cache_dir, max_box_vox=self.mesh_max_box_vox
                )
            )
            source = "precomputed://" + self._serve_folder(target.cache_dir) + "/" + folder.name
        except (OSError, ValueError, KeyError) as error:  # KeyError: SegmentNotFoundError
            log.warning("cannot mesh segment %d: %s", segment_id, error)
            self.events.mesh_status.emit(MeshStatus(segment_id, None, error=str(error)))
            return
        if result is None:
            status = MeshStatus(segment_id, source, cached=True)
        else:
            status = MeshStatus(segment_id, source, seconds=result.seconds, truncated=result.truncated)
            log.info(
                "meshed segment %d in %.2f s (box %s voxels read in %.2f s, %d triangles%s)",
                segment_id,
                result.seconds,
                (result.hi_vox - result.lo_vox).tolist(),
                result.read_seconds,
                result.mesh.n_faces,
                ", cut at the box limit" if result.truncated else "",
            )
        if self._mesh_wanted == segment_id:
            self._writer.submit("mesh_source", lambda: self._write_mesh_source(source))
        self.events.mesh_status.emit(status)

    def _write_mesh_source(self, source: str | None) -> None:
        """Make ``source`` the one on-the-fly mesh source of the segmentation layer (None: none)."""

        def urls(s) -> list[str] | None:
            if SEGMENTATION_LAYER not in s.layers:
                return None
            return [data_source.url for data_source in s.layers[SEGMENTATION_LAYER].source]

        def is_current(s) -> bool:
            current = urls(s)
            if current is None:
                return True
            ours = [url for url in current if url in self._mesh_sources]
            return ours == ([] if source is None else [source]) and (source is None or source in current)

        def apply(s) -> None:
            sources = s.layers[SEGMENTATION_LAYER].source
            for url in [u for u in urls(s) or [] if u in self._mesh_sources and u != source]:
                del sources[[data_source.url for data_source in sources].index(url)]
            if source is not None and source not in (urls(s) or []):
                sources.append(source)

        if source is not None:
            self._mesh_sources.add(source)
        self._write_if_changed(is_current, apply)

    # -- writes (writer thread) ------------------------------------------------------------

    def _write(self, apply: Callable[[Any], None]) -> None:
        try:
            with self.viewer.txn() as s:
                apply(s)
                self._own_write.active = True  # the commit (and its callbacks) follow
        finally:
            self._own_write.active = False
        self.writes += 1

    def _write_if_changed(self, is_current: Callable[[Any], bool], apply: Callable[[Any], None]) -> bool:
        """Apply a change unless the viewer already shows it (compare first, then txn)."""
        if is_current(self.viewer.state):
            return False
        self._write(apply)
        return True

    def _write_selection(self, wanted: frozenset[int]) -> None:
        def is_current(s) -> bool:
            layer = s.layers[SEGMENTATION_LAYER] if SEGMENTATION_LAYER in s.layers else None
            return layer is None or {int(v) for v in layer.segments} == wanted

        def apply(s) -> None:
            s.layers[SEGMENTATION_LAYER].segments = set(wanted)

        self._write_if_changed(is_current, apply)

    def _write_rings(self) -> None:
        with self._layers_lock:
            annotations = [*self._selected_rings, *self._hover_ring]
        self._write_annotation_layer(SELECTION_LAYER, annotations, self._ring_layer)

    def _write_labels(self) -> None:
        with self._layers_lock:
            annotations, shown = self._labels, self._shown_segments
        drawn = sparse_labels(annotations, shown)
        self._write_annotation_layer(LABELS_LAYER, drawn, self._labels_layer, drop_when_empty=True)

    def _nm_annotation_layer(self, **kwargs):
        space = self._neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[1, 1, 1])
        return self._neuroglancer.LocalAnnotationLayer(dimensions=space, **kwargs)

    def _write_annotation_layer(
        self,
        name: str,
        annotations: list[dict],
        make_layer: Callable[[list[dict]], Any] | None = None,
        *,
        drop_when_empty: bool = False,
    ) -> None:
        """Make local annotation layer ``name`` hold ``annotations`` (JSON dicts, nm).

        A layer is changed in place, never re-created: re-creating it makes the page
        rebuild its layer bar and forget the user's visibility toggle.

        Parameters
        ----------
        make_layer
            Builds the layer, given the annotations, when the viewer has none of that name.
            None: the layer belongs to :meth:`show_dataset`; while it is absent, nothing
            is written.
        drop_when_empty
            Remove the layer when there is nothing to show; otherwise it is kept, empty.
        """

        def is_current(s) -> bool:
            if name not in s.layers:
                return make_layer is None or not annotations
            if drop_when_empty and not annotations:
                return False
            return [a.to_json() for a in s.layers[name].annotations] == annotations

        def apply(s) -> None:
            if name not in s.layers:
                if make_layer is None:
                    return  # is_current said so already: nothing to create
                s.layers[name] = make_layer(annotations)
                _keep_flags_last(s)
            elif drop_when_empty and not annotations:
                del s.layers[name]
            else:
                s.layers[name].annotations = annotations

        self._write_if_changed(is_current, apply)

    def _ring_layer(self, annotations: list[dict]):
        # pick=False: rings must not catch the double click meant for the segment.
        return self._nm_annotation_layer(
            annotation_properties=_ring_properties(), shader=_RING_SHADER, annotations=annotations, pick=False
        )

    def _labels_layer(self, annotations: list[dict]):
        return self._nm_annotation_layer(
            annotation_properties=_label_properties(),
            shader=_LABEL_SHADER,
            annotations=annotations,
            linked_segmentation_layer={"segments": SEGMENTATION_LAYER},
        )

    def _write_exported_layer(
        self, name: str, source: str, relationships: list[str], compartment_shader: bool, properties_source: str | None
    ) -> None:
        neuroglancer = self._neuroglancer
        links = dict.fromkeys(relationships, SEGMENTATION_LAYER)
        shader = None
        if compartment_shader:
            from segscope.analysis.export.neuroglancer_layers import annotation_shader

            shader = annotation_shader()
        stale = self._property_sources.get(name)

        def segmentation_urls(s) -> list[str] | None:
            if SEGMENTATION_LAYER not in s.layers:
                return None
            return [data_source.url for data_source in s.layers[SEGMENTATION_LAYER].source]

        def is_current(s) -> bool:
            if name not in s.layers:
                return False
            layer = s.layers[name]
            if [data_source.url for data_source in getattr(layer, "source", [])] != [source]:
                return False
            if dict(layer.linked_segmentation_layer) != links or layer.to_json().get("shader") != shader:
                return False
            urls = segmentation_urls(s)
            if urls is None:
                return True
            if stale is not None and stale != properties_source and stale in urls:
                return False
            return properties_source is None or properties_source in urls

        def apply(s) -> None:
            layer = neuroglancer.AnnotationLayer(source=source, linked_segmentation_layer=links)
            if shader is not None:
                layer.shader = shader
            s.layers[name] = layer  # replaces a layer of that name in place
            _keep_flags_last(s)
            urls = segmentation_urls(s)
            if urls is None:
                return
            sources = s.layers[SEGMENTATION_LAYER].source
            if stale is not None and stale != properties_source and stale in urls:
                del sources[urls.index(stale)]
            if properties_source is not None and properties_source not in urls:
                sources.append(properties_source)

        self._write_if_changed(is_current, apply)
        if properties_source is None:
            self._property_sources.pop(name, None)
        else:
            self._property_sources[name] = properties_source

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
                s.layers[flag[0]] = self._nm_annotation_layer(
                    annotation_properties=_flag_properties(), shader=_FLAG_SHADER, annotations=[flag[1]]
                )

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
        self._mesher.close()
        with self._listener_lock:
            self.events.segments_changed.disconnect()
            if self._listening:
                self.viewer.shared_state.remove_changed_callback(self._on_viewer_state_changed)
                self._listening = False
        for server in [*self._file_servers.values(), *(served[1] for served in self._bundle_servers.values())]:
            _stop_server(server)
        self._file_servers.clear()
        self._bundle_servers.clear()
        try:
            self.viewer.actions.remove(SELECT_ACTION, self._handle_select_action)
        except KeyError:
            pass


def _bundle_node_segments(folder: Path) -> np.ndarray | None:
    """uint64 segment id per row of an export bundle's node table; None without a readable one."""
    from segscope.analysis.export import read_node_table

    for name in ("nodes.parquet", "nodes.csv"):
        path = folder / name
        if path.is_file():
            try:
                nodes, _ = read_node_table(path)
            except (OSError, ValueError) as error:
                log.info("cannot read %s (double clicks on its annotations select nothing): %s", path, error)
                return None
            return nodes.segment_id
    return None


def _keep_flags_last(s) -> None:
    """Move the out-of-distribution flag layers to the end of the layer list (drawn last, on top)."""
    names = [layer.name for layer in s.layers]
    flags = [name for name in names if name.startswith(OOD_LAYER_PREFIX)]
    if not flags or names[-len(flags) :] == flags:
        return
    for name in flags:
        layer = s.layers[name]
        del s.layers[name]
        s.layers.append(layer)


def _stop_server(server) -> None:
    try:
        server.request_stop()
    except Exception:  # already stopped
        log.debug("file server stop failed", exc_info=True)


def _segment_id(value: Any) -> int:
    """``value`` as a uint64 segment id (int), or ValueError naming it."""
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"segment id {value!r} is not an integer") from None
    inexact = not isinstance(value, str) and as_int != value  # 3.5 is not segment 3
    if inexact or not 0 <= as_int < 2**64:
        raise ValueError(f"segment id {value!r} is not an integer in [0, 2**64)")
    return as_int


def _position_nm(value: Any, what: str) -> list[float]:
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(type(v) in (float, int) for v in value):
        # The common case (plot rows as Python floats), without numpy's per-call cost:
        # thousands of labelled nodes are checked on the Qt thread.
        if all(math.isfinite(v) for v in value):
            return [float(v) for v in value]
    position = np.asarray(value, dtype=np.float64) if value is not None else np.zeros(0)
    if position.shape != (3,) or not np.isfinite(position).all():
        raise ValueError(f"{what}: position must be 3 finite numbers (x, y, z nm), got {value!r}")
    return [float(v) for v in position]


def _raw_segments(raw_state: Any) -> tuple | None:
    """The segmentation layer's ``segments`` JSON list in a raw viewer state, as a tuple."""
    layers = raw_state.get("layers") if isinstance(raw_state, dict) else None
    if isinstance(layers, dict):  # the older {name: layer} form
        layers = [dict(layer, name=name) for name, layer in layers.items() if isinstance(layer, dict)]
    for layer in layers or ():
        if isinstance(layer, dict) and layer.get("name") == SEGMENTATION_LAYER:
            return tuple(layer.get("segments") or ())
    return None


def _visible_ids(segments_json: tuple | None) -> frozenset[int]:
    """Visible ids of a raw ``segments`` list (``"!id"`` entries are starred but hidden)."""
    ids = set()
    for item in segments_json or ():
        text = str(item)
        if text.startswith("!"):
            continue
        try:
            ids.add(int(text))
        except ValueError:
            log.debug("ignoring segment entry %r", item)
    return frozenset(ids)


#: White rings with a transparent centre, so a node's own colour (its compartment) stays
#: visible inside; each ring's size and border width (px) are its properties.
_RING_SHADER = """
void main() {
  setPointMarkerSize(prop_size());
  setPointMarkerColor(vec4(0.0, 0.0, 0.0, 0.0));
  setPointMarkerBorderWidth(prop_border());
  setPointMarkerBorderColor(vec4(1.0, 1.0, 1.0, 1.0));
}
"""
#: Ring (size, border) in px: the hovered node's is large and thick, selected nodes' smaller.
_HOVER_RING, _SELECTED_RING = (18.0, 3.0), (10.0, 2.0)


def _ring_properties() -> list:
    import neuroglancer

    return [
        neuroglancer.AnnotationPropertySpec(id="size", type="float32", default=_SELECTED_RING[0]),
        neuroglancer.AnnotationPropertySpec(id="border", type="float32", default=_SELECTED_RING[1]),
    ]


#: Manual labels: the label's colour with a thin white border (predicted nodes have a black
#: one), as big as the disc's ``size`` property (:func:`sparse_labels`).
_LABEL_SHADER = """
void main() {
  setColor(prop_color());
  setPointMarkerSize(prop_size());
  setPointMarkerBorderWidth(1.0);
  setPointMarkerBorderColor(vec4(1.0, 1.0, 1.0, 1.0));
}
"""


def _label_properties() -> list:
    import neuroglancer

    return [
        neuroglancer.AnnotationPropertySpec(id="color", type="rgb", default="#ffffff"),
        neuroglancer.AnnotationPropertySpec(id="size", type="float32", default=LABEL_SIZE_SELECTED),
    ]


def hover_annotation(segment_id: int, node_id: int, xyz_nm: Sequence[float]) -> dict:
    """The hover ring's point annotation (neuroglancer JSON, nm) at a node."""
    segment = _segment_id(segment_id)
    return {
        "type": "point",
        "id": "hover",
        "point": _position_nm(xyz_nm, f"hovered node {segment}-{node_id}"),
        "segments": [[str(segment)]],
        "props": list(_HOVER_RING),
    }


def sparse_labels(
    annotations: Sequence[dict],
    shown_segments: Iterable[int] = (),
    *,
    limit: int = MAX_LABELS_DRAWN,
    elsewhere: int = MAX_LABEL_MARKERS_ELSEWHERE,
) -> list[dict]:
    """The label discs worth drawing (level of detail), from :func:`label_annotations`.

    Every labelled node of ``shown_segments`` (the segments selected in the viewer), up to
    ``limit``, at :data:`LABEL_SIZE_SELECTED`; then, for other segments, one smaller disc
    (:data:`LABEL_SIZE_ELSEWHERE`) per segment and label, at its first node, described
    with its node count, up to ``elsewhere`` of them and ``limit`` in all. Input order is
    kept within each group. No more than ``elsewhere`` labelled nodes in all are drawn
    each, in input order (the smaller discs off the selected segments): thinning starts
    where the discs would crowd the view.
    """
    shown = {int(s) for s in shown_segments}
    if len(annotations) <= elsewhere:
        return [
            dict(
                a,
                props=[
                    a["props"][0],
                    LABEL_SIZE_SELECTED if int(a["segments"][0][0]) in shown else LABEL_SIZE_ELSEWHERE,
                ],
            )
            for a in annotations
        ]
    near: list[dict] = []
    far: dict[tuple[int, str], list] = {}
    for annotation in annotations:
        segment = int(annotation["segments"][0][0])
        colour = annotation["props"][0]
        if segment in shown:
            if len(near) < limit:
                near.append(dict(annotation, props=[colour, LABEL_SIZE_SELECTED]))
            continue
        key = (segment, annotation["description"])
        if key in far:
            far[key][1] += 1
        else:
            far[key] = [annotation, 1]
    markers: list[dict] = []
    for (_segment, label), (annotation, count) in far.items():
        if len(markers) >= min(elsewhere, limit - len(near)):
            break
        description = label if count == 1 else f"{label} ({count} labelled nodes)"
        markers.append(dict(annotation, description=description, props=[annotation["props"][0], LABEL_SIZE_ELSEWHERE]))
    return near + markers


def label_annotations(
    points: Sequence[tuple[int, int | None, Sequence[float], str]], labels_in_order: Sequence[str] = ()
) -> list[dict]:
    """Point annotations (neuroglancer JSON, nm) of manually labelled nodes.

    Each is coloured by :func:`label_colour`, describes itself by its label and carries
    its segment id (``segments``), see :meth:`NeuroglancerBridge.show_labels`.

    Raises
    ------
    ValueError
        For a malformed point, an empty label, or two points with the same node.
    """
    annotations: list[dict] = []
    seen: set = set()
    colours: dict[str, str] = {}
    for point in points:
        try:
            segment_id, node_id, xyz_nm, label = point
        except (TypeError, ValueError):
            raise ValueError(f"labelled point {point!r} is not (segment_id, node_id, xyz_nm, label)") from None
        segment = _segment_id(segment_id)
        if not isinstance(label, str) or not label:
            raise ValueError(f"labelled point {segment}-{node_id} has no label ({label!r})")
        key = f"label-{segment}" if node_id is None else f"label-{segment}-{int(node_id)}"
        if key in seen:
            raise ValueError(f"node {key[len('label-') :]} is labelled twice")
        seen.add(key)
        annotations.append(
            {
                "type": "point",
                "id": key,
                "point": _position_nm(xyz_nm, f"labelled node {key[len('label-') :]}"),
                "description": label,
                "segments": [[str(segment)]],
                "props": [
                    colours.get(label) or colours.setdefault(label, label_colour(label, labels_in_order)),
                    LABEL_SIZE_SELECTED,
                ],
            }
        )
    return annotations


def _node_properties() -> list:
    import neuroglancer

    return [
        neuroglancer.AnnotationPropertySpec(id="color", type="rgb", default=PENDING_COLOUR),
        neuroglancer.AnnotationPropertySpec(id="size", type="float32", default=PENDING_SIZE),
        neuroglancer.AnnotationPropertySpec(
            id="compartment",
            type="uint8",
            default=UNKNOWN_COMPARTMENT,
            enum_values=[*range(len(COMPARTMENTS)), UNKNOWN_COMPARTMENT],
            enum_labels=[*COMPARTMENTS, "unknown"],
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
    """The flag layer of an out-of-distribution segment; None when the segment is not flagged.

    The layer is its name and a box annotation (neuroglancer JSON, nm) around the segment's
    centres.
    """
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
        "description": (
            f"segment {record.segment_id} is out of distribution: cell-type OOD score {record.ood_score:.2f}{threshold}"
        ),
        "props": [OOD_COLOUR],
    }
    return name, box


def _point(segment_id: int, node_id: int, position_nm: np.ndarray, colour: str, size: float, code: int) -> dict:
    return {
        "type": "point",
        "id": f"{segment_id}-{node_id}",
        "point": [float(v) for v in position_nm],
        "props": [colour, float(size), int(code)],
    }


def node_annotations(record: SegmentRecord) -> list[dict]:
    """Point annotations (neuroglancer JSON, nm) for the centres of ``record``.

    Colour and size say how far each centre has come: pending (grey), embedded (near white),
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
    if record.ground_truth is None or record.positions_nm is None or record.node_ids is None:
        return []
    points = []
    for node_id, position, code in zip(record.node_ids, record.positions_nm, record.ground_truth):
        code = int(code)
        known = code != UNKNOWN_COMPARTMENT
        colour = COMPARTMENT_COLOURS[COMPARTMENTS[code]] if known else PENDING_COLOUR
        points.append(
            _point(record.segment_id, int(node_id), position, colour, LABELLED_SIZE if known else PENDING_SIZE, code)
        )
    return points


def segment_colour(record: SegmentRecord, class_names: Sequence[str] = ()) -> str | None:
    """The selected segment's colour: OOD magenta, else its cell type's, else None."""
    if record.ood_flagged:
        return OOD_COLOUR
    if record.cell_type is not None:
        return cell_type_colour(record.cell_type, class_names)
    return None
