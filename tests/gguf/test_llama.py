"""llama.cpp is the judge: llama-cpp-python loads what `merge --to gguf` wrote and its logits for a
token sequence must be the tool's reference forward's (float32 to 1e-4 relative; float16 and
bfloat16 to their parity tolerance; Q8_0 and the k-quants within bounds over their measured
figures: rms, top-1 agreement, perplexity ratio on a fixed text); its tokenizer must give
SentencePiece's ids; it must load gguf-split pieces from the first. llama.cpp runs in a child process
(tests/llama_judge.py: float32 KV cache, no extra buffer types for llama.cpp issue 20824), so that a
crash in it fails the one test that asked.

Skipped when llama_cpp is not importable (`make test` on a fresh machine), unless
MIXTRAL_CONVERT_LLAMA=required (`make test-llama`, which builds it first), where a missing
llama_cpp fails. MIXTRAL_CONVERT_FIGURES=FILE appends each figure as a JSON line.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf_cases import make_source, merge_gguf, probe_strings
from helpers import cli
from llama_judge import logits as judge_logits
from llama_judge import require_llama, system_info
from llama_judge import tokenize as judge_tokenize

from mixtral_convert.formats.registry import open_checkpoint
from mixtral_convert.forward.reference import forward
from mixtral_convert.io.lazy import materialize

require_llama()

# rows of 256: whole k-quant super-blocks, so llama.cpp applies the k-quant itself, not a fallback type
SHAPE_K = dict(dim=256, n_layers=2, head_dim=32, hidden_dim=256, n_heads=8, n_kv_heads=2, vocab_size=1024,
               num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
TEXT = ("hello world, the quick brown fox jumps over the lazy expert layer token 3.14 mixtral "
        "北京 東京 café naïve x=1; (a,b) foo_bar don't e.g. #include <b> -- ...")
BOUNDS = {  # (rms rel, top-1 agreement, |perplexity ratio - 1|), over what was measured
    "q8_0": (0.06, 0.85, 0.05), "q6_k": (0.1, 0.8, 0.1), "q5_k_m": (0.18, 0.7, 0.2), "q4_k_m": (0.3, 0.6, 0.4)}


def llama_logits(path, tokens: list[int], what: str) -> np.ndarray:
    return judge_logits(path, [tokens], what)[0]


def reference_logits(src, tokens: list[int]) -> np.ndarray:
    ck = open_checkpoint(src)
    return forward(ck.cfg, lambda n: materialize(ck.canonical[n]).float(), torch.tensor([tokens]))[0].numpy()


def text_tokens(src) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(TEXT)


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    lp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), -1)
    nll = -lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean().item()
    return math.exp(nll)


def figures(name: str, got: np.ndarray, ref: np.ndarray, tokens: list[int]) -> dict:
    d = got - ref
    fig = {"case": name, "rms_rel": float(np.linalg.norm(d) / np.linalg.norm(ref)),
           "max_abs": float(np.abs(d).max()), "max_abs_logit": float(np.abs(ref).max()),
           "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
           "ppl_ratio": perplexity(got, tokens) / perplexity(ref, tokens)}
    out = os.environ.get("MIXTRAL_CONVERT_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(fig) + "\n")
    return fig


@pytest.fixture(scope="module")
def src_k(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("gk") / "mixtral-k", SHAPE_K, seed=23)


@pytest.mark.parametrize("case", ["src7-float32", "src7-float16", "src7-bfloat16", "src22-float32",
                                  "src22-bfloat16", "sparse4-float32", "finetune-float32"])
def test_llama_cpp_logits_equal_the_reference_forward(case, request, tmp_path):
    fixture, dtype = case.split("-")
    src = request.getfixturevalue(fixture)
    ref_src = request.getfixturevalue("src7") if fixture in ("sparse4", "finetune") else src
    out = merge_gguf(src, tmp_path / "m.gguf", dtype)
    tokens = text_tokens(ref_src)
    ref = reference_logits(ref_src, tokens)
    fig = figures(case, llama_logits(out, tokens, case), ref, tokens)
    if dtype == "float32":
        assert fig["max_abs"] <= 1e-4 * max(1.0, fig["max_abs_logit"]) and fig["rms_rel"] <= 1e-4, fig
    else:  # the parity tolerances of those storage dtypes (docs/parity.md)
        rms, top1 = {"float16": (0.0125, 0.95), "bfloat16": (0.1, 0.9)}[dtype]
        assert fig["rms_rel"] <= rms and fig["top1"] >= top1, fig
    assert fig["top1"] >= 0.95 and abs(fig["ppl_ratio"] - 1) < 0.02, fig


@pytest.mark.parametrize("dtype", ["q8_0", "q6_k", "q5_k_m", "q4_k_m"])
def test_quantized_figures_within_their_bounds(dtype, src_k, tmp_path, capsys):
    out = merge_gguf(src_k, tmp_path / "m.gguf", dtype)
    tokens = text_tokens(src_k)
    fig = figures(f"src_k-{dtype}", llama_logits(out, tokens, dtype), reference_logits(src_k, tokens), tokens)
    rms, top1, ppl = BOUNDS[dtype]
    assert fig["rms_rel"] <= rms and fig["top1"] >= top1 and abs(fig["ppl_ratio"] - 1) <= ppl, fig
    code, out, err = cli("verify", out, "--source", src_k, "--forward", "--json", capsys=capsys)  # then logits
    assert code == 0 and json.loads(out)["forward"]["tolerance_dtype"] == dtype, out + err


def test_llama_cpp_loads_gguf_split_pieces_from_the_first(src22, tmp_path):
    one = merge_gguf(src22, tmp_path / "one.gguf", "q8_0")
    merge_gguf(src22, tmp_path / "cut.gguf", "q8_0", "--max-shard-size", "60KB")
    pieces = sorted(tmp_path.glob("cut-*-of-*.gguf"))
    assert len(pieces) > 2
    tokens = text_tokens(src22)
    np.testing.assert_array_equal(llama_logits(pieces[0], tokens, "q8_0 pieces"), llama_logits(one, tokens, "q8_0"))


@pytest.mark.parametrize("fixture", ["src7", "src22"])
def test_llama_cpp_tokenizer_gives_sentencepiece_ids(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    out = merge_gguf(src, tmp_path / "m.gguf", "q8_0")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    texts = probe_strings(400, seed=11)
    got = judge_tokenize(out, texts, "q8_0 vocabulary")
    assert (got["bos"], got["eos"]) == (sp.bos_id(), sp.eos_id())
    bad = [s for s, ids in zip(texts, got["ids"], strict=True) if ids != [sp.bos_id()] + sp.encode(s)]
    assert not bad, [(s, sp.encode(s)) for s in bad[:3]]


@pytest.mark.parametrize("bias", [False, True], ids=["lora-norm", "lora-bias-norm"])
def test_a_peft_save_runs_in_llama_cpp_as_its_unmerged_model(src7, tmp_path, capsys, bias):
    """A LoRA + norm tuned PEFT save (N=2, each rank its own lora_a) goes to GGUF with its LoRA merged:
    llama.cpp's logits are the PEFT model's computed unmerged (x W^T + (x A^T) B^T). With non-zero
    biases, which llama.cpp's Mixtral has no place for, --to gguf refuses before writing anything."""
    import peft_save

    from mixtral_convert.forward.run import open_model
    from mixtral_convert.model.config import ModelConfig
    cfg = ModelConfig.from_json_file(src7 / "params.json")
    base, extra, norms = peft_save.make_model(cfg, 2, rank=4, bias=bias, seed=5)
    save = peft_save.write_save(tmp_path / "epoch0", cfg, 2, base, extra, norms, tokenizer=src7 / "tokenizer.model")
    out = tmp_path / "peft.gguf"
    if bias:
        code, _, err = cli("merge", save, "--to", "gguf", "-o", out, "--max-position-embeddings", 4096, capsys=capsys)
        assert code == 2 and "bias" in err and "split" in err and not out.exists(), err
        return
    merge_gguf(save, out, "float32")
    tokens = text_tokens(src7)
    model = open_model(save, torch.float32, "cpu", unmerged=True)
    ref = model.run(torch.tensor([tokens]))[0].numpy()
    fig = figures("peft-lora-norm-float32", llama_logits(out, tokens, "peft float32"), ref, tokens)
    assert fig["max_abs"] <= 1e-4 * max(1.0, fig["max_abs_logit"]) and fig["rms_rel"] <= 1e-4, fig


CRASHING = """
import sys
sys.path.insert(0, {tests!r})
from llama_judge import logits

def test_crashes(monkeypatch):
    monkeypatch.setenv("MIXTRAL_CONVERT_JUDGE_CRASH", "1")
    logits({model!r}, [[1, 2, 3]], "q8_0")

def test_after_the_crash():
    assert logits({model!r}, [[1, 2, 3]], "q8_0").shape[:2] == (1, 3)
"""


def test_a_segfault_in_llama_cpp_is_one_failed_test_not_a_dead_run(src7, tmp_path):
    """A real SIGSEGV in llama_judge's child (MIXTRAL_CONVERT_JUDGE_CRASH=1, after the model is loaded) fails
    the test that asked, naming the file and the type; the next test of the same pytest run runs and passes."""
    model = merge_gguf(src7, tmp_path / "crash.gguf", "q8_0")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(CRASHING).format(tests=tests, model=str(model)))
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_CONVERT_JUDGE_CRASH"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "LlamaCrashed: llama.cpp died (signal SIGSEGV) judging crash.gguf (q8_0)" in out, out


def test_the_judge_loads_without_extra_buffer_types(src7, tmp_path):
    """llama.cpp issue 20824: the AMX buffer type crashes on small Q8_0 weights, so the judge's models are
    loaded with use_extra_bufts off. The build's system info goes to the log (-s shows it)."""
    import llama_cpp
    import llama_judge
    model = merge_gguf(src7, tmp_path / "m.gguf", "q8_0")
    llm = llama_judge._load(llama_cpp, str(model), n_ctx=16)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # patched for the load only
    info = system_info()
    print("llama.cpp system info:", info)
    assert "AVX" in info or "NEON" in info, info
