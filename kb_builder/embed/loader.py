"""The loader of one shard: read, decode and the PIL half of the transform, in torch DataLoader workers."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from retformer.artifacts.decode import clean_caption, decode_image, to_rgb
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import UID_RE, to_record
from retformer.artifacts.tar_reader import iter_shard_files

# Loader workers are forked: no pickling of the transform and ~10 ms per worker, where "spawn"
# re-imports torch in every worker of every shard (~2 s each). Linux only: fork is unsafe on macOS.
_LOADER_CONTEXT = "fork" if sys.platform.startswith("linux") else None


def _identity(batch: Any) -> Any:
    return batch


_LABEL_RANGE = range(-(2**31), 2**31)  # the part's label column is int32


def _as_label(value: Any) -> int | None:
    """The sample's label, -1 when it has none or it is not a number, None when it is a number outside
    int32 (the sample is skipped as `label_out_of_range`: one such json failed the whole shard)."""
    try:
        label = -1 if value is None else int(value)
    except (TypeError, ValueError):
        return -1
    except OverflowError:  # float("inf")
        return None
    return label if label in _LABEL_RANGE else None


class ShardBatches(IterableDataset):
    """An IterableDataset over one shard that yields one batch per block of `batch_size` consecutive
    samples: {"index", "pixels" (uint8 [n,H,W,3] or float [n,3,H,W]), "uid", "caption", "label",
    "source", "skipped" [(index, uid, reason)], "seconds"}.

    Loader worker w of W takes blocks w, w+W, ...; every sample carries its index in the shard, so
    the task restores shard order whatever order batches arrive in. A bad sample becomes a skip
    marker with a reason; nothing a sample contains raises. What is wrong with the shard itself (cut
    short, corrupt, a uid outside `[A-Za-z0-9_-]`) ends the iteration with one `{"error": message}`
    item: a loader worker's exception would reach the task wrapped in a multi-line traceback.
    """

    def __init__(
        self,
        shard: Path,
        batch_size: int,
        image_size: int,
        split: tuple[Callable[[Any], Any], tuple, tuple] | None,
        preprocess: Callable[[Any], Any],
    ) -> None:
        self.shard = Path(shard)
        self.batch_size = batch_size
        self.image_size = image_size
        self.pil_steps = split[0] if split else None
        # Set by a task that reads the batches in a thread of its own process (num_workers=0, CPU): the
        # batched ToTensor/Normalize then runs here too, off the forward's thread. Loader processes
        # leave it to the task (uint8 pixels are 4x less to send).
        self.normalise: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        size = self.batch_size

        def mine(i: int) -> bool:
            return (i // size) % workers == worker

        block: list[tuple[int, str, dict[str, bytes]]] = []
        current = -1
        # CPU time of this thread spent on the batch (reading its bytes included), for the stats.
        clock = time.thread_time()
        try:
            for index, key, files in iter_shard_files(self.shard, mine):
                if files is None:
                    continue
                if index // size != current and block:
                    batch = self._batch(block)
                    batch["seconds"] = time.thread_time() - clock
                    yield batch
                    clock = time.thread_time()
                    block = []
                current = index // size
                block.append((index, key, files))
            if block:
                batch = self._batch(block)
                batch["seconds"] = time.thread_time() - clock
                yield batch
        except UserError as exc:
            yield {"error": str(exc)}

    def _sample(self, key: str, files: dict[str, bytes]) -> tuple[dict[str, Any] | None, Any, str | None]:
        """(record, pixels, None) or (record or None, None, skip reason)."""
        if "txt" in files:
            try:
                files["txt"].decode("utf-8")
            except UnicodeDecodeError:  # keep the sample, not the undecodable bytes
                files["txt"] = files["txt"].decode("utf-8", "replace").encode("utf-8")
        try:
            rec = to_record(key, files)
        except Exception:  # noqa: BLE001 - unreadable json: skip this sample, not the shard
            return None, None, "bad_metadata"
        if _as_label(rec.get("label")) is None:
            return rec, None, "label_out_of_range"
        if rec["image_bytes"] is None:
            return rec, None, "missing_image"
        try:
            img, reason = decode_image(rec["image_bytes"])
        except Exception:  # noqa: BLE001 - Pillow plugins raise more than decode_image expects
            img, reason = None, "decode_failed"
        if img is None:
            return rec, None, reason or "unknown"
        side = self.image_size
        try:
            if self.pil_steps is None:
                px = self.preprocess(img)
                ok = tuple(px.shape) == (3, side, side)
            else:
                px = np.asarray(to_rgb(self.pil_steps(img)), dtype=np.uint8)
                ok = px.shape == (side, side, 3)
        except Exception:  # noqa: BLE001 - a sample the transform rejects is skipped, not fatal
            return rec, None, "preprocess_failed"
        # A batch is one tensor: an output of another size would break it for every sample.
        return (rec, px, None) if ok else (rec, None, "preprocess_failed")

    def _batch(self, block: list[tuple[int, str, dict[str, bytes]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"index": [], "uid": [], "caption": [], "label": [], "source": []}
        pixels: list[Any] = []
        skipped: list[tuple[int, str, str]] = []
        for index, key, files in block:
            rec, px, reason = self._sample(key, files)
            if rec is not None and not UID_RE.fullmatch(str(rec["uid"])):
                raise UserError(
                    f"shard {self.shard}: sample {index} has uid {str(rec['uid'])!r}, outside the "
                    "documented [A-Za-z0-9_-] (uids name the rows of the KB and of the neighbor tables)"
                )
            if px is None:
                skipped.append((index, str(rec["uid"]) if rec else key, reason or "unknown"))
                continue
            out["index"].append(index)
            out["uid"].append(str(rec["uid"]))
            out["caption"].append(clean_caption(rec.get("caption")))
            out["label"].append(_as_label(rec.get("label")))
            out["source"].append(str(rec.get("source") or ""))
            pixels.append(px)
        s = self.image_size
        if self.pil_steps is None:
            out["pixels"] = torch.stack(pixels) if pixels else torch.zeros((0, 3, s, s))
        else:
            out["pixels"] = torch.from_numpy(np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.uint8))
            if self.normalise is not None:
                out["pixels"] = self.normalise(out["pixels"])
                out["normalised"] = True
        out["skipped"] = skipped
        return out


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (a Dask worker) start loader processes.

    multiprocessing refuses children in daemonic processes so that they cannot be orphaned; torch's
    loader workers watch their parent and exit when it dies, so the refusal does not apply to them.
    """
    proc = multiprocessing.current_process()
    was = proc._config.get("daemon")
    proc._config["daemon"] = False
    try:
        yield
    finally:
        proc._config["daemon"] = was


def iter_batches(
    dataset: Any, num_workers: int, prefetch_factor: int, pin_memory: bool
) -> Iterator[dict[str, Any]]:
    """The dataset's batches, from `num_workers` loader processes (0: a thread of this process, which
    reads and decodes the next batches while the caller's forward runs: torch and Pillow release the
    GIL in their kernels, so a one-thread task still uses a second core when one is idle)."""
    from torch.utils.data import DataLoader

    if num_workers == 0:  # the same code path, in a thread of this process
        yield from _in_thread(iter(dataset), prefetch_factor)
        return
    from PIL import Image

    Image.init()  # import every plugin before forking, not in each worker
    loader = DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        multiprocessing_context=_LOADER_CONTEXT,
    )
    with _children_allowed():
        it = iter(loader)
    yield from it


_DONE = object()


def _in_thread(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a daemon thread up to `depth` ahead of the consumer, in the same order.

    An exception in the producer is raised here, in the consumer. Closing this generator (the task
    stops early: a broken shard, a failed forward) stops the producer after its current item.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_DONE, exc))

    thread = threading.Thread(target=produce, name="embed-loader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:  # the producer has ended: its generator is not running any more
            close()
