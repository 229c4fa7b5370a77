"""Opening a checkpoint: detect its format, read its config, validate its tensors, and expose
every canonical tensor lazily.

Formats: the torrent release (`consolidated.00.pth` + `params.json`, FORMATS.md section 1);
Mistral's fused `block_sparse_moe` files (`consolidated.NN.pt`, possibly several split by key,
section 2, see `fused`); an HF hub directory (`config.json` + safetensors, q/k permuted,
section 3, see `hfhub`); `hf://org/name[@rev]` (resolved through huggingface_hub, see `hub`);
and LLaMA2-Accessory's base and sparse layouts (`consolidated.RR-of-NN.model.pth` or
`.model.safetensors` + `config.json` + `meta.json`, sections 4 and 5), whose canonical tensors
are assembled through the partition table. Nothing here reads tensor data; shapes and dtypes
come from the pickled descriptions or the safetensors headers.
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

SHARD_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.(pth|safetensors)\Z")
TORRENT_FILE = "consolidated.00.pth"
CONSOLIDATED_RE = re.compile(r"consolidated\.(\d+)\.pth?\Z")  # torrent and Mistral's fused files
KIND_NAMES = {"torrent": "torrent layout", "fused": "Mistral fused block_sparse_moe layout",
              "hf": "HF hub layout (safetensors, q/k permuted)"}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.pt (torch zip) or .safetensors file's tensors, lazily mapped."""
    if Path(path).name.endswith(".safetensors"):
        from .safetensorsfile import load_lazy as load_st
        return load_st(path)
    return load_lazy(path)


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
    remote: Optional[str] = None  # hf://org/name[@rev] when resolved from the hub

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.canonical.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.canonical.values())

    def describe(self) -> str:
        if self.kind == "torrent":
            return "torrent layout (consolidated.00.pth)"
        if self.kind in KIND_NAMES:
            return f"{KIND_NAMES[self.kind]} ({', '.join(f.name for f in self.files[:3])}" + (
                f", ... {len(self.files)} files)" if len(self.files) > 3 else ")")
        return f"Accessory {self.kind} layout, {self.N} rank{'s' * (self.N > 1)}"


def open_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory (or one of its files), or hf://org/name[@rev], of any supported format."""
    from . import hub
    if hub.is_hub(path):
        ck = open_checkpoint(hub.resolve_checkpoint(path))
        ck.remote = str(path).replace("hf:/", "hf://", 1) if not str(path).startswith("hf://") else str(path)
        return ck
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_file():
        if SHARD_RE.match(path.name) or path.name.endswith((".pth", ".pt", ".safetensors")):
            path = path.parent
        else:
            raise ConvertError(f"{path}: expected a checkpoint directory or a .pth/.pt/.safetensors file")
    names = {p.name for p in path.iterdir()}
    shards = sorted(n for n in names if SHARD_RE.match(n))
    if shards and TORRENT_FILE in names:
        raise ConvertError(f"{path}: holds both {TORRENT_FILE} and *-of-NN.model.pth shards (multiple "
                           "formats, which Accessory rejects); move one set elsewhere")
    if shards:
        return _open_accessory(path, shards)
    if TORRENT_FILE in names:
        return _open_torrent(path)
    if "config.json" in names and ("model.safetensors" in names or "model.safetensors.index.json" in names):
        from .hfhub import open_hf
        return open_hf(path, lambda kind, cfg, files, canonical: Checkpoint(
            path, kind, cfg, files, _tokenizer(path), 1, canonical), check_tensors)
    consolidated = sorted((n for n in names if CONSOLIDATED_RE.match(n)), key=lambda n: int(CONSOLIDATED_RE.match(n).group(1)))
    if consolidated:
        return _open_torrent(path, consolidated)
    if any(n.startswith(TORRENT_FILE + "-split") for n in names):
        raise ConvertError(f"{path}: holds {TORRENT_FILE}-splitK pieces but no {TORRENT_FILE}; "
                           f"join them first: mixtral-convert concat {path}")
    raise ConvertError(f"{path}: no checkpoint found (expected {TORRENT_FILE} or consolidated.NN.pt with "
                       "params.json, config.json with model.safetensors[.index.json] (HF hub), or "
                       "consolidated.RR-of-NN.model.pth shards with config.json and meta.json)")


def _tokenizer(path: Path) -> Optional[Path]:
    tok = path / "tokenizer.model"
    return tok if tok.is_file() else None


def _open_torrent(path: Path, names: Optional[list[str]] = None) -> Checkpoint:
    """consolidated.00.pth (torrent), or Mistral's consolidated.NN.pt files split by key: the
    union of their dicts, with fused block_sparse_moe tensors unfused into views."""
    from .fused import is_fused, unfuse
    names = names or [TORRENT_FILE]
    params = path / "params.json"
    if not params.is_file():
        raise ConvertError(f"{params}: not found; the release ships params.json beside {names[0]}")
    cfg = ModelConfig.from_json_file(params)
    files = [path / n for n in names]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_lazy(f).items():
            if k in tensors:
                raise ConvertError(f"{f}: tensor '{k}' is also in another consolidated file; "
                                   "remove the stale copy")
            tensors[k] = v
    where = str(files[0]) if len(files) == 1 else f"{path} ({', '.join(names)})"
    fused = is_fused(tensors)
    if fused:
        tensors = unfuse(cfg, tensors, where)
    check_tensors(cfg, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, where)
    canonical = {k: Stored(tensors[k], k) for k in cfg.canonical_shapes()}
    return Checkpoint(path, "fused" if fused else "torrent", cfg, files, _tokenizer(path), 1, canonical)


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
    exts = {SHARD_RE.match(n).group(3) for n in shards}
    if len(exts) != 1:
        raise ConvertError(f"{path}: holds both .model.pth and .model.safetensors shards; move one set elsewhere")
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
    loaded = [load_tensors(f) for f in files]
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
