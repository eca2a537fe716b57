"""The neighbor browser: one run's test images, the KB neighbors each retrieved, and the attention the
fusion module gave them (the paper's Fig. 5), served as a small local web page.

`retformer browse RUN` (pipelines/cli_browse.py) opens a run with `BrowseRun.open` and serves it with
`serve`: the standard library's ThreadingHTTPServer, one static page (`pipelines/static/browse.html`,
inline JS and CSS, nothing fetched from the internet) and a JSON API:

- `GET /api/run`: the run, its method, split, k, classes (name, shot group, test count), top-1;
- `GET /api/queries?class=&correct=&shot=&offset=&limit=`: the split's samples that pass the filters,
  with their true and predicted class;
- `GET /api/query/<i>`: sample i with its top-5, its k neighbors (kb_id, uid, caption, label,
  similarity) and, for a RetFormer, the class token's attention over them per layer and stream
  (`trainer.model.neighbor_attention`, plus the mass that went to the class token and the query slot);
- `GET /img/dataset/<uid>`, `GET /img/kb/<kb_id>`: an image's bytes, read from its webdataset shard
  at the member's byte offset (nothing is extracted to disk).

Predictions are the run's own: its per-sample predictions file (`<run>/predictions/<result>.parquet`,
the evaluation's output) when it covers the split, else the model on the stored neighbor tables
through `trainer.train.predict` (the evaluation's call). Neighbors are the stored tables' first k.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import socket
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from artifacts.embeddings_io import list_parts, read_part_arrow
from artifacts.errors import UserError
from artifacts.shards import shard_stem, to_record
from artifacts.tar_reader import split_name
from artifacts.workspace import Workspace, read_json
from trainer.evaluate import prediction_table, shot_group_of
from trainer.features import RetrievalFeatures, load_retrieval_features

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # what a shard sample's image member may be (artifacts/shards)
MAX_LIMIT = 1000  # samples per /api/queries answer: the page asks for more as one scrolls
PAGE = "static/browse.html"
UID = re.compile(r"[A-Za-z0-9_-]+")  # the uid contract (docs/architecture.md): what /img/dataset/ accepts
# Seconds a connection may take to send its request: a client that opens connections and sends half
# a request held one thread each, forever (300 such connections: 305 threads).
READ_TIMEOUT_S = 30.0
# Host headers a server bound to a loopback address answers (any port); others get 403, so a page
# whose DNS name was rebound to 127.0.0.1 cannot read the run from the user's browser.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


# ----------------------------------------------------------------------------------- shard images
def shard_offsets(path: Path) -> dict[str, tuple[int, int, str]]:
    """uid -> (byte offset, size, extension) of each sample's image member in a webdataset tar.

    One pass over the headers (tarfile's `offset_data`, as `trainer.images` reads fine-tune images);
    only the small json members are read, for the uid a sample's json may give (img2dataset shards:
    `__key__` is not the uid), with `artifacts.shards.to_record`'s rule: json uid, else the key."""
    images: dict[str, tuple[int, int, str]] = {}
    uids: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name.rsplit("/", 1)[-1])
                if ext.lower() in IMAGE_EXTS:
                    images[key] = (member.offset_data, member.size, ext.lower())
                elif ext == "json":
                    fh = tar.extractfile(member)
                    try:
                        uids[key] = to_record(key, {"json": fh.read() if fh else b"{}"})["uid"]
                    except ValueError:  # unreadable json: the key stands for the uid, as a reader would fail
                        uids[key] = key
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"cannot index shard {path}: {exc}") from exc
    return {uids.get(key, key): where for key, where in images.items()}


class ShardImageReader:
    """Images of embeddings parts, read from the shards the parts were embedded from.

    A part's shard is the one whose `artifacts.shards.shard_stem` under one of `roots` names the part
    (`part-<stem>.parquet`, as the embed stage names it), else the absolute path the embed stage
    recorded in the part's metadata (`shard_stats.shard`).
    Each shard's offset index (`shard_offsets`) is built on first use and kept in memory."""

    def __init__(self, parts: list[Path], roots: list[Path]) -> None:
        self.parts = parts
        self.roots = [r for r in roots if r.is_dir()]
        self._shards: dict[int, Path | None] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int, str]]] = {}
        self._by_stem: dict[str, Path] | None = None
        self._lock = threading.Lock()

    def shard_of(self, part: int) -> Path | None:
        """The shard part `part` was embedded from; None when it cannot be found."""
        with self._lock:
            if part not in self._shards:
                self._shards[part] = self._find_shard(self.parts[part])
            return self._shards[part]

    def _find_shard(self, part: Path) -> Path | None:
        # The shard named like the part under this workspace's roots first: the recorded path may be
        # relative to wherever the embed stage ran, or belong to a workspace since moved.
        if self._by_stem is None:
            self._by_stem = {}
            for root in self.roots:
                for tar in sorted(root.rglob("*.tar")):
                    self._by_stem.setdefault(shard_stem(tar, root), tar)
        found = self._by_stem.get(part.name[len("part-") : -len(".parquet")])
        if found is not None:
            return found
        try:
            meta = json.loads((pq.read_schema(part).metadata or {}).get(b"meta", b"{}"))
        except (pa.ArrowInvalid, OSError, ValueError):
            meta = {}
        recorded = (meta.get("shard_stats") or {}).get("shard")
        return (
            Path(recorded) if recorded and Path(recorded).is_absolute() and Path(recorded).is_file() else None
        )

    def read(self, part: int, uid: str) -> tuple[bytes, str] | None:
        """(bytes, extension) of sample `uid`'s image in part `part`'s shard; None if not found."""
        shard = self.shard_of(part)
        if shard is None:
            return None
        with self._lock:
            if shard not in self._offsets:
                self._offsets[shard] = shard_offsets(shard)
            where = self._offsets[shard].get(uid)
        if where is None:
            return None
        offset, size, ext = where
        with open(shard, "rb") as fh:
            fh.seek(offset)
            return fh.read(size), ext


# ------------------------------------------------------------------------------------- the run
@dataclass
class Neighbors:
    """What the page shows of each KB row a query retrieved (store rows of the neighbor table)."""

    kb_id: np.ndarray
    uid: list[str]
    caption: list[str | None]
    label: np.ndarray


class BrowseRun:
    """One run's model on one split: per-sample predictions, neighbors, attention, image bytes.

    Open with `BrowseRun.open(run, method, workdir, split)`."""

    def __init__(self, predictor: Any, split: str | None = None) -> None:
        self.predictor = predictor
        info = predictor.info
        self.ws: Workspace = predictor.ws
        self.model = predictor.model.cpu().eval()
        if predictor.finetuned:
            raise UserError(
                f"{predictor.method} fine-tuned its image encoder: the browser shows feature-mode models "
                "(retformer, its variants, mlp_only, linear_probe); choose one with --method"
            )
        self.run_dir = predictor.saved.path.resolve().parent
        self.report = read_json(self.run_dir / "eval.json") or {}
        self.split = split or self.report.get("eval_split") or "test"
        self.dataset = str(info["dataset"]["name"])
        self.kb = str(info["kb"]["name"])
        self.k = int(info["k"])
        self.table_k = int(info.get("search_k") or self.k)
        self.class_names: list[str] = list(info["class_names"])
        self.shot_split: dict[str, list[int]] | None = info.get("shot_split")
        self.features: RetrievalFeatures = load_retrieval_features(
            self.ws, self.dataset, self.kb, self.table_k, self.split
        ).subset_k(self.k)
        self.neighbors = self._store()
        self.predictions, self.predictions_source = self._predictions()
        t = self.predictions
        self._columns = {
            "label": t.column("label").to_numpy(),
            "pred": t.column("pred").to_numpy(),
            "prob": t.column("prob").to_numpy(),
            "correct": t.column("correct").to_numpy(zero_copy_only=False).astype(bool),
            "shot": np.array(t.column("shot_group").to_pylist(), dtype=object),
        }
        self._model_lock = threading.Lock()
        self._image_readers()

    @classmethod
    def open(
        cls,
        run: str | Path,
        method: str | None = None,
        workdir: Path | str | None = None,
        split: str | None = None,
    ) -> BrowseRun:
        """The browser of a run folder, run name (under `workdir/runs`) or model file; `method` picks
        the model as `retformer predict` does, `split` defaults to the run's eval split."""
        from pipelines.predict import Predictor

        return cls(Predictor.open(run, method, workdir, "cpu"), split)

    @property
    def method(self) -> str:
        return str(self.predictor.method)

    def _store(self) -> Neighbors:
        """The neighbor store's kb_id, uid, caption and label columns, in the file's row order (the
        rows `RetrievalFeatures.nn_rows` index)."""
        path = self.ws.neighbors_dir(self.dataset, self.kb, self.table_k) / "store.parquet"
        table = read_part_arrow(path, columns=["kb_id", "uid", "caption"])
        return Neighbors(
            kb_id=table.column("kb_id").to_numpy().astype(np.int64),
            uid=[str(u) for u in table.column("uid").to_pylist()],
            caption=table.column("caption").to_pylist(),
            label=self.features.store_label.numpy(),
        )

    def _predictions(self) -> tuple[pa.Table, str]:
        """The per-sample predictions table (`trainer.evaluate.prediction_table`'s columns) and where it
        came from: the run's predictions file when it is this split's and covers its samples in order,
        else the model on the stored features."""
        entry = (self.report.get("methods") or {}).get(self.method) or {}
        rel = entry.get("predictions")
        if rel and self.report.get("eval_split") == self.split and (self.run_dir / rel).is_file():
            table = read_part_arrow(self.run_dir / rel)
            if table.column("uid").to_pylist() == self.features.uids:
                return table, str(self.run_dir / rel)
            log.warning("%s does not hold this split's samples in order: predicting again", rel)
        from trainer.train import predict

        with torch.inference_mode():
            logits = predict(self.model, self.features, device="cpu")
        table = prediction_table(logits, self.features.labels, self.features.uids, self.shot_split)
        return table, f"{self.method} on the stored neighbor tables (k={self.k})"

    # ------------------------------------------------------------------------------------ views
    def class_name(self, c: int | None) -> str | None:
        return self.class_names[c] if c is not None and 0 <= c < len(self.class_names) else None

    def summary(self) -> dict[str, Any]:
        """The run as the page's header and filters need it."""
        c = self._columns
        counts = np.bincount(c["label"][c["label"] >= 0], minlength=len(self.class_names))
        shot = shot_group_of(self.shot_split, len(self.class_names))  # what the predictions' column holds
        return {
            "run": self.run_dir.name,
            "method": self.method,
            "model": type(self.model).__name__,
            "split": self.split,
            "dataset": self.dataset,
            "kb": self.kb,
            "k": self.k,
            "num_samples": len(self.features),
            "top1": round(float(c["correct"].mean()), 4) if len(c["correct"]) else None,
            "predictions_source": self.predictions_source,
            "attention": self.attention_streams(),
            "classes": [
                {"index": i, "name": name, "shot": shot[i], "count": int(counts[i])}
                for i, name in enumerate(self.class_names)
            ],
        }

    def attention_streams(self) -> list[str]:
        """The streams whose attention the model exposes ([] for models without a fusion module)."""
        from trainer.model import RetFormer

        if not isinstance(self.model, RetFormer):
            return []
        return [s for s, used in (("image", self.model.use_img), ("text", self.model.use_txt)) if used]

    def row(self, i: int) -> dict[str, Any]:
        c = self._columns
        label, pred = int(c["label"][i]), int(c["pred"][i])
        return {
            "i": i,
            "uid": self.features.uids[i],
            "label": label,
            "label_name": self.class_name(label),
            "pred": pred,
            "pred_name": self.class_name(pred),
            "prob": round(float(c["prob"][i]), 4),
            "correct": bool(c["correct"][i]),
            "shot": c["shot"][i],
        }

    def queries(
        self,
        cls: int | None = None,
        correct: bool | None = None,
        shot: str | None = None,
        offset: int = 0,
        limit: int = 200,
    ) -> dict[str, Any]:
        """The samples whose true class is `cls`, whose prediction is (in)correct, whose class is in
        shot group `shot` (None: any), from `offset`, at most `limit`."""
        c = self._columns
        keep = np.ones(len(c["label"]), dtype=bool)
        if cls is not None:
            keep &= c["label"] == cls
        if correct is not None:
            keep &= c["correct"] == correct
        if shot is not None:
            keep &= c["shot"] == shot
        idx = np.flatnonzero(keep)
        page = idx[offset : offset + min(limit, MAX_LIMIT)]
        return {"total": int(len(idx)), "offset": offset, "items": [self.row(int(i)) for i in page]}

    def query(self, i: int) -> dict[str, Any]:
        """Sample i: its row, top-5, its k neighbors and (RetFormer) the attention each received."""
        if not 0 <= i < len(self.features):
            raise KeyError(i)
        from trainer.model import RetFormer, neighbor_attention

        b = self.features.batch([i])
        attention: dict[str, Any] = {}
        with self._model_lock, torch.inference_mode():
            if isinstance(self.model, RetFormer):
                logits, attn = self.model(
                    b["z"], b["nn_img"], b["nn_txt"], return_attention=True, nn_label=b["nn_label"]
                )
                layers = next(iter(attn.values())).shape[0] if attn else 0
                for stream, w in attn.items():
                    cls_row = w.mean(dim=2)[:, 0, 0]  # (L, P): the class token's row, heads averaged
                    attention[stream] = [
                        {
                            "neighbors": [
                                round(float(v), 6)
                                for v in neighbor_attention({stream: w}, layer)[stream][0].tolist()
                            ],
                            "cls": round(float(cls_row[layer, 0]), 6),
                            "query": round(float(cls_row[layer, 1]), 6),
                        }
                        for layer in range(layers)
                    ]
            else:
                logits = self.model(b["z"], b["nn_img"], b["nn_txt"], nn_label=b["nn_label"])
        probs = logits.float().softmax(dim=1)[0]
        top = probs.topk(min(5, len(probs))).indices.tolist()
        rows = self.features.nn_rows[i].tolist()
        nn = self.neighbors
        neighbors = [
            {
                "rank": j + 1,
                "kb_id": int(nn.kb_id[r]),
                "uid": nn.uid[r],
                "caption": nn.caption[r],
                "label": int(nn.label[r]) if nn.label[r] >= 0 else None,
                "label_name": self.class_name(int(nn.label[r])) if nn.label[r] >= 0 else None,
                "similarity": round(float(self.features.nn_score[i, j]), 6),
                "attention": {
                    s: [layer["neighbors"][j] for layer in per_layer] for s, per_layer in attention.items()
                },
            }
            for j, r in enumerate(rows)
        ]
        return {
            **self.row(i),
            "top5": [
                {"index": c, "name": self.class_name(c), "prob": round(float(probs[c]), 4)} for c in top
            ],
            "neighbors": neighbors,
            "attention": attention,
        }

    # ----------------------------------------------------------------------------------- images
    def _image_readers(self) -> None:
        """The KB's and the split's part -> shard readers, and where a kb_id or uid is found: all small
        (part footers, the split's uid column), made once before any request thread reads them."""
        from kb_builder.neighbors import part_offsets

        kb_parts = list_parts(self.ws.kb_embeddings(self.kb))
        source = self.predictor.info["kb"].get("source") or {}
        roots = [self.ws.kb_shards(self.kb)] + ([Path(source["path"])] if source.get("path") else [])
        self._kb_reader, self._kb_offsets = ShardImageReader(kb_parts, roots), part_offsets(kb_parts)
        self._store_order = np.argsort(self.neighbors.kb_id, kind="stable")  # kb_id -> store row
        self._store_ids = self.neighbors.kb_id[self._store_order]
        parts = list_parts(self.ws.dataset_embeddings(self.dataset, self.split))
        self._part_of = {
            str(u): p
            for p, part in enumerate(parts)
            for u in read_part_arrow(part, columns=["uid"]).column("uid").to_pylist()
        }
        self._dataset_reader = ShardImageReader(parts, [self.ws.dataset_shards(self.dataset)])

    def kb_image(self, kb_id: int) -> tuple[bytes, str] | None:
        """(bytes, extension) of KB row `kb_id`'s image, if it is one of the stored neighbors (only the
        rows some query retrieved are served)."""
        ids = self._store_ids
        pos = int(np.searchsorted(ids, kb_id))
        if pos >= len(ids) or ids[pos] != kb_id:
            return None
        part = int(np.searchsorted(self._kb_offsets, kb_id, side="right")) - 1
        return self._kb_reader.read(part, self.neighbors.uid[int(self._store_order[pos])])

    def dataset_image(self, uid: str) -> tuple[bytes, str] | None:
        """(bytes, extension) of this split's sample `uid`."""
        part = self._part_of.get(uid)
        return None if part is None else self._dataset_reader.read(part, uid)


# ------------------------------------------------------------------------------------ the server
def page_html() -> bytes:
    """The browser's single page (static HTML with inline JS and CSS)."""
    return resources.files("pipelines").joinpath(PAGE).read_bytes()


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
    for name, default in (("offset", 0), ("limit", 200)):
        value = one(name)
        if value is not None and not value.isdigit():
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        out[name] = int(value) if value is not None else default
    return out


def host_of(header: str | None) -> str | None:
    """The host name of a Host header (`localhost:8000` -> `localhost`, `[::1]:80` -> `::1`), lower case."""
    if not header:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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
    loopback = host in LOOPBACK_HOSTS or host.startswith("127.")
    try:
        server = server_class(
            (host, port), make_handler(browser, LOOPBACK_HOSTS | {host} if loopback else None)
        )
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True  # a browser's open connection never holds the process at exit
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The URL a browser opens for `server`."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    return f"http://{shown}:{port}/"
