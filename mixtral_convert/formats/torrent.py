"""The torrent release and Mistral's consolidated files: `params.json` beside one or several
torch zip files of torrent-named tensors (docs/formats.md, "Torrent release" and "Mistral
fused files").

Readers: `consolidated.00.pth` (the torrent); `consolidated.NN.pt` (Mistral's hub repositories,
one file or several split by key, possibly with fused `block_sparse_moe` tensors, which are
unfused into views). Target: `merge --to torrent` writes `consolidated.00.pth` and params.json.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from ..encodings.torchzip import checkpoint_size, read_tensors, write_checkpoint
from ..errors import ConvertError
from ..io.lazy import Lazy, OnDisk, Stored, TensorSpec
from ..io.prefetch import file_producer
from ..io.small import fsync_all, json_bytes, write_small
from ..model.config import ModelConfig
from .checkpoint import Checkpoint, Reader, Target, TargetPlan, TokenizerRef, check_tensors, find_tokenizer
from .fused import is_fused, unfuse

TORRENT_FILE = "consolidated.00.pth"
PARAMS = "params.json"
CONSOLIDATED_RE = re.compile(r"consolidated\.(\d+)\.pth?\Z")  # the torrent's and Mistral's files
SPLIT_PIECE = TORRENT_FILE + "-split"


def open_consolidated(path: Path, names: list[str]) -> Checkpoint:
    """The union of the consolidated files' dicts, with fused tensors unfused into views."""
    params = path / PARAMS
    if not params.is_file():
        raise ConvertError(f"{params}: not found; the release ships params.json beside {names[0]}")
    cfg = ModelConfig.from_json_file(params)
    files = [path / n for n in names]
    tensors: dict = {}
    for f in files:
        for k, v in read_tensors(f).items():
            if k in tensors:
                raise ConvertError(f"{f}: tensor '{k}' is also in another consolidated file; "
                                   "remove the stale copy")
            tensors[k] = v
    where = str(files[0]) if len(files) == 1 else f"{path} ({', '.join(names)})"
    fused = is_fused(tensors)
    canonical = canonical_of(cfg, tensors, where)
    kind, label = ("fused", "Mistral fused block_sparse_moe layout") if fused else ("torrent", "torrent layout")
    return Checkpoint(path, kind, cfg, files, TokenizerRef(find_tokenizer(path)), canonical, label=label)


def canonical_of(cfg: ModelConfig, tensors: dict, where: str) -> dict[str, Lazy]:
    """Torrent-named tensors (fused block_sparse_moe ones unfused into views) as the canonical lazy
    tensors, checked against the config: what every params.json format's reader ends with."""
    if is_fused(tensors):
        tensors = unfuse(cfg, tensors, where)
    check_tensors(cfg, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, where)
    return {k: tensors[k].named(k) if isinstance(tensors[k], OnDisk) else Stored(tensors[k], k)
            for k in cfg.canonical_shapes()}


def _consolidated_names(names: set[str]) -> list[str]:
    return sorted((n for n in names if CONSOLIDATED_RE.match(n)), key=lambda n: int(CONSOLIDATED_RE.match(n).group(1)))


TORRENT = Reader(
    "torrent", f"{TORRENT_FILE} with {PARAMS}",
    claims=lambda path, names: TORRENT_FILE in names,
    open=lambda path, names: open_consolidated(path, [TORRENT_FILE]))

CONSOLIDATED = Reader(
    "consolidated", f"consolidated.NN.pt with {PARAMS}",
    claims=lambda path, names: bool(_consolidated_names(names)),
    open=lambda path, names: open_consolidated(path, _consolidated_names(names)))


def hub_weights(d: Path) -> list[str]:
    """The torrent's, Mistral's consolidated or mistral-inference's weight files, when a hub repository's
    small files (in `d`) hold a params.json."""
    return ["consolidated.*.pt", "consolidated.*.pth", "consolidated.safetensors"] if (d / PARAMS).is_file() else []


def hint(path: Path, names: set[str]) -> Optional[str]:
    """What to do with a directory that holds only the torrent's byte pieces."""
    if any(n.startswith(SPLIT_PIECE) for n in names):
        return (f"{path}: holds {SPLIT_PIECE}K pieces but no {TORRENT_FILE}; join them first: "
                f"mixtral-convert concat {path}")
    return None


def plan(ck: Checkpoint) -> TargetPlan:
    """consolidated.00.pth (every canonical tensor, streamed) and params.json."""
    specs = [TensorSpec(name, t.shape, t.dtype) for name, t in ck.canonical.items()]
    params = json_bytes(ck.cfg.to_params())

    def write(tmp: Path, progress) -> dict[str, dict]:
        h = hashlib.sha256()
        with file_producer(specs, lambda s: ck.canonical[s.name], progress) as produce:
            size = write_checkpoint(tmp / TORRENT_FILE, specs, produce, hasher=h)
        fsync_all([tmp / TORRENT_FILE])
        return {TORRENT_FILE: {"size": size, "sha256": h.hexdigest()}, PARAMS: write_small(tmp / PARAMS, params)}

    return TargetPlan([(TORRENT_FILE, checkpoint_size(specs), f"{len(specs)} tensors"),
                       (PARAMS, len(params), "the model's hyper-parameters")], write)


def prepare(ck: Checkpoint, options: dict) -> dict:
    """The torrent's params.json has no key for RoPE scaling: a scaled model is refused."""
    ck.cfg.refuse_scaling(f"{ck.path}: --to torrent")
    return options


TARGET = Target("torrent", "_merged", plan, prepare=prepare, same_kinds=("torrent",),
                help="the torrent release's layout: consolidated.00.pth and params.json")
