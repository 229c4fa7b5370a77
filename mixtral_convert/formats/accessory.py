"""LLaMA2-Accessory's base and sparse layouts (docs/formats.md, "Accessory layouts"): the one
place that knows the names of an Accessory checkpoint directory's files.

A directory holds `consolidated.RR-of-NN.model.pth` (or `.model.safetensors`) for every rank
RR of N, `config.json` (the model's ModelArgs), `meta.json` ({"llama_type": "mixtral"} for the
base layout, "mixtral_sparse" for the sparse one) and `tokenizer.model`, or, as Accessory also
accepts, `tokenizer.json` with `tokenizer_config.json` (its tokenizer probe falls back to them);
outputs carry those HF files beside tokenizer.model too when the source has them. What each shard holds
is the partition table's business (model.layouts); this module reads and writes the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..encodings.safetensors import file_size as safetensors_size
from ..encodings.safetensors import write_safetensors
from ..encodings.torchzip import checkpoint_size, write_checkpoint
from ..errors import ConvertError
from ..io.atomic import atomic_file
from ..io.lazy import Lazy
from ..io.small import json_bytes, write_small
from ..model.config import ModelConfig, read_json
from ..model.layouts import Plan
from ..tokenizer.files import carry
from .checkpoint import Checkpoint, Reader, Sharded, TokenizerRef, check_tensors, find_tokenizer, read_tensors

META = "meta.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SHARD_RE = re.compile(r"consolidated\.(\d+)-of-(\d+)\.model\.(pth|safetensors)\Z")
SHARD_GLOB = "consolidated.*-of-*.model.{ext}"  # every rank's file of one extension
SHARD_WRITERS = {"pth": write_checkpoint, "safetensors": write_safetensors}  # both (path, specs, produce, hasher=)
LLAMA_TYPE = {"base": "mixtral", "sparse": "mixtral_sparse", "peft": "mixtral_peft"}
# config.json keys of mixtral_peft beyond ModelArgs' (docs/formats.md, "Accessory PEFT saves"), as written
# for a merged model with biases
PEFT_CONFIG = {"lora_rank": -1, "bias_tuning": True, "norm_tuning": False}
LAYOUT_OF_LLAMA_TYPE = {v: k for k, v in LLAMA_TYPE.items()}


def shard_file_name(r: int, N: int, ext: str = "pth") -> str:
    return f"consolidated.{r:02d}-of-{N:02d}.model.{ext}"


def shard_writer(fmt: str):
    if fmt not in SHARD_WRITERS:
        raise ConvertError(f"unknown shard format '{fmt}'; use {' or '.join(SHARD_WRITERS)}")
    return SHARD_WRITERS[fmt]


# ----------------------------------------------------------------------------- the directory
def read_layout(path: Path) -> str:
    """'base' or 'sparse', from meta.json."""
    meta = read_json(path / META)
    llama_type = meta.get("llama_type") if isinstance(meta, dict) else None
    if llama_type not in LAYOUT_OF_LLAMA_TYPE:
        raise ConvertError(f"{path / META}: llama_type {llama_type!r} is not a Mixtral layout "
                           f"(expected one of {', '.join(LAYOUT_OF_LLAMA_TYPE)})")
    return LAYOUT_OF_LLAMA_TYPE[llama_type]


@dataclass
class Listing:
    """An Accessory directory as its file names and JSON files describe it (no shard opened)."""

    path: Path
    layout: str
    cfg: ModelConfig
    N: int
    ext: str
    files: list[Path]
    tokenizer: Optional[Path]


def list_shards(path: Path, names: Optional[set[str]] = None) -> tuple[int, str, list[Path]]:
    """(N, extension, one file per rank in rank order); ConvertError when the set is not whole."""
    names = names if names is not None else {p.name for p in path.iterdir()}
    found = sorted(n for n in names if SHARD_RE.match(n))
    if not found:
        raise ConvertError(f"{path}: no consolidated.RR-of-NN.model.pth shard files")
    exts = {SHARD_RE.match(n).group(3) for n in found}
    if len(exts) != 1:
        raise ConvertError(f"{path}: holds both .model.pth and .model.safetensors shards; move one set elsewhere")
    counts = {int(SHARD_RE.match(n).group(2)) for n in found}
    if len(counts) != 1:
        raise ConvertError(f"{path}: shards of different world sizes ({', '.join(map(str, sorted(counts)))}); "
                           "remove the stale set")
    N, ext = counts.pop(), exts.pop()
    ranks = sorted(int(SHARD_RE.match(n).group(1)) for n in found)
    if ranks != list(range(N)):
        missing = sorted(set(range(N)) - set(ranks))
        if missing:
            raise ConvertError(f"{path}: rank file(s) {', '.join(f'{r:02d}' for r in missing)} missing for world "
                               f"size {N} (first: {shard_file_name(missing[0], N, ext)})")
        raise ConvertError(f"{path}: unexpected rank files for world size {N}")
    return N, ext, [path / shard_file_name(r, N, ext) for r in range(N)]


def listing(path: Path, names: Optional[set[str]] = None) -> Listing:
    """The layout, config, N and files of an Accessory directory, from names and JSON only."""
    N, ext, files = list_shards(path, names)
    layout = read_layout(path)
    cfg = ModelConfig.from_json_file(path / CONFIG)
    return Listing(path, layout, cfg, N, ext, files, find_tokenizer(path))


# ----------------------------------------------------------------------------- the shards
def shard_dtypes(layout: str, cfg: ModelConfig, N: int, shards: list[dict[str, Lazy]]) -> dict[str, torch.dtype]:
    """Each canonical tensor's dtype as the shards hold it (where absent: bfloat16, and the
    structure check then names the missing tensor)."""
    names = cfg.canonical_shapes(optional=layout == "peft")  # peft: the biases, where the shards hold them
    probe = Plan(layout, cfg, N, {k: torch.bfloat16 for k in names})
    out = {}
    required = cfg.canonical_shapes()
    for name in names:
        p = probe.by_source[name][0]
        t = shards[p.rank].get(p.key)
        if t is not None or name in required:
            out[name] = t.dtype if t is not None else torch.bfloat16
    return out


def structure_problems(plan: Plan, files: list[Path], shards: list[dict[str, Lazy]],
                       ranks: Optional[list[int]] = None) -> list[str]:
    """Each shard's key set, shapes and dtypes against the plan; one line per problem. `ranks`:
    which ranks `files`/`shards` are (default: all, in order)."""
    out = []
    for r, f, sd in zip(ranks if ranks is not None else range(plan.N), files, shards, strict=True):
        want = plan.ranks[r]
        for k, st in want.items():
            if k not in sd:
                out.append(f"{f.name} (rank {r}): tensor '{k}' missing (the {plan.layout} layout puts it there)")
            elif tuple(sd[k].shape) != st.shape:
                out.append(f"{f.name} (rank {r}): tensor '{k}' has shape {list(sd[k].shape)}, "
                           f"the {plan.layout} layout at N={plan.N} demands {list(st.shape)}")
            elif sd[k].dtype != st.dtype:
                out.append(f"{f.name} (rank {r}): tensor '{k}' is {sd[k].dtype}, expected {st.dtype}")
        for k in sd:
            if k not in want:
                out.append(f"{f.name} (rank {r}): unexpected tensor '{k}' (not in the {plan.layout} layout)")
    return out


def open_accessory(path: Path, names: Optional[set[str]] = None) -> Checkpoint:
    """Every shard opened lazily and checked against the plan; canonical tensors assembled
    through it."""
    ls = listing(path, names)
    shards = [read_tensors(f) for f in ls.files]
    plan = Plan(ls.layout, ls.cfg, ls.N, shard_dtypes(ls.layout, ls.cfg, ls.N, shards))
    problems = structure_problems(plan, ls.files, shards)
    if problems:
        raise ConvertError(problems[0])
    canonical = {name: plan.canonical_tensor(name, shards) for name in plan.shapes}
    check_tensors(ls.cfg, {k: (t.shape, t.dtype) for k, t in canonical.items()}, str(path))
    return Checkpoint(path, ls.layout, ls.cfg, ls.files, TokenizerRef(find_tokenizer(path)), canonical,
                      label=f"Accessory {ls.layout} layout", sharded=Sharded(plan, shards))


def open_rank(path: Path, r: int) -> tuple[Plan, dict[str, Lazy], Optional[Path]]:
    """Rank r's plan and only its own shard (opened lazily), checked against what the plan puts
    there; what one process of a distributed run needs."""
    ls = listing(path)
    f = ls.files[r]
    sd = read_tensors(f)
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) != 1:
        raise ConvertError(f"{f}: tensors of several dtypes {sorted(map(str, dtypes))}; expected one")
    dt = dtypes.pop()
    # a peft layout holds every bias (bias_tuning: Accessory's mixtral_peft has one on every PEFT linear)
    plan = Plan(ls.layout, ls.cfg, ls.N, {k: dt for k in ls.cfg.canonical_shapes(optional=ls.layout == "peft")})
    problems = structure_problems(plan, [f], [sd], ranks=[r])
    if problems:
        raise ConvertError(problems[0])
    return plan, sd, ls.tokenizer


def hub_weights(d: Path) -> list[str]:
    """The shard files to fetch from a hub repository whose small files are in `d` ([] if not Accessory's)."""
    return [SHARD_GLOB.format(ext=ext) for ext in SHARD_WRITERS] if (d / META).is_file() else []


READER = Reader(
    "accessory", f"{shard_file_name(0, 1)} shards with {CONFIG} and {META} (Accessory)",
    claims=lambda path, names: any(SHARD_RE.match(n) for n in names),
    open=open_accessory, conflicts=("torrent", "mistral"))


# ----------------------------------------------------------------------------- writing
def side_contents(cfg: ModelConfig, layout: str) -> dict[str, bytes]:
    """config.json and meta.json, as bytes."""
    config = dict(cfg.to_accessory(), **(PEFT_CONFIG if layout == "peft" else {}))
    return {CONFIG: json_bytes(config), META: json_bytes({"llama_type": LLAMA_TYPE[layout]})}


def shard_size(specs: list, fmt: str) -> int:
    """The exact size of the shard file `shard_writer(fmt)` writes for `specs`."""
    if fmt == "pth":
        return checkpoint_size(specs)
    return safetensors_size(specs)


def side_files(cfg: ModelConfig, tokenizer: Path, layout: str, out: Path, atomic: bool) -> dict[str, dict]:
    """config.json, meta.json and the tokenizer (tokenizer.model and the HF tokenizer files beside
    it, or the HF files alone; tokenizer.files.carry) into `out` (each renamed into place when
    `atomic`, for a directory shared with other processes); their manifest entries."""
    files = {}
    for name, data in side_contents(cfg, layout).items():
        if atomic:
            with atomic_file(out / name) as tmp:
                files[name] = write_small(tmp, data)
        else:
            files[name] = write_small(out / name, data)
    files.update(carry(tokenizer, out, atomic=atomic))
    return files
