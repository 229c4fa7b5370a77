"""The trained fixture (fixtures/trained/: a tiny Mixtral trained on CPython's docstrings, see
its README.md): it is what its training script says, the tool's reference forward computes the
training model, and every layout and N computes it too, in fp32 and bf16; greedy generation is
the same in every layout and in transformers. Its measured figures (perplexity, routing, bf16
drift) are asserted where the corpus is on the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from helpers import cli, load
from helpers import greedy as greedy_continuation

from mixtral_convert.forward.reference import forward
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.model.layouts import valid_world_sizes

TRAINED = Path(__file__).resolve().parents[2] / "fixtures" / "trained"
sys.path.insert(0, str(TRAINED))
from measure import drift, held_out_tokens, logits_of, nll, rounded, routing_top1  # noqa: E402
from tinymoe import logits_and_aux  # noqa: E402

CMD = {"base": "split", "sparse": "split-sparse"}
LAYOUTS = [(layout, N) for layout in ("base", "sparse") for N in (1, 2, 4, 8)]
# text written for these tests (not in the corpus), in the style of the docstrings it was trained on
TEXT = ("Return a new list containing the items of the iterable in sorted order. If the key "
        "argument is given, it must be a function of one argument that is used to extract a "
        "comparison key from each element. The default value is None. This function is used by "
        "the module to read the file and return the number of lines in it.")
PROMPTS = ["Return the number of", "If the file does not exist, ", "def __init__(self, "]
NEW = 32


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_json_file(TRAINED / "params.json")


@pytest.fixture(scope="module")
def weights():
    return load(TRAINED / "consolidated.00.pth")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TRAINED / "tokenizer.model"))


@pytest.fixture(scope="module")
def tokens(sp, tmp_path_factory) -> Path:
    """TEXT as [2, 32] token ids: BOS then its first 63 tokens, cut in two rows."""
    ids = ([sp.bos_id()] + sp.encode(TEXT))[:64]
    assert len(ids) == 64
    f = tmp_path_factory.mktemp("trained_tok") / "t.pt"
    torch.save(torch.tensor(ids).view(2, 32), f)
    return f


_CONVERTED: dict = {}


def converted(tmp_path_factory, layout: str, N: int) -> Path:
    if (layout, N) not in _CONVERTED:
        out = tmp_path_factory.mktemp(f"trained-{layout}-{N}") / "out"
        assert cli(CMD[layout], TRAINED, "-n", N, "-o", out, "-q")[0] == 0
        _CONVERTED[layout, N] = out
    return _CONVERTED[layout, N]


# ----- the fixture is what it says ------------------------------------------------------------

def test_fixture_is_a_float32_torrent_of_mixtral_shape(cfg, weights):
    assert sorted(p.name for p in TRAINED.iterdir() if p.is_file() and not p.name.endswith((".py", ".md"))) == [
        "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert "rope_theta" not in json.loads((TRAINED / "params.json").read_text())  # the torrent's default 1e6
    assert (cfg.num_experts, cfg.experts_per_tok, cfg.rope_theta) == (8, 2, 1e6)
    assert cfg.n_heads == 2 * cfg.n_kv_heads  # GQA
    shapes = cfg.canonical_shapes()
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes
    assert {v.dtype for v in weights.values()} == {torch.float32}
    for layout in ("base", "sparse"):
        assert valid_world_sizes(layout, cfg) == [1, 2, 4, 8]


def test_tokenizer_has_mixtral_options(sp, cfg):
    assert sp.get_piece_size() == cfg.vocab_size
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]  # byte fallback
    for s in ("a   b", "  two  spaces\n\tand a tab", "ﬁ ① Ａ", "e\u0301"):
        assert sp.decode(sp.encode(s)) == s  # whitespace kept, identity normalizer (NFKC would fold these)
    assert sp.encode("x 20240", out_type=str)[-5:] == ["2", "0", "2", "4", "0"]  # digits split
    assert sp.encode("😀", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert sp.encode("   return", out_type=str)[0] == "▁▁▁▁"  # a whitespace-only piece, as in code


def test_reference_forward_is_the_training_model(cfg, weights, tokens):
    """The training script's own forward and the tool's reference agree: rope pairs, GQA order,
    routing and the expert weights mean the same thing in both."""
    toks = load(tokens)
    with torch.no_grad():
        want = logits_and_aux(weights, cfg, toks)[0]
    got = forward(cfg, weights, toks)
    scale = want.abs().max().item()
    assert scale > 5  # a trained model's logits, not near-uniform ones
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ----- parity in every layout ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout,N", LAYOUTS, ids=[f"{lay}-N{N}" for lay, N in LAYOUTS])
def test_verify_forward_on_trained(tmp_path_factory, capsys, tokens, layout, N, dtype):
    d = converted(tmp_path_factory, layout, N)
    code, out, _ = cli("verify", d, "--source", TRAINED, "--forward", "--json", "--tokens-file", tokens,
                       "--dtype", dtype, capsys=capsys)
    rep = json.loads(out)
    f = rep["forward"]
    print(f"trained {layout} N={N} {dtype}: max abs {f['max_abs_diff']:.3g} (max |logit| {f['max_abs_logit']:.3g}), "
          f"rms {f['rms_rel_diff']:.3g}, top-1 {f['top1_agreement']}")
    assert code == 0 and rep["ok"] and f["ok"], rep
    assert f["tokens_shape"] == [2, 32]
    if dtype == "float32":
        assert f["max_abs_diff"] <= 1e-5 * f["max_abs_logit"] and f["top1_agreement"] == 1.0
    else:  # well inside the bf16 tolerance (docs/parity.md has the measurements)
        assert f["rms_rel_diff"] <= 0.02 and f["top1_agreement"] >= 0.95


@pytest.fixture(scope="module")
def greedy(cfg, weights):
    """The reference forward's greedy continuation of each prompt (NEW tokens, no EOS among them)."""
    out = {p: greedy_continuation(cfg, weights, TRAINED / "tokenizer.model", p, NEW)[0] for p in PROMPTS}
    for p, new in out.items():
        assert len(new) == NEW and 2 not in new, (p, new)
    return out


@pytest.mark.parametrize("layout,N", LAYOUTS, ids=[f"{lay}-N{N}" for lay, N in LAYOUTS])
def test_greedy_generation_same_in_every_layout(tmp_path_factory, sp, greedy, layout, N):
    """The layout's forward over prompt + the reference's continuation: its most likely next token
    is the reference's at every one of the NEW steps, so its greedy generation is the same
    sequence (by induction on the steps), at one forward per prompt instead of NEW."""
    from mixtral_convert.forward.run import open_model
    model = open_model(converted(tmp_path_factory, layout, N), torch.float32, "cpu")
    assert model.sharded
    for p, want in greedy.items():
        ids = [sp.bos_id()] + sp.encode(p)
        logits = model.run(torch.tensor([ids + want]))[0]
        got = logits[len(ids) - 1:-1].argmax(-1).tolist()
        assert got == want, (p, sp.decode(got), sp.decode(want))


def test_forward_prompt_prints_the_same_continuation(tmp_path_factory, capsys, greedy, sp):
    """`forward --prompt` itself (a forward per new token) on a layout: the reference's first 12."""
    p, k = PROMPTS[0], 12
    code, out, err = cli("forward", converted(tmp_path_factory, "sparse", 2), "--prompt", p, "--new-tokens", k,
                         capsys=capsys)
    assert code == 0, err
    assert f"(ids {greedy[p][:k]})" in out and repr(sp.decode(greedy[p][:k])) in out


def test_greedy_generation_matches_transformers(tmp_path, greedy, sp, monkeypatch):
    """merge --to hf of a sparse N=4 copy, loaded by transformers: its greedy generate (with a
    KV cache) gives the same NEW tokens as the tool's forward (without one)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards, hf = tmp_path / "s4", tmp_path / "hf"
    assert cli("split-sparse", TRAINED, "-n", 4, "-o", shards, "-q")[0] == 0
    assert cli("merge", shards, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", 512)[0] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    for p, want in greedy.items():
        ids = tok(p, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == [sp.bos_id()] + sp.encode(p)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == want, (p, sp.decode(out[0, ids.shape[1]:].tolist()),
                                                        sp.decode(want))


# ----- the README's figures (need the corpus: the machine's CPython standard library) ----------

@pytest.fixture(scope="module")
def held_out():
    try:
        return held_out_tokens(TRAINED / "tokenizer.model", max_rows=32)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_held_out_perplexity(cfg, weights, held_out):
    ppl = torch.tensor(nll(logits_of(cfg, weights, held_out[:, :-1]), held_out)).exp().item()
    print(f"held-out perplexity on {held_out.shape[0]} rows: {ppl:.2f}")
    assert ppl <= cfg.vocab_size / 10


def test_router_is_trained_and_rounding_moves_little(cfg, weights, held_out):
    """The router is far from uniform (a random model's top-1 probability is ~0.33); rounding the
    weights to bf16 moves the logits far less than on a random model of the same shape."""
    from measure import random_like
    inputs = held_out[:8, :-1]
    R = random_like(cfg)
    trained, rand = routing_top1(cfg, weights, inputs), routing_top1(cfg, R, inputs)
    print(f"mean top-1 routing probability: trained {trained}, random {rand}")
    assert all(0.3 <= p <= 0.4 for p in rand)
    assert trained[0] >= 0.45 and all(t > r for t, r in zip(trained, rand, strict=True))
    ref = logits_of(cfg, weights, inputs)
    rms, top1 = drift(ref, logits_of(cfg, rounded(weights), inputs))
    r_ref = logits_of(cfg, R, inputs)
    r_rms, r_top1 = drift(r_ref, logits_of(cfg, rounded(R), inputs))
    print(f"bf16 weights: trained rms rel {rms:.3g} top-1 {top1:.4f}; random {r_rms:.3g} {r_top1:.4f}")
    assert rms <= 0.01 and top1 >= 0.98
    assert rms < r_rms / 3
