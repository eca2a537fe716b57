"""RetFormer (paper Eq. 3-6); the image-only baselines that share its forward signature are in
trainer/image_models.py.

    logits = tau/2 * (L_I + L_R),  L_I = MLP(z),  L_R = h(r(z, V_NN))          (Eq. 3)

r is the retrieval cross-fusion module. Two token streams of k+2 positions each:

    image: [cls_I, P_I(z),  P_I(E^I_1), ..., P_I(E^I_k)] + pos_I
    text:  [cls_T, 0,       P_T(E^T_1), ..., P_T(E^T_k)] + pos_T

The query's text slot is an all-zero vector (before its position embedding): the query's own
caption or label never enters the model; `forward` has no argument through which it could.
Each fusion layer (Eq. 4-6) updates both streams from the same input states:

    image <- Att(Q from text,  K, V from image) + image
    text  <- Att(Q from image, K, V from text)  + text

Departures from the bare equations, all standard ViT practice (the paper says it follows ViT):
pre-LayerNorm on each attention input; multi-head attention with an output projection; and a
feed-forward block (LN -> Linear -> GELU -> Linear, residual) after each attention. Eq. 5-6 show
attention + residual only: `ffn=False` gives exactly that form (still pre-LN). The head h reads
the final LayerNorm of the class-token outputs (full variant: cls_I and cls_T concatenated).

Variants (paper Sec. 4.5): "no_text" keeps only the image stream and "no_image" only the text
stream; a single stream attends to itself, i.e. "degenerates into a vanilla transformer encoder".
Their model kinds (= method names, `trainer/methods.py`) are retformer_no_text and retformer_no_image.

`trainer.model_factory.build_model` is the one factory: the experiment runner, fine-tune heads and the
tests all build there.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retformer.trainer.config import RECIPES, FusionOptions, PredictionRule
from retformer.trainer.evidence import ClassText, log_evidence, neighbour_vote
from retformer.trainer.image_models import ImageBranch, OptTensor, log_prior
from retformer.trainer.layers import CrossFusionLayer, SelfAttentionLayer

# RetFormer's model kinds (the names of the feature-mode methods that train them, `trainer/methods.py`;
# all kinds: `trainer.model_factory.MODEL_KINDS`) and the variant each builds.
RETFORMER_VARIANTS = {"retformer": "full", "retformer_no_text": "no_text", "retformer_no_image": "no_image"}
# What RetFormer's stacked rule may add as the neighbours' evidence (None: nothing; trainer/evidence.py).
EVIDENCE_KINDS = (None, "label", "caption")
VARIANTS = tuple(RETFORMER_VARIANTS.values())  # RetFormer's `variant`: "full", "no_text", "no_image"
_KIND_OF_VARIANT = {v: kind for kind, v in RETFORMER_VARIANTS.items()}
# The keys of a RetFormer's stored config, in the order model files have always held them.
STORED_KEYS = (
    *("kind", "img_dim", "txt_dim", "num_classes", "width", "depth", "heads", "k", "mlp_hidden", "tau"),
    *("variant", "dropout", "ffn", "ffn_ratio", "recipe", "alpha", "gate_t", "prior_tau", "beta", "evidence"),
    *("vote_temp", "caption_temp", "caption_null", "query_bias", "image_weight", "anchor", "anchor_temp"),
    *("vote_k", "closed_prior_tau"),
)


def _zero_centre_if_missing(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """A model file saved before captions were read centred has no `caption_centre`: load it as zeros (its
    captions are read uncentred, as they were when it was selected)."""
    key = prefix + "caption_centre"
    if key not in state and (prefix + "class_text") in state:
        state[key] = torch.zeros(state[prefix + "class_text"].shape[-1])


# How L_I and L_R are trained and combined: "paper" = one loss on tau/2 (L_I + L_R); "stacked" = L_I is
# a trained mlp_only, frozen, L_R learns on its own loss, prediction L_I + alpha * 1[s > t] * L_R.


class RetFormer(nn.Module):
    """Retrieval-augmented classifier: logits = tau/2 * (MLP(z) + h(cross_fusion(z, neighbors))).

    forward(z (B, Di), nn_img (B, k', Di), nn_txt (B, k', Dt)) with k' <= k (the model's number of
    neighbor positions). The variant "no_text" ignores nn_txt, "no_image" ignores nn_img (pass None).
    """

    needs_neighbors = True

    def __init__(
        self,
        img_dim: int,
        txt_dim: int,
        num_classes: int,
        k: int = 32,
        variant: str = "full",
        options: FusionOptions | None = None,
        rule: PredictionRule | None = None,
    ) -> None:
        """options: the architecture and recipe (defaults: `FusionOptions()`); rule: the prediction rule
        (default: `FusionOptions.alpha`'s, the rest at their defaults; `set_rule` changes it)."""
        super().__init__()
        options = options or FusionOptions()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if options.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {options.recipe!r}")
        self.options = replace(options, mlp_hidden=options.mlp_hidden or img_dim)
        self.img_dim, self.txt_dim, self.num_classes = img_dim, txt_dim, num_classes
        self.set_rule(rule or PredictionRule(alpha=options.alpha))
        width, depth, heads = options.width, options.depth, options.heads
        ffn, ffn_ratio, dropout, tau = options.ffn, options.ffn_ratio, options.dropout, options.tau
        mlp_hidden, query_bias, anchor = self.options.mlp_hidden, options.query_bias, options.anchor
        self.variant = variant
        self.k = k
        self.tau = tau
        self.use_img = variant in ("full", "no_text")
        self.use_txt = variant in ("full", "no_image")
        ffn_hidden = int(width * ffn_ratio)

        if self.use_img:
            self.proj_img = nn.Linear(img_dim, width)
            self.cls_img = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_img = nn.Parameter(torch.zeros(1, k + 2, width))
        if self.use_txt:
            self.proj_txt = nn.Linear(txt_dim, width)
            self.cls_txt = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_txt = nn.Parameter(torch.zeros(1, k + 2, width))
        self.query_bias = bool(query_bias) and self.use_img
        if self.query_bias:
            # Query-aware attention: a term per head and neighbour key added to every attention logit,
            # sim_scale * (s_j - 1) + rank_bias[j], s_j = cos(z, neighbour j's image). Without it, at depth 1
            # the class token's query is a constant, so a neighbour's weight cannot depend on z (issue 18).
            # 1 / 0.05: the similarity-weighted vote's temperature, where a learned weighting starts.
            self.sim_scale = nn.Parameter(torch.full((heads,), 20.0))
            self.rank_bias = nn.Parameter(torch.zeros(heads, k))
        layer = CrossFusionLayer if variant == "full" else SelfAttentionLayer
        self.layers = nn.ModuleList(layer(width, heads, ffn, ffn_hidden, dropout) for _ in range(depth))
        if self.use_img:
            self.norm_img = nn.LayerNorm(width)
        if self.use_txt:
            self.norm_txt = nn.LayerNorm(width)
        streams = int(self.use_img) + int(self.use_txt)
        self.head = nn.Linear(streams * width, num_classes)  # h
        self.mlp = ImageBranch(img_dim, num_classes, mlp_hidden)  # L_I branch
        # The stacked rule's fixed inputs (saved with the weights, never trained): the log of the training
        # class prior (post-hoc logit adjustment of L_I) and the class-name prompts' text vectors (caption
        # evidence) with the KB's mean caption vector they are read centred on; zeros until `set_prior` /
        # `set_class_text` (a zero centre reads captions uncentred, as a model saved before centring did).
        self.register_buffer("log_prior", torch.zeros(num_classes))
        self.register_buffer("class_text", torch.zeros(num_classes, txt_dim))
        self.register_buffer("caption_centre", torch.zeros(txt_dim))
        self.register_load_state_dict_pre_hook(_zero_centre_if_missing)
        self._init_weights()
        if anchor is not None:
            # Anchored L_R = log e + h(r(z, V_NN)): h starts at zero, so the untrained L_R (epoch 0) is the
            # neighbours' similarity-weighted vote and training learns a residual on it (issue 18).
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _init_weights(self) -> None:
        # ViT-style init for the fusion module; the MLP branch and head keep PyTorch's default.
        for name, p in self.named_parameters():
            if name.startswith(("cls_", "pos_")):
                nn.init.trunc_normal_(p, std=0.02)
        for module in [self.layers] + [
            getattr(self, n) for n in ("proj_img", "proj_txt") if hasattr(self, n)
        ]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def set_rule(self, rule: PredictionRule) -> None:
        """Predict with `rule` from now on (what the selection chose; saved with the model's config)."""
        if rule.evidence not in EVIDENCE_KINDS or self.options.anchor not in EVIDENCE_KINDS:
            raise ValueError(
                f"evidence and anchor must be one of {EVIDENCE_KINDS}, got {rule.evidence!r}, "
                f"{self.options.anchor!r}"
            )
        self.rule = rule

    @property
    def config(self) -> dict[str, Any]:
        """The model as stored in checkpoints and model files (`model_from_config` rebuilds it): its kind,
        sizes, options and rule in one flat dict, a copy (the rule changes through `set_rule`)."""
        values = {
            **{"kind": _KIND_OF_VARIANT[self.variant], "img_dim": self.img_dim, "txt_dim": self.txt_dim},
            **{"num_classes": self.num_classes, "k": self.k, "variant": self.variant},
            **asdict(self.options),
            **asdict(self.rule),  # the rule's alpha, not the options' starting one
        }
        return {key: values[key] for key in STORED_KEYS}

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (class tokens, position embeddings), as in ViT."""
        return {
            n for n, _ in self.named_parameters() if n.startswith(("cls_", "pos_", "sim_scale", "rank_bias"))
        }

    def _tokens(
        self, first: torch.Tensor, nn_vec: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        b, kk, _ = nn_vec.shape
        if kk > self.k:
            raise ValueError(f"got {kk} neighbours, the model has {self.k} neighbour positions")
        x = torch.cat([cls.expand(b, -1, -1), first[:, None, :], nn_vec], dim=1)
        return x + pos[:, : kk + 2]

    def forward(
        self,
        z: torch.Tensor,
        nn_img: torch.Tensor | None = None,
        nn_txt: torch.Tensor | None = None,
        return_attention: bool = False,
        *,
        nn_label: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, C). With return_attention=True also a dict stream -> weights (L, B, H, P, P),
        P = k'+2, token order [cls, query, nn_1..nn_k']; stream "image" holds the weights over image
        tokens (queries from the text stream in the full variant), "text" over text tokens.

        The prediction, in training mode too (what training fits: `training_logits`). recipe "paper":
        tau/2 (L_I + L_R). recipe "stacked": the rule (`PredictionRule`)
        w(g) * (L_I - prior_tau * log prior) + g * (alpha * L_R + beta * log e), g = 1[s > gate_t] (1
        without a gate), w(g) = image_weight where g = 1 and 1 where g = 0 (image_weight 0: retrieval alone
        where it applies, L_I where the gate is closed; where the gate is closed L_I's shift is
        closed_prior_tau when set, the fitted rule's), e the neighbours' evidence (`evidence`): the
        similarity-weighted vote of their KB labels (nn_label, "label") or of the classes their captions
        name ("caption")."""
        logits_r, attn = self._retrieval_logits(z, nn_img, nn_txt, return_attention, nn_label)
        # s only where combine() reads it: a full-width pass over the neighbours (B, k', Di) that ungated
        # prediction would compute and drop.
        s = relevance(z, nn_img) if nn_img is not None and self.gated() else None
        log_e = None
        if self.uses_evidence():
            log_e = log_evidence(self.evidence(z, nn_img, nn_txt, nn_label))
        logits = self.combine(self.mlp(z), logits_r, s, log_e)
        return (logits, attn) if return_attention else logits

    def training_logits(
        self, z: torch.Tensor, nn_img: OptTensor, nn_txt: OptTensor, *, nn_label: OptTensor = None
    ) -> torch.Tensor:
        """(B, C) the logits training fits: recipe "paper" the prediction tau/2 (L_I + L_R); recipe
        "stacked" L_R alone (L_I is the frozen mlp_only, so the loss is L_R's own). The epoch loop calls
        it through `trainer.loop.Fitting` (DDP wraps that one's forward)."""
        if self.options.recipe == "paper":
            return self(z, nn_img, nn_txt, nn_label=nn_label)
        return self._retrieval_logits(z, nn_img, nn_txt, False, nn_label)[0]

    def uses_evidence(self) -> bool:
        """Whether the prediction reads the neighbours' evidence (stacked, beta > 0)."""
        return self.options.recipe == "stacked" and float(self.rule.beta) != 0

    def evidence(
        self,
        z: torch.Tensor,
        nn_img: torch.Tensor | None,
        nn_txt: torch.Tensor | None,
        nn_label: torch.Tensor | None,
        kind: str | None = None,
        vote_temp: float | None = None,
        vote_k: int | None = None,
    ) -> torch.Tensor:
        """(B, C) the neighbours' evidence under this model's settings (or the `kind` / `vote_temp` /
        `vote_k` given): the votes of the first vote_k neighbours (all when None) weighted by
        softmax(cos(z, neighbour image) / vote_temp) (uniform without nn_img)."""
        rule = self.rule
        # The rule's own vote (no `kind` given) reads its first vote_k neighbours: the weighted-vote
        # baseline's k, chosen on val; an explicit kind (the anchor, a selection) says its own k.
        k = vote_k if vote_k is not None else (rule.vote_k if kind is None else None)
        if k is not None:
            nn_img, nn_txt, nn_label = (None if x is None else x[:, :k] for x in (nn_img, nn_txt, nn_label))
        return neighbour_vote(
            kind or rule.evidence,
            z,
            nn_img,
            nn_txt,
            nn_label,
            int(self.num_classes),
            float(vote_temp if vote_temp is not None else rule.vote_temp),
            self.class_reader(),
            rule.caption_temp,
            rule.caption_null,
        )

    def set_prior(self, class_counts: list[int] | torch.Tensor) -> None:
        """log of the training class prior (a count of 0 counts as 1), for the post-hoc adjustment."""
        self.log_prior.copy_(log_prior(class_counts, len(self.log_prior)))

    def set_class_text(self, class_text: ClassText | torch.Tensor) -> None:
        """What the caption evidence reads captions against: the class-name prompts' unit text vectors
        (C, txt_dim) and the KB's caption centre (`evidence.ClassText`; a bare tensor: no centre)."""
        reader = ClassText.of(class_text)
        self.class_text.copy_(reader.prompts.to(self.class_text))
        self.caption_centre.copy_(reader.centre.to(self.caption_centre))

    def class_reader(self) -> ClassText:
        """The class text this model reads captions with (`set_class_text`'s)."""
        return ClassText(self.class_text, self.caption_centre)

    def branches(
        self,
        z: torch.Tensor,
        nn_img: torch.Tensor | None,
        nn_txt: torch.Tensor | None,
        nn_label: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_I, L_R) before they are combined: what the alpha / gate search on val reads."""
        return self.mlp(z), self._retrieval_logits(z, nn_img, nn_txt, False, nn_label)[0]

    def gated(self) -> bool:
        """Whether `combine` reads the relevance s: a stacked model with a gate on alpha L_R + beta log e
        (one of them non-zero)."""
        rule = self.rule
        retrieval = float(rule.alpha) != 0 or float(rule.beta) != 0
        return self.options.recipe == "stacked" and retrieval and rule.gate_t is not None

    def combine(
        self,
        logits_i: torch.Tensor,
        logits_r: torch.Tensor,
        s: torch.Tensor | None,
        log_e: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prediction from the branches under the model's recipe and rule (see `forward`); s (B,) is
        `relevance(z, nn_img)`, read only by a gated stacked model, log_e (B, C) the log evidence, read
        only when beta > 0."""
        if self.options.recipe == "paper":
            return self.tau / 2 * (logits_i + logits_r)
        rule = self.rule
        alpha, beta, gate_t = float(rule.alpha), float(rule.beta), rule.gate_t
        w_i = float(rule.image_weight)
        out = logits_i
        if float(rule.prior_tau):
            out = out - float(rule.prior_tau) * self.log_prior.to(out)
        if alpha == 0 and beta == 0:
            return out
        extra = alpha * logits_r if alpha else torch.zeros_like(out)
        if beta:
            if log_e is None:
                raise ValueError("a RetFormer with beta > 0 needs its neighbours' evidence")
            extra = extra + beta * log_e.to(out)
        if gate_t is None:
            return (out if w_i == 1 else w_i * out) + extra
        if s is None:
            raise ValueError("a gated RetFormer needs nn_img to score its neighbors")
        g = (s > float(gate_t)).float()[:, None]
        closed_tau = rule.closed_prior_tau
        if closed_tau is not None:  # a fitted rule (select.rule_fit stack): L_I's own shift where closed
            closed = logits_i - float(closed_tau) * self.log_prior.to(logits_i)
            return g * (w_i * out + extra) + (1 - g) * closed
        if w_i == 1:
            return out + g * extra
        # L_I at weight w_i where the retrieval term applies, at full weight where the gate is closed
        return out * (1 - g * (1 - w_i)) + g * extra

    def _attention_bias(self, z: torch.Tensor, nn_img: torch.Tensor | None) -> torch.Tensor:
        """(B, H, 1, k'+2) the query-aware term of every attention logit, per key: 0 for the class token and
        the query, sim_scale * (s_j - 1) + rank_bias[j] for neighbour j (s_j its image cosine with z)."""
        if nn_img is None:
            raise ValueError("a RetFormer with query_bias needs nn_img")
        sim = neighbour_similarity(z, nn_img)  # (B, k')
        kk = sim.shape[1]
        nb = self.sim_scale[None, :, None] * (sim[:, None, :] - 1) + self.rank_bias[None, :, :kk]
        bias = torch.cat([nb.new_zeros(nb.shape[0], nb.shape[1], 2), nb], dim=-1)
        return bias[:, :, None, :].to(z.dtype)

    def _retrieval_logits(
        self,
        z: torch.Tensor,
        nn_img: torch.Tensor | None,
        nn_txt: torch.Tensor | None,
        return_attention: bool,
        nn_label: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_R = h(cross_fusion(z, neighbors)) (+ log e, the anchor vote, when `anchor` is set) and, when
        asked, the attention weights per stream."""
        x_img = x_txt = None
        if self.use_img:
            if nn_img is None:
                raise ValueError(f"variant {self.variant!r} needs nn_img")
            x_img = self._tokens(self.proj_img(z), self.proj_img(nn_img), self.cls_img, self.pos_img)
        if self.use_txt:
            if nn_txt is None:
                raise ValueError(f"variant {self.variant!r} needs nn_txt")
            t = self.proj_txt(nn_txt)
            # The query's text slot: zeros, never the query's own caption (no leakage of its label).
            x_txt = self._tokens(t.new_zeros(t.shape[0], t.shape[2]), t, self.cls_txt, self.pos_txt)

        bias = self._attention_bias(z, nn_img) if self.query_bias else None
        w_img: list[torch.Tensor] = []
        w_txt: list[torch.Tensor] = []
        for layer in self.layers:
            if self.variant == "full":
                x_img, x_txt, (wi, wt) = layer(x_img, x_txt, return_attention, bias)
                w_img.append(wi)
                w_txt.append(wt)
            elif self.use_img:
                x_img, wi = layer(x_img, return_attention, bias)
                w_img.append(wi)
            else:
                x_txt, wt = layer(x_txt, return_attention)
                w_txt.append(wt)

        cls_out = []
        if self.use_img:
            cls_out.append(self.norm_img(x_img[:, 0]))
        if self.use_txt:
            cls_out.append(self.norm_txt(x_txt[:, 0]))
        attn = {}
        if return_attention:
            if w_img:
                attn["image"] = torch.stack(w_img)
            if w_txt:
                attn["text"] = torch.stack(w_txt)
        logits = self.head(torch.cat(cls_out, dim=-1))
        anchor = self.options.anchor
        if anchor is not None:
            vote = self.evidence(z, nn_img, nn_txt, nn_label, kind=anchor, vote_temp=self.options.anchor_temp)
            logits = logits + log_evidence(vote).to(logits.dtype)
        return logits, attn


def neighbour_similarity(z: torch.Tensor, nn_img: torch.Tensor) -> torch.Tensor:
    """(B, k) cosine between each query image and each of its neighbours' images."""
    return (F.normalize(z, dim=-1)[:, None, :] * F.normalize(nn_img, dim=-1)).sum(-1)


def relevance(z: torch.Tensor, nn_img: torch.Tensor) -> torch.Tensor:
    """s (B,): mean cosine between each query image z and its neighbours' images, from the vectors
    given (not the neighbour table's scores), so shuffled or foreign neighbours score low."""
    return neighbour_similarity(z, nn_img).mean(1)


def neighbor_attention(attn: dict[str, torch.Tensor], layer: int = -1) -> dict[str, torch.Tensor]:
    """The class token's attention over the k neighbors (head mean), per stream: (B, k) each.

    This is what the paper's Fig. 5 displays above each retrieved image. The rest of the class
    token's attention mass goes to itself and to the query slot."""
    return {name: w[layer].mean(dim=1)[:, 0, 2:] for name, w in attn.items()}
