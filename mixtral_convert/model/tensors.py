"""The tensor table: every tensor of the model, once, with everything each format needs to know of it.

A `Row` is one kind of tensor: its canonical name pattern (the torrent release's names,
docs/formats.md "Torrent release"), its shape as a function of the config, whether a model may
lack it, its names in the other formats, the transform a format applies to it (HF's q/k
permutation), its short name in the reference forward, and how it is parallelised. Every other
table is derived from this one:
- `canonical_shapes` (what a checkpoint must hold), and `match` (which row a name is);
- the HF name map (`hf_pairs`), the fused layout's names (`fused`) and the forward's names
  (`layer_names`, `expert_name`);
- each Accessory layout's partition table (`layout_table`): a row's rule comes from its
  parallelism (`parallel`), with `sparse` overriding it for the sparse layout's experts.

Placeholders are one syntax for every pattern here and in `layouts`: `{L}` a layer, `{e}` an
expert, `{name:a|b}` one of the alternatives (a named group).

A tensor kind derived from a base weight gets its rule from that weight's parallelism
(`derived_rule`): a bias is split like the weight's output rows; LoRA's A [r, in] and B [out, r]
follow column parallelism (B chunked on rows, A whole on every rank and owned by it) or row
parallelism (A chunked on columns, B whole), and whole experts' ones go with their expert.
A PEFT row is then, for example,
`Row("layers.{L}.attention.wq.lora_b.weight", lora_b("wq"), "column", optional=True)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

# (the config is only passed through: model.config imports this module, not the other way)
Shape = Callable[["ModelConfig"], tuple[int, ...]]  # noqa: F821

# How a tensor is parallelised under Accessory's tensor parallelism (docs/formats.md, "Accessory layouts").
# "owned": whole on every rank, each rank's copy its own (a column-parallel LoRA A;
# docs/formats.md, "Accessory PEFT saves").
PARALLEL = ("embedding", "column", "column_heads", "row_heads", "replicated", "expert", "owned")


@dataclass(frozen=True)
class Row:
    pattern: str  # canonical name, with {L} / {e}
    shape: Shape
    parallel: str  # one of PARALLEL
    short: str = ""  # the reference forward's name for it within its layer or expert
    hf: Optional[str] = None  # HF hub name (model.safetensors)
    permute: Optional[str] = None  # HF permutes its rows for rotate-half rotary, n = this config field
    fused: Optional[str] = None  # Mistral's fused block_sparse_moe name (experts stacked by rows)
    fused_transposed: bool = False  # the fused tensor holds the transpose of each expert's rows
    sparse: Optional[str] = None  # sparse layout: the stacked per-layer tensor this expert slice goes into
    sparse_dim: int = 0  # sparse layout: the expert tensor's FFN dim, sliced across ranks
    optional: bool = False  # a model may lack it (biases)
    gguf: Optional[str] = None  # GGUF name (llama.cpp's); a per-expert row's experts are stacked into it
    gguf_pos: int = 0  # where a layer's tensor comes among the layer's tensors in a GGUF file
    keep_f32: bool = False  # GGUF stores it in F32 whatever the type of the weights (as llama.cpp's converter)
    gguf_per_expert: Optional[str] = None  # llama.cpp's first MoE layout: one GGUF tensor per expert, read only

    def __post_init__(self):
        if self.parallel not in PARALLEL:
            raise ValueError(f"{self.pattern}: parallel must be one of {PARALLEL}, got {self.parallel!r}")

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.pattern

    @property
    def per_layer(self) -> bool:
        return "{L}" in self.pattern


def _q(c) -> int:
    return c.n_heads * c.head_dim


def _kv(c) -> int:
    return c.n_kv_heads * c.head_dim


# The weights. With the bias rows after them (TENSORS), the order is the order of every checkpoint this
# tool writes (torrent, HF, shards): keep it.
_WEIGHTS: tuple[Row, ...] = (
    Row("tok_embeddings.weight", lambda c: (c.vocab_size, c.dim), "embedding", hf="model.embed_tokens.weight",
        gguf="token_embd.weight"),
    Row("layers.{L}.attention.wq.weight", lambda c: (_q(c), c.dim), "column_heads", "wq",
        hf="model.layers.{L}.self_attn.q_proj.weight", permute="n_heads", gguf="blk.{L}.attn_q.weight", gguf_pos=1),
    Row("layers.{L}.attention.wk.weight", lambda c: (_kv(c), c.dim), "column_heads", "wk",
        hf="model.layers.{L}.self_attn.k_proj.weight", permute="n_kv_heads", gguf="blk.{L}.attn_k.weight",
        gguf_pos=2),
    Row("layers.{L}.attention.wv.weight", lambda c: (_kv(c), c.dim), "column_heads", "wv",
        hf="model.layers.{L}.self_attn.v_proj.weight", gguf="blk.{L}.attn_v.weight", gguf_pos=3),
    Row("layers.{L}.attention.wo.weight", lambda c: (c.dim, _q(c)), "row_heads", "wo",
        hf="model.layers.{L}.self_attn.o_proj.weight", gguf="blk.{L}.attn_output.weight", gguf_pos=4),
    Row("layers.{L}.feed_forward.gate.weight", lambda c: (c.num_experts, c.dim), "replicated", "gate",
        hf="model.layers.{L}.block_sparse_moe.gate.weight", fused="layers.{L}.block_sparse_moe.gate.weight",
        gguf="blk.{L}.ffn_gate_inp.weight", gguf_pos=6, keep_f32=True),
    Row("layers.{L}.feed_forward.experts.{e}.w1.weight", lambda c: (c.hidden_dim, c.dim), "expert", "w1",
        hf="model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight", fused="layers.{L}.block_sparse_moe.w1",
        sparse="layers.{L}.feed_forward.w1", sparse_dim=0, gguf="blk.{L}.ffn_gate_exps.weight",
        gguf_per_expert="blk.{L}.ffn_gate.{e}.weight", gguf_pos=7),
    Row("layers.{L}.feed_forward.experts.{e}.w2.weight", lambda c: (c.dim, c.hidden_dim), "expert", "w2",
        hf="model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight", fused="layers.{L}.block_sparse_moe.w2",
        fused_transposed=True, sparse="layers.{L}.feed_forward.w2", sparse_dim=1, gguf="blk.{L}.ffn_down_exps.weight",
        gguf_per_expert="blk.{L}.ffn_down.{e}.weight",
        gguf_pos=8),
    Row("layers.{L}.feed_forward.experts.{e}.w3.weight", lambda c: (c.hidden_dim, c.dim), "expert", "w3",
        hf="model.layers.{L}.block_sparse_moe.experts.{e}.w3.weight", fused="layers.{L}.block_sparse_moe.w3",
        sparse="layers.{L}.feed_forward.w3", sparse_dim=0, gguf="blk.{L}.ffn_up_exps.weight",
        gguf_per_expert="blk.{L}.ffn_up.{e}.weight", gguf_pos=9),
    Row("layers.{L}.attention_norm.weight", lambda c: (c.dim,), "replicated", "attention_norm",
        hf="model.layers.{L}.input_layernorm.weight", gguf="blk.{L}.attn_norm.weight", gguf_pos=0),
    Row("layers.{L}.ffn_norm.weight", lambda c: (c.dim,), "replicated", "ffn_norm",
        hf="model.layers.{L}.post_attention_layernorm.weight", gguf="blk.{L}.ffn_norm.weight", gguf_pos=5),
    Row("norm.weight", lambda c: (c.dim,), "replicated", hf="model.norm.weight", gguf="output_norm.weight"),
    Row("output.weight", lambda c: (c.vocab_size, c.dim), "column", hf="lm_head.weight", gguf="output.weight"),
)

# ----------------------------------------------------------------------------- PEFT
# (docs/formats.md, "Accessory PEFT saves")
# The linears Accessory's mixtral_peft gives a bias and LoRA (short names of their weight rows).
PEFT_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# How a tensor derived from a weight is parallelised, from the weight's parallelism: the bias is split like
# the weight's output rows; LoRA's A [r, in] and B [out, r] follow column parallelism (B on rows, A whole on
# every rank and owned by it) or row parallelism (A on columns, B whole); an expert's go with the expert.
DERIVED = {  # weight's parallel -> (bias, lora_a, lora_b)
    "column_heads": ("column_heads", "owned", "column_heads"),
    "row_heads": ("replicated", "row_heads", "replicated"),
    "expert": ("expert", "expert", "expert"),
}


def _bias_row(w: Row) -> Row:
    return Row(w.pattern.replace(".weight", ".bias"), lambda c, w=w: (w.shape(c)[0],), DERIVED[w.parallel][0],
               w.short, optional=True)


@dataclass(frozen=True)
class LoraRow:
    """The LoRA pair of a weight row: A [r, in] and B [out, r], with their parallelism (DERIVED)."""

    weight: Row
    a: str  # canonical name pattern of A
    b: str
    a_parallel: str
    b_parallel: str

    def shapes(self, cfg, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        out, inp = self.weight.shape(cfg)
        return (rank, inp), (out, rank)

    def rows(self, rank: int) -> tuple[Row, Row]:
        """A and B as rows of the table at LoRA rank `rank`: what the partition Plan expands
        (`layouts.Plan.row_pieces`), as it does the model's own rows."""
        return (Row(self.a, lambda c: self.shapes(c, rank)[0], self.a_parallel, self.weight.short),
                Row(self.b, lambda c: self.shapes(c, rank)[1], self.b_parallel, self.weight.short))


def _lora_row(w: Row) -> LoraRow:
    stem = w.pattern[: -len(".weight")]
    return LoraRow(w, stem + ".lora_a.weight", stem + ".lora_b.weight", *DERIVED[w.parallel][1:])


# Every tensor of the model: the weights, each PEFT linear's bias (optional) right after its weight.
TENSORS: tuple[Row, ...] = tuple(r for w in _WEIGHTS for r in ((w, _bias_row(w)) if w.short in PEFT_LINEARS else (w,)))
# Each PEFT linear's LoRA pair (not tensors of the model: a PEFT save's, merged into the weight on reading).
LORA: tuple[LoraRow, ...] = tuple(_lora_row(w) for w in _WEIGHTS if w.short in PEFT_LINEARS)

# HF names that hold no weight of the model (buffers some old exports carry): read and dropped.
HF_IGNORED: tuple[str, ...] = ("model.layers.{L}.self_attn.rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- patterns
def compile_pattern(pattern: str) -> re.Pattern:
    """A pattern's regex: `{L}`, `{e}` (or any `{name}`) match digits, `{name:a|b}` one of the alternatives."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)(?::([^}]*))?\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{m.group(2) or r'[0-9]+'})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


_ROWS_RX = [(compile_pattern(r.pattern), r) for r in TENSORS]


def match(name: str) -> Optional[tuple[Row, dict[str, str]]]:
    """The row a canonical name is an instance of, with its placeholder values; None if none."""
    for rx, row in _ROWS_RX:
        m = rx.match(name)
        if m:
            return row, m.groupdict()
    return None


def lora_match(name: str) -> Optional[tuple[LoraRow, str, dict[str, str]]]:
    """(the LoRA row, "a" or "b", its placeholder values) of a canonical LoRA tensor name; None if none."""
    for lr in LORA:
        for which, pattern in (("a", lr.a), ("b", lr.b)):
            m = compile_pattern(pattern).match(name)
            if m:
                return lr, which, m.groupdict()
    return None


def parallel_of(name: str) -> Optional[str]:
    """How a canonical tensor (a LoRA A or B included) is parallelised (PARALLEL); None for no tensor of the table."""
    hit = match(name)
    if hit is not None:
        return hit[0].parallel
    lora = lora_match(name)
    if lora is None:
        return None
    return lora[0].a_parallel if lora[1] == "a" else lora[0].b_parallel


def row(short: str) -> Row:
    """The weight row of a layer's or expert's tensor by its short name ('wq', 'w2', ...)."""
    for r in _WEIGHTS:
        if r.short == short:
            return r
    raise KeyError(short)


# ----------------------------------------------------------------------------- expansions
def expand(cfg, optional: bool = False) -> dict[str, tuple[Row, tuple[int, ...]]]:
    """Every tensor name the config implies -> (its row, its shape), in the table's order: rows
    before the layers, each layer's rows with each expert's rows in place, rows after. Optional
    rows only when `optional`."""
    rows = [r for r in TENSORS if optional or not r.optional]
    out: dict[str, tuple[Row, tuple[int, ...]]] = {}
    i = 0
    while i < len(rows):
        if not rows[i].per_layer:
            out[rows[i].pattern] = (rows[i], rows[i].shape(cfg))
            i += 1
            continue
        j = i
        while j < len(rows) and rows[j].per_layer:
            j += 1
        group = rows[i:j]
        for L in range(cfg.n_layers):
            k = 0
            while k < len(group):
                if not group[k].per_expert:
                    out[group[k].pattern.format(L=L)] = (group[k], group[k].shape(cfg))
                    k += 1
                    continue
                m = k
                while m < len(group) and group[m].per_expert:
                    m += 1
                for e in range(cfg.num_experts):
                    for r in group[k:m]:
                        out[r.pattern.format(L=L, e=e)] = (r, r.shape(cfg))
                k = m
        i = j
    return out


def canonical_shapes(cfg, optional: bool = False) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name -> its shape, in a stable order (optional rows when asked)."""
    return {name: shape for name, (_, shape) in expand(cfg, optional).items()}


def hf_pairs() -> list[tuple[str, Optional[str]]]:
    """(canonical pattern, HF pattern) for every row HF has, then (None, HF pattern) for HF names dropped."""
    return [(r.pattern, r.hf) for r in TENSORS if r.hf] + [(None, h) for h in HF_IGNORED]


def gguf_rows() -> list[Row]:
    """The rows a GGUF file holds, in the file's order: the rows before the layers, a layer's rows
    by `gguf_pos`, the rows after the layers."""
    rows = [r for r in TENSORS if r.gguf]
    first = next(i for i, r in enumerate(rows) if r.per_layer)
    return [r for r in rows[:first] if not r.per_layer] + sorted((r for r in rows if r.per_layer),
                                                                 key=lambda r: r.gguf_pos) + \
        [r for r in rows[first:] if not r.per_layer]


_GGUF_RX = [(compile_pattern(r.gguf), r) for r in TENSORS if r.gguf]


def gguf_match(name: str) -> Optional[tuple[Row, dict[str, str]]]:
    """The row a GGUF tensor name is (its experts stacked, for a per-expert row), with its placeholder
    values; None if none."""
    for rx, r in _GGUF_RX:
        m = rx.match(name)
        if m:
            return r, m.groupdict()
    return None


def bias_name(weight: str) -> str:
    """The canonical name of a weight's bias ('layers.0.attention.wq.weight' -> '...wq.bias')."""
    return weight[: -len(".weight")] + ".bias"


def layer_names(L: int) -> dict[str, str]:
    """Short name -> canonical name of layer L's tensors that are not per expert."""
    return {r.short: r.pattern.format(L=L) for r in TENSORS if r.per_layer and not r.per_expert and not r.optional}


def expert_name(L: int, e: int, short: str) -> str:
    """Canonical name of layer L's expert e's tensor `short` ('w1', 'w2' or 'w3')."""
    return row(short).pattern.format(L=L, e=e)


def fused_rows() -> list[Row]:
    """The rows Mistral's fused layout names otherwise (the router and the stacked experts)."""
    return [r for r in TENSORS if r.fused]


_SPARSE_RX = [compile_pattern(r.sparse) for r in TENSORS if r.sparse]
_FUSED_RX = [compile_pattern(r.fused) for r in TENSORS if r.fused and r.per_expert]


def is_sparse_stack(name: str) -> bool:
    """Whether `name` is one of the sparse layout's per-layer stacked expert tensors (feed_forward.w1, ...)."""
    return any(rx.match(name) for rx in _SPARSE_RX)


def is_fused(name: str) -> bool:
    """Whether `name` is one of Mistral's fused expert tensors (block_sparse_moe.w1, ...)."""
    return any(rx.match(name) for rx in _FUSED_RX)
