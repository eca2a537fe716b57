"""The neighbor browser's HTTP server (the standard library's ThreadingHTTPServer): the static page
(`pipelines/static/browse.html`) and the JSON API over a `pipelines.browse.BrowseRun`; every path is a
fixed route, never a file; a loopback server answers loopback Host headers only."""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from retformer.artifacts.errors import UserError
from retformer.pipelines.browse_effect import EFFECTS
from retformer.pipelines.local_http import LOOPBACK_HOSTS, host_of, hosts_answered

if TYPE_CHECKING:
    from retformer.pipelines.browse import BrowseRun

log = logging.getLogger(__name__)

PAGE = "static/browse.html"
UID = re.compile(r"[A-Za-z0-9_-]+")  # the uid contract (docs/architecture.md): what /img/dataset/ accepts
# Seconds a connection may take to send its request: a client that opens connections and sends half
# a request held one thread each, forever (300 such connections: 305 threads).
READ_TIMEOUT_S = 30.0


def page_html() -> bytes:
    """The browser's single page (static HTML with inline JS and CSS)."""
    return resources.files("retformer.pipelines").joinpath(PAGE).read_bytes()


def _filters(query: dict[str, list[str]], num_classes: int) -> dict[str, Any]:
    """/api/queries's parameters, checked: ValueError names the bad one."""

    def one(name: str) -> str | None:
        values = [v for v in query.get(name, []) if v != ""]
        return values[-1] if values else None

    out: dict[str, Any] = {}
    if (cls := one("class")) is not None:
        if not cls.isdigit() or int(cls) >= num_classes:
            raise ValueError(f"class must be a class index below {num_classes}, got {cls!r}")
        out["cls"] = int(cls)
    if (correct := one("correct")) is not None:
        if correct not in ("true", "false", "1", "0"):
            raise ValueError(f"correct must be true or false, got {correct!r}")
        out["correct"] = correct in ("true", "1")
    if (shot := one("shot")) is not None:
        if shot not in ("many", "medium", "few"):
            raise ValueError(f"shot must be many, medium or few, got {shot!r}")
        out["shot"] = shot
    if (effect := one("effect")) is not None:
        if effect not in EFFECTS:
            raise ValueError(f"effect must be one of {', '.join(EFFECTS)}, got {effect!r}")
        out["effect"] = effect
    for name, default in (("offset", 0), ("limit", 200)):
        value = one(name)
        if value is not None and not value.isdigit():
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        out[name] = int(value) if value is not None else default
    return out


def make_handler(
    browser: BrowseRun, allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS
) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving `browser` (GET only; every path is a fixed route, never a file).
    A request whose Host header names none of `allowed_hosts` gets 403 (None: any host)."""
    page = page_html()
    summary = browser.summary()
    routes: list[tuple[re.Pattern[str], Callable[..., tuple[int, str, bytes]]]] = []

    def as_json(obj: Any, status: int = HTTPStatus.OK) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(obj).encode()

    def image(found: tuple[bytes, str] | None) -> tuple[int, str, bytes]:
        if found is None:
            return as_json({"error": "image not found"}, HTTPStatus.NOT_FOUND)
        data, ext = found
        return HTTPStatus.OK, mimetypes.types_map.get(f".{ext}", "application/octet-stream"), data

    def query(i: str, params: dict[str, list[str]]) -> tuple[int, str, bytes]:
        try:
            return as_json(browser.query(int(i)))
        except KeyError:
            return as_json({"error": f"no sample {i} (the split has {len(browser.features)})"}, 404)

    def queries(params: dict[str, list[str]]) -> tuple[int, str, bytes]:
        try:
            return as_json(browser.queries(**_filters(params, len(browser.class_names))))
        except ValueError as exc:
            return as_json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)

    routes += [
        (re.compile(r"/"), lambda params: (HTTPStatus.OK, "text/html; charset=utf-8", page)),
        (re.compile(r"/api/run"), lambda params: as_json(summary)),
        (re.compile(r"/api/queries"), queries),
        (re.compile(r"/api/query/(\d+)"), query),
        (re.compile(r"/img/kb/(\d+)"), lambda kb_id, params: image(browser.kb_image(int(kb_id)))),
        (
            re.compile(r"/img/dataset/(.+)"),
            lambda uid, params: image(browser.dataset_image(uid) if UID.fullmatch(uid) else None),
        ),
    ]

    class Handler(BaseHTTPRequestHandler):
        server_version = "retformer-browse"
        timeout = READ_TIMEOUT_S  # the socket's: an idle or half-sent request ends its thread

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            params = parse_qs(url.query, keep_blank_values=True)
            path = unquote(url.path)
            host = host_of(self.headers.get("Host"))
            if allowed_hosts is not None and host not in allowed_hosts:
                error = {"error": f"host {host!r} refused: this server answers {sorted(allowed_hosts)} only"}
                self._send(path, *as_json(error, HTTPStatus.FORBIDDEN))
                return
            for pattern, view in routes:
                match = pattern.fullmatch(path)
                if match:
                    try:
                        status, ctype, body = view(*match.groups(), params)
                    except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
                        log.exception("%s failed", path)
                        status, ctype, body = as_json({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)
                    break
            else:
                status, ctype, body = as_json({"error": f"no such page: {path}"}, HTTPStatus.NOT_FOUND)
            self._send(path, status, ctype, body)

        def _send(self, path: str, status: int, ctype: str, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                # images never change while the server runs; the API answers are small and recomputed
                self.send_header("Cache-Control", "max-age=3600" if path.startswith("/img/") else "no-store")
                self.end_headers()
                self.wfile.write(body)
            except ConnectionError:  # the browser cancelled the request (a thumbnail scrolled away)
                log.debug("%s: the client closed the connection before the answer", path)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection the client dropped (reset, broken pipe) is a debug line, not a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("%s closed the connection", client_address)
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(browser: BrowseRun, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for `browser` bound to host:port (port 0: a free one; see `server.server_address`).
    Bound to a loopback address it answers loopback Host headers only (`LOOPBACK_HOSTS`); bound
    elsewhere (`--host`, which warns that anyone who can reach it sees the run) any host.
    UserError when the address cannot be bound."""
    # an IPv6 address needs its own address family (ThreadingHTTPServer binds IPv4)
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), make_handler(browser, hosts_answered(host)))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True  # a browser's open connection never holds the process at exit
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The URL a browser opens for `server`."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    return f"http://{shown}:{port}/"
