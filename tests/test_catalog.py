"""`retformer list datasets|kbs|experiments|encoders|clusters` (issue 20, item 10): every manifest and
registered encoder, one line each, through the real CLI and the repository's own manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retformer.artifacts import manifest
from retformer.kb_builder.encoders import encoder_names
from retformer.pipelines.catalog import ENCODER_NEEDS, KINDS
from tests.helpers import run_cli

CATEGORY = {"datasets": "datasets", "kbs": "kb", "experiments": "experiments", "clusters": "clusters"}


def _listed(kind: str, workdir: Path) -> dict[str, dict]:
    proc = run_cli("list", kind, "--json", "--workdir", str(workdir))
    return {entry["name"]: entry for entry in json.loads(proc.stdout)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_manifest_and_encoder_is_one_line_with_its_description(kind: str, tmp_path: Path) -> None:
    """Each kind lists exactly the manifests the loader finds (encoders: the registry's names), each
    with its manifest's description and a GPU, data and where field; the text form has one line per
    entry under one header line."""
    listed = _listed(kind, tmp_path)
    if kind == "encoders":
        assert set(listed) == set(encoder_names()["image"]) | set(encoder_names()["text"])
    else:
        assert sorted(listed) == manifest.available(CATEGORY[kind])
        for name, entry in listed.items():
            assert entry["what"] == manifest.load(CATEGORY[kind], name)["description"], name
    assert all(e["what"] and e["gpu"] and e["data"] and e["where"] for e in listed.values())
    text = run_cli("list", kind, "--workdir", str(tmp_path)).stdout.splitlines()
    assert text[0].split() == ["name", "what", "gpu", "data", "where"]
    assert [line.split()[0] for line in text[1:]] == sorted(listed)


def test_what_each_entry_needs_follows_the_manifest(tmp_path: Path) -> None:
    """The GPU and data fields say what the manifests say: Fashion-MNIST-LT's IDX folder is present
    exactly when it exists, digits ship in scikit-learn, the fine-tune experiments want a GPU and the
    frozen ones do not, the open_clip KBs download weights, the GPU SLURM manifest books GPUs, and the
    experiments' tables are under --workdir."""
    datasets = _listed("datasets", tmp_path)
    fmnist_root = manifest.load("datasets", "fmnist_lt")["root"]
    assert datasets["fmnist_lt"]["data"] == ("present" if Path(fmnist_root).is_dir() else "missing")
    assert datasets["fmnist_lt"]["where"] == fmnist_root
    assert datasets["digits_lt"]["data"] == "in a wheel"
    experiments = _listed("experiments", tmp_path)
    assert experiments["ours_finetune"]["gpu"].startswith("yes") and experiments["demo"]["gpu"] == "no"
    assert experiments["demo"]["where"].startswith(f"{tmp_path}/datasets/")
    kbs = _listed("kbs", tmp_path)
    assert "open_clip weights" in kbs["datacomp_clip"]["data"] and kbs["datacomp_clip"]["gpu"] == "advised"
    assert kbs["fmnist_world"]["where"] == f"built from dataset fmnist_lt: {fmnist_root}"
    clusters = _listed("clusters", tmp_path)
    assert clusters["slurm_gpu"]["gpu"] == "yes (1 per job)" and clusters["local"]["where"] == "this machine"
    assert "retformer[slurm]" in run_cli("list", "clusters").stdout  # not eaten as rich markup


def test_every_registered_encoder_says_what_it_needs() -> None:
    """A new encoder in kb_builder/encoders' registry must also say its GPU and weights needs."""
    assert set(ENCODER_NEEDS) == set(encoder_names()["image"]) | set(encoder_names()["text"])


def test_unknown_kind_is_one_line_with_the_kinds(tmp_path: Path) -> None:
    """`retformer list dataset`: one error line with "did you mean" and every kind, exit status 1."""
    proc = run_cli("list", "dataset", "--workdir", str(tmp_path), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "did you mean 'datasets'?" in lines[0] and all(kind in lines[0] for kind in KINDS)


def test_a_broken_manifest_is_listed_with_its_problem(tmp_path: Path, monkeypatch) -> None:
    """A user manifest that is not valid YAML does not stop the listing: it is a line saying why."""
    (tmp_path / "m" / "datasets").mkdir(parents=True)
    (tmp_path / "m" / "datasets" / "zz_broken.yaml").write_text("kind: [unclosed")
    monkeypatch.setenv("RETFORMER_MANIFESTS", str(tmp_path / "m"))
    listed = _listed("datasets", tmp_path)
    assert listed["zz_broken"]["what"].startswith("(unreadable: manifest") and "fmnist_lt" in listed
