"""The neighbor browser: one run's test images, the KB neighbors each retrieved, the attention the
fusion module gave them (the paper's Fig. 5) and what retrieval did for each image, served as a small
local web page.

`retformer browse RUN` (pipelines/cli_browse.py) opens a run with `BrowseRun.open` and serves it with
`pipelines.browse_server.make_server`: one static page (`pipelines/static/browse.html`, inline JS and
CSS, nothing fetched from the internet) and a JSON API:

- `GET /api/run`: the run, its method, split, k, classes (name, shot group, test count), top-1, the
  model's rule (recipe, alpha, beta, gate_t, image_weight, prior_tau) and how many images retrieval
  helped, hurt or left alone;
- `GET /api/queries?class=&correct=&shot=&effect=&offset=&limit=`: the split's samples that pass the
  filters, with their true and predicted class, s, whether the rule used retrieval, the image-only
  prediction and the effect (`pipelines.browse_effect`);
- `GET /api/query/<i>`: sample i with its top-5, its k neighbors (kb_id, uid, caption, label,
  similarity) and, for a RetFormer, the class token's attention over them per layer and stream
  (`trainer.model.neighbor_attention`, plus the mass that went to the class token and the query slot);
- `GET /img/dataset/<uid>`, `GET /img/kb/<kb_id>`: an image's bytes, read from its webdataset shard
  at the member's byte offset (`pipelines.shard_images`).

Predictions are the run's own: its per-sample predictions file (`<run>/predictions/<result>.parquet`,
the evaluation's output) when it covers the split, else the model on the stored neighbor tables
through `trainer.train.predict` (the evaluation's call). Neighbors are the stored tables' first k.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from retformer.artifacts.embeddings_io import list_parts, read_part_arrow
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import NEIGHBOR_STORE
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.browse_effect import EFFECTS, retrieval_effect, retrieval_reason
from retformer.pipelines.shard_images import ShardImageReader
from retformer.trainer.evaluate import prediction_table, shot_group_of
from retformer.trainer.features import RetrievalFeatures, load_retrieval_features

log = logging.getLogger(__name__)

MAX_LIMIT = 1000  # samples per /api/queries answer: the page asks for more as one scrolls


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
        with torch.inference_mode():  # s, the rule's use of retrieval, L_I's prediction, the effect
            self.effect = retrieval_effect(
                self.model, self.features, self._columns["pred"], self._columns["label"]
            )
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
        from retformer.pipelines.use.predictor import Predictor

        return cls(Predictor.open(run, method, workdir, "cpu"), split)

    @property
    def method(self) -> str:
        return str(self.predictor.method)

    def _store(self) -> Neighbors:
        """The neighbor store's kb_id, uid, caption and label columns, in the file's row order (the
        rows `RetrievalFeatures.nn_rows` index)."""
        path = self.ws.neighbors_dir(self.dataset, self.kb, self.table_k) / NEIGHBOR_STORE
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
        from retformer.trainer.train import predict

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
            "rule": self.effect.rule,
            "retrieval_used": int(self.effect.used.sum()),
            "effects": {e: int((self.effect.effect == e).sum()) for e in EFFECTS},
            "classes": [
                {"index": i, "name": name, "shot": shot[i], "count": int(counts[i])}
                for i, name in enumerate(self.class_names)
            ],
        }

    def attention_streams(self) -> list[str]:
        """The streams whose attention the model exposes ([] for models without a fusion module)."""
        from retformer.trainer.model import RetFormer

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
            **self.retrieval_row(i),
        }

    def retrieval_row(self, i: int) -> dict[str, Any]:
        """Sample i's retrieval fields: s, whether the rule used retrieval (and why), the image-only
        prediction and the effect (`pipelines.browse_effect`)."""
        e, label = self.effect, int(self._columns["label"][i])
        s, used, image_pred = float(e.s[i]), bool(e.used[i]), int(e.image_pred[i])
        return {
            "s": round(s, 6),
            "retrieval_used": used,
            "retrieval_reason": retrieval_reason(e.rule, s, used),
            "image_pred": image_pred,
            "image_pred_name": self.class_name(image_pred),
            "image_correct": image_pred == label,
            "effect": e.effect[i],
        }

    def queries(
        self,
        cls: int | None = None,
        correct: bool | None = None,
        shot: str | None = None,
        effect: str | None = None,
        offset: int = 0,
        limit: int = 200,
    ) -> dict[str, Any]:
        """The samples whose true class is `cls`, whose prediction is (in)correct, whose class is in
        shot group `shot`, on which retrieval had `effect` (helped / hurt / same; None: any), from
        `offset`, at most `limit`."""
        c = self._columns
        keep = np.ones(len(c["label"]), dtype=bool)
        if cls is not None:
            keep &= c["label"] == cls
        if correct is not None:
            keep &= c["correct"] == correct
        if shot is not None:
            keep &= c["shot"] == shot
        if effect is not None:
            keep &= self.effect.effect == effect
        idx = np.flatnonzero(keep)
        page = idx[offset : offset + min(limit, MAX_LIMIT)]
        return {"total": int(len(idx)), "offset": offset, "items": [self.row(int(i)) for i in page]}

    def query(self, i: int) -> dict[str, Any]:
        """Sample i: its row, top-5, its k neighbors and (RetFormer) the attention each received."""
        if not 0 <= i < len(self.features):
            raise KeyError(i)
        from retformer.trainer.model import RetFormer, neighbor_attention

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
        from retformer.kb_builder.neighbors import part_offsets

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
