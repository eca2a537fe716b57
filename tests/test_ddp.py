"""Training on several processes (trainer/distributed.py): 2 CPU processes over gloo end where one process
ends with the same global batch, in feature mode (through `torchrun ... -m retformer.pipelines.cli train`)
and in fine-tune mode, and a checkpoint written by one world size resumes on the other."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image

from retformer.trainer import distributed
from retformer.trainer.config import FinetuneConfig, FusionOptions, TrainConfig

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float rounding: the ranks' partial gradients are summed in another order

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noise_only(name: str) -> bool:
    """An attention key bias: softmax over the keys ignores it (q.b is the same for every key), so its
    true gradient is 0 and what it gets is rounding noise, which AdamW (dividing by the gradient's own
    magnitude) turns into steps of up to lr whichever sign the noise has. Summing the ranks' parts in
    another order changes the noise: such a bias is not comparable (measured: up to 7e-6 in the CLI
    test), and it does not change a single output."""
    return name.endswith("k_proj.bias")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Every tensor within ATOL (attention key biases aside: `_noise_only`); returns the largest absolute
    difference."""
    assert list(a) == list(b)
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if _noise_only(name):
            continue
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=name)
        else:
            assert torch.equal(x, y), name
    return worst


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("time_s", "images_per_s")} for e in history]


def _assert_same_history(a: list[dict], b: list[dict]) -> None:
    a, b = _strip(a), _strip(b)
    assert [e.keys() for e in a] == [e.keys() for e in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _spawn(fn, *args) -> None:
    """fn(rank, *args) in 2 spawned processes that join a gloo group (as torchrun would set them up)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    mp.spawn(_member, args=(fn, *args), nprocs=2, join=True)


def _member(rank: int, fn, *args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.world() == 2
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_micro_shard_cuts_the_global_batch_in_order(size: int, w: int) -> None:
    """The ranks' own parts, concatenated in rank order, are the global micro-batch in order (sizes
    differing by at most one; an empty part is one stand-in row that does not count); each own row's
    partner is found where `partner_at` points; in one process nothing moves (needed = the batch,
    partner_at = the permutation itself)."""
    perm = np.random.default_rng(size * 10 + w).permutation(size)
    own_rows, counted = [], []
    for r in range(w):
        needed, m, partner_at, c = distributed.micro_shard(size, perm, r, w)
        assert np.array_equal(needed[m:], np.unique(needed[m:]))  # partners: sorted, unique
        assert len(set(needed.tolist())) == len(needed)
        assert np.array_equal(needed[partner_at], perm[needed[:m]])
        counted.append(c)
        if c:
            assert m == c
            own_rows += needed[:m].tolist()
        else:
            assert m == 1 and needed[0] == size - 1 and size < w
    assert own_rows == list(range(size)) and sum(counted) == size
    assert max(counted) - min(counted) <= 1
    if w == 1:
        needed, m, partner_at, c = distributed.micro_shard(size, perm, 0, 1)
        assert np.array_equal(needed, np.arange(size)) and m == c == size
        assert np.array_equal(partner_at, perm)
    assert distributed.micro_shard(size, None, 0, w)[2] is None


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One spawn of 2 gloo processes (starting them costs more than the training) that run every
    2-process job of the feature and fine-tune tests; their outputs are in the returned folder, next
    to the 1-process checkpoint they resume."""
    from retformer.trainer.train import fit

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ddp")
    f, cfg, model = _feature_setup()
    fit(model(), f, cfg, progress=False, checkpoint_path=tmp / "one" / "stopped.ckpt.pt", stop_after_epoch=1)
    _spawn(_all_ranks, tmp)
    return tmp


def _all_ranks(rank: int, tmp: Path) -> None:
    _feature_ranks(rank, tmp)
    _finetune_ranks(rank, tmp)
    _selection_ranks(rank, tmp)
    _error_ranks(rank, tmp)


def _error_ranks(rank: int, tmp: Path) -> None:
    from retformer.artifacts.errors import UserError

    def refuse() -> None:
        raise UserError("run r already holds a finished run of another configuration")

    try:
        distributed.from_main(refuse)
    except UserError as exc:
        (tmp / f"error{rank}.txt").write_text(str(exc))
    distributed.barrier()  # the group still works: nobody was left waiting


@pytest.mark.system
def test_an_error_on_rank_0_reaches_every_rank(two_ranks: Path) -> None:
    """A check that fails on rank 0 (the run folder's checks run there alone) raises the same UserError
    on rank 1 instead of leaving it waiting for a broadcast that never comes."""
    for r in (0, 1):
        assert (two_ranks / f"error{r}.txt").read_text().startswith("run r already holds a finished run")


# ------------------------------------------------------------------ feature mode, direct + resume
def _feature_setup():
    from retformer.trainer.model_factory import build_model
    from tests.test_train import make_features

    # 33 samples in batches of 16: the last batch has 1 sample, so rank 1 computes a weight-0 stand-in.
    f = make_features(n=33, seed=5)
    cfg = TrainConfig(
        epochs=3, batch_size=16, mixup_alpha=0.4, label_smoothing=0.1, loss="logit_adjusted", grad_clip=1.0,
        device="cpu", seed=3, warmup_epochs=0.5,
    )  # fmt: skip

    def model():
        torch.manual_seed(0)
        options = FusionOptions(width=32, depth=1, heads=2)
        return build_model("retformer", 4, f.img_dim, f.txt_dim, f.k, options)

    return f, cfg, model


def _feature_ranks(rank: int, tmp: Path) -> None:
    from retformer.trainer.train import fit

    f, cfg, model = _feature_setup()
    # (a) uninterrupted; (b) stopped after epoch 1; (c) resumed from a 1-process epoch-1 checkpoint.
    straight = model()
    history = fit(straight, f, cfg, progress=False, log_path=tmp / "two" / "metrics.jsonl")
    fit(model(), f, cfg, progress=False, checkpoint_path=tmp / "two" / "stopped.ckpt.pt", stop_after_epoch=1)
    resumed = model()
    fit(resumed, f, cfg, progress=False, checkpoint_path=tmp / "one" / "stopped.ckpt.pt")
    torch.save(
        {"straight": straight.state_dict(), "history": history, "resumed": resumed.state_dict()},
        tmp / f"rank{rank}.pt",
    )


@pytest.mark.system
def test_two_processes_train_like_one_and_resume_across_world_sizes(two_ranks: Path) -> None:
    """Feature mode, 2 gloo processes vs 1 with the same global batch (16; mixup, label smoothing, logit
    adjustment, gradient clipping; a last batch of 1 sample, so one rank has an empty part): the same
    final weights (within 1e-5) on both ranks, the same per-epoch loss / accuracy / lr, and the metrics
    file written once by rank 0. A checkpoint that 2 processes stopped after epoch 1 resumes in 1
    process, and one that 1 process stopped resumes in 2, both to the uninterrupted run's weights."""
    from retformer.trainer.train import fit

    tmp_path = two_ranks
    f, cfg, model = _feature_setup()
    ref = model()
    ref_history = fit(ref, f, cfg, progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    worst = max(_assert_same_weights(ref.state_dict(), r["straight"]) for r in ranks)
    _assert_same_history(ref_history, ranks[0]["history"])
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    _assert_same_history(ref_history, lines)
    # 2 processes stopped after epoch 1 -> 1 process resumes.
    resumed_here = model()
    history = fit(resumed_here, f, cfg, progress=False, checkpoint_path=tmp_path / "two" / "stopped.ckpt.pt")
    assert [e["epoch"] for e in history] == [1, 2, 3]
    worst = max(worst, _assert_same_weights(ref.state_dict(), resumed_here.state_dict()))
    # 1 process stopped after epoch 1 -> 2 processes resume.
    for r in ranks:
        worst = max(worst, _assert_same_weights(ref.state_dict(), r["resumed"]))
    print(f"feature mode, 1 vs 2 processes: largest weight difference {worst:.2e}")


# ----------------------------------------------------------------------- selection grid (stacked)
def _select():
    """The stacked recipe's selection on small grids: mlp_only's lr grid, then RetFormer's (lr, la_tau)
    cells and its (alpha, gate) rule on val."""
    from retformer.trainer.config import SelectOptions
    from retformer.trainer.methods import select_method
    from tests.test_train import make_features

    train, val = make_features(n=40, seed=11), make_features(n=24, seed=12)
    opts = SelectOptions(
        lr_grid=(1e-3, 1e-2), baseline_epochs=2, retformer_grid=((3e-3, 0.0), (1e-2, 1.0)),
        retformer_epochs=2, alphas=(0.0, 0.5, 1.0), gate_quantiles=(None, 0.2),
    )  # fmt: skip
    cfg = TrainConfig(batch_size=16, device="cpu", seed=4, mixup_alpha=0.3)
    options = FusionOptions(width=32, depth=1, heads=2)
    common = {"model_options": options, "num_classes": 4, "class_counts": None}
    mlp = select_method("mlp_only", "paper", cfg, train, val, mlp_only=None, opts=opts, **common)
    sel = select_method("retformer", "stacked", cfg, train, val, mlp_only=lambda: mlp, opts=opts, **common)
    return {
        "mlp": mlp.model.state_dict(),
        "model": sel.model.state_dict(),
        "trials": sel.trials,
        **sel.selected,
    }


def _selection_ranks(rank: int, tmp: Path) -> None:
    torch.save(_select(), tmp / f"select{rank}.pt")


@pytest.mark.system
def test_selection_grid_runs_alike_on_two_processes(two_ranks: Path) -> None:
    """Every rank runs the same selection grid (mlp_only's lr grid, then the stacked RetFormer's cells,
    alphas and gates on val) as one collective training after another, and ends with the one-process
    choices: the same lr, la_tau, epoch, alpha and gate, the same val figures for every trial, and the
    same selected weights (within 1e-5)."""
    ref = _select()
    for r in (0, 1):
        got = torch.load(two_ranks / f"select{r}.pt", weights_only=False)
        rule = ("lr", "la_tau", "epoch", "alpha", "beta", "prior_tau", "evidence", "gate_quantile")
        for key in (*rule, "l_i_val_score", "val_shuffled_score", "val_score"):  # figures by the criterion
            assert got[key] == ref[key], key
        if ref["gate_t"] is None:
            assert got["gate_t"] is None
        else:
            assert got["gate_t"] == pytest.approx(ref["gate_t"], abs=1e-5)
        assert [t["val_top1"] for t in got["trials"]] == [t["val_top1"] for t in ref["trials"]]
        _assert_same_weights(ref["mlp"], got["mlp"])
        _assert_same_weights(ref["model"], got["model"])


# ---------------------------------------------------------------------------- fine-tune mode
class _TinyImages:
    """n random RGB images in memory (what ShardImages / SplitImages give: len and load(i))."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.arrays = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.arrays[int(i)])


def _tiny_encoder():
    """A small trainable image tower with the KB encoders' interface (conv + LayerNorm: no BatchNorm,
    whose per-rank statistics gloo cannot synchronise)."""
    from retformer.kb_builder.encoders.base import ImageEncoder

    class Tiny(ImageEncoder):
        name, dim, image_size, spec = "tiny", 16, 16, {"name": "tiny"}

        def __init__(self) -> None:
            torch.manual_seed(1)
            self.model = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 4, stride=4),
                torch.nn.GELU(),
                torch.nn.Flatten(),
                torch.nn.LayerNorm(128),
                torch.nn.Linear(128, 16),
            )

        def _transform(self, img: Image.Image) -> torch.Tensor:
            img = img.resize((self.image_size, self.image_size))
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5

        def _features(self, batch: torch.Tensor) -> torch.Tensor:
            return self.model(batch)

    return Tiny()


def _finetune_setup():
    from retformer.trainer.finetune import FinetuneModel
    from retformer.trainer.model_factory import build_model
    from tests.test_train import make_features

    f = make_features(n=21, di=16, seed=7)  # batches of 6: 6, 6, 6, 3 (two steps of 2 micro-batches)
    cfg = FinetuneConfig(
        epochs=2, batch_size=6, accumulate=2, mixup_alpha=0.4, num_workers=0, device="cpu", seed=2,
        encoder_lr=1e-3, lr=1e-3, warmup_epochs=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    head = build_model("retformer", 4, f.img_dim, f.txt_dim, f.k, FusionOptions(width=32, depth=1, heads=2))
    return f, cfg, FinetuneModel(_tiny_encoder(), head), _TinyImages(len(f))


@contextlib.contextmanager
def _sgd() -> Iterator[None]:
    """finetune_fit with SGD (momentum, the same two learning rates) instead of AdamW: see the test."""
    from retformer.trainer import finetune

    def sgd(model, config):
        groups = [(model.head, config.lr), (model.encoder, config.encoder_lr)]
        return torch.optim.SGD([{"params": m.parameters(), "lr": lr} for m, lr in groups], momentum=0.9)

    saved, finetune.make_finetune_optimizer = finetune.make_finetune_optimizer, sgd
    try:
        yield
    finally:
        finetune.make_finetune_optimizer = saved


def _finetune_ranks(rank: int, tmp: Path) -> None:
    from retformer.trainer.finetune import finetune_fit, finetune_predict

    f, cfg, model, images = _finetune_setup()
    with _sgd():
        history = finetune_fit(model, images, f, cfg, progress=False)
    logits = finetune_predict(model, images, f, batch_size=4)  # 6 batches, 3 per rank, gathered
    torch.save({"state": model.state_dict(), "history": history, "logits": logits}, tmp / f"ft{rank}.pt")


@pytest.mark.system
def test_finetune_two_processes_train_like_one(two_ranks: Path) -> None:
    """Fine-tune mode (a small conv + LayerNorm encoder and a RetFormer head; augmentation, mixup on the
    pixels across the ranks' parts, accumulation of 2 micro-batches, an uneven last batch), 2 gloo
    processes vs 1: the same encoder and head weights (within 1e-5), the same per-epoch figures, and
    sharded prediction gathers every rank the one-process logits.

    The optimizer is SGD here: AdamW divides each gradient by its own running magnitude, so a coordinate
    whose gradient is rounding noise (an attention key bias: its true gradient is 0) moves by about lr
    whichever way the noise falls, and summing the ranks' parts in another order changes the noise
    (measured with AdamW: up to 9e-5 on such coordinates, 5e-7 elsewhere). A linear update keeps the
    comparison at float rounding; feature mode and the CLI test keep AdamW."""
    from retformer.trainer.finetune import finetune_fit, finetune_predict

    tmp_path = two_ranks
    f, cfg, model, images = _finetune_setup()
    with _sgd():
        history = finetune_fit(model, images, f, cfg, progress=False)
    logits = finetune_predict(model, images, f, batch_size=4)
    worst = 0.0
    for r in (0, 1):
        got = torch.load(tmp_path / f"ft{r}.pt", weights_only=True)
        worst = max(worst, _assert_same_weights(model.state_dict(), got["state"]))
        _assert_same_history(history, got["history"])
        torch.testing.assert_close(got["logits"], logits, atol=ATOL, rtol=0)
    assert any(k.startswith("encoder.") for k in got["state"])
    print(f"fine-tune mode, 1 vs 2 processes: largest weight difference {worst:.2e}")


# ------------------------------------------------------------------------------ through the CLI
def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.system
def test_torchrun_cli_train_equals_one_process(e2e_workspace: Path, small_manifests, tmp_path: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 --local-ranks-filter 0 -m retformer.pipelines.cli train` (as
    `make train NPROC=2` runs it: gloo, feature mode, three methods, mixup and label smoothing,
    checkpoints every epoch) on a copy of the e2e workspace ends with the one-process run's eval.json
    metrics, per-epoch figures and model weights (within 1e-5); its run folder holds the same files
    (rank 1 wrote nothing of its own: the metrics files have one line per epoch) and one table is shown.
    Each run has its own copy of the workspace: torchrun's parser refuses `--run` (its `--run-path`)."""
    exp = tmp_path / "ddp_exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "ddp_exp",
                "k": 4,
                "eval_split": "test",
                "methods": ["retformer", "retformer_no_text", "mlp_only"],
                "model": {"width": 32, "depth": 1, "heads": 2},
                "train": {"epochs": 2, "batch_size": 32, "seed": 0, "mixup_alpha": 0.3},
                "checkpoint": {"every_s": 0},
            }
        )
    )
    m = small_manifests
    args = ["train", "--dataset", str(m["dataset"]), "--kb", str(m["kb"]), "--experiment", str(exp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ws = {}
    for name in ("one", "two"):
        ws[name] = tmp_path / name
        shutil.copytree(e2e_workspace, ws[name], ignore=shutil.ignore_patterns("runs"))
    one = subprocess.run(
        [sys.executable, "-m", "retformer.pipelines.cli", *args, "--workdir", str(ws["one"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "--local-ranks-filter", "0"]
    cmd += ["-m", "retformer.pipelines.cli", *args, "--workdir", str(ws["two"])]
    two = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    (run_a,), (run_b,) = ([p.parent for p in (ws[r] / "runs").glob("*/eval.json")] for r in ("one", "two"))
    assert run_a.name == run_b.name  # the same configuration: the same default run name
    a, b = (json.loads((r / "eval.json").read_text()) for r in (run_a, run_b))
    assert set(a["methods"]) == set(b["methods"]) == {"retformer", "retformer_no_text", "mlp_only"}
    for name, ma in a["methods"].items():
        mb = b["methods"][name]
        for key in ("top1", "top5", "many", "medium", "few", "macro_f1", "epochs"):
            assert mb[key] == ma[key], (name, key)
    worst = 0.0
    for name in a["methods"]:
        sa = torch.load(run_a / f"{name}.pt", weights_only=True)["model_state"]
        sb = torch.load(run_b / f"{name}.pt", weights_only=True)["model_state"]
        worst = max(worst, _assert_same_weights(sa, sb))
        la, lb = (
            [json.loads(x) for x in (r / f"{name}.metrics.jsonl").read_text().splitlines()]
            for r in (run_a, run_b)
        )
        _assert_same_history(la, lb)
    files = [sorted(p.relative_to(r).as_posix() for p in r.rglob("*")) for r in (run_a, run_b)]
    assert files[0] == files[1]
    assert two.stdout.count("top1") == one.stdout.count("top1") > 0  # one table
    print(f"torchrun CLI, 1 vs 2 processes: largest weight difference {worst:.2e}")
