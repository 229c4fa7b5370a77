"""mistral-inference's release format (docs/formats.md, "mistral-inference folders and .tar
downloads"): `params.json`, one `consolidated.safetensors` of torrent-named tensors, and a
SentencePiece tokenizer shipped as `tokenizer.model`, `tokenizer.model.v3` or
`tokenizer.model.v1`; in a directory, or inside Mistral's uncompressed `.tar` download, which is
read in place (nothing extracted).

- The directory reader (`READER`) claims `consolidated.safetensors`; a directory that also holds
  `consolidated.00.pth` (or `consolidated.NN.pt`) is ambiguous and refused, as mistral-inference
  refuses it.
- `open_archive` reads a `.tar` (top-level files or one folder): the safetensors header is
  parsed from the member's bytes and every tensor is read from the archive at the member's
  offset by positioned reads; params.json is read from it, and the tokenizer is copied into memory
  (a memfd, gone with the process) so that writers can copy it like a file.
- The tokenizer: the first present of `TOKENIZERS`; the output always carries it as
  `tokenizer.model`. `tekken.json` alone (not SentencePiece) leaves none, with the message saying
  to pass --tokenizer.
- `hint`: what to do with a directory holding only `consolidated.safetensors.K` byte pieces.
"""

from __future__ import annotations

import atexit
import json
import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Optional

from ..encodings import safetensors as stheader
from ..encodings import tar as tarball
from ..errors import ConvertError
from ..io.pipeline import write_all
from ..model.config import ModelConfig
from ..tokenizer.files import tokenizer_pieces
from .checkpoint import Checkpoint, Reader, TokenizerRef
from .torrent import PARAMS, TORRENT_FILE, canonical_of

SAFETENSORS = "consolidated.safetensors"
TOKENIZERS = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")  # in order of preference
TEKKEN = "tekken.json"
PIECE_RE = re.compile(re.escape(SAFETENSORS) + r"\.(\d+)\Z")
_TORCH_FILES = re.compile(r"consolidated\.\d+\.pth?\Z")
LABEL = "mistral-inference layout"


def pick_tokenizer(names) -> Optional[str]:
    """The SentencePiece tokenizer's file name among `names`, in the order of TOKENIZERS."""
    return next((n for n in TOKENIZERS if n in names), None)


def _no_tokenizer(where: str, names, cfg: ModelConfig) -> str:
    """The message for a source without a SentencePiece tokenizer ('' when it ships nothing)."""
    if TEKKEN not in names:
        return ""
    return (f"{where}: ships {TEKKEN} (Mistral's Tekken tokenizer, not SentencePiece), which Accessory cannot "
            f"load; pass --tokenizer PATH with a SentencePiece tokenizer.model of the same vocabulary "
            f"({cfg.vocab_size} pieces)")


def _checkpoint(path: Path, cfg: ModelConfig, files: list[Path], tensors: dict, where: str,
                tok: TokenizerRef, label: str) -> Checkpoint:
    """Canonical tensors (fused block_sparse_moe names unfused into views), checked against the config."""
    return Checkpoint(path, "mistral", cfg, files, tok, canonical_of(cfg, tensors, where), label=label)


# ----------------------------------------------------------------------------- a directory
def open_dir(path: Path, names: set[str]) -> Checkpoint:
    f = path / SAFETENSORS
    if not (path / PARAMS).is_file():
        raise ConvertError(f"{path / PARAMS}: not found; mistral-inference releases ship params.json beside "
                           f"{SAFETENSORS}")
    cfg = ModelConfig.from_json_file(path / PARAMS)
    tensors = stheader.read_tensors(f)  # OSError becomes a one-line ConvertError there
    tok_name = pick_tokenizer(names)
    tok = TokenizerRef(path / tok_name) if tok_name else TokenizerRef(missing=_no_tokenizer(str(path), names, cfg))
    return _checkpoint(path, cfg, [f], tensors, str(f), tok, LABEL)


READER = Reader(
    "mistral", f"{SAFETENSORS} with {PARAMS} (mistral-inference; or its .tar download)",
    claims=lambda path, names: SAFETENSORS in names,
    open=open_dir, conflicts=("torrent", "consolidated"),
    conflict_why="which of the two is meant is ambiguous; mistral-inference refuses such a folder too")


ARCHIVE = Reader("archive", "Mistral's .tar download of such a folder", claims=lambda path, _: tarball.is_archive(path),
                 open=lambda path, _: open_archive(path), single_file=True)


def hint(path: Path, names: set[str]) -> Optional[str]:
    """What to do with a directory that holds only consolidated.safetensors's byte pieces."""
    if SAFETENSORS not in names and any(PIECE_RE.match(n) for n in names):
        return (f"{path}: holds {SAFETENSORS}.K pieces but no {SAFETENSORS}; join them first: "
                f"mixtral-convert concat {path}")
    return None


# ----------------------------------------------------------------------------- a .tar
def _checkpoint_folder(ar: tarball.Archive) -> str:
    """The folder inside the archive that holds the checkpoint ('' for top-level files)."""
    weights = sorted(n for n in ar.members if posixpath.basename(n) in (SAFETENSORS, TORRENT_FILE)
                     or _TORCH_FILES.match(posixpath.basename(n)))
    folders = sorted({posixpath.dirname(n) for n in weights})
    if not folders:
        listed = ", ".join(list(ar.members)[:6]) + (", ..." if len(ar.members) > 6 else "")
        raise ConvertError(f"{ar.path}: no {SAFETENSORS} in the archive (it holds {listed}); expected a "
                           "mistral-inference release")
    if len(folders) > 1:
        raise ConvertError(f"{ar.path}: holds checkpoints in several folders ({', '.join(f or '.' for f in folders)}); "
                           "extract it and pass the one to convert")
    return folders[0]


def open_archive(path: Path) -> Checkpoint:
    """Mistral's uncompressed .tar download, read in place."""
    path = Path(path)
    ar = tarball.open_tar(path)
    folder = _checkpoint_folder(ar)
    inside = {posixpath.basename(n): n for n in ar.members if posixpath.dirname(n) == folder}
    names = set(inside)
    torch_files = sorted(n for n in names if _TORCH_FILES.match(n))
    if SAFETENSORS in names and torch_files:
        raise ConvertError(f"{path}: holds both {SAFETENSORS} and {torch_files[0]} (which of the two is meant is "
                           "ambiguous; mistral-inference refuses such a folder too); extract the one to convert")
    if SAFETENSORS not in names:
        raise ConvertError(f"{path}: holds {torch_files[0]}, a torch zip, which is not read inside a tar: extract "
                           f"it (tar -xf {path.name}) and pass the directory")
    if PARAMS not in names:
        raise ConvertError(f"{path}: no {PARAMS} beside {inside[SAFETENSORS]} in the archive; the release ships "
                           "one: re-download it")
    where = f"{path}:{inside[PARAMS]}"
    params = ar.member(inside[PARAMS])
    try:
        raw = json.loads(ar.read(params))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConvertError(f"{where}: not valid JSON; the archive is damaged: re-download it") from None
    cfg = ModelConfig.from_params(raw, where)
    st = ar.member(inside[SAFETENSORS])
    where = f"{path}:{st.name}"
    entries, start = stheader.parse(lambda off, n: ar.read(st, off, n), st.size, where)
    tensors = {e.name: ar.tensor(st, start + e.begin, e.dtype, e.shape, e.name) for e in entries}
    return _checkpoint(path, cfg, [path], tensors, where, _archive_tokenizer(path, ar, inside, names, cfg),
                       f"{LABEL}, read in place from an uncompressed tar")


def _archive_tokenizer(path: Path, ar, inside: dict, names: set[str], cfg: ModelConfig) -> TokenizerRef:
    """The archive's SentencePiece tokenizer as a process-lifetime copy, named in messages by its member."""
    tok_name = pick_tokenizer(names)
    if tok_name is None:
        return TokenizerRef(missing=_no_tokenizer(str(path), names, cfg))
    tok = ar.member(inside[tok_name])
    shown = f"{path}:{tok.name}"
    copy = _memory_file(ar.read(tok), tok_name, (path, tok.name, tok.size, path.stat().st_mtime_ns))
    try:
        tokenizer_pieces(copy)
    except ConvertError:
        return TokenizerRef(missing=f"{shown}: not a SentencePiece model; the archive is damaged: re-download it, "
                                    "or pass --tokenizer PATH with the release's tokenizer.model")
    return TokenizerRef(copy, shown_as=shown)


_COPIES: dict[tuple, Path] = {}
_FILES: list[Path] = []  # the copies that are files on disk (where there is no memfd)


def remove_copies() -> None:
    """Remove the tokenizer copies written to disk (memfds go with the process by themselves)."""
    while _FILES:
        path = _FILES.pop()
        path.unlink(missing_ok=True)
        for key in [k for k, v in _COPIES.items() if v == path]:
            del _COPIES[key]


def _memory_file(data: bytes, name: str, key: tuple) -> Path:
    """`data` as a file that lives as long as this process and no longer: a memfd, named by its
    /proc/self/fd path (elsewhere, a temporary file removed when the interpreter exits)."""
    if key in _COPIES:
        return _COPIES[key]
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(name)  # never closed: its path must stay valid; freed at exit
        write_all(fd, data)
        path = Path(f"/proc/self/fd/{fd}")
    else:  # not Linux: a temporary file, removed by remove_copies (entry calls it before it exits)
        with tempfile.NamedTemporaryFile(prefix="mixtral-convert-", suffix=f"-{name}", delete=False) as f:
            f.write(data)
        path = Path(f.name)
        _FILES.append(path)
        atexit.register(remove_copies)  # for library use; entry's os._exit skips atexit
    _COPIES[key] = path
    return path
