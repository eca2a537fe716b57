"""The methods an experiment can run: one name per method, from the manifest to results.json.

A method's name is also the `kind` of the model it trains (`model.config["kind"]`, checkpoints): a
fine-tune method trains the model of its feature-mode twin as the head on top of the live encoder.

- frozen ("w/ FE", the fast path): `retformer` (Eq. 3-6), `retformer_no_text`, `retformer_no_image`
  (the paper's ablations, Sec. 4.5), `mlp_only` (RetFormer's L_I branch alone: no retrieval) and
  `linear_probe` ("CLIP classifier FT": a logistic regression, L-BFGS, its L2 on val);
- vote: `knn_vote`, the majority label of the retrieved KB items (where the KB has labels);
  `knn_weighted`, their labels weighted by exp(cos / T) (DINO's kNN); `caption_vote`, the classes their
  captions name (text to text against class-name prompts: no KB labels needed), weighted alike;
- `ncm`: nearest class mean, the cosine of the image's embedding with each class's mean training embedding
  (no neighbours, no training, every class weighed alike: the classic long-tail baseline on frozen features);
- frozen, no retrieval training: `mlp_vote`, the selected mlp_only mixed with that weighted vote by the
  weights RetFormer's rule fits on val (L_I, prior shift, log vote, gate; no L_R): the floor that needs
  no fusion model, which RetFormer has to beat;
- finetune: `retformer_ft` (the paper's "Ours"), `retformer_no_text_ft`, `retformer_no_image_ft`
  and `full_finetune` (encoder + linear head, no retrieval: "CLIP full FT");
- zeroshot: `zeroshot`, class-name prompts through the KB's text tower ("CLIP zero-shot").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retformer.trainer.checkpoint import discard_stale
from retformer.trainer.config import FINETUNE_NAMES, METHOD_NAMES, FusionOptions
from retformer.trainer.evidence import ClassText
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.finetune import FinetuneModel, finetune_fit, finetune_predict
from retformer.trainer.logistic_probe import select_logistic
from retformer.trainer.model_factory import MODEL_KINDS, build_model
from retformer.trainer.select_fitted import select_fitted
from retformer.trainer.selection import Selected, SelectOptions, Task, select_plain, select_stacked
from retformer.trainer.train import TrainConfig, fit, predict


@dataclass(frozen=True)
class Method:
    """One method: its mode and, for trained methods, the model kind it trains."""

    name: str
    mode: str  # "frozen" | "finetune" | "vote" | "zeroshot" (the `mode` of its results)
    model: str | None  # model kind trained (the head in fine-tune mode); None: nothing is trained
    uses_neighbors: bool  # False: one result per experiment, even in a k sweep


_ALL = (
    Method("retformer", "frozen", "retformer", True),
    Method("retformer_no_text", "frozen", "retformer_no_text", True),
    Method("retformer_no_image", "frozen", "retformer_no_image", True),
    Method("mlp_only", "frozen", "mlp_only", False),
    Method("linear_probe", "frozen", "linear_probe", False),
    Method("knn_vote", "vote", None, True),
    Method("knn_weighted", "vote", None, True),
    Method("caption_vote", "vote", None, True),
    Method("mlp_vote", "frozen", "retformer", True),
    Method("ncm", "vote", None, False),
    Method("retformer_ft", "finetune", "retformer", True),
    Method("retformer_no_text_ft", "finetune", "retformer_no_text", True),
    Method("retformer_no_image_ft", "finetune", "retformer_no_image", True),
    Method("full_finetune", "finetune", "linear_probe", False),
    Method("zeroshot", "zeroshot", None, False),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
assert tuple(METHODS) == METHOD_NAMES, "trainer/config.py METHOD_NAMES must list the methods above"
# Feature-mode methods, in table order: an experiment without `methods:` runs these.
FEATURE_METHODS = tuple(m.name for m in _ALL if m.mode in ("frozen", "vote"))
# fine-tune method -> the feature-mode method whose model it trains on top of the live encoder
FINETUNE_METHODS = {m.name: m.model for m in _ALL if m.mode == "finetune"}
assert tuple(FINETUNE_METHODS) == FINETUNE_NAMES, "trainer/config.py FINETUNE_NAMES must list them"
# Methods that never look at the neighbors: one result per experiment, even in a k sweep.
RETRIEVAL_FREE = frozenset(m.name for m in _ALL if not m.uses_neighbors)
TRAINED = frozenset(m.name for m in _ALL if m.model is not None)
assert {m.model for m in _ALL if m.model} <= set(MODEL_KINDS)


def train_method(
    method: str,
    config: TrainConfig,
    train: RetrievalFeatures,
    evals: dict[str, RetrievalFeatures],
    model_options: FusionOptions,
    num_classes: int,
    k: int,
    class_counts: list[int] | None,
    log_path: Path,
    weights_path: Path,
    save: Callable[[torch.nn.Module, Path], None],
    checkpoint_path: Path | None = None,
    checkpoint_every_s: float = 0.0,
    progress: bool = True,
    image_encoder: Callable[[], Any] | None = None,
    images: Callable[[str, RetrievalFeatures], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Train one method's model (frozen or fine-tune mode) and return (logits per eval split, epochs).

    model_options: the experiment's `model:` section (`build_model`). A checkpoint at checkpoint_path
    is resumed when compatible, else deleted and the method starts over. Fine-tune methods need
    image_encoder() (the KB's image encoder) and images(split, features) (that split's images in the
    order of its features). The trained model goes to weights_path through save(model, weights_path):
    the experiment's self-describing model file, the one kind `trainer.checkpoint` loads."""
    spec = METHODS[method]
    torch.manual_seed(config.seed)
    head = build_model(spec.model, num_classes, train.img_dim, train.txt_dim, k, model_options)
    common = {
        "class_counts": class_counts,
        "progress": progress,
        "log_path": log_path,
        "checkpoint_path": checkpoint_path,
        "checkpoint_every_s": checkpoint_every_s,
    }
    logits: dict[str, torch.Tensor] = {}
    if spec.mode == "finetune":
        if image_encoder is None or images is None:
            raise ValueError(f"{method} needs image_encoder and images")
        model = FinetuneModel(image_encoder(), head)
        imgs = {s: images(s, f) for s, f in {"train": train, **evals}.items()}
        if checkpoint_path is not None:
            discard_stale(checkpoint_path, config, model, len(train))
        history = finetune_fit(model, imgs["train"], train, config, **common)
        for split, f in evals.items():
            logits[split] = finetune_predict(
                model, imgs[split], f, config.eval_batch_size, config.num_workers, amp=config.amp
            )
    else:
        model = head
        if checkpoint_path is not None:
            discard_stale(checkpoint_path, config, model, len(train))
        history = fit(model, train, config, **common)
        for split, f in evals.items():
            logits[split] = predict(model, f, batch_size=config.eval_batch_size)
    save(model, weights_path)
    return logits, len(history)


def select_method(
    method: str,
    recipe: str,
    config: TrainConfig,
    train: RetrievalFeatures,
    val: RetrievalFeatures,
    model_options: FusionOptions,
    num_classes: int,
    class_counts: list[int] | None,
    opts: SelectOptions,
    mlp_only: Callable[[], Selected],
    label_evidence: bool = False,
    class_text: ClassText | None = None,
) -> Selected:
    """Train a feature-mode method with every choice made on `val` (`trainer/selection.py`).

    Baselines: the lr grid (mlp_only also its post-hoc prior adjustment). RetFormer variants, recipe
    "stacked": on top of mlp_only() (the selected mlp_only, computed once by the caller), its rule may
    add the neighbours' KB-label evidence (label_evidence) or caption evidence (class_text: the class-name
    prompt vectors); recipe "paper": the `train:` run, best-on-val epoch."""
    spec = METHODS[method]
    if spec.mode != "frozen" or spec.model is None:
        raise ValueError(f"{method} is not a trained feature-mode method")
    task = Task(
        spec.model,
        train,
        val,
        config,
        num_classes,
        model_options,
        class_counts,
        metric=opts.select_metric,
        label_evidence=label_evidence,
        class_text=class_text,
    )
    if method == "mlp_only":
        return select_plain(task, opts.lr_grid, opts.baseline_epochs, opts.prior_taus)
    if method == "linear_probe":
        return select_logistic(task, opts.probe_l2, opts.prior_taus)
    if method == "mlp_vote":  # the same fitted rule with L_R left out, whatever the recipe
        return select_fitted(task, mlp_only().model.mlp.state_dict(), opts, retrieval_branch=False)
    if recipe == "paper":
        return select_plain(task, (config.lr,), config.epochs, recipe="paper")
    if opts.rule_fit == "stack":
        return select_fitted(task, mlp_only().model.mlp.state_dict(), opts)
    return select_stacked(task, mlp_only().model.mlp.state_dict(), opts)
