"""The one webdataset tar reader: a small ustar / GNU / pax header parser, benchmarked against tarfile.

tarfile's header parsing costs ~70 us a member (230 us a sample, more than decoding a small PNG);
this parser (with json) ~60-90 us per image (bench/bench_embed.py, BENCHMARKS.md); it can skip a sample's
files with a seek, unread, which the embed stage's loader workers use to read only their own samples.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

from retformer.artifacts.errors import UserError

_NUL_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksums(header: bytes) -> tuple[int, ...]:
    # The checksum field counts as 8 spaces; old writers summed signed bytes (tarfile accepts both).
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    if max(header) < 128:
        return (unsigned,)
    signed = 256 + sum(struct.unpack_from("148b", header)) + sum(struct.unpack_from("356b", header, 156))
    return unsigned, signed


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> <key>=<value>\n"; only the path matters to us.
    pos = 0
    path = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def _check_end(f: BinaryIO, at: int) -> None:
    """After the first zero block only zeros may follow (the second block and the record padding):
    anything else means a header in the middle of the archive was zeroed, and the rest would be lost."""
    while chunk := f.read(1 << 16):  # normally one read: the record padding is 10 KiB at most
        if chunk.count(0) != len(chunk):
            raise ValueError(f"a zero block at byte {at} ends the archive, but data follows it")


class Member(NamedTuple):
    """Where a sample file's bytes lie in its tar: read `size` bytes at `offset` (random access)."""

    offset: int
    size: int


def _members(f: BinaryIO) -> Iterator[tuple[str, Member]]:
    """(name, where its data is) of each regular file member of an open tar, in order.

    The file is positioned at the member's data when it is yielded; the caller may read it or not,
    the next step seeks past it. Raises ValueError on a truncated or corrupt archive (see
    `iter_shard_files`)."""
    size_on_disk = os.fstat(f.fileno()).st_size
    long_name: str | None = None
    while True:
        at = f.tell()
        header = f.read(512)
        if not header:
            # tarfile accepts this, but every writer (tar, tarfile, webdataset) ends an archive
            # with zero blocks: a file that stops at a member boundary was cut there.
            raise ValueError(f"ends at byte {at} without the end-of-archive marker")
        if len(header) < 512:
            raise ValueError(f"truncated header at byte {at}")
        if header == _NUL_BLOCK:
            _check_end(f, at)
            return
        if _tar_number(header[148:156]) not in _checksums(header):
            raise ValueError(f"bad header checksum at byte {at}")
        size = _tar_number(header[124:136])
        padded = (size + 511) & ~511
        start = at + 512
        # The padding too: a short read past the end is a cut archive, never its end.
        if start + padded > size_on_disk:
            raise ValueError(
                f"member at byte {at} needs {padded} bytes of data, the file ends "
                f"{size_on_disk - start} bytes after its header"
            )
        kind = header[156:157]
        if kind in (b"L", b"x"):  # the next member's long name
            data = f.read(padded)[:size]
            name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
            long_name = name or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers, ...
            f.seek(start + padded)
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        yield name, Member(start, size)
        f.seek(start + padded)


def _read(f: BinaryIO, member: Member) -> bytes:
    data = f.read(member.size)
    if len(data) != member.size:  # the file shrank while being read
        raise ValueError(f"short read of the member at byte {member.offset - 512}")
    return data


@contextmanager
def _open_shard(path: Path) -> Iterator[BinaryIO]:
    """The shard opened for reading; a parse or read error becomes one UserError naming it."""
    try:
        with open(path, "rb") as f:
            yield f
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt or truncated shard {path}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror or exc}") from exc


def iter_shard_files(
    path: Path, keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield (sample index, key, {extension: bytes}) per sample of a webdataset tar, in order.

    The files of a sample whose index `keep` rejects are skipped with a seek, never read (each loader
    worker reads only its own samples); they come back as None. Samples are grouped by key as
    webdataset groups them (`split_name`). Header parsing is done here because tarfile's costs ~70 us a
    member (230 us a sample, more than decoding a small PNG); ustar, GNU long names and pax paths are
    handled. A truncated or corrupt shard raises a UserError naming it: a header or member cut short
    (its padding included), a file that ends without the end-of-archive zero blocks, or data after
    them (a zeroed header mid-archive). tarfile accepts the last two and would lose the rest silently.
    """
    with _open_shard(Path(path)) as f:
        for index, key, _, files in _samples(f, keep=keep):
            yield index, key, files


def iter_shard_members(
    path: Path, read: Container[str] = ()
) -> Iterator[tuple[str, dict[str, Member], dict[str, bytes]]]:
    """Yield (key, {extension: Member}, {extension: bytes}) per sample of a webdataset tar, in order:
    where every file of the sample lies (for random access later) and the bytes of the files whose
    extension is in `read` (e.g. the small json that holds an img2dataset sample's uid). Same grouping
    and errors as `iter_shard_files`."""
    with _open_shard(Path(path)) as f:
        for _, key, where, small in _samples(f, exts=read):
            yield key, where, small  # type: ignore[misc]  # no `keep`: every sample's dict is read


def _samples(
    f: BinaryIO, keep: Callable[[int], bool] | None = None, exts: Container[str] | None = None
) -> Iterator[tuple[int, str, dict[str, Member], dict[str, bytes] | None]]:
    """Per sample of an open tar, grouped by key (`split_name`), in order: (index, key, {extension:
    Member}, {extension: bytes}). The bytes are those of the files whose extension is in `exts` (None:
    all), read while the tar is positioned at them, for the samples `keep` accepts (None: all); a
    rejected sample's bytes are None and never read."""
    index, key = -1, None
    where: dict[str, Member] = {}
    data: dict[str, bytes] | None = None
    for name, member in _members(f):
        sample_key, ext = split_name(name)
        if sample_key != key:
            if key is not None:
                yield index, key, where, data
            index, key, where = index + 1, sample_key, {}
            data = {} if keep is None or keep(index) else None
        where[ext] = member
        if data is not None and (exts is None or ext in exts):
            data[ext] = _read(f, member)
    if key is not None:
        yield index, key, where, data


def split_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: webdataset's convention, the key is everything
    before the first dot of the file's base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])
