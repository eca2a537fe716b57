"""`retformer doctor`: this machine as the stages see it, on one screen, before a first (GPU) run.

Python; torch (its CUDA build and arch list); the NVIDIA driver; GPUs the driver has (NVML) against
GPUs torch can use; native bf16; faiss (CPU or GPU build, GPUs); dask, distributed, dask-cuda,
dask-jobqueue; open_clip and whether the KB manifests' pretrained weights are in the local cache; and
per stage the device it will use and why. `problem` is the one line of a machine whose GPUs torch
cannot use (the command then exits 1): every stage would otherwise stop on it (artifacts/devices.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from retformer.artifacts import devices

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))

    def text(self) -> str:
        width = max(len(k) for k, _ in self.lines)
        return "\n".join(f"{k:<{width}}  {v}" if k else f"{'':<{width}}  {v}" for k, v in self.lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _arch_list(torch) -> list[str]:  # noqa: ANN001
    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    text = flags() if flags else ""
    return [a for a in (text or "").split() if a.startswith("sm_")] or list(torch.cuda.get_arch_list())


def _open_clip_weights() -> list[str]:
    """One line per (model, pretrained tag) the KB manifests name: cached or not."""
    import yaml

    wanted: dict[tuple[str, str], list[str]] = {}
    for path in sorted((MANIFESTS / "kb").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for spec in (data.get("encoders") or {}).values():
            if isinstance(spec, dict) and spec.get("name") == "open_clip" and spec.get("pretrained"):
                wanted.setdefault((spec.get("model", "ViT-B-16"), spec["pretrained"]), []).append(path.stem)
    out = []
    for (model, tag), kbs in sorted(wanted.items()):
        state = _weights_state(model, tag)
        out.append(f"{model} {tag} (KB {', '.join(sorted(set(kbs)))}): {state}")
    return out


def _weights_state(model: str, tag: str) -> str:
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        hub = (cfg.get("hf_hub") or "").rstrip("/")
        if hub:
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(hub, name), str):
                    return f"cached (hf-hub:{hub})"
            return f"not cached: the first embed downloads hf-hub:{hub} (needs internet)"
        url = cfg.get("url")
        if url:
            from torch.hub import get_dir

            cached = Path(get_dir()).parent / "open_clip" / Path(url).name
            return "cached" if cached.is_file() else f"not cached: the first embed downloads {url}"
        return "unknown tag"
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not crash on one probe
        return f"unknown ({type(exc).__name__}: {exc})"


def gather() -> Report:
    """What `retformer doctor` prints; the problem line when GPUs exist but torch cannot use them."""
    import torch

    r = Report()
    r.add("python", f"{platform.python_version()} ({sys.executable})")
    build = torch.version.cuda
    arches = _arch_list(torch) if build else []
    r.add(
        "torch",
        f"{torch.__version__}, "
        + (f"CUDA {build} build, arch {' '.join(arches) or '?'}" if build else "CPU-only build (no CUDA)"),
    )
    info = devices.driver_info()
    if info.available:
        r.add("driver", f"NVIDIA {info.driver} (supports CUDA up to {info.cuda})")
    else:
        r.add("driver", info.reason or "none")
    visible, usable = devices.visible_gpu_count(), devices.torch_gpu_count()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f", CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""
    r.add(
        "GPUs",
        f"{len(info.gpus)} seen by NVML ({visible} visible to this process{shown}), {usable} usable by torch",
    )
    for gpu in info.gpus:
        cap = f"sm_{gpu.capability[0]}{gpu.capability[1]}" if gpu.capability else "sm_?"
        mem = f"{gpu.memory_total / 2**30:.0f} GiB" if gpu.memory_total else "? GiB"
        notes = ["bf16 native" if gpu.capability and gpu.capability >= (8, 0) else "bf16 emulated: fp16 AMP"]
        if arches and gpu.capability and cap not in arches:
            notes.append(f"{cap} is not in torch's arch list")
        r.add("", f"GPU {gpu.index}: {gpu.name}, {cap}, {mem}, {'; '.join(notes)}")
    if usable:
        native = devices.native_bf16(0)
        cap = torch.cuda.get_device_capability(0)
        r.add(
            "bf16",
            f"{'native' if native else 'emulated'} on cuda:0 (sm_{cap[0]}{cap[1]}): AMP uses "
            + ("bf16" if native else "fp16 + GradScaler"),
        )
    else:
        r.add("bf16", "n/a: no GPU torch can use (CPU runs in fp32)")
    r.problem = devices.gpu_problem()

    faiss_gpus = 0
    try:
        import faiss

        get = getattr(faiss, "get_num_gpus", None)
        faiss_gpus = int(get()) if get else 0
        kind = "gpu" if _version("faiss-gpu-cu12") or _version("faiss-gpu") else "cpu"
        r.add("faiss", f"{faiss.__version__} ({kind} build), {faiss_gpus} GPU(s)")
    except ImportError:
        r.add("faiss", "not installed (make setup EXTRAS=cpu,dev or gpu,dev)")
    r.add(
        "dask",
        ", ".join(
            f"{d} {_version(d) or 'not installed'}"
            for d in ("dask", "distributed", "dask-cuda", "dask-jobqueue")
        ),
    )
    r.add("open_clip", _version("open_clip_torch") or "not installed")
    for line in _open_clip_weights():
        r.add("", line)

    r.add("stages", "device each stage will use, and why")
    r.add("  download", "cpu: HTTP and image decoding on CPU workers")
    if r.problem:
        gpu_stage = "stops: GPUs that torch cannot use (see the error line); `device: cpu` runs on the CPU"
    elif usable:
        workers = (
            "one Dask worker per GPU (dask-cuda)"
            if _version("dask-cuda")
            else "dask-cuda missing: CPU workers"
        )
        gpu_stage = f"cuda: {usable} GPU(s) usable by torch; {workers}; autocast " + (
            "bf16" if devices.native_bf16(0) else "fp16"
        )
    else:
        gpu_stage = "cpu: no GPU (fp32)"
    r.add("  embed", gpu_stage)
    r.add(
        "  index",
        f"faiss-gpu: k-means and adds on the GPU ({faiss_gpus} GPU(s); a shard that does not fit adds on "
        "the CPU); searches on the CPU"
        if faiss_gpus
        else "cpu: faiss without GPUs (k-means, adds and the recall check on CPU workers)",
    )
    r.add("  neighbors", "cpu: faiss search on CPU workers (memory-mapped index)")
    if r.problem:
        train = gpu_stage
    elif usable:
        dtype = "bf16" if devices.native_bf16(0) else "fp16 + GradScaler"
        train = f"cuda: device auto picks a GPU (under torchrun GPU LOCAL_RANK per process); AMP {dtype}"
    else:
        train = "cpu: no GPU (fp32)"
    r.add("  train", train)
    return r
