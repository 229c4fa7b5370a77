"""The partition table: for every canonical tensor, what rank r of N holds, in each layout.

docs/formats.md ("Accessory layouts") as data. A `Plan` (layout, config, N) expands the table into
`Piece`s: "rank r's shard tensor KEY, from row ROW0, holds canonical tensor SRC sliced along
DIM to [START, STOP), transposed or not". Split assembles shard tensors from pieces, merge
assembles canonical tensors from the same pieces read the other way, verify derives every
shard's expected keys, shapes and bytes from them, and the sharded forward computes each
rank's share with them. No other module knows a layout rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConvertError, WorldSizeError
from ..io.lazy import Assembled, Lazy, Placement
from .config import ModelConfig
from .tensors import TENSORS, Row, compile_pattern, expand

PREFIX = "llma."


@dataclass(frozen=True)
class Piece:
    rank: int
    key: str  # shard tensor (with the llma. prefix)
    row0: int  # first row of the piece inside that shard tensor
    src: str  # canonical tensor name
    dim: Optional[int]  # canonical dim that is sliced; None: the whole tensor
    start: int = 0
    stop: int = 0
    transpose: bool = False

    def src_region(self, shape: tuple[int, ...]):
        """The piece's region of the canonical tensor: (r0, r1, c0, c1); c0/c1 None for 1-D."""
        r0, r1 = 0, shape[0]
        c0, c1 = (0, shape[1]) if len(shape) == 2 else (None, None)
        if self.dim == 0:
            r0, r1 = self.start, self.stop
        elif self.dim == 1:
            c0, c1 = self.start, self.stop
        return r0, r1, c0, c1

    def data_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the piece as stored in the shard (after the transpose, if any)."""
        r0, r1, c0, c1 = self.src_region(shape)
        if c0 is None:
            return (r1 - r0,)
        return (c1 - c0, r1 - r0) if self.transpose else (r1 - r0, c1 - c0)


# ----------------------------------------------------------------------------- rules
class Rule:
    def reads(self, piece: Piece) -> bool:
        """Whether reading the canonical tensor back takes this piece (every piece but the
        spare copies of a replicated tensor)."""
        return True

    def count(self, shape, cfg: ModelConfig) -> Optional[int]:
        """A number every valid N must divide (None: no constraint)."""
        return None

    def pieces(self, name, shape, m: dict, r: int, N: int, cfg: ModelConfig) -> list[Piece]:
        raise NotImplementedError


@dataclass
class Replicate(Rule):
    """Every rank holds the whole tensor; reading it back (merge, reshard) takes rank
    `read_from`'s copy (verify checks every copy)."""

    read_from: int = 0

    def pieces(self, name, shape, m, r, N, cfg):
        return [Piece(r, PREFIX + name, 0, name, None)]

    def reads(self, piece: Piece) -> bool:
        return piece.rank == self.read_from


@dataclass
class Chunk(Rule):
    """Rank r holds chunk r of N along `dim` (in whole heads when `per_head`)."""

    dim: int
    per_head: bool = False

    def count(self, shape, cfg):
        return shape[self.dim] // cfg.head_dim if self.per_head else shape[self.dim]

    def pieces(self, name, shape, m, r, N, cfg):
        n = shape[self.dim] // N
        return [Piece(r, PREFIX + name, 0, name, self.dim, r * n, (r + 1) * n)]


class Owned(Rule):
    """Every rank holds a whole tensor of its own: the copies differ (a column-parallel LoRA A, trained by
    each rank through its own rows of B; docs/formats.md, "Accessory PEFT saves"). There is no one
    canonical tensor to read back: rank r's copy goes with rank r's pieces of the weight
    (formats.adapters.accessory_peft)."""

    def pieces(self, name, shape, m, r, N, cfg):
        return [Piece(r, PREFIX + name, 0, name, None)]

    def reads(self, piece: Piece) -> bool:
        return False


class ExpertOwner(Rule):
    """Whole experts: rank r holds experts [r*E/N, (r+1)*E/N) under their global names."""

    def count(self, shape, cfg):
        return cfg.num_experts

    def pieces(self, name, shape, m, r, N, cfg):
        per = cfg.num_experts // N
        e = int(m["e"])
        return [Piece(r, PREFIX + name, 0, name, None)] if e // per == r else []


@dataclass
class ExpertSlice(Rule):
    """Every rank holds FFN rows [r*H/N, (r+1)*H/N) of every expert, stacked by expert into
    one tensor `into` (a pattern); `dim` is the FFN dim of the expert tensor, `transpose`
    stores the slice transposed (w2)."""

    dim: int
    into: str
    transpose: bool = False

    def count(self, shape, cfg):
        return shape[self.dim]

    def pieces(self, name, shape, m, r, N, cfg):
        hs = shape[self.dim] // N
        e = int(m["e"])
        return [Piece(r, PREFIX + self.into.format(**m), e * hs, name, self.dim, r * hs, (r + 1) * hs,
                      self.transpose)]


def row_rule(row: Row, layout: str) -> Rule:
    """A table row's rule in a layout, from how it is parallelised (docs/formats.md, "Accessory layouts")."""
    if row.parallel == "expert":
        if layout == "sparse":
            return ExpertSlice(row.sparse_dim, into=row.sparse, transpose=row.sparse_dim == 1)
        return ExpertOwner()
    return {
        "embedding": Chunk(1),  # fairscale ParallelEmbedding: columns
        "column": Chunk(0),  # ColumnParallelLinear: rows
        "column_heads": Chunk(0, per_head=True),  # ... in whole heads
        "row_heads": Chunk(1, per_head=True),  # RowParallelLinear: columns, in whole heads
        "replicated": Replicate(),
        "owned": Owned(),
    }[row.parallel]


# "peft": the base layout with the biases in place (Accessory's mixtral_peft, lora_rank -1;
# docs/formats.md, "Accessory PEFT saves").
# "base" and "sparse" (Accessory's mixtral and mixtral_sparse) have no biases.
LAYOUTS = ("base", "sparse", "peft")
TABLES: dict[str, list[tuple[str, Rule]]] = {
    layout: [(r.pattern, row_rule(r, "base" if layout == "peft" else layout)) for r in TENSORS
             if layout == "peft" or not r.optional] for layout in LAYOUTS}
_COMPILED = {name: [(compile_pattern(p), rule) for p, rule in table] for name, table in TABLES.items()}


def rule_for(layout: str, name: str) -> tuple[Rule, dict]:
    for rx, rule in _COMPILED[layout]:
        m = rx.match(name)
        if m:
            return rule, m.groupdict()
    raise ConvertError(f"tensor '{name}' has no rule in the {layout} layout; is this a Mixtral checkpoint?")


def valid_world_sizes(layout: str, cfg: ModelConfig) -> list[int]:
    g = 0
    for name, shape in cfg.canonical_shapes().items():
        rule, _ = rule_for(layout, name)
        c = rule.count(shape, cfg)
        if c is not None:
            g = math.gcd(g, c)
    return [n for n in range(1, g + 1) if g % n == 0] if g else [1]


@dataclass
class ShardTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Plan:
    """The table expanded for one (layout, config, N): every rank's shard tensors and pieces."""

    def __init__(self, layout: str, cfg: ModelConfig, N: int, dtypes: dict[str, torch.dtype]):
        if layout not in TABLES:
            raise ConvertError(f"unknown layout '{layout}'; use one of {', '.join(TABLES)}")
        valid = valid_world_sizes(layout, cfg)
        if N not in valid:
            raise WorldSizeError(N, layout, valid,
                                 f"heads, vocab, dim and {'FFN dim' if layout == 'sparse' else 'experts'}")
        self.layout, self.cfg, self.N = layout, cfg, N
        # the model's tensors, and the optional ones (biases) it has: those `dtypes` names
        self.shapes = {k: s for k, (row, s) in expand(cfg, optional=True).items() if not row.optional or k in dtypes}
        self.ranks: list[dict[str, ShardTensor]] = [dict() for _ in range(N)]
        self.by_source: dict[str, list[Piece]] = {}
        self.rules: dict[str, Rule] = {}
        for name, shape in self.shapes.items():
            rule, m = rule_for(layout, name)
            self.rules[name] = rule
            for r in range(N):
                for p in rule.pieces(name, shape, m, r, N, cfg):
                    st = self.ranks[r].setdefault(p.key, ShardTensor(p.key, (), dtypes[name]))
                    if st.dtype != dtypes[name]:
                        raise ConvertError(f"'{name}' is {dtypes[name]} but '{p.key}' also holds "
                                           f"{st.dtype} tensors; convert the checkpoint to one dtype first")
                    st.pieces.append(p)
                    self.by_source.setdefault(name, []).append(p)
        for shard in self.ranks:
            for st in shard.values():
                st.shape = self._tile(st)

    def _tile(self, st: ShardTensor) -> tuple[int, ...]:
        """The shard tensor's shape; its pieces must tile it row-wise without gap or overlap."""
        rows, tail = 0, None
        for p in sorted(st.pieces, key=lambda p: p.row0):
            shape = p.data_shape(self.shapes[p.src])
            if p.row0 != rows:
                raise ConvertError(f"{st.key}: the {self.layout} table's pieces leave a gap or overlap at row "
                                   f"{rows} (N={self.N}); the partition table is wrong")
            if tail is not None and shape[1:] != tail:
                raise ConvertError(f"{st.key}: the {self.layout} table stacks pieces of different widths "
                                   f"{list(tail)} and {list(shape[1:])}; the partition table is wrong")
            rows, tail = rows + shape[0], shape[1:]
        return (rows,) + tail

    # ---- the two directions of the same pieces ----
    def shard_tensor(self, r: int, key: str, canonical: dict[str, Lazy]) -> Assembled:
        """Rank r's tensor `key`, assembled from the canonical tensors (split)."""
        st = self.ranks[r][key]
        placements = []
        for p in st.pieces:
            shape = self.shapes[p.src]
            rows = p.data_shape(shape)
            dst = (p.row0, p.row0 + rows[0]) + ((0, rows[1]) if len(rows) == 2 else (None, None))
            placements.append(Placement(dst, canonical[p.src], p.src_region(shape), p.transpose))
        return Assembled(st.shape, st.dtype, placements, name=key)

    def canonical_tensor(self, name: str, shards: list[dict[str, Lazy]]) -> Assembled:
        """Canonical tensor `name`, assembled from the shard tensors (merge); a replicated
        tensor is read from the rank its rule names. The pieces read must tile the tensor."""
        st = self.ranks[self.by_source[name][0].rank][self.by_source[name][0].key]
        return self.assemble(name, self.shapes[name], st.dtype, self.rules[name], self.by_source[name], shards)

    def assemble(self, name: str, shape, dtype, rule: Rule, pieces: list[Piece], shards: list[dict[str, Lazy]]):
        """Tensor `name` from the shard tensors' pieces its rule reads (they must tile it)."""
        placements = []
        for p in pieces:
            if not rule.reads(p):
                continue
            data = p.data_shape(shape)
            src_region = (p.row0, p.row0 + data[0]) + ((0, data[1]) if len(data) == 2 else (None, None))
            placements.append(Placement(p.src_region(shape), shards[p.rank][p.key], src_region, p.transpose))
        return Assembled(shape, dtype, placements, name=name,
                         fix=f"the {self.layout} table's pieces at N={self.N} are wrong (a bug: please report it)")

    def row_pieces(self, row: Row, name: str, m: dict) -> tuple[Rule, tuple[int, ...], list[Piece]]:
        """(rule, shape, every rank's pieces) of tensor `name`, an instance (placeholders `m`) of a row
        beside the model's (a LoRA A or B: model.tensors.LoraRow.rows), by its parallelism in this layout."""
        rule, shape = row_rule(row, "base" if self.layout == "peft" else self.layout), row.shape(self.cfg)
        return rule, shape, [p for r in range(self.N) for p in rule.pieces(name, shape, m, r, self.N, self.cfg)]
