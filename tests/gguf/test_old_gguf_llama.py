"""llama.cpp judges the restack (issue 27): today's llama.cpp refuses each old per-expert file (the tool's
own q8_0 and k-quant outputs rewritten by old_layout.py) and loads the restacked one, whose tensors are
the original stacked file's byte for byte and whose logits equal the original's; a k-quant source
dequantized into an Accessory shard is gguf.quants.dequantize of it, bit for bit in float32.
llama.cpp runs in a child process (tests/llama_judge.py). Skipped without llama_cpp unless
MIXTRAL_CONVERT_LLAMA=required, as test_llama.py."""

import hashlib

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGUFReader, quants
from gguf_cases import make_source, merge_gguf
from helpers import cli, load
from llama_judge import LlamaCrashed, LlamaError, require_llama
from llama_judge import logits as judge_logits
from old_layout import to_per_expert

require_llama()

# rows of 256: whole k-quant super-blocks, so llama.cpp applies the k-quant itself (as test_llama.SHAPE_K)
SHAPE_K = dict(dim=256, n_layers=2, head_dim=32, hidden_dim=256, n_heads=8, n_kv_heads=2, vocab_size=1024,
               num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
TEXT = "hello world, the quick brown fox jumps over the lazy expert layer token 3.14 mixtral café x=1; (a,b)"
ORDER = [5, 0, 7, 1, 6, 2, 4, 3]


@pytest.fixture(scope="module")
def src_k(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("ok") / "mixtral-k", SHAPE_K, seed=27)


def tokens_of(src) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(TEXT)


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["src7-q8_0", "src_k-q4_k_m", "src_k-q6_k"])
def test_llama_cpp_refuses_the_old_file_and_loads_the_restacked_one(case, request, tmp_path, capsys):
    fixture, dtype = case.split("-")
    src = request.getfixturevalue(fixture)
    stacked = merge_gguf(src, tmp_path / "stacked.gguf", dtype)
    old = to_per_expert(stacked, tmp_path / "old.gguf", experts=ORDER)
    tokens = tokens_of(src)
    with pytest.raises(LlamaError) as refused:
        judge_logits(old, [tokens], f"old {dtype}")
    assert not isinstance(refused.value, LlamaCrashed), refused.value
    new = tmp_path / "new.gguf"
    code, _, err = cli("merge", old, "--to", "gguf", "-o", new, "-q", capsys=capsys)
    assert code == 0, err
    want = {t.name: t for t in GGUFReader(stacked).tensors}
    got = {t.name: t for t in GGUFReader(new).tensors}
    assert list(got) == list(want)
    assert all(got[n].tensor_type == t.tensor_type and np.array_equal(got[n].data, t.data) for n, t in want.items())
    assert sha(new) == sha(stacked)
    np.testing.assert_array_equal(judge_logits(new, [tokens], f"restacked {dtype}"),
                                  judge_logits(stacked, [tokens], f"stacked {dtype}"))
    assert cli("verify", new, "--source", old, "-q", capsys=capsys)[0] == 0


def test_mixed_k_quant_experts_converted_with_the_flag_load_in_llama_cpp(src_k, tmp_path, capsys):
    """Layer 0's ffn_up experts 1 and 6 from the Q8_0 file, the rest the Q4_K_M file's: refused, naming both
    types; with --convert-mixed-experts q8_0 the other experts are converted (gguf's dequantize, then Q8_0),
    and llama.cpp runs the file within Q8_0's rounding of the Q4_K_M file's logits."""
    q4 = merge_gguf(src_k, tmp_path / "q4.gguf", "q4_k_m")
    q8 = merge_gguf(src_k, tmp_path / "q8.gguf", "q8_0")
    mixed = to_per_expert(q4, tmp_path / "mixed.gguf", mixed={(0, "up"): (q8, [1, 6])})
    kq = {t.name: t for t in GGUFReader(q4).tensors}["blk.0.ffn_up_exps.weight"].tensor_type.name
    out = tmp_path / "n.gguf"
    code, _, err = cli("merge", mixed, "--to", "gguf", "-o", out, capsys=capsys)
    assert code == 2 and f"{kq}: experts 0, 2, 3, 4, 5, 7" in err and "Q8_0: experts 1, 6" in err, err
    code, _, err = cli("merge", mixed, "--to", "gguf", "-o", out, "--convert-mixed-experts", "q8_0", capsys=capsys)
    assert code == 0 and f"from {kq} converted to Q8_0" in err, err
    tokens = tokens_of(src_k)
    got, ref = judge_logits(out, [tokens], "converted")[0], judge_logits(q4, [tokens], "q4_k_m")[0]
    rms = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert np.isfinite(got).all() and rms < 0.05, rms


def test_a_k_quant_dequantized_into_an_accessory_shard_is_gguf_dequantize_bit_for_bit(src_k, tmp_path, capsys):
    q4 = merge_gguf(src_k, tmp_path / "q4.gguf", "q4_k_m")
    out = tmp_path / "acc"
    code, _, err = cli("split", q4, "-n", 1, "-o", out, "--dequantize", "--dtype", "float32", "--tokenizer",
                       src_k / "tokenizer.model", "-q", capsys=capsys)
    assert code == 0, err
    shard = load(out / "consolidated.00-of-01.model.pth")
    types = set()
    for t in GGUFReader(q4).tensors:
        values = quants.dequantize(np.ascontiguousarray(t.data), t.tensor_type).astype(np.float32)
        if t.name == "blk.1.ffn_down_exps.weight":
            for e in range(8):
                got = shard[f"llma.layers.1.feed_forward.experts.{e}.w2.weight"]
                assert torch.equal(got.view(torch.int32), torch.from_numpy(values[e]).view(torch.int32)), e
            types.add(t.tensor_type.name)
        elif t.name in ("token_embd.weight", "blk.0.attn_v.weight", "output.weight"):
            key = {"token_embd.weight": "llma.tok_embeddings.weight", "blk.0.attn_v.weight":
                   "llma.layers.0.attention.wv.weight", "output.weight": "llma.output.weight"}[t.name]
            assert torch.equal(shard[key].view(torch.int32), torch.from_numpy(values).view(torch.int32)), t.name
            types.add(t.tensor_type.name)
    assert any(k.endswith("_K") for k in types), types  # a k-quant among them
