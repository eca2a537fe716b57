"""`retformer runs`, `retformer compare` and the one run resolver `evaluate` shares (issue 20, items 5
and 9): real runs (`stage_train` on tests/test_selection.py's synthetic workspace), the real CLI."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from retformer.artifacts.errors import UserError
from retformer.pipelines import stages
from retformer.pipelines.compare import default_out, per_class_figure, read_runs
from retformer.pipelines.report import primary_results
from retformer.pipelines.run_index import (
    eval_file,
    main_row,
    other_evaluations,
    primary_rows,
    resolve_run,
    summarize,
)
from tests.helpers import run_cli
from tests.test_report import DS, KB, _exp
from tests.test_selection import EXPERIMENT, write_workspace

torch.set_num_threads(1)

# Two small experiments: the stacked recipe with selection on val, and a plain joint one (no val).
SELECTED = {
    **copy.deepcopy(EXPERIMENT),
    "name": "sel",
    "methods": ["retformer", "mlp_only", "knn_vote"],
    "select": {**EXPERIMENT["select"], "lr_grid": [1e-2], "retformer_grid": [[3e-3, 0.0]]},
}
PLAIN = {
    **{k: v for k, v in copy.deepcopy(EXPERIMENT).items() if k not in ("select_split", "select")},
    "name": "plain",
    "recipe": "paper",
    "methods": ["linear_probe", "mlp_only"],
    "train": {**EXPERIMENT["train"], "epochs": 2},
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """A workspace with two finished runs, `plain` finished before `sel` (eval.json mtimes set), and
    one unfinished run folder."""
    root = tmp_path_factory.mktemp("runs_cli")
    workspace = write_workspace(root)
    sel = stages.stage_train(workspace, DS, KB, _exp(SELECTED))["run"]
    plain = stages.stage_train(workspace, DS, KB, _exp(PLAIN))["run"]
    os.utime(workspace.run_dir(plain) / "eval.json", (1_700_000_000, 1_700_000_000))
    os.utime(workspace.run_dir(sel) / "eval.json", (1_700_000_100, 1_700_000_100))
    (root / "runs" / "killed-run").mkdir()
    return {"root": root, "sel": sel, "plain": plain}


def _eval(ws: dict, name: str) -> dict:
    return json.loads((ws["root"] / "runs" / name / "eval.json").read_text())


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_runs_lists_finished_runs_newest_last(ws) -> None:
    """`retformer runs`: one line per finished run, oldest first, with dataset, KB, experiment, the
    top-1 of the RetFormer row (a run without one: its best row) as eval.json has it; the unfinished
    folder is named on stderr only; `--json` has the same runs and values."""
    proc = run_cli("runs", "--workdir", str(ws["root"]))
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "dataset", "kb", "experiment", "top1", "result", "finished"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == [ws["plain"], ws["sel"]]
    sel, plain = _eval(ws, ws["sel"]), _eval(ws, ws["plain"])
    best_plain = max(("linear_probe", "mlp_only"), key=lambda m: plain["methods"][m]["top1"])
    assert rows[1][1:6] == [
        "syn",
        "kbsyn",
        "sel",
        f"{100 * sel['methods']['retformer']['top1']:.2f}",
        "retformer",
    ]
    assert rows[0][4:6] == [f"{100 * plain['methods'][best_plain]['top1']:.2f}", best_plain]
    assert "killed-run" in proc.stderr and "killed-run" not in proc.stdout
    listed = json.loads(run_cli("runs", "--json", "--workdir", str(ws["root"])).stdout)
    assert [r["run"] for r in listed] == [ws["plain"], ws["sel"]]
    assert listed[1]["top1"] == sel["methods"]["retformer"]["top1"] and listed[1]["method"] == "retformer"
    assert listed[1]["finished_s"] == 1_700_000_100


def test_runs_on_an_empty_workspace_says_so_and_exits_0(tmp_path: Path) -> None:
    """No runs folder at all: one clear line, exit status 0; `--json` prints an empty list."""
    proc = run_cli("runs", "--workdir", str(tmp_path / "w"))
    assert (
        proc.stdout.strip()
        == f"no finished runs under {tmp_path / 'w' / 'runs'} (`retformer train` makes one)"
    )
    assert json.loads(run_cli("runs", "--json", "--workdir", str(tmp_path / "w")).stdout) == []


def test_resolver_reads_names_prefixes_patterns_and_latest(ws) -> None:
    """resolve_run: an exact name, a unique prefix, a pattern (newest match), `latest` and no argument
    (the newest run); an ambiguous prefix, an unfinished run, `../..` and an unknown name are one
    UserError line each, the unknown one with "did you mean" and the runs there are."""
    root, runs = ws["root"], ws["root"] / "runs"
    assert resolve_run(root, ws["sel"]) == runs / ws["sel"]
    assert resolve_run(root, "syn-kbsyn-pl") == runs / ws["plain"]
    assert resolve_run(root, "syn-kbsyn-*") == runs / ws["sel"]  # both match: the newest
    assert resolve_run(root, "latest") == resolve_run(root, None) == runs / ws["sel"]
    cases = {
        "syn-kbsyn": "is the prefix of 2 runs",
        "killed-run": "is not finished",
        "../..": "not a plain name",
        "syn-kbsyn-plian": f"did you mean '{ws['plain']}'?",
        "syn-*-nothing": "matches no finished run",
        "../*": "may hold only what a run name holds",
    }
    for given, expected in cases.items():
        with pytest.raises(UserError) as err:
            resolve_run(root, given)
        assert expected in str(err.value) and "\n" not in str(err.value), given
    with pytest.raises(UserError, match="runs: " + ws["sel"] + ", " + ws["plain"]):
        resolve_run(root, "nothing-like-it")


def test_evaluate_resolves_its_run_argument_through_the_shared_resolver(ws) -> None:
    """`retformer evaluate` takes a unique prefix and a pattern as `compare` does, and refuses an
    unknown run with the resolver's line ("did you mean" + the runs), exit status 1."""
    out = run_cli("evaluate", "syn-kbsyn-pl", "--workdir", str(ws["root"])).stdout
    assert out.splitlines()[0] == f"run {ws['plain']}"
    assert run_cli("evaluate", "--run", "*-sel-*", "--workdir", str(ws["root"])).stdout.startswith(
        f"run {ws['sel']}"
    )
    line = _error_line(run_cli("evaluate", "syn-kbsyn-plian", "--workdir", str(ws["root"]), check=False))
    assert f"did you mean '{ws['plain']}'?" in line and ws["sel"] in line


def test_compare_table_and_per_class_figure(ws) -> None:
    """`retformer compare A B`: a legend line per run, then one row per result with each run's top-1
    and few-shot accuracy (percent, `-` where the run has no such result); the PNG lands at the
    default path, printed last. The figure has one line per run whose points are its RetFormer (else
    best) row's per-class accuracy, over the class names eval.json records."""
    proc = run_cli("compare", "syn-kbsyn-pl", ws["sel"], "--workdir", str(ws["root"]))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"[1] {ws['plain']}: syn x kbsyn, experiment plain, test split")
    assert lines[1].startswith(f"[2] {ws['sel']}:")
    assert lines[3].split() == ["method", "[1]", "top1", "[1]", "few", "[2]", "top1", "[2]", "few"]
    cells = {line.split()[0]: line.split()[1:] for line in lines[4:] if line.strip() and " " in line}
    plain, sel = _eval(ws, ws["plain"])["methods"], _eval(ws, ws["sel"])["methods"]
    mlp = [f"{100 * m[k]:.2f}" for m in (plain["mlp_only"], sel["mlp_only"]) for k in ("top1", "few")]
    assert cells["mlp_only"] == mlp
    assert cells["retformer"] == [
        "-",
        "-",
        f"{100 * sel['retformer']['top1']:.2f}",
        f"{100 * sel['retformer']['few']:.2f}",
    ]
    png = default_out(ws["root"], [ws["plain"], ws["sel"]])
    assert lines[-1] == f"per-class accuracy: {png}"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(png.parent.glob("*.tmp-*"))

    runs = read_runs([ws["root"] / "runs" / ws["plain"], ws["root"] / "runs" / ws["sel"]])
    ax = per_class_figure(runs).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == _eval(ws, ws["sel"])["class_names"]
    for line, (_, report) in zip(ax.get_lines(), runs, strict=True):
        row = main_row(report)
        assert list(line.get_ydata()) == [100 * a for a in report["methods"][row]["per_class"]]


def test_compare_bad_input_is_one_line_and_writes_nothing(ws) -> None:
    """An unknown run (with "did you mean" and the runs), an --out that is not a .png and a --method
    no run has are each one error line, exit status 1, and no figure file."""
    root = str(ws["root"])
    line = _error_line(run_cli("compare", ws["sel"], "syn-kbsyn-plian", "--workdir", root, check=False))
    assert f"did you mean '{ws['plain']}'?" in line and "runs: " in line
    bad_out = ws["root"] / "x.pdf"
    assert "give a path ending in .png" in _error_line(
        run_cli("compare", ws["sel"], "--out", str(bad_out), "--workdir", root, check=False)
    )
    line = _error_line(run_cli("compare", ws["sel"], "--method", "knn", "--workdir", root, check=False))
    assert "no result 'knn'" in line and "retformer" in line
    assert not bad_out.exists() and not (ws["root"] / "compare" / f"{ws['sel']}.png").exists()


def test_primary_rows_are_the_reports_primary_results(ws) -> None:
    """run_index keeps its own copy of report.py's `primary_results` (to stay torch-free): the two
    agree on both runs, the shuffled controls and the skipped rows left out alike."""
    for name in (ws["sel"], ws["plain"]):
        report = _eval(ws, name)
        assert primary_rows(report) == primary_results(report)
        assert summarize(ws["root"] / "runs" / name).method == main_row(report)


def test_other_evaluations_reads_the_eval_kb_files_oldest_first(tmp_path: Path) -> None:
    """`eval_file` names `<run>/eval.<kb>.json`; `other_evaluations` reads those files by KB name, oldest
    first, and leaves out the run's own eval.json and a torn file."""
    (tmp_path / "eval.json").write_text("{}")
    for i, kb in enumerate(("b", "a")):
        path = eval_file(tmp_path, kb)
        path.write_text(json.dumps({"kb": kb}))
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "eval.torn.json").write_text("{")
    assert eval_file(tmp_path, "a") == tmp_path / "eval.a.json"
    assert list(other_evaluations(tmp_path).items()) == [("b", {"kb": "b"}), ("a", {"kb": "a"})]
