"""The workspace's finished runs (`<workdir>/runs/<run>/eval.json`): which there are, a one-line summary
of each, and `resolve_run`, the one way a command's RUN argument names one of them (`retformer
evaluate`, `compare`; `runs` lists what it can name), and the names of a run's evaluations with other
KBs (`eval.<kb>.json`: pipelines/evaluate_kb.py writes them, report.html lists them).

A run is finished when its eval.json exists (written last, atomically: pipelines/experiment.py); a
folder without one is a killed or running run. Runs are ordered by eval.json's mtime, the time the
run finished (eval.json records no timestamp of its own), oldest first.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import plain_name, read_json

EVAL = "eval.json"
EVAL_PREFIX = "eval."  # <run>/eval.<kb>.json: the run's models evaluated with another KB (evaluate_kb.py)
LATEST = "latest"  # the RUN argument that names the newest finished run (as no argument does)
MAIN_METHODS = ("retformer", "retformer_ft")  # the row a run is summarised by, when it has one
SHOWN_IN_ERRORS = 12  # runs listed in a "run not found" line (the newest ones)
_PATTERN = re.compile(r"[A-Za-z0-9_+=*?\[\]!-][A-Za-z0-9_.+=*?\[\]!-]*")


def runs_root(workdir: Path | str) -> Path:
    """Where a workspace's run folders live."""
    return Path(workdir) / "runs"


def _finished_at(run_dir: Path) -> float:
    return (run_dir / EVAL).stat().st_mtime


def finished_runs(workdir: Path | str) -> list[Path]:
    """The run folders with an eval.json, oldest first (eval.json's mtime, then name)."""
    root = runs_root(workdir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / EVAL).is_file()]
    return sorted(found, key=lambda p: (_finished_at(p), p.name))


def unfinished_runs(workdir: Path | str) -> list[str]:
    """Names of run folders without an eval.json (killed, or training now)."""
    root = runs_root(workdir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not (p / EVAL).is_file())


def eval_file(run_dir: Path, kb: str) -> Path:
    """Where the evaluation of a run with KB `kb` is written (never the run's own eval.json)."""
    return Path(run_dir) / f"{EVAL_PREFIX}{kb}.json"


def other_evaluations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The run's evaluations with other KBs (eval.<kb>.json), by KB name, oldest first."""
    out = {}
    for path in sorted(Path(run_dir).glob(f"{EVAL_PREFIX}*.json"), key=lambda p: p.stat().st_mtime):
        if path.name != EVAL and (rec := read_json(path, torn_ok=True)) is not None:
            out[path.name[len(EVAL_PREFIX) : -len(".json")]] = rec
    return out


def _not_found(run: str, root: Path, names: list[str], why: str) -> UserError:
    """One line: what was not found, the closest names, and the runs there are (the newest first)."""
    if not names:
        return UserError(
            f"run {run!r} not found: no finished runs under {root} (run `retformer train` first)"
        )
    close = difflib.get_close_matches(run, names, n=1, cutoff=0.6)
    if not close:  # a misspelt prefix (`fmnist_lt-fmnist_wrld`) is far from the whole, hashed names
        heads = {name[: len(run)]: name for name in names}
        close = [heads[h] for h in difflib.get_close_matches(run, list(heads), n=1, cutoff=0.6)]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    newest = names[::-1][:SHOWN_IN_ERRORS]
    more = f", ... ({len(names) - len(newest)} more: `retformer runs`)" if len(names) > len(newest) else ""
    return UserError(f"run {run!r} {why} under {root}{hint}; runs: {', '.join(newest)}{more}")


def resolve_run(workdir: Path | str, run: str | None = None) -> Path:
    """The finished run folder `run` names under `<workdir>/runs`, oldest to newest:

    - None or `latest`: the newest finished run;
    - an exact run name;
    - a shell pattern (`fmnist_lt-fmnist_world-demo-*`): the newest finished match, as `retformer
      predict` and `browse` take it;
    - a prefix of exactly one finished run's name (`fmnist_lt-fmnist_world-demo-1a2b`).

    A name is a plain folder name (no `/`, no `..`). Anything else is one UserError: an unfinished run,
    an ambiguous prefix (naming its matches), or no match ("did you mean" and the runs there are)."""
    root = runs_root(workdir)
    runs = finished_runs(workdir)
    names = [p.name for p in runs]
    if not run or (run == LATEST and LATEST not in names):
        if not runs:
            raise UserError(f"no finished runs under {root}: run `retformer train` first")
        return runs[-1]
    if glob.has_magic(run):
        if not _PATTERN.fullmatch(run):  # matched against names in runs/ only: no `/`, no leading dot
            raise UserError(
                f"run pattern {run!r} may hold only what a run name holds (letters, digits, _ - . + =) "
                "and * ? [ ] !, and must not start with a dot"
            )
        matches = [p for p in runs if fnmatch.fnmatchcase(p.name, run)]
        if not matches:
            raise _not_found(run, root, names, "matches no finished run")
        return matches[-1]
    plain_name(run, "run")
    if run in names:
        return root / run
    if (root / run).is_dir():
        raise UserError(
            f"run {run} under {root} is not finished (no {EVAL}): run its `retformer train` command again "
            "to resume it"
        )
    prefixed = [name for name in names if name.startswith(run)]
    if len(prefixed) == 1:
        return root / prefixed[0]
    if prefixed:
        raise UserError(
            f"run {run!r} is the prefix of {len(prefixed)} runs ({', '.join(prefixed)}): give more of the "
            f"name, or '{run}*' for the newest"
        )
    raise _not_found(run, root, names, "not found")


# ------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class RunSummary:
    """One finished run in a line: what it ran and how well its main row did on its eval split."""

    run: str
    dataset: str | None
    kb: str | None
    experiment: str | None
    eval_split: str | None
    method: str | None  # the row `top1` is from: RetFormer's, else the best one
    top1: float | None  # a fraction, as eval.json has it
    finished: str  # eval.json's mtime, ISO 8601 with the UTC offset
    finished_s: float  # the same, seconds since the epoch

    def as_json(self) -> dict[str, Any]:
        """The JSON form of `retformer runs --json`."""
        return asdict(self)


def primary_rows(report: dict[str, Any]) -> list[str]:
    """The rows of the run's first eval split with a top-1: no skipped method, no control
    (`<name>:shuffled`), no other eval split (`<name>@<split>`); k-sweep rows (`@k8`) stay.

    The rule of pipelines/report.py's `primary_results` (a test holds them equal), kept here because
    importing report.py imports torch (1.4 s), ten times what `retformer runs` takes otherwise."""
    others = set(report.get("eval_splits", [])[1:])
    rows = []
    for name, m in (report.get("methods") or {}).items():
        if not isinstance(m, dict) or "skipped" in m or ":" in name or m.get("top1") is None:
            continue
        if "@" in name and name.rsplit("@", 1)[1] in others:
            continue
        rows.append(name)
    return rows


def main_row(report: dict[str, Any]) -> str | None:
    """The row a run is summarised by: RetFormer's (`retformer`, `retformer_ft`; the best of a k
    sweep's `retformer@k<k>`), else the best row on top-1; None when no row has a top-1."""
    rows = primary_rows(report)
    ours = [r for r in rows if r.split("@", 1)[0] in MAIN_METHODS]
    pool = ours or rows
    if not pool:
        return None
    return max(pool, key=lambda r: float(report["methods"][r]["top1"]))  # first one on a tie


def summarize(run_dir: Path) -> RunSummary:
    """The summary of a finished run folder (its eval.json must be a record: torn is a UserError)."""
    report = read_json(run_dir / EVAL) or {}
    row = main_row(report)
    mtime = _finished_at(run_dir)
    return RunSummary(
        run=run_dir.name,
        dataset=report.get("dataset"),
        kb=report.get("kb"),
        experiment=report.get("experiment"),
        eval_split=report.get("eval_split"),
        method=row,
        top1=float(report["methods"][row]["top1"]) if row else None,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(mtime)),
        finished_s=round(mtime, 3),
    )
