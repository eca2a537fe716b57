"""The neighbor browser (`retformer browse`, pipelines/browse.py) on the small end-to-end run
(tests/conftest.py's `e2e_workspace`: Fashion-MNIST-LT slice, KB = world pool + training split, run
`tiny`, k = 4 of the neighbor tables' 8, a depth-1 RetFormer with image and text streams).

The server is the real command in a subprocess. The API answers are checked against the run's own
files: eval.json, the per-sample predictions, the stored neighbor tables and the shards' image bytes.
The page itself, in headless Chromium, is tests/test_browse_page.py; the server's behaviour towards
hostile clients tests/test_browse_server.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import read_shard
from retformer.artifacts.workspace import Workspace
from retformer.trainer.checkpoint import load_model
from retformer.trainer.evaluate import shot_group_of
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.train import predict
from tests.conftest import needs_fmnist
from tests.helpers import REPO, run_cli
from tests.test_browse_retrieval import direct, effects_of

pytestmark = needs_fmnist
torch.set_num_threads(1)

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8
URL_LINE = re.compile(r"at (http://127\.0\.0\.1:\d+/)")
START_TIMEOUT = 300  # s: loading torch and the run on two busy shared cores


# ------------------------------------------------------------------------------------ fixtures
class Server:
    """`retformer browse` in a subprocess; its output lines are collected by a reader thread."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retformer.pipelines.cli", "browse", *args],
            cwd=REPO,
            env=env,
            # As a background job of a non-interactive shell starts it (CI): SIGINT ignored.
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopped as one, never left behind
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def url(self, timeout: float = START_TIMEOUT) -> str:
        """The URL the server printed; fails with its output when it exits or stays silent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := URL_LINE.search(line):
                    return m.group(1)
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"retformer browse exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.2)
        pytest.fail(f"no URL from retformer browse within {timeout} s:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        """Ctrl+C (SIGINT to its group), then SIGKILL if it does not stop within 120 s (the interpreter's
        teardown after torch and faiss takes seconds, more on busy shared cores); its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(e2e_workspace: Path):
    """The real command on the small run, on a free port; stopped with Ctrl+C, which must end it with
    exit status 0 (a clean stop: no traceback, no port left bound)."""
    srv = Server(RUN, "--workdir", str(e2e_workspace), "--port", "0")
    try:
        srv.url()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, "\n".join(srv.lines)


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=120) as res:
            return res.status, res.headers["Content-Type"], res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> dict:
    status, ctype, body = get(url)
    assert status == 200 and ctype == "application/json", (url, status, body[:200])
    return json.loads(body)


def evaluated(ws: Path, method: str) -> list[dict]:
    """The run's evaluation, sample by sample, as the reference: the reloaded model through the
    evaluation's own call (`trainer.train.predict`) on the stored test neighbor tables (test_predict.py
    proves this path reproduces eval.json), with each sample's shot group from eval.json."""
    report = json.loads((ws / "runs" / RUN / "eval.json").read_text())
    f = load_retrieval_features(Workspace(ws), DATASET, KB, TABLE_K, "test").subset_k(K)
    logits = predict(load_model(ws / "runs" / RUN / f"{method}.pt"), f)
    pred, shot = logits.argmax(dim=1).tolist(), shot_group_of(report["shot_split"], logits.shape[1])
    return [
        {"uid": u, "pred": p, "label": y, "correct": p == y, "shot": shot[y]}
        for u, p, y in zip(f.uids, pred, f.labels.tolist(), strict=True)
    ]


def shard_images(shard_dir: Path) -> dict[str, bytes]:
    """uid -> image bytes of every sample of a shard folder (the reference reader)."""
    return {r["uid"]: r["image_bytes"] for s in sorted(shard_dir.glob("*.tar")) for r in read_shard(s)}


# ------------------------------------------------------------------------------------ the API
def test_api_serves_the_runs_predictions_neighbors_attention_and_images(e2e_workspace: Path, server):
    """The JSON API against the run's files: /api/run has the eval split's size and eval.json's top-1;
    /api/queries lists every test sample with the class the run's evaluation gave it, and
    its class / correct / shot filters select exactly the matching samples, its s and image-only
    prediction are the model's own and effect=helped / hurt / same selects exactly the images where
    the two predictions' correctness differs that way; /api/query/<i> gives the k
    neighbors of the stored test table (first k, same order, same similarity) and, per stream and
    layer, attention weights that with the class token's and query slot's share sum to 1; /img/ serves
    the shards' exact bytes for a test image and a KB neighbor; bad requests get 400 / 404."""
    url = server.url()
    report = json.loads((e2e_workspace / "runs" / RUN / "eval.json").read_text())
    run = get_json(url + "api/run")
    assert run["run"] == RUN and run["method"] == "retformer" and run["k"] == K
    assert run["num_samples"] == report["eval_size"] == 200 and run["split"] == "test"
    assert run["top1"] == pytest.approx(report["methods"]["retformer"]["top1"], abs=1e-4)
    assert run["attention"] == ["image", "text"] and len(run["classes"]) == 10

    every = get_json(url + "api/queries?limit=1000")
    assert every["total"] == 200 and len(every["items"]) == 200
    ref = evaluated(e2e_workspace, "retformer")
    assert [{k: q[k] for k in ref[0]} for q in every["items"]] == ref
    wrong = get_json(url + "api/queries?correct=false&limit=1000")
    assert [q["i"] for q in wrong["items"]] == [i for i, r in enumerate(ref) if not r["correct"]]
    few = get_json(url + "api/queries?shot=few&class=9&limit=1000")
    assert [q["i"] for q in few["items"]] == [
        i for i, r in enumerate(ref) if r["shot"] == "few" and r["label"] == 9
    ]
    assert wrong["total"] > 0 and few["total"] > 0
    assert all(q["label_name"] == run["classes"][9]["name"] for q in few["items"])
    page = get_json(url + "api/queries?offset=190&limit=50")
    assert page["total"] == 200 and [q["i"] for q in page["items"]] == list(range(190, 200))
    # the retrieval columns (issue 20): equal to trainer.model's own calls (tests/test_browse_retrieval.py)
    direct_ref = direct(e2e_workspace, load_model(e2e_workspace / "runs" / RUN / "retformer.pt"))
    assert [q["s"] for q in every["items"]] == pytest.approx(direct_ref["s"].tolist(), abs=1e-5)
    assert [q["image_pred"] for q in every["items"]] == direct_ref["image_pred"].tolist()
    assert all(q["retrieval_used"] for q in every["items"]) and run["rule"]["recipe"] == "paper"
    for effect, images in effects_of(direct_ref).items():
        assert [q["i"] for q in get_json(url + f"api/queries?effect={effect}&limit=1000")["items"]] == images
        assert run["effects"][effect] == len(images)

    table = pq.read_table(
        e2e_workspace / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}" / "test.parquet"
    ).to_pylist()
    stored = {r["uid"]: r for r in table}
    kb_bytes = shard_images(e2e_workspace / "kb" / KB / "shards")
    test_bytes = shard_images(e2e_workspace / "datasets" / DATASET / "shards")
    for item in (wrong["items"][0], every["items"][0], every["items"][-1]):
        q = get_json(url + f"api/query/{item['i']}")
        assert {k: q[k] for k in item} == item
        assert [n["kb_id"] for n in q["neighbors"]] == stored[q["uid"]]["nn_id"][:K]
        sims = [n["similarity"] for n in q["neighbors"]]
        assert sims == pytest.approx(stored[q["uid"]]["nn_score"][:K], abs=1e-5)
        assert q["top5"][0]["index"] == q["pred"] and len(q["top5"]) == 5
        assert set(q["attention"]) == {"image", "text"}
        for stream, layers in q["attention"].items():
            assert len(layers) == 1  # the tiny model's depth
            for layer in layers:
                assert len(layer["neighbors"]) == K and all(0 <= w <= 1 for w in layer["neighbors"])
                assert sum(layer["neighbors"]) + layer["cls"] + layer["query"] == pytest.approx(1, abs=1e-4)
            assert [n["attention"][stream] for n in q["neighbors"]] == [
                [layer["neighbors"][j] for layer in layers] for j in range(K)
            ]
        status, ctype, body = get(url + f"img/dataset/{q['uid']}")
        assert status == 200 and ctype == "image/png" and body == test_bytes[q["uid"]]
        for n in q["neighbors"]:
            status, ctype, body = get(url + f"img/kb/{n['kb_id']}")
            assert status == 200 and ctype == "image/png" and body == kb_bytes[n["uid"]]

    assert get(url + "api/query/200")[0] == 404
    assert get(url + "api/queries?correct=maybe")[0] == 400
    assert get(url + "api/queries?class=10")[0] == 400
    assert get(url + "api/queries?effect=better")[0] == 400
    assert get(url + "img/dataset/no-such-uid")[0] == 404
    assert get(url + "img/dataset/..%2F..%2Fetc%2Fpasswd")[0] == 404  # a uid, never a path
    assert get(url + "img/kb/999999")[0] == 404
    assert get(url + "nothing/here")[0] == 404
    status, ctype, body = get(url)
    assert status == 200 and ctype.startswith("text/html") and b"<script>" in body
    assert b"http://" not in body and b"https://" not in body  # nothing fetched from elsewhere


# ---------------------------------------------------------------------------- in-process paths
def test_predictions_without_the_runs_file_are_the_models_own(e2e_workspace: Path, tmp_path: Path):
    """A run folder without its predictions file (a copy of the model file alone) gets its predictions
    from the model on the stored neighbor tables, equal to the evaluation's sample by sample (the run
    folder itself is browsed with its predictions file where the run wrote one); a model without a
    fusion module (mlp_only) shows its neighbors without attention, never uses retrieval and is its
    own image-only prediction (no image helped or hurt); a port already taken is one
    UserError naming the address."""
    from retformer.pipelines.browse import BrowseRun
    from retformer.pipelines.browse_server import make_server

    copy = tmp_path / "runs" / "copy"
    copy.mkdir(parents=True)
    shutil.copy(e2e_workspace / "runs" / RUN / "retformer.pt", copy / "retformer.pt")
    browser = BrowseRun.open(copy, None, tmp_path)
    ref = evaluated(e2e_workspace, "retformer")
    assert "stored neighbor tables" in browser.predictions_source and browser.split == "test"
    assert browser.predictions.column("uid").to_pylist() == [r["uid"] for r in ref]
    assert browser.predictions.column("pred").to_pylist() == [r["pred"] for r in ref]
    saved = e2e_workspace / "runs" / RUN / "predictions" / "retformer.parquet"
    if saved.is_file():  # the run's own per-sample file is what the run folder itself is browsed with
        assert BrowseRun.open(RUN, None, e2e_workspace).predictions_source == str(saved)
    mlp = BrowseRun.open(e2e_workspace / "runs" / RUN, "mlp_only", e2e_workspace)
    q = mlp.query(0)  # no fusion module: no attention, the retrieved neighbors all the same
    assert mlp.attention_streams() == [] and q["attention"] == {} and len(q["neighbors"]) == K
    assert q["pred"] == evaluated(e2e_workspace, "mlp_only")[0]["pred"]
    # image-only already: never retrieval, its own prediction is L_I's, so no image is helped or hurt
    assert mlp.summary()["rule"] is None and mlp.summary()["effects"]["same"] == len(mlp.features)
    assert not q["retrieval_used"] and q["image_pred"] == q["pred"] and q["effect"] == "same"
    assert q["retrieval_reason"] == "no retrieval branch: the model reads the image alone"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            make_server(browser, "127.0.0.1", taken.getsockname()[1])


def test_browse_of_a_missing_run_is_one_error_line(e2e_workspace: Path):
    """`retformer browse` of a run that does not exist: exit 1, one `error:` line, no server."""
    proc = run_cli("browse", "no-such-run", "--workdir", str(e2e_workspace), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run not found: no-such-run")


def test_ctrl_c_stops_browse_started_with_sigint_ignored(e2e_workspace: Path) -> None:
    """Started with SIGINT ignored (a background job of a non-interactive shell, as CI runs it), Ctrl+C
    still stops the server with exit status 0; before, Python installed no KeyboardInterrupt there and
    the server ran until SIGKILL."""
    srv = Server(RUN, "--workdir", str(e2e_workspace), "--port", "0", sigint_ignored=True)
    try:
        srv.url()
    finally:
        code = srv.stop()
    assert code == 0, "\n".join(srv.lines)
