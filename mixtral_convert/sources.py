"""Opening a checkpoint: detect its format, read its config, validate its tensors, and expose
every canonical tensor lazily.

Formats: the torrent release (`consolidated.00.pth` + `params.json`, FORMATS.md section 1) and
LLaMA2-Accessory's base and sparse layouts (`consolidated.RR-of-NN.model.pth` + `config.json` +
`meta.json`, sections 4 and 5), whose canonical tensors are assembled through the partition
table. Nothing here reads tensor data; shapes and dtypes come from the pickled descriptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, read_json
from .errors import ConvertError
from .layouts import LAYOUT_OF_LLAMA_TYPE, Plan
from .lazy import Lazy, Stored
from .torchfile import load_lazy

SHARD_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.pth\Z")
TORRENT_FILE = "consolidated.00.pth"


@dataclass
class Checkpoint:
    path: Path  # the directory
    kind: str  # "torrent", "base" or "sparse"
    cfg: ModelConfig
    files: list[Path]
    tokenizer: Optional[Path]
    N: int = 1
    canonical: dict[str, Lazy] = field(default_factory=dict)  # canonical name -> lazy tensor
    shards: list[dict[str, Lazy]] = field(default_factory=list)  # Accessory layouts: per rank
    plan: Optional[Plan] = None  # Accessory layouts: the plan their shards follow

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.canonical.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.canonical.values())

    def describe(self) -> str:
        if self.kind == "torrent":
            return "torrent layout (consolidated.00.pth)"
        return f"Accessory {self.kind} layout, {self.N} rank{'s' * (self.N > 1)}"


def open_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory (or its single .pth file) of any supported format."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_file():
        if SHARD_RE.match(path.name) or path.name.endswith(".pth"):
            path = path.parent
        else:
            raise ConvertError(f"{path}: expected a checkpoint directory or a .pth file")
    names = {p.name for p in path.iterdir()}
    shards = sorted(n for n in names if SHARD_RE.match(n))
    if shards and TORRENT_FILE in names:
        raise ConvertError(f"{path}: holds both {TORRENT_FILE} and *-of-NN.model.pth shards (multiple "
                           "formats, which Accessory rejects); move one set elsewhere")
    if shards:
        return _open_accessory(path, shards)
    if TORRENT_FILE in names:
        return _open_torrent(path)
    if any(n.startswith(TORRENT_FILE + "-split") for n in names):
        raise ConvertError(f"{path}: holds {TORRENT_FILE}-splitK pieces but no {TORRENT_FILE}; "
                           f"join them first: mixtral-convert concat {path}")
    raise ConvertError(f"{path}: no checkpoint found (expected {TORRENT_FILE} with params.json, or "
                       "consolidated.RR-of-NN.model.pth shards with config.json and meta.json)")


def _tokenizer(path: Path) -> Optional[Path]:
    tok = path / "tokenizer.model"
    return tok if tok.is_file() else None


def _open_torrent(path: Path) -> Checkpoint:
    params = path / "params.json"
    if not params.is_file():
        raise ConvertError(f"{params}: not found; the torrent release ships params.json beside {TORRENT_FILE}")
    cfg = ModelConfig.from_json_file(params)
    f = path / TORRENT_FILE
    tensors = load_lazy(f)
    check_tensors(cfg, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, str(f))
    canonical = {k: Stored(tensors[k], k) for k in cfg.canonical_shapes()}
    return Checkpoint(path, "torrent", cfg, [f], _tokenizer(path), 1, canonical)


def check_tensors(cfg: ModelConfig, found: dict[str, tuple], where: str) -> None:
    """Canonical names, shapes and one dtype, exactly as the config implies."""
    expected = cfg.canonical_shapes()
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        raise ConvertError(f"{where}: {len(missing)} tensor(s) the config implies are missing, first "
                           f"'{missing[0]}'; the file does not match params.json (wrong n_layers or num_experts?)")
    if extra:
        raise ConvertError(f"{where}: {len(extra)} unexpected tensor(s), first '{extra[0]}'; "
                           "the file does not match params.json")
    for k, shape in expected.items():
        if tuple(found[k][0]) != shape:
            raise ConvertError(f"{where}: tensor '{k}' has shape {list(found[k][0])}, params.json implies "
                               f"{list(shape)}; the checkpoint and params.json disagree")
    dtypes = {}
    for k, (_, dt) in found.items():
        dtypes.setdefault(dt, k)
    if len(dtypes) > 1:
        desc = ", ".join(f"{str(dt).replace('torch.', '')} (e.g. '{k}')" for dt, k in dtypes.items())
        raise ConvertError(f"{where}: mixed dtypes {desc}; convert the checkpoint to a single dtype first")


def _open_accessory(path: Path, shards: list[str]) -> Checkpoint:
    meta = read_json(path / "meta.json")
    llama_type = meta.get("llama_type") if isinstance(meta, dict) else None
    if llama_type not in LAYOUT_OF_LLAMA_TYPE:
        raise ConvertError(f"{path / 'meta.json'}: llama_type {llama_type!r} is not a Mixtral layout "
                           f"(expected one of {', '.join(LAYOUT_OF_LLAMA_TYPE)})")
    layout = LAYOUT_OF_LLAMA_TYPE[llama_type]
    cfg = ModelConfig.from_json_file(path / "config.json")
    counts = {int(SHARD_RE.match(n).group(2)) for n in shards}
    if len(counts) != 1:
        raise ConvertError(f"{path}: shards of different world sizes ({', '.join(map(str, sorted(counts)))}); "
                           "remove the stale set")
    N = counts.pop()
    ranks = sorted(int(SHARD_RE.match(n).group(1)) for n in shards)
    if ranks != list(range(N)):
        missing = sorted(set(range(N)) - set(ranks))
        what = f"rank file(s) {', '.join(f'{r:02d}' for r in missing)} missing" if missing else "unexpected rank files"
        raise ConvertError(f"{path}: {what} for world size {N}")
    files = [path / n for n in shards]
    loaded = [load_lazy(f) for f in files]
    plan = Plan(layout, cfg, N, {k: torch.bfloat16 for k in cfg.canonical_shapes()})
    dtypes = {}
    for name in cfg.canonical_shapes():
        p = plan.by_source[name][0]
        if p.key not in loaded[p.rank]:
            raise ConvertError(f"{files[p.rank]}: tensor '{p.key}' missing (the {layout} layout puts "
                               f"'{name}' there); the shard is incomplete or of another layout")
        dtypes[name] = loaded[p.rank][p.key].dtype
    plan = Plan(layout, cfg, N, dtypes)
    problems = structure_problems(plan, files, loaded)
    if problems:
        raise ConvertError(problems[0])
    shard_lazy = [{k: Stored(t, k) for k, t in sd.items()} for sd in loaded]
    canonical = {name: plan.canonical_tensor(name, shard_lazy) for name in cfg.canonical_shapes()}
    return Checkpoint(path, layout, cfg, files, _tokenizer(path), N, canonical, shard_lazy, plan)


def structure_problems(plan: Plan, files: list[Path], loaded: list[dict[str, torch.Tensor]]) -> list[str]:
    """Each shard's key set, shapes and dtypes against the plan; one line per problem."""
    out = []
    for r, (f, sd) in enumerate(zip(files, loaded)):
        want = plan.ranks[r]
        for k, st in want.items():
            if k not in sd:
                out.append(f"{f.name} (rank {r}): tensor '{k}' missing")
            elif tuple(sd[k].shape) != st.shape:
                out.append(f"{f.name} (rank {r}): tensor '{k}' has shape {list(sd[k].shape)}, "
                           f"the {plan.layout} layout at N={plan.N} demands {list(st.shape)}")
            elif sd[k].dtype != st.dtype:
                out.append(f"{f.name} (rank {r}): tensor '{k}' is {sd[k].dtype}, expected {st.dtype}")
        for k in sd:
            if k not in want:
                out.append(f"{f.name} (rank {r}): unexpected tensor '{k}' (not in the {plan.layout} layout)")
    return out


def tokenizer_pieces(path: Path) -> int:
    import sentencepiece as spm
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).strip()[:120]}); use the "
                           "tokenizer.model released with this checkpoint") from None
