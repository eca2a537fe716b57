"""The console (issue 11 item 6): one progress line per trained model, no per-epoch JSON on the console,
--quiet / --verbose as global options, the demo's stage-time table, and Dask workers that leave
without the nanny killing them."""

from __future__ import annotations

import copy
import logging
import sys
import time

import pytest
import torch
from tqdm import tqdm
from typer.testing import CliRunner

from retformer.artifacts.errors import UserError
from retformer.pipelines import console, stages
from retformer.pipelines.experiment_schema import validate_experiment
from retformer.trainer.progress import ModelProgress
from tests.helpers import dataset_manifest
from tests.test_selection import EXPERIMENT, synthetic_kb, write_workspace

torch.set_num_threads(1)

DS = dataset_manifest({"name": "syn", "kind": "imagefolder"})
KB = synthetic_kb()
SMALL = {
    **copy.deepcopy(EXPERIMENT),
    "methods": ["retformer", "mlp_only", "knn_vote"],
    "select": {**EXPERIMENT["select"], "lr_grid": [3e-3, 1e-2], "retformer_grid": [[3e-3, 0.0]]},
}


@pytest.fixture(autouse=True)
def default_console():
    """Every test starts and ends with the default console (INFO, bars on)."""
    console.configure()
    yield
    console.configure()


def final_lines(text: str) -> list[str]:
    """What a terminal shows at the end: each line's last carriage-return segment."""
    return [line.split("\r")[-1].rstrip() for line in text.split("\n") if line.split("\r")[-1].strip()]


def test_model_line_names_the_method_with_its_figures(capsys) -> None:
    """A model's line reads `<name> <done>/<total> loss <l> val <v>` (val: the best of a selection's
    per-choice figures); a second fit adds to the same line; a resumed fit counts its checkpoint's
    epochs as done; the finished line stays on stderr, nothing goes to stdout."""
    line = ModelProgress("retformer", total=4)
    seen = []
    line.begin_fit(2)
    for entry in ({"loss": 0.612, "val_top1": 0.78}, {"loss": 0.5, "val_top1_0.5": 0.8, "val_top1_0.0": 0.7}):
        line.epoch(entry)
        seen.append(f"{line.done}/{line.total} {line.figures}")
    line.begin_fit(2, start_epoch=1)
    line.epoch({"loss": 0.4})
    seen.append(f"{line.done}/{line.total} {line.figures}")
    line.close()
    assert seen == ["1/4 loss 0.612 val 0.780", "2/4 loss 0.500 val 0.800", "4/4 loss 0.400"]
    out, err = capsys.readouterr()
    assert out == "" and final_lines(err) == [final_lines(err)[0]]
    assert final_lines(err)[0].startswith("retformer 4/4 loss 0.400 |")


def test_train_console_is_one_line_per_model_and_no_json(tmp_path, capfd) -> None:
    """`stage_train` of a selection experiment: stdout stays empty (the CLI prints the table), stderr
    ends with one line per trained model (mlp_only over its 2-lr grid, retformer over its grid) at
    its full count, and no per-epoch JSON anywhere; the epochs are in the metrics files instead.
    With --quiet nothing at all is drawn."""
    ws = write_workspace(tmp_path)
    stages.stage_train(ws, DS, KB, validate_experiment(SMALL, "test"), run="loud")
    out, err = capfd.readouterr()
    assert out == "" and '{"epoch"' not in err
    grid = SMALL["select"]
    shown = [line for line in final_lines(err) if not line.startswith("INFO")]
    assert len(shown) == 2, shown
    mlp_total = len(grid["lr_grid"]) * grid["baseline_epochs"]
    assert shown[0].startswith(f"mlp_only {mlp_total}/{mlp_total} loss ") and " val " in shown[0]
    rf_total = grid["retformer_epochs"]
    assert shown[1].startswith(f"retformer {rf_total}/{rf_total} loss ") and " val " in shown[1]
    assert len((ws.run_dir("loud") / "mlp_only.metrics.jsonl").read_text().splitlines()) == mlp_total

    console.configure(quiet=True)
    stages.stage_train(ws, DS, KB, validate_experiment(SMALL, "test"), run="quiet")
    out, err = capfd.readouterr()
    assert out == "" and err == "", err


def test_kb_episode_filter_checks_each_draw_a_named_line(tmp_path, capfd) -> None:
    """The two fits `kb_episode_filter: auto` makes to choose (every 4th KB label wrong: the filter drops
    some items, so the image head is selected with the filtered and with all KB items) each draw their
    own named line at its full count before the run's mlp_only line, instead of minutes of silence; the
    run's metrics file holds its own mlp_only's epochs only."""
    ws = write_workspace(tmp_path, kb_wrong_every=4)
    exp = {**SMALL, "methods": ["mlp_only"], "kb_episodes": 1000}
    stages.stage_train(ws, DS, KB, validate_experiment(exp, "test"), run="episodes")
    _, err = capfd.readouterr()
    shown = [line for line in final_lines(err) if not line.startswith(("INFO", "WARNING"))]
    names = ["mlp_only [KB episodes, filter knn]", "mlp_only [KB episodes, filter none]", "mlp_only"]
    assert len(shown) == 3, shown
    counts = []
    for name, line in zip(names, shown, strict=True):
        assert line.startswith(name + " ") and " val " in line, line
        done, total = line[len(name) + 1 :].split(" ", 1)[0].split("/")
        assert done == total, line
        counts.append(int(total))
    # Epochs are scaled by train / (train + items): 70 filtered items give 6, all 80 give 4; val chose all
    # 80 here, and the run's mlp_only fits what that check fitted
    assert counts == [6, 4, 4]
    metrics = (ws.run_dir("episodes") / "mlp_only.metrics.jsonl").read_text().splitlines()
    assert len(metrics) == counts[2]


def test_quiet_and_verbose_set_levels_and_bars() -> None:
    """--quiet: WARNING and no bars (also tqdm bars the stages do not create); --verbose: DEBUG; both:
    one error."""
    console.configure(quiet=True)
    assert logging.getLogger().level == logging.WARNING and not console.progress_enabled()
    assert tqdm(total=1).disable
    console.configure(verbose=True)
    assert logging.getLogger().level == logging.DEBUG and console.progress_enabled()
    assert not tqdm(total=1, file=sys.stderr).disable
    with pytest.raises(UserError, match="exclude each other"):
        console.configure(quiet=True, verbose=True)


def test_global_options_set_the_console_before_any_command(tmp_path) -> None:
    """`retformer --quiet CMD` / `--verbose CMD` / `CMD` (the app's global options, pipelines/cli_app.py)
    leave the console as the command runs it: bars off and WARNING, bars on and DEBUG, bars on and
    INFO."""
    import retformer.pipelines.cli  # noqa: F401 - registers the commands on the app
    from retformer.pipelines.cli_app import app

    runner = CliRunner()

    def state(*options: str) -> str:
        result = runner.invoke(app, [*options, "list", "encoders", "--workdir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        return f"{console.progress_enabled()} {logging.getLevelName(logging.getLogger().level)}"

    assert state("--quiet") == "False WARNING"
    assert state("--verbose") == "True DEBUG"
    assert state() == "True INFO"


def test_demo_stage_table() -> None:
    """The demo ends with one table: a row per stage and the total, a column per dataset."""
    from retformer.pipelines.demo import stage_table

    text = stage_table(
        {
            "fmnist_lt": {"stage_seconds": {"shards": 20.5, "embed": 304.0}, "wall_seconds": 330.1},
            "digits_lt": {"stage_seconds": {"shards": 1.0, "embed": 30.0}, "wall_seconds": 31.0},
        }
    )
    rows = [line.split() for line in text.splitlines()]
    assert rows[1] == ["stage", "fmnist_lt", "digits_lt"]
    assert rows[2:] == [["shards", "20.5", "1.0"], ["embed", "304.0", "30.0"], ["total", "330.1", "31.0"]]


class SlowTeardown:
    """Stands for torch / open_clip's slow interpreter teardown: 6 s when the worker's modules are
    finalised (the nanny kills a worker still alive after 4 s)."""

    def __del__(self) -> None:
        time.sleep(6)


def _hold_slow_teardown() -> int:
    import os

    sys.modules[__name__].HELD = SlowTeardown()  # a module global: finalised at interpreter teardown
    return os.getpid()


@pytest.mark.slow  # starts and closes a real LocalCluster (~10-15 s)
def test_local_cluster_closes_without_killing_its_workers() -> None:
    """A LocalCluster worker whose interpreter teardown takes 6 s: `dask_client` closes the cluster in
    well under the nanny's 4 s grace, and no "Worker process still alive" warning is logged."""
    from retformer.pipelines.dask_runner import dask_client

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    nanny = logging.getLogger("distributed.nanny")
    catch = Catch(level=logging.WARNING)
    nanny.addHandler(catch)
    try:
        with dask_client(n_workers=1) as client:
            client.submit(_hold_slow_teardown, pure=False).result()
            closing = time.monotonic()
        took = time.monotonic() - closing
    finally:
        nanny.removeHandler(catch)
    assert not [m for m in seen if "still alive" in m], seen
    assert took < 3.5, took


def test_model_line_survives_tqdm_disable_from_the_environment() -> None:
    """With TQDM_DISABLE=1 in the environment (how --quiet reaches Dask workers; CI logs set it too) a
    model's progress line is simply not drawn; it used to crash on the disabled bar's missing state."""
    import os
    import subprocess
    import sys

    code = (
        "from retformer.trainer.progress import ModelProgress\n"
        "m = ModelProgress('retformer', 2)\n"
        "m.begin_fit(2)\n"
        "m.epoch({'loss': 0.5, 'val_top1': 0.7})\n"
        "m.epoch({'loss': 0.4})\n"
        "m.close()\n"
        "print('done')\n"
    )
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "retformer" not in proc.stderr
