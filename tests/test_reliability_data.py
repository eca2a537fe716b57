"""Issue 10, the data path: nothing lost, nothing silent. Every case runs the real `retformer` CLI.

- a shard cut short (inside a member's padding, as `truncate -s` does) is one `error:` line naming it,
  exit 1, and the other shards' finished parts are kept, so the rerun redoes only the fixed shard;
  where a manifest records the shard, its size and sample count are checked against it;
- a KB whose shards hold no sample is "the KB ... is empty" at embed, not an index error later;
- a uid outside `[A-Za-z0-9_-]` is one error naming the shard (or metadata chunk) and the uid;
- download fetches http(s) only and refuses too many bytes, too many pixels and a slow drip, each
  counted as a failure class, against a loopback server;
- an imagefolder's text file named `x.png` is skipped and counted, an empty class folder warned about;
- a bad `embed:` option fails before any KB shard is built.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
import yaml
from PIL import Image

from retformer.artifacts.embeddings_io import list_parts, read_embeddings
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import manifest_path
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.download import download_chunk
from tests.conftest import REPO, SMALL_ENCODERS, needs_fmnist, write_manifest
from tests.helpers import run_cli
from tests.test_embed_robustness import bomb_png

pytestmark = pytest.mark.filterwarnings("ignore:value is deprecated:DeprecationWarning")


# ------------------------------------------------------------------------------------------ helpers
def png_bytes(seed: int, side: int = 16) -> bytes:
    """A small random RGB PNG (sizes vary, so members rarely end on a 512-byte boundary)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side + seed % 5, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_user_shard(path: Path, uids: list[str], start: int = 0) -> Path:
    """A webdataset tar as a user would bring it (no shard manifest): png, txt and json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, webdataset.TarWriter(f, encoder=False, mtime=0) as writer:
        for i, uid in enumerate(uids):
            meta = {"uid": uid, "label": None, "source": "user"}
            writer.write(
                {
                    "__key__": f"s{start + i:06d}",
                    "png": png_bytes(start + i),
                    "txt": f"photo {start + i}".encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
    return path


def cut_inside_padding(path: Path, member_index: int = 0, at_least: int = 0) -> int:
    """Truncate `path` inside the zero padding after the first member from `member_index` whose data
    ends at or after byte `at_least` (data intact, padding short: the cut the old reader took for the
    end of the archive); returns the new size."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    for m in members[member_index:]:
        if m.size % 512 not in (0, 511) and m.offset_data + m.size >= at_least:
            cut = m.offset_data + m.size + 1
            with open(path, "r+b") as f:
                f.truncate(cut)
            return cut
    raise AssertionError("no member with room in its padding")


def user_kb(tmp_path: Path, name: str, shard_dir: Path) -> Path:
    """A KB manifest over the user's own webdataset shards in `shard_dir`."""
    return write_manifest(
        tmp_path / f"{name}.yaml",
        {
            "name": name,
            "source": {"kind": "webdataset", "path": str(shard_dir)},
            "encoders": SMALL_ENCODERS,
            "embed": {"batch_size": 32},
            "index": {"kind": "flat", "k": 8},
        },
    )


def error_lines(proc) -> list[str]:
    """The `error:` lines of a finished CLI run (after checking that it printed no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def embed(kb: Path, ws: Path, *more: str, check: bool = True):
    return run_cli("embed", "--kb", str(kb), *more, "--workdir", str(ws), "--workers", "1", check=check)


def record(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------ 1. truncated shards
@pytest.mark.slow
def test_truncated_user_shard_is_one_error_and_the_good_part_is_kept(tmp_path):
    """A user KB of two 40-sample shards, the second cut inside a member's padding: embed exits 1 with
    one `error:` line naming that shard (the reader used to stop there and embed 10 of its 40 with
    exit 0); the first shard's part is written and kept. With the shard restored, the rerun embeds only
    it: 1 part done before, 40 images embedded, 80 rows in all."""
    shards = tmp_path / "shards"
    write_user_shard(shards / "user-00000.tar", [f"a{i}" for i in range(40)])
    good = write_user_shard(shards / "user-00001.tar", [f"b{i}" for i in range(40)], start=40).read_bytes()
    cut = cut_inside_padding(shards / "user-00001.tar", member_index=30)
    assert 0 < cut < len(good)
    kb = user_kb(tmp_path, "user_cut", shards)
    ws = tmp_path / "work"

    proc = embed(kb, ws, check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "user-00001.tar" in line and "user-00000.tar" not in line, line
    assert "1 of 2 shard(s) not embedded" in line and "truncated" in line, line
    parts = list_parts(Workspace(ws).kb_embeddings("user_cut"))
    assert [p.name for p in parts] == ["part-user-00000.parquet"]
    assert not Workspace(ws).kb_stage_record("user_cut", "embed").exists()

    (shards / "user-00001.tar").write_bytes(good)
    embed(kb, ws)
    rec = record(Workspace(ws).kb_stage_record("user_cut", "embed"))
    assert rec["parts_done_before"] == 1 and rec["embedded_this_run"] == 40 and rec["images"] == 80
    table = read_embeddings(Workspace(ws).kb_embeddings("user_cut"))
    assert table.uid.tolist() == [f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)]


@pytest.mark.slow
@needs_fmnist
def test_truncated_dataset_shard_is_checked_against_its_manifest(e2e_workspace, small_manifests, tmp_path):
    """The issue's case on a copy of the end-to-end workspace: the dataset's test-00001.tar (100
    images) cut inside a member's padding near byte 30000 is an error naming it and its manifest (the
    old reader stopped there: 13 of 100 embedded, exit 0, the test split shrinking without a word).
    `retformer shards` rewrites only that shard (the others are byte-identical, their files and mtimes
    kept) and embed then redoes only it: 200 test rows. A shard whose sample count disagrees with its
    manifest (size unchanged) is refused too."""
    ws_root = tmp_path / "work"
    shutil.copytree(e2e_workspace, ws_root)
    ws = Workspace(ws_root)
    m = small_manifests
    shard_dir = ws.dataset_shards("tiny_lt")
    victim = shard_dir / "test-00001.tar"
    others = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar") if p != victim}
    cut = cut_inside_padding(victim, at_least=30000)

    proc = embed(m["kb"], ws_root, "--dataset", str(m["dataset"]), check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert f"test-00001.tar is {cut} bytes" in line and "_SUCCESS-test.json" in line, line
    assert "retformer shards" in line

    run_cli("shards", "--dataset", str(m["dataset"]), "--workdir", str(ws_root))
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar") if p != victim} == others
    embed(m["kb"], ws_root, "--dataset", str(m["dataset"]))
    test_rec = record(ws.dataset_stage_record("tiny_lt", "embed-test"))
    assert test_rec["parts_done_before"] == 1 and test_rec["embedded_this_run"] == 100
    assert len(read_embeddings(ws.dataset_embeddings("tiny_lt", "test")).uid) == 200
    assert record(ws.kb_stage_record("tiny_all", "embed"))["embedded_this_run"] == 0

    # Same bytes, but the manifest says 101 samples: the count check (not the size check) refuses it.
    manifest = manifest_path(shard_dir, "test")
    info = record(manifest)
    info["shards"][0]["count"] += 1
    manifest.write_text(json.dumps(info))
    (ws.dataset_embeddings("tiny_lt", "test") / "part-test-00000.parquet").unlink()
    proc = embed(m["kb"], ws_root, "--dataset", str(m["dataset"]), check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "test-00000.tar: 100 samples read, but" in line and "records 101" in line, line


# ----------------------------------------------------------------------------------- 2. empty KB
@pytest.mark.slow
def test_empty_user_kb_is_named_at_embed(tmp_path):
    """A user KB whose only shard is an empty webdataset tar: embed exits 1 with "the KB ... is empty"
    naming the KB and the shard (it used to write a 0-row part, and index then reported
    `index.k=8 must be smaller than the KB (0 rows)`)."""
    shards = tmp_path / "shards"
    write_user_shard(shards / "empty-00000.tar", [])
    kb = user_kb(tmp_path, "user_empty", shards)
    proc = embed(kb, tmp_path / "work", check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "the KB user_empty is empty" in line and "empty-00000.tar" in line, line


# -------------------------------------------------------------------------------------- 6. uids
@pytest.mark.slow
def test_uid_outside_the_contract_is_one_error_naming_shard_and_uid(tmp_path):
    """A user shard with the uid "photo 7.jpg" (space and dot): one error naming the shard and the uid;
    a download metadata chunk with such a uid is refused before anything is fetched."""
    shards = tmp_path / "shards"
    write_user_shard(shards / "bad-00000.tar", ["ok_1", "photo 7.jpg", "ok-3"])
    kb = user_kb(tmp_path, "user_uids", shards)
    proc = embed(kb, tmp_path / "work", check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "bad-00000.tar" in line and "'photo 7.jpg'" in line and "[A-Za-z0-9_-]" in line, line

    chunk = tmp_path / "meta" / "c.parquet"
    chunk.parent.mkdir()
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "text": ["a"], "uid": ["a/b"]}), chunk)
    with pytest.raises(UserError, match=r"uid 'a/b' has characters outside"):
        download_chunk(chunk, tmp_path / "dl")
    assert not (tmp_path / "dl" / "c").exists()


# -------------------------------------------------------------------------------------- 3. download
class _Handler(BaseHTTPRequestHandler):
    """/ok.png, /big.png (Content-Length over the cap), /stream.png (the same, no Content-Length),
    /bomb.png (a real decompression bomb), /slow.png (a good PNG, one byte per 0.2 s), /to-ftp (302 to
    ftp:). Every request is counted by path."""

    protocol_version = "HTTP/1.0"
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    drip_seconds: list[float] = []  # how long each /slow.png response went on before the client left

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1:9/ok.png")
            self.end_headers()
            return
        body = self.files.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if path != "/stream.png":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        started = time.monotonic()
        try:
            if path == "/slow.png":
                for i in range(len(body)):  # within every socket timeout, past any sane deadline
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body)
        except OSError:
            pass  # the client gave up
        finally:
            if path == "/slow.png":
                self.drip_seconds.append(time.monotonic() - started)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def limits_site(tmp_path) -> Iterator[str]:
    """The loopback server of the download test (127.0.0.1:<free port>), its base URL."""
    big = io.BytesIO()
    Image.effect_noise((400, 400), 60).convert("RGB").save(big, "PNG")  # ~480 KB, incompressible
    files = {
        "/ok.png": png_bytes(1, 32),
        "/big.png": big.getvalue(),
        "/stream.png": big.getvalue(),
        "/bomb.png": bomb_png(),
        "/slow.png": png_bytes(2, 32),
    }
    handler = type("H", (_Handler,), {"files": files, "hits": {}, "drip_seconds": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_download_fetches_http_only_within_bytes_pixels_and_deadline(limits_site, tmp_path):
    """`retformer download` against the loopback server, max_bytes 200 kB, deadline 3 s, the default
    max_pixels: the good PNG is stored; a file: URL, a data: URL (urllib would have decoded it into a
    KB image) and a redirect to ftp: are `unsupported_scheme`; a 480 kB PNG (with and without
    Content-Length) is `too_many_bytes`; an 11 kB PNG of 90 M pixels is `too_many_pixels` (img2dataset
    decodes it in full and stores it otherwise); a server dripping a byte per 0.2 s (each read well
    within the 10 s socket timeout) is `deadline_exceeded`: the client leaves after about 3 s, where
    the whole 3 kB would take ten minutes. The stored image embeds; a cut shard of the chunk is then an
    error naming the chunk."""
    base, handler = limits_site
    local = tmp_path / "local.png"
    local.write_bytes(png_bytes(3, 32))
    urls = {
        "ok": f"{base}/ok.png",
        "file": local.as_uri(),
        "data": "data:image/png;base64," + base64.b64encode(png_bytes(4, 32)).decode(),
        "redirect": f"{base}/to-ftp",
        "big": f"{base}/big.png",
        "stream": f"{base}/stream.png",
        "bomb": f"{base}/bomb.png",
        "slow": f"{base}/slow.png",
    }
    meta = tmp_path / "meta"
    meta.mkdir()
    pq.write_table(
        pa.table({"url": list(urls.values()), "text": list(urls), "uid": list(urls)}), meta / "m.parquet"
    )
    settings = {
        "image_size": 32,
        "number_sample_per_shard": 10,
        "thread_count": 4,
        "timeout": 10,
        "max_bytes": 200_000,
        "deadline": 3,
    }
    out = tmp_path / "dl"
    source = {"kind": "img2dataset", "metadata": str(meta), "path": str(out), "settings": settings}
    kb = write_manifest(
        tmp_path / "dl.yaml", {"name": "dl_limits", "source": source, "encoders": SMALL_ENCODERS}
    )
    ws = tmp_path / "work"
    run_cli("download", "--kb", str(kb), "--workdir", str(ws), "--workers", "1")
    rec = record(Workspace(ws).kb_stage_record("dl_limits", "download"))
    assert rec["totals"]["successes"] == 1 and rec["totals"]["failed"] == 7
    assert rec["failures"] == {
        "unsupported_scheme": 3,
        "too_many_bytes": 2,
        "too_many_pixels": 1,
        "deadline_exceeded": 1,
    }
    assert handler.hits.get("/to-ftp") == 1 and handler.hits.get("/slow.png") == 1
    # The client left the drip after its 3 s deadline (the whole PNG would take ~10 minutes).
    for _ in range(100):
        if handler.drip_seconds:
            break
        time.sleep(0.1)
    assert len(handler.drip_seconds) == 1 and handler.drip_seconds[0] < 15, handler.drip_seconds
    status = pq.read_table(out / "m" / "00000.parquet").to_pydict()
    by_uid = dict(zip(status["uid"], status["error_message"], strict=True))
    assert by_uid["ok"] is None
    assert by_uid["file"].startswith("unsupported url scheme 'file'")
    assert by_uid["slow"].startswith("deadline of 3 s exceeded")

    # The download embeds (its shard's sample count agrees with the chunk's _SUCCESS); once the shard
    # is cut, the chunk is an error naming it (it used to drop out of the KB's shard list unsaid).
    embed(kb, ws)
    assert record(Workspace(ws).kb_stage_record("dl_limits", "embed"))["images"] == 1
    shard = out / "m" / "00000.tar"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    proc = embed(kb, ws, check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert f"downloaded chunk {out / 'm'} is damaged" in line and "retformer download" in line, line


# ------------------------------------------------------------------------------------ 4. imagefolder
def test_imagefolder_text_named_png_is_skipped_and_an_empty_class_folder_named(tmp_path):
    """An imagefolder with a text file named `x.png` among the training images and an empty class
    folder under test/: `retformer shards --dataset` exits 0 (it used to end in UnidentifiedImageError),
    counts the file as `not_an_image` in dataset.json, leaves it out of the split, and warns naming the
    empty folder."""
    root = tmp_path / "folder"
    for split, counts in {"train": {"ant": 5, "bee": 5}, "test": {"ant": 2, "bee": 0}}.items():
        for cls, n in counts.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"img{i}.png").write_bytes(png_bytes(i + len(cls), 12))
    (root / "train" / "ant" / "x.png").write_text("this is not an image\n")
    ds = write_manifest(
        tmp_path / "bugs.yaml",
        {"name": "bugs", "kind": "imagefolder", "root": str(root), "val_fraction": 0.2, "shard_size": 50},
    )
    ws = tmp_path / "work"
    proc = run_cli("shards", "--dataset", str(ds), "--workdir", str(ws))
    assert "Traceback" not in proc.stderr
    assert f"class folder {root / 'test' / 'bee'} has no images" in proc.stderr, proc.stderr
    assert "1 not_an_image" in proc.stderr
    info = record(Workspace(ws).dataset_info("bugs"))
    skipped = info["split_notes"]["skipped_files"]
    assert skipped["counts"] == {"not_an_image": 1}
    assert skipped["examples"]["not_an_image"] == [str(root / "train" / "ant" / "x.png")]
    assert info["splits"]["train"] + info["splits"]["val"] == 10 and info["splits"]["test"] == 2


def test_imagefolder_broken_bmp_is_one_error_naming_the_file(tmp_path):
    """A BMP whose header Pillow recognises but whose pixel data is cut short: `retformer shards`
    exits 1 with one error line naming the file (it used to print Pillow's "image file is truncated"
    without saying which of the folder's images), and leaves no complete-looking shard set."""
    import io

    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"img{i}.png").write_bytes(png_bytes(i + len(cls), 12))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="BMP")
    broken = root / "train" / "bee" / "cut.bmp"
    broken.write_bytes(buf.getvalue()[:200])
    ds = write_manifest(
        tmp_path / "cut.yaml",
        {"name": "cut", "kind": "imagefolder", "root": str(root), "val_fraction": 0, "shard_size": 50},
    )
    ws = tmp_path / "work"
    proc = run_cli("shards", "--dataset", str(ds), "--workdir", str(ws), check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert str(broken) in line and "cannot be decoded" in line, line
    assert not list(ws.rglob("_SUCCESS-*.json")), list(ws.rglob("*"))


def test_imagefolder_bmp_and_gif_bombs_are_skipped_by_reason(tmp_path):
    """Issue 17 (8): a BMP and a GIF whose headers claim 50000 x 50000 pixels (a few dozen bytes each).
    `retformer shards` re-encodes such formats, so it decoded them: a DecompressionBombError traceback.
    Now they are skipped at the folder scan and counted as `decompression_bomb`, like a PNG/JPEG bomb
    at embed, and the shards hold the other images."""
    import io
    import struct

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"img{i}.png").write_bytes(png_bytes(i + len(cls), 12))
    bmp, gif = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (4, 4)).save(bmp, format="BMP")
    Image.new("P", (4, 4)).save(gif, format="GIF")
    bmp_bytes, gif_bytes = bytearray(bmp.getvalue()), bytearray(gif.getvalue())
    struct.pack_into("<ii", bmp_bytes, 18, 50000, 50000)  # BITMAPINFOHEADER width, height
    struct.pack_into("<HH", gif_bytes, 6, 50000, 50000)  # logical screen width, height
    (root / "train" / "bee" / "bomb.bmp").write_bytes(bytes(bmp_bytes))
    (root / "train" / "ant" / "bomb.gif").write_bytes(bytes(gif_bytes))
    ds = write_manifest(
        tmp_path / "bomb.yaml",
        {"name": "bomb", "kind": "imagefolder", "root": str(root), "val_fraction": 0, "shard_size": 50},
    )
    ws = tmp_path / "work"
    proc = run_cli("shards", "--dataset", str(ds), "--workdir", str(ws), check=False)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == [] and "2 decompression_bomb" in proc.stderr, proc.stderr
    info = record(Workspace(ws).dataset_info("bomb"))
    assert info["split_notes"]["skipped_files"]["counts"] == {"decompression_bomb": 2}
    assert info["splits"] == {"train": 6, "test": 6}


# -------------------------------------------------------------------------------- 5. embed options
@needs_fmnist
def test_bad_embed_option_fails_before_any_kb_shard_is_built(small_manifests, tmp_path):
    """`embed` with `embed.batch_size: 0` in a KB built from a dataset: one error naming the key, and
    no KB shard written (the check used to come after building the KB's shards)."""
    spec = yaml.safe_load(small_manifests["kb"].read_text())
    spec["embed"] = {"batch_size": 0}
    kb = write_manifest(tmp_path / "bad_embed.yaml", spec)
    ws = tmp_path / "work"
    proc = embed(kb, ws, check=False)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "batch_size" in line, line
    assert not Workspace(ws).kb_shards(spec["name"]).exists()


# ------------------------------------------------------- 6. issue 17: the parts are the shard set's
def _shard_uids(s: int) -> list[str]:
    return [f"u{s}_{i}" for i in range(20)]


@pytest.fixture(scope="module")
def embedded_user_kb(tmp_path_factory) -> Path:
    """A user KB of three 20-sample shards (s000-s002.tar), embedded once through the CLI; each test
    works on a copy (`_copy_user_kb`): copytree keeps the mtimes, so the parts stay current."""
    root = tmp_path_factory.mktemp("user_kb17")
    for s in range(3):
        write_user_shard(root / "src" / f"s{s:03d}.tar", _shard_uids(s), start=s * 20)
    embed(user_kb(root, "ukb", root / "src"), root / "work")
    return root


def _copy_user_kb(fixture_root: Path, tmp_path: Path) -> tuple[Path, Path, Workspace]:
    """(KB manifest, workdir, workspace) of a copy of `embedded_user_kb` under `tmp_path`."""
    shutil.copytree(fixture_root / "src", tmp_path / "src")
    shutil.copytree(fixture_root / "work", tmp_path / "work")
    return user_kb(tmp_path, "ukb", tmp_path / "src"), tmp_path / "work", Workspace(tmp_path / "work")


def _index(kb: Path, ws: Path, *more: str):
    return run_cli("index", "--kb", str(kb), *more, "--workdir", str(ws), check=False)


@pytest.mark.slow  # shares a real embed of a user KB (~25 s of set-up) with the slow take-down tests
def test_takedown_removes_the_parts_of_vanished_shards(embedded_user_kb, tmp_path):
    """Issue 17 (1): a shard deleted from a user KB (its images taken down). Before: embed kept the
    vanished shard's part, index read every part in the folder and indexed 60 vectors for a 40-sample
    KB, exit 0. Now index refuses the folder with one line naming the stale part, the rerun embed
    removes it (the folder holds exactly the current set's parts), and the index has the 40."""
    kb, ws_root, ws = _copy_user_kb(embedded_user_kb, tmp_path)
    (tmp_path / "src" / "s002.tar").unlink()

    proc = _index(kb, ws_root)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "1 part(s) belong to no shard" in line and "part-s002.parquet" in line, line
    assert "retformer embed --kb ukb" in line, line

    embed(kb, ws_root)
    assert [p.name for p in list_parts(ws.kb_embeddings("ukb"))] == ["part-s000.parquet", "part-s001.parquet"]
    assert record(ws.kb_stage_record("ukb", "embed"))["images"] == 40
    proc = _index(kb, ws_root)
    assert proc.returncode == 0, proc.stderr
    index = record(ws.kb_index("ukb") / "index.json")
    assert index["n"] == 40 and "partial" not in index
    assert [p["name"] for p in index["parts"]] == ["part-s000.parquet", "part-s001.parquet"]


@pytest.mark.slow  # shares a real embed of a user KB (~25 s of set-up) with the slow take-down tests
def test_duplicate_uid_in_a_kb_is_one_error_naming_uid_and_shards(embedded_user_kb, tmp_path):
    """Issue 17 (1): README says a uid is unique in a KB; nothing checked it. A fourth shard repeating
    the uid `u0_3` of s000.tar: embed used to exit 0 (and index to hold both rows). Now embed exits 1
    with one line naming the uid and both shards, and index refuses the same KB."""
    kb, ws_root, _ = _copy_user_kb(embedded_user_kb, tmp_path)
    write_user_shard(tmp_path / "src" / "s003.tar", ["new_0", "u0_3", "new_2"], start=60)

    proc = embed(kb, ws_root, check=False)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "uid 'u0_3'" in line and "s000.tar" in line and "s003.tar" in line, line
    proc = _index(kb, ws_root)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "uid 'u0_3'" in line, line


@pytest.mark.slow  # shares a real embed of a user KB (~25 s of set-up) with the slow take-down tests
def test_index_refuses_a_half_embedded_kb_unless_allow_partial(embedded_user_kb, tmp_path):
    """Issue 17 (3): an embed killed (SIGKILL, the kill matrix's hook) after 2 of 3 parts. Before:
    `retformer index` built a 40-of-60-vector index, exit 0, no word. Now it exits 1 with one line
    saying how many shards have no part; `--allow-partial` indexes the 40 and index.json says so."""
    kb, ws_root, ws = _copy_user_kb(embedded_user_kb, tmp_path)
    emb = ws.kb_embeddings("ukb")
    for name in ("part-s001.parquet", "part-s002.parquet"):
        (emb / name).unlink()
    env_kill = {"RETFORMER_KILL_AT": f"rename:{emb}/part-s002.parquet"}
    cmd = [
        sys.executable,
        "-m",
        "retformer.pipelines.cli",
        "embed",
        "--kb",
        str(kb),
        "--workdir",
        str(ws_root),
    ]
    proc = subprocess.run(
        [*cmd, "--workers", "1"],
        cwd=REPO,
        env={**os.environ, **env_kill},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in list_parts(emb)) == ["part-s000.parquet", "part-s001.parquet"]

    proc = _index(kb, ws_root)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "1 of 3 shard(s) have no embeddings part" in line and "--allow-partial" in line, line
    assert not (ws.kb_index("ukb") / "index.json").exists()

    proc = _index(kb, ws_root, "--allow-partial")
    assert proc.returncode == 0, proc.stderr
    index = record(ws.kb_index("ukb") / "index.json")
    assert index["n"] == 40 and index["partial"] == {"shards": 3, "shards_without_part": 1}


@pytest.mark.slow
def test_test_images_taken_down_leave_the_evaluation(embedded_user_kb, tmp_path):
    """Issue 17 (1), the test folder: an imagefolder dataset with 12 test images in 3 shards of 4,
    trained and evaluated against the user KB; 4 test images deleted and `retformer shards --dataset`
    rerun (2 test shards left). Before: the third shard's part stayed, neighbors did not re-embed (its
    records still matched), train evaluated 12 images, all exit 0. Now train refuses the split with one
    line until neighbors has re-embedded it (removing the vanished shard's part), then evaluates 8."""
    kb, ws_root, ws = _copy_user_kb(embedded_user_kb, tmp_path)
    root = tmp_path / "folder"
    for split, n in {"train": 8, "test": 6}.items():
        for c, cls in enumerate(("ant", "bee")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"img{i}.png").write_bytes(png_bytes(100 * c + 10 * len(split) + i, 12))
    ds = write_manifest(
        tmp_path / "folder17.yaml",
        {"name": "folder17", "kind": "imagefolder", "root": str(root), "val_fraction": 0.25, "shard_size": 4},
    )
    exp = write_manifest(
        tmp_path / "exp17.yaml",
        {
            "name": "exp17",
            "k": 4,
            "eval_split": "test",
            "methods": ["retformer", "mlp_only"],
            "model": {"width": 16, "depth": 1, "heads": 2},
            "train": {"epochs": 1, "batch_size": 8, "seed": 0},
        },
    )
    common = ["--workdir", str(ws_root)]
    pair = ["--dataset", str(ds), "--kb", str(kb)]
    train = ["train", *pair, "--experiment", str(exp), "--run", "r17", "--force", *common]
    run_cli("shards", "--dataset", str(ds), *common)
    run_cli("index", "--kb", str(kb), *common)
    run_cli("neighbors", *pair, *common)
    run_cli(*train)
    assert record(ws.run_dir("r17") / "eval.json")["methods"]["mlp_only"]["num_samples"] == 12

    for i in range(4):
        (root / "test" / "bee" / f"img{i}.png").unlink()
    run_cli("shards", "--dataset", str(ds), *common)
    assert record(ws.dataset_info("folder17"))["splits"]["test"] == 8
    proc = run_cli(*train, check=False)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "split test" in line and "part-test-00002.parquet" in line and "retformer neighbors" in line, line

    run_cli("neighbors", *pair, *common)
    assert sorted(p.name for p in list_parts(ws.dataset_embeddings("folder17", "test"))) == [
        "part-test-00000.parquet",
        "part-test-00001.parquet",
    ]
    run_cli(*train)
    assert record(ws.run_dir("r17") / "eval.json")["methods"]["mlp_only"]["num_samples"] == 8


# Embeds and indexes a user KB, then index / neighbors / predict per damage (~30 s, 2 cores): slow tier.
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_faiss_shard_is_rebuilt_by_index_and_one_line_elsewhere(embedded_user_kb, tmp_path, damage):
    """Issue 17 (6): a faiss shard cut to 1000 bytes, or overwritten with random bytes of its size.
    Before: `retformer index` said the index was complete and up to date (only the file's presence was
    checked) and neighbors / predict printed faiss's 140-165-line traceback. Now index.json records
    each shard's size and SHA-256: `retformer index` rebuilds the damaged shard (the same bytes as
    before), and a reader (ShardedIndex.load: neighbors, predict) raises one line naming the file."""
    from retformer.kb_builder.index.search import ShardedIndex

    kb, ws_root, ws = _copy_user_kb(embedded_user_kb, tmp_path)
    assert _index(kb, ws_root).returncode == 0
    index_dir = ws.kb_index("ukb")
    (shard,) = record(index_dir / "index.json")["shards"]
    path = index_dir / shard["file"]
    good = path.read_bytes()
    assert shard["bytes"] == len(good) and len(shard["sha256"]) == 64
    if damage == "truncated":
        path.write_bytes(good[:1000])
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes())

    with pytest.raises(UserError, match=r"damaged index shard: .*shard-00000\.faissindex") as err:
        ShardedIndex.load(index_dir)
    assert "\n" not in str(err.value) and "rerun `retformer index`" in str(err.value)

    proc = _index(kb, ws_root)
    assert proc.returncode == 0, proc.stderr
    assert "rebuilding it" in proc.stderr and "Traceback" not in proc.stderr
    assert path.read_bytes() == good
    assert ShardedIndex.load(index_dir).ntotal == 60


@pytest.mark.slow
def test_a_label_outside_int32_is_that_samples_skip_reason(embedded_user_kb, tmp_path):
    """Issue 17 (9): one KB sample whose json `label` is 2**31. Before: the part's int32 label column
    overflowed and the whole shard failed at embed (an OverflowError traceback, exit 1). Now that one
    sample is skipped as `label_out_of_range` and the shard's other samples are embedded."""
    kb, ws_root, ws = _copy_user_kb(embedded_user_kb, tmp_path)
    shard = write_user_shard(tmp_path / "src" / "s003.tar", _shard_uids(3), start=60)
    with tarfile.open(shard) as tar:  # the same shard with sample 5's label set to 2**31
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "s000065.json":
                data = json.dumps({"uid": "u3_5", "label": 2**31, "source": "user"}).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    proc = embed(kb, ws_root, check=False)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == []
    stage = record(ws.kb_stage_record("ukb", "embed"))
    assert stage["images"] == 79 and stage["skipped"] == {"label_out_of_range": 1}, stage
    assert "u3_5" not in read_embeddings(ws.kb_embeddings("ukb")).uid.tolist()


# -------------------------------------------------------------------- 7. issue 17: predict's inputs
def test_predict_input_files_are_capped(tmp_path):
    """Issue 17 (10): an input read had no size cap (`retformer predict RUN /dev/zero` read until
    MemoryError). Now a file over MAX_INPUT_BYTES (a sparse file: known by its size, never read) and a
    device that never ends (read up to the cap) are each one skipped input with the reason."""
    from retformer.pipelines.use.inputs import MAX_INPUT_BYTES, iter_inputs

    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)
    small = tmp_path / "ok.png"
    small.write_bytes(png_bytes(0))
    (big, ok) = list(iter_inputs([sparse, small]))
    assert big.data is None and big.error is not None and "larger than 256 MiB" in big.error, big
    assert ok.error is None and ok.data == small.read_bytes()
    (zero,) = list(iter_inputs(["/dev/zero"]))  # after the sparse file: the old code never ends here
    assert zero.data is None and "larger than 256 MiB" in (zero.error or ""), zero.error


def test_predict_holds_no_input_bytes_once_decoded(monkeypatch):
    """Issue 17 (10): `predict_images` kept each input (its raw bytes) until its chunk of up to 1,024
    was predicted: 200 PNGs of 6.75 MB were +1.3 GB RSS (2.68 GB peak against 1.36 GB for one image).
    Now a chunk holds names, uids and preprocessed pixels: at most the input being decoded is alive
    (measured through the CLI on the same 200 PNGs: 1.37 GB peak)."""
    import weakref

    from retformer.pipelines.use.inputs import ImageInput
    from retformer.pipelines.use.predictor import Predictor

    predictor = Predictor.__new__(Predictor)  # the loop only: decoding, encoder and retrieval stubbed
    predictor.finetuned, predictor.batch_size, predictor.info = False, 8, {"result": "stub"}
    monkeypatch.setattr(predictor, "_pixels", lambda data: (np.zeros((2, 2, 3), np.uint8), None))
    monkeypatch.setattr(predictor, "_encode", lambda px: (np.zeros((len(px), 4), np.float16), None))
    monkeypatch.setattr(
        predictor,
        "records",
        lambda z, uids, names, neighbors, images=None, labels=None: [{"path": n} for n in names],
    )
    alive: list[weakref.ref] = []
    most = 0

    def inputs():
        nonlocal most
        for i in range(2500):
            most = max(most, sum(r() is not None for r in alive[-1100:]))
            item = ImageInput(f"img{i}.png", bytes(16))
            alive.append(weakref.ref(item))
            yield item
            del item

    out = list(predictor.predict_images(inputs()))
    assert [r["path"] for r in out] == [f"img{i}.png" for i in range(2500)]
    assert most <= 2, most


# ----------------------------------------------------------------- 8. issue 17: EXIF orientation
def test_exif_orientation_is_applied_where_images_are_decoded(tmp_path):
    """Issue 17 (low): a photo stored sideways with EXIF orientation 6 (as phones write them) was
    embedded and predicted sideways (`retformer predict` on such a PNG and on its upright copy gave
    different neighbors). Now decode_image (embed's loader, predict), an imagefolder's re-encoded
    TIFF (`retformer shards`) see the upright pixels (the fine-tune image reader calls the same
    `upright`)."""
    from retformer.artifacts.decode import decode_image
    from retformer.kb_builder.datasets.base import DatasetSplit

    rng = np.random.default_rng(3)
    upright = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to show"
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    png, tif = io.BytesIO(), tmp_path / "sideways.tif"
    sideways.save(png, format="PNG", exif=exif)
    sideways.save(tif, format="TIFF", exif=exif)

    decoded, reason = decode_image(png.getvalue())
    assert reason is None and decoded.size == (40, 24)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))
    reencoded = DatasetSplit(["t-0"], [0], paths=[tif]).image_source(0)
    assert np.array_equal(np.asarray(reencoded.convert("RGB")), np.asarray(upright))
