"""Predict with a trained run: images (files, folders, webdataset shards) or embeddings -> the class, its
score, the top 5 and the KB neighbors the model read. `retformer predict` and `retformer.Run` call this.

A new image takes the path the run's own test images took, step by step, so that the run's test
images predicted here get the classes the run's evaluation gave them:

1. decode (`artifacts/decode.py`), the KB image encoder's preprocessing in the embed stage's batched
   form (`kb_builder/embed/fast_transform.py`) and forward pass, then z rounded to float16 as the
   embed stage stores it;
2. the run's KB index (`kb_builder/index/search.py`) with the search parameters the model file
   recorded (tuned by `retformer index`), searched as deep as the run's neighbor tables and cut to
   the model's k; a shard sample whose uid is in the KB does not retrieve itself (as in the
   neighbors stage); the neighbors' rows come from the KB's embeddings parts;
3. `trainer.train.predict` over those `RetrievalFeatures` (the evaluation's own call), fine-tuned
   models on the preprocessed images; score = softmax of the logits;
4. what the record says about retrieval (`pipelines/relevance.py`): s (`mean_similarity`), whether the
   rule applied its retrieval term (`retrieval_used`) and `ood` (s below the run's val threshold); a
   labelled shard sample also gets its true `label` and whether the class is `correct`.

Everything comes from the model file (`<run>/<method>.pt`, `trainer.checkpoint.save_model`): no
manifest is read. The index and KB parts must be the ones the run was trained against (checked).
"""

from __future__ import annotations

import glob
import logging
import numbers
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from artifacts.decode import decode_image, to_rgb
from artifacts.embeddings_io import arrow_to_table, list_parts
from artifacts.errors import UserError
from artifacts.shards import to_record
from artifacts.tar_reader import iter_shard_files
from artifacts.workspace import Workspace
from pipelines.relevance import OodThreshold, mean_similarity, ood_threshold, retrieval_applied
from trainer.checkpoint import SavedModel, load_saved_model
from trainer.features import RetrievalFeatures

log = logging.getLogger(__name__)

# Images per retrieval chunk: one index search and one read of the KB rows the chunk's neighbors use.
CHUNK = 1024
DEFAULT_BATCH = 256  # images per encoder forward when the KB manifest's embed: section gives none
# Model files a run directory holds, in the order a run without --method picks them.
PREFERRED = ("retformer", "retformer_ft")
# The most bytes read from one input file: an uncompressed RGB image at Pillow's MAX_IMAGE_PIXELS
# (3 x 89.5 M = 256 MiB); any larger image is refused as a decompression bomb anyway. Beyond it the
# file is skipped after reading this much (`/dev/zero` read until MemoryError).
MAX_INPUT_BYTES = 256 * 1024 * 1024


def _image_suffixes() -> frozenset[str]:
    """File suffixes Pillow can open (what a folder is searched for), plus webdataset shards."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class NotAnImage(UserError):
    """Bytes that do not decode to an image the model's encoder can read (`Predictor.predict_bytes`)."""


@dataclass(frozen=True)
class ImageInput:
    """One image to predict: its name (path, or `shard.tar#key`), its bytes, its uid and true label when
    a shard gives them, or why it cannot be read."""

    name: str
    data: bytes | None = None
    uid: str | None = None
    error: str | None = None
    label: int | None = None


def iter_inputs(paths: Iterable[Path | str]) -> Iterator[ImageInput]:
    """The images of `paths`: image files, folders (image files and shards under them, sorted) and
    webdataset shards (`.tar`, every sample). Unreadable inputs come back with their `error`."""
    suffixes = _image_suffixes() | {".tar"}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                yield ImageInput(str(path), error="no image files or shards in this folder")
            for p in found:
                yield from _path_inputs(p)
        elif path.exists():
            yield from _path_inputs(path)
        else:
            yield ImageInput(str(path), error="no such file or folder")


def _path_inputs(path: Path) -> Iterator[ImageInput]:
    if path.suffix.lower() == ".tar":
        yield from _shard_inputs(path)
        return
    try:
        with open(path, "rb") as f:
            # a regular file's size says it up front; a device or a pipe is read up to the cap
            too_big = os.fstat(f.fileno()).st_size > MAX_INPUT_BYTES
            data = b"" if too_big else f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        yield ImageInput(str(path), error=f"unreadable ({exc.strerror or exc})")
        return
    if too_big or len(data) > MAX_INPUT_BYTES:
        del data
        yield ImageInput(
            str(path), error=f"larger than {MAX_INPUT_BYTES >> 20} MiB, the most read from one input"
        )
        return
    yield ImageInput(str(path), data)


def _shard_inputs(shard: Path) -> Iterator[ImageInput]:
    """Every sample of a webdataset shard; a corrupt shard ends with one error for the rest of it."""
    try:
        for _, key, files in iter_shard_files(shard):
            name = f"{shard}#{key}"
            try:
                rec = to_record(key, files or {})
            except Exception:  # noqa: BLE001 - unreadable json: this sample, not the shard
                yield ImageInput(name, error="bad_metadata")
                continue
            if rec["image_bytes"] is None:
                yield ImageInput(name, uid=rec["uid"], error="missing_image")
            else:
                yield ImageInput(name, rec["image_bytes"], uid=rec["uid"], label=_label(rec["label"]))
    except UserError as exc:
        yield ImageInput(str(shard), error=str(exc))


def _label(value: Any) -> int | None:
    """A shard json's (or an embeddings frame's) `label` as a class index; None when absent or not a
    non-negative integer (a KB of web pairs has none; -1 means none in the embeddings parts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        return None
    return int(value)


def count_inputs(paths: Iterable[Path | str]) -> int | None:
    """How many images `paths` hold without reading them: None when a shard is among them."""
    total = 0
    suffixes = _image_suffixes()
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".tar" or (path.is_dir() and any(path.rglob("*.tar"))):
            return None
        if path.is_dir():
            total += sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            total += 1
    return total


# ------------------------------------------------------------------------------------ the run's model
def _safe(key: str) -> str:
    """A result name as its model file is named (as `pipelines/experiment.py` does: `a@k4` -> `a-k4`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def model_files(run_dir: Path) -> dict[str, Path]:
    """The model files of a run directory by result name (file stem), checkpoints excluded."""
    return {p.stem: p for p in sorted(run_dir.glob("*.pt")) if not p.name.endswith(".ckpt.pt")}


def find_model_file(run: str | Path, method: str | None = None, workdir: Path | str | None = None) -> Path:
    """The model file of `run`: a model file itself, a run folder, or a run name under `<workdir>/runs`
    (a shell pattern such as `fmnist_lt-fmnist_world-demo-*` picks the newest matching run).
    In a run folder, `method` picks the file (a method or result name, e.g. `retformer@k4`); without it,
    retformer (or retformer_ft), else the run's only model. UserError when there is none to pick."""
    path = Path(run)
    if path.is_file():
        return path
    candidates = list(
        dict.fromkeys([path] + ([Path(workdir) / "runs" / str(run)] if workdir is not None else []))
    )
    run_dir = next((c for c in candidates if c.is_dir()), None)
    if run_dir is None and glob.has_magic(str(run)) and workdir is not None:
        # run names end in a config hash (`fmnist_lt-fmnist_world-demo-1a2b3c4d`): a pattern picks the newest
        found = [p for p in (Path(workdir) / "runs").glob(str(run)) if p.is_dir() and model_files(p)]
        run_dir = max(found, key=lambda p: p.stat().st_mtime, default=None)
    if run_dir is None:
        where = " or ".join(str(c) for c in candidates)
        raise UserError(f"run not found: {run} (no run folder or model file at {where})")
    files = model_files(run_dir)
    if not files:
        raise UserError(
            f"{run_dir} holds no model files (<method>.pt): is it a finished `retformer train` run?"
        )
    if method is not None:
        if _safe(method) not in files:
            raise UserError(
                f"run {run_dir.name} has no model for method {method!r}; it has: {', '.join(files)} "
                "(kNN vote and zero-shot train no model)"
            )
        return files[_safe(method)]
    for name in PREFERRED:
        if name in files:
            return files[name]
    if len(files) == 1:
        return next(iter(files.values()))
    raise UserError(f"run {run_dir.name} has several models ({', '.join(files)}): choose one with --method")


def _workspace_of(saved: SavedModel, workdir: Path | str | None, kb: str | None = None) -> Workspace:
    """The workspace holding the run's KB (or `kb`): the one the model file sits in (`<root>/runs/<run>/`),
    else `workdir`, else the one it was trained in."""
    other, kb = kb is not None, kb or saved.info["kb"]["name"]
    run_dir = saved.path.resolve().parent
    roots = [run_dir.parent.parent] if run_dir.parent.name == "runs" else []
    roots += [Path(workdir)] if workdir is not None else []
    roots += [Path(saved.info["workspace"])] if saved.info.get("workspace") else []
    for root in roots:
        ws = Workspace(root)
        # another KB: where it is embedded (its encoders are checked before its index is read)
        if (ws.kb_index(kb) / "index.json").is_file() or (
            other and ws.kb_stage_record(kb, "embed").is_file()
        ):
            return ws
    raise UserError(
        f"the index of KB {kb}, which {saved.path.name} is to search, is in none of "
        f"{', '.join(str(r) for r in roots)}: give the workspace with --workdir"
    )


def _device(device: str | None) -> torch.device:
    from artifacts.devices import pick  # a GPU torch cannot use is one error, not a CPU run

    return torch.device(pick(device, "predict"))


class Predictor:
    """A run's model with its encoder, KB index and KB rows: images or embeddings -> prediction records.

    Open with `Predictor.open(run, method, workdir)`. The encoder and the index load on first use."""

    def __init__(
        self, saved: SavedModel, ws: Workspace, device: str | None = None, kb: str | None = None
    ) -> None:
        info = saved.info
        missing = [key for key in ("encoders", "kb", "index", "k") if not info.get(key)]
        if missing:
            raise UserError(
                f"{saved.path} holds no {', '.join(missing)} (written before model files carried what "
                "prediction needs): rerun `retformer train` for this run"
            )
        if info.get("mode") == "finetune" and saved.model.config.get("kind") != "finetune":
            raise UserError(f"{saved.path}: a fine-tune method's file without its encoder")
        self.saved, self.info, self.ws = saved, info, ws
        self.device = _device(device)
        self.model = saved.model.to(self.device).eval()
        self.finetuned = saved.model.config.get("kind") == "finetune"
        classes = int(info.get("num_classes") or 0)
        self.class_names: list[str] = list(info.get("class_names") or [str(c) for c in range(classes)])
        self.k = int(info["k"])
        self.search_k = max(self.k, int(info.get("search_k") or self.k))
        # `kb`: another KB embedded with the run's encoders (or the run's KB grown since), searched as it
        # is now with its own tuned parameters (`retformer predict --kb`, pipelines/evaluate_kb.py).
        self.other_kb = kb
        self.kb = str(kb or info["kb"]["name"])
        if kb is not None:  # before any image is read: one line when its vectors live in another space
            from pipelines.evaluate_kb import check_kb_compatible

            run = saved.path.parent.name
            check_kb_compatible(ws, self.kb, run, info["encoders"], info.get("embed"))
        embed = info.get("embed") or {}
        self.batch_size = int(embed.get("batch_size") or DEFAULT_BATCH)
        self._encoder: Any = None
        self._split: Any = None
        self._index: Any = None
        self._parts: tuple[list[Path], np.ndarray] | None = None
        self._ood: OodThreshold | None = None

    @classmethod
    def open(
        cls,
        run: str | Path,
        method: str | None = None,
        workdir: Path | str | None = None,
        device: str | None = None,
        kb: str | None = None,
    ) -> Predictor:
        """The predictor of a run folder, run name (under `workdir/runs`) or model file; see
        `find_model_file` for how `method` picks the model. `kb`: search that KB instead of the run's."""
        saved = load_saved_model(find_model_file(run, method, workdir))
        if not saved.info:
            raise UserError(
                f"{saved.path} holds no run information (written before model files were self-describing): "
                "rerun `retformer train` for this run"
            )
        return cls(saved, _workspace_of(saved, workdir, kb), device, kb)

    @property
    def method(self) -> str:
        """The result name of the model (`retformer`, `mlp_only`, `retformer@k4`, ...)."""
        return str(self.info.get("result") or self.info.get("method"))

    # ------------------------------------------------------------------------------ encoder, index
    def encoder(self) -> Any:
        """The KB's frozen image encoder (the one that embedded the run's dataset)."""
        if self._encoder is None:
            from kb_builder.embed.fast_transform import split_transform
            from kb_builder.encoders import build_image_encoder

            self._encoder = build_image_encoder(self.info["encoders"]["image"]).to(self.device)
            self._split = split_transform(self._encoder)
        return self._encoder

    def index(self) -> Any:
        """The KB index with the run's search parameters; UserError if it is not the run's index."""
        if self._index is None:
            from kb_builder.index.search import ShardedIndex
            from kb_builder.neighbors import part_offsets

            rec = self.info["index"]
            index = ShardedIndex.load(self.ws.kb_index(self.kb))
            parts = list_parts(self.ws.kb_embeddings(self.kb))
            offsets = part_offsets(parts)
            now = {"key": index.meta.get("key"), "n": index.ntotal}
            was = {"key": rec.get("key"), "n": rec.get("n")}
            kb_parts = [
                [p.name, int(b - a)] for p, a, b in zip(parts, offsets[:-1], offsets[1:], strict=True)
            ]
            changed = now != was or (rec.get("parts") and kb_parts != [list(p) for p in rec["parts"]])
            if changed and self.other_kb is None:
                raise UserError(
                    f"the KB {self.kb} in {self.ws.root} is not the one {self.saved.path.name} was trained "
                    f"against (index {now}, the run's {was}): retrain the run on the current KB, or pass "
                    f"--kb {self.kb} to predict with the KB as it is now"
                )
            if self.other_kb is None:
                index.set_params(rec.get("params") or {})
            self._index, self._parts = index, (parts, offsets)
        return self._index

    def ood_threshold(self) -> OodThreshold:
        """The run's out-of-distribution threshold on s (`pipelines/relevance.py`), computed once from
        the run's own val neighbour table (against the KB it was trained with, also under `kb`)."""
        if self._ood is None:
            ws: Workspace | None = self.ws
            if self.other_kb is not None:
                try:
                    ws = _workspace_of(self.saved, self.ws.root)
                except UserError:
                    ws = None  # the run's own KB is not at hand: no threshold, said once
            self._ood = ood_threshold(self.info, ws)
        return self._ood

    # ----------------------------------------------------------------------------------- images
    def _pixels(self, data: bytes) -> tuple[Any, str | None]:
        """One image's preprocessed pixels (as the embed stage's loader makes them) or a skip reason."""
        enc = self.encoder()
        try:
            img, reason = decode_image(data)
        except Exception:  # noqa: BLE001 - Pillow plugins raise more than decode_image expects
            img, reason = None, "decode_failed"
        if img is None:
            return None, reason or "not_an_image"
        side = enc.image_size
        try:
            if self._split is None:
                px = enc.preprocess(img)
                ok = tuple(px.shape) == (3, side, side)
            else:
                px = np.asarray(to_rgb(self._split[0](img)), dtype=np.uint8)
                ok = px.shape == (side, side, 3)
        except Exception:  # noqa: BLE001 - an image the transform rejects is skipped, not fatal
            return None, "preprocess_failed"
        return (px, None) if ok else (None, "preprocess_failed")

    def _encode(self, pixels: list[Any]) -> tuple[np.ndarray, torch.Tensor]:
        """(z as float16 (B, D), the normalised image batch) of preprocessed pixels."""
        from kb_builder.embed.fast_transform import normalize_batch

        enc = self.encoder()
        if self._split is None:
            x = torch.stack(pixels).to(self.device)
        else:
            x = normalize_batch(
                torch.from_numpy(np.stack(pixels)), self._split[1], self._split[2], self.device
            )
        return enc.encode(x).to(torch.float16).cpu().numpy(), x

    def predict_images(
        self,
        inputs: Iterable[ImageInput],
        neighbors: int = 5,
        batch_size: int | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """One record per readable input, in input order (see `records`); each unreadable one is
        reported once through on_skip(name, reason) (default: a logged warning) and skipped."""
        batch_size = int(batch_size or self.batch_size)
        skip = on_skip or (lambda name, why: log.warning("%s: skipped (%s)", name, why))
        chunk = batch_size if self.finetuned else max(batch_size, CHUNK)  # fine-tune keeps the pixels
        bar = tqdm(
            total=total, desc=f"predict {self.method}", unit="image", disable=not progress, leave=False
        )
        # (name, uid, label, pixels) per decoded input: an input's bytes are dropped once decoded (holding
        # the items of a chunk kept up to CHUNK files' raw bytes: 200 PNGs of 6.75 MB were +1.3 GB)
        pending: list[tuple[str, str | None, int | None, Any]] = []
        try:
            for item in inputs:
                px, why = (None, item.error) if item.error else self._pixels(item.data or b"")
                if px is None:
                    skip(item.name, why or "unreadable")
                    bar.update(1)
                    continue
                pending.append((item.name, item.uid, item.label, px))
                del item
                if len(pending) >= chunk:
                    yield from self._predict_chunk(pending, neighbors, batch_size, bar)
                    pending = []
            if pending:
                yield from self._predict_chunk(pending, neighbors, batch_size, bar)
        finally:
            bar.close()

    def _predict_chunk(
        self,
        pending: list[tuple[str, str | None, int | None, Any]],
        neighbors: int,
        batch_size: int,
        bar: Any,
    ) -> list[dict[str, Any]]:
        vectors, batches = [], []
        for start in range(0, len(pending), batch_size):
            z, x = self._encode([px for *_, px in pending[start : start + batch_size]])
            vectors.append(z)
            if self.finetuned:
                batches.append(x)
            bar.update(len(z))
        return self.records(
            np.concatenate(vectors),
            [uid for _, uid, _, _ in pending],
            [name for name, *_ in pending],
            neighbors,
            images=torch.cat(batches) if batches else None,
            labels=[label for _, _, label, _ in pending],
        )

    def predict_bytes(self, data: bytes, name: str = "request", neighbors: int = 5) -> dict[str, Any]:
        """The record of one image given as bytes (`retformer serve`); NotAnImage naming the reason
        when they are not an image this model can read."""
        reasons: list[str] = []
        out = list(
            self.predict_images(
                [ImageInput(name, data)], neighbors, on_skip=lambda _, why: reasons.append(why)
            )
        )
        if not out:
            raise NotAnImage(f"not a readable image ({reasons[0] if reasons else 'unreadable'})")
        return out[0]

    # ------------------------------------------------------------------------------- embeddings
    def predict_embeddings(
        self,
        vectors: np.ndarray,
        uids: list[str | None] | None = None,
        names: list[str] | None = None,
        neighbors: int = 5,
        labels: list[int | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Records for image embeddings (N, D) made by the run's encoder (e.g. a split's embeddings
        parts); they are rounded to float16 as the embed stage stores them. `uids` (where known) keep a
        KB row with the same uid out of the neighbors, as the neighbors stage does; `labels` (where
        known, else None or -1) are the true classes the records carry."""
        if self.finetuned:
            raise UserError(f"{self.method} fine-tuned its encoder: it predicts from images, not embeddings")
        z = np.asarray(vectors)
        if z.ndim != 2:
            raise UserError(f"embeddings must be a 2-d array (N, D), got shape {z.shape}")
        n = len(z)
        uids = list(uids) if uids is not None else [None] * n
        names = (
            list(names) if names is not None else [u if u is not None else str(i) for i, u in enumerate(uids)]
        )
        labels = [_label(y) for y in labels] if labels is not None else [None] * n
        if not len(uids) == len(names) == len(labels) == n:
            raise UserError(f"{n} embeddings, {len(uids)} uids, {len(names)} names and {len(labels)} labels")
        out: list[dict[str, Any]] = []
        for s in range(0, n, CHUNK):
            out += self.records(
                z[s : s + CHUNK].astype(np.float16),
                uids[s : s + CHUNK],
                names[s : s + CHUNK],
                neighbors,
                labels=labels[s : s + CHUNK],
            )
        return out

    # --------------------------------------------------------------------------------- retrieval
    def retrieve(self, z16: np.ndarray, uids: list[str | None]) -> tuple[RetrievalFeatures, Any, np.ndarray]:
        """The queries z16 (float16 (N, D)) with their top-k KB neighbors: (`RetrievalFeatures` with
        labels -1, the KB rows they use as an EmbeddingTable, those rows' kb_ids). Searched as the
        neighbors stage searches: the same depth, the same self-exclusion by uid."""
        from kb_builder.neighbors import build_store, self_kb_ids

        index = self.index()
        parts, offsets = self._parts  # type: ignore[misc]
        q = z16.astype(np.float32)
        if q.shape[1] != index.d:
            raise UserError(f"embeddings have {q.shape[1]} dimensions, the KB index {index.d}")
        self_ids = np.full(len(q), -1, dtype=np.int64)
        if any(u is not None for u in uids):  # only shard samples have uids (a file has none)
            self_ids = self_kb_ids(parts, offsets, np.array([u or "" for u in uids], dtype=object))
            self_ids[np.array([u is None for u in uids], dtype=bool)] = -1
        scores, ids = index.search(q, self.search_k, exclude_ids=self_ids)
        if (ids < 0).any():
            raise UserError(f"the KB {self.kb} returned fewer than {self.search_k} neighbors for some images")
        ids, scores = ids[:, : self.k], scores[:, : self.k]
        store = build_store(parts, offsets, ids.reshape(-1))
        kb_id = store.column("kb_id").to_numpy()
        rows = np.searchsorted(kb_id, ids)
        table = arrow_to_table(store)
        features = RetrievalFeatures(
            query_img=torch.from_numpy(q),
            labels=torch.full((len(q),), -1, dtype=torch.long),
            uids=[u or "" for u in uids],
            nn_rows=torch.from_numpy(rows.astype(np.int64)),
            nn_score=torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
            store_img=torch.from_numpy(np.array(table.image_emb)),  # a copy: Arrow's buffers are read-only
            store_txt=torch.from_numpy(np.array(table.text_emb)),
            store_has_text=torch.from_numpy(table.has_text.astype(bool)),
            store_label=torch.from_numpy(table.label.astype(np.int64)),
        )
        return features, table, kb_id

    @torch.inference_mode()
    def logits(self, features: RetrievalFeatures, images: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits (N, C) on retrieved features (and, for a fine-tuned model, its images)."""
        from trainer.train import amp_policy, predict

        if not self.finetuned:
            return predict(self.model, features, batch_size=self.batch_size, device=self.device)
        if images is None:
            raise UserError(f"{self.method} fine-tuned its encoder: it needs the images")
        use_amp, dtype = amp_policy(bool((self.info.get("train_config") or {}).get("amp", True)), self.device)
        out = []
        for s in range(0, len(features), self.batch_size):
            idx = torch.arange(s, min(s + self.batch_size, len(features)))
            b = {
                k: v.to(self.device)
                for k, v in features.batch(idx, neighbors=self.model.needs_neighbors).items()
            }
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=use_amp):
                out.append(
                    self.model(images[idx].to(self.device), b.get("nn_img"), b.get("nn_txt")).float().cpu()
                )
        return torch.cat(out)

    def records(
        self,
        z16: np.ndarray,
        uids: list[str | None],
        names: list[str],
        neighbors: int = 5,
        images: torch.Tensor | None = None,
        labels: list[int | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Prediction records: path, uid, class, class_index, score (softmax), top5 [{class, index,
        score}], label / label_class / correct (the true class where `labels` gives one in the run's
        classes, else null), retrieval_used, mean_similarity (s), ood (`pipelines/relevance.py`),
        neighbors [{kb_id, uid, caption, similarity, label}] (the first `neighbors` of k)."""
        features, store, kb_id = self.retrieve(z16, uids)
        logits = self.logits(features, images).float()
        s = mean_similarity(features)
        used = retrieval_applied(self.model, s)
        ood = self.ood_threshold()
        num_classes = len(self.class_names)
        probs = logits.softmax(dim=1)
        # the class is the logits' argmax, as in the evaluation (ties to the lowest class index)
        classes = logits.argmax(dim=1)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        shown = max(0, min(int(neighbors), self.k))
        out = []
        for i, name in enumerate(names):
            order = [int(classes[i])] + [int(c) for c in top[i] if int(c) != int(classes[i])]
            top5 = [
                {"class": self.class_names[c], "index": c, "score": round(float(probs[i, c]), 6)}
                for c in order[: top.shape[1]]
            ]
            nn = []
            for j in range(shown):
                row = int(features.nn_rows[i, j])
                nn.append(
                    {
                        "kb_id": int(kb_id[row]),
                        "uid": str(store.uid[row]),
                        "caption": store.caption[row],
                        "similarity": round(float(features.nn_score[i, j]), 6),
                        "label": int(store.label[row]) if store.label[row] >= 0 else None,
                    }
                )
            label = labels[i] if labels is not None else None
            label = label if label is not None and label < num_classes else None  # not one of the run's
            out.append(
                {
                    "path": name,
                    "uid": uids[i],
                    "class": top5[0]["class"],
                    "class_index": top5[0]["index"],
                    "score": top5[0]["score"],
                    "top5": top5,
                    "label": label,
                    "label_class": None if label is None else self.class_names[label],
                    "correct": None if label is None else label == top5[0]["index"],
                    "retrieval_used": bool(used[i]),
                    "mean_similarity": round(float(s[i]), 6),
                    "ood": ood.flag(float(s[i])),
                    "neighbors": nn,
                }
            )
        return out
