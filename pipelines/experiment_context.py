"""What the methods of one experiment share (`ExperimentContext`): the manifests, the dataset's info,
and what is loaded once and only when a method needs it (the KB's label check, the class names' text
vectors, the split images of fine-tune mode, the image encoder); and the start over of a run's
per-method state (its files are named by `artifacts.names.safe_name`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retformer.artifacts import manifest
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON, PREDICTIONS
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.experiment_schema import ExperimentManifest
from retformer.trainer.baselines import kb_label_problem
from retformer.trainer.images import SplitImages, shard_images
from retformer.trainer.methods import METHODS

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest


def start_over(run_dir: Path) -> None:
    """A finished run (or resume: false) is repeated from scratch: drop its per-method state."""
    for pattern in ("*.ckpt.pt", "*.result.json", "eval.json", "report.html"):
        for p in run_dir.glob(pattern):
            p.unlink()
    shutil.rmtree(run_dir / PREDICTIONS, ignore_errors=True)


class ExperimentContext:
    """What the methods of one experiment share, loaded once and only when a method needs it."""

    def __init__(
        self,
        ws: Workspace,
        ds: DatasetManifest,
        kb: KBManifest,
        exp: ExperimentManifest,
        info: dict,
        progress: bool,
    ) -> None:
        self.ws, self.ds, self.kb, self.exp, self.info, self.progress = ws, ds, kb, exp, info, progress
        self._images: dict[tuple[str, str], Any] = {}
        self._dataset = None
        self._encoder = None
        self.mlp_only: Any = None  # the selected mlp_only (recipe stacked builds on it), once per run
        # The mlp_only selection a KB-episode check fitted on the run's very training items (a
        # RecordedSelection, pipelines.experiment_methods): the run's mlp_only takes it instead of a refit
        self.checked_mlp_only: Any = None
        self.table_k: int | None = None  # k of the neighbor tables the run reads (set by run_experiment)
        self._label_problem: tuple[str | None] | None = None
        self._class_text: tuple[Any] | None = None
        # Training images per class of what the trained methods fit (the dataset's train split, plus the
        # KB episodes where the experiment adds them): the prior their heads learn and unlearn.
        self.class_counts: list[int] | None = info.get("train_class_counts")
        self.kb_episodes = 0  # KB items that joined the training split (pipelines.experiment)
        self.kb_episode_check: dict[str, Any] | None = None  # caption labels' val admission
        self.kb_episode_labels: str | None = None  # "label" / "caption": what labelled the KB episodes
        self.kb_episode_filter: dict[str, Any] | None = None  # the kNN label filter: items labelled / kept

    def label_problem(self, features: Any) -> str | None:
        """Why the KB's labels cannot vote as this dataset's classes (knn_vote, knn_weighted, RetFormer's
        label evidence), or None when they can; `features`: any split's (they share the store)."""
        if self._label_problem is None:
            ds_name, kb_src = self.ds.name, getattr(self.kb.source, "dataset", None)
            if kb_src:  # a dataset manifest's name or path, as the shards stage reads it
                try:
                    kb_src = manifest.load("datasets", kb_src).get("name", kb_src)
                except UserError:
                    pass  # a name without a manifest here: compared as given
            other = read_json(self.ws.dataset_info(kb_src)) if kb_src and kb_src != ds_name else None
            problem = kb_label_problem(
                features.store_label,
                int(self.info["num_classes"]),
                ds_name,
                self.info.get("class_names"),
                kb_src,
                (other or {}).get("class_names"),
            )
            self._label_problem = (problem,)
        return self._label_problem[0]

    def class_text(self, features: Any) -> Any:
        """What captions are read against (caption evidence; `trainer.evidence.ClassText`): the class names'
        prompt vectors from the KB's text tower and the mean caption of the neighbour store of `features`
        (every split of a run shares that store), or None where the dataset has no real class names or
        the KB no text encoder. Computed once per run."""
        if self._class_text is None:
            from retformer.trainer.evidence import ClassText, caption_centre, class_text_embeddings
            from retformer.trainer.zeroshot import _PLACEHOLDER

            names = self.info.get("class_names") or []
            spec = self.kb.encoders.text
            if not names or not spec or all(_PLACEHOLDER.match(n) for n in names):
                self._class_text = (None,)
            else:
                from retformer.kb_builder.encoders import build_text_encoder

                prompts = class_text_embeddings(build_text_encoder(spec), names)
                self._class_text = (ClassText(prompts, caption_centre(features.store_txt)),)
        return self._class_text[0]

    def images(self, split: str, uids: list[str], source: str) -> Any:
        """The images of a split in `uids` order (fine-tune mode), indexed once per split."""

        key = (split, source)
        if key not in self._images:
            if source == "dataset":
                from retformer.kb_builder.datasets import load_dataset

                if self._dataset is None:
                    self._dataset = load_dataset(self.ds)
                if split not in self._dataset.splits:
                    raise UserError(f"dataset {self.ds.name} has no split {split!r}")
                self._images[key] = SplitImages(self._dataset.splits[split], uids)
            else:
                self._images[key] = shard_images(self.ws.dataset_shards(self.ds.name), split, uids)
        return self._images[key]

    def model_info(self, method: str, key: str, k: int, config: Any, **extra: Any) -> dict[str, Any]:
        """What a saved model needs besides its weights to predict on new images (`<run>/<key>.pt`):
        the dataset and KB manifests, the encoders and embed options (the same preprocessing), the KB
        index it searched and its tuned search parameters, k and the k of the neighbor tables (the
        search depth of the run's own retrieval), class names, the training config and recipe."""
        index_dir = self.ws.kb_index(self.kb.name)
        index = read_json(index_dir / INDEX_JSON) or {}
        kb = self.kb.as_loaded()  # saved as loaded: the keys as written, with `_manifest_path`
        return {
            "method": method,
            "result": key,
            "mode": METHODS[method].mode,
            "uses_neighbors": METHODS[method].uses_neighbors,
            "workspace": str(self.ws.root.resolve()),
            "dataset": self.ds.record(),
            "kb": kb,
            "encoders": kb.get("encoders") or {},
            "embed": kb.get("embed") or {},
            "class_names": self.info.get("class_names"),
            "num_classes": int(self.info["num_classes"]),
            "shot_split": self.info.get("shot_split"),
            "k": k,
            "search_k": self.table_k or k,
            "index": {
                "dir": str(index_dir.relative_to(self.ws.root)),
                "key": index.get("key"),
                "factory": index.get("factory"),
                "n": index.get("n"),
                "parts": [(p["name"], p["rows"]) for p in index.get("parts", [])],
                # the search parameters `retformer index` tuned to its recall target (index.json)
                "params": index.get("params", {}),
                "params_source": f"{index_dir / INDEX_JSON} (tuned at {index.get('created')})",
                "recall_check": index.get("recall_check"),
            },
            "train_config": asdict(config) if is_dataclass(config) else config,
            "recipe": self.exp.recipe,
            "select_split": self.exp.select_split,
            "experiment": self.exp.name,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }

    def image_encoder(self, seed: int) -> Any:
        """The KB's image encoder (fine-tune mode trains a copy), built once; seeded for random weights."""
        from retformer.kb_builder.encoders import build_image_encoder

        if self._encoder is None:
            torch.manual_seed(seed)  # random-weight encoders (tests) are then the same in every run
            self._encoder = build_image_encoder(self.kb.encoders.image)
        return self._encoder
