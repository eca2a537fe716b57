"""Training checkpoints: writing, reading, the one compatibility check, and the resume fingerprints.

A checkpoint (`<run>/<method>.ckpt.pt`) holds the model (with its config), optimizer, scheduler, AMP
scaler, RNG states, history and the training config; it is resumed only when `mismatch()` finds
nothing: same config (fields a config lists in RESUMABLE may differ), same model, same number of
training samples. A finished method leaves `<method>.result.json` keyed by `result_fingerprint()`.

A model file (`<run>/<method>.pt`, `save_model`) is the same format without the training state: the
model's config and weights plus `info`, what prediction needs besides the weights (the run's
encoders, KB, index search parameters, dataset, class names, k; `pipelines/experiment.py` fills it).
`load_model` / `load_saved_model` open it (and the checkpoints) by themselves: no manifest needed.

Under torchrun only rank 0 writes or deletes checkpoints (`trainer.train.train_epochs` saves, and
`discard_stale` deletes, on rank 0 only; every rank reads). Nothing in a checkpoint depends on the
number of processes (the model without its DDP wrapper, one optimizer state, RNG states every rank
shares), so a run stopped with N processes resumes with any other number.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.errors import UserError
from retformer.artifacts.schema import Section, dump_given
from retformer.trainer import distributed
from retformer.trainer.model_factory import model_from_config
from retformer.trainer.stored_model import StoredFinetune, parse_stored_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retformer-trainer-checkpoint/1"


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists; unknown types their str)."""
    return json.loads(json.dumps(value, default=str))


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    config: Any,
    **extra: Any,
) -> None:
    """Write a checkpoint atomically (temporary name, then os.replace): a kill never leaves a torn file.
    `epoch` = number of finished epochs; `config` a TrainConfig (or None); `extra` (rng states, history,
    ...) is stored as is."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_config": getattr(model, "config", None),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "train_config": asdict(config) if config is not None else None,
        **extra,
    }
    save_torch(state, path)


def save_torch(obj: Any, path: Path | str) -> None:
    """torch.save `obj` to `path` atomically (temporary name, then os.replace). A write the OS refuses
    (a full disk: ENOSPC) is an OSError naming `path`, which the CLI prints as one `error:` line.

    torch.save writes through a Python file object here, so the OS's error is raised in Python (given
    a path, its C++ writer reports only "unexpected pos ..."); torch's zip writer then fails closing
    the archive with a RuntimeError whose context is that OSError (a 123-line traceback at
    `retformer train`), hence the walk down the exception's context."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
        except (OSError, RuntimeError) as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            assert isinstance(cause, OSError)
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc


def _torch_load(path: Path | str, map_location: str | torch.device, what: str) -> Any:
    """torch.load (weights only) of a `what` ("checkpoint", "model file"); missing or torn is a UserError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"{what} not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn/foreign file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in lines[0]:
            # torch's refusal is a paragraph on weights_only defaults and a link; the reason is one line
            why = next((x for x in lines if "GLOBAL" in x or "WeightsUnpickler" in x), lines[-1])
            raise UserError(
                f"{what} {path} holds Python objects besides weights and plain values, refused unread "
                f"(loading them could run code: {why.rstrip('.')}); use a file `retformer train` wrote"
            ) from exc
        raise UserError(f"unreadable {what} {path}: {lines[0]}") from exc


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; a corrupt or foreign file is a UserError naming it."""
    state = _torch_load(path, map_location, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a RetFormer trainer checkpoint")
    return state


def save_model(path: Path | str, model: nn.Module, info: dict[str, Any] | None = None, **extra: Any) -> None:
    """Write a self-describing model file atomically: the model's config and weights, `info` (what
    prediction needs besides them: encoders, KB, index parameters, class names, k...; JSON values) and
    `extra` (e.g. the hyper-parameters selection chose), all readable with `weights_only=True`."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_config": jsonable(getattr(model, "config", None)),
        "model_state": model.state_dict(),
        "info": jsonable(info or {}),
        **jsonable(extra),
    }
    save_torch(state, path)


@dataclass
class SavedModel:
    """A model rebuilt from a model file or checkpoint (eval mode), with what the file says about it:
    `info` (empty for checkpoints and files written before model files carried it) and `extra` (the
    file's other keys: selected hyper-parameters, val_top1, epoch...)."""

    model: nn.Module
    info: dict[str, Any]
    extra: dict[str, Any]
    path: Path


def _is_bare_state_dict(state: Any) -> bool:
    values = state.values() if isinstance(state, dict) else ()
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def load_saved_model(path: Path | str, map_location: str | torch.device = "cpu") -> SavedModel:
    """Rebuild the model of a model file or checkpoint (architecture from its config, then its weights).

    A fine-tune model (`kind: finetune`) rebuilds its image encoder from the file's
    `info["encoders"]["image"]` (the KB manifest's spec), then loads the trained weights over it.
    A bare state dict (runs trained before model files were self-describing) is a UserError that says so."""
    path = Path(path)
    raw = _torch_load(path, map_location, "model file")
    if _is_bare_state_dict(raw):
        raise UserError(
            f"{path} holds bare weights without the model's config (a run trained before model files were "
            "self-describing): rerun `retformer train` for this run to get a file that can be reloaded"
        )
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a RetFormer trainer checkpoint")
    if raw.get("model_config") is None:
        raise UserError(f"{path} has no model config; cannot rebuild the model")
    info = dict(raw.get("info") or {})
    try:
        stored = parse_stored_model(raw["model_config"])
        model = (
            _finetune_model(path, stored, info)
            if isinstance(stored, StoredFinetune)
            else model_from_config(stored)
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: cannot rebuild the model from its config ({exc})") from exc
    try:
        model.load_state_dict(raw["model_state"])
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the model its config describes ({exc})") from exc
    skip = {"format", "model_config", "model_state", "info", "optimizer_state", "scheduler_state", "rng"}
    extra = {k: v for k, v in raw.items() if k not in skip}
    return SavedModel(model.eval(), info, extra, path)


def _finetune_model(path: Path, stored: StoredFinetune, info: dict[str, Any]) -> nn.Module:
    """A fine-tuned encoder + head, built from the KB's image encoder spec the file records."""
    from retformer.kb_builder.encoders import build_image_encoder
    from retformer.kb_builder.kb_schema import image_encoder
    from retformer.trainer.finetune_model import FinetuneModel

    spec = (info.get("encoders") or {}).get("image")
    if spec is None:
        raise UserError(f"{path} is a fine-tuned model without its image encoder spec; cannot rebuild it")
    encoder = build_image_encoder(image_encoder(spec, str(path)))
    return FinetuneModel(encoder, model_from_config(stored.head))


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a model file (`<run>/<method>.pt`) or checkpoint, in eval mode."""
    return load_saved_model(path, map_location).model


def mismatch(state: dict[str, Any], config: Any, model: nn.Module, num_train: int) -> str | None:
    """Why a checkpoint's `state` cannot be resumed with this config, model and training set; None if it
    can. Fields in `config.RESUMABLE` may differ (they do not change the maths); the model is compared by
    its stored config."""
    saved, now = jsonable(state.get("train_config") or {}), jsonable(asdict(config))
    names = [f.name for f in fields(config) if f.name not in config.RESUMABLE]
    diff = [name for name in names if saved.get(name) != now[name]]
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        return f"was written with a different training config ({details})"
    if jsonable(state.get("model_config")) != jsonable(getattr(model, "config", None)):
        return f"holds a different model ({state.get('model_config')})"
    if state.get("num_train") != num_train:
        return f"was trained on {state.get('num_train')} samples, this run has {num_train}"
    return None


def check_resumable(path: Path, state: dict[str, Any], config: Any, model: nn.Module, num_train: int) -> None:
    """UserError naming what changed when `state` (read from `path`) cannot be resumed."""
    why = mismatch(state, config, model, num_train)
    if why:
        raise UserError(f"{path} {why}; use the same config or delete the checkpoint to start over")


def discard_stale(path: Path, config: Any, model: nn.Module, num_train: int) -> bool:
    """True when `path` can be resumed; an unreadable or incompatible one is deleted (with a warning),
    so that the method starts over instead of failing. Under torchrun rank 0 alone looks and deletes;
    every rank gets its answer."""
    return distributed.from_main(lambda: _discard_stale(path, config, model, num_train))


def _discard_stale(path: Path, config: Any, model: nn.Module, num_train: int) -> bool:
    if not path.exists():
        return False
    try:
        state = load_checkpoint(path)
    except UserError as exc:
        log.warning("%s; starting over", exc)
        path.unlink(missing_ok=True)
        return False
    why = mismatch(state, config, model, num_train)
    if why:
        log.warning("%s %s; starting that method over", path, why)
        path.unlink(missing_ok=True)
        return False
    log.info("resuming from %s (epoch %s of %s)", path, state.get("epoch"), config.epochs)
    return True


@dataclass(frozen=True)
class Selection:
    """What a method whose hyper-parameters are selected on val also depends on: the split it selects on,
    the recipe, and the experiment's `select:` section as given (None: not given)."""

    split: str | None
    recipe: str
    select: Section | None


def _given(section: Section | None) -> dict[str, Any] | None:
    return None if section is None else dump_given(section)


def result_fingerprint(
    method: str,
    config: Any,
    model: Section | None,
    zeroshot: Section | None,
    k: int | None,
    n_train: int,
    n_eval: dict[str, int],
    selection: Selection | None = None,
) -> dict[str, Any]:
    """What a finished method's result depends on (a killed run's rerun reuses it only if equal): the
    experiment's `model:` and `zeroshot:` sections as given (`dump_given`), with `selection` the model's
    with the selection's. `k` is None for retrieval-free methods, `model` None for untrained ones."""
    model_fp = _given(model)
    if selection is not None:
        split, recipe, select = selection.split, selection.recipe, _given(selection.select)
        model_fp = {"model": model_fp, "select_split": split, "recipe": recipe, "select": select}
    return jsonable(
        {
            "method": method,
            "train": asdict(config) if config is not None else None,
            "model": model_fp,
            "zeroshot": _given(zeroshot),
            "k": k,
            "n_train": n_train,
            "n_eval": n_eval,
        }
    )


def rng_state(
    device: torch.device, gen: torch.Generator | None = None, np_rng: np.random.Generator | None = None
) -> dict[str, Any]:
    """The RNG states a resumed run needs: torch's (dropout), CUDA's, and the loop's own generators."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if gen is not None:
        state["shuffle"] = gen.get_state()
    if np_rng is not None:
        state["numpy"] = np_rng.bit_generator.state
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(
    state: dict[str, Any],
    device: torch.device,
    gen: torch.Generator | None = None,
    np_rng: np.random.Generator | None = None,
) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"].cpu())
    if gen is not None:
        gen.set_state(state["shuffle"].cpu())
    if np_rng is not None:
        np_rng.bit_generator.state = state["numpy"]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
