"""A local static file server for the Neuroglancer page that only that page can read.

neuroglancer's own ``StaticFileServer`` answers every request with
``Access-Control-Allow-Origin: *`` and whatever ``Host`` header it carries. With only the
secret token in the path between them, a web page in the user's browser that learned a URL
could read the files, and a DNS-rebinding page (``evil.example`` re-resolved to 127.0.0.1)
could reach the port as same-origin. This server, a drop-in for the app's use of it:

- binds the loopback address with a random 160-bit token in every path (as neuroglancer's);
- answers only requests whose ``Host`` is ``127.0.0.1``, ``localhost`` or ``[::1]`` with its
  own port (or the bind address it was given): anything else gets ``421 Misdirected Request``,
  which is what a rebound name sends;
- refuses (403) a request carrying an ``Origin`` other than the viewer page's own, and sends
  CORS headers only to that origin (never ``*``). Requests without ``Origin`` (navigation,
  command-line tools that know the token) are served.

The viewer's origin is read per request from neuroglancer's running server unless the
caller names the allowed origins. Tornado (as neuroglancer uses) runs the server on its own
thread; :meth:`stop`, :meth:`request_stop` and ``url`` behave as neuroglancer's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

import neuroglancer.random_token
import neuroglancer.server
import tornado.httpserver
import tornado.netutil
import tornado.web
from neuroglancer import async_util

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def viewer_origins() -> set[str]:
    """Origins of neuroglancer's running viewer server (``http://127.0.0.1:PORT`` and its alias)."""
    server = neuroglancer.server.global_server
    if server is None:
        return set()
    origins = set()
    for url in (getattr(server, "server_url", None), getattr(server, "regular_server_url", None)):
        if url:
            origins |= _origin_aliases(url)
    return origins


def _origin_aliases(url: str) -> set[str]:
    parsed = urlparse(url)
    if parsed.hostname is None or parsed.port is None:
        return {f"{parsed.scheme}://{parsed.netloc}"}
    host = parsed.hostname
    hosts = {host} | (set(_LOOPBACK_NAMES) if host in ("127.0.0.1", "localhost", "::1") else set())
    return {f"{parsed.scheme}://{_bracketed(h)}:{parsed.port}" for h in hosts}


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _GuardedStaticFileHandler(tornado.web.StaticFileHandler):
    """Static files behind the Host and Origin checks of :class:`LocalFileServer`."""

    def initialize(self, path: str, server: LocalFileServer) -> None:  # type: ignore[override]
        super().initialize(path)
        self._server = server

    def set_default_headers(self) -> None:
        # Responses vary by Origin: a cache must not hand one origin's answer to another.
        self.set_header("Vary", "Origin")

    def prepare(self) -> None:
        if self.request.host not in self._server.allowed_hosts:
            log.debug("refused Host %r", self.request.host)
            raise tornado.web.HTTPError(421, reason="Misdirected Request")
        origin = self.request.headers.get("Origin")
        if origin is None:
            return
        if origin not in self._server.allowed_origins():
            log.debug("refused Origin %r", origin)
            raise tornado.web.HTTPError(403, reason="Forbidden Origin")
        self.set_header("Access-Control-Allow-Origin", origin)
        self.set_header("Access-Control-Allow-Headers", "x-requested-with, range")
        self.set_header("Access-Control-Expose-Headers", "content-range")
        self.set_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")

    def options(self, *args) -> None:
        self.set_status(204)
        self.finish()


class LocalFileServer(async_util.BackgroundTornadoServer):
    """Serve ``static_dir`` read-only at ``url`` (``http://127.0.0.1:PORT/TOKEN``) to the viewer only.

    Parameters
    ----------
    static_dir
        Folder to serve.
    bind_address
        Address to listen on (default the loopback address).
    daemon
        Run the server thread as a daemon (does not keep the process alive).
    allowed_origins
        Origins whose pages may read the files (CORS); default: neuroglancer's running viewer
        server, looked up per request.
    """

    def __init__(
        self,
        static_dir: str,
        bind_address: str = "127.0.0.1",
        daemon: bool = False,
        *,
        allowed_origins: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(daemon=daemon)
        self.bind_address = bind_address
        self.static_dir = static_dir
        if allowed_origins is None:
            self._origins: Callable[[], Iterable[str]] = viewer_origins
        elif callable(allowed_origins):
            self._origins = allowed_origins
        else:
            fixed = frozenset(allowed_origins)
            self._origins = lambda: fixed
        self.allowed_hosts: frozenset[str] = frozenset()
        self.port = 0

    def allowed_origins(self) -> set[str]:
        """The origins allowed now."""
        return set(self._origins())

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _attempt_to_start_server(self) -> None:
        token = neuroglancer.random_token.make_random_token()
        handlers = [(rf"/{token}/(.*)", _GuardedStaticFileHandler, {"path": self.static_dir, "server": self})]
        self.app = tornado.web.Application(handlers)
        self.http_server = tornado.httpserver.HTTPServer(self.app)
        sockets = tornado.netutil.bind_sockets(port=0, address=self.bind_address)
        self.http_server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        names = {*_LOOPBACK_NAMES, _bracketed(self.bind_address)}
        self.allowed_hosts = frozenset(f"{name}:{self.port}" for name in names)
        self.url = f"{neuroglancer.server._get_server_url(self.bind_address, self.port)}/{token}"
