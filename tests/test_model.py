"""RetFormer and baseline models: shapes, no leakage of the query's own text, attention, gradients."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

from retformer.trainer.config import FusionOptions
from retformer.trainer.image_models import LinearProbe, MLPOnly
from retformer.trainer.model import RetFormer, neighbor_attention
from retformer.trainer.model_factory import build_model, model_from_config
from retformer.trainer.stored_model import parse_stored_model

torch.set_num_threads(1)

DI, DT, C, K, B = 16, 12, 5, 6, 3
KINDS = ("retformer", "retformer_no_text", "retformer_no_image", "linear_probe", "mlp_only")


def _inputs(seed: int = 0, k: int = K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, DI, generator=g),
        torch.randn(B, k, DI, generator=g),
        torch.randn(B, k, DT, generator=g),
    )


def _model(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"width": 32, "depth": 2, "heads": 4, **kw} if kind not in ("linear_probe", "mlp_only") else {}
    return build_model(kind, C, DI, DT, K, FusionOptions(**extra)).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes(kind: str) -> None:
    """Every model kind maps (z, nn_img, nn_txt) to (B, C) logits, also with fewer than k neighbors."""
    model = _model(kind)
    assert model(*_inputs()).shape == (B, C)
    assert model(*_inputs(k=K - 2)).shape == (B, C)


def test_too_many_neighbors_rejected() -> None:
    """More neighbors than the model has position embeddings is an error, not a silent truncation."""
    with pytest.raises(ValueError, match="neighbour positions"):
        _model("retformer")(*_inputs(k=K + 1))


def test_no_input_for_query_text_and_zero_slot() -> None:
    """The forward signature has no argument for the query's own text, and the query's text token
    entering the first fusion layer is exactly its position embedding (a zero vector before it)."""
    for cls in (RetFormer, LinearProbe, MLPOnly):
        params = list(inspect.signature(cls.forward).parameters)
        assert params[:4] == ["self", "z", "nn_img", "nn_txt"]
        # nn_label: the neighbours' KB labels (the query's own KB row is never among its neighbours)
        assert set(params) <= {"self", "z", "nn_img", "nn_txt", "return_attention", "nn_label"}
    for kind in ("retformer", "retformer_no_image"):
        model = _model(kind)
        seen = {}

        def hook(module, args, seen=seen, kind=kind):
            # CrossFusionLayer(x_img, x_txt, need_weights); SelfAttentionLayer(x, need_weights)
            seen["txt"] = args[1] if kind == "retformer" else args[0]

        model.layers[0].register_forward_pre_hook(hook)
        model(*_inputs())
        expected = model.pos_txt[0, 1].expand(B, -1)
        torch.testing.assert_close(seen["txt"][:, 1], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "text_matters", "image_matters"),
    [
        ("retformer", True, True),
        ("retformer_no_image", True, False),
        ("retformer_no_text", False, True),
        ("linear_probe", False, False),
        ("mlp_only", False, False),
    ],
)
def test_which_neighbor_inputs_change_logits(kind: str, text_matters: bool, image_matters: bool) -> None:
    """Changing the neighbors' texts changes the logits of "full" and "no_image" only; changing the
    neighbors' images changes "full" and "no_text" only; the baselines ignore both."""
    model = _model(kind)
    z, nn_img, nn_txt = _inputs(0)
    _, other_img, other_txt = _inputs(1)
    with torch.no_grad():
        base = model(z, nn_img, nn_txt)
        new_txt = model(z, nn_img, other_txt)
        new_img = model(z, other_img, nn_txt)
    assert (not torch.allclose(base, new_txt)) == text_matters
    assert (not torch.allclose(base, new_img)) == image_matters


@pytest.mark.parametrize("kind", ["retformer", "retformer_no_text", "retformer_no_image"])
def test_attention_weights_are_distributions(kind: str) -> None:
    """return_attention gives (L, B, H, P, P) weights per stream whose rows sum to 1, the same logits
    as the fused-kernel path, and (B, k) class-token weights over the neighbors (Fig. 5)."""
    model = _model(kind)
    inputs = _inputs()
    with torch.no_grad():
        logits, attn = model(*inputs, return_attention=True)
        torch.testing.assert_close(logits, model(*inputs), rtol=1e-5, atol=1e-5)
    expected = {
        "retformer": {"image", "text"},
        "retformer_no_text": {"image"},
        "retformer_no_image": {"text"},
    }[kind]
    assert set(attn) == expected
    for w in attn.values():
        assert w.shape == (2, B, 4, K + 2, K + 2)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    for w in neighbor_attention(attn).values():
        assert w.shape == (B, K)
        assert (w.sum(-1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("ffn", [True, False])
def test_gradients_reach_every_parameter(ffn: bool) -> None:
    """One backward pass gives every parameter of the full model a non-zero gradient (no dead branch)."""
    model = _model("retformer", ffn=ffn).train()
    z, nn_img, nn_txt = _inputs()
    loss = torch.nn.functional.cross_entropy(model(z, nn_img, nn_txt), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    if not ffn:
        assert not any("ffn" in n for n, _ in model.named_parameters())


def test_logits_are_tau_half_sum_of_branches() -> None:
    """logits = tau/2 * (L_I + L_R) (Eq. 3): doubling tau doubles the logits, and L_I is MLP(z)."""
    m2 = _model("retformer", tau=2.0)
    m4 = _model("retformer", tau=4.0)
    m4.load_state_dict(m2.state_dict())
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m4(*inputs), 2 * m2(*inputs))
        # Zeroing the retrieval head leaves exactly the MLP branch.
        m2.head.weight.zero_()
        m2.head.bias.zero_()
        torch.testing.assert_close(m2(*inputs), m2.mlp(inputs[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_model_from_config_roundtrip(kind: str) -> None:
    """A model rebuilt from its .config and state_dict gives identical logits (what checkpoints rely on)."""
    model = _model(kind)
    clone = model_from_config(parse_stored_model(model.config)).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), clone(*_inputs()))


def test_bad_arguments() -> None:
    """Unknown variants / kinds and a missing required modality fail loudly."""
    with pytest.raises(ValueError, match="variant"):
        RetFormer(DI, DT, C, variant="both")
    with pytest.raises(ValueError, match="kind"):
        build_model("resnet", C, DI)
    with pytest.raises(ValueError, match="nn_txt"):
        _model("retformer")(_inputs()[0], _inputs()[1], None)


@pytest.mark.parametrize("mlp_hidden", [None, 8])
def test_mlp_only_is_exactly_retformers_image_branch(mlp_hidden: int | None) -> None:
    """The mlp_only ablation built by the one factory from the same `model:` options as RetFormer is
    RetFormer's L_I branch alone: the same module class and hidden width (img_dim unless mlp_hidden
    says otherwise; never RetFormer's fusion width), the same state-dict keys, and with RetFormer's
    L_I weights it gives exactly RetFormer's L_I logits."""
    options = {"width": 32, "depth": 2, "heads": 4, "mlp_hidden": mlp_hidden}
    ret = build_model("retformer", C, DI, DT, K, FusionOptions(**options)).eval()
    mlp = build_model("mlp_only", C, DI, DT, K, FusionOptions(**options)).eval()
    assert type(mlp.mlp) is type(ret.mlp)
    assert mlp.mlp.hidden == ret.mlp.hidden == (mlp_hidden or DI)
    assert mlp.config["mlp_hidden"] == ret.config["mlp_hidden"]
    branch = {k: v for k, v in ret.state_dict().items() if k.startswith("mlp.")}
    assert set(mlp.state_dict()) == set(branch)
    mlp.load_state_dict(branch)
    z = _inputs()[0]
    with torch.no_grad():
        assert torch.equal(mlp(z), ret.mlp(z))


@pytest.mark.parametrize("kind", ("retformer", "retformer_no_text", "retformer_no_image"))
def test_stacked_recipe_combines_branches_by_alpha_and_gate(kind: str) -> None:
    """Recipe "stacked": the training logits are L_R alone (its own loss); the prediction
    L_I + alpha * 1[s > t] * L_R with s the mean query-neighbour image cosine; alpha 0 is exactly L_I;
    the paper recipe is tau/2 (L_I + L_R) on the same weights; alpha and t survive model_from_config."""
    from retformer.trainer.model import relevance

    z, nn_img, nn_txt = _inputs()
    nn_img[0] = z[0]  # query 0's neighbours are itself: s = 1; the others' are random: s ~ 0
    paper = _model(kind)
    stacked = _model(kind, recipe="stacked", alpha=0.5)
    stacked.load_state_dict(paper.state_dict())
    with torch.no_grad():
        li, lr = stacked.branches(z, nn_img, nn_txt)
        torch.testing.assert_close(paper(z, nn_img, nn_txt), paper.tau / 2 * (li + lr))
        torch.testing.assert_close(stacked(z, nn_img, nn_txt), li + 0.5 * lr)
        stacked.train()
        torch.testing.assert_close(stacked.training_logits(z, nn_img, nn_txt), lr)
        stacked.eval()
        stacked.set_rule(replace(stacked.rule, gate_t=0.9))
        s = relevance(z, nn_img)
        assert s[0] > 0.99 and (s[1:] < 0.9).all()
        gated = stacked(z, nn_img, nn_txt)
        torch.testing.assert_close(gated[0], li[0] + 0.5 * lr[0])
        torch.testing.assert_close(gated[1:], li[1:])
        clone = model_from_config(parse_stored_model(stacked.config)).eval()
        clone.load_state_dict(stacked.state_dict())
        assert torch.equal(clone(z, nn_img, nn_txt), gated)
        stacked.set_rule(replace(stacked.rule, alpha=0.0))
        assert torch.equal(stacked(z, nn_img, nn_txt), li)
