"""merge: an Accessory layout (base or sparse, any N), or any other source, back to the torrent
layout or to the HF hub layout.

Each canonical tensor is assembled from the shards through the same plan that split uses,
read in the other direction, and streamed into consolidated.00.pth (`--to torrent`) with
params.json, or into safetensors files with q/k permuted to HF order, config.json and an
index when there are several (`--to hf`, see `hfhub`); tokenizer.model is copied beside.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

from .convert import Result, check_tokenizer, file_producer, output_base, stream, use_tokenizer
from .errors import ConvertError
from .outdir import atomic_output_dir, copy_file, json_bytes, write_manifest, write_small
from .progress import progress_bar
from .sources import TORRENT_FILE, open_checkpoint
from .torchfile import TensorSpec, fsync_all, write_checkpoint


TARGETS = ("torrent", "hf")


def merge(shards: Path, out: Optional[Path] = None, force: bool = False, quiet: bool = False,
          to: str = "torrent", max_shard_size: Optional[int] = None, tokenizer=None) -> Result:
    if to not in TARGETS:
        raise ConvertError(f"unknown merge target '{to}'; use one of {', '.join(TARGETS)}")
    ck = open_checkpoint(shards)
    use_tokenizer(ck, tokenizer)
    if to == "hf":
        return merge_to_hf(ck, out, force, quiet, max_shard_size)
    if ck.kind == "torrent":
        raise ConvertError(f"{ck.path}: already in the torrent layout; merge reads Accessory shard directories "
                           "(or other sources); for the HF layout pass --to hf")
    base = output_base(ck)
    out = Path(out) if out is not None else base.parent / f"{base.name}_merged"
    if ck.tokenizer is not None:
        check_tokenizer(ck)  # validated before anything is written, like split
    specs = [TensorSpec(name, t.shape, t.dtype) for name, t in ck.canonical.items()]
    total = sum(s.nbytes for s in specs)
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + (64 << 20)) as tmp:
        h = hashlib.sha256()
        with progress_bar(f"merge {ck.kind} N={ck.N}", total, quiet) as prog:
            with file_producer(specs, lambda s: ck.canonical[s.name], prog) as produce:
                size = write_checkpoint(tmp / TORRENT_FILE, specs, produce, hasher=h)
            fsync_all([tmp / TORRENT_FILE])
        files = {TORRENT_FILE: {"size": size, "sha256": h.hexdigest()}}
        files["params.json"] = write_small(tmp / "params.json", json_bytes(ck.cfg.to_params()))
        if ck.tokenizer is not None:
            files["tokenizer.model"] = copy_file(ck.tokenizer, tmp / "tokenizer.model")
        write_manifest(tmp, files, layout="torrent", world_size=1,
                       source={"path": ck.remote or str(ck.path.resolve()), "format": ck.kind, "world_size": ck.N,
                               "files": {f.name: f.stat().st_size for f in ck.files}})
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)


def merge_to_hf(ck, out: Optional[Path], force: bool, quiet: bool, max_shard_size: Optional[int]) -> Result:
    """The HF hub layout: config.json, safetensors (q/k permuted, split at max_shard_size with an
    index when several), tokenizer.model."""
    from .hfhub import DEFAULT_MAX_SHARD, dtype_name, write_hf_weights
    base = output_base(ck)
    out = Path(out) if out is not None else base.parent / f"{base.name}_hf"
    total = ck.nbytes
    dtypes = {t.dtype for t in ck.canonical.values()}
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + (64 << 20)) as tmp:
        with progress_bar(f"hf from {ck.kind} N={ck.N}", total, quiet) as prog:
            files = write_hf_weights(tmp, ck.cfg, ck.canonical, lambda lazy: stream(lazy, prog),
                                     max_shard_size or DEFAULT_MAX_SHARD)
        files["config.json"] = write_small(tmp / "config.json",
                                           json_bytes(ck.cfg.to_hf_config(dtype_name(dtypes.pop()))))
        if ck.tokenizer is not None:
            files["tokenizer.model"] = copy_file(ck.tokenizer, tmp / "tokenizer.model")
        write_manifest(tmp, files, layout="hf", world_size=1,
                       source={"path": ck.remote or str(ck.path.resolve()), "format": ck.kind, "world_size": ck.N,
                               "files": {f.name: f.stat().st_size for f in ck.files}})
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)
