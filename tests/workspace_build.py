"""The tests' small end-to-end workspace, built two ways: through the real `retformer` CLI (one
subprocess per stage, Dask workers where the CLI starts them) and in this process (the same stage_*
functions the CLI calls, every task inline). `tests/test_workspace_build.py` proves the two are
byte-equal, so tests that are not about the CLI can use the cheaper in-process build."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli

RUN = "tiny"


def build_with_cli(ws: Path, manifests: dict[str, Path]) -> Path:
    """Every stage through the real CLI, as a user runs them; returns `ws`."""
    m = {key: str(path) for key, path in manifests.items()}
    common = ["--workdir", str(ws)]
    run_cli("shards", "--kb", m["kb"], "--dataset", m["dataset"], *common)
    run_cli("embed", "--kb", m["kb"], "--dataset", m["dataset"], "--workers", "1", *common)
    run_cli("index", "--kb", m["kb"], "--workers", "1", *common)
    run_cli("neighbors", "--dataset", m["dataset"], "--kb", m["kb"], *common)
    run_cli(
        "train",
        "--dataset",
        m["dataset"],
        "--kb",
        m["kb"],
        "--experiment",
        m["experiment"],
        "--run",
        RUN,
        *common,
    )
    return ws


def build_in_process(ws: Path, manifests: dict[str, Path]) -> Path:
    """The same stages as `build_with_cli`, called here with every task inline (no subprocess, no
    cluster); returns `ws`."""
    from retformer.artifacts.workspace import Workspace
    from retformer.pipelines import stages

    workspace = Workspace(ws)
    kb = stages.load_kb(str(manifests["kb"]), None)
    ds = stages.load_dataset_manifest(str(manifests["dataset"]), None)
    exp = stages.load_experiment(str(manifests["experiment"]), None)
    stages.stage_shards(workspace, kb, ds, None)
    stages.stage_embed_kb(workspace, kb, None)
    stages.stage_embed_dataset(workspace, ds, kb.encoders, None, kb.embed)
    stages.stage_index(workspace, kb, in_process=True)
    stages.stage_neighbors(workspace, ds, kb)
    stages.stage_train(workspace, ds, kb, exp, RUN)
    return ws
