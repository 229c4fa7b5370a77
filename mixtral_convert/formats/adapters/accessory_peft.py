"""Accessory's PEFT Mixtral as a source (`llama_type` "mixtral_peft", docs/formats.md, "Accessory PEFT saves").

A save is Accessory's directory (formats.accessory names its files) with LoRA pairs and biases
beside the base layout's tensors, and config.json's `lora_rank`, `bias_tuning`, `norm_tuning`.
It holds every tensor, or (a trainable-only save) only those whose names hold `lora`, `bias` or
`norm`, which are read on top of a base model (`--base SRC`, any readable source): the delta's
norms and biases replace the base's, its LoRA is added.

What is read is a plain model: every LoRA'd weight is `W + B·A` (io.lora.LoraMerged), with the
pairs placed by their parallelism (model.tensors.DERIVED; layouts' rules): a column-parallel
weight's rows of rank r merge with rank r's own A (layouts.Owned), the row-parallel wo's A is
assembled from its column chunks and its B read from rank 0 as any replicated tensor, an expert's
pair is whole on its owner rank. The biases are canonical tensors of the model (optional rows of
the tensor table). Each merged weight keeps its pairs (LoraMerged.segments): forward.peft computes
the model unmerged from them. `summary` says what a save is without reading it on its base (inspect).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...errors import ConvertError, WorldSizeError
from ...io.lazy import Cast, Lazy
from ...io.lora import LoraMerged, Segment
from ...model import tensors
from ...model.config import read_json
from ...model.layouts import PREFIX, Owned, Plan
from .. import accessory
from ..checkpoint import Checkpoint, Reader, Sharded, TokenizerRef, find_tokenizer, read_tensors

KEYWORDS = ("lora", "bias", "norm")  # what a trainable-only save keeps (Accessory's get_trainable_params)


def llama_type(path: Path) -> Optional[str]:
    try:
        meta = read_json(path / accessory.META)
    except ConvertError:
        return None
    return meta.get("llama_type") if isinstance(meta, dict) else None


def claims(path: Path, names: set[str]) -> bool:
    return any(accessory.SHARD_RE.match(n) for n in names) and accessory.META in names \
        and llama_type(path) == accessory.LLAMA_TYPE["peft"]


def switches(path: Path) -> tuple[int, bool, bool]:
    """(lora_rank, bias_tuning, norm_tuning) from config.json, with Accessory's defaults (-1, true, false)."""
    raw = read_json(path / accessory.CONFIG)
    rank, bias, norm = raw.get("lora_rank", -1), raw.get("bias_tuning", True), raw.get("norm_tuning", False)
    if isinstance(rank, bool) or not isinstance(rank, int) or not (rank == -1 or rank > 0):
        raise ConvertError(f"{path / accessory.CONFIG}: lora_rank {rank!r} must be -1 (no LoRA) or a positive integer")
    if not isinstance(bias, bool) or not isinstance(norm, bool):
        raise ConvertError(f"{path / accessory.CONFIG}: bias_tuning and norm_tuning must be true or false")
    return rank, bias, norm


def _is_lora(key: str) -> bool:
    return ".lora_a." in key or ".lora_b." in key


def open_peft(path: Path, names: Optional[set[str]] = None, base: Optional[Checkpoint] = None) -> Checkpoint:
    """The merged model (with LoRA, a Checkpoint without shards: its weights are computed, not stored).
    `base`: the model a trainable-only save was trained from."""
    ls = accessory.listing(path, names)
    rank, _, _ = switches(path)
    opened = [read_tensors(f) for f in ls.files]
    rest = [{k: v for k, v in sd.items() if not _is_lora(k)} for sd in opened]
    trainable_only = all(any(w in k for w in KEYWORDS) for sd in opened for k in sd)
    cfg = ls.cfg
    if trainable_only and base is None:
        raise ConvertError(f"{path}: a trainable-only PEFT save (only lora/bias/norm tensors, no base weights); "
                           "pass --base SRC, the model it was trained from")
    if not trainable_only and base is not None:
        raise ConvertError(f"{path}: holds every tensor of the model (a full PEFT save); --base is for a "
                           "trainable-only save: leave it out")
    if base is not None and base.cfg != cfg:
        diff = next(k for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(base.cfg, k))
        raise ConvertError(f"--base {base.where}: does not fit the delta {path}: its '{diff}' is "
                           f"{getattr(base.cfg, diff)}, the delta's config.json has {getattr(cfg, diff)}")
    try:
        probe = Plan("peft", cfg, ls.N, {k: torch.bfloat16 for k in cfg.canonical_shapes(optional=True)})
    except WorldSizeError as e:
        raise ConvertError(f"{path}: its {ls.N} rank files do not tile this model ({e})") from None
    held = {p.src for p in _pieces_present(probe, rest)}  # the canonical tensors the save holds (some of)
    if base is None:
        dtypes = accessory.shard_dtypes("peft", cfg, ls.N, rest)
        plan = Plan("peft", cfg, ls.N, dtypes)
        problems = accessory.structure_problems(plan, ls.files, rest)
        if problems:
            raise ConvertError(problems[0])
        canonical = {name: plan.canonical_tensor(name, rest) for name in plan.shapes}
    else:
        canonical = _on_base(ls, probe, rest, held, base)
    lora = _lora(path, ls, opened, rank, probe)
    merged = dict(canonical)
    for name, segments in lora.items():
        merged[name] = LoraMerged(canonical[name], segments, name)
    tok = TokenizerRef(find_tokenizer(path)) if find_tokenizer(path) else (base.tok if base else TokenizerRef())
    what = "trainable-only on " + base.where if base is not None else "full"
    # without LoRA (lora_rank -1, e.g. what split writes for a model with biases) the shards hold the model
    # as it is: its plan runs the sharded forward; with LoRA the weights are computed, not stored
    sharded = Sharded(plan, rest) if base is None and not lora else None
    ck = Checkpoint(path, "peft", cfg, ls.files, tok, merged, label=f"Accessory mixtral_peft ({what} save)",
                    sharded=sharded)
    return ck.check()


def _pieces_present(plan: Plan, shards: list[dict[str, Lazy]]):
    for r, shard in enumerate(plan.ranks):
        for key, st in shard.items():
            if key in shards[r]:
                yield from st.pieces


def _on_base(ls, probe: Plan, rest: list[dict[str, Lazy]], held: set[str], base: Checkpoint) -> dict[str, Lazy]:
    """The base's tensors with the delta's norms and biases in place; the delta checked against the plan."""
    for r, (f, sd) in enumerate(zip(ls.files, rest, strict=True)):
        for key, t in sd.items():
            st = probe.ranks[r].get(key)
            if st is None:
                raise ConvertError(f"{f.name} (rank {r}): unexpected tensor '{key}' (not a norm or bias of this "
                                   "model's mixtral_peft layout)")
            if tuple(t.shape) != st.shape:
                raise ConvertError(f"{f.name} (rank {r}): tensor '{key}' has shape {list(t.shape)}, the delta's "
                                   f"{ls.N} ranks demand {list(st.shape)}: its N does not tile this model")
    canonical = dict(base.canonical)
    dtype = base.check().dtype
    order = sorted(held, key=list(probe.shapes).index)
    for name in order:
        for p in probe.by_source[name]:
            if p.key not in rest[p.rank]:
                raise ConvertError(f"{ls.files[p.rank].name} (rank {p.rank}): tensor '{p.key}' missing (the other "
                                   "ranks hold it); the delta is incomplete")
    first = {name: probe.by_source[name][0] for name in order}
    plan = Plan("peft", ls.cfg, ls.N, dict(base.dtypes, **{n: rest[p.rank][p.key].dtype for n, p in first.items()}))
    for name in order:
        t = plan.canonical_tensor(name, rest)
        canonical[name] = t if t.dtype == dtype else Cast(t, dtype)
    return canonical


def _lora(path: Path, ls, opened: list[dict[str, Lazy]], rank: int, plan: Plan) -> dict:
    """Canonical weight name -> its segments, for every LoRA pair the save holds (A and B are rows of the
    table, model.tensors.LoraRow.rows, placed by the `plan` as any tensor)."""
    lora_keys = {k for sd in opened for k in sd if _is_lora(k)}
    if rank == -1:
        if lora_keys:
            raise ConvertError(f"{path}: config.json says lora_rank -1 but the shards hold LoRA tensors, e.g. "
                               f"'{sorted(lora_keys)[0]}'; restore the config.json the save was written with")
        return {}
    out = {}
    cfg, N = ls.cfg, ls.N
    for lr in tensors.LORA:
        lora_rows = dict(zip("ab", lr.rows(rank), strict=True))
        for name, (row, shape) in tensors.expand(cfg).items():
            if row is not lr.weight:
                continue
            m = tensors.compile_pattern(row.pattern).match(name).groupdict()
            if not any(PREFIX + r.pattern.format(**m) in lora_keys for r in lora_rows.values()):
                continue
            pieces = {}
            for which, lrow in lora_rows.items():
                rule, shp, ps = plan.row_pieces(lrow, lrow.pattern.format(**m), m)
                for p in ps:
                    t = opened[p.rank].get(p.key)
                    want = p.data_shape(shp)
                    if t is None:
                        raise ConvertError(f"{ls.files[p.rank].name} (rank {p.rank}): tensor '{p.key}' missing "
                                           f"(its LoRA pair is there; lora_rank {rank})")
                    if tuple(t.shape) != want:
                        hint = (f"config.json's lora_rank is {rank}" if t.shape[0 if which == "a" else -1] != rank
                                else f"the save's {N} ranks do not tile it")
                        raise ConvertError(f"{ls.files[p.rank].name} (rank {p.rank}): tensor '{p.key}' has shape "
                                           f"{list(t.shape)}, expected {list(want)} ({hint})")
                pieces[which] = (rule, ps, shp)
            out[name] = _segments(plan, name, shape, pieces, opened)
    return out


def _segments(plan: Plan, name: str, shape, pieces: dict, opened: list[dict[str, Lazy]]) -> list[Segment]:
    (a_rule, a_ps, a_shape), (b_rule, b_ps, b_shape) = pieces["a"], pieces["b"]
    if isinstance(a_rule, Owned):  # each rank's rows of B with that rank's own A
        segs = []
        for p in b_ps:
            a = next(q for q in a_ps if q.rank == p.rank)
            segs.append(Segment(p.start, p.stop, opened[p.rank][p.key], opened[a.rank][a.key]))
        return sorted(segs, key=lambda s: s.r0)
    return [Segment(0, shape[0], _assemble(plan, b_rule, b_ps, b_shape, opened),
                    _assemble(plan, a_rule, a_ps, a_shape, opened))]


def _assemble(plan: Plan, rule, ps, shape, opened) -> Lazy:
    """A canonical LoRA tensor from the pieces its rule reads (a replicated one: rank 0's copy)."""
    return plan.assemble(ps[0].src, shape, opened[ps[0].rank][ps[0].key].dtype, rule, ps, opened)


READER = Reader("peft", f"{accessory.shard_file_name(0, 1)} shards with {accessory.META} llama_type mixtral_peft",
                claims=claims, open=open_peft, conflicts=("torrent", "mistral"),
                on_base=lambda path, names, base: open_peft(path, names, base=base),
                on_base_what="a trainable-only PEFT save (llama_type mixtral_peft)")



def summary(path: Path, names: Optional[set[str]] = None) -> dict:
    """What a PEFT save is, without its base: LoRA rank and modules, biases (how many non-zero), norms,
    full or trainable-only, and the replicated PEFT tensors whose ranks' copies differ (rank 0's is read)."""
    ls = accessory.listing(path, names)
    rank, bias_tuning, norm_tuning = switches(path)
    opened = [read_tensors(f) for f in ls.files]
    keys = {k: [r for r, sd in enumerate(opened) if k in sd] for sd in opened for k in sd}
    trainable_only = all(any(w in k for w in KEYWORDS) for k in keys)
    modules, bias_names, norms, differ = [], [], [], []
    for k, ranks in keys.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if _is_lora(k):
            m = tensors.match(name.replace(".lora_a.weight", ".weight").replace(".lora_b.weight", ".weight"))
            if m is not None and m[0].short not in modules:
                modules.append(m[0].short)
        elif name.endswith(".bias"):
            bias_names.append(k)
        elif name.endswith("norm.weight"):
            norms.append(name)
        replicated = tensors.parallel_of(name) == "replicated"
        if replicated and len(ranks) > 1:
            first = opened[ranks[0]][k]
            t0 = first.read(0, first.shape[0])
            if any(not torch.equal(t0, opened[r][k].read(0, opened[r][k].shape[0])) for r in ranks[1:]):
                differ.append(name)
    nonzero = sum(1 for k in bias_names if any(bool(opened[r][k].read(0, opened[r][k].shape[0]).ne(0).any())
                                               for r in keys[k]))
    order = [lr.weight.short for lr in tensors.LORA]
    return {"peft": True, "save": "trainable-only (pass --base SRC to read it)" if trainable_only else "full",
            "world_size": ls.N, "lora_rank": rank, "lora_modules": sorted(modules, key=order.index),
            "bias_tuning": bias_tuning, "biases": len(bias_names), "biases_nonzero": nonzero,
            "norm_tuning": norm_tuning, "norms_in_save": len(norms),
            "replicated_copies_differ": sorted(differ)}
