"""Benchmark a fine-tune step: the trainer's own loop (`finetune_fit`) vs the bare step on one batch.

    python bench/bench_finetune.py --device cuda --out bench/results/finetune.json \
        [--model ViT-B-16] [--batch-size 128] [--steps 20] [--num-workers 8] [--amp on|off]

Model: open_clip `--model` with random weights (same shapes and speed as the paper's ViT-B/16) as a
trainable encoder, and a RetFormer head (width 256, 4 layers, k = 32, 1,000 classes) on CLIP-sized
512-d neighbors. Data: `--images` distinct JPEGs (256 x 256, smooth random patterns) cycled over
batch_size x steps training queries, each with k neighbors gathered from a random store.

  trainer: `finetune_fit` for 2 epochs of `--steps` optimizer steps (decode + augment in DataLoader
      workers, neighbor gather, mixup, label smoothing, AMP, AdamW, schedule); images/s of the second
      epoch (workers and kernels warm).
  bare: the same model's step on one batch already on the device: forward, loss, backward, AdamW
      step, with the same autocast policy (`trainer.train.amp_policy`), and once more in fp32.
Recorded: images_per_s (trainer), bare_images_per_s, ratio = trainer / bare (how close the loop comes
to its kernel), and amp_speedup = bare AMP / bare fp32 images/s.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.trainer.config import FinetuneConfig, FusionOptions  # noqa: E402
from retformer.trainer.features import RetrievalFeatures  # noqa: E402
from retformer.trainer.finetune import FinetuneModel, finetune_fit, make_finetune_optimizer  # noqa: E402
from retformer.trainer.model_factory import build_model  # noqa: E402
from retformer.trainer.train import amp_policy, soft_targets  # noqa: E402

NUM_CLASSES, DIM, K = 1000, 512, 32


class JpegImages:
    """`images` for `finetune_fit` (the ShardImages interface: len and load(i)): JPEG bytes decoded
    on every load, as images read from shards are."""

    def __init__(self, n: int, distinct: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:256, 0:256] / 256.0
        self.jpegs = []
        for _ in range(distinct):
            f = rng.uniform(1, 8, (3, 2))
            rgb = np.stack([np.sin(2 * np.pi * (a * xx + b * yy)) for a, b in f], axis=-1)
            rgb = (127.5 * (rgb + 1) + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> Image.Image:
        img = Image.open(io.BytesIO(self.jpegs[int(i) % len(self.jpegs)]))
        img.load()
        return img


def random_features(n: int, store_rows: int, seed: int = 0) -> RetrievalFeatures:
    """n training queries with K neighbors each in a store of CLIP-sized fp16 vectors."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    return RetrievalFeatures(
        query_img=unit(n, DIM),
        labels=torch.randint(0, NUM_CLASSES, (n,), generator=g),
        uids=[f"q{i}" for i in range(n)],
        nn_rows=torch.randint(0, store_rows, (n, K), generator=g),
        nn_score=torch.sort(torch.rand(n, K, generator=g), dim=1, descending=True).values,
        store_img=unit(store_rows, DIM).half(),
        store_txt=unit(store_rows, DIM).half(),
        store_has_text=torch.ones(store_rows, dtype=torch.bool),
        store_label=torch.randint(0, NUM_CLASSES, (store_rows,), generator=g),
    )


def make_model(args: argparse.Namespace) -> FinetuneModel:
    from retformer.kb_builder.encoders import build_image_encoder
    from retformer.kb_builder.kb_schema import ImageEncoder

    torch.manual_seed(0)
    encoder = build_image_encoder(ImageEncoder(name="open_clip", model=args.model, pretrained=None))
    options = FusionOptions(width=args.width, depth=args.depth, heads=8)
    head = build_model("retformer", NUM_CLASSES, DIM, DIM, K, options)
    return FinetuneModel(encoder, head)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_rate(
    args: argparse.Namespace, feats: RetrievalFeatures, device: torch.device, amp: bool
) -> dict[str, Any]:
    """Images/s of the bare training step on one device-resident batch (forward, loss, backward, step)."""
    model = make_model(args).to(device).train()
    config = FinetuneConfig(batch_size=args.batch_size, amp=amp, device=str(device))
    optimizer = make_finetune_optimizer(model, config)
    use_amp, dtype = amp_policy(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    idx = torch.arange(args.batch_size)
    b = {k: v.to(device) for k, v in feats.batch(idx).items()}
    x = torch.randn(args.batch_size, 3, model.image_size, model.image_size, device=device)
    targets = soft_targets(b["y"], NUM_CLASSES, config.label_smoothing)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            logits = model(x, b["nn_img"], b["nn_txt"])
        loss = F.cross_entropy(logits.float(), targets)  # as trainer.train.train_epochs
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "amp": use_amp,
        "dtype": str(dtype).removeprefix("torch.") if use_amp else "float32",
        "images_per_s": round(args.batch_size * args.steps / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "peak_gpu_bytes": peak,
    }


def trainer_rate(args: argparse.Namespace, feats: RetrievalFeatures, device: torch.device) -> dict[str, Any]:
    """Images/s of the trainer's own loop (second of two epochs)."""
    model = make_model(args)
    images = JpegImages(len(feats), args.images)
    config = FinetuneConfig(
        epochs=2, batch_size=args.batch_size, amp=args.amp, device=str(device), num_workers=args.num_workers,
        warmup_epochs=0.5,
    )  # fmt: skip
    history = finetune_fit(model, images, feats, config, progress=False)
    return {
        "images_per_s": history[-1]["images_per_s"],
        "epoch_s": history[-1]["time_s"],
        "first_epoch_images_per_s": history[0]["images_per_s"],
        "num_workers": args.num_workers,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch / timed bare steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed bare steps first")
    ap.add_argument("--num-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--images", type=int, default=64, help="distinct JPEGs, cycled")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--amp", choices=["on", "off"], default="on")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/finetune.json"))
    args = ap.parse_args(argv)
    args.amp = args.amp == "on"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = random_features(args.batch_size * args.steps, store_rows=max(4096, args.batch_size * K))
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print("bare step, AMP ...", flush=True)
    bare = bare_step_rate(args, feats, device, amp=args.amp)
    print("bare step, fp32 ...", flush=True)
    fp32 = bare_step_rate(args, feats, device, amp=False) if bare["amp"] else bare
    print("trainer (finetune_fit, 2 epochs) ...", flush=True)
    trainer = trainer_rate(args, feats, device)
    result.update(
        {
            "bare": bare,
            "bare_fp32": fp32,
            "trainer": trainer,
            "images_per_s": trainer["images_per_s"],
            "bare_images_per_s": bare["images_per_s"],
            "ratio": round(trainer["images_per_s"] / bare["images_per_s"], 3),
            "amp_speedup": round(bare["images_per_s"] / fp32["images_per_s"], 2),
        }
    )
    print(
        f"fine-tune step: trainer {result['images_per_s']} img/s, bare {result['bare_images_per_s']} img/s "
        f"({bare['dtype']}), ratio {result['ratio']}; bare AMP / fp32 {result['amp_speedup']}x",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
