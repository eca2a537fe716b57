"""The README's own-data path on a second real dataset: Fashion-MNIST written as 28-px grayscale PNG
folders whose names carry spaces and punctuation (`train/<class>/`, `test/<class>/`, no val/: the
default 20% hold-out, taken before the cut), the CIFAR-LT cut by `imbalance_ratio`, and a world KB from
the training images the cut left out, captions from templates used nowhere else (20% name a wrong class).
Writes the images and the two manifests (dataset `minef`, KB `minef_world`):

    python bench/method/own_fmnist.py /tmp/ownf            # 10 classes, 600 / 200 per class, ratio 100
    RETFORMER_MANIFESTS=/tmp/ownf/manifests retformer demo --dataset minef --kb minef_world \\
        --workdir /tmp/ownf/work --seeds 3

`--views` makes 100 classes, each garment in 10 views (8 rotations / mirror images, 2 inverted), 125 /
20 per class, ratio 20, 64-px encoder input: many classes, 1 val image for a tail class, and classes
a frozen encoder confuses (a mirrored T-shirt is a T-shirt): a check that the path scales in classes.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from retformer.kb_builder.datasets.fashion_mnist import load_arrays

# Folder names a user might have: spaces, a hyphen; captions and reports use them as they are
GARMENTS = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker"]
GARMENTS += ["bag", "ankle boot"]
VIEWS = ["upright", "turned left", "upside down", "turned right", "mirrored", "mirrored left"]
VIEWS += ["mirrored upside down", "mirrored right", "negative", "negative upside down"]
DATASET = "kind: imagefolder\nroot: {root}/data\nimbalance_ratio: {ratio}\nseed: 0\nneighbors: {{k: 32}}\n"
KB = """source: {{kind: world, dataset: minef, wrong_caption_fraction: 0.2,
         templates: ["a catalogue photo of a {{name}}.", "{{name}}, product picture on white."]}}
encoders: {{image: {{name: efficientnet_lite0{size}}}, text: {{name: minilm}}}}
"""


def view(pixels: np.ndarray, v: int) -> Image.Image:
    """View v of a garment: v % 4 quarter turns, mirrored for 4-7; 8 and 9 inverted, upright / upside down
    (view 0 is the image as stored)."""
    image = Image.fromarray(pixels)
    if v >= 8:
        image, v = ImageOps.invert(image), (0 if v == 8 else 2)
    if v >= 4:
        image = ImageOps.mirror(image)
    return image.rotate(90 * (v % 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--views", action="store_true", help="100 classes: garment x view")
    args = parser.parse_args()
    views = VIEWS if args.views else [None]
    per_train, per_test, ratio = (125, 20, 20) if args.views else (600, 200, 100)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", per_train), ("test", per_test)):
        images, labels = load_arrays(split=split)
        for g, garment in enumerate(GARMENTS):
            rows = rng.permutation(np.nonzero(labels == g)[0])[: per_class * len(views)]
            for v, view_name in enumerate(views):
                out = args.root / "data" / split / (f"{garment} {view_name}" if view_name else garment)
                out.mkdir(parents=True, exist_ok=True)
                for i in rows[v * per_class : (v + 1) * per_class]:
                    view(images[i], v).save(out / f"{i:05d}.png")  # v = 0 without views: as stored
    manifests = {
        "datasets/minef.yaml": DATASET.format(root=args.root, ratio=ratio),
        "kb/minef_world.yaml": KB.format(size=", image_size: 64" if args.views else ""),
    }
    for kind, text in manifests.items():
        (args.root / "manifests" / kind).parent.mkdir(parents=True, exist_ok=True)
        (args.root / "manifests" / kind).write_text(text)
    images_written = sum(1 for _ in (args.root / "data").rglob("*.png"))
    print("written", images_written, "images and", args.root / "manifests")


if __name__ == "__main__":
    main()
