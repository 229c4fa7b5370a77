"""The tensor table (model.tensors): every other name and shape table is derived from it."""

import torch

from mixtral_convert.model import layouts, names, tensors
from mixtral_convert.model.tensors import Row
from mixtral_convert.synth import tiny_config


def test_canonical_shapes_in_the_order_every_output_is_written():
    cfg = tiny_config(n_layers=1, num_experts=2, dim=8, head_dim=2, n_heads=4, n_kv_heads=2, hidden_dim=6,
                      vocab_size=10, experts_per_tok=1)
    want = [("tok_embeddings.weight", (10, 8)),
            ("layers.0.attention.wq.weight", (8, 8)), ("layers.0.attention.wk.weight", (4, 8)),
            ("layers.0.attention.wv.weight", (4, 8)), ("layers.0.attention.wo.weight", (8, 8)),
            ("layers.0.feed_forward.gate.weight", (2, 8)),
            ("layers.0.feed_forward.experts.0.w1.weight", (6, 8)),
            ("layers.0.feed_forward.experts.0.w2.weight", (8, 6)),
            ("layers.0.feed_forward.experts.0.w3.weight", (6, 8)),
            ("layers.0.feed_forward.experts.1.w1.weight", (6, 8)),
            ("layers.0.feed_forward.experts.1.w2.weight", (8, 6)),
            ("layers.0.feed_forward.experts.1.w3.weight", (6, 8)),
            ("layers.0.attention_norm.weight", (8,)), ("layers.0.ffn_norm.weight", (8,)),
            ("norm.weight", (8,)), ("output.weight", (10, 8))]
    assert list(cfg.canonical_shapes().items()) == want


def test_derived_tables():
    assert names.canonical_to_hf("layers.3.attention.wq.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert names.hf_to_canonical("model.layers.3.block_sparse_moe.experts.5.w2.weight") == \
        "layers.3.feed_forward.experts.5.w2.weight"
    assert names.hf_ignored("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert names.PERMUTED_QK == {"layers.{L}.attention.wq.weight": "n_heads",
                                 "layers.{L}.attention.wk.weight": "n_kv_heads"}
    assert tensors.layer_names(2)["wo"] == "layers.2.attention.wo.weight"
    assert tensors.expert_name(1, 7, "w3") == "layers.1.feed_forward.experts.7.w3.weight"
    rule, m = layouts.rule_for("sparse", "layers.1.feed_forward.experts.7.w2.weight")
    assert isinstance(rule, layouts.ExpertSlice) and rule.transpose and rule.into == "layers.{L}.feed_forward.w2"
    assert isinstance(layouts.rule_for("base", "layers.0.attention.wo.weight")[0], layouts.Chunk)
    assert tensors.is_sparse_stack("layers.4.feed_forward.w3") and tensors.is_fused("layers.4.block_sparse_moe.w1")


def test_a_new_row_is_one_line(monkeypatch):
    """An optional per-layer row (a bias, say) lands in its layer, after the rows before it, and
    only when optional rows are asked for."""
    bias = Row("layers.{L}.attention.wq.bias", lambda c: (c.n_heads * c.head_dim,), "column_heads", optional=True)
    rows = list(tensors.TENSORS)
    rows.insert(2, bias)  # after wq
    monkeypatch.setattr(tensors, "TENSORS", tuple(rows))
    cfg = tiny_config(n_layers=2)
    plain, full = tensors.canonical_shapes(cfg), tensors.canonical_shapes(cfg, optional=True)
    assert "layers.0.attention.wq.bias" not in plain
    keys = list(full)
    assert keys[keys.index("layers.1.attention.wq.weight") + 1] == "layers.1.attention.wq.bias"
    assert full["layers.1.attention.wq.bias"] == (cfg.n_heads * cfg.head_dim,)
    assert isinstance(layouts.row_rule(bias, "base"), layouts.Chunk)


def test_gguf_names_are_a_column_of_the_table_read_and_written_through_one_op_pair():
    """GGUF's names come from the table's `gguf` column, matched by the one pattern compiler; the
    writer's stacking of experts and the reader's unstacking name the same canonical tensors in
    the same order; the router is the one 2-D row GGUF keeps in F32."""
    from mixtral_convert.formats.gguf import write as gguf
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.model import tensors
    from mixtral_convert.synth import tiny_config

    cfg = tiny_config()
    canonical = {k: Stored(torch.zeros(s), name=k) for k, s in cfg.canonical_shapes().items()}
    written = gguf.gguf_tensors(cfg, canonical, "float16")
    assert [t.info.name for t in written][:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert len(written) == 2 + cfg.n_layers * 10 + 1
    seen = []
    for t in written:
        row, m = tensors.gguf_match(t.info.name)
        names = [n for n, _ in gguf.unstack(row, m.get("L"), 0, t.info.shape[0], 1)]
        assert names == [s.name for s in t.sources]  # unstack is stack's inverse
        assert (t.info.ggml_type == gguf.T.F32) == (len(t.info.shape) == 1 or row.keep_f32)
        seen += names
    assert sorted(seen) == sorted(canonical)
    assert [r.short for r in tensors.TENSORS if r.keep_f32] == ["gate"]
    assert tensors.gguf_match("blk.7.ffn_down_exps.weight")[0] is tensors.row("w2")
    assert tensors.gguf_match("blk.x.ffn_down_exps.weight") is None
