"""`--tensorboard DIR` (issue 20, item 10): a tiny real training (`stage_train` on tests/test_selection.py's
synthetic workspace) logs each method's per-epoch figures; read back with TensorBoard's own
EventAccumulator, they are the run's metrics files, step for step and value for value."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retformer.pipelines import stages
from retformer.pipelines.tensorboard import SKIPPED
from tests.helpers import run_cli
from tests.test_report import DS, KB, _exp
from tests.test_selection import EXPERIMENT, write_workspace

torch.set_num_threads(1)

# Selection grids with two fits for mlp_only and linear_probe (two lrs) and one for RetFormer.
EXP = {
    **copy.deepcopy(EXPERIMENT),
    "name": "tb",
    "methods": ["retformer", "mlp_only", "linear_probe"],
    "select": {
        **EXPERIMENT["select"],
        "lr_grid": [3e-3, 1e-2],
        "baseline_epochs": 3,
        "retformer_grid": [[3e-3, 0.0]],
        "retformer_epochs": 2,
    },
}


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _metrics(run_dir: Path, method: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{method}.metrics.jsonl").read_text().splitlines()]


def _assert_events_are_the_metrics(board: Path, run_dir: Path, methods: list[str]) -> None:
    assert sorted(p.name for p in board.iterdir()) == sorted(methods), "one TensorBoard run per method"
    for method in methods:
        lines, acc = _metrics(run_dir, method), _events(board / method)
        keys = {
            k for line in lines for k, v in line.items() if isinstance(v, float | int) and k not in SKIPPED
        }
        fitted_by = {"l2"} if method == "linear_probe" else {"lr"}  # the probe: L-BFGS per L2 strength
        assert {"loss", "train_acc"} | fitted_by <= keys and any(k.startswith("val_top1") for k in keys)
        assert set(acc.Tags()["scalars"]) == keys, method
        for key in keys:
            want = [(n, float(np.float32(line[key]))) for n, line in enumerate(lines, 1) if key in line]
            assert [(e.step, e.value) for e in acc.Scalars(key)] == want, (method, key)


def test_tensorboard_scalars_equal_the_metrics_files(tmp_path: Path) -> None:
    """Each trained method gets its own TensorBoard run under DIR/<run>/; its scalars are every figure
    of its metrics.jsonl (loss, train_acc, lr or the probe's l2, time_s, the val figures), one step per
    line: a selection grid's second fit continues at step 4 after a first fit of 3 epochs, and each
    fit's start is a text event. Values are the metrics file's, rounded to float32 as TensorBoard stores
    them. kNN-style methods and unfinished runs log nothing."""
    ws = write_workspace(tmp_path)
    board = tmp_path / "tb"
    report = stages.stage_train(ws, DS, KB, _exp(EXP), tensorboard=board)
    run_dir = ws.run_dir(report["run"])
    _assert_events_are_the_metrics(board / report["run"], run_dir, ["linear_probe", "mlp_only", "retformer"])
    mlp = _metrics(run_dir, "mlp_only")
    assert [line["fit"] for line in mlp] == [1, 1, 1, 2, 2, 2]
    fits = [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in _events(board / report["run"] / "mlp_only").Tensors("fit/text_summary")
    ]
    assert [step for step, _ in fits] == [1, 4] and '"lr": 0.01' in fits[1][1]


def test_a_rerun_replaces_the_earlier_events(tmp_path: Path) -> None:
    """Retraining a run (--force, here with fewer epochs) starts each method's steps again at 1: the
    earlier run's events from there on are purged, so the read-back equals the new metrics files
    (no step 3 left over from the longer first run)."""
    ws = write_workspace(tmp_path)
    board = tmp_path / "tb"
    stages.stage_train(ws, DS, KB, _exp(EXP), run="mine", tensorboard=board)
    shorter = {**copy.deepcopy(EXP), "select": {**EXP["select"], "lr_grid": [1e-2], "baseline_epochs": 2}}
    stages.stage_train(ws, DS, KB, _exp(shorter), run="mine", force=True, tensorboard=board)
    _assert_events_are_the_metrics(
        board / "mine", ws.run_dir("mine"), ["linear_probe", "mlp_only", "retformer"]
    )
    assert len(_metrics(ws.run_dir("mine"), "mlp_only")) == 2


@pytest.mark.parametrize("command", ["train", "demo"])
def test_tensorboard_option_that_is_a_file_is_one_error_line(command: str, tmp_path: Path) -> None:
    """`--tensorboard FILE` on train and demo: one error line naming it, exit status 1, before any
    manifest is read or anything is trained (no workspace is created)."""
    file = tmp_path / "tb"
    file.write_text("not a folder")
    args = ["--dataset", "fmnist_lt", "--kb", "fmnist_world"] if command == "train" else []
    proc = run_cli(command, *args, "--tensorboard", str(file), "--workdir", str(tmp_path / "w"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0] == f"error: --tensorboard {file} is a file: give a folder for the TensorBoard logs"
    assert not (tmp_path / "w").exists()
