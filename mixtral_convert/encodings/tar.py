"""An uncompressed tar read in place: Mistral ships its releases as plain `.tar` downloads
(docs/formats.md, "mistral-inference folders and .tar downloads"), and a member's bytes are
contiguous in the archive, so its tensors can be read where they lie instead of being extracted first.

`open_tar` lists the members (tar headers only: `tarfile` seeks past the data), refusing a
compressed archive with what to do instead; an `Archive` opens the file once for positioned
reads (`io.reads`) and gives a member's bytes (small files) or tensors at an offset inside it.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConvertError
from ..io.lazy import OnDisk
from ..io.reads import SourceFile

# compressed tars: the suffixes they go by, and the magic bytes they start with
COMPRESSED_SUFFIXES = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tbz": "bzip2",
                       ".tar.xz": "xz", ".txz": "xz", ".tar.zst": "zstd", ".tzst": "zstd"}
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
DECOMPRESS = {"gzip": "gunzip", "bzip2": "bunzip2", "xz": "unxz", "zstd": "unzstd"}


def is_archive(path) -> bool:
    """Whether `path` names a tar file (plain or compressed), by its name."""
    p = Path(path)
    name = p.name.lower()
    return p.is_file() and (name.endswith(".tar") or name.endswith(tuple(COMPRESSED_SUFFIXES)))


def compression(path: Path) -> Optional[str]:
    """'gzip', 'bzip2', 'xz' or 'zstd' when the file starts with that format's magic bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


@dataclass(frozen=True)
class Member:
    name: str  # normalized path inside the archive
    info: tarfile.TarInfo

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def offset(self) -> int:
        """Where the member's bytes start in the archive."""
        return self.info.offset_data


class Archive:
    """The members of an uncompressed tar, and their bytes in place."""

    def __init__(self, path: Path, size: int, members: dict[str, Member], src: SourceFile):
        self.path, self.size, self.members, self.src = path, size, members, src

    def member(self, name: str) -> Member:
        """A member whose bytes are all in the archive, contiguous (a plain regular file)."""
        m = self.members[name]
        if m.info.issparse():
            raise ConvertError(f"{self.path}: member {name} is stored as a sparse file, whose bytes are not "
                               f"contiguous; extract the archive (tar -xf {self.path.name}) and pass the directory")
        if not m.info.isreg():
            raise ConvertError(f"{self.path}: member {name} is a link or special file, not the file itself; "
                               f"extract the archive (tar -xf {self.path.name}) and pass the directory")
        if m.offset + m.size > self.size:
            raise ConvertError(f"{self.path}: member {name} ends at byte {m.offset + m.size} but the archive has "
                               f"{self.size} bytes; the download is truncated: resume or re-download it")
        return m

    def read(self, m: Member, offset: int = 0, n: Optional[int] = None) -> bytes:
        """Bytes [offset, offset + n) of member m (default: to its end)."""
        n = m.size - offset if n is None else min(n, m.size - offset)
        return self.src.read(m.offset + offset, max(n, 0))

    def tensor(self, m: Member, offset: int, dtype: torch.dtype, shape: tuple[int, ...], name: str = "?") -> OnDisk:
        """The tensor stored at `offset` inside member m, as a description of where it lies."""
        return OnDisk(self.src, m.offset + offset, shape, dtype, name=name)


def _plain_name(name: str) -> str:
    """Where a decompressed copy of the archive `name` could go."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name[:-4] + "-plain.tar" if name.lower().endswith(".tar") else name + ".tar"


def _normalize(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")) if name.strip("/.") else ""


def open_tar(path: Path) -> Archive:
    """The members of an uncompressed tar (directories left out; a name given twice keeps its
    last copy, as extraction would). ConvertError for a compressed or unreadable archive."""
    path = Path(path)
    kind = compression(path) or next((k for s, k in COMPRESSED_SUFFIXES.items() if path.name.lower().endswith(s)),
                                     None)
    if kind is not None:
        raise ConvertError(f"{path}: compressed tar ({kind}), whose members cannot be read in place: extract it "
                           f"first (tar -xf {path.name}) and pass the directory, or decompress it to a plain .tar "
                           f"({DECOMPRESS[kind]} -c {path.name} > {_plain_name(path.name)}) and pass that")
    src = SourceFile(path)  # its identity is recorded before anything of it is read
    size = src.size
    members: dict[str, Member] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                name = _normalize(info.name)
                if name and not info.isdir():
                    members[name] = Member(name, info)
    except (tarfile.TarError, EOFError) as e:
        why = str(e).strip()[:100] or type(e).__name__
        if "unexpected end of data" in why:
            raise ConvertError(f"{path}: the tar archive ends inside a member ({size} bytes); the download is "
                               "truncated: resume or re-download it") from None
        raise ConvertError(f"{path}: not a readable tar archive ({why}); the download is damaged or not a "
                           "tar") from None
    if not members:
        raise ConvertError(f"{path}: an empty tar archive (or not a tar); expected Mistral's release download")
    return Archive(path, size, members, src)


def listing(path: Path) -> list[dict]:
    """Every file member's name and size (for `inspect`)."""
    return [{"name": m.name, "bytes": m.size} for m in open_tar(path).members.values()]
