"""Bad input through the real `retformer` CLI: one `error:` line, a non-zero exit, nothing half-written.

Each case runs the CLI in a subprocess as a user would and asserts: the exit status; that stderr is
exactly one line, starting with `error:` and naming the thing that is wrong (no traceback); and
that the workdir holds no new file, or (for the cases run on a finished workspace) is unchanged.
The data-path cases (truncated shards, empty tars, non-images) are in test_reliability_data.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import needs_fmnist, write_manifest
from tests.helpers import run_cli


@dataclass(frozen=True)
class Case:
    """One bad input: CLI args (built from the manifests), the exit status, words the line must hold."""

    id: str
    args: Callable[[dict[str, Path], Path], list[str]]
    code: int
    says: tuple[str, ...]


def _ds(m: dict[str, Path]) -> list[str]:
    return ["--dataset", str(m["dataset"])]


def _kb(m: dict[str, Path]) -> list[str]:
    return ["--kb", str(m["kb"])]


def _exp(m: dict[str, Path]) -> list[str]:
    return ["--experiment", str(m["experiment"])]


def _edited(kind: str, edit: Callable[[dict], None]) -> Callable[[dict[str, Path], Path], Path]:
    """A copy of one of the small manifests with `edit` applied, written next to the workdir."""

    def make(m: dict[str, Path], tmp: Path) -> Path:
        data = copy.deepcopy(yaml.safe_load(m[kind].read_text()))
        edit(data)
        return write_manifest(tmp / "manifests" / f"bad_{kind}.yaml", data)

    return make


def _with(
    kind: str, edit: Callable[[dict], None], command: str
) -> Callable[[dict[str, Path], Path], list[str]]:
    flags = {"dataset": _ds, "kb": _kb, "experiment": _exp}

    def args(m: dict[str, Path], tmp: Path) -> list[str]:
        bad = _edited(kind, edit)(m, tmp)
        others = {"train": ["dataset", "kb", "experiment"], "neighbors": ["dataset", "kb"]}.get(
            command, [kind]
        )
        out = [command]
        for other in others:
            out += [f"--{other}", str(bad)] if other == kind else flags[other](m)
        return out

    return args


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key)


CASES = [
    # usage errors (typer's bundled click)
    Case("no-command", lambda m, t: [], 2, ("no command given",)),
    Case("typo-command", lambda m, t: ["trian"], 2, ("No such command", "trian")),
    Case("missing-option", lambda m, t: ["train", *_kb(m)], 2, ("Missing option", "--dataset")),
    Case("k-not-int", lambda m, t: ["neighbors", *_ds(m), *_kb(m), "--k", "abc"], 2, ("--k",)),
    Case(
        "k-zero",
        lambda m, t: ["neighbors", *_ds(m), *_kb(m), "--k", "0"],
        2,
        ("--k", "greater than or equal to 1"),
    ),
    Case("unknown-option", lambda m, t: ["embed", *_kb(m), "--wrokers", "2"], 2, ("--wrokers",)),
    # --set overrides go through the schemas
    Case(
        "set-neighbors-k-abc",
        lambda m, t: ["neighbors", *_ds(m), *_kb(m), "--set", "dataset.neighbors.k=abc"],
        1,
        ("neighbors.k", "dataset.neighbors.k=abc"),
    ),
    Case(
        "set-epochs-abc",
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--set", "experiment.train.epochs=abc"],
        1,
        ("train.epochs", "integer"),
    ),
    Case(
        "set-lr-abc",
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--set", "train.lr=abc"],
        1,
        ("train.lr", "number"),
    ),
    Case(
        "set-shard-size-0", lambda m, t: ["shards", *_kb(m), "--set", "kb.shard_size=0"], 1, ("shard_size",)
    ),
    Case("set-unknown-key", lambda m, t: ["shards", *_kb(m), "--set", "shard_sise=5"], 1, ("shard_sise",)),
    Case("set-no-equals", lambda m, t: ["shards", *_kb(m), "--set", "shard_size"], 1, ("key=value",)),
    # manifests: unknown keys (did you mean), wrong types, out of range, missing sections
    Case(
        "experiment-top-level-typo",
        _with("experiment", _set("epocs", 3), "train"),
        1,
        ("bad_experiment.yaml", "epocs", "did you mean 'train.epochs'"),
    ),
    Case(
        "experiment-method-typo",
        _with("experiment", _set("methods", ["retformr"]), "train"),
        1,
        ("methods[0]", "retformr"),
    ),
    Case(
        "experiment-loss-unknown",
        _with("experiment", _set("train.loss", "focal"), "train"),
        1,
        ("train.loss", "focal"),
    ),
    Case(
        "kb-unknown-key",
        _with("kb", _set("shard_sise", 2500), "shards"),
        1,
        ("bad_kb.yaml", "shard_sise", "did you mean 'shard_size'"),
    ),
    Case(
        "kb-no-encoders", _with("kb", _drop("encoders"), "embed"), 1, ("bad_kb.yaml", "encoders", "missing")
    ),
    Case(
        "kb-encoder-option-typo",
        _with("kb", _set("encoders.image.imgsize", 64), "embed"),
        1,
        ("encoders.image", "imgsize", "image_size"),
    ),
    Case("kb-index-kind", _with("kb", _set("index.kind", "ivf"), "index"), 1, ("index.kind", "ivf")),
    Case("kb-embed-device", _with("kb", _set("embed.device", "gpu"), "embed"), 1, ("embed.device", "gpu")),
    Case("kb-source-kind", _with("kb", _set("source.kind", "web"), "shards"), 1, ("source.kind", "web")),
    Case(
        "dataset-key-typo",
        _with("dataset", _set("imbalance_ration", 10), "shards"),
        1,
        ("imbalance_ration", "did you mean 'imbalance_ratio'"),
    ),
    Case(
        "dataset-key-of-other-kind",
        _with("dataset", _set("num_classes", 10), "shards"),
        1,
        ("num_classes", "does not apply to kind fashion_mnist_lt"),
    ),
    Case(
        "dataset-ratio-below-1",
        _with("dataset", _set("imbalance_ratio", 0.5), "shards"),
        1,
        ("imbalance_ratio",),
    ),
    Case("dataset-unknown-kind", _with("dataset", _set("kind", "mnist"), "shards"), 1, ("kind", "mnist")),
    Case(
        "dataset-quoted-number",
        _with("dataset", _set("n_max", "40"), "shards"),
        1,
        ("n_max", "integer"),
    ),
    # names and paths
    Case("unknown-kb-name", lambda m, t: ["shards", "--kb", "no_such_kb"], 1, ("no_such_kb",)),
    Case(
        "manifest-not-yaml",
        lambda m, t: ["shards", "--kb", str(_write(t / "broken.yaml", "source: [unclosed"))],
        1,
        ("broken.yaml", "YAML"),
    ),
    Case("evaluate-unknown-run", lambda m, t: ["evaluate", "--run", "nope"], 1, ("nope",)),
    # issue 17 (4): a KB / run name is one folder under --workdir (`../..` or an absolute path wrote,
    # and removed, files outside it)
    Case(
        "kb-name-parent",
        lambda m, t: ["shards", *_kb(m), "--set", "kb.name=../../escaped"],
        1,
        ("KB name '../../escaped'", "plain name"),
    ),
    Case(
        "kb-name-absolute",
        lambda m, t: ["embed", *_kb(m), "--set", f"kb.name={t / 'abs_kb'}"],
        1,
        ("KB name", "abs_kb", "plain name"),
    ),
    Case(
        "kb-name-in-manifest",
        _with("kb", _set("name", ".."), "index"),
        1,
        ("KB name '..'", "plain name"),
    ),
    Case(
        "run-name-absolute",
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--run", str(t / "abs_run"), "--force"],
        1,
        ("run name", "abs_run", "plain name"),
    ),
    Case(
        "run-name-parent",
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--run", "../..", "--force"],
        1,
        ("run name '../..'", "plain name"),
    ),
    Case("evaluate-run-parent", lambda m, t: ["evaluate", "--run", "../.."], 1, ("run name '../..'",)),
    # issue 17 (5): --workers below 1 started a cluster with no workers and waited forever
    Case("workers-negative", lambda m, t: ["embed", *_kb(m), "--workers", "-3"], 2, ("--workers",)),
    Case("workers-minus-one", lambda m, t: ["index", *_kb(m), "--workers", "-1"], 2, ("--workers",)),
    # issue 17 (low): silently accepted or silently changed
    Case(
        "kb-templates-empty",  # became the Fashion-MNIST templates
        _with("kb", _set("source.templates", []), "shards"),
        1,
        ("templates", "is empty"),
    ),
    Case(
        "kb-template-attribute",  # `{name.__class__}` reached the string's attributes
        _with("kb", _set("source.templates", ["a photo of {name}, {name.__class__}"]), "shards"),
        1,
        ("{name.__class__}", "only the fields {name} and {a}"),
    ),
    Case(
        "set-image-size-20000",  # accepted: a 4.8 GB tensor per image at embed
        lambda m, t: ["embed", *_kb(m), "--set", "kb.encoders.image.image_size=20000"],
        1,
        ("encoders.image.image_size", "less than or equal to 1024"),
    ),
    Case(
        "manifest-duplicate-key",  # the last value won without a word
        lambda m, t: ["shards", "--kb", str(_write(t / "dup.yaml", _dup_kb(m)))],
        1,
        ("dup.yaml", "duplicate key 'shard_size'", "line"),
    ),
    Case(
        "set-list-item",  # `methods.0=` turned the methods list into {"0": ...}: "should be a valid list"
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--set", "experiment.methods.0=retformr"],
        1,
        ("methods[0]", "retformr"),
    ),
    Case(
        "predict-out-is-a-folder",  # IsADirectoryError on the temporary file, after all the work
        lambda m, t: ["predict", "any-run", "x.png", "--out", str(t)],
        1,
        ("--out", "exists and is not a file"),
    ),
    Case(
        "set-list-index-out-of-range",
        lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--set", "experiment.methods.99=mlp_only"],
        1,
        ("methods", "'99' is not an index"),
    ),
]


def _dup_kb(m: dict[str, Path]) -> str:
    """The small KB manifest's text with `shard_size` given a second time at the end."""
    return m["kb"].read_text() + "shard_size: 7\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _assert_one_error_line(proc, says: tuple[str, ...]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in says:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


# More cases of a family already in the default tier (a CLI subprocess costs ~2 s; the matrix was a
# third of `make test`): they run in the slow tier (`make test-all`, CI).
SLOW_CASES = frozenset(
    {
        "set-epochs-abc",
        "set-lr-abc",
        "set-list-index-out-of-range",
        "experiment-method-typo",
        "experiment-loss-unknown",
        "kb-no-encoders",
        "kb-encoder-option-typo",
        "kb-index-kind",
        "kb-embed-device",
        "kb-source-kind",
        "kb-template-attribute",
        "dataset-key-of-other-kind",
        "dataset-ratio-below-1",
        "dataset-unknown-kind",
        "dataset-quoted-number",
        "kb-name-absolute",
        "run-name-absolute",
        "workers-minus-one",
    }
)
TIERED_CASES = [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.id in SLOW_CASES else ()) for c in CASES]


@pytest.mark.parametrize("case", TIERED_CASES)
def test_bad_input_is_one_error_line_and_writes_nothing(case: Case, small_manifests, tmp_path) -> None:
    """Each bad input exits with its status and one `error:` line naming the thing; the workdir (a
    fresh one) stays empty, and nothing is written beside it: the check comes before any work."""
    workdir = tmp_path / "work"
    args = case.args(small_manifests, tmp_path)
    proc = run_cli(*args, "--workdir", str(workdir), check=False) if args else run_cli(check=False)
    assert proc.returncode == case.code, (proc.returncode, proc.stderr)
    _assert_one_error_line(proc, case.says)
    written = sorted(p for p in workdir.rglob("*") if p.is_file()) if workdir.exists() else []
    assert written == [], written
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    assert outside == [], outside


def test_workdir_that_is_a_file_is_one_error_line(small_manifests, tmp_path) -> None:
    """A --workdir that is a file is refused up front (was NotADirectoryError's traceback)."""
    afile = _write(tmp_path / "afile", "x")
    proc = run_cli("shards", *_kb(small_manifests), "--workdir", str(afile), check=False)
    assert proc.returncode == 1
    _assert_one_error_line(proc, (str(afile), "is a file"))
    assert afile.read_text() == "x"


def test_a_tampered_model_file_is_one_error_line(tmp_path) -> None:
    """Issue 17 (low): a model file holding a pickled function (what a tampered `.pt` would carry) is
    refused unread by torch.load(weights_only=True), as before, but the error was torch's 7-line
    paragraph on weights_only defaults; now one line naming the file and the refused global."""
    import os

    import torch

    run = tmp_path / "runs" / "evil"
    run.mkdir(parents=True)
    torch.save({"format": "retformer-trainer-checkpoint/1", "evil": os.getcwd}, run / "retformer.pt")
    proc = run_cli("predict", str(run / "retformer.pt"), "x.png", "--workdir", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(proc, (str(run / "retformer.pt"), "refused unread", "getcwd"))


def test_version_prints_and_exits_zero() -> None:
    """`retformer --version` prints the installed version (was a usage error's traceback)."""
    proc = run_cli("--version", check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("retformer "), proc.stdout + proc.stderr


@needs_fmnist
@pytest.mark.parametrize(
    "case",
    [
        Case(
            "encoders-changed-since-embed",
            lambda m, t: ["neighbors", *_ds(m), *_kb(m), "--set", "kb.encoders.image.image_size=48"],
            1,
            ("was embedded with", "retformer embed"),
        ),
        Case(
            "k-larger-than-kb", lambda m, t: ["neighbors", *_ds(m), *_kb(m), "--k", "100000"], 1, ("larger",)
        ),
        # slow tier: the family runs in the default one with the two cases above (~6 s each on 2 cores)
        pytest.param(
            Case(
                "eval-split-unknown",
                lambda m, t: ["train", *_ds(m), *_kb(m), *_exp(m), "--set", "experiment.eval_split=tset"],
                1,
                ("tset",),
            ),
            marks=pytest.mark.slow,
        ),
    ],
    ids=lambda c: c.id,
)
def test_bad_input_on_a_finished_workspace_changes_nothing(
    case: Case, small_manifests, e2e_workspace, tmp_path
):
    """On a workspace every stage has completed, a bad input is one error line and no file changes."""
    workdir = tmp_path / "work"
    shutil.copytree(e2e_workspace, workdir)
    before = _snapshot(workdir)
    proc = run_cli(*case.args(small_manifests, tmp_path), "--workdir", str(workdir), check=False)
    assert proc.returncode == case.code, (proc.returncode, proc.stderr)
    _assert_one_error_line(proc, case.says)
    assert _snapshot(workdir) == before


def test_small_manifests_still_pass_the_schemas(small_manifests) -> None:
    """The positive control: the test manifests (and the repo's own, by name) load without error, so the
    cases above fail for their one edit, not for the base manifest."""
    from retformer.pipelines import stages

    stages.load_dataset_manifest(str(small_manifests["dataset"]), None)
    stages.load_kb(str(small_manifests["kb"]), None)
    stages.load_experiment(str(small_manifests["experiment"]), None)
    for name in ("fmnist_lt", "digits_lt", "cifar100lt", "imagenet_lt", "mini_webvision", "fmnist_lt_noisy"):
        stages.load_dataset_manifest(name, None)
    for name in ("fmnist_world", "digits_world", "datacomp_clip", "datacomp_download", "imagenet_lt_all"):
        stages.load_kb(name, None)
    for name in ("demo", "ours_finetune", "k_sweep", "clip_zeroshot", "logit_adjusted"):
        stages.load_experiment(name, None)


TORN_ELSEWHERE = [  # (torn file under the workdir, command args) -> one error line naming the file
    pytest.param("runs/tiny/eval.json", lambda m: ["evaluate", "--run", "tiny"], id="eval-json-evaluate"),
    pytest.param(  # slow tier (~6 s): the other two stages' cases keep the default tier's
        "datasets/tiny_lt/dataset.json",
        lambda m: ["train", *_ds(m), *_kb(m), *_exp(m)],
        id="dataset-json-train",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "kb/tiny_all/index/index.json", lambda m: ["neighbors", *_ds(m), *_kb(m)], id="index-json-neighbors"
    ),
]


@needs_fmnist
@pytest.mark.parametrize(("rel", "args"), TORN_ELSEWHERE)
def test_a_torn_record_read_by_another_stage_is_one_error_line(
    rel, args, small_manifests, e2e_workspace, tmp_path
):
    """Issue 17 (7): a record cut in half (a full disk, another tool). Before: a 66-138-line
    JSONDecodeError traceback. Now: one `error:` line naming the file, and nothing changes."""
    workdir = tmp_path / "work"
    shutil.copytree(e2e_workspace, workdir)
    torn = workdir / rel
    torn.write_text(torn.read_text()[: len(torn.read_text()) // 2])
    before = _snapshot(workdir)
    proc = run_cli(*args(small_manifests), "--workdir", str(workdir), check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    _assert_one_error_line(proc, (str(torn), "torn"))
    assert _snapshot(workdir) == before


@needs_fmnist
@pytest.mark.slow  # a full rerun of the stages on a copy of the workspace (~9 s on 2 cores)
def test_a_torn_record_of_a_stage_output_makes_the_stage_redo_it(small_manifests, e2e_workspace, tmp_path):
    """Issue 17 (7): the stage that writes a record treats a torn one as absent and redoes the output
    (index.json: `retformer index`; _neighbors.json: `retformer neighbors`) instead of a traceback."""
    workdir = tmp_path / "work"
    shutil.copytree(e2e_workspace, workdir)
    m = small_manifests
    for rel, args in (
        ("kb/tiny_all/index/index.json", ["index", *_kb(m)]),
        ("datasets/tiny_lt/neighbors/tiny_all/k8/_neighbors.json", ["neighbors", *_ds(m), *_kb(m)]),
    ):
        torn = workdir / rel
        torn.write_text(torn.read_text()[:40])
        proc = run_cli(*args, "--workdir", str(workdir), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert isinstance(json.loads(torn.read_text()), dict)
