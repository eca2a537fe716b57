"""The trainer's configuration dataclasses, without torch: what an experiment manifest's `train:`,
`finetune:` and `select:` sections are checked against (pipelines/experiment_schema.py) and what
the training code runs with. A default or a limit lives here once (limits as `Annotated` fields)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from retformer.artifacts.errors import UserError

# The ways a RetFormer's branches are combined (trainer/model.py).
RECIPES = ("paper", "stacked")
# The fine-tune methods (mode "finetune" in trainer/methods.py, which checks this list), named here too so
# that `retformer list experiments` tells which experiments train an encoder without importing torch.
FINETUNE_NAMES = ("retformer_ft", "retformer_no_text_ft", "retformer_no_image_ft", "full_finetune")
# The method names an experiment may list, in table order (trainer/methods.py holds what each is).
METHOD_NAMES = (
    *("retformer", "retformer_no_text", "retformer_no_image", "mlp_only", "linear_probe", "knn_vote"),
    *("knn_weighted", "caption_vote", "mlp_vote", "ncm"),
    *FINETUNE_NAMES,
    "zeroshot",
)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the paper's recipe)."""

    # Annotated limits are what manifests are checked against (pipelines/experiment_schema.py).
    epochs: Annotated[int, Field(ge=1)] = 25
    batch_size: Annotated[int, Field(ge=1)] = 256
    lr: Annotated[float, Field(gt=0)] = 5e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.2  # 0 = off
    loss: Literal["ce", "logit_adjusted"] = "ce"
    la_tau: float = 1.0  # logit-adjustment strength (Menon et al. use 1)
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    amp: bool = True  # autocast on CUDA (bfloat16; float16 + GradScaler where bf16 is missing); not on CPU
    features_on_device: bool = True  # copy the features to the GPU once; gather batches there
    eval_batch_size: Annotated[int, Field(ge=1)] = 1024
    # torch intra-op threads of a feature-mode fit on the CPU: 0 = auto (one thread for a small head,
    # `trainer.train.head_threads`; else torch's default), N = N. The thread count can move the last
    # bits of a reduction, never the maths.
    threads: Annotated[int, Field(ge=0)] = 0

    # Fields that may change between a run and its resumption (they do not change the maths).
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"device", "features_on_device", "eval_batch_size", "threads"}
    )

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "logit_adjusted"):
            raise UserError(f"loss must be 'ce' or 'logit_adjusted', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch_size must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            raise UserError(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig plus the encoder's training: its lr, accumulation, augmentation, data loading."""

    encoder_lr: Annotated[float, Field(ge=0)] = 1e-5
    accumulate: Annotated[int, Field(ge=1)] = 1  # micro-batches of batch_size per optimizer step
    # DataLoader worker processes decoding + augmenting images (0 = in-process)
    num_workers: Annotated[int, Field(ge=0)] = 4
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: fraction of the image area
    hflip: bool = True
    # "shards" (the dataset's webdataset shards) | "dataset" (its loader)
    images: Literal["shards", "dataset"] = "shards"
    grad_checkpointing: bool = False  # recompute encoder activations in backward (less GPU memory)

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {"num_workers"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.crop_scale = tuple(float(x) for x in self.crop_scale)  # YAML gives a list
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(
                f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.accumulate < 1:
            raise UserError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.encoder_lr < 0:
            raise UserError(f"encoder_lr must be >= 0, got {self.encoder_lr}")
        if self.images not in ("shards", "dataset"):
            raise UserError(f"finetune images must be 'shards' or 'dataset', got {self.images!r}")


# ---------------------------------------------------------------------------------------- model
# How sharply a caption is read as a class, and the "names no class" slot's cosine (trainer/evidence.py).
# The slot's cosine is for centred reading (`evidence.ClassText`), chosen on the KBs' own captions against
# their labels (docs/method-notes.md, "eighth round"): at 0.1 every caption of the three labelled demo KBs
# names its class and 0-11 of the 2,198 captions of an unrelated KB name any; 0.0 let 29-150 through,
# 0.2 dropped 37 of 616 own-data captions. A model saved before centring keeps its own 0.0.
CAPTION_TEMP = 0.05
CAPTION_NULL = 0.1


@dataclass(frozen=True)
class FusionOptions:
    """RetFormer's options: its architecture, its training recipe, the rule's starting alpha. The experiment
    manifest's `model:` section is this class seen as a schema (pipelines/experiment_schema.py) and
    `trainer.model_factory.build_model` takes it; one section serves every method, a model ignores what it
    has no use for (mlp_hidden sizes the L_I branch of RetFormer and mlp_only alike)."""

    width: Annotated[int, Field(ge=1)] = 256
    depth: Annotated[int, Field(ge=1)] = 4
    heads: Annotated[int, Field(ge=1)] = 4
    tau: Annotated[float, Field(gt=0)] = 2.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    ffn: bool = True
    ffn_ratio: Annotated[float, Field(gt=0)] = 4.0
    mlp_hidden: Annotated[int, Field(ge=1)] | None = None  # None: img_dim
    recipe: Literal[RECIPES] = "paper"  # type: ignore[valid-type]
    # The prediction rule's alpha a new model starts with (`PredictionRule.alpha`; selection chooses its own)
    alpha: float = 1.0
    # Query-aware fusion: attention logits get sim_scale * (cos(z, neighbour) - 1) + a rank term (issue 18)
    query_bias: bool = False
    # Anchored L_R (stacked recipe): L_R = log(similarity-weighted vote) + a residual head that starts at 0;
    # "auto" = the KB's labels where they are the dataset's classes, else the classes captions name (the
    # selection resolves it; a model itself is built with label, caption or None)
    anchor: Literal["auto", "label", "caption"] | None = None
    anchor_temp: Annotated[float, Field(gt=0)] = 0.05

    def __post_init__(self) -> None:
        # A Python caller's `tau=2` is stored as 2.0 (the model's config), as the manifest's would be.
        for name in ("tau", "dropout", "ffn_ratio", "alpha", "anchor_temp"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class PredictionRule:
    """How a stacked RetFormer's prediction combines its branches (`RetFormer.combine`):
    w(g) * (L_I - prior_tau * log prior) + g * (alpha * L_R + beta * log e), g = 1[s > gate_t] (1 without a
    gate), w(g) = image_weight where g = 1, 1 where g = 0 (L_I's shift there closed_prior_tau when set), e
    the first vote_k neighbours' `evidence` vote at vote_temp. Chosen on val by the selection
    (`model.set_rule`), saved with the weights in the model's config. The paper recipe reads none of it."""

    alpha: float = 1.0
    gate_t: float | None = None
    prior_tau: float = 0.0
    beta: float = 0.0
    evidence: Literal["label", "caption"] | None = None
    vote_temp: float = 0.05
    caption_temp: float = CAPTION_TEMP
    caption_null: float = CAPTION_NULL
    image_weight: float = 1.0
    vote_k: int | None = None
    closed_prior_tau: float | None = None


@dataclass(frozen=True)
class SelectOptions:
    """The experiment manifest's `select:` section (the grids every method gets)."""

    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # mlp_only
    baseline_epochs: int = 200
    # linear_probe: L2 strengths of its logistic regression (trainer/logistic_probe.py), chosen on val
    probe_l2: tuple[float, ...] = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
    # (lr, la_tau) cells of the stacked RetFormer; la_tau 0 = plain cross-entropy
    retformer_grid: tuple[tuple[float, float], ...] = ((3e-3, 0.0), (1e-2, 0.0), (3e-3, 1.0))
    # epochs of each (lr, la_tau) cell: a number, or {dataset name: epochs, default: epochs}
    retformer_epochs: int | dict[str, int] = 30
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    gate_quantiles: tuple[float | None, ...] = (None, 0.01, 0.05, 0.1, 0.2)  # None = no gate
    knn_k: tuple[int, ...] = (1, 5, 10, 20, 32)
    tolerance: float = 1.0  # points of select_metric the shuffled-neighbour control may lose against L_I
    shuffle_seed: int = 123
    # What every choice maximises on val: "balanced" = mean per-class accuracy (what a class-balanced
    # test reports; a val held out of long-tailed training data is itself long-tailed, and its top-1
    # rewards the head classes), or "top1".
    select_metric: Literal["balanced", "top1"] = "balanced"
    # Post-hoc logit adjustment of the image branch (mlp_only and RetFormer's L_I): logits - tau * log prior
    prior_taus: tuple[float, ...] = (0.0, 0.5, 1.0)
    # Weight of the neighbours' evidence, beta * log(similarity-weighted vote), in RetFormer's rule
    betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    # Temperatures of the similarity-weighted votes (knn_weighted, caption_vote, RetFormer's evidence)
    vote_temps: tuple[float, ...] = (0.02, 0.05, 0.1)
    # Weight of L_I where the rule's retrieval term applies (s > t): 1 = L_I plus retrieval; 0 = retrieval
    # alone (the vote or L_R), L_I only where the gate is closed: the rule's other endpoint (issue 18)
    image_weights: tuple[float, ...] = (1.0, 0.5, 0.0)
    # Points of select_metric a rule with retrieval must gain on val over the best rule without it to be
    # chosen (0: any gain; issue 18's "alpha > 0 only with > 1 val point gain", checked on a control)
    min_gain: float = 0.0
    # How RetFormer's rule is chosen: "grid" = the best of the rule grid above by the val criterion;
    # "stack" = its linear weights fitted on val by class-balanced log-likelihood (trainer/stacking.py),
    # the checkpoint and the evidence chosen by that likelihood (the gate and image-weight grids unused)
    rule_fit: Literal["grid", "stack"] = "grid"
    # With rule_fit stack: what RetFormer falls back to when its fitted rule does not beat it on val by
    # min_gain: "l_i" = L_I alone; "l_i_or_vote" = the better on val of L_I alone and the evidence's vote
    # alone where a gate opens (L_I where closed; the gate must pass the shuffled-neighbour control)
    single_source: Literal["l_i", "l_i_or_vote"] = "l_i"

    @classmethod
    def from_manifest(cls, raw: dict[str, Any] | None) -> SelectOptions:
        """UserError on an unknown key or a malformed grid."""
        raw = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UserError(
                f"select: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        try:
            out = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            if "retformer_grid" in out:
                out["retformer_grid"] = tuple((float(lr), float(tau)) for lr, tau in out["retformer_grid"])
            opts = cls(**out)
        except (TypeError, ValueError) as e:
            raise UserError(f"select: malformed option ({e})") from e
        if 0.0 not in opts.alphas:
            raise UserError("select.alphas must contain 0 (L_I alone: the always-admissible rule)")
        if 1.0 not in opts.image_weights or min(opts.image_weights) < 0:
            raise UserError("select.image_weights must contain 1 (L_I at full weight) and be >= 0")
        if 0.0 not in opts.betas or 0.0 not in opts.prior_taus:
            raise UserError("select.betas and select.prior_taus must contain 0 (the rule without them)")
        if opts.rule_fit not in ("grid", "stack"):
            raise UserError(f"select.rule_fit must be grid or stack, got {opts.rule_fit!r}")
        if not opts.probe_l2 or min(opts.probe_l2) <= 0:
            raise UserError(f"select.probe_l2 must be > 0, got {list(opts.probe_l2)}")
        if not opts.vote_temps or min(opts.vote_temps) <= 0:
            raise UserError(f"select.vote_temps must be > 0, got {list(opts.vote_temps)}")
        epochs = opts.retformer_epochs
        values = list(epochs.values()) if isinstance(epochs, dict) else [epochs]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise UserError(f"select.retformer_epochs must be >= 1 or a mapping to such, got {epochs!r}")
        return opts

    def for_dataset(self, name: str) -> SelectOptions:
        """These options with retformer_epochs resolved for dataset `name` (its entry, else `default`)."""
        epochs = self.retformer_epochs
        if isinstance(epochs, dict):
            if name not in epochs and "default" not in epochs:
                raise UserError(f"select.retformer_epochs has no entry for dataset {name} and no default")
            epochs = epochs.get(name, epochs.get("default"))
        return replace(self, retformer_epochs=epochs)
