"""One progress line per trained model: `retformer 12/20 loss 0.61 val 0.78` on stderr.

A model may be trained by several fits (a selection grid trains one per lr or (lr, la_tau) cell): the
caller that knows the model's name opens one `ModelProgress` for all of them with `tracking()`, and
every `train_epochs` inside reports its epochs there. Without one, `train_epochs` opens its own line
(named "train"). Per-epoch figures go to the metrics file only, never to the console.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from tqdm import tqdm

from retformer.trainer.config import TrainConfig

_CURRENT: ContextVar[ModelProgress | None] = ContextVar("model_progress", default=None)
# (model name, epoch number over the model's fits, the epoch's metrics line) -> None: see `listening`
EpochListener = Callable[[str, int, dict[str, Any]], None]
_LISTENERS: ContextVar[tuple[EpochListener, ...]] = ContextVar("epoch_listeners", default=())

# `{desc} {n}/{total}` first, as a person reads it; tqdm's bar and times after.
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} {figures} |{bar:16}| {elapsed}<{remaining}"


class _Line(tqdm):
    """tqdm with a `{figures}` field (its postfix would put a comma after the counts)."""

    figures = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "figures": self.figures}


def val_figure(entry: dict[str, Any]) -> float | None:
    """The val top-1 of an epoch entry: `val_top1`, else the best of the `val_top1_<choice>` figures a
    selection records (one per alpha, say); None without a val figure."""
    if entry.get("val_top1") is not None:
        return float(entry["val_top1"])
    return _best_of(entry, "val_top1_")


def val_loglik(entry: dict[str, Any]) -> float | None:
    """The best `val_loglik_<choice>` of an epoch entry: the class-balanced val log-likelihood a fitted
    rule (select.rule_fit: stack) chooses its checkpoint by; None without one."""
    return _best_of(entry, "val_loglik_")


def _best_of(entry: dict[str, Any], prefix: str) -> float | None:
    values = [float(v) for k, v in entry.items() if k.startswith(prefix) and v is not None]
    return max(values) if values else None


class ModelProgress:
    """The progress of one model across every fit that trains it, and optionally the metrics file
    those fits share (`log_path`: one JSON line per epoch with `fit` (1, 2, ...) and `fit_config`, the
    fit's lr / loss / la_tau / epochs; truncated when this opens).

    total: the epochs of all fits when the caller knows them; otherwise the line's total grows by
    each fit's epochs as it starts. enabled=False draws nothing (the metrics file is still written)."""

    def __init__(
        self, name: str, total: int | None = None, enabled: bool = True, log_path: Path | None = None
    ) -> None:
        self.name, self.total, self.enabled, self.log_path = name, total, enabled, log_path
        self.done = 0  # epochs finished over all fits (a resumed fit's earlier epochs included)
        self.fit = 0
        self.fit_config: dict[str, Any] = {}
        self.figures = ""
        self._bar: _Line | None = None
        self._last_step_draw = 0.0
        self._last_draw = 0.0
        self._epoch_started = time.monotonic()
        if log_path is not None:
            log_path.write_text("")

    def begin_fit(
        self,
        epochs: int,
        start_epoch: int = 0,
        config: TrainConfig | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """A fit of `epochs` epochs starts (at `start_epoch` when resumed); `config`: the fit's, whose
        `fit_summary` its metrics lines carry as `fit_config` (`summary`: that dict itself, for a fit
        without a TrainConfig, e.g. the linear probe's L-BFGS)."""
        self.fit += 1
        self.fit_config = fit_summary(config) if config is not None else dict(summary or {})
        self._epoch_started = time.monotonic()
        if self.total is None or self.done + epochs > self.total:
            self.total = self.done + epochs  # unknown (or underestimated) total: grow it
        self.done += start_epoch
        if self.enabled and self._bar is None:
            # Opened at the first fit, not before: a model trained inside another's selection (the
            # stacked recipe's mlp_only) finishes its own line first.
            bar = _Line(
                total=self.total, desc=self.name, bar_format=BAR_FORMAT, file=sys.stderr, dynamic_ncols=True
            )
            # TQDM_DISABLE=1 (--quiet's Dask workers, CI logs) gives a bar without its drawing state.
            self._bar = None if bar.disable else bar
        self._draw()

    def step(self, step: int, steps: int) -> None:
        """Optimizer step `step` of `steps` in the current epoch: shown once an epoch has run for
        2 s (a long epoch says it is alive), then at most twice a second."""
        now = time.monotonic()
        if self._bar is None or now - self._epoch_started < 2.0 or now - self._last_step_draw < 0.5:
            return
        self._last_step_draw = now
        self._bar.figures = f"{self.figures} step {step}/{steps}".strip()
        self._bar.refresh()

    def epoch(self, entry: dict[str, Any]) -> None:
        """An epoch finished: its figures on the line, its entry in the metrics file."""
        self.done += 1
        self._epoch_started = time.monotonic()
        parts = [f"loss {entry['loss']:.3f}"] if entry.get("loss") is not None else []
        val, loglik = val_figure(entry), val_loglik(entry)
        if val is not None:
            parts.append(f"val {val:.3f}")
        elif loglik is not None:
            parts.append(f"val loglik {loglik:.3f}")
        self.figures = " ".join(parts)
        line = {"fit": self.fit, "fit_config": self.fit_config, **entry}
        if self.log_path is not None:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        for listener in _LISTENERS.get():
            listener(self.name, self.done, line)
        self._draw()

    def _draw(self) -> None:
        if self._bar is None:
            return
        self._bar.total = self.total
        self._bar.n = self.done
        self._bar.figures = self.figures
        now = time.monotonic()
        if now - self._last_draw >= self._bar.mininterval or self.done >= (self.total or 0):
            self._last_draw = now  # at most tqdm's mininterval apart: 1000 fast epochs are not 1000 redraws
            self._bar.refresh()

    def close(self) -> None:
        """Leave the finished line on the console."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def current() -> ModelProgress | None:
    """The ModelProgress of the enclosing `tracking()` block, if any."""
    return _CURRENT.get()


@contextmanager
def tracking(progress: ModelProgress) -> Iterator[ModelProgress]:
    """Every `train_epochs` inside reports to `progress`; it is closed on the way out."""
    token = _CURRENT.set(progress)
    try:
        yield progress
    finally:
        _CURRENT.reset(token)
        progress.close()


@contextmanager
def listening(listener: EpochListener) -> Iterator[None]:
    """Inside the block, `listener(name, n, line)` runs after every epoch of every model trained: `name`
    is the model's progress name (its result name), `n` its epochs so far over all its fits (1, 2, ...;
    a resumed fit counts the epochs before the checkpoint), `line` the epoch's entry with its `fit`
    number and `fit_config`, as the metrics file has it. Every epoch passes through a ModelProgress
    (train_epochs opens one when no caller did), so this one hook sees both modes and every selection
    grid; `--tensorboard` (pipelines/tensorboard.py) listens here without the trainer knowing of it."""
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def fit_summary(config: TrainConfig) -> dict[str, Any]:
    """What tells one fit of a selection grid from another in the metrics file: lr, loss, la_tau (with
    logit adjustment), epochs."""
    out = {"lr": config.lr, "loss": config.loss, "epochs": config.epochs}
    if config.loss == "logit_adjusted":
        out["la_tau"] = config.la_tau
    return out
