"""The README's own-data path on a second real dataset: Fashion-MNIST written as 28-px grayscale PNG
folders whose names carry spaces and punctuation (`train/<class>/`, `test/<class>/`, no val/: the
default 20% hold-out, itself long-tailed), `imbalance_ratio: 100` over 600 training images per class
(600 ... 6), and a world KB from the training images the cut left out, captions from templates used
nowhere else (20% name a wrong class). The demo's fmnist_lt selects on a balanced val of 100 per class;
this one selects on the long-tailed hold-out a user's folders give. Writes the images and manifests:

    python bench/method/own_fmnist.py /tmp/ownf [PER_CLASS_TRAIN] [PER_CLASS_TEST]   # 600, 200
    RETFORMER_MANIFESTS=/tmp/ownf/manifests retformer demo --dataset minef --kb minef_world \\
        --workdir /tmp/ownf/work --seeds 3
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from retformer.kb_builder.datasets.fashion_mnist import load_arrays

# Folder names a user might have: spaces, a hyphen; captions and reports use them as they are
FOLDERS = [
    "t-shirt or top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
DATASET = """kind: imagefolder
root: {root}/data
imbalance_ratio: 100
seed: 0
neighbors: {{k: 32}}
"""
KB = """source: {kind: world, dataset: minef, wrong_caption_fraction: 0.2,
         templates: ["a catalogue photo of a {name}.", "{name}, product picture on white."]}
encoders: {image: {name: efficientnet_lite0}, text: {name: minilm}}
"""

root = Path(sys.argv[1])
per_train = int(sys.argv[2]) if len(sys.argv) > 2 else 600
per_test = int(sys.argv[3]) if len(sys.argv) > 3 else 200
rng = np.random.default_rng(0)
for split, per_class in (("train", per_train), ("test", per_test)):
    images, labels = load_arrays(split=split)
    for c, name in enumerate(FOLDERS):
        out = root / "data" / split / name
        out.mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(np.nonzero(labels == c)[0])[:per_class]:
            Image.fromarray(images[i]).save(out / f"{i:05d}.png")
manifests = {"datasets/minef.yaml": DATASET.format(root=root), "kb/minef_world.yaml": KB}
for kind, text in manifests.items():
    (root / "manifests" / kind).parent.mkdir(parents=True, exist_ok=True)
    (root / "manifests" / kind).write_text(text)
print("written", sum(1 for _ in (root / "data").rglob("*.png")), "images and", root / "manifests")
