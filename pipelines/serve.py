"""`retformer serve`'s HTTP server: one run's `Predictor` kept loaded (model, encoder, KB index, OOD
threshold), JSON over HTTP.

- `POST /predict`: the body is one image's raw bytes (`Content-Type: image/png`, `image/jpeg`, ... or
  `application/octet-stream`; the server decodes the bytes, the header is not trusted); the answer is
  the record `retformer predict` prints for that image (`path` is "request"). A multipart form is
  refused (415): send the file's bytes, e.g. `curl --data-binary @shirt.png -H 'Content-Type: image/png'`.
- `GET /health`: the run, the method, k, the classes and the OOD rule.
- Errors are one JSON object `{"error": "..."}` with the status: 400 (not an image, empty or short
  body, bad Content-Length), 403 (a Host header a loopback-bound server does not answer: a web page's
  DNS-rebinding trick), 404, 405, 411 (no Content-Length), 413 (body above `max_bytes`), 415, 500
  (a bug: the traceback goes to the server's log, never to the client).

One prediction at a time (a lock around the predictor: torch and faiss calls are not made for
concurrent use, and one CPU-bound request at a time is what a local service needs); reading a body
happens outside the lock, with a socket timeout, so a slow client holds only its own thread.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from retformer.artifacts.errors import UserError
from retformer.pipelines.local_http import host_of, hosts_answered
from retformer.pipelines.use.inputs import NotAnImage
from retformer.pipelines.use.predictor import Predictor

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
READ_TIMEOUT_S = 30  # the socket's: an idle or half-sent request ends its thread, not the server
DRAIN_MAX_BYTES = 64 * 1024 * 1024  # a refused body up to this size is read and dropped (see _drain)


class PredictService:
    """A Predictor behind a lock, with what /health reports."""

    def __init__(self, predictor: Predictor, neighbors: int = 5) -> None:
        self.predictor = predictor
        self.neighbors = neighbors
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the encoder, the index and the OOD threshold now: a bad run or KB is the command's
        error line at start, not every request's 500, and the first request is not slow."""
        p = self.predictor
        p.encoder()
        p.index()
        p.ood_threshold()

    def health(self) -> dict[str, Any]:
        """GET /health's answer."""
        p = self.predictor
        return {
            "status": "ok",
            "run": p.saved.path.parent.name,
            "method": p.method,
            "kb": p.kb,
            "k": p.k,
            "classes": len(p.class_names),
            "ood": p.ood_threshold().describe(),
        }

    def predict(self, data: bytes) -> dict[str, Any]:
        """One image's record; NotAnImage when the bytes are not a readable image."""
        with self.lock:
            return self.predictor.predict_bytes(data, "request", self.neighbors)


def make_handler(
    service: PredictService, max_bytes: int, allowed_hosts: frozenset[str] | None
) -> type[BaseHTTPRequestHandler]:
    """The request handler class of `service` (see the module doc). allowed_hosts None: any Host."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "retformer-serve"
        protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered before the body
        timeout = READ_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if (path := self._route()) is None:
                return
            if path == "/health":
                self._json(HTTPStatus.OK, service.health())
            elif path == "/predict":
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST an image's bytes to /predict", allow="POST")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no {path}: POST /predict or GET /health")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            path = self._route()
            if path != "/predict":  # refused unread: the body must not be parsed as the next request
                self.close_connection = True
                if path == "/health":
                    self._error(HTTPStatus.METHOD_NOT_ALLOWED, "GET /health", allow="GET")
                elif path is not None:
                    self._error(HTTPStatus.NOT_FOUND, f"no {path}: POST /predict or GET /health")
                self._drain()
                return
            data = self._body()
            if data is None:
                return
            try:
                record = service.predict(data)
            except NotAnImage as exc:
                self._error(HTTPStatus.BAD_REQUEST, f"the body is {exc}")
                return
            except UserError as exc:  # the run or its KB, not the request (warm_up catches most at start)
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
                return
            except Exception:  # noqa: BLE001 - a bug: logged here with its traceback, one line to the client
                log.exception("POST /predict failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server's log)")
                return
            self._json(HTTPStatus.OK, record)

        def handle_expect_100(self) -> bool:
            """A client that asks first (curl does for large bodies) learns of a too-large body before
            sending it."""
            if (refused := self._length_error()) is not None:
                self.close_connection = True  # the client sends no body: nothing to drain
                self._error(*refused)
                return False
            return super().handle_expect_100()

        # ------------------------------------------------------------------------------ helpers
        def _route(self) -> str | None:
            host = host_of(self.headers.get("Host"))
            if allowed_hosts is not None and host not in allowed_hosts:
                self.close_connection = True  # a POST's body stays unread
                self._error(HTTPStatus.FORBIDDEN, f"host {host!r} refused: this server answers loopback only")
                return None
            return urlsplit(self.path).path

        def _length_error(self) -> tuple[HTTPStatus, str] | None:
            """Why the declared body cannot be read, or None."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not read: send Content-Length"
            raw = self.headers.get("Content-Length")
            if raw is None:
                return HTTPStatus.LENGTH_REQUIRED, "no Content-Length: send the image's bytes as the body"
            if not raw.strip().isdigit():
                return HTTPStatus.BAD_REQUEST, f"Content-Length {raw!r} is not a byte count"
            if int(raw) > max_bytes:
                return (
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {int(raw)} bytes is larger than the server's --max-bytes {max_bytes}",
                )
            if int(raw) == 0:
                return HTTPStatus.BAD_REQUEST, "empty body: send the image's bytes"
            ctype = self.headers.get("Content-Type", "").lower()
            if ctype.startswith("multipart/"):
                return (
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "multipart form refused: send the image's raw bytes (curl --data-binary @FILE "
                    "-H 'Content-Type: image/png')",
                )
            return None

        def _body(self) -> bytes | None:
            if (refused := self._length_error()) is not None:
                self.close_connection = True  # a body sent anyway is not parsed as the next request
                self._error(*refused)
                self._drain()
                return None
            size = int(self.headers["Content-Length"])
            try:
                data = self.rfile.read(size)
            except TimeoutError:
                self.close_connection = True
                self._error(HTTPStatus.BAD_REQUEST, f"the body did not arrive within {READ_TIMEOUT_S} s")
                return None
            if len(data) < size:
                self.close_connection = True
                self._error(HTTPStatus.BAD_REQUEST, f"body ended after {len(data)} of {size} bytes")
                return None
            return data

        def _drain(self) -> None:
            """Read and drop a refused body (up to DRAIN_MAX_BYTES): a client that sends it all before
            reading the answer then gets the 413, not a connection reset."""
            raw = self.headers.get("Content-Length", "")
            left = min(int(raw), DRAIN_MAX_BYTES) if raw.strip().isdigit() else 0
            try:
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
            except OSError:  # timeout or reset: the connection closes anyway
                pass

        def _error(self, status: HTTPStatus, message: str, allow: str | None = None) -> None:
            self._json(status, {"error": message}, {"Allow": allow} if allow else {})

        def _json(
            self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except ConnectionError:
                log.debug("%s: the client closed the connection before the answer", self.path)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.info("%s " + format, self.address_string(), *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an open keep-alive connection never holds the process at exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection the client dropped is a debug line, not a traceback on the console."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            log.debug("%s closed the connection", client_address)
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    service: PredictService, host: str = "127.0.0.1", port: int = 8765, max_bytes: int = DEFAULT_MAX_BYTES
) -> ThreadingHTTPServer:
    """A server for `service` bound to host:port (port 0: a free one, see `server.server_address`).
    Bound to a loopback address it answers loopback Host headers only. UserError when the address
    cannot be bound."""
    handler = make_handler(service, max_bytes, hosts_answered(host))
    try:
        return (_Server6 if ":" in host else _Server)((host, port), handler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def server_url(server: ThreadingHTTPServer) -> str:
    """The server's base URL."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    return f"http://{shown}:{port}"
