"""The HF hub layout (docs/formats.md, "HF hub layout"): reading it as canonical lazy tensors,
and writing it (`merge --to hf`).

A directory with `config.json` (MixtralConfig names), `model.safetensors` or several files
listed by `model.safetensors.index.json`, and `tokenizer.model` or the HF tokenizer files
(`tokenizer.json`, `tokenizer_config.json`). Names map through the table
in `model.names`; q_proj and k_proj rows are in HF's rotate-half order, so the canonical wq/wk are
`RowPermuted` views: a block of canonical rows is a gather of HF rows, read a block at a time
like every other lazy tensor. Writing goes the other way: canonical tensors, q/k permuted
lazily, streamed into safetensors files of at most `max_shard_size` bytes each, beside
config.json (the context length carried from the source or given, BOS/EOS ids from the
tokenizer), generation_config.json and the tokenizer files (tokenizer.files): a directory
transformers' AutoTokenizer, AutoModelForCausalLM and pipeline load as they load a hub repository.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..encodings.safetensors import file_size as safetensors_size
from ..encodings.safetensors import read_tensors as read_safetensors
from ..encodings.safetensors import write_safetensors
from ..errors import ConvertError
from ..io.lazy import Lazy, TensorSpec, dtype_name
from ..io.prefetch import stream
from ..io.small import json_bytes, write_small
from ..model import names as hfnames
from ..model.config import ModelConfig, read_json
from ..tokenizer import files as tokenizer
from .checkpoint import (
    Checkpoint,
    Reader,
    Target,
    TargetOption,
    TargetPlan,
    TokenizerRef,
    check_tensors,
    find_tokenizer,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class RowPermuted(Lazy):
    """Row i of this tensor is row perm[i] of `base`; blocks are gathered from the smallest
    row range of `base` that holds them (for the q/k permutation: the block plus one head)."""

    def __init__(self, base: Lazy, perm: torch.Tensor, name: str = "?"):
        if len(base.shape) != 2 or tuple(perm.shape) != (base.shape[0],):
            raise ConvertError(f"'{name}': a row permutation of {list(perm.shape)} does not fit shape "
                               f"{list(base.shape)}")
        self.base, self.perm, self.name = base, perm, name
        self.shape, self.dtype = base.shape, base.dtype

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        idx = self.perm[r0:r1]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        block = self.base.read(lo, hi, c0, c1)
        return block.index_select(0, idx - lo)


def weight_files(path: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The safetensors files of an HF directory and its weight map (None for a single file)."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{path / INDEX}: no 'weight_map' object; the index is corrupt")
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConvertError(f"{path / missing[0]}: listed in {INDEX} but missing "
                               f"({len(missing)} of {len(files)} files); download them all")
        return [path / f for f in files], wm
    if (path / SINGLE).is_file():
        return [path / SINGLE], None
    raise ConvertError(f"{path}: an HF config.json but no {SINGLE} or {INDEX}; only safetensors "
                       "checkpoints are read (convert pytorch_model*.bin with transformers first)")


def open_hf(path: Path, names: Optional[set[str]] = None) -> Checkpoint:
    """An HF hub directory as a Checkpoint."""
    cfg = ModelConfig.from_hf_config(read_json(path / "config.json"), str(path / "config.json"))
    files, wm = weight_files(path)
    canonical: dict[str, Lazy] = {}
    found: dict[str, tuple] = {}
    for f in files:
        for hf_name, t in read_safetensors(f).items():
            if wm is not None and wm.get(hf_name, f.name) != f.name:
                continue  # the index names another file for it; trust the index
            name = hfnames.hf_to_canonical(hf_name)
            if name is None:
                if hfnames.hf_ignored(hf_name):
                    continue
                raise ConvertError(f"{f}: tensor '{hf_name}' is not a Mixtral HF tensor name "
                                   "(expected model.layers.L.block_sparse_moe.experts.e.w1.weight and the like)")
            if name in found:
                raise ConvertError(f"{f}: tensor '{hf_name}' is also in another file; the index is stale")
            found[name] = (tuple(t.shape), t.dtype)
            canonical[name] = t
    check_tensors(cfg, found, str(path))  # shapes as the config implies: the q/k ones are then undone, or refused
    canonical = {k: _from_hf_order(k, canonical[k], cfg) for k in cfg.canonical_shapes()}
    return Checkpoint(path, "hf", cfg, files, TokenizerRef(find_tokenizer(path)), canonical,
                      label="HF hub layout (safetensors, q/k permuted)")


READER = Reader(
    "hf", f"config.json with {SINGLE} or {INDEX} (HF hub)",
    claims=lambda path, names: "config.json" in names and (SINGLE in names or INDEX in names),
    open=open_hf)


# ----------------------------------------------------------------------------- writing
def hf_tensors(cfg: ModelConfig, canonical: dict[str, Lazy]) -> dict[str, Lazy]:
    """HF name -> lazy tensor in HF order (q/k permuted), in canonical order."""
    out = {}
    for name, lazy in canonical.items():
        hf = hfnames.canonical_to_hf(name)
        n = hfnames.qk_heads(name, cfg)
        out[hf] = RowPermuted(lazy, hfnames.qk_gather(lazy.shape[0], n, True, name), hf) if n is not None else lazy
    return out


def _from_hf_order(name: str, lazy: Lazy, cfg: ModelConfig) -> Lazy:
    """A tensor read from HF in canonical row order: q and k un-permuted (the inverse of hf_tensors' gather)."""
    n = hfnames.qk_heads(name, cfg)
    return lazy if n is None else RowPermuted(lazy, hfnames.qk_gather(lazy.shape[0], n, False, name), name)


def plan_files(tensors: dict[str, Lazy], max_shard_size: int) -> list[tuple[str, list[str]]]:
    """Greedy split into files of at most max_shard_size bytes (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += t.nbytes
    if len(groups) == 1:
        return [(SINGLE, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _weight_files(cfg: ModelConfig, canonical: dict[str, Lazy], max_shard_size: int):
    """(HF tensors, [(file name, specs)], the index's bytes or None when one file)."""
    if max_shard_size <= 0:
        raise ConvertError(f"--max-shard-size must be positive, got {max_shard_size}")
    tensors = hf_tensors(cfg, canonical)
    files = [(fname, [TensorSpec(k, tensors[k].shape, tensors[k].dtype) for k in names])
             for fname, names in plan_files(tensors, max_shard_size)]
    index = None
    if len(files) > 1:
        weight_map = {s.name: fname for fname, specs in files for s in specs}
        index = json_bytes({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                            "weight_map": weight_map})
    return tensors, files, index


def write_weights(tmp: Path, tensors: dict[str, Lazy], files: list, index: Optional[bytes],
                  stream: Callable) -> dict[str, dict]:
    """The safetensors files (and the index when several) of `_weight_files` into `tmp`; manifest entries
    back. `stream(lazy)` yields a lazy tensor's bytes in blocks."""
    entries: dict[str, dict] = {}
    for fname, specs in files:
        h = hashlib.sha256()
        size = write_safetensors(tmp / fname, specs, lambda s: stream(tensors[s.name]), hasher=h)
        entries[fname] = {"size": size, "sha256": h.hexdigest()}
    if index is not None:
        entries[INDEX] = write_small(tmp / INDEX, index)
    return entries


def prepare(ck: Checkpoint, options: dict) -> dict:
    """What a complete repository needs, checked before anything is written: a tokenizer whose
    HF files can be carried or built, and the context length (the option, else the source's)."""
    if ck.tokenizer is None:
        raise ConvertError(f"{ck.where}: no tokenizer beside the checkpoint, and merge --to hf writes a complete "
                           "HF repository (tokenizer.json, tokenizer_config.json): pass --tokenizer PATH (or "
                           "hf://org/name)")
    tokenizer.check_hf_ready(ck.tokenizer)
    tokenizer.check_template(ck.tokenizer, options.get("chat_template"))
    max_pos = options.get("max_position_embeddings") or ck.cfg.max_position_embeddings
    if max_pos is None:
        raise ConvertError(f"{ck.where}: the source does not state the model's context length "
                           "(max_position_embeddings); pass --max-position-embeddings N (32768 for Mixtral-8x7B, "
                           "65536 for 8x22B)")
    return dict(options, max_position_embeddings=max_pos)


def plan(ck: Checkpoint, max_shard_size: int, max_position_embeddings: int,
         chat_template: Optional[str] = None) -> TargetPlan:
    """The HF hub layout (options prepared): the tokenizer files this target builds (tokenizer.files;
    the caller carries tokenizer.model and the HF files the source has), safetensors (q/k permuted,
    split at max_shard_size with an index when several) and config.json."""
    ids = tokenizer.specials(ck.tokenizer)
    built = tokenizer.built(ck.tokenizer, chat_template)
    tensors, files, index = _weight_files(ck.cfg, ck.canonical, max_shard_size)
    cfg = json_bytes(ck.cfg.to_hf_config(dtype_name(ck.dtype), max_position_embeddings, ids.bos_id, ids.eos_id))

    def write(tmp: Path, progress) -> dict[str, dict]:
        entries = {name: write_small(tmp / name, data) for name, data in built.items()}
        entries.update(write_weights(tmp, tensors, files, index, lambda lazy: stream(lazy, progress)))
        entries["config.json"] = write_small(tmp / "config.json", cfg)
        return entries

    out = [(name, len(data), "tokenizer file built from the tokenizer") for name, data in built.items()]
    out += [(fname, safetensors_size(specs), f"{len(specs)} tensors") for fname, specs in files]
    if index is not None:
        out.append((INDEX, len(index), "which file holds each tensor"))
    out.append(("config.json", len(cfg), f"MixtralConfig, max_position_embeddings {max_position_embeddings}"))
    return TargetPlan(out, write)


def hub_index(d: Path) -> list[str]:
    """The safetensors files an index among a hub repository's small files (in `d`) lists."""
    if not (d / INDEX).is_file():
        return []
    return sorted(set((read_json(d / INDEX).get("weight_map") or {}).values()))


def hub_single(d: Path) -> list[str]:
    """model.safetensors, when the hub repository's config.json is an HF one."""
    return [SINGLE] if (d / "config.json").is_file() and "hidden_size" in (read_json(d / "config.json") or {}) else []


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (decimal units as transformers, binary with 'i')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    n = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if n <= 0:
        raise ConvertError(f"--max-shard-size {text!r}: must be positive")
    return n


def _positive_int(text) -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ConvertError(f"--max-position-embeddings {text!r}: expected a whole number of tokens") from None
    if n < 1:
        raise ConvertError(f"--max-position-embeddings {text!r}: must be at least 1")
    return n


CONTEXT_OPTION = TargetOption(
    "--max-position-embeddings", "max_position_embeddings", metavar="N", parse=_positive_int,
    help="the context length for the model's config when the source does not state it (an HF config.json "
         "does; params.json and Accessory's config do not): 32768 for Mixtral-8x7B, 65536 for 8x22B. "
         "Overrides the source's.")

CHAT_TEMPLATE_OPTION = TargetOption(
    "--chat-template", "chat_template", metavar="FILE", parse=tokenizer.read_template,
    help="a Jinja chat template (the model's chat_template.jinja) for a source that ships none, such as "
         "Mistral's .tar instruct downloads; refused when the source's tokenizer has one. The tool writes "
         "no template of its own.")

TARGET = Target(
    "hf", "_hf", plan, prepare=prepare,
    help="the HF hub layout (config.json, safetensors with q/k permuted, an index when several files, the "
         "tokenizer files) that transformers loads as a hub repository",
    options=(TargetOption("--max-shard-size", "max_shard_size", metavar="SIZE", parse=parse_size, default="5GB",
                          help="largest safetensors file (e.g. 5GB, 500MB, 2GiB; default 5GB)."),
             CONTEXT_OPTION, CHAT_TEMPLATE_OPTION))
