"""The shards hold what docs/formats.md ("Accessory layouts") says, checked from first principles here
(not through the partition table), so a wrong table rule cannot pass by agreeing with itself."""

import json

import pytest
import torch
from helpers import cli, load, same_bytes

from mixtral_convert.model.tensors import compile_pattern


@pytest.fixture(scope="module")
def canonical(wide_src):
    return load(wide_src / "consolidated.00.pth")


@pytest.mark.parametrize("N", [2, 4, 8])
def test_base_layout(wide_src, tmp_path_factory, capsys, canonical, N):
    out = tmp_path_factory.mktemp("base") / "o"
    assert cli("split", wide_src, "-n", N, "-o", out, "-q", capsys=capsys)[0] == 0
    p = json.loads((wide_src / "params.json").read_text())
    E, D, V, hd = p["moe"]["num_experts"], p["dim"], p["vocab_size"], p["head_dim"]
    KV, NH = p["n_kv_heads"], p["n_heads"]
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "mixtral"}
    for r in range(N):
        sd = load(out / f"consolidated.{r:02d}-of-{N:02d}.model.pth")
        assert all(k.startswith("llma.") for k in sd)
        c = lambda k: canonical[k]  # noqa: E731
        assert same_bytes(sd["llma.tok_embeddings.weight"], c("tok_embeddings.weight")[:, r * D // N:(r + 1) * D // N])
        assert same_bytes(sd["llma.output.weight"], c("output.weight")[r * V // N:(r + 1) * V // N])
        assert same_bytes(sd["llma.norm.weight"], c("norm.weight"))
        for L in range(p["n_layers"]):
            a = f"layers.{L}.attention."
            q, kv = slice(r * NH * hd // N, (r + 1) * NH * hd // N), slice(r * KV * hd // N, (r + 1) * KV * hd // N)
            assert same_bytes(sd["llma." + a + "wq.weight"], c(a + "wq.weight")[q])
            assert same_bytes(sd["llma." + a + "wk.weight"], c(a + "wk.weight")[kv])
            assert same_bytes(sd["llma." + a + "wv.weight"], c(a + "wv.weight")[kv])
            assert same_bytes(sd["llma." + a + "wo.weight"], c(a + "wo.weight")[:, q])
            gate = f"layers.{L}.feed_forward.gate.weight"
            assert same_bytes(sd["llma." + gate], c(gate))
            held = sorted({int(k.split(".")[5]) for k in sd if ".experts." in k and k.startswith(f"llma.layers.{L}.")})
            assert held == list(range(r * E // N, (r + 1) * E // N))
            for e in held:
                for w in ("w1", "w2", "w3"):
                    k = f"layers.{L}.feed_forward.experts.{e}.{w}.weight"
                    assert same_bytes(sd["llma." + k], c(k))


@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_sparse_layout(wide_src, tmp_path_factory, capsys, canonical, N):
    out = tmp_path_factory.mktemp("sparse") / "o"
    assert cli("split-sparse", wide_src, "-n", N, "-o", out, "-q", capsys=capsys)[0] == 0
    p = json.loads((wide_src / "params.json").read_text())
    E, H = p["moe"]["num_experts"], p["hidden_dim"]
    Hs = H // N
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "mixtral_sparse"}
    for r in range(N):
        sd = load(out / f"consolidated.{r:02d}-of-{N:02d}.model.pth")
        assert not [k for k in sd if ".experts." in k]
        for L in range(p["n_layers"]):
            f = f"llma.layers.{L}.feed_forward."
            assert sd[f + "w1"].shape == (E * Hs, p["dim"]) and sd[f + "w2"].shape == (E * Hs, p["dim"])
            for e in range(E):
                x = f"layers.{L}.feed_forward.experts.{e}."
                rows = slice(e * Hs, (e + 1) * Hs)
                assert same_bytes(sd[f + "w1"][rows], canonical[x + "w1.weight"][r * Hs:(r + 1) * Hs])
                assert same_bytes(sd[f + "w3"][rows], canonical[x + "w3.weight"][r * Hs:(r + 1) * Hs])
                assert same_bytes(sd[f + "w2"][rows], canonical[x + "w2.weight"][:, r * Hs:(r + 1) * Hs].t())


def test_config_json_is_what_accessory_accepts(wide_src, tmp_path, capsys):
    assert cli("split", wide_src, "-n", 2, "-o", tmp_path / "o", "-q", capsys=capsys)[0] == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    allowed = {"dim", "hidden_dim", "head_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps",
               "rope_theta", "moe", "load_balancing_weight", "rope_scaling", "max_seq_len", "max_batch_size"}
    assert set(cfg) <= allowed
    assert cfg["hidden_dim"] == 48 and cfg["rope_theta"] == 1e6  # torrent params.json lacks rope_theta
    assert cfg["moe"] == {"num_experts_per_tok": 2, "num_experts": 8}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "o" / "tokenizer.model"))
    assert sp.get_piece_size() == cfg["vocab_size"]


# ----- the table's own guarantees -------------------------------------------------------------

def test_world_size_error_carries_the_valid_sizes():
    from mixtral_convert.errors import ConvertError, WorldSizeError
    from mixtral_convert.model.layouts import Plan, valid_world_sizes
    from mixtral_convert.synth import tiny_config
    cfg = tiny_config(num_experts=4, n_kv_heads=2, n_heads=4, head_dim=16, dim=64, hidden_dim=96)
    with pytest.raises(WorldSizeError) as e:
        Plan("base", cfg, 3, {k: torch.bfloat16 for k in cfg.canonical_shapes()})
    assert isinstance(e.value, ConvertError)
    assert (e.value.N, e.value.layout) == (3, "base") and e.value.valid == valid_world_sizes("base", cfg) == [1, 2]


def test_replicated_tensors_are_read_from_the_rank_the_table_names(wide_src, tmp_path, capsys, monkeypatch):
    """A replicated tensor's copies can differ (a shard edited by hand, a finetune that let the
    ranks drift); merge takes the copy of the rank the table names, never whichever comes first."""
    from helpers import write_pth

    from mixtral_convert.model import layouts
    d = tmp_path / "b2"
    assert cli("split", wide_src, "-n", 2, "-o", d, "-q", capsys=capsys)[0] == 0
    f1 = d / "consolidated.01-of-02.model.pth"
    sd = {k: v.clone() for k, v in load(f1).items()}
    sd["llma.norm.weight"] = sd["llma.norm.weight"] + 1
    write_pth(f1, sd)
    rank0 = load(d / "consolidated.00-of-02.model.pth")["llma.norm.weight"]

    def merged_norm(name):
        assert cli("merge", d, "-o", tmp_path / name, "-q", capsys=capsys)[0] == 0
        return load(tmp_path / name / "consolidated.00.pth")["norm.weight"]

    assert same_bytes(merged_norm("m0"), rank0)
    table = [(p, layouts.Replicate(read_from=1) if isinstance(r, layouts.Replicate) else r)
             for p, r in layouts.TABLES["base"]]
    monkeypatch.setitem(layouts._COMPILED, "base", [(compile_pattern(p), r) for p, r in table])
    assert same_bytes(merged_norm("m1"), sd["llma.norm.weight"])


def test_pieces_that_do_not_tile_are_a_convert_error(monkeypatch):
    """A table whose pieces overlap in a shard tensor is refused with ConvertError (not an
    assert, which python -O would drop)."""
    from mixtral_convert.errors import ConvertError
    from mixtral_convert.model import layouts
    from mixtral_convert.synth import tiny_config

    class Overlapping(layouts.ExpertSlice):
        def pieces(self, name, shape, m, r, N, cfg):
            return [layouts.Piece(p.rank, p.key, 0, p.src, p.dim, p.start, p.stop, p.transpose)
                    for p in super().pieces(name, shape, m, r, N, cfg)]  # every expert at row 0

    table = [(p, Overlapping(r.dim, r.into, r.transpose) if isinstance(r, layouts.ExpertSlice) else r)
             for p, r in layouts.TABLES["sparse"]]
    monkeypatch.setitem(layouts._COMPILED, "sparse", [(compile_pattern(p), r) for p, r in table])
    cfg = tiny_config()
    with pytest.raises(ConvertError, match="gap or overlap"):
        layouts.Plan("sparse", cfg, 2, {k: torch.bfloat16 for k in cfg.canonical_shapes()})


def test_an_overlap_with_a_gap_of_the_same_size_is_refused_naming_the_tensor(monkeypatch):
    """Pieces that cover the right number of elements but overlap where they should meet leave a
    gap of the same size, which merge would fill from a reused buffer: tiling is checked as
    intervals, so the count alone cannot pass it."""
    from mixtral_convert.errors import ConvertError
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.model import layouts
    from mixtral_convert.synth import tiny_config

    class Shifted(layouts.Chunk):  # rank 1 holds rank 0's rows again: rows [n, 2n) are nobody's
        def pieces(self, name, shape, m, r, N, cfg):
            n, s = shape[self.dim] // N, 0 if r == 1 else r
            return [layouts.Piece(r, layouts.PREFIX + name, 0, name, self.dim, s * n, (s + 1) * n)]

    cfg = tiny_config()
    dtypes = {k: torch.float32 for k in cfg.canonical_shapes()}
    plan = layouts.Plan("base", cfg, 2, dtypes)
    shards = [{k: Stored(torch.zeros(st.shape)) for k, st in rank.items()} for rank in plan.ranks]
    plan.canonical_tensor("output.weight", shards)  # the true table tiles

    table = [(p, Shifted(0) if p == "output.weight" else r) for p, r in layouts.TABLES["base"]]
    monkeypatch.setitem(layouts._COMPILED, "base", [(compile_pattern(p), r) for p, r in table])
    bad = layouts.Plan("base", cfg, 2, dtypes)
    ps = bad.by_source["output.weight"]
    assert sum((p.stop - p.start) for p in ps) == cfg.canonical_shapes()["output.weight"][0]  # the count agrees
    with pytest.raises(ConvertError, match=r"tensor 'output.weight' .*overlap at rows 0:"):
        bad.canonical_tensor("output.weight", shards)


@pytest.mark.parametrize("regions,problem", [
    ([(0, 4, 0, 3), (0, 4, 3, 6)], None),
    ([(0, 2, 0, 6), (2, 4, 0, 3), (2, 4, 3, 6)], None),
    ([(0, 4, 0, 3), (0, 4, 2, 5)], "overlap at rows 0:4, column 2"),
    ([(0, 4, 0, 3), (0, 2, 3, 6), (0, 2, 3, 6)], "overlap at rows 0:2, column 3"),
    ([(0, 4, 0, 3), (0, 2, 3, 6)], "gap at rows 2:4, column 3"),
    ([(0, 4, 0, 3), (0, 4, 3, 7)], "lies outside it"),
])
def test_tiling_is_checked_as_intervals(regions, problem):
    from mixtral_convert.errors import ConvertError
    from mixtral_convert.io.tiles import check_tiling
    if problem is None:
        assert check_tiling("t", (4, 6), regions, "fix it") is None
        return
    with pytest.raises(ConvertError, match=f"tensor 't' \\[4, 6\\]: .*{problem}.*; fix it"):
        check_tiling("t", (4, 6), regions, "fix it")


def test_tiling_of_one_dimensional_tensors():
    from mixtral_convert.errors import ConvertError
    from mixtral_convert.io.tiles import check_tiling
    check_tiling("v", (6,), [(3, 6, None, None), (0, 3, None, None)], "x")
    with pytest.raises(ConvertError, match="overlap at rows 2:3"):
        check_tiling("v", (6,), [(0, 3, None, None), (2, 5, None, None), (5, 6, None, None)], "x")
    with pytest.raises(ConvertError, match="gap at rows 3:4"):
        check_tiling("v", (6,), [(0, 3, None, None), (4, 6, None, None)], "x")


def test_the_package_has_no_assert_statement():
    """python -O drops asserts: a check that must hold is a raise."""
    import ast
    from pathlib import Path

    import mixtral_convert
    found = [f"{p.name}:{n.lineno}" for p in Path(mixtral_convert.__file__).parent.rglob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Assert)]
    assert found == []
