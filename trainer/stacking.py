"""The prediction rule fitted on val instead of picked from a grid (`select.rule_fit: stack`).

The grid recipe picks one of ~1,500 rules (alpha, beta, image weight, prior adjustment, gate) by val
accuracy: on 300-1,000 val images the winner's val figure is optimistic by about a point, the size of
the gaps it decides (docs/method-notes.md, "Three seeds"). Stacking (Wolpert 1992; Breiman 1996 with
non-negative weights) fits the same family's linear part instead:

    logits = w L_I - b log prior + alpha L_R + beta log e,   w, alpha, beta >= 0, b free,

by minimising the class-balanced negative log-likelihood on val (each class weighs the same, as the
balanced test it estimates). The objective is smooth and convex in (w, b, alpha, beta), four numbers
fitted on a thousand images, so the fit has little to be optimistic about; a common scale of the
weights doubles as the temperature that makes the mix calibrated. In the model's rule the weights read
image_weight = w, prior_tau = b / w, alpha, beta, no gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A weight under this counts as 0 in the rule (below what a logit shows).
_ZERO = 1e-4
# L2 on the weights: keeps the fit finite where val is separable (a scale of the weights that grows
# without bound), far below the likelihood's own curvature otherwise.
RIDGE = 1e-4


@dataclass(frozen=True)
class Stack:
    """Fitted weights of L_I, the prior shift b (the rule subtracts b log prior), L_R and log e; `nll` the
    class-balanced val negative log-likelihood at the fit."""

    w: float
    b: float
    alpha: float
    beta: float
    nll: float

    def rule(self) -> dict[str, float]:
        """The weights as the model's rule keys (`RetFormer.combine`: w (L_I - prior_tau log prior) + ...)."""
        w = self.w if self.w > _ZERO else 0.0
        return {
            "image_weight": w,
            "prior_tau": self.b / w if w else 0.0,
            "alpha": self.alpha if self.alpha > _ZERO else 0.0,
            "beta": self.beta if self.beta > _ZERO else 0.0,
        }


def stack_logits(
    stack: Stack,
    l_i: torch.Tensor,
    log_prior: torch.Tensor,
    l_r: torch.Tensor | None = None,
    log_e: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, C) float64 logits of the fitted stack, at the fitted (calibrated) scale."""
    out = stack.w * l_i.double() - stack.b * log_prior.double()[None, :]
    if stack.alpha:
        out = out + stack.alpha * l_r.double()  # type: ignore[union-attr]
    if stack.beta:
        out = out + stack.beta * log_e.double()  # type: ignore[union-attr]
    return out


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) each image's negative log-likelihood times its weight: summed, the objective of the fit."""
    return -torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0] * weights


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """(N,) weights summing to 1 with every class present in `labels` weighing the same."""
    y = labels.long()
    counts = torch.bincount(y).double()
    present = int((counts > 0).sum())
    return (1.0 / (counts[y] * max(present, 1))).double()


def _newton(features: torch.Tensor, labels: torch.Tensor, sw: torch.Tensor, max_iter: int) -> torch.Tensor:
    """theta (K,) minimising sum_i sw_i CE(sum_j theta_j features[j, i], y_i) + RIDGE |theta|^2 by Newton's
    method with step halving (convex: the minimum is unique); features (K, N, C) float64."""
    k = features.shape[0]
    onehot = torch.nn.functional.one_hot(labels, features.shape[2]).double()
    theta = torch.zeros(k, dtype=torch.float64)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return weighted_nll(torch.einsum("k,knc->nc", t, features), labels, sw).sum() + RIDGE * (t * t).sum()

    flat = features.reshape(k, -1)
    current = loss(theta)
    for _ in range(max_iter):
        p = torch.softmax(torch.einsum("k,knc->nc", theta, features), dim=1)
        wp = sw[:, None] * p
        mean_f = (features * p).sum(dim=2)  # (K, N): E_p[F_j] per image
        grad = flat @ (wp - sw[:, None] * onehot).reshape(-1) + 2 * RIDGE * theta
        second = (flat * wp.reshape(-1)) @ flat.T
        hess = second - (mean_f * sw) @ mean_f.T + 2 * RIDGE * torch.eye(k, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            trial = theta - scale * step
            value = loss(trial)
            if value <= current:
                break
            scale /= 2
        else:
            break
        done = float(current - value) < 1e-12
        theta, current = trial, value
        if done:
            break
    return theta


def fit_stack(
    l_i: torch.Tensor,
    log_prior: torch.Tensor,
    labels: torch.Tensor,
    l_r: torch.Tensor | None = None,
    log_e: torch.Tensor | None = None,
    max_iter: int = 50,
    sample_weight: torch.Tensor | None = None,
) -> Stack:
    """Fit (w, b, alpha, beta) on val (float64 Newton). l_r / log_e None: that weight stays 0. Non-negative
    w, alpha, beta by an active set: a term whose free weight comes out negative is dropped and the rest
    refitted. sample_weight: each image's weight (default `class_weights(labels)`; a subset of val passes
    its rows of the whole split's, so the nll of subsets add up). Deterministic: same inputs, same weights."""
    y = labels.long()
    sw = class_weights(y) if sample_weight is None else sample_weight.double()
    n = len(y)
    prior = -log_prior.double()[None, :].expand(n, -1)
    terms = {"w": l_i, "alpha": l_r, "beta": log_e}
    active = [name for name, t in terms.items() if t is not None]
    while True:
        feats = torch.stack([prior] + [terms[name].double() for name in active])  # type: ignore[union-attr]
        theta = _newton(feats, y, sw, max_iter)
        weights = dict(zip(active, theta[1:].tolist(), strict=True))
        negative = [name for name, v in weights.items() if v < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda name: weights[name]))
    nll = float(weighted_nll(torch.einsum("k,knc->nc", theta, feats), y, sw).sum())
    return Stack(
        w=weights.get("w", 0.0),
        b=float(theta[0]),
        alpha=weights.get("alpha", 0.0),
        beta=weights.get("beta", 0.0),
        nll=nll,
    )
