"""`retformer serve` (pipelines/serve.py) with real HTTP requests on 127.0.0.1, against the small
end-to-end run `tiny` (tests/conftest.py's `e2e_workspace`): the server in a thread of this process on an
ephemeral port, and once the real command in a subprocess."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import torch

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import read_shard
from retformer.pipelines.serve import PredictService, make_server
from retformer.pipelines.use.inputs import ImageInput
from retformer.pipelines.use.predictor import Predictor
from tests.conftest import REPO, needs_fmnist

pytestmark = needs_fmnist
torch.set_num_threads(1)

DATASET, RUN, MAX_BYTES = "tiny_lt", "tiny", 4096


def shard_pngs(ws: Path, n: int = 2) -> list[bytes]:
    """The first n PNGs of the dataset's first test shard (Fashion-MNIST, well under MAX_BYTES)."""
    shard = sorted((ws / "datasets" / DATASET / "shards").glob("test-*.tar"))[0]
    return [rec["image_bytes"] for rec in itertools.islice(read_shard(shard), n)]


@pytest.fixture(scope="module")
def server(e2e_workspace: Path) -> Iterator[tuple[str, int]]:
    """The run's service on 127.0.0.1:<free port>, serving from a thread; (host, port)."""
    service = PredictService(Predictor.open(RUN, workdir=e2e_workspace, device="cpu"), neighbors=3)
    service.warm_up()
    httpd = make_server(service, "127.0.0.1", 0, MAX_BYTES)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2]
    httpd.shutdown()
    httpd.server_close()


def request(
    addr: tuple[str, int],
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of one request on a new connection."""
    conn = HTTPConnection(*addr, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == "application/json"
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_good_image_gets_the_record_predictor_gives_the_same_bytes(server, e2e_workspace: Path):
    """POST /predict with a PNG's raw bytes answers 200 and exactly the record a separately opened
    Predictor gives those bytes (class, scores, retrieval fields, neighbours); GET /health names the
    run, the method and the OOD rule."""
    reference = Predictor.open(RUN, workdir=e2e_workspace, device="cpu")
    for data in shard_pngs(e2e_workspace):
        status, got = request(server, "POST", "/predict", data, {"Content-Type": "image/png"})
        want = next(reference.predict_images([ImageInput("request", data)], neighbors=3))
        assert status == 200 and got == json.loads(json.dumps(want))
        assert len(got["neighbors"]) == 3 and isinstance(got["ood"], bool)
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["run"] == RUN and health["method"] == "retformer"
    assert health["ood"]["threshold"] == round(reference.ood_threshold().value, 6)


def test_bad_requests_get_one_json_error_and_the_server_goes_on(server, e2e_workspace: Path):
    """A body above --max-bytes gets 413 (also when announced with `Expect: 100-continue`, before it is
    sent), bytes that are not an image, a truncated PNG, an empty body and a body cut short 400, a
    multipart form 415, an
    unknown path 404, a wrong method 405, a foreign Host header 403: each a JSON object with one `error`
    line and no traceback; a good image still works afterwards."""
    png = shard_pngs(e2e_workspace, 1)[0]
    cases = [
        (
            "POST",
            "/predict",
            b"\x89PNG" + bytes(MAX_BYTES),
            {"Content-Type": "image/png"},
            413,
            "--max-bytes",
        ),
        (
            "POST",
            "/predict",
            b"hello, not an image",
            {"Content-Type": "image/png"},
            400,
            "not a readable image",
        ),
        (
            "POST",
            "/predict",
            png[: len(png) // 2],
            {"Content-Type": "image/png"},
            400,
            "not a readable image",
        ),
        ("POST", "/predict", png, {"Content-Type": "multipart/form-data; boundary=x"}, 415, "raw bytes"),
        ("POST", "/predict", None, {}, 400, "empty body"),
        ("GET", "/nowhere", None, {}, 404, "/nowhere"),
        ("GET", "/predict", None, {}, 405, "POST"),
        ("POST", "/predict", png, {"Host": "evil.example:80"}, 403, "evil.example"),
    ]
    for method, path, body, headers, code, words in cases:
        status, answer = request(server, method, path, body, headers)
        assert status == code and list(answer) == ["error"], (path, headers, status, answer)
        assert words in answer["error"] and "Traceback" not in answer["error"] and "\n" not in answer["error"]
    # curl asks first for bodies over 1 MB: the refusal comes before a byte of the body is sent
    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):  # the server closes the connection after the refusal
            answer += chunk
    head = answer.decode()
    assert head.startswith("HTTP/1.1 413 ") and '"error"' in head
    # a body shorter than its Content-Length (the client stopped sending): 400, not a hung thread
    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + png[:10])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"body ended after 10 of 1000 bytes" in answer
    status, record = request(server, "POST", "/predict", png, {"Content-Type": "image/png"})
    assert status == 200 and "class" in record


def test_listening_on_a_taken_port_is_one_clear_error(server):
    """A port already in use is a UserError naming the address (the command's one `error:` line)."""
    with pytest.raises(UserError, match=rf"cannot listen on 127\.0\.0\.1:{server[1]}"):
        make_server(None, "127.0.0.1", server[1])  # type: ignore[arg-type] - never reaches the service


@pytest.mark.slow
def test_serve_command_answers_and_stops_on_ctrl_c(e2e_workspace: Path):
    """`retformer serve RUN --port 0` prints its URL, answers /health and /predict over HTTP, and
    SIGINT (Ctrl+C) stops it with exit status 0 and `stopped`; a run that does not exist is one
    `error:` line, exit 1, before anything listens."""
    cmd = [
        sys.executable,
        "-m",
        "retformer.pipelines.cli",
        "serve",
        RUN,
        "--port",
        "0",
        "--workdir",
        str(e2e_workspace),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith(f"serving retformer of run {RUN} at http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        status, health = request(("127.0.0.1", port), "GET", "/health")
        assert status == 200 and health["run"] == RUN
        png = shard_pngs(e2e_workspace, 1)[0]
        status, record = request(("127.0.0.1", port), "POST", "/predict", png, {"Content-Type": "image/png"})
        assert status == 200 and record["path"] == "request"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and err.strip().splitlines()[-1] == "stopped", err
    bad = subprocess.run(
        [*cmd[:4], "no_such_run", *cmd[5:]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = bad.stderr.strip().splitlines()
    assert (
        bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: run not found: no_such_run")
    )
