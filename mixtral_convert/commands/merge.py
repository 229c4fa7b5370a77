"""merge: an Accessory layout (base or sparse, any N), or any other source, back to the torrent
layout or to the HF hub layout.

Each canonical tensor is assembled from the shards through the same plan that split uses, read
in the other direction, and streamed by the target format's writer (formats.registry.TARGETS:
`torrent` writes consolidated.00.pth and params.json, `hf` safetensors with q/k permuted and
config.json); the tokenizer is checked and carried beside (tokenizer.model and the HF tokenizer
files; `hf` builds those a tokenizer.model alone lacks), and a manifest lists every file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..formats import hf
from ..formats.checkpoint import dtype_name
from ..formats.registry import open_checkpoint, target
from ..io import reads
from ..io.atomic import atomic_output_dir, write_manifest
from ..io.progress import progress_bar
from ..tokenizer.files import carried, carry
from . import dryrun
from .common import MARGIN, Result, cast_to, check_tokenizer, output_base, use_tokenizer
from .dryrun import Planned


def merge(shards: Path, out: Optional[Path] = None, force: bool = False, quiet: bool = False,
          to: str = "torrent", max_shard_size: Optional[int] = None, tokenizer=None,
          dtype: Optional[str] = None, max_position_embeddings: Optional[int] = None, dry_run: bool = False):
    """Write the checkpoint at `shards` in the target layout `to` (a Result); with `dry_run`, only
    say what would be written (a dryrun.DryRun)."""
    tgt = target(to)
    since = reads.mark()
    ck = open_checkpoint(shards)
    sources = reads.opened_since(since)  # checked unchanged before the output is renamed into place
    use_tokenizer(ck, tokenizer)
    if to == "torrent" and ck.kind == "torrent":
        raise ConvertError(f"{ck.path}: already in the torrent layout; merge reads Accessory shard directories "
                           "(or other sources); for the HF layout pass --to hf")
    if ck.tokenizer is not None:
        check_tokenizer(ck)  # validated before anything is written, like split
    ck.dtype  # noqa: B018 - mixed dtypes are refused before anything is written
    if to == "hf":
        max_position_embeddings = hf.prepare(ck, max_position_embeddings)
    elif max_position_embeddings is not None:
        raise ConvertError(f"--max-position-embeddings is for --to hf (config.json's context length); the {to} "
                           "layout has no place for it: leave it out")
    cast_to(ck, dtype)
    base = output_base(ck)
    out = Path(out) if out is not None else base.parent / f"{base.name}{tgt.suffix}"
    total = ck.nbytes
    if dry_run:
        options = dict(max_shard_size=max_shard_size, max_position_embeddings=max_position_embeddings)
        planned = [Planned(*p) for p in tgt.plan(ck, **options)]
        if ck.tokenizer is not None:
            skip = {p.name for p in planned}
            planned += [Planned(name, p.stat().st_size, f"copied from {p}") for name, p in
                        carried(ck.tokenizer, skip=skip).items()]
        return dryrun.dry_run(f"merge --to {to}", ck, out, force, planned, _manifest_info(ck, to))
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + MARGIN, sources=sources) as tmp:
        with progress_bar(f"{to} from {ck.kind} N={ck.N}", total, quiet) as prog:
            files = tgt.write(ck, tmp, prog, max_shard_size=max_shard_size,
                              max_position_embeddings=max_position_embeddings)
        if ck.tokenizer is not None:
            files.update(carry(ck.tokenizer, tmp, skip=files))
        write_manifest(tmp, files, **_manifest_info(ck, to))
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)


def _manifest_info(ck, to: str) -> dict:
    return dict(layout=to, world_size=1, dtype=dtype_name(ck.dtype), source=dict(ck.source_info(), world_size=ck.N))
