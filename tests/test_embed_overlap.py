"""The embed stage's overlap: the loader thread (num_workers=0) and the text tower's thread give the
bytes a serial run gives, and their errors reach the task."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from retformer.artifacts.embeddings_io import read_embeddings
from retformer.artifacts.shards import Sample, write_shards
from retformer.kb_builder import embed
from retformer.kb_builder.embed.loader import _in_thread
from retformer.kb_builder.kb_schema import ImageEncoder, TextEncoder

IMAGE_SPEC = ImageEncoder(name="efficientnet_lite0", image_size=32)
TEXT_SPEC = TextEncoder(name="minilm")


class _Inline:
    """A stand-in for the text thread's executor that runs each job at once, in the caller."""

    def submit(self, fn, *args):
        fut: Future[None] = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    captions = [f"a photo of thing {i % 7}" for i in range(40)] + [None] * 3
    samples = [
        Sample(f"s{i}", rng.integers(0, 256, (28, 28), dtype=np.uint8), c, i % 10, "world")
        for i, c in enumerate(captions)
    ]
    root = tmp_path_factory.mktemp("overlap")
    return write_shards(samples, root / "shards", "world", len(samples))[0]


def _embed(shard: Path, out: Path, workers: int) -> tuple[dict, object]:
    stats = embed.embed_shard((shard, "w-0"), out, IMAGE_SPEC, TEXT_SPEC, batch_size=8, num_workers=workers)
    return stats, read_embeddings(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_serial_bytes(shard, tmp_path, monkeypatch, threads):
    """Text thread + loader thread vs the text forward inline: the same vectors, bit for bit."""
    torch.set_num_threads(threads)
    try:
        stats, threaded = _embed(shard, tmp_path / "threaded", 0)
        monkeypatch.setattr(embed, "_text_pool", _Inline)
        _, serial = _embed(shard, tmp_path / "serial", 0)
    finally:
        torch.set_num_threads(1)
    assert stats["images"] == 43 and stats["missing_caption"] == 3
    assert threaded.image_emb.tobytes() == serial.image_emb.tobytes()
    assert threaded.text_emb.tobytes() == serial.text_emb.tobytes()
    assert list(threaded.uid) == list(serial.uid) and list(threaded.has_text) == list(serial.has_text)
    assert {"wait_for_text", "text_forward", "wait_for_loader"} <= set(stats["timings"])


def test_text_thread_error_reaches_the_task(shard, tmp_path, monkeypatch):
    """A text forward that raises fails the shard, with no part written."""

    def boom(self, captions):
        raise RuntimeError("text tower failed")

    monkeypatch.setattr(embed._TextCache, "add", boom)
    with pytest.raises(RuntimeError, match="text tower failed"):
        _embed(shard, tmp_path / "out", 0)
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert not [t for t in threading.enumerate() if t.name.startswith(("embed-text", "embed-loader"))]


def test_loader_thread_keeps_order_raises_and_stops():
    """_in_thread: the items in order; the producer's exception in the consumer; an early close
    stops the producer."""
    assert list(_in_thread(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in _in_thread(failing(), 2):
            got.append(item)
    assert got == [1]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = _in_thread(endless(), 2)
    assert next(it) == 0
    it.close()
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 4  # at most the queue's depth ahead, and nothing after close
    assert not [t for t in threading.enumerate() if t.name == "embed-loader"]


@pytest.mark.parametrize(
    ("side", "n"),
    [pytest.param(64, 256, marks=pytest.mark.slow), pytest.param(64, 196, marks=pytest.mark.slow), (32, 300)],
)  # the 64-px cases ~13 s each: the slow tier; the fast tier keeps the 32-px one (the same code path)
def test_cpu_chunks_give_the_whole_batch_bytes(side, n):
    """Lite0's CPU forward in cache-sized chunks (remainder < 16 merged): the same bits as one
    forward of the whole batch, at one and at two threads."""
    from retformer.kb_builder.encoders import build_image_encoder
    from retformer.kb_builder.encoders.efficientnet_lite import cpu_chunks

    enc = build_image_encoder(ImageEncoder(name="efficientnet_lite0", image_size=side))
    assert len(cpu_chunks(n, side)) > 1 and min(cpu_chunks(n, side)) >= 16
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            chunked = enc.encode(x)
            with torch.inference_mode():
                whole = enc._normalise(enc._forward(x.contiguous(memory_format=torch.channels_last)))
            assert chunked.numpy().tobytes() == whole.numpy().tobytes()
    finally:
        torch.set_num_threads(1)
