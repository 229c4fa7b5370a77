"""The sharded forward: a layout run as its N tensor-parallel ranks would run it.

Each rank sees only its own shard (`rank_weights[r]`: shard key -> tensor, e.g. what
`formats.accessory.open_rank` opens for `consolidated.{r}-of-{N}.model.pth`). Which part of which
canonical tensor a shard tensor holds is read from the plan's pieces (model.layouts.Plan), never
hand-coded per layout: a piece says "rows [row0, row0+n) of shard tensor KEY are canonical
tensor SRC sliced along DIM to [START, STOP), transposed or not". From its pieces a rank
recovers its canonical slices and computes its share with reference.attention / reference.moe:
- embeddings: each rank looks up its columns (ParallelEmbedding); the ranks' columns are
  gathered (concatenated along D);
- attention: the rank's heads (wq/wk/wv rows, wo columns); the ranks' outputs are summed
  (the all-reduce of RowParallelLinear);
- MoE: routing from the rank's own copy of the full gate; the rank's experts, whole (base) or
  sliced along the FFN dim (sparse); the ranks' outputs are summed (all-reduce);
- output: each rank's logit rows; gathered (concatenated along V).
Norms are replicated: each rank normalizes with its own copy.

One rank's computation is `rank_steps`, a generator that yields at every collective (gather or
sum) and is sent the collective's result: `sharded_forward` runs all N ranks in this one process
in lock step, `distributed.py` runs one rank per process over torch.distributed, and both
share this code. A rank's tensors of a layer are loaded, used and dropped before the next
layer. The sums are taken in the compute dtype, in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Optional

import torch

from ..errors import ConvertError
from ..model.config import ModelConfig
from ..model.layouts import Piece, Plan
from ..model.tensors import bias_name
from .reference import as_getter, attention, expert_name, layer_names, moe, rms_norm, rope_angles

Region = tuple[int, int]  # [start, stop) along the piece's dim


class RankShard:
    """One rank's view of the model: canonical tensor name -> the slice this rank holds."""

    def __init__(self, plan: Plan, r: int, weights, dtype: torch.dtype, device):
        self.plan, self.r, self.get = plan, r, as_getter(weights)
        self.dtype, self.device = dtype, device
        self.pieces: dict[str, list[Piece]] = {}
        for st in plan.ranks[r].values():
            for p in st.pieces:
                self.pieces.setdefault(p.src, []).append(p)

    def holds(self, name: str) -> bool:
        return name in self.pieces

    def piece(self, name: str) -> Optional[Piece]:
        """The one piece of canonical tensor `name` this rank holds (None: it holds none)."""
        ps = self.pieces.get(name)
        if not ps:
            return None
        if len(ps) > 1:
            raise ConvertError(f"rank {self.r} holds {len(ps)} pieces of '{name}'; the sharded forward "
                               "handles one piece per tensor per rank")
        return ps[0]

    def region(self, name: str, dim: int) -> Region:
        """The range along `dim` of canonical `name` that this rank's piece covers."""
        p = self.piece(name)
        if p is None:
            raise ConvertError(f"rank {self.r} holds no piece of '{name}'")
        if p.dim is None or p.dim != dim:
            if p.dim is not None:
                raise ConvertError(f"rank {self.r}: '{name}' is sliced along dim {p.dim}; the sharded "
                                   f"forward expects it whole or sliced along dim {dim}")
            return 0, self.plan.shapes[name][dim]
        return p.start, p.stop

    def load_bias(self, weight: str) -> Optional[torch.Tensor]:
        """This rank's slice of a weight's bias, where the model has biases (None where not)."""
        name = bias_name(weight)
        return self.load(name) if self.holds(name) else None

    def load(self, name: str, cast: bool = True) -> torch.Tensor:
        """This rank's slice of canonical `name`, in canonical orientation, on device/dtype."""
        p = self.piece(name)
        if p is None:
            raise ConvertError(f"rank {self.r} holds no piece of '{name}'")
        try:
            whole = self.get(p.key)
        except KeyError:
            raise ConvertError(f"rank {self.r}'s shard has no tensor '{p.key}' (the plan puts '{name}' "
                               "there); is it the right shard, of this layout and world size?") from None
        want = self.plan.ranks[self.r][p.key].shape
        if tuple(whole.shape) != want:
            raise ConvertError(f"rank {self.r}'s '{p.key}' has shape {tuple(whole.shape)}, the plan "
                               f"expects {want}")
        rows = p.data_shape(self.plan.shapes[name])[0]
        t = whole[p.row0:p.row0 + rows]
        if p.transpose:
            t = t.t()
        return t.to(device=self.device, dtype=self.dtype) if cast else t


def _attention_share(rk: RankShard, L: int, x, cfg: ModelConfig, cos, sin) -> Optional[torch.Tensor]:
    n = layer_names(L)
    if not rk.holds(n["wo"]):
        return None
    hd, rep = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    q, o = rk.region(n["wq"], 0), rk.region(n["wo"], 1)
    k, v = rk.region(n["wk"], 0), rk.region(n["wv"], 0)
    # The rank's query heads, its KV heads and its wo columns must be the same head group.
    if q != o or k != v or q[0] != k[0] * rep or q[1] != k[1] * rep or q[0] % hd or q[1] % hd:
        raise ConvertError(f"rank {rk.r} layer {L}: wq rows {q}, wk rows {k}, wv rows {v}, wo columns {o} "
                           f"are not one group of whole heads (head_dim {hd}, {rep} query heads per KV head)")
    biases = {m: rk.load_bias(n[m]) for m in ("wq", "wk", "wv")}  # the rank's rows of them, where the model has any
    return attention(x, rk.load(n["wq"]), rk.load(n["wk"]), rk.load(n["wv"]), rk.load(n["wo"]),
                     head_dim=hd, cos=cos, sin=sin, biases=biases)


def _moe_share(rk: RankShard, L: int, x, cfg: ModelConfig) -> torch.Tensor:
    def experts():
        for e in range(cfg.num_experts):
            w1, w2, w3 = (expert_name(L, e, m) for m in ("w1", "w2", "w3"))
            held = [rk.holds(w) for w in (w1, w2, w3)]
            if not any(held):
                continue
            if not all(held):
                raise ConvertError(f"rank {rk.r} layer {L}: holds only part of expert {e}'s w1/w2/w3")
            h1, h3, h2 = rk.region(w1, 0), rk.region(w3, 0), rk.region(w2, 1)
            if not h1 == h2 == h3:
                raise ConvertError(f"rank {rk.r} layer {L} expert {e}: w1 rows {h1}, w3 rows {h3} and "
                                   f"w2 columns {h2} are not the same FFN slice")
            b = [rk.load_bias(w) for w in (w1, w2, w3)]
            yield (e, rk.load(w1), rk.load(w2), rk.load(w3)) + (tuple(b) if any(t is not None for t in b) else ())

    gate = rk.load(layer_names(L)["gate"])
    return moe(x, gate, experts(), cfg.experts_per_tok)


# ----- one rank's computation, with its collectives injected -------------------------------

@dataclass
class Collective:
    """What a rank needs from all ranks at this point of the forward.

    op "sum": every rank's `tensor` summed, in rank order, in the compute dtype (the all-reduce
    of RowParallelLinear and of the MoE). op "gather": every rank's `tensor` concatenated along
    the last dim in rank order (fairscale's all-gather: ParallelEmbedding columns,
    ColumnParallelLinear(gather_output) rows); when `replicated`, every rank holds the whole
    thing and its own tensor is the result. `what` names the tensor for error messages.
    """

    op: str
    tensor: torch.Tensor
    replicated: bool = False
    what: str = ""


def gather_layout(plan: Plan, name: str, dim: int) -> bool:
    """Whether canonical `name` is whole (replicated) on every rank along `dim`; otherwise the
    ranks' ranges must have one width that tiles the dim (what a rank-order all-gather needs)."""
    regions = [RankShard(plan, r, {}, torch.float32, "cpu").region(name, dim) for r in range(plan.N)]
    total = plan.shapes[name][dim]
    if all(reg == (0, total) for reg in regions):
        return True
    widths = {b - a for a, b in regions}
    if len(widths) != 1 or widths.pop() * plan.N != total:
        raise ConvertError(f"{name}: the ranks' ranges {regions} along dim {dim} are not N equal chunks of {total}")
    return False


def rank_steps(plan: Plan, r: int, weights, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float32,
               device="cpu") -> Generator[Collective, torch.Tensor, torch.Tensor]:
    """Rank r's forward, from its own shard only: a generator that yields a `Collective` where
    tensor parallelism communicates and is sent back its result; returns the float32 logits.

    The same generator runs every rank of the in-process `sharded_forward` (a driver that
    combines the N ranks' yields) and one rank of a torch.distributed group (`distributed.py`,
    whose driver turns each yield into an all-gather), so both paths compute identically.
    Gathers concatenate in rank order, as fairscale's do: the plan says what rank r holds, but
    the order in which the ranks' pieces are joined is the runtime's, not the table's, so a
    table that puts chunks out of rank order gives wrong logits here as it would in Accessory.
    """
    cfg = plan.cfg
    rk = RankShard(plan, r, weights, dtype, device)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    cos, sin = rope_angles(tokens.shape[1], cfg.head_dim, cfg.rope_theta, device=device, scaling=cfg.rope_scaling)

    # ParallelEmbedding: each rank looks up its columns of every token; gathered along D.
    emb = "tok_embeddings.weight"
    part = rk.load(emb, cast=False)[tokens.cpu()].to(device=device, dtype=dtype)
    h = yield Collective("gather", part, gather_layout(plan, emb, 1), emb)

    for L in range(cfg.n_layers):
        n = layer_names(L)
        share = _attention_share(rk, L, rms_norm(h, rk.load(n["attention_norm"]), cfg.norm_eps), cfg, cos, sin)
        if share is None:  # a rank without heads contributes nothing to the all-reduce
            share = torch.zeros_like(h)
        h = h + (yield Collective("sum", share, what=f"layers.{L}.attention"))
        bo = rk.load_bias(n["wo"])  # RowParallelLinear's bias: whole on every rank, added after the all-reduce
        if bo is not None:
            h = h + bo
        share = _moe_share(rk, L, rms_norm(h, rk.load(n["ffn_norm"]), cfg.norm_eps), cfg)
        h = h + (yield Collective("sum", share, what=f"layers.{L}.feed_forward"))

    # ColumnParallelLinear with gather_output: each rank's logit rows, gathered along V.
    out = "output.weight"
    x = rms_norm(h, rk.load("norm.weight"), cfg.norm_eps)
    logits = yield Collective("gather", (x @ rk.load(out).T).float(), gather_layout(plan, out, 0), out)
    return logits


def combine(parts: list[Collective]) -> torch.Tensor:
    """The result of one collective, from every rank's contribution in rank order."""
    c = parts[0]
    if any(p.op != c.op or p.what != c.what for p in parts):
        raise ConvertError(f"ranks disagree on the collective: {[(p.op, p.what) for p in parts]}")
    if c.op == "sum":
        return sum(p.tensor for p in parts)
    if c.replicated:
        return c.tensor
    return torch.cat([p.tensor for p in parts], dim=-1)


@torch.no_grad()
def shard_tensors(plan: Plan, W: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's shard of the in-memory canonical tensors `W`, assembled through the plan as split
    writes them (for checks that need no files: the tests, bench/gpu_parity.py)."""
    from ..io.lazy import Stored
    lazy = {k: Stored(v, k) for k, v in W.items()}
    return [{key: plan.shard_tensor(r, key, lazy).read(0, st.shape[0]).contiguous().reshape(st.shape)
             for key, st in plan.ranks[r].items()} for r in range(plan.N)]


def sharded_forward(plan: Plan, rank_weights, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                    device="cpu") -> torch.Tensor:
    """float32 logits [B, S, V], computed as plan.N ranks would from their shards, in one process.

    rank_weights[r]: rank r's shard, a mapping / .get object / callable shard key -> tensor.
    The ranks advance in lock step from one collective to the next; at each, their
    contributions are combined (`combine`) and the result is sent back to every rank.
    """
    N = plan.N
    if len(rank_weights) != N:
        raise ConvertError(f"the plan has {N} ranks but {len(rank_weights)} shards were given")
    ranks = [rank_steps(plan, r, w, tokens, dtype=dtype, device=device) for r, w in enumerate(rank_weights)]
    parts = [next(g) for g in ranks]
    while True:
        result = combine(parts)
        done = []
        parts = []
        for g in ranks:
            try:
                parts.append(g.send(result))
            except StopIteration as stop:
                done.append(stop.value)
        if done:
            if len(done) != N:
                raise ConvertError("some ranks finished the forward before others")
            return done[0]
