"""The app's local file server: Host and Origin checks, CORS for the viewer's origin only.

Real HTTP requests on the loopback interface (http.client, which lets a test set the Host
header a DNS-rebinding page would send).
"""

from __future__ import annotations

import http.client
from urllib.parse import urlparse

import pytest

from segscope.app.file_server import LocalFileServer, _origin_aliases

VIEWER = "http://127.0.0.1:8123"


@pytest.fixture
def served(tmp_path):
    (tmp_path / "info").write_text('{"type": "image"}')
    server = LocalFileServer(str(tmp_path), daemon=True, allowed_origins=_origin_aliases(VIEWER))
    try:
        yield server
    finally:
        server.stop()


def _get(server, path="info", headers=None, method="GET"):
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request(method, f"{url.path}/{path}", headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_viewer_origin_reads_files_with_cors_for_that_origin_only(served):
    status, headers, body = _get(served, headers={"Origin": VIEWER})
    assert status == 200 and body == b'{"type": "image"}'
    assert headers["Access-Control-Allow-Origin"] == VIEWER
    # The page may be opened as localhost too: the same port's alias is its origin as well.
    status, headers, _ = _get(served, headers={"Origin": "http://localhost:8123"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:8123"


def test_foreign_origin_is_refused_and_gets_no_cors_header(served):
    for origin in ("https://evil.example", "http://127.0.0.1:9999", "null"):
        status, headers, body = _get(served, headers={"Origin": origin})
        assert status == 403, origin
        assert "Access-Control-Allow-Origin" not in headers
        assert b"image" not in body
    status, headers, _ = _get(served, method="OPTIONS", headers={"Origin": "https://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_wrong_host_header_is_refused(served):
    port = urlparse(served.url).port
    for host in (f"evil.example:{port}", "127.0.0.1:1", f"192.168.1.5:{port}", "evil.example"):
        status, _, body = _get(served, headers={"Host": host})
        assert status == 421, host
        assert b"image" not in body
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _get(served, headers={"Host": host})[0] == 200


def test_no_origin_is_served_without_cors_and_the_token_is_needed(served):
    status, headers, _ = _get(served)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    url = urlparse(served.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.request("GET", "/info")
    assert connection.getresponse().status == 404
    connection.close()


def test_origins_default_to_the_running_neuroglancer_viewer(tmp_path):
    import neuroglancer

    (tmp_path / "info").write_text("{}")
    neuroglancer.set_server_bind_address("127.0.0.1", 0)
    viewer = neuroglancer.Viewer()  # starts neuroglancer's server: the page's origin
    page = urlparse(viewer.get_viewer_url())
    origin = f"{page.scheme}://{page.netloc}"
    server = LocalFileServer(str(tmp_path), daemon=True)
    try:
        status, headers, _ = _get(server, headers={"Origin": origin})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
        assert _get(server, headers={"Origin": "https://evil.example"})[0] == 403
    finally:
        server.stop()
