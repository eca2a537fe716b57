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

`--long-tailed-folders` writes a dataset that is long-tailed on disk, as a real one is: `train/<class>/`
already holds the CIFAR-LT profile (600 ... 6, ratio 100, classes in a seeded order unrelated to folder
order), no `imbalance_ratio` key, and `world/<class>/` the rest of each class's 600 for the world KB. The
default hold-out then takes 20% of each *long-tailed* class (rounded down, one image kept): val is
long-tailed too (120 ... 1 images), the case every other own-data run here (val taken before the cut,
balanced) left unmeasured. With `--views` as well: 100 classes, 125 ... 6 (ratio 20), val 25 ... 1.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from retformer.kb_builder.datasets.fashion_mnist import load_arrays
from retformer.kb_builder.datasets.longtail import longtail_counts

# Folder names a user might have: spaces, a hyphen; captions and reports use them as they are
GARMENTS = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker"]
GARMENTS += ["bag", "ankle boot"]
VIEWS = ["upright", "turned left", "upside down", "turned right", "mirrored", "mirrored left"]
VIEWS += ["mirrored upside down", "mirrored right", "negative", "negative upside down"]
DATASET = "kind: imagefolder\nroot: {root}/data\n{cut}seed: 0\nneighbors: {{k: 32}}\n"
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
    parser.add_argument(
        "--long-tailed-folders", action="store_true", help="train/ long-tailed on disk, world/ the rest"
    )
    args = parser.parse_args()
    views = VIEWS if args.views else [None]
    per_train, per_test, ratio = (125, 20, 20) if args.views else (600, 200, 100)
    rng = np.random.default_rng(0)
    # On-disk long tail: class c (garment g, view v) keeps counts[rank[c]] training images, the rest go
    # to world/
    num_classes = len(GARMENTS) * len(views)
    rank = np.random.default_rng(1).permutation(num_classes)
    counts = longtail_counts(num_classes, per_train, ratio)
    for split, per_class in (("train", per_train), ("test", per_test)):
        images, labels = load_arrays(split=split)
        for g, garment in enumerate(GARMENTS):
            rows = rng.permutation(np.nonzero(labels == g)[0])[: per_class * len(views)]
            for v, view_name in enumerate(views):
                name = f"{garment} {view_name}" if view_name else garment
                class_rows = rows[v * per_class : (v + 1) * per_class]
                on_disk_tail = args.long_tailed_folders and split == "train"
                keep = counts[rank[g * len(views) + v]] if on_disk_tail else len(class_rows)
                for to, part in ((split, class_rows[:keep]), ("world", class_rows[keep:])):
                    if not len(part):
                        continue  # no empty folders: the head class has no world/ images
                    out = args.root / "data" / to / name
                    out.mkdir(parents=True, exist_ok=True)
                    for row in part:  # v = 0 without views: the image as stored
                        view(images[row], v).save(out / f"{row:05d}.png")
    cut = "" if args.long_tailed_folders else f"imbalance_ratio: {ratio}\n"
    manifests = {
        "datasets/minef.yaml": DATASET.format(root=args.root, cut=cut),
        "kb/minef_world.yaml": KB.format(size=", image_size: 64" if args.views else ""),
    }
    for kind, text in manifests.items():
        (args.root / "manifests" / kind).parent.mkdir(parents=True, exist_ok=True)
        (args.root / "manifests" / kind).write_text(text)
    images_written = sum(1 for _ in (args.root / "data").rglob("*.png"))
    print("written", images_written, "images and", args.root / "manifests")


if __name__ == "__main__":
    main()
