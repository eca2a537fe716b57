"""Shared fixtures: offline paths, a small end-to-end workspace built once per session."""

from __future__ import annotations

import os

# Before anything imports torch, numpy or faiss (they read these once, at import):
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread in this process and every CLI it starts: several tests compare outputs bit for
# bit (the kill matrix, concurrent runs, the in-process vs CLI workspace), and CPU kernels with 2+
# threads were measured to differ run to run at 1e-7 (a loss, a neighbor score). Dask workers already
# run one thread each. (Set after `tests.helpers` was imported, torch had already taken 2 threads.)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Tests run on the CPU unless asked (a GPU box would otherwise run the bit-exact tests on CUDA);
# RETFORMER_TEST_GPU=1 keeps the GPUs visible for the tests marked `gpu`.
if os.environ.get("RETFORMER_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.workspace_build import build_in_process  # noqa: E402

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parents[1]


def have_fmnist() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


needs_fmnist = pytest.mark.skipif(not have_fmnist(), reason=f"Fashion-MNIST IDX files not in {FMNIST_DIR}")


def write_manifest(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


SMALL_ENCODERS = {"image": {"name": "efficientnet_lite0", "image_size": 32}, "text": {"name": "minilm"}}


@pytest.fixture(scope="session")
def small_manifests(tmp_path_factory) -> dict[str, Path]:
    """User-style manifest files for a small slice: Fashion-MNIST-LT with n_max=40 and a KB that holds
    the world pool (300 items) and the downstream training split (so self-exclusion is exercised)."""
    root = tmp_path_factory.mktemp("manifests")
    ds = write_manifest(
        root / "tiny_lt.yaml",
        {
            "name": "tiny_lt",
            "kind": "fashion_mnist_lt",
            "root": str(FMNIST_DIR),
            "n_max": 40,
            "imbalance_ratio": 10,
            "seed": 0,
            "shard_size": 100,
            "test_limit": 200,
            "shot_thresholds": {"many": 20, "few": 8},
            "neighbors": {"k": 8},
        },
    )
    kb = write_manifest(
        root / "tiny_all.yaml",
        {
            "name": "tiny_all",
            "source": {
                "kind": "all",
                "dataset": str(ds),
                "size": 300,
                "wrong_caption_fraction": 0.2,
                "seed": 0,
            },
            "shard_size": 100,
            "encoders": SMALL_ENCODERS,
            "embed": {"batch_size": 64},
            "index": {"kind": "auto", "recall_target": 0.9, "memory_budget_gb": 1, "num_shards": 2, "k": 8},
        },
    )
    exp = write_manifest(
        root / "tiny_exp.yaml",
        {
            "name": "tiny_exp",
            "k": 4,
            "eval_split": "test",
            "methods": [
                "retformer",
                "retformer_no_text",
                "retformer_no_image",
                "mlp_only",
                "linear_probe",
                "knn_vote",
            ],
            "model": {"width": 32, "depth": 1, "heads": 2},
            "train": {"epochs": 2, "batch_size": 32, "seed": 0},
        },
    )
    return {"dataset": ds, "kb": kb, "experiment": exp}


@pytest.fixture(scope="session")
def e2e_workspace(tmp_path_factory, small_manifests) -> Path:
    """Every stage once on the small slice, built in this process (byte-equal to the CLI-built
    workspace: tests/test_workspace_build.py); returns the workspace root. Treat it as read-only:
    a test that changes files copies it first."""
    if not have_fmnist():
        pytest.skip(f"Fashion-MNIST IDX files not in {FMNIST_DIR}")
    return build_in_process(tmp_path_factory.mktemp("work"), small_manifests)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where torch can use a CUDA device and RETFORMER_TEST_GPU=1."""
    if os.environ.get("RETFORMER_TEST_GPU") == "1":
        import torch

        if torch.cuda.is_available():
            return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU and RETFORMER_TEST_GPU=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
