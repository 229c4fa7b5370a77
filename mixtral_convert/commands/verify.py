"""verify: prove an Accessory directory is exactly the source checkpoint in that layout.

Structure: a file for every rank, meta.json / config.json / tokenizer.model consistent with
the source, each shard's key set, shapes and dtypes exactly as the plan demands. Data: every
shard tensor is compared byte for byte, a block at a time, with the same tensor assembled from
the source through the plan. The pieces tile every canonical tensor (a property of the table,
tested), so this is the same as checking that the reassembly of every source tensor equals it;
replicated tensors are checked on every rank. Bytes, not values, are compared: NaN payloads
are data.

Without a source, the same structure checks run with the directory's own config.json and the
shards' dtypes, and then every file's size and sha256 is checked against the manifest the
conversion wrote (io/manifest.py): corruption after conversion is caught without the source.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ConvertError
from ..formats import accessory
from ..formats.adapters import accessory_peft as peft
from ..formats.checkpoint import Checkpoint, dtype_name, read_tensors
from ..formats.registry import TARGETS, open_checkpoint
from ..formats.torrent import TORRENT_FILE
from ..io import manifest, reads
from ..io.manifest import MANIFEST
from ..io.prefetch import prefetched, warm
from ..io.progress import progress_bar
from ..model.config import ACCESSORY_KEYS, ModelConfig, read_json
from ..model.layouts import Plan
from ..tokenizer.files import differences as tokenizer_differences
from ..tokenizer.files import find as find_tokenizer
from ..tokenizer.files import tokenizer_pieces
from . import biases
from .common import CAST_DTYPES, cast_to


@dataclass
class Report:
    shards: str
    source: str
    layout: Optional[str] = None
    world_size: Optional[int] = None
    checks: list[str] = field(default_factory=list)  # what passed
    problems: list[str] = field(default_factory=list)  # what failed (first is the headline)
    bytes_compared: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "shards": self.shards, "source": self.source, "layout": self.layout,
                "world_size": self.world_size, "checks": self.checks, "problems": self.problems,
                "bytes_compared": self.bytes_compared, "seconds": round(self.seconds, 3)}

    def lines(self, fwd=None, as_json: bool = False) -> tuple[list[str], list[str]]:
        """(what to print on stdout, the problems) for this report and the forward's (`fwd`, a
        forward.parity.ParityReport, or None): JSON, or one line per check and problem and a verdict."""
        problems = list(self.problems) + (fwd.problems if fwd else [])
        if as_json:
            d = self.as_dict()
            if fwd is not None:
                d["forward"] = fwd.as_dict()
                d["ok"] = self.ok and fwd.ok
            return [json.dumps(d, indent=2)], problems
        out = [f"ok    {line}" for line in self.checks] + [f"FAIL  {line}" for line in self.problems]
        if fwd is not None:
            out.append(f"{'ok  ' if fwd.ok else 'FAIL'}  {fwd.summary()}")
            out += [f"FAIL  {line}" for line in fwd.problems]
        out.append(f"{'verified' if not problems else 'MISMATCH'}: {self.shards} ({self.layout}, N={self.world_size}) "
                   f"against {self.source} in {self.seconds + (fwd.seconds if fwd else 0):.1f} s")
        return out, problems


def verify(shards: Path, source: Optional[Path] = None, quiet: bool = False, base=None, adapter=None) -> Report:
    """With `source`: structure, then every byte against the source (a PEFT save: its merged weights,
    computed as split computes them; `base`: a trainable-only save's base). Without: structure, then
    every file's size and sha256 against the directory's manifest."""
    if adapter is not None and source is None:  # refused before anything is hashed
        raise ConvertError("--adapter needs --source BASE: the model the adapter is merged into")
    t0 = time.perf_counter()
    shards = Path(shards)
    if not shards.is_dir():
        raise ConvertError(f"{shards}: not a directory; pass the directory that split wrote")
    if source is None:
        if not (shards / MANIFEST).exists():
            raise ConvertError(f"{shards}: no {MANIFEST} and no --source; pass --source SRC (the checkpoint "
                               "it was made from) to compare every byte with it")
        rep = Report(str(shards), f"its manifest ({MANIFEST})")
        try:
            _verify_manifest(shards, rep, quiet)
        finally:
            rep.seconds = time.perf_counter() - t0
        return rep
    src = open_checkpoint(source, base=base, adapter=adapter)  # a bad source is bad input (exit 2), not a mismatch
    sources = src.sources
    rep = Report(str(shards), str(src.path))
    if src.kind == "peft":
        differ = peft.summary(src.path)["replicated_copies_differ"]
        if differ:
            rep.checks.append(f"the source's ranks hold different copies of {len(differ)} replicated tensor(s) (first "
                              f"'{differ[0]}'); rank 0's copy was read and compared, as for every replicated tensor")
    try:
        _verify(shards, src, rep, quiet)
    finally:
        rep.seconds = time.perf_counter() - t0
    unchanged_while_compared(sources, rep)
    return rep


def unchanged_while_compared(sources, rep: Report) -> None:
    """A source rewritten while it was compared proves nothing either way: refused (SourceChanged),
    like a bad source; else the report says what was checked."""
    reads.check_unchanged(sources, "the comparison")
    if rep.ok:
        rep.checks.append(f"the source's {len(sources)} file(s) kept their size, mtime and inode while they were read")


def _verify_manifest(shards: Path, rep: Report, quiet: bool) -> None:
    bad = rep.problems.append
    try:
        m = manifest.read(shards)
    except ConvertError as e:
        return bad(str(e))
    rep.layout, rep.world_size = m.get("layout"), m.get("world_size")
    listing = manifest.check_listing(shards, m)
    if listing:
        rep.problems.extend(listing)
        return
    rep.checks.append(f"{len(m['files'])} files listed in the manifest, all present with their recorded sizes, "
                      "none unlisted")
    if m.get("layout") in TARGETS:  # a merge output (torrent or HF layout): it must open as one
        try:
            ck = open_checkpoint(shards)
            if ck.tokenizer is not None and tokenizer_pieces(ck.tokenizer) != ck.cfg.vocab_size:
                return bad(f"{ck.tokenizer}: {tokenizer_pieces(ck.tokenizer)} pieces, but the embedding has "
                           f"{ck.cfg.vocab_size} rows")
        except ConvertError as e:
            return bad(str(e))
        rep.checks.append(f"{ck.describe()}: config, tensor names, shapes and dtype consistent")
    elif _structure(shards, None, rep) is None or rep.problems:
        return
    total = sum(e["size"] for e in m["files"].values())
    with progress_bar("verify sha256", total, quiet) as prog:
        def advance(n):
            rep.bytes_compared += n
            prog.advance(n)
        digest = manifest.check_hashes(shards, m, advance)
    if digest:
        rep.problems.extend(digest)
        return
    rep.checks.append(f"every file's sha256 equals the manifest's ({rep.bytes_compared} bytes hashed)")


def _verify(shards: Path, src: Checkpoint, rep: Report, quiet: bool) -> None:
    found = _structure(shards, src, rep)
    if found is None or rep.problems:
        return
    plan, files, opened, src = found
    N = plan.N
    bad = rep.problems.append
    # data, byte for byte
    total = sum(st.nbytes for shard in plan.ranks for st in shard.values())
    # Tensor by tensor across the ranks (the i-th tensor of every rank, then the next), not rank after
    # rank: the ranks' pieces of one source tensor (the column bands of an expert's w2, say) are then
    # compared while it is in the page cache, so a source larger than memory is read once, not per rank.
    keys = [list(shard) for shard in plan.ranks]
    order = [(r, keys[r][i]) for i in range(max(map(len, keys))) for r in range(N) if i < len(keys[r])]

    def pairs():  # (rank, shard tensor, first row, actual block, expected block)
        def expected_of(i: int):
            return plan.shard_tensor(order[i][0], order[i][1], src.canonical)
        nxt = expected_of(0) if order else None
        if nxt is not None:
            warm(nxt)
        for i, (r, key) in enumerate(order):
            expected = nxt
            if i + 1 < len(order):
                nxt = expected_of(i + 1)
                warm(nxt)  # the disk reads the next tensor's source while this one is compared
            st, actual = plan.ranks[r][key], opened[r][key]
            for r0, r1 in expected.row_blocks():
                yield r, st, r0, actual.read(r0, r1), expected.read(r0, r1).contiguous()

    with progress_bar("verify", total, quiet) as prog, closing(prefetched(pairs())) as blocks:
        for r, st, r0, a, e in blocks:
            a, e = _bytes_of(a), _bytes_of(e)
            if not _same_bytes(a, e):  # bytes, not values: NaN payloads are data
                return bad(_where(files[r], r, st, r0, a.numpy(), e.numpy()))
            rep.bytes_compared += a.numel()
            prog.advance(a.numel())
    rep.checks.append(f"every byte of every shard equals the source's ({rep.bytes_compared} bytes)")


def _structure(shards: Path, src: Optional[Checkpoint], rep: Report):
    """meta.json, config.json (against the source's config, or on its own), a file per rank, the
    tokenizer, and every shard's keys, shapes and dtypes against the plan. Returns (plan, files,
    opened shards, the source as compared), or None when it cannot go on; problems go to the report."""
    bad = rep.problems.append
    try:
        layout = accessory.read_layout(shards)
    except ConvertError as e:
        return bad(str(e))
    rep.layout = layout
    rep.checks.append(f"meta.json: llama_type {accessory.LLAMA_TYPE[layout]}")
    if src is not None:
        src = _biases_like_layout(src, layout, rep)
    cfg = _check_config(shards, src, rep, layout)
    if src is not None:
        cfg = src.cfg
    elif cfg is None:
        return None
    if (shards / TORRENT_FILE).exists():
        bad(f"{shards}: holds {TORRENT_FILE} beside the shards (Accessory rejects 'multiple formats')")
    try:
        N, _, files = accessory.list_shards(shards)
    except ConvertError as e:
        return bad(str(e))
    rep.world_size = N
    rep.checks.append(f"{N} shard files, one per rank")
    _check_tokenizer(shards / accessory.TOKENIZER, cfg, src, rep)
    try:
        opened = [read_tensors(f) for f in files]
    except ConvertError as e:
        return bad(str(e))
    dtypes = accessory.shard_dtypes(layout, cfg, N, opened)
    if src is not None:
        src = _cast_source_like_shards(src, set(dtypes.values()), rep)
    try:
        plan = Plan(layout, cfg, N, src.dtypes if src is not None else dtypes)
    except ConvertError as e:
        return bad(f"{shards}: {e}")
    structure = accessory.structure_problems(plan, files, opened)
    if structure:
        rep.problems.extend(structure)
        return None
    rep.checks.append("every shard's keys, shapes and dtypes match the layout")
    return plan, files, opened, src


def _cast_source_like_shards(src: Checkpoint, shard_dtypes: set, rep: Report) -> Checkpoint:
    """Shards written with --dtype hold the source's values cast to their dtype: compare them with
    the source cast the same way (and say so). Anything else is left to the structure check."""
    if len(shard_dtypes) != 1:
        return src
    want = shard_dtypes.pop()
    names = {v: k for k, v in CAST_DTYPES.items()}
    try:
        have = src.check().dtype
    except ConvertError:
        return src
    if want != have and want in names:
        rep.checks.append(f"the shards are {names[want]}: compared with the source's {dtype_name(have)} values "
                          f"cast to {names[want]} the same way")
        return cast_to(src, names[want])
    return src


def _biases_like_layout(src: Checkpoint, layout: str, rep: Report) -> Checkpoint:
    """A source with biases, against a layout without them: compared without its biases when every one is
    zero (split leaves them out); a non-zero one is a difference (the output dropped it)."""
    names = biases.bias_names(src)
    if not names or layout == "peft":
        return src
    found = biases.nonzero(src)
    if found:
        rep.problems.append(f"the source has non-zero biases (first '{found[0][0]}', max |value| {found[0][1]:.3g}) "
                            f"and the {accessory.LLAMA_TYPE[layout]} layout has none: the output is not the source's "
                            "model (written with --drop-biases?)")
    else:
        rep.checks.append(f"the source's {len(names)} bias tensors are all zero: compared without them")
    return replace(src, canonical={k: v for k, v in src.canonical.items() if k not in set(names)})


def _check_config(shards: Path, src: Optional[Checkpoint], rep: Report, layout: str = "base") -> Optional[ModelConfig]:
    """config.json: only keys Accessory's ModelArgs takes (and mixtral_peft's switches, in that layout),
    nothing it would default wrongly, and (with a source) equal to the source's config."""
    bad, path = rep.problems.append, shards / accessory.CONFIG
    allowed = ACCESSORY_KEYS | (set(accessory.PEFT_CONFIG) if layout == "peft" else set())
    try:
        raw = read_json(path)
        unknown = sorted(set(raw) - allowed) if isinstance(raw, dict) else []
        if unknown:
            bad(f"{path}: key '{unknown[0]}' is not accepted by Accessory's ModelArgs")
        for k in ("hidden_dim", "rope_theta"):
            if isinstance(raw, dict) and k not in raw:
                bad(f"{path}: '{k}' is absent (Accessory's default would be wrong)")
        cfg = ModelConfig.from_params(raw, str(path))
    except ConvertError as e:
        bad(str(e))
        return None
    if src is None:
        rep.checks.append("config.json: a valid Mixtral config")
    elif cfg != src.cfg:
        diff = [k for k, f in src.cfg.__dataclass_fields__.items()
                if f.compare and getattr(cfg, k) != getattr(src.cfg, k)]
        bad(f"{path}: '{diff[0]}' is {getattr(cfg, diff[0])}, the source has {getattr(src.cfg, diff[0])}")
    else:
        rep.checks.append("config.json: equals the source's config")
    return cfg


def _check_tokenizer(tok: Path, cfg: ModelConfig, src: Optional[Checkpoint], rep: Report) -> None:
    """The tokenizer Accessory would load from the directory (tokenizer.model, else tokenizer.json
    with tokenizer_config.json): its vocabulary equals the embedding's rows and, with a source,
    every tokenizer file both have is the source's."""
    bad = rep.problems.append
    found = find_tokenizer(tok.parent)
    if found is None:
        return bad(f"{tok}: missing (nor tokenizer.json with tokenizer_config.json); Accessory loads the tokenizer "
                   "from the checkpoint directory")
    what = "tokenizer.model" if not found.is_dir() else "tokenizer.json"
    try:
        pieces = tokenizer_pieces(found)
        differs = tokenizer_differences(found, src.tokenizer) if src is not None and src.tokenizer else None
    except ConvertError as e:
        return bad(str(e))
    unit = "pieces" if not found.is_dir() else "tokens"
    if pieces != cfg.vocab_size:
        bad(f"{tok.parent / what}: {pieces} {unit}, but the embedding has {cfg.vocab_size} rows")
    elif differs:
        bad(differs)
    else:
        rep.checks.append(f"{what}: {pieces} {unit} = vocab_size")


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def _same_bytes(a: torch.Tensor, e: torch.Tensor) -> bool:
    """Two byte tensors hold the same bytes: compared 8 bytes at a time where both allow it
    (several times faster than byte by byte), else byte by byte."""
    if a.numel() != e.numel():
        return False
    n = a.numel() - a.numel() % 8
    try:
        wide = torch.equal(a[:n].view(torch.int64), e[:n].view(torch.int64))
    except RuntimeError:  # not 8-byte aligned in memory
        return torch.equal(a, e)
    return wide and torch.equal(a[n:], e[n:])


def _where(f: Path, r: int, st, r0: int, a, e) -> str:
    item = st.dtype.itemsize
    first = int(np.flatnonzero(a != e)[0]) // item
    row_len = math.prod(st.shape[1:]) if len(st.shape) > 1 else 1
    idx = [r0 + first // row_len] + ([first % row_len] if len(st.shape) > 1 else [])
    src = max((p for p in st.pieces if p.row0 <= idx[0]), key=lambda p: p.row0).src
    return (f"{f.name} (rank {r}): tensor '{st.key}' differs from the source at element {idx} "
            f"(holds '{src}'); the shard is corrupt or was written from another checkpoint: re-run split")
