"""Small files written whole and made durable (the JSON side files, the manifest, copied tokenizers),
each returning its manifest entry; and fsync of files and directories written without it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import manifest as mf
from .manifest import MANIFEST


def fsync_dir(path: Path) -> None:
    """Make a rename or an unlink in `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fsync_all(paths) -> None:
    """Flush files written without fsync; the kernel has been writing them back meanwhile."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_file(src: Path, dst: Path) -> dict:
    """Copy a small file; returns its manifest entry."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return {"size": dst.stat().st_size, "sha256": h.hexdigest()}


def write_small(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def json_bytes(obj) -> bytes:
    """A small JSON file's bytes, as every file this tool writes them: indented, one final newline."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_manifest(tmp: Path, files: dict[str, dict], _name: str = MANIFEST, **info) -> None:
    """The manifest (see manifest.py): tool, version, command, source identity, every file's
    size and sha256."""
    write_small(tmp / _name, json_bytes(mf.build(files, **info)))
