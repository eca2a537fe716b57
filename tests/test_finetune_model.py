"""FinetuneModel in its own module (trainer/finetune_model.py), below the checkpoint loader and the
fine-tune loop, so that loading a model file does not import training."""

from __future__ import annotations

from tests.test_use_layer import _reachable


def test_checkpoint_loader_reaches_no_training_loop() -> None:
    """Following every import of trainer.checkpoint (also inside functions) reaches FinetuneModel but
    neither trainer.finetune nor trainer.train: the circle checkpoint -> finetune -> train ->
    checkpoint is gone."""
    reached = _reachable("retformer.trainer.checkpoint")
    assert "retformer.trainer.finetune_model" in reached
    assert not reached & {"retformer.trainer.finetune", "retformer.trainer.train"}, sorted(reached)
    assert "retformer.trainer.checkpoint" not in _reachable("retformer.trainer.finetune_model")
