"""split / split-sparse: any readable checkpoint -> an Accessory layout at world size N.

For each rank, for each of its shard tensors (from the plan), the tensor is assembled from
the source's canonical tensors a block at a time and streamed to disk; then config.json,
meta.json, tokenizer.model and a manifest are written, all inside a temporary directory that
is renamed into place at the end.

Scale-out: with `ranks` (or under torchrun: process RANK of WORLD_SIZE takes ranks
RANK, RANK + WORLD_SIZE, ...) only those shards are written, each atomically, into a shared
output directory; the files equal a single-process run's byte for byte, and the process that
completes the set writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import ConvertError
from .lazy import Lazy, prefetched, readahead
from .layouts import LLAMA_TYPE, Plan, shard_file_name
from .outdir import MANIFEST, atomic_file, atomic_output_dir, copy_file, json_bytes, write_manifest, write_small
from .progress import Progress, human_bytes, progress_bar
from .sources import Checkpoint, open_checkpoint, tokenizer_pieces
from .torchfile import TensorSpec, fsync_all, tensor_bytes, write_checkpoint

DEFAULT_OUT = {"base": "converted", "sparse": "converted_sparse"}
_PART = ".mixtral-convert-part-{:05d}.json"


@dataclass
class Result:
    out: Path
    files: list[str]
    nbytes: int
    seconds: float


def stream(lazy, progress: Progress):
    """A lazy tensor's bytes, block by block, computed a little ahead on a second thread."""
    with closing(prefetched(lazy.blocks())) as blocks:  # on any exit, stop and join the producer now
        for block in blocks:
            buf = tensor_bytes(block)
            yield buf
            progress.advance(len(buf))


def _file_blocks(specs: Sequence[TensorSpec], lazy_of: Callable[[TensorSpec], Lazy]):
    lazies = [lazy_of(s) for s in specs]
    for i, s in enumerate(specs):
        for ahead in lazies[i:i + 2] if i == 0 else lazies[i + 1:i + 2]:
            ahead.warm()  # the disk reads the next tensor's source while this one is written
        for block in lazies[i].blocks():
            readahead(block)  # a view of a mapped file: the kernel starts reading it now
            yield s.name, tensor_bytes(block)  # strided blocks are gathered here, off the writer's thread


@contextmanager
def file_producer(specs: Sequence[TensorSpec], lazy_of: Callable[[TensorSpec], Lazy], progress: Progress):
    """`produce(spec)` for a writer that asks for `specs` in order: every tensor's blocks, computed
    ahead on one worker thread for the whole file, which is joined on any exit. (A worker per
    tensor showed up as ~1.5 s of thread starts in a py-spy profile of a 6 GB split; unprofiled,
    one per file saved a few tenths of a second.)"""
    with closing(prefetched(_file_blocks(specs, lazy_of))) as blocks:  # on any exit, the worker is joined
        def produce(spec: TensorSpec):
            left = spec.nbytes
            while left > 0:
                name, buf = next(blocks)
                if name != spec.name:
                    raise AssertionError(f"writer asked for {spec.name} but the blocks are {name}'s")
                left -= len(buf)
                yield buf
                progress.advance(len(buf))
        yield produce


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


def ranks_from_env(N: int) -> Optional[list[int]]:
    """Under torchrun (WORLD_SIZE > 1): this process's share of the N ranks."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return list(range(rank, N, world)) if world > 1 else None


def _write_rank(plan: Plan, r: int, ck: Checkpoint, path: Path, prog: Progress, fmt: str) -> dict:
    specs = [TensorSpec(k, st.shape, st.dtype) for k, st in plan.ranks[r].items()]
    h = hashlib.sha256()
    with file_producer(specs, lambda s: plan.shard_tensor(r, s.name, ck.canonical), prog) as produce:
        size = writer_for(fmt)(path, specs, produce, hasher=h)
    return {"size": size, "sha256": h.hexdigest(), "rank": r}


def _side_files(ck: Checkpoint, tokenizer: Path, layout: str, out: Path, atomic: bool) -> dict:
    files = {}
    for name, data in (("config.json", json_bytes(ck.cfg.to_accessory())),
                       ("meta.json", json_bytes({"llama_type": LLAMA_TYPE[layout]}))):
        if atomic:
            with atomic_file(out / name) as tmp:
                files[name] = write_small(tmp, data)
        else:
            files[name] = write_small(out / name, data)
    if atomic:
        with atomic_file(out / "tokenizer.model") as tmp:
            files["tokenizer.model"] = copy_file(tokenizer, tmp)
    else:
        files["tokenizer.model"] = copy_file(tokenizer, out / "tokenizer.model")
    return files


def _manifest_info(ck: Checkpoint, layout: str, N: int, fmt: str) -> dict:
    return dict(layout=layout, llama_type=LLAMA_TYPE[layout], world_size=N, shard_format=fmt,
                source={"path": ck.remote or str(ck.path.resolve()), "format": ck.kind,
                        "files": {f.name: f.stat().st_size for f in ck.files}})


def split(src: Path, layout: str, N: int, out: Optional[Path] = None, force: bool = False,
          quiet: bool = False, ranks: Optional[Sequence[int]] = None, fmt: str = "pth",
          tokenizer=None) -> Result:
    writer_for(fmt)  # an unknown format fails before anything is read
    ck = open_checkpoint(src)
    use_tokenizer(ck, tokenizer)
    plan = Plan(layout, ck.cfg, N, ck.dtypes)
    tokenizer = check_tokenizer(ck)
    out = Path(out) if out is not None else output_base(ck) / DEFAULT_OUT[layout]
    if ranks is None:
        ranks = ranks_from_env(N)
    if ranks is not None:
        return _split_ranks(ck, plan, tokenizer, out, sorted(set(ranks)), force, quiet, fmt)
    total = sum(st.nbytes for shard in plan.ranks for st in shard.values())
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + (64 << 20)) as tmp:
        files = {}
        with progress_bar(f"{layout} N={N}", total, quiet) as prog:
            for r in range(N):
                name = shard_file_name(r, N, fmt)
                files[name] = _write_rank(plan, r, ck, tmp / name, prog, fmt)
            fsync_all(tmp / n for n in files)
        files.update(_side_files(ck, tokenizer, layout, tmp, atomic=False))
        write_manifest(tmp, files, **_manifest_info(ck, layout, N, fmt))
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)


def _split_ranks(ck: Checkpoint, plan: Plan, tokenizer: Path, out: Path, ranks: list[int], force: bool,
                 quiet: bool, fmt: str) -> Result:
    """Cooperative mode: write only `ranks` into a shared `out`, each file atomically."""
    N, layout = plan.N, plan.layout
    bad = [r for r in ranks if not 0 <= r < N]
    if bad or not ranks:
        raise ConvertError(f"--ranks: {bad[0] if bad else 'none'} is not a rank of world size {N} "
                           f"(use numbers 0..{N - 1})")
    names = {r: shard_file_name(r, N, fmt) for r in ranks}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{out}: cannot create the output directory ({e.strerror})") from None
    existing = [n for n in names.values() if (out / n).exists()]
    if existing and not force:
        raise ConvertError(f"{out / existing[0]}: already exists; pass --force to replace it")
    total = sum(st.nbytes for r in ranks for st in plan.ranks[r].values())
    free = shutil.disk_usage(out).free
    if free < total:
        raise ConvertError(f"{out}: not enough free space: {human_bytes(total)} needed for ranks "
                           f"{','.join(map(str, ranks))}, {human_bytes(free)} free")
    t0 = time.perf_counter()
    with progress_bar(f"{layout} N={N} ranks {','.join(map(str, ranks))}", total, quiet) as prog:
        for r in ranks:
            with atomic_file(out / names[r]) as tmp:
                entry = _write_rank(plan, r, ck, tmp, prog, fmt)
                fsync_all([tmp])
            with atomic_file(out / _PART.format(r)) as tmp:
                write_small(tmp, json_bytes({names[r]: entry}))
    side = _side_files(ck, tokenizer, layout, out, atomic=True)
    _combine_manifest(out, ck, layout, N, side, fmt)
    return Result(out, sorted(names.values()) + sorted(side), total, time.perf_counter() - t0)


def _combine_manifest(out: Path, ck: Checkpoint, layout: str, N: int, side: dict, fmt: str) -> None:
    """Once every rank's part is present (whichever process gets there), write the manifest."""
    parts = [out / _PART.format(r) for r in range(N)]
    if not all(p.exists() for p in parts):
        return
    files = dict(side)
    for p in parts:
        files.update(json.loads(p.read_text()))
    with atomic_file(out / MANIFEST) as tmp:
        write_manifest(tmp.parent, files, **_manifest_info(ck, layout, N, fmt), _name=tmp.name)
    for p in parts:
        p.unlink(missing_ok=True)
