"""Issue 21, on the CPU: a GPU that exists but that torch cannot use is one error (never a silent CPU
run), `retformer doctor`, native bf16, GPU SLURM jobs (one thread and one GPU per worker, the job's
cores still booked), only embed on a GPU cluster, the index shard's GPU memory check, device indices
under torchrun, and every torchrun rank's error in torchrun's own summary.

GPUs are simulated: artifacts/devices.py reads the driver's GPU count through `_nvml_count` and
`driver_info`, which the tests replace (a CPU torch then sees none, as with a too-old driver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from retformer.artifacts import devices
from retformer.artifacts.errors import UserError
from retformer.kb_builder.kb_schema import validate_kb
from retformer.pipelines.clusters import cpu_spec, load_cluster, slurm_kwargs, spec_from_dict
from retformer.pipelines.gpu_worker import worker_gpu
from tests.conftest import REPO


@pytest.fixture
def two_gpus_torch_cannot_use(monkeypatch):
    """The driver (R535, CUDA 12.2) shows two GPUs; this torch (a CUDA 13 or CPU build) uses none."""
    info = devices.DriverInfo(
        True,
        "535.183.01",
        "12.2",
        [devices.NvmlGpu(i, "NVIDIA A100-SXM4-40GB", (8, 0), 40 * 2**30) for i in range(2)],
    )
    monkeypatch.setattr(devices, "driver_info", lambda: info)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "torch_gpu_count", lambda: 0)
    return info


def test_cpu_machine_picks_cpu():
    """No driver here (or CUDA_VISIBLE_DEVICES=""): auto is cpu, cpu stays cpu, cuda is one error."""
    assert devices.pick(None, "embed") == "cpu"
    assert devices.pick("auto", "training") == "cpu"
    assert devices.pick("cpu", "training") == "cpu"
    with pytest.raises(UserError, match="asks for cuda: no CUDA GPU is visible to torch"):
        devices.pick("cuda", "embed")


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(devices, "_nvml_count", lambda: 4)
    for value, count in [
        (None, 4),
        ("", 0),
        ("-1", 0),
        ("2", 1),
        ("0,3", 2),
        ("1,9,2", 1),
        ("GPU-ab,MIG-cd", 2),
    ]:
        if value is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert devices.visible_gpu_count() == count, value


def test_gpu_torch_cannot_use_is_one_error(two_gpus_torch_cannot_use):
    """auto and cuda stop with one line naming torch's CUDA and the driver's; cpu still runs."""
    problem = devices.gpu_problem()
    build = torch.version.cuda
    assert "2 GPU(s)" in problem and "driver 535.183.01" in problem and "CUDA up to 12.2" in problem
    assert (f"built for CUDA {build}" if build else "CPU-only build") in problem
    for asked in (None, "auto", "cuda", "cuda:1"):
        with pytest.raises(UserError) as err:
            devices.pick(asked, "embed")
        assert "\n" not in str(err.value) and "driver 535.183.01" in str(err.value)
    assert devices.pick("cpu", "embed") == "cpu"


def test_embed_worker_and_trainer_refuse_unusable_gpu(two_gpus_torch_cannot_use):
    """The embed task's device choice and the trainer's `device: auto` go through the same check."""
    from retformer.artifacts.devices import resolve_device

    with pytest.raises(UserError, match="cannot use them"):
        resolve_device(None, "embed")
    with pytest.raises(UserError, match="training: .*cannot use them"):
        resolve_device("auto", "training")
    assert resolve_device("cpu", "training").type == "cpu"


def test_amp_dtype_is_bf16_only_where_native(monkeypatch):
    """sm_75 (T4) and sm_70 (V100) get fp16 (+ GradScaler in training): is_bf16_supported() says
    True there because bf16 is emulated; sm_80+ gets bf16."""
    from retformer.trainer.train import amp_policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for cap, dtype in [
        ((7, 0), torch.float16),
        ((7, 5), torch.float16),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        assert devices.native_bf16(0) == (cap >= (8, 0))
        assert amp_policy(True, torch.device("cuda", 0)) == (True, dtype)
    assert amp_policy(True, torch.device("cpu")) == (False, torch.float32)


def test_device_index_refused_under_torchrun(monkeypatch):
    from retformer.trainer import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(UserError, match="cuda:0 under torchrun: every process would use that one GPU"):
        distributed.device_for(torch.device("cuda", 0))
    assert distributed.device_for(torch.device("cpu")).type == "cpu"


def test_doctor_cpu_machine_exits_0(monkeypatch, capsys):
    """The CLI's entry point on this machine (no driver; tests hide GPUs): the CPU picture, exit 0."""
    from retformer.pipelines import cli

    monkeypatch.setattr(sys, "argv", ["retformer", "doctor"])
    cli.main()  # returns: exit status 0
    captured = capsys.readouterr()
    out = captured.out
    for key in (
        "python",
        "torch",
        "driver",
        "GPUs",
        "bf16",
        "faiss",
        "dask-jobqueue",
        "open_clip",
        "neighbors",
    ):
        assert key in out, (key, out)
    assert "0 usable by torch" in out and "embed      cpu" in out
    assert "ViT-B-16 datacomp_xl_s13b_b90k" in out
    assert "error" not in captured.err


def test_doctor_gpu_torch_cannot_use_exits_1_with_one_line(two_gpus_torch_cannot_use, monkeypatch, capsys):
    """A visible GPU (simulated NVML count) with a torch that cannot use it: the screen, then exit 1 and
    one `error:` line naming both CUDA versions."""
    from retformer.pipelines import cli

    monkeypatch.setattr(sys, "argv", ["retformer", "doctor"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 GPU(s) found by the NVIDIA driver 535.183.01"), err
    assert "2 seen by NVML" in captured.out and "GPU 1: NVIDIA A100-SXM4-40GB, sm_80" in captured.out
    assert "embed      stops" in captured.out


# ------------------------------------------------------------------------------ GPU SLURM jobs
def _gpu_spec(**over):
    data = {"name": "g", "kind": "slurm", "queue": "gpu", "cores": 16, "processes": 2, "gpus_per_job": 2}
    return spec_from_dict({**data, **over})


def test_gpu_job_script_one_thread_per_worker_own_gpu_cores_booked():
    """The job SLURMCluster submits for 2 GPUs x 16 cores: 2 workers of 1 thread each (one embed task
    per GPU at a time), the GPU preload, the job booking all 16 cores; the shipped slurm_gpu the same
    with 1 GPU and 8 cores. (The CPU manifest keeps cores/processes threads.)"""
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    for spec, gpus, cores in ((_gpu_spec(), 2, 16), (load_cluster("slurm_gpu"), 1, 8)):
        with SLURMCluster(**slurm_kwargs(spec)) as cluster:
            script = cluster.job_script()
        assert f"#SBATCH --cpus-per-task={cores}" in script, script
        assert f"#SBATCH --gres=gpu:{gpus}" in script
        assert "--nthreads 1 " in script and "--preload retformer.pipelines.gpu_worker" in script
        assert (f"--nworkers {gpus}" in script) == (gpus > 1)
        assert f"export RETFORMER_WORKER_GPUS={gpus}" in script
        assert f"export OMP_NUM_THREADS={cores // gpus}" in script
    with SLURMCluster(**slurm_kwargs(load_cluster("slurm"))) as cluster:
        script = cluster.job_script()
    assert "--nthreads 4" in script and "preload" not in script and "#SBATCH --cpus-per-task=8" in script


def test_gpu_workers_get_distinct_gpus():
    """Worker i of a job takes the i-th of the GPUs SLURM gave the job (or GPU i without a list)."""
    assert [worker_gpu(f"SLURMCluster-7-{i}", 2, "4,7") for i in range(2)] == ["4", "7"]
    assert [worker_gpu(f"SLURMCluster-7-{i}", 4, None) for i in range(4)] == ["0", "1", "2", "3"]
    assert worker_gpu("SLURMCluster-3", 1, "5") == "5"  # one GPU: the job name's -3 is not an index
    with pytest.raises(RuntimeError, match="shows 1 GPU"):
        worker_gpu("SLURMCluster-0-1", 2, "3")


def test_gpu_manifest_checks_and_cpu_stages():
    """processes must equal gpus_per_job; the CPU stages run on cpu_cluster, or without GPUs and with
    one worker of all the job's cores."""
    with pytest.raises(UserError, match=r"processes \(1\) must equal gpus_per_job \(2\)"):
        _gpu_spec(processes=1)
    shipped = load_cluster("slurm_gpu")
    assert cpu_spec(shipped) == load_cluster("slurm")
    derived = cpu_spec(_gpu_spec())
    assert (derived.gpus_per_job, derived.processes, derived.cores) == (0, 1, 16)
    kwargs = slurm_kwargs(derived)
    assert kwargs["cores"] == 16 and not kwargs["worker_extra_args"]
    assert not any("gres" in d for d in kwargs["job_extra_directives"])


def test_only_embed_asks_for_a_gpu_cluster(monkeypatch):
    """The stages pass gpu=True to dask_client only for embedding (a local machine with GPUs gets a
    LocalCUDACluster there; download, index and neighbors get CPU workers)."""
    from contextlib import contextmanager

    from retformer.pipelines import stages_embed as stages

    asked = []

    @contextmanager
    def fake_client(*args, **kwargs):
        asked.append(kwargs.get("gpu", False))
        yield None

    monkeypatch.setattr(stages, "dask_client", fake_client)
    monkeypatch.setattr(stages, "stage_embed_kb", lambda *a, **k: {})
    monkeypatch.setattr(stages, "kb_shard_paths", lambda *a: ["x"])
    monkeypatch.setattr(stages, "run_download", None, raising=False)
    kb = validate_kb(
        {
            "name": "kb",
            "source": {"kind": "webdataset", "path": "-"},
            "encoders": {"image": {"name": "efficientnet_lite0"}},
        },
        "kb",
    )
    stages.stage_embed(None, kb, None, None)
    assert asked == [True]
    import inspect

    source = inspect.getsource(stages)
    # every other dask_client call (download, index, neighbors) leaves gpu at False
    assert source.count("gpu=True") + source.count('"gpu": True') == 2


def test_index_shard_adds_on_cpu_when_the_gpu_lacks_memory(monkeypatch, caplog):
    """faiss-gpu present but the shard does not fit in the GPU's free memory: the add stays on the CPU
    with a warning (no raw CUDA out-of-memory)."""
    import faiss
    import numpy as np

    from retformer.kb_builder.index import build
    from retformer.kb_builder.index.select import IndexPlan

    plan = IndexPlan(kind="ivf_flat", factory="IVF16,Flat", n=10_000_000, d=32, metric="inner_product")
    index = build.new_index(plan)
    index.train(np.random.default_rng(0).standard_normal((512, 32)).astype("float32"))
    monkeypatch.setattr(build, "num_gpus", lambda: 1)
    monkeypatch.setattr(build, "gpu_free_bytes", lambda: 2**30)  # 1 GiB free < scratch + 10M vectors
    called = []
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: called.append(1))
    with caplog.at_level("WARNING"):
        out, on_gpu = build._to_gpu_for_add(index, plan, 10_000_000)
    assert out is index and not on_gpu and not called
    assert "adding on CPU: the shard needs" in caplog.text
    need = build.gpu_bytes_for_add(index, plan, 1000)
    monkeypatch.setattr(build, "gpu_free_bytes", lambda: need + 1)
    build._to_gpu_for_add(index, plan, 1000)
    assert called  # fits: cloned to the GPU


def test_torchrun_rank_error_goes_to_torchrun_error_file(tmp_path):
    """Under torchrun (TORCHELASTIC_ERROR_FILE set for each rank) a rank's one-line error is also
    written to its error file, which torchrun prints in its failure summary whatever
    --local-ranks-filter hides."""
    err_file = tmp_path / "error.json"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(err_file), "RANK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "retformer.pipelines.cli", "evaluate", "--workdir", str(tmp_path / "w")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    data = json.loads(err_file.read_text())
    assert data["message"]["message"] == f"rank 1: {line}"


def test_embed_loader_processes_share_the_cores_between_gpus(monkeypatch):
    """A GPU worker's loader processes: its SLURM job's share (RETFORMER_WORKER_CORES) or the host's
    cores over all the driver's GPUs (a dask-cuda worker sees one GPU but shares the host with the others)."""
    from retformer.kb_builder.embed import options

    monkeypatch.setattr(options.os, "sched_getaffinity", lambda _: set(range(32)), raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(devices, "driver_info", lambda: devices.DriverInfo(True, "x", "13.0", [None] * 8))
    monkeypatch.delenv("RETFORMER_WORKER_CORES", raising=False)
    assert options.default_num_workers("cuda") == 3  # 32 cores / 8 GPUs - 1
    monkeypatch.setenv("RETFORMER_WORKER_CORES", "16")
    assert options.default_num_workers("cuda") == 8


@pytest.mark.gpu
def test_on_a_real_gpu_auto_picks_cuda_and_amp_follows_the_capability():
    """Where a GPU is usable (RETFORMER_TEST_GPU=1): no problem line, auto is cuda, AMP's dtype follows
    the compute capability, and the loaded encoder autocasts with it."""
    from retformer.trainer.train import amp_policy

    assert devices.gpu_problem() is None and devices.pick(None, "embed") == "cuda"
    native = torch.cuda.get_device_capability(0) >= (8, 0)
    assert amp_policy(True, torch.device("cuda", 0)) == (True, torch.bfloat16 if native else torch.float16)


@pytest.mark.system
def test_first_hour_rehearsal_on_cpu_passes_every_pipeline_step(tmp_path):
    """`bench/gpu_first_hour.sh --device cpu` runs its pipeline steps for real on the CPU: embed, index,
    the demo's stacked recipe with every trained method (the step that reaches mlp_only's prior tau and
    the L-BFGS probe on the device) and the 2-rank torchrun train each print PASS; the script's exit
    status still says a GPU step failed here."""
    run = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_first_hour.sh"),
            "--device",
            "cpu",
            "--keep-going",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PY": sys.executable},
    )
    lines = {
        line.split()[1]: line
        for line in run.stdout.splitlines()
        if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])
    }
    for name in ("embed", "index", "recipe", "torchrun"):
        assert lines.get(name, "").startswith("PASS"), run.stdout + run.stderr
    assert "mlp_only" in lines["recipe"] and "linear_probe" in lines["recipe"]
    assert run.returncode == (0 if torch.cuda.is_available() else 1)
