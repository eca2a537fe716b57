#!/usr/bin/env bash
# The GPU checks of issue 12 in one command, one table at the end:
#
#   bash bench/gpu_check.sh [--quick] [--only embed,index,finetune] [--out DIR]     (make bench-gpu)
#   bash bench/gpu_check.sh --table DIR     (print the table of an earlier run's DIR again; no GPU)
#
#   embed     bench/bench_embed.py: open_clip ViT-B-16 (random weights: the paper's encoder's shapes
#             and speed) under autocast, image tower alone and with its text tower; end-to-end
#             `embed_shard` images/s against the bare forward on the same batches (ratio).
#   index     bench/bench_index.py --gpu: faiss-gpu builds (k-means and adds on the GPU) of IVF,Flat
#             and IVF,SQ8 over 1M x 512 clustered vectors, tuned to recall@32 >= 0.95, then searched
#             on the GPU against exact search on the GPU (speed-up = the ratio).
#   finetune  bench/bench_finetune.py: the trainer's fine-tune loop (ViT-B-16 + RetFormer head, AMP)
#             against the bare AMP step on one device-resident batch (ratio), and AMP vs fp32.
#
# Each part writes <part>.json and <part>.log under DIR (default ${OUT:-/tmp}/gpu_check); a failed
# part is a table row naming its log, and the script then exits 1. Without a CUDA GPU it stops at
# once with one `error:` line. Installs nothing: it needs a Python (PY=..., else .venv/bin/python,
# else python3) with the project's dependencies, torch with CUDA, and faiss-gpu for the index part
# (without it that row says so). Default sizes take ~5 minutes on one recent GPU; --quick ~2.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
TABLE_ONLY=0
ONLY="embed,index,finetune"
OUT_DIR="${OUT:-/tmp}/gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --only) [ $# -ge 2 ] || { echo "error: --only needs a value (embed,index,finetune)" >&2; exit 2; }
            ONLY="$2"; shift ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }
           OUT_DIR="$2"; shift ;;
    --table) [ $# -ge 2 ] || { echo "error: --table needs the folder of an earlier run" >&2; exit 2; }
             OUT_DIR="$2"; TABLE_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (bash bench/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
for part in ${ONLY//,/ }; do
  case "$part" in
    embed|index|finetune) ;;
    *) echo "error: --only: unknown part '$part' (embed, index, finetune)" >&2; exit 2 ;;
  esac
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled

if [ "$TABLE_ONLY" = 1 ]; then
  [ -f "$OUT_DIR/gpu.txt" ] || { echo "error: $OUT_DIR holds no gpu_check run (no gpu.txt)" >&2; exit 2; }
  GPU=$(cat "$OUT_DIR/gpu.txt")
else
  GPU=$("$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(1)
print(torch.cuda.get_device_name(0))' 2>/dev/null) || {
    echo "error: no CUDA GPU visible to torch in $PY: bench/gpu_check.sh needs one (nothing was run)" >&2
    exit 1
  }
  mkdir -p "$OUT_DIR" || { echo "error: cannot create $OUT_DIR" >&2; exit 1; }
  rm -f "$OUT_DIR"/{embed,index,finetune}.{json,log,status}
  echo "$GPU" >"$OUT_DIR/gpu.txt"
  echo "GPU: $GPU; results in $OUT_DIR" >&2
fi

if [ "$QUICK" = 1 ]; then
  EMBED_SCALE=10; INDEX_N=200000; FT_STEPS=8
else
  EMBED_SCALE=50; INDEX_N=1000000; FT_STEPS=20
fi
CORES=$(nproc 2>/dev/null || echo 4)

run_part() {  # run_part NAME CMD...: log to NAME.log, exit status to NAME.status
  local name=$1; shift
  echo "$name: $*" >&2
  local t0=$SECONDS
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$rc" >"$OUT_DIR/$name.status"
  echo "$name: exit $rc after $((SECONDS - t0)) s" >&2
}

if [ "$TABLE_ONLY" = 1 ]; then ONLY=""; fi
if wants embed; then
  # Batches of 512 images, the stage's default loader processes for CUDA; ~10k images per config.
  run_part embed "$PY" bench/bench_embed.py --device cuda --configs clip_b16,clip_b16_text \
    --autocast on --batch-size 512 --threads 4 --rounds 2 --scale "$EMBED_SCALE" --no-steps \
    --out "$OUT_DIR/embed.json"
fi
if wants index; then
  if "$PY" -c 'import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)' 2>/dev/null; then
    run_part index "$PY" bench/bench_index.py --gpu --n "$INDEX_N" --d 512 --kinds ivf_flat ivf_sq8 \
      --queries 1000 --time-reps 3 --threads "$CORES" --max-build-s 300 --out "$OUT_DIR/index.json"
  else
    echo "faiss in $PY has no GPU support (faiss-cpu?): install faiss-gpu-cu12 in its place" \
      >"$OUT_DIR/index.log"
    echo skipped >"$OUT_DIR/index.status"
  fi
fi
if wants finetune; then
  run_part finetune "$PY" bench/bench_finetune.py --device cuda --model ViT-B-16 --batch-size 128 \
    --steps "$FT_STEPS" --amp on --num-workers "$(( CORES > 9 ? 8 : CORES - 1 ))" \
    --out "$OUT_DIR/finetune.json"
fi

"$PY" - "$OUT_DIR" "$GPU" <<'PYEOF'
"""One table of the parts' results (markdown, for BENCHMARKS.md)."""
import json
import sys
from pathlib import Path

out, gpu = Path(sys.argv[1]), sys.argv[2]
rows = []


def status(part):
    f = out / f"{part}.status"
    return f.read_text().strip() if f.is_file() else None


def failed(part, what):
    s = status(part)
    if s is None:
        return False
    if s == "skipped":
        rows.append((what, "-", "skipped: " + (out / f"{part}.log").read_text().strip(), "-", "-"))
        return True
    if s != "0" or not (out / f"{part}.json").is_file():
        rows.append((what, "-", f"failed (exit {s}): see {out / (part + '.log')}", "-", "-"))
        return True
    return False


if not failed("embed", "embed, open_clip ViT-B-16"):
    if status("embed") is not None:
        doc = json.loads((out / "embed.json").read_text())
        cast = {True: "autocast", False: "no autocast"}.get(doc["settings"].get("autocast"), "default autocast")
        for name, c in doc["configs"].items():
            enc = c["image_encoder"]
            model = enc.get("model") or f"{enc['name']} {enc.get('image_size', '')}px"
            text = " + text tower" if c["text_encoder"] else ""
            rows.append((
                f"embed, {model}{text}, {cast}",
                f"{c['images']:,} images, batch {c['batch_size']}, {c['num_workers']} loader procs",
                f"{c['images_per_s']:,} img/s end-to-end",
                f"{c['bare_images_per_s']:,} img/s bare forward",
                f"{c['ratio']}",
            ))
if not failed("index", "index, faiss-gpu"):
    if status("index") is not None:
        doc = json.loads((out / "index.json").read_text())
        for res in doc["results"]:
            for c in res["candidates"]:
                size = f"{res['n']:,} x {res['d']}"
                if c.get("status") != "ok":
                    rows.append((f"index build {c['factory']}", size, c.get("skip_reason", "?"), "-", "-"))
                    continue
                where = "GPU" if c.get("built_on_gpu") else "CPU"
                rows.append((
                    f"index build {c['factory']}",
                    f"{size}, k-means + add on the {where}",
                    f"{c['build_s']} s (train {c['train_s']} s, add {c['add_s']} s)",
                    "-",
                    "-",
                ))
                g = c.get("gpu", {})
                k = res["k"]
                if g.get("status") == "ok":
                    rows.append((
                        f"index search {c['factory']}, GPU",
                        f"{res['num_queries']} queries, {g['params']}, recall@{k} {g[f'recall_at_{k}']}",
                        f"{g['qps']:,} q/s",
                        f"{g['exact_qps']:,} q/s exact (GPU)",
                        f"{g['speedup']}x",
                    ))
                else:
                    rows.append((f"index search {c['factory']}, GPU", "-", g.get("reason", "not run"), "-", "-"))
if not failed("finetune", "fine-tune step, ViT-B-16, AMP"):
    if status("finetune") is not None:
        d = json.loads((out / "finetune.json").read_text())
        s = d["settings"]
        rows.append((
            f"fine-tune step, {s['model']} + RetFormer head, "
            + (f"AMP {d['bare']['dtype']}" if d["bare"]["amp"] else "fp32"),
            f"batch {s['batch_size']}, {d['trainer']['num_workers']} loader workers",
            f"{d['images_per_s']:,} img/s trainer loop",
            f"{d['bare_images_per_s']:,} img/s bare step",
            f"{d['ratio']} (bare AMP / fp32: {d['amp_speedup']}x)",
        ))

print(f"\nGPU check on {gpu}\n")
print("| check | setting | measured | bare kernel | ratio |")
print("|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
PYEOF

bad=0
for part in embed index finetune; do
  f="$OUT_DIR/$part.status"
  if [ -f "$f" ] && [ "$(cat "$f")" != 0 ] && [ "$(cat "$f")" != skipped ]; then bad=1; fi
done
exit $bad
