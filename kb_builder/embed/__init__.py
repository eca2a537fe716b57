"""The embed stage: webdataset shards -> one embeddings Parquet part per shard.

Each shard is one task. A part is written under a temporary name and renamed when complete, so
the part's existence is its done-marker: a rerun embeds only the shards whose part is missing (or
stale, or unreadable). Bad samples are skipped and counted by reason; they never stop the run.

Inside a task, reading, decoding and the PIL half of the encoder's transform run in a torch
DataLoader over the shard (`num_workers` processes; 0 = in the task's own process) while the
task's process runs the encoders. Workers hand over uint8 HWC pixels; the ToTensor/Normalize half of
the transform runs once per batch on the encoder's device (4x less data to move, one vectorised op
instead of two per image). The result is bit-identical to `encoder.preprocess` per image.

Where the time goes (Fashion-MNIST shard, Lite0 at 64 px, one thread, CPU us per image; measured by
`bench/bench_embed.py`, figures in BENCHMARKS.md): tarfile's header parsing ~130 -> own parser
with json ~60-90; PNG decode ~66 (unchanged); torchvision resize + crop ~100 -> the same Pillow
calls without the wrappers ~64; per-image ToTensor + Normalize ~145 -> uint8 stack + batched ~50.
About 440 -> 275 us of input work against a ~2.8-3.5 ms forward.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from artifacts.atomic import pid_alive
from artifacts.embeddings_io import EmbeddingTable, write_embeddings_part
from artifacts.errors import UserError
from kb_builder.decode import clean_caption, decode_image, to_rgb

_ENCODERS: dict[str, Any] = {}

# The manifest's `embed:` section: what a user may tune, checked so that a typo is an error.
EMBED_OPTIONS = ("batch_size", "num_workers", "threads", "prefetch_factor", "device")
MAX_EXAMPLES = 5  # skipped uids kept per reason in the part's stats (for a human to look at)
# Loader workers are forked: no pickling of the transform and ~10 ms per worker, where "spawn"
# re-imports torch in every worker of every shard (~2 s each). Linux only: fork is unsafe on macOS.
_LOADER_CONTEXT = "fork" if sys.platform.startswith("linux") else None


# ------------------------------------------------------------------------------------- options
def embed_options(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Validated keyword options for `embed_shard` from a manifest's `embed:` section.

    `batch_size` (images per forward, default 256), `num_workers` (loader processes per task; default
    0 on a one-core worker, else a few), `threads` (torch threads of the task), `prefetch_factor`
    (batches each loader worker keeps ready, default 2), `device` ("cpu", "cuda", "cuda:1"; default:
    cuda when available).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(EMBED_OPTIONS))
    if unknown:
        raise UserError(
            f"embed: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(EMBED_OPTIONS)})"
        )
    out: dict[str, Any] = {}
    for key, minimum in (("batch_size", 1), ("num_workers", 0), ("threads", 1), ("prefetch_factor", 1)):
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"embed.{key} must be an integer >= {minimum}, got {value!r}")
        out[key] = value
    device = cfg.get("device")
    if device is not None:
        if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise UserError(f"embed.device must be cpu, cuda, cuda:N or mps, got {device!r}")
        out["device"] = device
    return out


def default_num_workers(device: str, threads: int | None = None) -> int:
    """Loader processes for one task: none when the task owns a single core (a CPU LocalCluster
    worker: a loader process would only steal the encoder's core), else a few."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        # The GPU computes; the CPU only feeds it: the host's cores shared between its GPUs.
        share = cores // max(1, torch.cuda.device_count())
        return max(0, min(8, share - 1))
    share = threads or torch.get_num_threads()
    if share <= 1 or cores <= 1:
        return 0
    # Decode + resize cost 5-20% of a CPU forward: one loader process per ~4 encoder threads.
    return min(4, max(1, share // 4))


# --------------------------------------------------------------------------------------- parts
def part_stem(shard: Path, shard_root: Path) -> str:
    """A unique, sortable part name for a shard: its path under the shards root with '/' -> '-'
    (img2dataset names the shards of every chunk folder 00000.tar, 00001.tar, ...)."""
    rel = Path(shard).resolve().relative_to(Path(shard_root).resolve())
    return "-".join(rel.with_suffix("").parts)


def part_path_for(stem: str, out_dir: Path) -> Path:
    """The embeddings part of a shard (sorted shard paths give sorted part names)."""
    return out_dir / f"part-{stem}.parquet"


def shard_fingerprint(shard: Path) -> str:
    """Size and mtime of a shard: a part made from an older shard of the same name is stale."""
    st = shard.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def part_stats(part: Path) -> dict[str, Any]:
    """The per-shard stats a finished part carries in its metadata ({} if it has none or is unreadable:
    an unreadable part is then recomputed, like a missing one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(part).metadata or {}
        meta = json.loads(md.get(b"meta", b"{}"))
    except (pa.ArrowInvalid, OSError, ValueError):
        return {}
    return meta.get("shard_stats", {})


def remove_leftovers(part: Path) -> list[Path]:
    """Delete `<part>.tmp-<pid>` files whose writer (a killed run on this host) is gone; return them.

    A live writer's file is kept: Dask may still be running an older attempt of the same task.
    """
    removed = []
    for tmp in part.parent.glob(f"{part.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or (int(pid) != os.getpid() and not pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# ---------------------------------------------------------------------------------- tar reader
_NUL_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksums(header: bytes) -> tuple[int, ...]:
    # The checksum field counts as 8 spaces; old writers summed signed bytes (tarfile accepts both).
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    if max(header) < 128:
        return (unsigned,)
    signed = 256 + sum(struct.unpack_from("148b", header)) + sum(struct.unpack_from("356b", header, 156))
    return unsigned, signed


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> <key>=<value>\n"; only the path matters to us.
    pos = 0
    path = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_shard_files(
    path: Path, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield (sample index, key, {extension: bytes}) per sample of a webdataset tar, in order.

    The files of a sample whose index `keep` rejects are skipped with a seek, never read (each loader
    worker reads only its own samples); they come back as None. Samples are grouped by key as
    `shards.read_shard` groups them. Header parsing is done here because tarfile's costs ~70 us a
    member (230 us a sample, more than decoding a small PNG); ustar, GNU long names and pax paths are
    handled. A truncated or corrupt shard raises a UserError naming it.
    """
    from kb_builder.shards import _split_name

    path = Path(path)
    index = -1
    key: str | None = None
    files: dict[str, bytes] | None = None
    long_name: str | None = None
    try:
        with open(path, "rb") as f:
            size_on_disk = os.fstat(f.fileno()).st_size
            while True:
                header = f.read(512)
                if not header or header == _NUL_BLOCK:
                    break  # end of archive (tarfile also accepts a missing end marker)
                if len(header) < 512:
                    raise ValueError("truncated header")
                if _tar_number(header[148:156]) not in _checksums(header):
                    raise ValueError(f"bad header checksum at byte {f.tell() - 512}")
                size = _tar_number(header[124:136])
                padded = (size + 511) & ~511
                start = f.tell()
                if start + size > size_on_disk:
                    raise ValueError(f"member at byte {start - 512} runs past the end of the file")
                kind = header[156:157]
                if kind in (b"L", b"x"):  # the next member's long name
                    data = f.read(padded)[:size]
                    name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
                    long_name = name or long_name
                    continue
                if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers, ...
                    f.seek(padded, 1)
                    long_name = None
                    continue
                if long_name is not None:
                    name, long_name = long_name, None
                else:
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                    if prefix:
                        name = prefix.decode("utf-8") + "/" + name
                sample_key, ext = _split_name(name)
                if sample_key != key:
                    if key is not None:
                        yield index, key, files
                    index += 1
                    key = sample_key
                    files = {} if keep is None or keep(index) else None
                if files is None:
                    f.seek(padded, 1)
                else:
                    files[ext] = f.read(size)
                    f.seek(padded - size, 1)
            if key is not None:
                yield index, key, files
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt or truncated shard {path}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror or exc}") from exc


# ------------------------------------------------------------------------------- preprocessing
def _resize_step(step: Any) -> Callable[[Any], Any]:
    """torchvision's Resize on a PIL image, minus ~40 us of per-call bookkeeping: the same output
    size rule (`_compute_resized_output_size`) and the same `Image.resize` call."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_modes_mapping

    size = [step.size] if isinstance(step.size, int) else list(step.size)
    mode = step.interpolation
    resample = pil_modes_mapping[InterpolationMode(mode) if isinstance(mode, str) else mode]
    max_size = step.max_size

    def resize(img: Any) -> Any:
        w, h = img.size
        if len(size) == 2:
            new_h, new_w = size
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size[0], int(size[0] * long / short)
            if max_size is not None and new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_h, new_w) == (h, w):
            return img
        return img.resize((new_w, new_h), resample)

    return resize


def _center_crop_step(step: Any) -> Callable[[Any], Any]:
    """torchvision's CenterCrop on a PIL image (the same box); padding cases go to torchvision."""
    crop_h, crop_w = step.size

    def crop(img: Any) -> Any:
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img  # the same pixels torchvision's full-size crop would copy
        if crop_w > w or crop_h > h:
            return step(img)
        top = int(round((h - crop_h) / 2.0))
        left = int(round((w - crop_w) / 2.0))
        return img.crop((left, top, left + crop_w, top + crop_h))

    return crop


def _fast_steps(steps: list[Any]) -> Callable[[Any], Any]:
    from torchvision import transforms

    fns = []
    for step in steps:
        if type(step) is transforms.Resize and isinstance(step.size, int | list | tuple):
            fns.append(_resize_step(step))
        elif type(step) is transforms.CenterCrop:
            fns.append(_center_crop_step(step))
        else:
            fns.append(step)

    def apply(img: Any) -> Any:
        for fn in fns:
            img = fn(img)
        return img

    return apply


def split_transform(encoder: Any) -> tuple[Callable[[Any], Any], tuple, tuple] | None:
    """(PIL steps, mean, std) when the encoder's transform ends in ToTensor + Normalize, else None.

    The PIL steps (resize, crop) run per image in the loader; ToTensor + Normalize run per batch in
    `normalize_batch`. Encoders whose transform has another shape use `encoder.preprocess` per image.
    """
    from torchvision import transforms

    tf = getattr(encoder, "_tf", None)
    if tf is None:
        tf = getattr(getattr(encoder, "loaded", None), "preprocess", None)
    if not isinstance(tf, transforms.Compose) or len(tf.transforms) < 2:
        return None
    *pil_steps, to_tensor, normalize = tf.transforms
    if not isinstance(to_tensor, transforms.ToTensor) or not isinstance(normalize, transforms.Normalize):
        return None
    mean = tuple(float(m) for m in np.ravel(normalize.mean))
    std = tuple(float(s) for s in np.ravel(normalize.std))
    return _fast_steps(pil_steps), mean, std


def normalize_batch(pixels: torch.Tensor, mean: tuple, std: tuple, device: Any) -> torch.Tensor:
    """uint8 [B,H,W,3] pixels -> float32 [B,3,H,W] on `device`: ToTensor then Normalize, batched.

    The same arithmetic in the same order as the per-image transform, hence the same bits; the
    layout change happens on the uint8 pixels and the float steps run in place (3x faster).
    """
    x = pixels.to(device, non_blocking=True)
    out = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32, device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))
    out.div_(255)
    out.sub_(torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    out.div_(torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    return out


def _identity(batch: Any) -> Any:
    return batch


def _as_label(value: Any) -> int:
    try:
        return -1 if value is None else int(value)
    except (TypeError, ValueError):
        return -1


class ShardBatches(IterableDataset):
    """An IterableDataset over one shard that yields one batch per block of `batch_size` consecutive
    samples: {"index", "pixels" (uint8 [n,H,W,3] or float [n,3,H,W]), "uid", "caption", "label",
    "source", "skipped" [(index, uid, reason)], "seconds"}.

    Loader worker w of W takes blocks w, w+W, ...; every sample carries its index in the shard, so
    the task restores shard order whatever order batches arrive in. A bad sample becomes a skip
    marker with a reason; nothing a sample contains raises.
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

    def _sample(self, key: str, files: dict[str, bytes]) -> tuple[dict[str, Any] | None, Any, str | None]:
        """(record, pixels, None) or (record or None, None, skip reason)."""
        from kb_builder.shards import _to_record

        if "txt" in files:
            try:
                files["txt"].decode("utf-8")
            except UnicodeDecodeError:  # keep the sample, not the undecodable bytes
                files["txt"] = files["txt"].decode("utf-8", "replace").encode("utf-8")
        try:
            rec = _to_record(key, files)
        except Exception:  # noqa: BLE001 - unreadable json: skip this sample, not the shard
            return None, None, "bad_metadata"
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
    """The dataset's batches, from `num_workers` loader processes (0: in this process)."""
    from torch.utils.data import DataLoader

    if num_workers == 0:  # the same code path, in this process
        yield from dataset
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


# ---------------------------------------------------------------------------------- the task
def _encoders(image_spec: dict, text_spec: dict | None, device: str) -> tuple[Any, Any]:
    """Load (once per worker process) the frozen encoders for these specs."""
    from kb_builder.encoders import build_image_encoder, build_text_encoder

    key = json.dumps([image_spec, text_spec, device], sort_keys=True)
    if key not in _ENCODERS:
        image = build_image_encoder(image_spec).to(device)
        text = build_text_encoder(text_spec).to(device) if text_spec else None
        _ENCODERS[key] = (image, text)
    return _ENCODERS[key]


def _pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TextCache:
    """Text vectors of one shard: each distinct caption is encoded once (captions repeat a lot)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.row: dict[str, int] = {}
        self.chunks: list[Any] = []
        self.seconds = 0.0

    def add(self, captions: list[str | None]) -> None:
        new = list(dict.fromkeys(c for c in captions if c is not None and c not in self.row))
        if not new or self.encoder is None:
            return
        started = time.perf_counter()
        vecs = self.encoder.encode(new, dedupe=False).to(torch.float16)
        offset = len(self.row)
        self.row.update({c: offset + i for i, c in enumerate(new)})
        self.chunks.append(vecs)
        self.seconds += time.perf_counter() - started

    def vectors(self, captions: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(fp16 [n, D] vectors, has_text [n]) for captions in order (zeros and False for None)."""
        dim = self.encoder.dim if self.encoder is not None else 1
        has = np.array([c is not None and self.encoder is not None for c in captions], dtype=bool)
        out = np.zeros((len(captions), dim), dtype=np.float16)
        if has.any():
            table = torch.cat(self.chunks).cpu().numpy()
            out[has] = table[[self.row[c] for c, h in zip(captions, has, strict=True) if h]]
        return out, has


def embed_shard(
    task: tuple[Path, str],
    out_dir: Path,
    image_spec: dict,
    text_spec: dict | None,
    batch_size: int = 256,
    device: str | None = None,
    threads: int | None = None,
    num_workers: int | None = None,
    prefetch_factor: int = 2,
) -> dict[str, Any]:
    """Embed one shard (task = (shard path, part stem)) into its Parquet part; returns counts, skips
    by reason and timings.

    A part already written from this very shard (same fingerprint) is kept ("done_before"). Rows
    follow shard order whatever `num_workers` is; the same shard, options and machine give the
    same bytes.
    """
    if threads:
        torch.set_num_threads(threads)
    shard, stem = Path(task[0]), task[1]
    out = part_path_for(stem, Path(out_dir))
    fingerprint = shard_fingerprint(shard)
    if out.exists() and part_stats(out).get("shard_fingerprint") == fingerprint:
        return {"shard": str(shard), "part": str(out), "status": "done_before", "images": 0}
    started = time.perf_counter()
    dev = _pick_device(device)
    workers = default_num_workers(dev, threads) if num_workers is None else int(num_workers)
    image_enc, text_enc = _encoders(image_spec, text_spec, dev)
    loaded = time.perf_counter()
    split = split_transform(image_enc)
    dataset = ShardBatches(shard, batch_size, image_enc.image_size, split, image_enc.preprocess)
    texts = _TextCache(text_enc)

    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    parts: list[tuple[np.ndarray, dict[str, Any]]] = []
    vec_chunks: list[Any] = []
    wait = normalise = forward = loader_cpu = 0.0
    batches = iter_batches(dataset, workers, prefetch_factor, pin_memory=dev.startswith("cuda"))
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        wait += t1 - t0
        if batch is None:
            break
        loader_cpu += batch["seconds"]
        for _, uid, reason in batch["skipped"]:
            skipped[reason] += 1
            if len(examples.setdefault(reason, [])) < MAX_EXAMPLES:
                examples[reason].append(uid)
        if not batch["index"]:
            continue
        t2 = time.perf_counter()
        pixels = batch["pixels"]
        x = normalize_batch(pixels, split[1], split[2], dev) if split else pixels.to(dev)
        t3 = time.perf_counter()
        # Kept on the device (fp16) until the shard ends: no host sync per batch on a GPU.
        vec_chunks.append(image_enc.encode(x).to(torch.float16))
        normalise += t3 - t2
        forward += time.perf_counter() - t3
        texts.add(batch["caption"])  # text forward here overlaps the loader's next batches
        parts.append((np.asarray(batch["index"], dtype=np.int64), batch))

    looped = time.perf_counter()
    order = np.argsort(
        np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64), kind="stable"
    )

    def column(name: str) -> list[Any]:
        flat = [v for _, b in parts for v in b[name]]
        return [flat[i] for i in order]

    captions = column("caption")
    if vec_chunks:
        image_emb = torch.cat(vec_chunks).cpu().numpy()[order]
    else:
        image_emb = np.zeros((0, image_enc.dim), np.float16)
    text_emb, has_text = texts.vectors(captions)
    n = len(captions)
    stats: dict[str, Any] = {
        "shard": str(shard),
        "part": str(out),
        "status": "embedded",
        "shard_fingerprint": fingerprint,
        "images": n,
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "missing_caption": int(sum(c is None for c in captions)),
        "device": dev,
        "batch_size": batch_size,
        "num_workers": workers,
        "threads": torch.get_num_threads(),
    }
    table = EmbeddingTable(
        uid=np.array(column("uid"), dtype=object),
        image_emb=image_emb,
        text_emb=text_emb,
        has_text=has_text,
        caption=captions,
        label=np.array(column("label"), dtype=np.int32),
        source=column("source"),
        meta={"image_encoder": image_spec, "text_encoder": text_spec},
    )
    remove_leftovers(out)
    timings = {
        "load_encoders": loaded - started,  # 0 once this worker process has them
        "wait_for_loader": wait,  # this process waiting for batches (all decoding when num_workers=0)
        "loader_cpu": loader_cpu,  # CPU time reading/decoding/resizing, in whichever process did it
        "normalise": normalise,  # ToTensor + Normalize per batch (on a GPU: its launch, async)
        "image_forward": forward,
        "text_forward": texts.seconds,
        "assemble": time.perf_counter() - looped,
    }
    t_write = time.perf_counter()
    # The stats travel in the part's metadata (a rerun's stage record reads them from there); the
    # write's own duration can only be in the returned copy.
    write_embeddings_part(out, table, {"shard_stats": {**stats, "timings": _rounded(timings)}})
    finished = time.perf_counter()
    timings["write"] = finished - t_write
    stats["timings"] = _rounded(timings)
    stats["seconds"] = round(finished - started, 3)
    stats["images_per_s"] = round(n / max(finished - started, 1e-9), 1)
    return stats


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timings.items()}


def summarize(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Totals for a stage record: counts, skips by reason, from this run and from parts done before;
    the time the tasks of this run spent per step (seconds summed over tasks)."""
    skipped: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    images = 0
    embedded_now = 0
    seconds = 0.0
    for res in results:
        stats = part_stats(Path(res["part"])) if res["status"] == "done_before" else res
        images += int(stats.get("images", 0))
        skipped.update(stats.get("skipped", {}))
        if res["status"] == "embedded":
            embedded_now += int(res["images"])
            seconds += float(res["seconds"])
            timings.update(res.get("timings", {}))
    return {
        "output": str(out_dir),
        "parts": len(results),
        "images": images,
        "embedded_this_run": embedded_now,
        "parts_done_before": sum(r["status"] == "done_before" for r in results),
        "skipped": dict(skipped),
        "task_seconds": round(seconds, 2),
        "task_timings": {k: round(v, 2) for k, v in timings.items()},
    }
