"""The README's own-data path on data the project never trained on: scikit-learn's digits written as
32-px JPEG folders (`train/<class>/`, `test/<class>/` with 50 per class, no val/: the default 20%
hold-out), `imbalance_ratio: 10`, and a world KB from the training images the cut left out, captions
from templates used nowhere else (20% name a wrong class). Writes the images and the two manifests:

    python bench/method/own_digits.py /tmp/own [IMBALANCE_RATIO]     # default 10
    RETFORMER_MANIFESTS=/tmp/own/manifests retformer demo --dataset mine --kb mine_world \\
        --workdir /tmp/own/work --seeds 3
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DATASET = """kind: imagefolder
root: {root}/data
imbalance_ratio: {ratio}
seed: 0
neighbors: {{k: 32}}
"""
KB = """source: {kind: world, dataset: mine, wrong_caption_fraction: 0.2,
         templates: ["a scanned handwritten {name}.", "the digit {name}, written by hand."]}
encoders: {image: {name: efficientnet_lite0}, text: {name: minilm}}
"""

root = Path(sys.argv[1])
ratio = int(sys.argv[2]) if len(sys.argv) > 2 else 10
digits = load_digits()
rng = np.random.default_rng(0)
for c, name in enumerate(NAMES):
    idx = rng.permutation(np.nonzero(digits.target == c)[0])
    for split, part in (("test", idx[:50]), ("train", idx[50:])):
        out = root / "data" / split / name
        out.mkdir(parents=True, exist_ok=True)
        for i in part:
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert("RGB")
            image.save(out / f"{i:04d}.jpg", quality=95)
manifests = {"datasets/mine.yaml": DATASET.format(root=root, ratio=ratio), "kb/mine_world.yaml": KB}
for kind, text in manifests.items():
    (root / "manifests" / kind).parent.mkdir(parents=True, exist_ok=True)
    (root / "manifests" / kind).write_text(text)
print("written", sum(1 for _ in (root / "data").rglob("*.jpg")), "images and", root / "manifests")
