"""split / split-sparse: any readable checkpoint -> an Accessory layout at world size N.

For each rank, for each of its shard tensors (from the plan), the tensor is assembled from
the source's canonical tensors a block at a time and streamed to disk; then config.json,
meta.json, tokenizer.model and a manifest are written, all inside a temporary directory that
is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConvertError
from .layouts import LLAMA_TYPE, Plan, shard_file_name
from .outdir import atomic_output_dir, copy_file, json_bytes, write_manifest, write_small
from .progress import Progress, progress_bar
from .sources import Checkpoint, open_checkpoint, tokenizer_pieces
from .torchfile import TensorSpec, tensor_bytes, write_checkpoint

DEFAULT_OUT = {"base": "converted", "sparse": "converted_sparse"}


@dataclass
class Result:
    out: Path
    files: list[str]
    nbytes: int
    seconds: float


def stream(lazy, progress: Progress):
    for block in lazy.blocks():
        buf = tensor_bytes(block)
        yield buf
        progress.advance(len(buf))


def writer_for(fmt: str):
    """The shard writer for --format (both take (path, specs, produce, hasher=))."""
    if fmt == "pth":
        return write_checkpoint
    if fmt == "safetensors":
        from .safetensorsfile import write_safetensors
        return write_safetensors
    raise ConvertError(f"unknown shard format '{fmt}'; use pth or safetensors")


def output_base(ck: Checkpoint) -> Path:
    """Where default outputs go: beside the source, or the working directory for a hub source
    (never inside the hub cache)."""
    if ck.remote is not None:
        from .hub import repo_name
        return Path.cwd() / repo_name(ck.remote)
    return ck.path


def use_tokenizer(ck: Checkpoint, tokenizer) -> None:
    """--tokenizer PATH (a tokenizer.model or a directory holding one) or hf://org/name."""
    if tokenizer is None:
        return
    from . import hub
    if hub.is_hub(tokenizer):
        ck.tokenizer = hub.resolve_tokenizer(tokenizer)
        return
    tok = Path(tokenizer)
    if tok.is_dir():
        tok = tok / "tokenizer.model"
    if not tok.is_file():
        raise ConvertError(f"{tok}: --tokenizer not found; pass a tokenizer.model file, its directory, or hf://org/name")
    ck.tokenizer = tok


def check_tokenizer(ck: Checkpoint) -> Path:
    if ck.tokenizer is None:
        raise ConvertError(f"{ck.remote or ck.path}: no tokenizer.model beside the checkpoint; Accessory needs one "
                           "in the output: pass --tokenizer PATH (or hf://org/name), or copy the release's "
                           "tokenizer.model there")
    pieces = tokenizer_pieces(ck.tokenizer)
    if pieces != ck.cfg.vocab_size:
        raise ConvertError(f"{ck.tokenizer}: has {pieces} pieces but the model's vocabulary is "
                           f"{ck.cfg.vocab_size} rows; Accessory would mis-size the embedding: use the "
                           "tokenizer.model released with this checkpoint")
    return ck.tokenizer


def split(src: Path, layout: str, N: int, out: Optional[Path] = None, force: bool = False,
          quiet: bool = False, fmt: str = "pth", tokenizer=None) -> Result:
    write = writer_for(fmt)
    ck = open_checkpoint(src)
    use_tokenizer(ck, tokenizer)
    plan = Plan(layout, ck.cfg, N, ck.dtypes)
    tokenizer = check_tokenizer(ck)
    out = Path(out) if out is not None else output_base(ck) / DEFAULT_OUT[layout]
    total = sum(st.nbytes for shard in plan.ranks for st in shard.values())
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + (64 << 20)) as tmp:
        files = {}
        with progress_bar(f"{layout} N={N}", total, quiet) as prog:
            for r in range(N):
                name = shard_file_name(r, N, fmt)
                specs = [TensorSpec(k, st.shape, st.dtype) for k, st in plan.ranks[r].items()]
                h = hashlib.sha256()
                size = write(tmp / name, specs,
                                        lambda s, r=r: stream(plan.shard_tensor(r, s.name, ck.canonical), prog),
                                        hasher=h)
                files[name] = {"size": size, "sha256": h.hexdigest(), "rank": r}
        files["config.json"] = write_small(tmp / "config.json", json_bytes(ck.cfg.to_accessory()))
        files["meta.json"] = write_small(tmp / "meta.json", json_bytes({"llama_type": LLAMA_TYPE[layout]}))
        files["tokenizer.model"] = copy_file(tokenizer, tmp / "tokenizer.model")
        write_manifest(tmp, files, layout=layout, llama_type=LLAMA_TYPE[layout], world_size=N,
                       shard_format=fmt,
                       source={"path": ck.remote or str(ck.path.resolve()), "format": ck.kind,
                               "files": {f.name: f.stat().st_size for f in ck.files}})
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)

