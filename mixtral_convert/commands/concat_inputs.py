"""concat's inputs: the pieces and the checksums to compare against.

- `find_pieces`: turns directories / piece files given in any order into the ordered piece list,
  refusing gaps, duplicates, mixed base names and empty pieces (ordered by the numeric suffix).
- `read_checksums`: expected md5/sha256 from `--md5`, `--sha256` or an md5sum/sha256sum file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import ConvertError

PIECE_RE = re.compile(r"^(?P<base>.+)-split(?P<index>\d+)$")
# Mixtral-8x22B's one consolidated.safetensors, cut by community mirrors into .0 ... .N
SAFETENSORS_PIECE_RE = re.compile(r"^(?P<base>.+\.safetensors)\.(?P<index>\d+)$")
PARTIAL_SUFFIX = ".mixtral-convert-partial"


@dataclass
class Expected:
    """Checksums to compare against, with where each came from (for the error message)."""
    md5: list[tuple[str, str]] = field(default_factory=list)     # (hex, source)
    sha256: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- pieces

def piece_match(path: Path):
    return PIECE_RE.match(path.name) or SAFETENSORS_PIECE_RE.match(path.name)


def piece_of(path: Path) -> tuple[str, int] | None:
    """(base name, index) when `path` is named as a piece, else None."""
    m = piece_match(Path(path))
    return (m["base"], int(m["index"])) if m else None


def find_pieces(inputs: Iterable[Path]) -> list[Path]:
    """The pieces named by INPUTs (directories or piece files), ordered by numeric suffix."""
    found: list[tuple[int, Path]] = []
    seen: dict[Path, Path] = {}
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            here = sorted(p for p in given.iterdir() if piece_match(p) and not p.is_dir())
            if not here:
                raise ConvertError(f"{given}: no '*-splitN' pieces (nor '*.safetensors.N' ones) in this directory")
        elif given.exists():
            if not piece_match(given):
                raise ConvertError(f"{given}: not a piece (expected a name ending in '-splitN' or "
                                   "'.safetensors.N')")
            here = [given]
        else:
            raise ConvertError(f"{given}: no such file or directory")
        for p in here:
            key = p.resolve()
            if key in seen:
                raise ConvertError(f"duplicate piece: {p} is given twice")
            seen[key] = p
            found.append((int(piece_match(p)["index"]), p))

    bases = sorted({piece_match(p)["base"] for _, p in found})
    if len(bases) > 1:
        named = ", ".join(_pattern(b) for b in bases)
        raise ConvertError(f"pieces of different files: {named}; give the pieces of one file")
    by_index: dict[int, Path] = {}
    for index, p in found:
        if index in by_index:
            raise ConvertError(f"duplicate piece index {index}: {by_index[index]} and {p}")
        by_index[index] = p
    missing = [i for i in range(max(by_index) + 1) if i not in by_index]
    if missing:
        names = ", ".join(_piece_name(bases[0], i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConvertError(f"missing piece(s): {names}{more} (found {len(by_index)} pieces, "
                           f"suffixes 0..{max(by_index)})")
    pieces = [by_index[i] for i in sorted(by_index)]
    for p in pieces:
        if not p.is_file():
            raise ConvertError(f"{p}: not a regular file")
        if p.stat().st_size == 0:
            raise ConvertError(f"empty piece: {p} has 0 bytes (an interrupted download?)")
    return pieces


def _pattern(base: str) -> str:
    return f"{base}.*" if base.endswith(".safetensors") else f"{base}-split*"


def _piece_name(base: str, i: int) -> str:
    return f"{base}.{i}" if base.endswith(".safetensors") else f"{base}-split{i}"


def default_output(pieces: list[Path]) -> Path:
    """`consolidated.00.pth` beside the pieces: the base name with `-splitK` (or `.K` after
    `.safetensors`) removed."""
    return pieces[0].with_name(piece_match(pieces[0])["base"])


def partial_path(output: Path) -> Path:
    return output.with_name(f".{output.name}{PARTIAL_SUFFIX}")


# ----------------------------------------------------------------------------- checksums

_HEX = re.compile(r"^[0-9a-fA-F]+$")
_GNU_LINE = re.compile(r"^\\?(?P<hex>[0-9a-fA-F]+) [ *](?P<name>.+)$")
_BSD_LINE = re.compile(r"^(?P<algo>MD5|SHA256) \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]+)$")


def _kind(hexstr: str, source: str) -> str:
    if not _HEX.match(hexstr) or len(hexstr) not in (32, 64):
        raise ConvertError(f"{source}: '{hexstr}' is neither an md5 (32 hex digits) nor a "
                           f"sha256 (64 hex digits)")
    return "md5" if len(hexstr) == 32 else "sha256"


def read_checksums(output_name: str, md5: str | None = None, sha256: str | None = None,
                   checksums: Path | None = None) -> Expected:
    """Expected checksums of the output: from --md5/--sha256 and/or an md5sum/sha256sum-style
    file (`<hex>  <name>`, `<hex> *<name>` or BSD `SHA256 (<name>) = <hex>`), taking the lines
    whose name's basename is the output's basename."""
    exp = Expected()
    if md5 is not None:
        if _kind(md5.strip(), "--md5") != "md5":
            raise ConvertError(f"--md5: '{md5}' is not 32 hex digits")
        exp.md5.append((md5.strip().lower(), "--md5"))
    if sha256 is not None:
        if _kind(sha256.strip(), "--sha256") != "sha256":
            raise ConvertError(f"--sha256: '{sha256}' is not 64 hex digits")
        exp.sha256.append((sha256.strip().lower(), "--sha256"))
    if checksums is not None:
        checksums = Path(checksums)
        try:
            text = Path(checksums).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConvertError(f"--checksums {checksums}: {e.strerror or e}") from None
        names, matched = [], 0
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _BSD_LINE.match(line) or _GNU_LINE.match(line)
            if not m:
                continue
            name = m["name"].strip()
            names.append(name)
            if os.path.basename(name.replace("\\", "/")) != output_name:
                continue
            kind = _kind(m["hex"], f"{checksums} line {n}")
            getattr(exp, kind).append((m["hex"].lower(), f"{checksums.name} line {n}"))
            matched += 1
        if not matched:
            listed = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") or "nothing"
            raise ConvertError(f"--checksums {checksums}: no md5 or sha256 line for "
                               f"'{output_name}' (it lists: {listed})")
    return exp


