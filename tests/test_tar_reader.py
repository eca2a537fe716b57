"""The one tar reader (artifacts/tar_reader.py) and its random-access index (artifacts.shards.image_members):
every reader of shard images finds a sample under the same uid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import IMAGE_EXTS, image_ext_of, image_members, read_shard
from retformer.artifacts.tar_reader import iter_shard_members
from retformer.pipelines.shard_images import ShardImageReader
from retformer.trainer.images import ShardImages
from tests.helpers import write_tar

PNG = b"\x89PNG\r\n\x1a\n" + b"png-body"
JPEG = b"\xff\xd8\xff" + b"jpeg-body"


def _img2dataset_shard(path: Path) -> Path:
    """img2dataset's layout: `__key__` is its row key, the uid is a column of the json."""
    samples = []
    for i, uid in enumerate(["cat_1", "dog_2"]):
        meta = {"uid": uid, "url": f"http://x/{i}", "key": f"{i:05d}", "status": "success", "caption": ""}
        files = {"jpg": JPEG + bytes([i]), "txt": b"", "json": json.dumps(meta).encode()}
        samples.append((f"{i:05d}", files))
    return write_tar(path, samples)


def _webdataset_shard(path: Path) -> Path:
    """The project's own layout (artifacts.shards.write_shards): `__key__` is the uid."""
    samples = []
    for i, uid in enumerate(["s0", "s1"]):
        meta = {"uid": uid, "label": i, "source": "test"}
        samples.append((uid, {"png": PNG + bytes([i]), "json": json.dumps(meta).encode()}))
    return write_tar(path, samples)


@pytest.mark.parametrize("make", [_img2dataset_shard, _webdataset_shard])
def test_every_reader_gives_the_same_uid_and_image(tmp_path, make):
    """The embed stage's records (read_shard), the offset index, fine-tune's ShardImages and the
    browser's ShardImageReader agree on each sample's uid and on its image bytes, for img2dataset and
    plain webdataset shards."""
    shard = make(tmp_path / "00000.tar")
    records = list(read_shard(shard))
    index = image_members(shard)
    assert list(index) == [r["uid"] for r in records]
    for r in records:
        member = index[r["uid"]]
        with open(shard, "rb") as fh:
            fh.seek(member.offset)
            assert fh.read(member.size) == r["image_bytes"]
        assert member.ext == r["image_ext"]

    uids = [r["uid"] for r in records]
    fine_tune = ShardImages([shard], uids)
    assert fine_tune.size.tolist() == [len(r["image_bytes"]) for r in records]

    part = tmp_path / "parts" / "part-00000.parquet"  # named like the shard, as the embed stage names it
    browser = ShardImageReader([part], [tmp_path])
    for r in records:
        assert browser.read(0, r["uid"]) == (r["image_bytes"], r["image_ext"])


def test_members_give_offsets_and_read_only_what_is_asked(tmp_path):
    """iter_shard_members yields each sample's member offsets and reads only the extensions asked for."""
    shard = _webdataset_shard(tmp_path / "s.tar")
    samples = list(iter_shard_members(shard, read=("json",)))
    assert [key for key, _, _ in samples] == ["s0", "s1"]
    for _, where, small in samples:
        assert set(where) == {"png", "json"} and set(small) == {"json"}
        with open(shard, "rb") as fh:
            fh.seek(where["json"].offset)
            assert fh.read(where["json"].size) == small["json"]


def test_image_ext_picks_in_the_declared_order(tmp_path):
    """A sample with several image members has the first of IMAGE_EXTS as its image, in every reader."""
    assert IMAGE_EXTS[0] == "png"
    assert image_ext_of({"jpg": b"", "png": b"", "json": b""}) == "png"
    assert image_ext_of({"txt": b""}) is None
    shard = write_tar(tmp_path / "t.tar", [("a", {"jpg": JPEG, "png": PNG})])
    member = image_members(shard)["a"]
    assert member.ext == next(iter(read_shard(shard)))["image_ext"] == "png"
    assert member.size == len(PNG)


def test_a_cut_shard_is_a_user_error(tmp_path):
    """The offset index raises the same UserError naming the shard as the sequential reader."""
    shard = _webdataset_shard(tmp_path / "s.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(UserError, match="corrupt or truncated shard .*cut.tar"):
        image_members(cut)


def test_a_symlinked_shard_keeps_its_stem_and_a_foreign_one_is_one_error(tmp_path) -> None:
    """Proves shard_stem names a shard by its place under the shard folder even when the file is a
    symlink to elsewhere (a workspace assembled from another's shards used to crash with a ValueError
    traceback), and that a shard outside the folder is one UserError naming it."""
    import pytest

    from retformer.artifacts.errors import UserError
    from retformer.artifacts.shards import shard_stem

    elsewhere = tmp_path / "elsewhere" / "train-00000.tar"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"")
    root = tmp_path / "ws" / "shards"
    (root / "chunk").mkdir(parents=True)
    (root / "chunk" / "00000.tar").symlink_to(elsewhere)
    assert shard_stem(root / "chunk" / "00000.tar", root) == "chunk-00000"
    with pytest.raises(UserError, match="not under its shard folder"):
        shard_stem(elsewhere, root)
