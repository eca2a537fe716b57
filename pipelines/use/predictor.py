"""`Predictor`: a trained run's model with its encoder, KB index and KB rows; images or embeddings ->
prediction records. The steps and where each lives: pipelines/use/__init__.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retformer.artifacts.devices import resolve_device
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.kb_schema import EmbedSection, image_encoder
from retformer.pipelines.relevance import OodThreshold, mean_similarity, ood_threshold, retrieval_applied
from retformer.pipelines.use.encoding import ImageEncoder
from retformer.pipelines.use.inputs import ImageInput, NotAnImage, class_label
from retformer.pipelines.use.kb_check import check_kb_compatible
from retformer.pipelines.use.kb_search import KbIndex, open_kb_index, retrieve
from retformer.pipelines.use.model_file import find_model_file, workspace_of
from retformer.pipelines.use.records import prediction_records
from retformer.trainer.checkpoint import SavedModel, load_saved_model
from retformer.trainer.features import RetrievalFeatures

log = logging.getLogger(__name__)

# Images per retrieval chunk: one index search and one read of the KB rows the chunk's neighbors use.
CHUNK = 1024
DEFAULT_BATCH = EmbedSection().batch_size  # images per forward when the KB manifest's embed: gives none


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
        self.device = resolve_device(device, "predict")  # a GPU torch cannot use is an error
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
            run = saved.path.parent.name
            check_kb_compatible(ws, self.kb, run, info["encoders"], info.get("embed"))
        embed = info.get("embed") or {}
        self.batch_size = int(embed.get("batch_size") or DEFAULT_BATCH)
        self._images = ImageEncoder(image_encoder(info["encoders"]["image"], saved.path.name), self.device)
        self._kb_index: KbIndex | None = None
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
        return cls(saved, workspace_of(saved, workdir, kb), device, kb)

    @property
    def method(self) -> str:
        """The result name of the model (`retformer`, `mlp_only`, `retformer@k4`, ...)."""
        return str(self.info.get("result") or self.info.get("method"))

    # ------------------------------------------------------------------------------ encoder, index
    def encoder(self) -> Any:
        """The KB's frozen image encoder (the one that embedded the run's dataset)."""
        return self._images.encoder()

    def index(self) -> Any:
        """The KB index with the run's search parameters; UserError if it is not the run's index."""
        return self._kb().index

    def _kb(self) -> KbIndex:
        if self._kb_index is None:
            self._kb_index = open_kb_index(
                self.ws, self.kb, self.info["index"], self.saved.path.name, same_kb=self.other_kb is None
            )
        return self._kb_index

    def ood_threshold(self) -> OodThreshold:
        """The run's out-of-distribution threshold on s (`pipelines/relevance.py`), computed once from
        the run's own val neighbour table (against the KB it was trained with, also under `kb`)."""
        if self._ood is None:
            ws: Workspace | None = self.ws
            if self.other_kb is not None:
                try:
                    ws = workspace_of(self.saved, self.ws.root)
                except UserError:
                    ws = None  # the run's own KB is not at hand: no threshold, said once
            self._ood = ood_threshold(self.info, ws)
        return self._ood

    # ----------------------------------------------------------------------------------- images
    def _pixels(self, data: bytes) -> tuple[Any, str | None]:
        """One image's preprocessed pixels (as the embed stage's loader makes them) or a skip reason."""
        return self._images.pixels(data)

    def _encode(self, pixels: list[Any]) -> tuple[np.ndarray, torch.Tensor]:
        """(z as float16 (B, D), the normalised image batch) of preprocessed pixels."""
        return self._images.encode(pixels)

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
        labels = [class_label(y) for y in labels] if labels is not None else [None] * n
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
        labels -1, the KB rows they use as an EmbeddingTable, those rows' kb_ids), as
        `pipelines.use.kb_search.retrieve` searches."""
        return retrieve(self._kb(), z16, uids, self.k, self.search_k, self.kb)

    @torch.inference_mode()
    def logits(self, features: RetrievalFeatures, images: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits (N, C) on retrieved features (and, for a fine-tuned model, its images)."""
        from retformer.trainer.train import amp_policy, predict

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
                # nn_label as in training (`trainer.train.predict`): a head whose rule or anchor reads the
                # neighbours' KB labels gets them here too
                z = images[idx].to(self.device)
                logits = self.model(z, b.get("nn_img"), b.get("nn_txt"), nn_label=b.get("nn_label"))
                out.append(logits.float().cpu())
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
        shown = max(0, min(int(neighbors), self.k))
        used = retrieval_applied(self.model, s)
        return prediction_records(
            logits,
            features,
            store,
            kb_id,
            names,
            uids,
            labels,
            self.class_names,
            shown,
            used,
            s,
            self.ood_threshold(),
        )
