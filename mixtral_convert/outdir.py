"""Output that is never half-written: a temporary sibling directory renamed into place.

The temporary directory carries a marker file, so a later run recognises one left by a killed
run as its own and removes it. `--force` replaces only files that an earlier run of this tool
wrote (those named in the manifest it left); it never deletes anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import ConvertError
from .progress import human_bytes

MARKER = ".mixtral-convert-partial"
MANIFEST = "mixtral-convert-manifest.json"
# names that, left over beside a new output, would make it ambiguous or stale for a loader
_CONFLICTING = (".pth", ".safetensors", "config.json", "meta.json", "params.json", "tokenizer.model",
                "model.safetensors.index.json")


def _temp_for(out: Path) -> Path:
    return out.parent / f".{out.name}{MARKER}"


def _manifest_files(out: Path) -> set[str]:
    try:
        with open(out / MANIFEST) as f:
            return set(json.load(f).get("files", {})) | {MANIFEST}
    except (OSError, ValueError, AttributeError):
        return set()


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes `out`, on any failure or
    interrupt it is removed."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory; choose another -o")
    tmp = _temp_for(out)
    if tmp.exists():
        if (tmp / MARKER).exists():
            shutil.rmtree(tmp)  # left by a killed run of this tool
        else:
            raise ConvertError(f"{tmp}: exists and was not made by mixtral-convert; remove it or choose another -o")
    ours: set[str] = set()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConvertError(f"{out}: exists and is not empty; choose another -o, or pass --force to "
                               "replace what mixtral-convert wrote there")
        ours = _manifest_files(out)
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in ours and (p.name.endswith(_CONFLICTING)))
        if foreign:
            raise ConvertError(f"{out}: holds '{foreign[0]}' which mixtral-convert did not write; --force "
                               "only replaces its own files: move it away or choose another -o")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
    except OSError as e:
        raise ConvertError(f"{out.parent}: cannot create or use the output's parent ({e.strerror})") from None
    if need_bytes and free < need_bytes:
        raise ConvertError(f"{out.parent}: not enough free space: {human_bytes(need_bytes)} needed, "
                           f"{human_bytes(free)} free; free some space or choose another -o")
    try:
        tmp.mkdir()
        (tmp / MARKER).write_text(f"{os.getpid()}\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(f"{out.parent}: cannot write there ({e.strerror}); choose another -o") from None
    try:
        yield tmp
        (tmp / MARKER).unlink()
        if out.exists():
            for name in ours:
                (out / name).unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        if out.exists():  # --force over a directory that also holds foreign, harmless files
            for p in tmp.iterdir():
                os.replace(p, out / p.name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_manifest(tmp: Path, files: dict[str, dict], _name: str = MANIFEST, **info) -> None:
    manifest = {"tool": "mixtral-convert", "version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **info, "files": files}
    write_small(tmp / _name, json_bytes(manifest))


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; it replaces `path` on success and is removed on failure."""
    tmp = path.parent / f".{path.name}.{os.getpid()}{MARKER}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
