"""verify OUT.gguf: a GGUF output (and its pieces) against its manifest, or against the source.

Without --source: every file the manifest beside it (`OUT.gguf.mixtral-convert-manifest.json`)
lists is present with its size and sha256. With --source: the metadata's hyper-parameters are the
source's, the vocabulary is the source's tokenizer.model's, and every tensor is the GGUF target's
own conversion of the source: F32/F16/BF16 byte for byte against the source cast the same way,
Q8_0 block for block against quantizing the source the same way (deterministic), streamed a block
at a time. A k-quant's values come from llama.cpp's quantizer: its names, shapes and metadata are
checked, its values are judged by `verify --forward`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConvertError
from ..formats.gguf import source as gguf_source
from ..formats.gguf import write as gguf_format
from ..formats.gguf.restack import is_per_expert
from ..formats.registry import open_checkpoint
from ..io import manifest
from ..io.beside import manifest_name
from ..io.progress import progress_bar
from .restack import verify_restacked
from .verify import Report, unchanged_while_compared

FILE_TYPES = {int(ft): name for name, (_, ft) in gguf_format.TYPES.items()}
KQUANT_TYPES = {int(ft): name for name, ft in gguf_format.KQUANTS.items()}


def manifest_path(path: Path) -> Path:
    """Where the manifest of a .gguf file (or of the model whose first piece it is) is."""
    m = gguf_format.SPLIT_RE.search(path.name)
    name = path.name[:m.start()] + ".gguf" if m else path.name
    return path.with_name(manifest_name(Path(name)))


def verify_gguf(path: Path, source: Optional[Path] = None, quiet: bool = False, base=None, adapter=None) -> Report:
    t0 = time.perf_counter()
    path = Path(path)
    if adapter is not None and source is None:  # refused before anything is hashed
        raise ConvertError("--adapter needs --source BASE: the model the adapter is merged into")
    if not path.is_file():
        raise ConvertError(f"{path}: no such GGUF file")
    if source is not None and is_per_expert(source):  # a restacked file against its per-expert source
        return verify_restacked(path, Path(source), quiet)
    rep = Report(str(path), "", layout="gguf", world_size=1)
    try:
        if source is None:
            rep.source = f"its manifest ({manifest_path(path).name})"
            _against_manifest(path, rep, quiet)
        else:
            src = open_checkpoint(source, base=base, adapter=adapter)
            rep.source = str(src.where)
            _against_source(path, src, rep, quiet)
            unchanged_while_compared(src.sources, rep)
    finally:
        rep.seconds = time.perf_counter() - t0
    return rep


def _against_manifest(path: Path, rep: Report, quiet: bool) -> None:
    mp = manifest_path(path)
    if not mp.is_file():
        raise ConvertError(f"{path}: no {mp.name} beside it and no --source; pass --source SRC to compare every "
                           "tensor with the checkpoint it was made from")
    try:
        m = json.loads(mp.read_text())
        files = m["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict) or not files:
        return rep.problems.append(f"{mp}: not a mixtral-convert manifest (unreadable or no 'files')")
    for name, e in files.items():
        p = path.parent / name
        if not p.is_file():
            return rep.problems.append(f"{p}: listed in {mp.name} but missing")
        if p.stat().st_size != e.get("size"):
            return rep.problems.append(f"{p}: {p.stat().st_size} bytes, the manifest records {e.get('size')}")
    rep.checks.append(f"{len(files)} file(s) listed in {mp.name}, all present with their recorded sizes")
    total = sum(e["size"] for e in files.values())
    with progress_bar("verify sha256", total, quiet) as prog:
        def advance(n):
            rep.bytes_compared += n
            prog.advance(n)
        digest = manifest.check_hashes(path.parent, {"files": files}, advance)
    if digest:
        rep.problems.extend(digest)
        return
    rep.checks.append(f"every file's sha256 equals the manifest's ({rep.bytes_compared} bytes hashed)")


def _against_source(path: Path, src, rep: Report, quiet: bool) -> None:
    bad = rep.problems.append
    paths = gguf_source.pieces_of(path)
    cfg, _, stored, readers = gguf_source.tensors_of(paths, dequantize=True)
    if cfg != src.cfg:
        diff = [k for k, f in src.cfg.__dataclass_fields__.items()
                if f.compare and getattr(cfg, k) != getattr(src.cfg, k)]
        return bad(f"{path}: its metadata gives '{diff[0]}' = {getattr(cfg, diff[0])}, the source has "
                   f"{getattr(src.cfg, diff[0])}")
    rep.checks.append(f"metadata: every hyper-parameter equals the source's ({len(paths)} file(s))")
    ft = int(gguf_source.field(readers[0], "general.file_type", path))
    if src.tokenizer is not None and not src.tokenizer.is_dir():
        want = gguf_format.tokenizer_metadata(gguf_format.sentencepiece_model(src), src.tokenizer)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            have = gguf_source.field(readers[0], key, path)
            if not np.array_equal(np.asarray(have, dtype=object if key.endswith("tokens") else np.float64),
                                  np.asarray(want[key].value, dtype=object if key.endswith("tokens") else np.float64)):
                return bad(f"{path}: {key} differs from the source's tokenizer.model")
        rep.checks.append("vocabulary: pieces, scores and types equal the source's tokenizer.model")
    dtype = FILE_TYPES.get(ft)
    expected = gguf_format.gguf_tensors(src.cfg, src.canonical, dtype or "float16", src.where)
    if set(stored) != {t.info.name for t in expected}:
        return bad(f"{path}: holds other tensors than the GGUF of this source would")
    for t in expected:
        shape = stored[t.info.name][1]
        if shape != t.info.shape:
            return bad(f"{path}: tensor '{t.info.name}' has shape {list(shape)}, the source implies "
                       f"{list(t.info.shape)}")
    if dtype is None:
        kq = KQUANT_TYPES.get(ft, f"file type {ft}")
        rep.checks.append(f"{kq}: tensor names and shapes are the source's; the values are llama.cpp's quantizer's "
                          "(judged by --forward)")
        return
    rep.checks.append(f"{len(expected)} tensors, names and shapes as the source implies")
    total = sum(t.info.nbytes for t in expected)
    with progress_bar("verify", total, quiet) as prog:
        for t in expected:
            have, _ = stored[t.info.name]
            if have.tensor_type != t.info.ggml_type:
                return bad(f"{path}: tensor '{t.info.name}' is {have.tensor_type.name}, expected "
                           f"{t.info.ggml_type.name}")
            data = np.ascontiguousarray(have.data).reshape(-1).view(np.uint8)
            pos = 0
            for _, buf, _ in gguf_format.tensor_blocks([t]):
                n = buf.nbytes
                if not np.array_equal(data[pos:pos + n], buf):
                    off = pos + int(np.flatnonzero(data[pos:pos + n] != buf)[0])
                    return bad(f"{path}: tensor '{t.info.name}' differs from the source at byte {off} of its data; "
                               "the file is corrupt or was written from another checkpoint")
                pos += n
                rep.bytes_compared += n
                prog.advance(n)
    how = "block for block against quantizing the source" if dtype == "q8_0" else "byte for byte against the source"
    rep.checks.append(f"every tensor equals the source's, {how} ({dtype}; {rep.bytes_compared} bytes)")
