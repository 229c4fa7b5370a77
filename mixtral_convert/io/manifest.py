"""The manifest every output directory carries, and checking a directory against it.

`mixtral-convert-manifest.json` records the tool and version, the command, what the output
is (layout, world size), the source's identity (its path, format, and each source file's size
and mtime, plus a sha256 where one was already computed; for the files it read, the mtime_ns and
inode that were checked unchanged before the output was published), and every output file's size
and sha256. `verify SHARDS` without `--source` re-hashes the files against it, so corruption after
conversion (bit rot, a truncated or partial copy, an edited or replaced file) is caught without
the 93 GB source. It guards against accidents, not against someone who also rewrites it.

`--force` trusts it only for plain file names in the directory itself (see `owned_names`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .. import __version__
from ..errors import ConvertError
from . import reads

MANIFEST = "mixtral-convert-manifest.json"
TOOL = "mixtral-convert"
HASH_BLOCK = 16 << 20  # bytes read per step when hashing
# names that look like checkpoint output: present but unlisted, they would make a directory
# ambiguous or stale for a loader (verify flags them; --force refuses to replace them)
OUTPUT_SUFFIXES = (".pth", ".safetensors", "config.json", "meta.json", "params.json", "tokenizer.model",
                   "model.safetensors.index.json")
_SHA = re.compile(r"[0-9a-f]{64}\Z")


def sha256_file(path: Path, advance: Optional[Callable[[int], None]] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


CHECKED = ("size, mtime_ns and inode of every source file read, recorded when it was opened and found unchanged "
           "right before this output was renamed into place")


def source_identity(source: dict) -> dict:
    """Normalise a source description: `files` maps each source file name to {size, mtime}
    and keeps a sha256 when the caller already computed one. A file given as the `io.reads.Identity`
    recorded when it was opened (size, mtime, mtime_ns, inode: what the output's rename was
    conditional on, `checked` says so) is recorded as that; any other, the file as it is now.
    Cheap: nothing is read."""
    source = dict(source)
    root = Path(source.get("path", "."))
    files, checked = {}, False
    for name, entry in (source.get("files") or {}).items():
        seen = entry if isinstance(entry, reads.Identity) else None
        entry = {} if seen is not None else dict(entry) if isinstance(entry, dict) else {"size": entry}
        path = root if root.name == name and root.is_file() else root / name  # an archive is its own file
        try:
            size, mtime_ns = (seen.size, seen.mtime_ns) if seen is not None else \
                ((st := path.stat()).st_size, st.st_mtime_ns)
            entry.setdefault("size", size)
            entry["mtime"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime_ns // 1_000_000_000)) + \
                f".{mtime_ns % 1_000_000_000:09d}Z"
        except OSError:
            pass
        if seen is not None:
            entry.update(mtime_ns=seen.mtime_ns, inode=seen.inode)
            checked = True
        files[name] = entry
    if files:
        source["files"] = files
    if checked:
        source["checked"] = CHECKED
    return source


def build(files: dict[str, dict], **info) -> dict:
    if isinstance(info.get("source"), dict):
        info["source"] = source_identity(info["source"])
    return {"tool": TOOL, "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([TOOL] + sys.argv[1:]), **info, "files": files}


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def read(directory: Path) -> dict:
    """The manifest of `directory`; ConvertError (naming it) when absent, unreadable or malformed."""
    path = Path(directory) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({str(e)[:80]}); the manifest is corrupt") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(m, dict) or m.get("tool") != TOOL or not isinstance(m.get("files"), dict):
        raise ConvertError(f"{path}: not a {TOOL} manifest (no 'tool' or 'files'); the manifest is corrupt")
    for name, e in m["files"].items():
        if not _plain_name(name) or name == MANIFEST:
            raise ConvertError(f"{path}: lists '{name}', which is not a plain file name; the manifest is corrupt")
        if not (isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                and _SHA.match(e["sha256"])):
            raise ConvertError(f"{path}: entry '{name}' lacks a size and sha256; the manifest is corrupt")
    return m


def owned_names(directory: Path) -> tuple[set[str], Optional[dict]]:
    """The plain file names an earlier run of this tool wrote in `directory` (manifest included),
    and the manifest; (empty, None) when there is no valid manifest."""
    try:
        m = read(directory)
    except ConvertError:
        return set(), None
    return set(m["files"]) | {MANIFEST}, m


def check_listing(directory: Path, m: dict) -> list[str]:
    """Every listed file present with its recorded size; no checkpoint-like file unlisted."""
    directory = Path(directory)
    out = []
    if m.get("incomplete"):
        out.append(f"{directory / MANIFEST}: marks an interrupted --force replacement; the directory mixes "
                   "two outputs: re-run the conversion with --force")
    for name, e in m["files"].items():
        p = directory / name
        if not p.is_file():
            out.append(f"{p}: listed in the manifest but missing; the output is incomplete: re-run the conversion")
        elif p.stat().st_size != e["size"]:
            out.append(f"{p}: {p.stat().st_size} bytes, the manifest says {e['size']}; the file was truncated or "
                       "changed after conversion: re-run the conversion")
    for p in sorted(directory.iterdir()):
        if p.name not in m["files"] and p.name.endswith(OUTPUT_SUFFIXES):
            out.append(f"{p}: not listed in the manifest (a stale or foreign file a loader would see); "
                       "move it away")
    return out


def check_hashes(directory: Path, m: dict, advance: Optional[Callable[[int], None]] = None) -> list[str]:
    """The first file whose sha256 differs from the manifest's, as a one-item list."""
    for name, e in m["files"].items():
        p = Path(directory) / name
        try:
            digest = sha256_file(p, advance)
        except OSError as err:
            return [f"{p}: cannot read ({err.strerror})"]
        if digest != e["sha256"]:
            return [f"{p}: sha256 {digest[:16]}... differs from the manifest's {e['sha256'][:16]}...; the file was "
                    "corrupted or modified after conversion: re-run the conversion (verify --source SRC names "
                    "the tensor)"]
    return []
