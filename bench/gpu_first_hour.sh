#!/usr/bin/env bash
# The first hour on a GPU machine (issue 21), as one prepared command: each step PASS / FAIL / SKIP on
# one line, stops at the first FAIL, every step's log in one folder. Under 8 minutes on one H100.
#
#   bash bench/gpu_first_hour.sh [--out DIR] [--keep-going] [--device cuda|cpu]
#
#   1 environment  `retformer doctor`: exit 0 and torch can use a GPU
#   2 kernels      matmul, conv, attention in fp32 / bf16 / fp16 on the GPU against fp32 on the CPU
#   3 faiss        torch and faiss-gpu in one process: GPU flat search ids == CPU flat search ids
#   4 embed        `retformer embed` of a tiny KB (digits world pool + digits_lt splits) with open_clip
#                  ViT-B-16 (random weights) on cuda; every part says it was computed on cuda
#   5 index        `retformer index` + `retformer neighbors` of that KB and dataset
#   6 recipe       one-process `retformer train` of the demo's stacked recipe with every trained method
#                  (mlp_only with its prior tau, the L-BFGS linear_probe, mlp_vote, RetFormer, kb_episodes)
#                  on the device, small grids: the code paths `make demo` takes, checked off the CPU
#   7 torchrun     2 GPUs: a 2-rank `torchrun ... train` (one GPU each); 1 GPU: the clean refusal
#                  (one error line naming the rank without a GPU, shown in torchrun's summary)
#   8 finetune     bench/bench_finetune.py: ViT-B-16 fine-tune steps under AMP (bf16 where native)
#   9 gpu_check    bash bench/gpu_check.sh --quick (a faiss without GPU support is a FAIL here)
#
# --keep-going: run every step (a step whose input failed is a SKIP) instead of stopping at the first
# FAIL. --device cpu: steps 4-6 on the CPU (a rehearsal of the pipeline steps on a machine without a
# GPU, with small encoders: EfficientNet-Lite0 at 32 px and MiniLM). Logs: DIR (default ${OUT:-/tmp}/gpu_first_hour):
# NN-step.log, summary.txt. Installs nothing and needs no internet: a Python (PY=..., else
# .venv/bin/python) with the project installed (`make setup EXTRAS=gpu,dev` for faiss-gpu).
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-/tmp}/gpu_first_hour"
KEEP_GOING=0
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT_DIR="$2"; shift ;;
    --keep-going) KEEP_GOING=1 ;;
    --device) [ $# -ge 2 ] || { echo "error: --device needs cuda or cpu" >&2; exit 2; }; DEVICE="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (bash bench/gpu_first_hour.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu (got '$DEVICE')" >&2; exit 2 ;; esac

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BIN=$(dirname "$PY")
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" || { echo "error: cannot create $OUT_DIR" >&2; exit 1; }
rm -rf "$OUT_DIR"/*.log "$OUT_DIR"/summary.txt "$OUT_DIR"/work "$OUT_DIR"/gpu_check
WORK="$OUT_DIR/work"
KB=first_hour_kb
KB_YAML="$OUT_DIR/$KB.yaml"
EXP_YAML="$OUT_DIR/first_hour_exp.yaml"
RECIPE_YAML="$OUT_DIR/first_hour_recipe.yaml"
RET=("$PY" -m retformer.pipelines.cli)

# The tiny KB: the digits world pool, open_clip ViT-B-16 with random weights (no download); the CPU
# rehearsal uses the test suite's small encoders instead (ViT-B-16 ran at ~2 images/s on a shared CPU).
if [ "$DEVICE" = cpu ]; then
  ENCODERS='{image: {name: efficientnet_lite0, image_size: 32}, text: {name: minilm}}'
  ENCODER_NAME="EfficientNet-Lite0 32 px + MiniLM"
else
  ENCODERS='{image: {name: open_clip, model: ViT-B-16, pretrained: null}, text: {name: open_clip, model: ViT-B-16, pretrained: null}}'
  ENCODER_NAME="ViT-B-16"
fi
cat >"$KB_YAML" <<EOF
description: gpu_first_hour - digits world pool, $ENCODER_NAME (random weights)
source: {kind: world, dataset: digits_lt, wrong_caption_fraction: 0.2, seed: 0,
         templates: ["a handwritten {name}."]}
shard_size: 500
encoders: $ENCODERS
embed: {batch_size: 256, device: $DEVICE}
index: {kind: auto, recall_target: 0.95, memory_budget_gb: 4, num_shards: 2, k: 32}
EOF
# A small experiment: RetFormer (paper recipe) for 2 epochs, selection on val.
cat >"$EXP_YAML" <<EOF
description: gpu_first_hour - 2 epochs of RetFormer
k: 8
eval_split: test
select_split: val
recipe: paper
methods: [retformer]
model: {width: 64, depth: 1, heads: 4}
train: {epochs: 2, batch_size: 64, lr: 3.0e-3, seed: 0}
select: {retformer_grid: [[3.0e-3, 0.0]], retformer_epochs: {default: 2}}
EOF
# The demo's recipe (manifests/experiments/demo.yaml) with one-cell grids: every trained method the demo
# selects on val, so a tensor left on the wrong device anywhere in selection stops this step.
cat >"$RECIPE_YAML" <<EOF
description: gpu_first_hour - the demo's stacked recipe, small grids
k: 8
eval_split: test
select_split: val
recipe: stacked
methods: [retformer, mlp_only, linear_probe, mlp_vote, knn_weighted, caption_vote]
model: {width: 64, depth: 1, heads: 4, ffn: false, tau: 2.0, dropout: 0.0, mlp_hidden: 128, anchor: auto}
train: {epochs: 2, batch_size: 64, lr: 3.0e-3, seed: 0}
method_train: {retformer: {mixup_alpha: 0.0}}
kb_episodes: 20000
select: {lr_grid: [3.0e-3], baseline_epochs: 3, probe_l2: [1.0e-3, 1.0e-4], retformer_grid: [[3.0e-3, 0.0]],
         retformer_epochs: {default: 2}, knn_k: [5], rule_fit: stack}
EOF

declare -A RESULT
FAILED=0
N=0
say() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }

# step NAME NEEDS DESCRIPTION: runs step_NAME with its output in NN-NAME.log; the function's last
# line of output starting with "reason: " is the one-line reason shown for a FAIL or a SKIP.
step() {
  local name=$1 needs=$2 desc=$3
  N=$((N + 1))
  local log
  log="$OUT_DIR/$(printf %02d "$N")-$name.log"
  if [ "$FAILED" = 1 ] && [ "$KEEP_GOING" = 0 ]; then return; fi
  for dep in $needs; do
    if [ "${RESULT[$dep]:-}" != PASS ]; then
      RESULT[$name]=SKIP
      say "$(printf 'SKIP  %-11s %s: needs step %s, which did not pass' "$name" "$desc" "$dep")"
      return
    fi
  done
  local t0=$SECONDS
  "step_$name" >"$log" 2>&1
  local rc=$?
  local reason
  reason=$(grep '^reason: ' "$log" | tail -1 | sed 's/^reason: //')
  if [ "$rc" = 0 ]; then
    RESULT[$name]=PASS
    say "$(printf 'PASS  %-11s %s (%d s)%s' "$name" "$desc" $((SECONDS - t0)) "${reason:+: $reason}")"
  else
    RESULT[$name]=FAIL
    FAILED=1
    [ -n "$reason" ] || reason="exit status $rc, last line: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)"
    say "$(printf 'FAIL  %-11s %s (%d s): %s (log: %s)' "$name" "$desc" $((SECONDS - t0)) "$reason" "$log")"
  fi
}

torch_gpus() { "$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0; }

step_environment() {
  "${RET[@]}" doctor
  local rc=$?
  if [ "$rc" != 0 ]; then echo "reason: retformer doctor exited $rc (its error line is above)"; return 1; fi
  if [ "$DEVICE" = cuda ] && [ "$(torch_gpus)" = 0 ]; then
    echo "reason: no GPU usable by torch (doctor: $(grep -E '^(driver|GPUs) ' "$OUT_DIR/01-environment.log" | tr -s ' ' | paste -sd ';'))"
    return 1
  fi
  echo "reason: $(grep -E '^GPUs ' "$OUT_DIR/01-environment.log" | tr -s ' ')"
}

step_kernels() {
  "$PY" - <<'PYEOF'
import sys
import torch
import torch.nn.functional as F
if not torch.cuda.is_available():
    print("reason: torch cannot use a GPU here (torch.cuda.is_available() is False)")
    sys.exit(1)
from retformer.artifacts.devices import native_bf16
g = torch.Generator().manual_seed(0)
a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
x, w = torch.randn(8, 16, 56, 56, generator=g), torch.randn(32, 16, 3, 3, generator=g)
q, k, v = (torch.randn(4, 8, 197, 64, generator=g) for _ in range(3))
ref = {"matmul": a @ b, "conv": F.conv2d(x, w, padding=1), "attention": F.scaled_dot_product_attention(q, k, v)}
tol = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}
bad = []
print(f"{torch.cuda.get_device_name(0)}, bf16 native: {native_bf16(0)}")
for dtype in tol:
    c = lambda t: t.to("cuda", dtype)  # noqa: E731
    out = {"matmul": c(a) @ c(b), "conv": F.conv2d(c(x), c(w), padding=1),
           "attention": F.scaled_dot_product_attention(c(q), c(k), c(v))}
    torch.cuda.synchronize()
    for name, r in ref.items():
        err = float((out[name].float().cpu() - r).norm() / r.norm())
        ok = err <= tol[dtype] and torch.isfinite(out[name]).all()
        print(f"{name:10s} {str(dtype):15s} rel. error vs CPU fp32 {err:.2e} (limit {tol[dtype]:.0e}) {'ok' if ok else 'BAD'}")
        if not ok:
            bad.append(f"{name} {dtype} {err:.1e}")
if bad:
    print("reason: " + ", ".join(bad) + " off the CPU result")
    sys.exit(1)
print("reason: matmul, conv, attention in fp32/bf16/fp16 agree with the CPU")
PYEOF
}

step_faiss() {
  "$PY" - <<'PYEOF'
import sys
import numpy as np
import torch
problems = []
if not torch.cuda.is_available():
    problems.append("torch cannot use a GPU here")
else:
    torch.zeros(1, device="cuda")  # torch's CUDA context first, as in a stage
import faiss
if not hasattr(faiss, "StandardGpuResources"):
    problems.append(f"faiss {faiss.__version__} in this Python has no GPU support (faiss-cpu): "
                    "make setup EXTRAS=gpu,dev installs faiss-gpu-cu12")
elif faiss.get_num_gpus() == 0:
    problems.append(f"faiss-gpu {faiss.__version__} sees no GPU")
if problems:
    print("reason: " + "; ".join(problems))
    sys.exit(1)
rng = np.random.default_rng(0)
xb = rng.standard_normal((50_000, 128)).astype("float32")
xq = rng.standard_normal((1_000, 128)).astype("float32")
faiss.normalize_L2(xb)
faiss.normalize_L2(xq)
cpu = faiss.IndexFlatIP(128)
cpu.add(xb)
d_cpu, i_cpu = cpu.search(xq, 10)
res = faiss.StandardGpuResources()
gpu = faiss.GpuIndexFlatIP(res, 128)
gpu.add(xb)
d_gpu, i_gpu = gpu.search(xq, 10)
y = (torch.ones(256, 256, device="cuda") @ torch.ones(256, 256, device="cuda")).sum().item()  # torch still works
differ = int((i_cpu != i_gpu).sum())
near_ties = int(((i_cpu != i_gpu) & (np.abs(d_cpu - d_gpu) < 1e-5)).sum())
print(f"{faiss.get_num_gpus()} GPU(s); ids differing {differ} of {i_cpu.size} (near ties {near_ties}); torch after faiss: {y}")
if differ != near_ties or y != 256 * 256 * 256:
    print(f"reason: GPU flat search ids differ from CPU ({differ - near_ties} not ties) or torch failed after faiss")
    sys.exit(1)
print(f"reason: GPU flat search ids == CPU ({i_cpu.size} ids, {near_ties} near-tie swaps), torch + faiss-gpu in one process")
PYEOF
}

step_embed() {
  "${RET[@]}" embed --kb "$KB_YAML" --dataset digits_lt --workdir "$WORK" || {
    echo "reason: $(grep '^error: ' "$OUT_DIR/04-embed.log" | tail -1 || true)"; return 1; }
  "$PY" - "$WORK/kb/$KB/embeddings" "$DEVICE" <<'PYEOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
parts = sorted(Path(sys.argv[1]).glob("part-*.parquet"))
devices = {json.loads(pq.read_schema(p).metadata[b"meta"]).get("shard_stats", {}).get("device") for p in parts}
rows = sum(pq.read_metadata(p).num_rows for p in parts)
print(f"{len(parts)} parts, {rows} rows, devices {devices}")
if not parts or devices != {sys.argv[2]}:
    print(f"reason: parts computed on {devices}, expected {sys.argv[2]}")
    sys.exit(1)
print(f"reason: {rows} KB rows in {len(parts)} parts, all on {sys.argv[2]}")
PYEOF
}

step_index() {
  "${RET[@]}" index --kb "$KB_YAML" --workdir "$WORK" || { echo "reason: retformer index failed"; return 1; }
  "${RET[@]}" neighbors --dataset digits_lt --kb "$KB_YAML" --workdir "$WORK" || {
    echo "reason: retformer neighbors failed"; return 1; }
  local gpu_shards
  gpu_shards=$(grep -l '"gpu": true' "$WORK/kb/$KB/index/"*.json 2>/dev/null | wc -l)
  echo "reason: index + neighbor tables written ($gpu_shards shard(s) added on the GPU)"
}

step_recipe() {
  "${RET[@]}" train --dataset digits_lt --kb "$KB_YAML" --experiment "$RECIPE_YAML" --workdir "$WORK" \
    --set "train.device=$DEVICE" || { echo "reason: $(grep '^error: ' "$OUT_DIR/06-recipe.log" | tail -1 || true)"; return 1; }
  "$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
found = sorted(Path(sys.argv[1]).glob("runs/*first_hour_recipe*/eval.json"))
if not found:
    print("reason: no eval.json of the recipe run")
    sys.exit(1)
rows = json.loads(found[-1].read_text())["methods"]
line = ", ".join(f"{m} {100 * r['top1']:.1f}" for m, r in rows.items() if isinstance(r, dict) and "top1" in r)
print(f"reason: test top-1 {line}")
PYEOF
}

step_torchrun() {
  local gpus
  gpus=$(torch_gpus)
  local trun=("$BIN/torchrun" --standalone --nproc_per_node 2 --local-ranks-filter 0 -m retformer.pipelines.cli train
    --dataset digits_lt --kb "$KB_YAML" --experiment "$EXP_YAML" --workdir "$WORK" --set "train.device=$DEVICE")
  if [ "$DEVICE" = cpu ] || [ "$gpus" -ge 2 ]; then
    "${trun[@]}" || { echo "reason: the 2-rank train failed (torchrun's summary above names the rank)"; return 1; }
    echo "reason: 2-rank train on $DEVICE finished"
    return 0
  fi
  "${trun[@]}"
  local rc=$?
  if [ "$rc" != 0 ] && grep -q "has no GPU of its own" "$OUT_DIR/07-torchrun.log"; then
    echo "reason: $gpus GPU(s): the clean refusal ($(grep -o 'training process 1[^"]*GPU(s)' "$OUT_DIR/07-torchrun.log" | head -1))"
    return 0
  fi
  echo "reason: $gpus GPU(s): expected the one-line refusal of rank 1 (exit $rc)"
  return 1
}

step_finetune() {
  local size=(--batch-size 32 --steps 3 --warmup 1 --images 32)
  [ "$DEVICE" = cpu ] && size=(--batch-size 2 --steps 1 --warmup 0 --images 4)  # ViT-B-16 on a CPU: tiny
  "$PY" bench/bench_finetune.py --device "$DEVICE" --model ViT-B-16 "${size[@]}" --amp on --num-workers 2 \
    --out "$OUT_DIR/finetune.json" || {
    echo "reason: $(grep -iE 'error' "$OUT_DIR/08-finetune.log" | tail -1 | cut -c1-200)"; return 1; }
  echo "reason: $("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(f"AMP {d[\"bare\"][\"dtype\"]}, {d[\"images_per_s\"]} img/s trainer loop")' "$OUT_DIR/finetune.json")"
}

step_gpu_check() {
  bash bench/gpu_check.sh --quick --out "$OUT_DIR/gpu_check"
  local rc=$?
  if [ -f "$OUT_DIR/gpu_check/index.status" ] && [ "$(cat "$OUT_DIR/gpu_check/index.status")" = skipped ]; then
    echo "reason: faiss-gpu missing: $(cat "$OUT_DIR/gpu_check/index.log")"
    return 1
  fi
  [ "$rc" = 0 ] || { echo "reason: $(grep -E '^error|failed' "$OUT_DIR/09-gpu_check.log" | tail -1)"; return 1; }
  echo "reason: table in $OUT_DIR/09-gpu_check.log"
}

say "gpu_first_hour: $(date -u +%FT%TZ), device $DEVICE, logs in $OUT_DIR"
step environment "" "retformer doctor$([ "$DEVICE" = cuda ] && echo ', torch uses a GPU')"
step kernels "environment" "fp32/bf16/fp16 kernels vs CPU"
step faiss "environment" "torch + faiss-gpu in one process"
if [ "$DEVICE" = cpu ]; then ENV_DEP=""; else ENV_DEP="environment"; fi
step embed "$ENV_DEP" "retformer embed, $ENCODER_NAME on $DEVICE"
step index "embed" "retformer index + neighbors"
step recipe "index" "the demo's stacked recipe, one process on $DEVICE"
step torchrun "index" "2-rank torchrun train (or the refusal)"
step finetune "$ENV_DEP" "fine-tune AMP steps"
step gpu_check "$ENV_DEP" "bench/gpu_check.sh --quick"
if [ "$FAILED" = 1 ] && [ "$KEEP_GOING" = 0 ]; then
  say "stopped at the first FAIL (--keep-going runs the other steps)"
fi
[ "$FAILED" = 0 ]
