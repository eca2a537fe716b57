"""`--tensorboard DIR` (retformer train, demo): each trained model's per-epoch figures as TensorBoard
scalars, in `DIR/<run>/<result>/` (one TensorBoard run per method; the run folder's name above it, so
several runs and the demo's datasets share DIR without mixing).

Why a listener (trainer/progress.py `listening`) and not a writer passed down or a pass over the
metrics files: every epoch of every fit already goes through the model's ModelProgress, which writes
the metrics line; listening there adds no parameter to the trainer's call chain (experiment ->
selection -> train_epochs, both modes) and logs while a model trains, which reading
`<result>.metrics.jsonl` after each method could not.

What is logged is exactly the metrics file: one step per line (step n = the model's n-th epoch over
all its fits, so a selection grid's fits follow one another on the x axis; for one fit, the epoch),
every number in the line but the bookkeeping (`epoch`, `step`, `fit`) under the line's own key
(`loss`, `train_acc`, `lr`, `time_s`, `val_top1`, `val_top1_<alpha>`, ...), and each fit's start and
configuration as text under `fit`. A writer opens at the model's first logged step with
`purge_step` = that step, so a rerun (from the start, or resumed from a checkpoint) hides the events
a killed or earlier run logged from there on instead of drawing them twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import safe_name

log = logging.getLogger(__name__)

SKIPPED = ("epoch", "step", "fit")  # the x axis and the fit number: not figures
FLUSH_S = 5  # seconds between writes to the event file (a killed run loses at most these)


def check_dir(path: Path) -> Path:
    """`path`, checked as a TensorBoard log folder (the package installed, not a file) before any
    training: one UserError otherwise. Nothing is created yet: each model's folder is made at its first
    logged epoch, so a command that stops before training leaves no empty folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - imported to check it is there
    except ImportError as exc:
        raise UserError(
            f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard"
        ) from None
    if path.exists() and not path.is_dir():
        raise UserError(f"--tensorboard {path} is a file: give a folder for the TensorBoard logs")
    return path


def scalars(line: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The (tag, value) pairs of a metrics line: its finite numbers (bools excluded) but `SKIPPED`;
    nested mappings as `outer/inner`."""
    for key, value in line.items():
        if not prefix and key in SKIPPED:
            continue
        if isinstance(value, dict):
            if key != "fit_config":
                yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


class EpochLogger:
    """The listener: one SummaryWriter per model name under `root`, opened at its first epoch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writers: dict[str, Any] = {}
        self.fits: dict[str, int] = {}
        self.failed = False

    def __call__(self, name: str, step: int, line: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self._log(name, step, line)
        except OSError as exc:  # a full disk must not cost the training run: say so once, stop logging
            self.failed = True
            log.warning("TensorBoard logging stopped: %s", exc)

    def _log(self, name: str, step: int, line: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = self.writers.get(name)
        if writer is None:
            folder = self.root / safe_name(name)  # as the run's files are named: retformer@k8 -> retformer-k8
            writer = SummaryWriter(str(folder), purge_step=step, flush_secs=FLUSH_S)
            self.writers[name] = writer
        fit = int(line.get("fit") or 1)
        if self.fits.get(name) != fit:
            self.fits[name] = fit
            config = json.dumps(line.get("fit_config") or {}, sort_keys=True)
            writer.add_text("fit", f"fit {fit} from step {step}: {config}", step)
        for tag, value in scalars(line):
            writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close every writer (the event files are complete after this)."""
        for writer in self.writers.values():
            writer.close()


@contextmanager
def tensorboard_logging(root: Path | None) -> Iterator[EpochLogger | None]:
    """Inside the block, every trained model's epochs go to `root/<model>/` (nothing when root is None)."""
    if root is None:
        yield None
        return
    from retformer.trainer.progress import listening

    logger = EpochLogger(root)
    try:
        with listening(logger):
            yield logger
    finally:
        logger.close()
        if not logger.writers:
            log.info("TensorBoard: no model was trained, nothing logged to %s", root)
        else:
            log.info("TensorBoard: %d model(s) logged under %s", len(logger.writers), root)
