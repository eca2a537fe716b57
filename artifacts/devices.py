"""Which device a stage or the trainer runs on, and why: the GPUs the NVIDIA driver shows (NVML, read
through ctypes: no extra package) against the GPUs torch can use.

The two differ on a real machine more often than not on a first run: a torch built for CUDA 13 beside an
R535-R570 driver, a CPU-only torch, a GPU older than the torch build's arch list. torch then reports no
GPU and every `cuda if available else cpu` falls back to the CPU without a word. Here a GPU that exists
but cannot be used is one UserError naming torch's CUDA version and the driver's, unless the manifest
asks for the CPU (`device: cpu`).

Also: native bf16 (compute capability >= 8.0; `torch.cuda.is_bf16_supported()` is True under emulation
on T4/V100, where bf16 is slow and the fp16 + GradScaler branch is the right one) and free GPU memory.
Imports torch lazily: the doctor and the cluster code read NVML without it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily (see above)
    import torch


@dataclass(frozen=True)
class NvmlGpu:
    index: int
    name: str
    capability: tuple[int, int] | None
    memory_total: int | None  # bytes


@dataclass(frozen=True)
class DriverInfo:
    """What NVML says: the driver's version, the newest CUDA it supports, its GPUs (all of them:
    NVML ignores CUDA_VISIBLE_DEVICES)."""

    available: bool
    driver: str | None = None
    cuda: str | None = None  # e.g. "12.2"
    gpus: list[NvmlGpu] = field(default_factory=list)
    reason: str | None = None  # why NVML is not available


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.lru_cache(maxsize=1)
def _nvml_lib() -> Any:
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _nvml_query() -> DriverInfo:
    lib = _nvml_lib()
    if lib is None:
        return DriverInfo(False, reason="no NVIDIA driver (libnvidia-ml not found)")
    if lib.nvmlInit_v2() != 0:
        return DriverInfo(False, reason="the NVIDIA driver's NVML did not initialise")
    try:
        buf = ctypes.create_string_buffer(96)
        driver = buf.value.decode() if lib.nvmlSystemGetDriverVersion(buf, 96) == 0 else None
        version = ctypes.c_int()
        cuda = None
        if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) == 0:
            cuda = f"{version.value // 1000}.{version.value % 1000 // 10}"
        count = ctypes.c_uint()
        gpus = []
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0:
            for i in range(count.value):
                handle = ctypes.c_void_p()
                if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                    continue
                name = ctypes.create_string_buffer(96)
                lib.nvmlDeviceGetName(handle, name, 96)
                major, minor = ctypes.c_int(), ctypes.c_int()
                cap = None
                got = lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor))
                if got == 0:
                    cap = (major.value, minor.value)
                mem = _Memory()
                total = mem.total if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) == 0 else None
                gpus.append(NvmlGpu(i, name.value.decode(errors="replace"), cap, total))
        return DriverInfo(True, driver, cuda, gpus)
    finally:
        lib.nvmlShutdown()


@functools.lru_cache(maxsize=1)
def driver_info() -> DriverInfo:
    """NVML's picture of this machine (cached: it does not change within a process)."""
    try:
        return _nvml_query()
    except Exception as exc:  # noqa: BLE001 - a broken driver install reads as "no driver"
        return DriverInfo(False, reason=f"NVML failed: {exc}")


def _nvml_count() -> int:
    """GPUs the driver has (tests monkeypatch this to simulate a GPU machine)."""
    return len(driver_info().gpus)


def visible_gpu_count() -> int:
    """GPUs the driver has that this process may use: NVML's count cut by CUDA_VISIBLE_DEVICES the way
    CUDA reads it (the list ends at its first invalid entry; "" or "-1" hides every GPU)."""
    n = _nvml_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or n == 0:
        return n
    seen = 0
    for entry in listed.split(","):
        entry = entry.strip()
        if entry.startswith(("GPU-", "MIG-")):
            seen += 1
        elif entry.isdigit() and int(entry) < n:
            seen += 1
        else:
            break
    return seen


def torch_gpu_count() -> int:
    """GPUs torch can use (0 for a CPU-only build, a driver too old for the build, or no GPU)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a CUDA init error means torch cannot use the GPUs
        return 0


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for (None: a CPU-only build)."""
    import torch

    return torch.version.cuda


def gpu_problem() -> str | None:
    """One line when this process sees GPUs (NVML, CUDA_VISIBLE_DEVICES) that torch cannot use; None
    when there is no GPU or torch uses them."""
    visible = visible_gpu_count()
    if visible == 0 or torch_gpu_count() > 0:
        return None
    import torch

    info = driver_info()
    driver = f"driver {info.driver or '?'} (supports CUDA up to {info.cuda or '?'})"
    build = torch_cuda_build()
    if build is None:
        why = f"torch {torch.__version__} is a CPU-only build (CUDA none)"
        fix = "install a CUDA build of torch"
    else:
        why = f"torch {torch.__version__} is built for CUDA {build}"
        fix = (
            f"the driver is too old for CUDA {build}: update the driver, or install the torch "
            "built for the driver's CUDA"
            if info.cuda and _version(info.cuda) < _version(build)
            else "check the GPU's compute capability against torch's arch list (retformer doctor)"
        )
    return f"{visible} GPU(s) found by the NVIDIA {driver} but {why} and cannot use them: {fix} (README GPU)"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def pick(device: str | None, what: str) -> str:
    """The device `what` (a stage, training) runs on: 'auto'/None -> "cuda" when torch can use a GPU,
    "cpu" when there is none; "cpu"/"mps" as asked; "cuda"/"cuda:N" only when torch can use it.
    A GPU that exists but that torch cannot use is a UserError whatever was asked but "cpu", never a
    silent CPU run."""
    if device in (None, "", "auto"):
        if torch_gpu_count() > 0:
            return "cuda"
        problem = gpu_problem()
        if problem:
            raise UserError(f"{what}: {problem}; or set its device to cpu")
        return "cpu"
    if device.startswith("cuda"):
        have = torch_gpu_count()
        if have == 0:
            problem = gpu_problem() or "no CUDA GPU is visible to torch"
            raise UserError(f"{what} asks for {device}: {problem}")
        index = device.partition(":")[2]
        if index and int(index) >= have:
            raise UserError(f"{what} asks for {device}: torch sees {have} GPU(s) (cuda:0..cuda:{have - 1})")
    return device


def resolve_device(device: str | None, what: str) -> torch.device:
    """The torch device `what` (a stage, training, prediction) runs on: `pick`'s choice as a
    torch.device; the one resolver every stage and the trainer go through (under torchrun the trainer
    then maps a bare "cuda" to its process's GPU: trainer.distributed.device_for)."""
    import torch

    return torch.device(pick(device, what))


def native_bf16(device: Any = None) -> bool:
    """True on GPUs that compute bf16 natively (compute capability >= 8.0: A100, H100, L4, RTX 30xx+).
    `torch.cuda.is_bf16_supported()` also says True where bf16 is emulated (T4, V100): slow there."""
    import torch

    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(device: Any = None) -> Any:
    """The autocast dtype on a CUDA device: bf16 where native, else fp16 (train with a GradScaler)."""
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float16


def free_gpu_memory(device: int = 0) -> int | None:
    """Free bytes on torch's GPU `device` (faiss-gpu numbers GPUs as CUDA does); None when unknown."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:  # noqa: BLE001
        return None
