"""The image-only models (trainer/image_models.py): one forward for both, that reads z alone."""

from __future__ import annotations

import torch

from retformer.trainer.image_models import ImageOnlyModel, LinearProbe, MLPOnly


def test_image_only_models_read_the_query_alone() -> None:
    """LinearProbe and MLPOnly share ImageOnlyModel's forward: they say they need no neighbours, and
    their logits are the same with any neighbour tensors or none (and equal their `image_logits`)."""
    torch.manual_seed(0)
    z = torch.randn(3, 8)
    for model in (LinearProbe(8, 4), MLPOnly(8, 4)):
        assert isinstance(model, ImageOnlyModel) and not model.needs_neighbors
        model.eval()
        bare = model(z)
        assert bare.shape == (3, 4)
        assert torch.equal(
            bare, model(z, torch.randn(3, 5, 8), torch.randn(3, 5, 6), nn_label=torch.zeros(3, 5))
        )
        assert torch.equal(bare, model.image_logits(z))
