"""Remote reads end in one line within their deadline (issue 15 item 1).

Fixtures on the loopback interface: a black hole (a listening socket that accepts into the
kernel's backlog and never answers), a closed port, and a precomputed volume server whose
metadata answers but whose chunks never do. ``SEGSCOPE_REMOTE_TIMEOUT_S`` is 2 s here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from segscope.app.cli import main

DEADLINE_S = 2.0


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "TENSORSTORE_GCS_HTTP_URL", "AWS_ENDPOINT_URL")


@pytest.fixture(autouse=True)
def _short_deadline(monkeypatch):
    monkeypatch.setenv("SEGSCOPE_REMOTE_TIMEOUT_S", str(DEADLINE_S))
    for name in PROXY_VARIABLES:  # the fast connect probe is skipped behind a proxy
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_the_connect_probe_steps_aside_behind_a_proxy(monkeypatch, closed_port):
    from segscope.analysis.volume import VolumeError, check_reachable, kvstore_spec

    spec = kvstore_spec(f"{closed_port}/vol")
    with pytest.raises(VolumeError, match="cannot reach"):
        check_reachable(spec, closed_port)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    check_reachable(spec, closed_port)  # TensorStore goes through the proxy: no direct verdict


@pytest.fixture
def black_hole():
    """``http://127.0.0.1:PORT``: connections are accepted by the kernel, nothing is ever sent."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture
def closed_port():
    """``http://127.0.0.1:PORT`` where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_chunks():
    """A precomputed volume over HTTP whose ``info`` answers and whose chunks never do."""
    info = {
        "type": "image",
        "data_type": "uint8",
        "num_channels": 1,
        "scales": [
            {
                "key": "s0",
                "size": [64, 64, 64],
                "resolution": [32, 32, 40],
                "voxel_offset": [0, 0, 0],
                "chunk_sizes": [[32, 32, 32]],
                "encoding": "raw",
            }
        ],
    }
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/").endswith("/info"):
                body = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                release.wait(60)  # a chunk request: never answered while the test runs

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/vol"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def _timed_main(capsys, argv):
    start = time.monotonic()
    status = main(argv)
    return status, time.monotonic() - start, capsys.readouterr().err


def test_info_against_a_black_hole_and_a_closed_port_ends_in_one_line(capsys, black_hole, closed_port):
    status, seconds, err = _timed_main(capsys, ["info", f"{black_hole}/vol"])
    assert status == 2 and seconds < 4 * DEADLINE_S + 5, seconds
    assert "no answer within" in err and black_hole in err and "Traceback" not in err
    status, seconds, err = _timed_main(capsys, ["info", f"{closed_port}/vol"])
    assert status == 2 and seconds < DEADLINE_S + 3, seconds
    assert "cannot reach" in err and closed_port.split("//")[1] in err


def test_info_on_gs_without_network_or_credentials_fails_fast(capsys):
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        pass
    else:
        pytest.skip("this machine reaches Google Cloud Storage")
    status, seconds, err = _timed_main(capsys, ["info", "gs://no-such-bucket-segscope/vol"])
    assert status == 2 and seconds < 10, seconds
    assert "storage.googleapis.com" in err and "Traceback" not in err


def test_embed_with_a_silent_image_server_ends_in_one_line(capsys, black_hole, demo96_dir, tmp_path):
    argv = [
        "embed", "--image", f"{black_hole}/x", "--segmentation", str(demo96_dir / "segmentation"),
        "--segments", "1", "--out", str(tmp_path / "e.parquet"),
    ]  # fmt: skip
    status, seconds, err = _timed_main(capsys, argv)
    assert status == 2 and seconds < 60, seconds
    assert black_hole in err and "Traceback" not in err
    assert not (tmp_path / "e.parquet").exists()


def test_a_chunk_read_that_never_answers_hits_its_deadline(silent_chunks):
    from segscope.analysis.volume import VolumeError, open_volume

    volume = open_volume(silent_chunks)
    assert volume.shape == (64, 64, 64)
    start = time.monotonic()
    with pytest.raises(VolumeError, match="no answer within"):
        volume.read(np.zeros(3, int), np.full(3, 32))
    assert time.monotonic() - start < DEADLINE_S + 5


def test_remote_csv_zip_reads_end_in_an_error(black_hole, closed_port):
    from segscope.analysis.csvzip import CsvZipStore
    from segscope.analysis.volume import VolumeError

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within"):
        CsvZipStore(f"{black_hole}/store").read(123)
    assert time.monotonic() - start < 2 * DEADLINE_S + 5
    start = time.monotonic()
    with pytest.raises(VolumeError, match="cannot reach"):
        CsvZipStore(f"{closed_port}/store").read(123)
    assert time.monotonic() - start < DEADLINE_S + 3
