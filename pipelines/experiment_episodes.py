"""KB episodes in an experiment (the manifest's `kb_episodes`, `kb_episode_labels`): which KB items join
the training split (`trainer.kb_episodes`), and what that changes for every fit after it.

Items labelled by their captions (`kb_episode_labels: caption`, for web pairs without labels; `auto`,
the default, does so where the KB has no label at all) are admitted on val: the
image head every fused method builds on, selected as the `mlp_only` baseline is (its lr grid,
best-on-val epoch, post-hoc prior adjustment), is fitted with them and without, and they join only
where val scores at least as high with them. A KB whose captions name other things than the
dataset's classes, or a text tower that misreads the class names (MiniLM reads "two" captions as
"nine" on the own-data digits), would otherwise teach every method wrong labels. (A linear probe was
tried first: it missed a misreading that cost mlp_only 2 points of val.)

The kNN label filter (`kb_episode_filter`) is a choice of the same kind: at 10 classes it keeps out most
wrong alt-text labels and val rises with it; at 100 confusable classes it also drops many right labels of
the tail, where the KB is most of what a tail class has, and val falls with it. `auto` (the default)
fits the same image head with the filtered and the unfiltered items and keeps the filter unless val
scores higher without it (docs/method-notes.md, "thirteenth round").

Each check fit is the run's own mlp_only selection on the items it tries (the same epochs, prior and
seed), so where those items join, the run's mlp_only takes that fit (`ctx.checked_mlp_only`, replayed
onto its console line and metrics file) instead of fitting it again: the checks cost one mlp_only
selection per option the run does not keep.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.pipelines.experiment_context import ExperimentContext
from retformer.pipelines.experiment_methods import RecordedSelection, select_mlp_only_recorded
from retformer.trainer.baselines import kb_has_labels
from retformer.trainer.kb_episodes import (
    KNN_FILTER_K,
    KNN_FILTER_MIN_AGREE,
    caption_labels,
    class_counts,
    knn_agreeing_labels,
    sample_kb_items,
    with_kb_episodes,
)
from retformer.trainer.methods import METHODS

log = logging.getLogger(__name__)

NONE_JOINS = "kb_episodes: no KB item joins training: %s"


def add_kb_episodes(
    ctx: ExperimentContext, plan: dict[str, Any], train: Any, val: Any, max_items: int
) -> Any:
    """`train` with up to `max_items` KB items appended (`trainer.kb_episodes`); counts them into the prior
    the heads learn (`ctx.class_counts`) and scales every fit's epochs in `plan` by train / (train + KB
    items), so a fit takes the steps it takes without them. Returns `train` unchanged (a warning says
    why) where no item joins: the KB's labels are not the dataset's classes, or its captions name none
    of them, or val does not admit them."""
    finetune = [m for m in plan["methods"] if METHODS[m].mode == "finetune"]
    if finetune:
        raise UserError(f"kb_episodes trains on KB embeddings, not for fine-tune methods ({finetune[0]})")
    num_classes = int(ctx.info["num_classes"])
    ctx.kb_episode_labels = episode_labels(ctx, train)
    if ctx.kb_episode_labels == "caption":
        union, added, checked = _caption_episodes(ctx, plan, train, val, num_classes, max_items)
    else:
        problem = ctx.label_problem(train)
        if problem is not None:
            log.warning(NONE_JOINS, problem)
            return train
        options = _filter_options(ctx, train, train.store_label.cpu().numpy(), num_classes, max_items)
        union, added, checked = _chosen_on_val(ctx, plan, train, val, options)
    if not added:
        return train
    log.info("KB episodes: %d KB items join the %d training images", added, len(train))
    ctx.kb_episodes = added
    ctx.checked_mlp_only = checked  # fitted on `union` at the epochs and prior set below: the run's mlp_only
    ctx.class_counts = class_counts(union.labels, num_classes)
    plan.update(_scaled_epochs(plan, len(train) / len(union)))
    return union


def episode_labels(ctx: ExperimentContext, train: Any) -> str:
    """What labels the KB episodes, "label" or "caption": the experiment's `kb_episode_labels`, "auto"
    resolved to "caption" where the KB has no label at all (web pairs), else "label" (its labels join
    where they are the dataset's classes: `ctx.label_problem`).

    Why not captions for a KB labelled with another dataset's classes too: that KB is another label
    space, its captions name its own classes, and the few a text tower reads as the dataset's are
    wrong. On digits_lt x fmnist_world 11 Fashion-MNIST captions read as digits joined in 2 of 3 seeds
    (val +1.3 and +0.7 points with them on 300 images: the admission check is that noisy) and mlp_only
    lost 1.0 and 0.4 points of test (docs/method-notes.md, "ninth round")."""
    asked = ctx.exp.kb_episode_labels
    if asked != "auto":
        return asked
    return "label" if kb_has_labels(train.store_label) else "caption"


def _filter_options(
    ctx: ExperimentContext, train: Any, labels: np.ndarray, num_classes: int, max_items: int
) -> dict[str, tuple[Any, int]]:
    """The training features with KB episodes under each filter the experiment's `kb_episode_filter`
    allows, {"knn" | "none": (union, items added)}: one entry for `knn` or `none`, both for `auto` (one
    where the filter keeps every item it judged: the two would be the same episodes). `labels` are the
    store items' episode labels (-1: not an episode); the filter judges the items `with_kb_episodes`
    would sample (all that fit in `max_items`). Starts `ctx.kb_episode_filter` (eval.json): the filter
    asked for, the items labelled and those the kNN filter kept."""
    asked = ctx.exp.kb_episode_filter
    labelled = int(((labels >= 0) & (labels < num_classes)).sum())
    ctx.kb_episode_filter = {"filter": asked, "labelled": labelled, "kept": labelled}
    options: dict[str, tuple[Any, int]] = {}
    if asked in ("knn", "auto"):
        candidates = sample_kb_items(labels, num_classes, max_items, seed=0)
        kept = knn_agreeing_labels(train.store_img, labels, train.query_img, train.labels, rows=candidates)
        ctx.kb_episode_filter["kept"] = int((kept >= 0).sum())
        log.info(
            "kb_episode_filter %s: %d of %d labelled KB items share their label with %d+ of their %d "
            "nearest images",
            asked,
            ctx.kb_episode_filter["kept"],
            labelled,
            KNN_FILTER_MIN_AGREE,
            KNN_FILTER_K,
        )
        options["knn"] = with_kb_episodes(train, num_classes, max_items, item_labels=kept)
        if asked == "knn" or ctx.kb_episode_filter["kept"] == len(candidates):
            return options
    options["none"] = with_kb_episodes(train, num_classes, max_items, item_labels=labels)
    return options


def _chosen_on_val(
    ctx: ExperimentContext, plan: dict[str, Any], train: Any, val: Any, options: dict[str, tuple[Any, int]]
) -> tuple[Any, int, RecordedSelection | None]:
    """(union, items added, its mlp_only selection or None where nothing was fitted) of the filter
    option val prefers: the only one, or with two (`kb_episode_filter: auto`) the unfiltered items only
    where the mlp_only selection with them scores higher on val than with the filtered ones (a tie keeps
    the filter). Records the choice and both scores in `ctx.kb_episode_filter`."""
    record = ctx.kb_episode_filter
    assert record is not None
    options = {name: option for name, option in options.items() if option[1] > 0}
    if len(options) == 2 and val is None:
        log.warning("kb_episode_filter auto: no select_split to choose on; the kNN filter is kept")
        options = {"knn": options["knn"]}
    if len(options) < 2:
        chosen = next(iter(options), None)
        record["chosen"] = chosen
        union, added = options[chosen] if chosen else (train, 0)
        return union, added, None
    fits = {
        name: _episodes_selection(ctx, plan, train, val, option[0], f"mlp_only [KB episodes, filter {name}]")
        for name, option in options.items()
    }
    scores = {name: fit.val_score for name, fit in fits.items()}
    chosen = "none" if scores["none"] > scores["knn"] else "knn"
    record.update(chosen=chosen, val_knn=scores["knn"], val_none=scores["none"])
    log.info(
        "kb_episode_filter auto: mlp_only val %.4f with the kNN filter (%d items), %.4f without (%d): %s",
        scores["knn"],
        options["knn"][1],
        scores["none"],
        options["none"][1],
        "kept" if chosen == "knn" else "dropped",
    )
    union, added = options[chosen]
    return union, added, fits[chosen]


def _scaled_epochs(plan: dict[str, Any], scale: float) -> dict[str, Any]:
    """The plan's `select` and `configs` with every epoch count times `scale` (at least 2)."""

    def scaled(epochs: int) -> int:
        return max(2, round(epochs * scale))

    sel = plan["select"]
    return {
        "select": replace(
            sel, baseline_epochs=scaled(sel.baseline_epochs), retformer_epochs=scaled(sel.retformer_epochs)
        ),
        "configs": {m: replace(c, epochs=scaled(c.epochs)) for m, c in plan["configs"].items()},
    }


def _caption_episodes(
    ctx: ExperimentContext, plan: dict[str, Any], train: Any, val: Any, num_classes: int, max_items: int
) -> tuple[Any, int, RecordedSelection | None]:
    """(the training features with caption-labelled KB episodes, how many, the mlp_only selection fitted
    on them) where the captions name the dataset's classes and val admits them; else (train, 0, None)
    and a warning that says why. The verdict is recorded in `ctx.kb_episode_check` (eval.json's
    `kb_episode_check`)."""
    class_text = ctx.class_text(train)
    if class_text is None:
        log.warning(NONE_JOINS, "no class names or KB text tower to read the captions with")
        return train, 0, None
    if val is None:
        log.warning(NONE_JOINS, "caption labels are admitted on val, and the experiment has no select_split")
        return train, 0, None
    named = caption_labels(train.store_txt, class_text)
    options = _filter_options(ctx, train, named, num_classes, max_items)
    if not any(added for _, added in options.values()):
        log.warning(NONE_JOINS, "no KB caption names one of the dataset's classes")
        return train, 0, None
    counts = class_counts(train.labels, num_classes)
    alone = select_mlp_only_recorded(ctx, plan, train, val, counts, "mlp_only [without KB episodes]")
    without = alone.val_score
    union, added, checked = _chosen_on_val(ctx, plan, train, val, options)
    if checked is None:
        checked = _episodes_selection(ctx, plan, train, val, union, "mlp_only [with KB episodes]")
    with_them = checked.val_score
    admitted = with_them >= without
    ctx.kb_episode_check = {
        "labels": "caption",
        "items": added,
        "val_without": without,
        "val_with": with_them,
        "admitted": admitted,
    }
    if not admitted:
        log.warning(
            NONE_JOINS,
            f"mlp_only scores {with_them:.3f} on val with the {added} caption-labelled items, "
            f"{without:.3f} without (their captions do not name these images' classes)",
        )
        return train, 0, None
    return union, added, checked


def _episodes_selection(
    ctx: ExperimentContext, plan: dict[str, Any], train: Any, val: Any, union: Any, line: str
) -> RecordedSelection:
    """The mlp_only selection on `union` (train and its KB items) as the run's mlp_only would be fitted
    if these items joined: its epochs scaled, its prior their class counts. `line`: its console line."""
    num_classes = int(ctx.info["num_classes"])
    scaled_plan = {**plan, **_scaled_epochs(plan, len(train) / len(union))}
    counts = class_counts(union.labels, num_classes)
    return select_mlp_only_recorded(ctx, scaled_plan, union, val, counts, line)
