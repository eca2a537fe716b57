"""The train and evaluate stages: every method of an experiment on the neighbor tables
(pipelines/experiment.py), and a finished run's report."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.stages_neighbors import check_split_embeddings

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest
    from retformer.pipelines.experiment_schema import ExperimentManifest

log = logging.getLogger(__name__)


def stage_train(
    ws: Workspace,
    ds: DatasetManifest,
    kb: KBManifest,
    exp: ExperimentManifest,
    run: str | None = None,
    force: bool = False,
    tensorboard: Path | None = None,
) -> dict[str, Any]:
    """`retformer train`: every method of the experiment on the neighbor tables; the run's eval.json,
    per-sample predictions and report.html (pipelines/report.py). The run is named
    `<dataset>-<kb>-<experiment>-<config hash>` (pipelines/runs.py) unless `run` is given; a finished
    run of another configuration under that name is refused unless `force`. `tensorboard`: a folder
    that gets each trained model's per-epoch figures under `<run>/<method>/` (pipelines/tensorboard.py).

    One writer per run folder. A finished run of this configuration (its eval.json's config_hash) is
    skipped: its eval.json is returned (`force` trains it again); a killed one is resumed
    (pipelines/experiment.py).

    Under torchrun (`trainer/distributed.py`) every process runs this; rank 0 alone takes the run
    folder's lock, makes the checks above and writes, the other ranks follow its decisions (an error
    there ends every rank with the same message) and log warnings only."""
    from retformer.artifacts.atomic import remove_dead_temps
    from retformer.pipelines import console
    from retformer.pipelines.experiment import run_experiment
    from retformer.pipelines.experiment_plan import eval_splits, plan_experiment
    from retformer.pipelines.report import write_report
    from retformer.pipelines.runs import check_overwrite, code_version, config_hash, default_run_name
    from retformer.pipelines.tensorboard import tensorboard_logging
    from retformer.trainer import distributed

    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 says it once

    # What can be checked without training is checked before the run folder (or its lock) exists.
    _refuse_stale_tables(ws, ds, kb, max(plan_experiment(exp, kb)["k_values"]))
    if (info := read_json(ws.dataset_info(ds.name))) is not None:
        eval_splits(exp, info)
        check_split_embeddings(ws, ds.name, kb.name, info.get("splits", {}))
    wanted = config_hash(ds, kb, exp)
    run_dir = ws.run_dir(run or default_run_name(ds, kb, exp))
    asked = time.time()
    with ExitStack() as stack:

        def prepare() -> dict[str, Any] | None:
            """Rank 0, under the run's lock: another run's fresh eval.json to return, else None (train)."""
            held = stack.enter_context(output_lock(run_dir, f"the run {run_dir.name}"))
            report = read_json(run_dir / "eval.json", torn_ok=True)  # torn: trained again
            same = bool(report and report.get("config_hash") == wanted)
            if same and held.waited_s and (run_dir / "eval.json").stat().st_mtime >= asked:
                log.info("run %s was finished by the run this one waited for: using its eval.json", run_dir)
                return report
            if same and not force:
                # Complete with this very configuration: a rerun skips it, as every stage does.
                if not (run_dir / "report.html").is_file():
                    write_report(run_dir)  # killed between eval.json and its report
                log.info("run %s is complete with this configuration (--force trains it again)", run_dir.name)
                trained_by = report.get("code_version")
                if trained_by != code_version():
                    log.warning(
                        "run %s was trained by retformer %s, this is %s: its figures are that code's "
                        "(--force trains it again with this one)",
                        run_dir.name,
                        trained_by or "(not recorded: eval.json predates code versions)",
                        code_version(),
                    )
                return report
            if run_dir.is_dir():
                remove_dead_temps(run_dir.iterdir())  # a killed run's half-written checkpoint, model, ...
            check_overwrite(run_dir, wanted, force)
            return None

        finished = distributed.from_main(prepare)
        if finished is not None:
            return finished
        progress = console.progress_enabled()
        board = run_dir.name if tensorboard is not None and distributed.is_main() else None
        with tensorboard_logging(tensorboard / board if board else None):  # rank 0 alone writes
            report = run_experiment(ws, ds, kb, exp, run_dir, progress=progress, config_hash=wanted)
        if distributed.is_main():
            log.info("report: %s", write_report(run_dir))
        distributed.barrier()  # every rank returns once rank 0's files are complete
    return report


def _refuse_stale_tables(ws: Workspace, ds: DatasetManifest, kb: KBManifest, kmax: int) -> None:
    """The neighbor tables a run would read were computed against the KB's index as it is (a KB grown
    in place, or re-indexed, makes them stale until `retformer neighbors` recomputes them)."""
    from retformer.kb_builder.neighbors import stale_reason
    from retformer.trainer.features import neighbor_k_values

    usable = [k for k in neighbor_k_values(ws, ds.name, kb.name) if k >= kmax]
    if usable and (why := stale_reason(ws.neighbors_dir(ds.name, kb.name, usable[0]), ws.kb_index(kb.name))):
        raise UserError(
            f"the neighbor tables {ws.neighbors_dir(ds.name, kb.name, usable[0])} are stale ({why}): "
            f"run `retformer neighbors --dataset {ds.name} --kb {kb.name}` first"
        )


def stage_evaluate(ws: Workspace, run: str | None = None) -> tuple[str, dict[str, Any]]:
    """`retformer evaluate`: (run name, report) of a finished run: `run` as `resolve_run` reads it (a
    name, a pattern, a unique prefix), by default the latest one."""
    from retformer.pipelines.run_index import EVAL, resolve_run

    run_dir = resolve_run(ws.root, run)
    return run_dir.name, read_json(run_dir / EVAL) or {}
