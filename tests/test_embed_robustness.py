"""The embed stage on bad data: every broken sample is embedded correctly or skipped and counted by
reason; nothing crashes or hangs; the fast input path gives what the reference path gives."""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from retformer.artifacts.decode import MAX_CAPTION_CHARS
from retformer.artifacts.embeddings_io import read_embeddings
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import to_record as _to_record
from retformer.kb_builder import embed
from retformer.kb_builder.kb_schema import ImageEncoder, TextEncoder
from tests.helpers import read_shard_tarfile as read_shard
from tests.helpers import write_tar

IMAGE_SPEC = ImageEncoder(name="efficientnet_lite0", image_size=32)
TEXT_SPEC = TextEncoder(name="minilm")
LONG_CAPTION = ("a very long caption " * 5000)[:100_000]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A real decompression bomb: a valid 1-bit PNG just over Pillow's MAX_IMAGE_PIXELS (~90 M
    pixels, ~11 MB once decoded to bits, far more as 8-bit RGB), ~11 KB on disk."""
    side = math.isqrt(Image.MAX_IMAGE_PIXELS) + 1
    assert side * side > Image.MAX_IMAGE_PIXELS

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits, all zero
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _meta(uid: str, label: int | None = 1) -> bytes:
    return json.dumps({"uid": uid, "label": label, "source": "test"}).encode()


def bad_shard(path: Path) -> tuple[Path, list[str], dict[str, int]]:
    """(shard, uids expected in the part in shard order, expected skip counts by reason)."""
    rng = np.random.default_rng(0)

    def good(i: int) -> bytes:
        return _png(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)))

    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    gray16 = Image.fromarray((rng.integers(0, 60000, (20, 24))).astype(np.uint16))
    samples: list[tuple[str, dict[str, bytes]]] = []
    kept: list[str] = []

    def add(uid: str, files: dict[str, bytes], embedded: bool) -> None:
        samples.append((uid, {**files, "json": _meta(uid)}))
        if embedded:
            kept.append(uid)

    add("good_0", {"png": good(0), "txt": b"a shirt"}, True)
    add("truncated_jpeg", {"jpg": _jpeg(photo)[:400], "txt": b"cut short"}, False)
    add("zero_byte", {"jpg": b"", "txt": b"nothing"}, False)
    add("text_as_jpg", {"jpg": b"this is a caption saved as .jpg, not an image\n", "txt": b"x"}, False)
    add("cmyk_jpeg", {"jpg": _jpeg(Image.new("CMYK", (40, 30), (10, 200, 30, 0))), "txt": b"cmyk"}, True)
    add("png_16bit", {"png": _png(gray16), "txt": b"sixteen bits"}, True)
    add("one_pixel", {"png": _png(Image.new("RGB", (1, 1), (255, 0, 0))), "txt": b"a dot"}, True)
    add("good_1", {"png": good(1), "txt": b"a shoe"}, True)
    add("bomb", {"png": bomb_png(), "txt": b"boom"}, False)
    add("no_caption", {"png": good(2)}, True)
    add("long_caption", {"png": good(3), "txt": LONG_CAPTION.encode()}, True)
    add("no_image", {"txt": b"a caption without its image"}, False)
    samples.append(("bad_json", {"png": good(4), "txt": b"y", "json": b"{not json"}))
    # issue 17 (9): a label outside the part's int32 column failed the whole shard (OverflowError)
    samples.append(("label_2_31", {"png": good(7), "txt": b"z", "json": _meta("label_2_31", 2**31)}))
    samples.append(("label_inf", {"png": good(8), "txt": b"z", "json": _meta("label_inf", float("inf"))}))
    add("latin1_caption", {"png": good(5), "txt": "caf\xe9".encode("latin-1")}, True)
    add("good_2", {"png": good(6), "txt": b"a bag"}, True)
    expected = {
        "truncated_or_corrupt": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "decompression_bomb": 1,
        "missing_image": 1,
        "bad_metadata": 1,
        "label_out_of_range": 2,
    }
    return write_tar(path, samples), kept, expected


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict:
    """The bad shard embedded twice with the real encoders: in-process, and with 2 loader workers."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("robust")
    shard, kept, expected = bad_shard(root / "bad-00000.tar")
    runs = {}
    for workers in (0, 2):
        out = root / f"out{workers}"
        stats = embed.embed_shard(
            (shard, "bad-00000"), out, IMAGE_SPEC, TEXT_SPEC, batch_size=3, num_workers=workers
        )
        runs[workers] = (stats, read_embeddings(out))
    return {"shard": shard, "kept": kept, "expected": expected, "runs": runs}


def test_every_bad_sample_is_skipped_by_reason_or_embedded(embedded):
    """Truncated JPEG, zero-byte file, text saved as .jpg, decompression bomb, missing image,
    unreadable json and a label outside int32 are skipped and counted by reason; CMYK, 16-bit PNG,
    1x1, a missing, an over-long and a non-UTF-8 caption are embedded, in shard order, with unit-norm
    finite vectors."""
    stats, table = embedded["runs"][0]
    assert stats["status"] == "embedded"
    assert stats["skipped"] == embedded["expected"]
    assert stats["images"] == len(embedded["kept"]) == len(table)
    assert table.uid.tolist() == embedded["kept"]
    assert stats["skipped_examples"]["decompression_bomb"] == ["bomb"]
    vecs = table.image_emb.astype(np.float32)
    assert np.isfinite(vecs).all()
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-2)


def test_captions_missing_long_and_undecodable(embedded):
    """A missing caption gives a null text vector and is counted; a 100k-character caption is cut to
    MAX_CAPTION_CHARS and embedded as that cut; undecodable caption bytes are replaced, not fatal."""
    stats, table = embedded["runs"][0]
    row = {u: i for i, u in enumerate(table.uid.tolist())}
    assert stats["missing_caption"] == 1
    assert table.has_text.tolist() == [u != "no_caption" for u in table.uid.tolist()]
    assert table.caption[row["no_caption"]] is None
    long_row = row["long_caption"]
    cut = LONG_CAPTION.strip()[:MAX_CAPTION_CHARS]
    assert table.caption[long_row] == cut
    _, text_enc = embed._encoders(IMAGE_SPEC, TEXT_SPEC, "cpu")
    ref = text_enc.encode([cut]).numpy()[0]
    assert np.allclose(table.text_emb[long_row].astype(np.float32), ref, atol=2e-3)
    assert table.caption[row["latin1_caption"]] == "caf\ufffd"
    text = table.text_emb[table.has_text].astype(np.float32)
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-2)


def test_loader_workers_give_the_same_part(embedded):
    """With 2 loader processes (batches of 3, so blocks alternate between workers) the part holds the
    same rows in the same order with the same vector bytes as the in-process run."""
    (s0, t0), (s2, t2) = embedded["runs"][0], embedded["runs"][2]
    assert s2["num_workers"] == 2 and s2["skipped"] == s0["skipped"]
    assert t2.uid.tolist() == t0.uid.tolist()
    assert t2.image_emb.tobytes() == t0.image_emb.tobytes()
    assert t2.text_emb.tobytes() == t0.text_emb.tobytes()
    assert t2.caption == t0.caption and t2.label.tolist() == t0.label.tolist()


def test_unsplittable_transform_falls_back_to_preprocess(embedded, tmp_path, monkeypatch):
    """An encoder whose transform does not end in ToTensor + Normalize is fed by its own `preprocess`,
    image by image; the part is the same, bit for bit, as through the batched path."""
    monkeypatch.setattr(embed, "split_transform", lambda encoder: None)
    stats = embed.embed_shard(
        (embedded["shard"], "bad-00000"), tmp_path, IMAGE_SPEC, TEXT_SPEC, batch_size=3, num_workers=0
    )
    _, ref = embedded["runs"][0]
    table = read_embeddings(tmp_path)
    assert stats["skipped"] == embedded["expected"]
    assert table.uid.tolist() == ref.uid.tolist()
    assert table.image_emb.tobytes() == ref.image_emb.tobytes()


def test_rerun_keeps_a_finished_part_and_redoes_an_unreadable_one(embedded, tmp_path):
    """A part written from the same shard is its done-marker (nothing recomputed); a truncated part
    is not trusted: it is recomputed, not read."""
    shard = embedded["shard"]
    out = tmp_path / "out"
    first = embed.embed_shard((shard, "bad-00000"), out, IMAGE_SPEC, TEXT_SPEC, batch_size=3, num_workers=0)
    again = embed.embed_shard((shard, "bad-00000"), out, IMAGE_SPEC, TEXT_SPEC, batch_size=3, num_workers=0)
    assert again["status"] == "done_before"
    part = Path(first["part"])
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    redo = embed.embed_shard((shard, "bad-00000"), out, IMAGE_SPEC, TEXT_SPEC, batch_size=3, num_workers=0)
    assert redo["status"] == "embedded"
    assert read_embeddings(out).uid.tolist() == embedded["kept"]


def test_fast_tar_reader_matches_read_shard(tmp_path):
    """The stage's tar reader yields exactly read_shard's records, also for names over 100 characters
    (pax and GNU long-name headers) and img2dataset-style json; it skips unkept samples unread."""
    long_uid = "u" * 150
    img2ds = json.dumps({"uid": "i2d", "url": "http://x", "key": "000001", "status": "success"}).encode()
    samples = [
        ("s0", {"png": b"\x89PNG-ish", "txt": "caf\xe9 \u2603".encode(), "json": _meta("s0", None)}),
        (long_uid, {"jpg": b"\xff\xd8\xff-ish", "json": _meta(long_uid)}),
        ("000001", {"jpg": b"\xff\xd8\xff", "txt": b"", "json": img2ds}),
        ("s3", {"txt": b"only text"}),
    ]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        if fmt == tarfile.USTAR_FORMAT:
            samples[1] = ("dir/" + "v" * 90, samples[1][1])  # ustar prefix field
        path = write_tar(tmp_path / f"t{fmt}.tar", samples, fmt)
        ours = [_to_record(k, f) for _, k, f in embed.iter_shard_files(path)]
        assert ours == list(read_shard(path))
        picked = [(i, f is not None) for i, _, f in embed.iter_shard_files(path, keep=lambda i: i % 2 == 1)]
        assert picked == [(0, False), (1, True), (2, False), (3, True)]


def test_truncated_or_corrupt_shard_is_one_clear_error(tmp_path):
    """A shard cut mid-member, or with a damaged header, raises a UserError naming the shard."""
    path = write_tar(tmp_path / "ok.tar", [(f"k{i}", {"txt": b"x" * 3000}) for i in range(3)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:5000])
    with pytest.raises(UserError, match="corrupt or truncated shard .*cut.tar"):
        list(embed.iter_shard_files(cut))
    damaged = tmp_path / "damaged.tar"
    second_header = 512 + 3072  # after the first member's header and its padded data
    damaged.write_bytes(data[:second_header] + b"garbage!" + data[second_header + 8 :])
    with pytest.raises(UserError, match="damaged.tar"):
        list(embed.iter_shard_files(damaged))


def test_batched_normalisation_is_bit_identical_to_the_encoder_transform(embedded):
    """The loader's PIL steps + batched ToTensor/Normalize give the same bits as the encoders'
    per-image transforms (Lite0's and open_clip's, incl. squash resize and the padding crop)."""
    import open_clip

    lite0, _ = embed._encoders(IMAGE_SPEC, TEXT_SPEC, "cpu")
    clip_tf = [
        open_clip.image_transform(224, is_train=False, resize_mode=mode) for mode in ("shortest", "squash")
    ]
    encoders = [(lite0.preprocess, embed.split_transform(lite0))]
    for tf in clip_tf:
        encoders.append((tf, embed.split_transform(SimpleNamespace(loaded=SimpleNamespace(preprocess=tf)))))
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (28, 28), (3, 500), (500, 3), (31, 33), (224, 224), (301, 207)]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for reference, (pil_steps, mean, std) in encoders:
            pixels = torch.from_numpy(np.stack([np.asarray(pil_steps(img))]))
            got = embed.normalize_batch(pixels, mean, std, "cpu")[0]
            assert torch.equal(got, reference(img)), (w, h)


def test_embed_options_are_checked():
    """The manifest's embed section: known options pass through, a typo (with "did you mean") or a
    bad value is a UserError naming the key."""
    assert embed.embed_options({"batch_size": 64, "num_workers": 0}) == {"batch_size": 64, "num_workers": 0}
    assert embed.embed_options(None) == {}
    with pytest.raises(UserError, match="batchsize: unknown key .*did you mean .batch_size"):
        embed.embed_options({"batchsize": 64})
    with pytest.raises(UserError, match="embed: num_workers"):
        embed.embed_options({"num_workers": -1})
    with pytest.raises(UserError, match="embed: device"):
        embed.embed_options({"device": "tpu"})
