"""The epoch loop's own contract (trainer/loop.py): what `train_epochs` takes and refuses."""

from __future__ import annotations

import pytest
import torch

from retformer.trainer.feature_feed import feature_feed
from retformer.trainer.loop import TrainingRun, train_epochs
from retformer.trainer.optim import make_optimizer, make_scheduler
from retformer.trainer.train import TrainConfig, fit
from tests.test_train import make_features, tiny_model


def _run(seed: int = 0) -> tuple[TrainingRun, torch.nn.Module]:
    feats = make_features(n=96, c=4)
    model = tiny_model(feats)
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, mixup_alpha=0.4, seed=seed)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, len(feats))
    feed = feature_feed(feats, config, torch.device("cpu"), True, 4)
    return TrainingRun(model, feed, config, optimizer, scheduler, feats.labels, 4, torch.device("cpu")), model


def test_train_epochs_refuses_an_unknown_option():
    """A misspelt option is a TypeError, as it was when the options were keyword parameters, not a
    silently ignored key (here `checkpoint_every` for `checkpoint_every_s`)."""
    run, _ = _run()
    with pytest.raises(TypeError, match="checkpoint_every"):
        train_epochs(run, progress=False, checkpoint_every=5.0)


def test_a_training_run_trains_like_fit():
    """`train_epochs` on a hand-built `TrainingRun` (feature feed, optimizer, schedule) ends with fit's
    weights and history, bitwise: fit adds only the checks and the device around the same loop."""
    run, model = _run(seed=5)
    history = train_epochs(run, progress=False)
    feats = make_features(n=96, c=4)
    other = tiny_model(feats)
    want = fit(other, feats, run.config, progress=False)
    assert [h["loss"] for h in history] == [h["loss"] for h in want]
    for name, value in other.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
