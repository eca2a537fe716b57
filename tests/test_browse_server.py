"""The neighbor browser's HTTP server against hostile or careless clients (issue 17), on a stub run:
pipelines/browse_server.py's Host check, read timeout and quiet handling of cancelled requests."""

from __future__ import annotations

import socket
import threading
import time

import pytest


class _StubRun:
    """What the handler asks of a BrowseRun, for the connection-level cases (no run needed)."""

    features, class_names = [], []

    def summary(self) -> dict:
        return {"run": "stub"}

    def kb_image(self, kb_id: int) -> tuple[bytes, str]:
        return bytes(32 << 20), "png"  # 32 MB: the client is gone long before it is sent


@pytest.fixture
def stub_server(monkeypatch):
    """An in-process server of `_StubRun` on a free loopback port, read timeout 0.5 s; yields (host,
    port). Its handler threads' exceptions go to the process's stderr (capfd sees them)."""
    from retformer.pipelines import browse_server

    monkeypatch.setattr(browse_server, "READ_TIMEOUT_S", 0.5)
    server = browse_server.make_server(_StubRun(), "127.0.0.1", 0)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


def _raw_get(addr: tuple[str, int], path: str, host: str) -> int:
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return int(sock.recv(64).split()[1])


def test_browse_answers_loopback_host_headers_only(stub_server):
    """Issue 17 (low): no Host check, so a page whose DNS name was rebound to 127.0.0.1 could read the
    run from the user's browser. Now the loopback server answers Host 127.0.0.1 / localhost / [::1]
    (any port) and refuses any other host with 403."""
    host, port = stub_server
    for ok in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert _raw_get(stub_server, "/api/run", ok) == 200, ok
    for bad in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        assert _raw_get(stub_server, "/api/run", bad) == 403, bad


def test_a_half_sent_request_is_dropped_after_the_read_timeout(stub_server):
    """Issue 17 (low): a connection that sends half a request held its thread forever (300 such held
    305 threads). Now the server closes it after READ_TIMEOUT_S (0.5 s here)."""
    with socket.create_connection(stub_server, timeout=5) as sock:
        sock.sendall(b"GET /api/run HTTP/1.1\r\nHost: local")
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server (the old one: a timeout after 5 s)
        assert time.monotonic() - started < 4


def test_a_cancelled_image_request_prints_no_traceback(stub_server, capfd):
    """Issue 17 (low): a thumbnail request the browser cancels (a reset before the answer is sent)
    printed a ~23-line BrokenPipe / ConnectionReset traceback on the server's stderr. Now nothing."""
    import struct

    for _ in range(3):
        sock = socket.create_connection(stub_server, timeout=5)
        sock.sendall(b"GET /img/kb/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.recv(1024)  # the answer has begun
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, as a cancelled fetch
    time.sleep(1.0)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
