"""merge: an Accessory layout (base or sparse, any N) back to the torrent layout.

Each canonical tensor is assembled from the shards through the same plan that split uses,
read in the other direction, and streamed into consolidated.00.pth; params.json and
tokenizer.model are written beside it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

from .convert import Result, check_tokenizer, stream
from .errors import ConvertError
from .outdir import atomic_output_dir, copy_file, json_bytes, write_manifest, write_small
from .progress import progress_bar
from .sources import TORRENT_FILE, open_checkpoint
from .torchfile import TensorSpec, write_checkpoint


def merge(shards: Path, out: Optional[Path] = None, force: bool = False, quiet: bool = False) -> Result:
    ck = open_checkpoint(shards)
    if ck.kind == "torrent":
        raise ConvertError(f"{ck.path}: already in the torrent layout; merge reads Accessory shard directories")
    if ck.tokenizer is not None:
        check_tokenizer(ck)  # validated before anything is written, like split
    out = Path(out) if out is not None else ck.path.parent / f"{ck.path.name}_merged"
    specs = [TensorSpec(name, t.shape, t.dtype) for name, t in ck.canonical.items()]
    total = sum(s.nbytes for s in specs)
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + (64 << 20)) as tmp:
        h = hashlib.sha256()
        with progress_bar(f"merge {ck.kind} N={ck.N}", total, quiet) as prog:
            size = write_checkpoint(tmp / TORRENT_FILE, specs, lambda s: stream(ck.canonical[s.name], prog),
                                    hasher=h)
        files = {TORRENT_FILE: {"size": size, "sha256": h.hexdigest()}}
        files["params.json"] = write_small(tmp / "params.json", json_bytes(ck.cfg.to_params()))
        if ck.tokenizer is not None:
            files["tokenizer.model"] = copy_file(ck.tokenizer, tmp / "tokenizer.model")
        write_manifest(tmp, files, layout="torrent", world_size=1,
                       source={"path": str(ck.path.resolve()), "format": ck.kind, "world_size": ck.N,
                               "files": {f.name: f.stat().st_size for f in ck.files}})
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0)
