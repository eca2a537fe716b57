"""Download stage (kb_builder/download.py): real img2dataset against a loopback HTTP server.

The server (127.0.0.1, a thread of this process) serves foolbox's 20 ImageNet photos, 20 Fashion-MNIST
images as PNG (generated images when the IDX files are absent), a truncated JPEG, text saved as .jpg, a
zero-byte .jpg, and three `/flaky/` photos that answer 503 to their first request only; three URLs 404.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retformer.artifacts.decode import decode_image
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import IMG2DATASET_SOURCE, read_shard, shard_stem
from retformer.kb_builder.download import (
    RETRY_INPUT_NAME,
    SUCCESS_NAME,
    download_chunk,
    failure_class,
    list_downloaded_shards,
    normalize_settings,
    plan_download,
    run_download,
)
from tests.conftest import FMNIST_DIR, have_fmnist

# img2dataset's resizer passes albumentations a deprecated argument on every padded image.
pytestmark = pytest.mark.filterwarnings("ignore:value is deprecated:DeprecationWarning")

SETTINGS = {
    "image_size": 64,
    "number_sample_per_shard": 10,
    "thread_count": 4,
    "timeout": 5,
    "retries": 0,
    "processes_count": 1,
}


class _Handler(SimpleHTTPRequestHandler):
    """Static files; a `/flaky/` path answers 503 to its first request (per full path, query included)."""

    hits: Counter[str]
    lock: threading.Lock

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.lock:
            self.hits[self.path] += 1
            first = self.hits[self.path] == 1
        if self.path.startswith("/flaky/") and first:
            self.send_error(503, "busy, try again")
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
        pass


@dataclass
class Site:
    """The served files and what img2dataset should make of each (per file name)."""

    root: Path
    base_url: str
    hits: Counter[str]
    # name -> expected outcome: "ok", "flaky" (503 once, then ok), or a failure class
    files: dict[str, str] = field(default_factory=dict)


def _foolbox_imagenet() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (dev extra) is not installed: it ships the test photos")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos = sorted(data.glob("imagenet_*.jpg"))
    assert len(photos) == 20, f"expected foolbox's 20 ImageNet photos in {data}"
    return photos


def _small_images(n: int) -> list[np.ndarray]:
    if have_fmnist():
        from retformer.kb_builder.datasets.fashion_mnist import load_arrays

        return list(load_arrays(FMNIST_DIR, "test")[0][:n])
    rng = np.random.default_rng(0)  # stand-ins: 28x28 grey blobs
    return [(rng.random((28, 28)) * 255).astype(np.uint8) for _ in range(n)]


def _cv2_decodable(data: bytes) -> bool:
    """What img2dataset's resizer can decode (it uses OpenCV)."""
    return bool(data) and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Serve the test files on 127.0.0.1:<free port> for the whole module."""
    root = tmp_path_factory.mktemp("www")
    (root / "flaky").mkdir()
    files: dict[str, str] = {}
    photos = _foolbox_imagenet()
    for p in photos:
        (root / p.name).write_bytes(p.read_bytes())
        files[p.name] = "ok"
    for i, arr in enumerate(_small_images(20)):
        Image.fromarray(arr).save(root / f"fmnist_{i:02d}.png")
        files[f"fmnist_{i:02d}.png"] = "ok"
    for p in photos[:3]:
        (root / "flaky" / p.name).write_bytes(p.read_bytes())
        files[f"flaky/{p.name}"] = "flaky"
    broken = {
        "truncated.jpg": photos[0].read_bytes()[:2000],
        "text.jpg": b"this is not an image, just some alt text\n",
        "empty.jpg": b"",
    }
    for name, data in broken.items():
        (root / name).write_bytes(data)
        # "Decodable" means what OpenCV (img2dataset's decoder) decodes; none of these three is.
        assert not _cv2_decodable(data), name
        files[name] = "empty_file" if not data else "decode_error"
    for name in ("missing-1.jpg", "missing-2.jpg", "missing-3.jpg"):
        files[name] = "http_404"

    handler = type("Handler", (_Handler,), {"hits": Counter(), "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(root, f"http://127.0.0.1:{server.server_address[1]}", handler.hits, files)
    finally:
        server.shutdown()
        server.server_close()


def uid_of(name: str) -> str:
    """DataComp-style uid (32 hex digits) of a served file."""
    return hashlib.md5(name.encode()).hexdigest()


@dataclass
class Metadata:
    """Two metadata chunks (a.parquet, b.parquet) and the expected outcome per uid."""

    dir: Path
    expected: dict[str, str]  # uid -> outcome
    chunk_of: dict[str, str]  # uid -> "a" | "b"
    caption: dict[str, str]

    def uids(self, *outcomes: str, chunk: str | None = None) -> set[str]:
        return {
            u
            for u, o in self.expected.items()
            if o in outcomes and (chunk is None or self.chunk_of[u] == chunk)
        }


def write_metadata(site: Site, folder: Path, tag: str) -> Metadata:
    """Chunk a: ImageNet photos, broken files, two 404s; chunk b: PNGs, the flaky photos, one 404.
    `tag` goes into every URL's query string so each test sees fresh first requests to /flaky/."""
    folder.mkdir(parents=True, exist_ok=True)
    names_a = [n for n in site.files if n.startswith("imagenet_")]
    names_a += ["truncated.jpg", "text.jpg", "empty.jpg", "missing-1.jpg", "missing-2.jpg"]
    names_b = [n for n in site.files if n.startswith(("fmnist_", "flaky/"))] + ["missing-3.jpg"]
    expected, chunk_of, caption = {}, {}, {}
    for chunk, names in (("a", names_a), ("b", names_b)):
        rows = {"url": [], "text": [], "uid": []}
        for n in names:
            uid = uid_of(n)
            rows["url"].append(f"{site.base_url}/{n}?run={tag}")
            rows["text"].append(f"a photo named {n}")
            rows["uid"].append(uid)
            expected[uid], chunk_of[uid], caption[uid] = site.files[n], chunk, f"a photo named {n}"
        pq.write_table(pa.table(rows), folder / f"{chunk}.parquet")
    return Metadata(folder, expected, chunk_of, caption)


def snapshot(out_dir: Path) -> dict[str, int]:
    """Every path under `out_dir` with its mtime (ns)."""
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in sorted(out_dir.rglob("*"))}


def read_all(out_dir: Path) -> list[dict]:
    return [s for shard in list_downloaded_shards(out_dir) for s in read_shard(shard)]


def by_chunk(record: dict) -> dict[str, dict]:
    return {c["chunk"]: c for c in record["per_chunk"]}


def test_download_counts_uids_and_read_shard(site: Site, tmp_path: Path) -> None:
    """A first download stores exactly the decodable images served (40: 20 photos + 20 PNGs), counts every
    failure by class (404, 503 on first request, undecodable, empty), and the shards read back through
    read_shard with the metadata's uids and captions, label None, source "img2dataset" and 64x64 images."""
    meta = write_metadata(site, tmp_path / "metadata", "first")
    out = tmp_path / "shards"
    tasks = plan_download(meta.dir, out, normalize_settings(SETTINGS))
    assert [t.name for t in tasks] == ["a", "b"]
    record = run_download(None, tasks)

    ok = meta.uids("ok")
    assert len(ok) == 40
    assert record["totals"]["successes"] == len(ok) == record["totals"]["new_successes"]
    assert record["totals"]["samples"] == len(meta.expected) == 49
    assert record["totals"]["failed"] == 9
    assert record["failures"] == {"http_404": 3, "http_503": 3, "decode_error": 2, "empty_file": 1}
    assert record["failures_by_status"] == {"failed_to_download": 6, "failed_to_resize": 3}
    assert record["status"] == {"downloaded": 2}
    chunks = by_chunk(record)
    assert chunks["a"]["successes"] == 20 and chunks["a"]["failed"] == 5
    assert chunks["b"]["successes"] == 20 and chunks["b"]["failed"] == 4
    # img2dataset's own per-shard stats agree: ceil(25/10) + ceil(24/10) shards, 40 successes.
    stats = sorted(out.glob("*/*_stats.json"))
    assert len(stats) == 6
    assert sum(json.loads(p.read_text())["successes"] for p in stats) == 40

    samples = read_all(out)
    assert sorted(s["uid"] for s in samples) == sorted(ok)  # each stored once, uid from the json
    for s in samples:
        assert s["caption"] == meta.caption[s["uid"]]
        assert s["label"] is None and s["source"] == IMG2DATASET_SOURCE
        assert s["meta"]["status"] == "success" and s["meta"]["uid"] == s["uid"]
        img, reason = decode_image(s["image_bytes"])
        assert reason is None and img.size == (64, 64)
    # The last shard of each chunk holds only failures (rows 20-24 of a, 20-23 of b): it is complete
    # (tar, status Parquet, stats) but not listed, as it has no sample to embed.
    shards = list_downloaded_shards(out)
    assert [shard_stem(p, out) for p in shards] == ["a-00000", "a-00001", "b-00000", "b-00001"]
    assert (out / "a" / "00002.tar").is_file() and (out / "b" / "00002_stats.json").is_file()
    # The per-sample status Parquet keeps every input row, failures included.
    status = pa.concat_tables(
        pq.read_table(p, columns=["uid", "status"]) for p in sorted(out.glob("a/*.parquet"))
    )
    assert sorted(status.column("uid").to_pylist()) == sorted(
        meta.uids(*set(meta.expected.values()), chunk="a")
    )


def test_rerun_skips_redo_and_retry_failed(site: Site, tmp_path: Path) -> None:
    """Rerun: nothing is written (mtimes unchanged). A chunk without `_SUCCESS` and stats (a crashed run)
    is redone from scratch (its stray files removed) while the other chunk is untouched. retry_failed
    retries exactly the failed uids (into retry-001/), the 503-once photos then succeed (+3), every uid
    is still read back once, and a further plain rerun writes nothing."""
    meta = write_metadata(site, tmp_path / "metadata", "rerun")
    out = tmp_path / "shards"
    tasks = plan_download(meta.dir, out, normalize_settings(SETTINGS))
    first = run_download(None, tasks)
    assert first["totals"]["successes"] == 40

    before = snapshot(out)
    again = run_download(None, tasks)
    assert again["status"] == {"done_before": 2} and again["totals"]["new_successes"] == 0
    assert again["totals"]["successes"] == 40
    assert snapshot(out) == before

    # Simulate a run that died half-way through chunk a: no _SUCCESS, no stats, a stray partial file.
    (out / "a" / SUCCESS_NAME).unlink()
    for p in (out / "a").glob("*_stats.json"):
        p.unlink()
    (out / "a" / "00009.tar").write_bytes(b"partial")
    assert [p.parent.name for p in list_downloaded_shards(out)] == ["b", "b"]
    redo = run_download(None, tasks)
    assert by_chunk(redo)["a"]["status"] == "redone" and by_chunk(redo)["b"]["status"] == "done_before"
    assert by_chunk(redo)["a"]["successes"] == 20
    assert not (out / "a" / "00009.tar").exists()
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("b")} == {
        k: v for k, v in before.items() if k.startswith("b")
    }

    failed_before = {c: meta.uids("flaky", "http_404", "decode_error", "empty_file", chunk=c) for c in "ab"}
    retry = run_download(None, tasks, retry_failed=True)
    assert retry["status"] == {"retried": 2}
    for c in "ab":
        retried = pq.read_table(out / c / "retry-001" / RETRY_INPUT_NAME).column("uid").to_pylist()
        assert sorted(retried) == sorted(failed_before[c])  # exactly the failed samples
    assert retry["totals"]["new_successes"] == 3 == by_chunk(retry)["b"]["new_successes"]
    assert retry["totals"]["successes"] == 43 and retry["totals"]["failed"] == 6
    assert retry["failures"] == {"http_404": 3, "decode_error": 2, "empty_file": 1}
    samples = read_all(out)
    assert sorted(s["uid"] for s in samples) == sorted(meta.uids("ok", "flaky"))
    retry_shards = [p for p in list_downloaded_shards(out) if p.parent.name == "retry-001"]
    assert [shard_stem(p, out) for p in retry_shards] == ["b-retry-001-00000"]
    assert {s["uid"] for s in read_shard(retry_shards[0])} == meta.uids("flaky")

    settled = snapshot(out)
    assert run_download(None, tasks)["status"] == {"done_before": 2}
    assert snapshot(out) == settled
    # Fetch-only settings (threads, timeout) never redo a chunk; content settings (image size) do.
    faster = plan_download(
        meta.dir / "a.parquet", out, normalize_settings({**SETTINGS, "thread_count": 8, "timeout": 9})
    )
    assert run_download(None, faster)["status"] == {"done_before": 1}
    assert snapshot(out) == settled
    smaller = run_download(
        None, plan_download(meta.dir / "a.parquet", out, normalize_settings({**SETTINGS, "image_size": 48}))
    )
    assert smaller["status"] == {"redone": 1} and smaller["totals"]["successes"] == 20
    assert not (out / "a" / "retry-001").exists()  # from scratch: the old retry round is gone
    sizes = {decode_image(s["image_bytes"])[0].size for p in out.glob("a/*.tar") for s in read_shard(p)}
    assert sizes == {(48, 48)}


@pytest.mark.system  # starts a Dask LocalCluster of worker processes
def test_dask_cluster_runs_the_same_tasks(site: Site, tmp_path: Path) -> None:
    """The same tasks on a Dask LocalCluster (1 worker process) give the same counts and shards as the
    inline path, and retry_failed works there too."""
    from retformer.pipelines.dask_runner import dask_client, task_mapper

    meta = write_metadata(site, tmp_path / "metadata", "dask")
    out = tmp_path / "shards"
    tasks = plan_download(meta.dir, out, normalize_settings(SETTINGS))
    with dask_client(n_workers=1) as client:
        record = run_download(task_mapper(client), tasks)
        assert record["status"] == {"downloaded": 2}
        assert record["totals"]["successes"] == 40 and record["totals"]["failed"] == 9
        retry = run_download(task_mapper(client), tasks, retry_failed=True)
    assert retry["totals"]["new_successes"] == 3 and retry["totals"]["successes"] == 43
    assert sorted(s["uid"] for s in read_all(out)) == sorted(meta.uids("ok", "flaky"))


@pytest.mark.system  # starts 4 interpreters that each import torch (~15-30 s on 2 cores)
def test_process_pool_engine_writes_the_same_layout(site: Site, tmp_path: Path) -> None:
    """With processes_count > 1, img2dataset.download() runs in a subprocess with its own process pool
    and writes the same files: chunk b's 20 PNGs stored, the 503s and the 404 counted, uids readable."""
    meta = write_metadata(site, tmp_path / "metadata", "pool")
    out = tmp_path / "shards"
    (task,) = plan_download(
        meta.dir / "b.parquet", out, normalize_settings({**SETTINGS, "processes_count": 2})
    )
    summary = download_chunk(task.chunk, task.out_dir, task.settings)
    assert summary["status"] == "downloaded"
    assert summary["successes"] == 20 and summary["failures"] == {"http_404": 1, "http_503": 3}
    assert "Starting the downloading" in (out / "b" / "_img2dataset.log").read_text()
    assert sorted(s["uid"] for s in read_all(out)) == sorted(meta.uids("ok", chunk="b"))


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    """Missing paths, missing columns, missing or duplicate uids, and unknown or stage-owned settings
    each raise a UserError naming the problem (nothing is downloaded)."""
    with pytest.raises(UserError, match="not found"):
        plan_download(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no metadata Parquet"):
        plan_download(tmp_path / "empty_dir", tmp_path / "out")
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        pq.write_table(pa.table({"url": ["u"], "text": ["t"], "uid": ["1"]}), tmp_path / d / "a.parquet")
    with pytest.raises(UserError, match="share the output folder"):
        plan_download([tmp_path / "x", tmp_path / "y"], tmp_path / "out")
    same = [tmp_path / "x" / "a.parquet", tmp_path / "x" / ".." / "x" / "a.parquet"]
    assert len(plan_download(same, tmp_path / "out")) == 1
    with pytest.raises(UserError, match="unknown key"):
        normalize_settings({"image_sise": 64})
    with pytest.raises(UserError, match="set by the download stage"):
        normalize_settings({"output_format": "files"})
    with pytest.raises(UserError, match="resize_mode"):
        normalize_settings({"resize_mode": "stretch"})
    cases = {
        "no_uid.parquet": ({"url": ["http://127.0.0.1:9/x.jpg"], "text": ["x"]}, "no column"),
        "dup.parquet": ({"url": ["u1", "u2"], "text": ["a", "b"], "uid": ["1", "1"]}, "duplicates"),
        "null.parquet": ({"url": ["u1"], "text": ["a"], "uid": pa.array([None], pa.string())}, "no uid"),
    }
    for name, (cols, message) in cases.items():
        pq.write_table(pa.table(cols), tmp_path / name)
        with pytest.raises(UserError, match=message):
            download_chunk(tmp_path / name, tmp_path / "out", normalize_settings(SETTINGS))
        assert not (tmp_path / "out" / name.removesuffix(".parquet")).exists()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        download_chunk(tmp_path / "bad.parquet", tmp_path / "out", normalize_settings(SETTINGS))
    with pytest.raises(UserError, match="not found"):
        list_downloaded_shards(tmp_path / "never")


def test_failure_classes() -> None:
    """img2dataset's free-text error messages map to short classes (HTTP codes kept)."""
    assert failure_class("HTTP Error 404: Not Found") == "http_404"
    assert failure_class("HTTP Error 503: Service Unavailable") == "http_503"
    assert failure_class("<urlopen error timed out>") == "timeout"
    assert failure_class("<urlopen error [Errno 111] Connection refused>") == "connection_refused"
    assert failure_class("Image decoding error") == "decode_error"
    assert failure_class("OpenCV(4.14.0) loadsave.cpp:1310: error: (-215:Assertion failed) !buf.empty()") == (
        "empty_file"
    )
    assert failure_class("image too small") == "image_too_small"
    assert failure_class(None, "failed_to_download") == "failed_to_download"
    assert failure_class("something new") == "other"
