"""Drive Neuroglancer's own JavaScript client from Python, headless, for tests.

Two pieces, usable separately:

- :func:`serve_directory` serves a local folder over HTTP on localhost with
  ``Access-Control-Allow-Origin: *`` and byte ranges, so the client (served from another
  port by the neuroglancer package) may read exported layers from it, sharded ones too;
- :class:`NeuroglancerPage` opens a ``neuroglancer.Viewer`` in a ``QWebEngineView`` (offscreen
  under ``QT_QPA_PLATFORM=offscreen``) and evaluates JavaScript in the page, returning
  JSON-decoded results. Waiting is done by running the Qt event loop until a result arrives
  or a deadline passes (``TimeoutError``), never by sleeping, so the page keeps working
  while Python waits.

The page exposes the client's ``window.viewer``; scripts reach layers through
``viewer.layerManager.getLayerByName(name).layer``.

Call everything from the Qt main thread with a QApplication alive (pytest-qt's ``qapp``).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class _CorsRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with CORS headers and single byte-range requests (as cloud stores serve).

    Neuroglancer reads sharded indexes with ``Range`` requests and needs ``206 Partial
    Content`` with a ``Content-Range`` it may read cross-origin. Requests are logged through
    ``logging`` instead of stderr.
    """

    _RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_OPTIONS(self) -> None:  # CORS pre-flight
        self.send_response(204)
        self.end_headers()

    def send_head(self):
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or not os.path.isfile(path):
            return super().send_head()
        match = self._RANGE.match(header.strip())
        size = os.path.getsize(path)
        if match is None or match.groups() == ("", ""):
            self.send_error(416, "unsupported Range")
            return None
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(size - 1, int(last)) if last else size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        with open(path, "rb") as file:
            file.seek(start)
            body = file.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


@contextlib.contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """Serve ``root`` at ``http://127.0.0.1:<free port>`` for the duration of the block.

    Yields the base URL (no trailing slash). A threaded server, so the client's parallel
    requests do not queue behind each other.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot serve {root}: not a folder")
    handler = functools.partial(_CorsRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="serve-directory", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class NeuroglancerPage:
    """A neuroglancer viewer page in an offscreen QWebEngineView.

    Parameters
    ----------
    viewer
        A ``neuroglancer.Viewer``; a new one (bound to 127.0.0.1) when None.
    size
        Widget size in pixels (width, height).
    """

    def __init__(self, viewer=None, size: tuple[int, int] = (800, 600)) -> None:
        import neuroglancer

        if viewer is None:
            neuroglancer.set_server_bind_address("127.0.0.1")
            viewer = neuroglancer.Viewer()
        self.viewer = viewer
        self._size = size
        self._view = None

    # -- lifetime -----------------------------------------------------------------------

    def open(self, timeout_s: float = 60.0) -> NeuroglancerPage:
        """Load the viewer page and wait until the client's ``window.viewer`` exists."""
        from PyQt6.QtCore import QUrl
        from PyQt6.QtWebEngineWidgets import QWebEngineView

        view = QWebEngineView()
        view.resize(*self._size)
        loaded: dict[str, bool] = {}
        view.loadFinished.connect(lambda ok: loaded.setdefault("ok", ok))
        view.load(QUrl(self.viewer.get_viewer_url()))
        view.show()
        self._view = view
        deadline = time.monotonic() + timeout_s
        self._run_until(lambda: "ok" in loaded, deadline, "the viewer page to load")
        if not loaded["ok"]:
            raise RuntimeError(f"the viewer page {self.viewer.get_viewer_url()} failed to load")
        self.wait_for("typeof window.viewer !== 'undefined'", timeout_s=max(1.0, deadline - time.monotonic()))
        return self

    def close(self) -> None:
        if self._view is not None:
            from PyQt6.QtCore import QCoreApplication, QEvent

            self._view.close()
            self._view.deleteLater()
            # Delete now rather than at the next event loop turn: a page still alive when
            # the application quits makes QtWebEngine warn about its profile.
            QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
            self._view = None

    def __enter__(self) -> NeuroglancerPage:
        return self.open() if self._view is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def view(self):
        """The QWebEngineView (None before :meth:`open`)."""
        return self._view

    # -- JavaScript ---------------------------------------------------------------------

    def evaluate(self, expression: str, timeout_s: float = 10.0) -> Any:
        """Evaluate a JavaScript expression in the page; return its JSON-decoded value.

        The value passes through ``JSON.stringify`` (BigInts are not JSON: convert them with
        ``String(...)`` in the expression). A JavaScript exception is returned as
        ``{"error": message}`` rather than raised, so polls can keep waiting through it.
        """
        if self._view is None:
            raise RuntimeError("page not open; call open() first")
        script = (
            "(() => { try { return JSON.stringify((() => (" + expression + "))()); }"
            " catch (e) { return JSON.stringify({error: String(e && e.stack || e)}); } })()"
        )
        box: dict[str, Any] = {}
        self._view.page().runJavaScript(script, 0, lambda value: box.setdefault("value", value))
        self._run_until(lambda: "value" in box, time.monotonic() + timeout_s, f"JavaScript {expression[:60]!r}")
        value = box["value"]
        return None if value is None else json.loads(value)

    def wait_for(
        self,
        expression: str,
        predicate: Callable[[Any], bool] = bool,
        timeout_s: float = 30.0,
        interval_s: float = 0.1,
    ) -> Any:
        """Evaluate ``expression`` repeatedly until ``predicate(value)`` holds; return the value.

        Raises TimeoutError (with the last value) when ``timeout_s`` passes first.
        """
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            last = self.evaluate(expression, timeout_s=max(0.5, deadline - time.monotonic()))
            if predicate(last):
                return last
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {expression[:80]!r}; last value {last!r}")
            self._run_until(lambda: False, min(deadline, time.monotonic() + interval_s), None)

    # -- Qt event loop ------------------------------------------------------------------

    @staticmethod
    def _run_until(done: Callable[[], bool], deadline: float, what: str | None) -> None:
        """Process Qt events until ``done()`` or ``deadline``; TimeoutError if ``what`` is given."""
        from PyQt6.QtCore import QEventLoop, QTimer
        from PyQt6.QtWidgets import QApplication

        if QApplication.instance() is None:
            raise RuntimeError("NeuroglancerPage needs a QApplication")
        loop = QEventLoop()
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(loop.quit)
        while not done():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                if what is None:
                    return
                raise TimeoutError(f"timed out waiting for {what}")
            # Run the event loop (idle, not spinning) for a short slice, then check again.
            timer.start(min(remaining_ms, 25))
            loop.exec()
        timer.stop()


def annotation_count_script(layer_name: str, relationship_index: int, segment_id: int) -> str:
    """JavaScript returning what the client loaded for one segment of an annotation layer.

    Value: ``{"count": n}`` once the segment's related-annotation chunk has arrived (``n`` =
    annotations it holds), ``{"pending": reason}`` before, ``{"error": message}`` when the
    layer's data source failed.
    """
    return f"""(() => {{
  const managed = viewer.layerManager.getLayerByName({json.dumps(layer_name)});
  if (managed === undefined || managed.layer === null) return {{pending: "no layer"}};
  for (const ds of managed.layer.dataSources) {{
    const ls = ds.loadState;
    if (ls !== undefined && ls.error !== undefined) return {{error: String(ls.error.message || ls.error)}};
  }}
  const states = managed.layer.annotationStates.states;
  if (states.length === 0) return {{pending: "source not loaded"}};
  const filtered = states[0].source.segmentFilteredSources;
  if (filtered === undefined) return {{error: "source has no relationship index"}};
  const chunk = filtered[{relationship_index}].chunks.get({json.dumps(str(segment_id))});
  if (chunk === undefined) return {{pending: "chunk not loaded"}};
  if (chunk.data === undefined) return {{count: 0}};
  return {{count: chunk.data.serializedAnnotations.typeToIds[0].length,
          ids: chunk.data.serializedAnnotations.typeToIds[0]}};
}})()"""


def segment_label_script(layer_name: str, segment_id: int) -> str:
    """JavaScript returning a segmentation layer's property label of one segment (or null)."""
    return f"""(() => {{
  const managed = viewer.layerManager.getLayerByName({json.dumps(layer_name)});
  if (managed === undefined || managed.layer === null) return null;
  const map = managed.layer.displayState.segmentPropertyMap.value;
  if (map === undefined) return null;
  const label = map.getSegmentLabel({int(segment_id)}n);
  return label === undefined ? null : label;
}})()"""


def annotation_by_id_script(layer_name: str, annotation_id: int) -> str:
    """JavaScript fetching one annotation of a layer by id (the source's by-id index).

    Value: ``{"point": [...], "properties": [...] (info order), "related": [[ids...], ...]}``
    once loaded, ``{"missing": true}`` when the source has no such id, ``{"pending": ...}``
    before. The first call takes a reference that keeps the annotation loaded.
    """
    key = json.dumps(str(annotation_id))
    return f"""(() => {{
  const managed = viewer.layerManager.getLayerByName({json.dumps(layer_name)});
  if (managed === undefined || managed.layer === null) return {{pending: "no layer"}};
  const states = managed.layer.annotationStates.states;
  if (states.length === 0) return {{pending: "source not loaded"}};
  const refs = (window.__ngclientReferences = window.__ngclientReferences || new Map());
  const refKey = {json.dumps(layer_name)} + "/" + {key};
  if (!refs.has(refKey)) refs.set(refKey, states[0].source.getReference({key}));
  const annotation = refs.get(refKey).value;
  if (annotation === undefined) return {{pending: "loading"}};
  if (annotation === null) return {{missing: true}};
  return {{
    point: Array.from(annotation.point),
    properties: annotation.properties.map(Number),
    related: (annotation.relatedSegments || []).map((ids) => Array.from(ids, String)),
  }};
}})()"""
