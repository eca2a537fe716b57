"""Which model file a run names, and which workspace holds the KB that model is to search."""

from __future__ import annotations

import glob
from pathlib import Path

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON, safe_name
from retformer.artifacts.workspace import Workspace
from retformer.trainer.checkpoint import SavedModel

# Model files a run directory holds, in the order a run without --method picks them.
PREFERRED = ("retformer", "retformer_ft")


def model_files(run_dir: Path) -> dict[str, Path]:
    """The model files of a run directory by result name (file stem), checkpoints excluded."""
    return {p.stem: p for p in sorted(run_dir.glob("*.pt")) if not p.name.endswith(".ckpt.pt")}


def find_model_file(run: str | Path, method: str | None = None, workdir: Path | str | None = None) -> Path:
    """The model file of `run`: a model file itself, a run folder, or a run name under `<workdir>/runs`
    (a shell pattern such as `fmnist_lt-fmnist_world-demo-*` picks the newest matching run).
    In a run folder, `method` picks the file (a method or result name, e.g. `retformer@k4`); without it,
    retformer (or retformer_ft), else the run's only model. UserError when there is none to pick."""
    path = Path(run)
    if path.is_file():
        return path
    candidates = list(
        dict.fromkeys([path] + ([Path(workdir) / "runs" / str(run)] if workdir is not None else []))
    )
    run_dir = next((c for c in candidates if c.is_dir()), None)
    if run_dir is None and glob.has_magic(str(run)) and workdir is not None:
        # run names end in a config hash (`fmnist_lt-fmnist_world-demo-1a2b3c4d`): a pattern picks the newest
        found = [p for p in (Path(workdir) / "runs").glob(str(run)) if p.is_dir() and model_files(p)]
        run_dir = max(found, key=lambda p: p.stat().st_mtime, default=None)
    if run_dir is None:
        where = " or ".join(str(c) for c in candidates)
        raise UserError(f"run not found: {run} (no run folder or model file at {where})")
    files = model_files(run_dir)
    if not files:
        raise UserError(
            f"{run_dir} holds no model files (<method>.pt): is it a finished `retformer train` run?"
        )
    if method is not None:
        if safe_name(method) not in files:
            raise UserError(
                f"run {run_dir.name} has no model for method {method!r}; it has: {', '.join(files)} "
                "(kNN vote and zero-shot train no model)"
            )
        return files[safe_name(method)]
    for name in PREFERRED:
        if name in files:
            return files[name]
    if len(files) == 1:
        return next(iter(files.values()))
    raise UserError(f"run {run_dir.name} has several models ({', '.join(files)}): choose one with --method")


def workspace_of(saved: SavedModel, workdir: Path | str | None, kb: str | None = None) -> Workspace:
    """The workspace holding the run's KB (or `kb`): the one the model file sits in (`<root>/runs/<run>/`),
    else `workdir`, else the one it was trained in."""
    other, kb = kb is not None, kb or saved.info["kb"]["name"]
    run_dir = saved.path.resolve().parent
    roots = [run_dir.parent.parent] if run_dir.parent.name == "runs" else []
    roots += [Path(workdir)] if workdir is not None else []
    roots += [Path(saved.info["workspace"])] if saved.info.get("workspace") else []
    for root in roots:
        ws = Workspace(root)
        # another KB: where it is embedded (its encoders are checked before its index is read)
        if (ws.kb_index(kb) / INDEX_JSON).is_file() or (other and ws.kb_stage_record(kb, "embed").is_file()):
            return ws
    raise UserError(
        f"the index of KB {kb}, which {saved.path.name} is to search, is in none of "
        f"{', '.join(str(r) for r in roots)}: give the workspace with --workdir"
    )
