"""A base + an HF PEFT LoRA adapter merged to GGUF runs in llama.cpp as peft's unmerged model: llama.cpp's
logits (in a child process, tests/llama_judge.py) equal peft's PeftModel logits in transformers, float32."""

import sys
from pathlib import Path

import pytest
import torch
from gguf_cases import merge_gguf
from helpers import cli
from llama_judge import logits as judge_logits
from llama_judge import require_llama
from test_llama import figures, text_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
import peft_make as pk

require_llama()
pytest.importorskip("peft")

FORMS = {
    "experts-router-attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate"],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "rslora-dora": dict(r=4, lora_alpha=6, use_rslora=True, use_dora=True,
                        target_modules=["q_proj", "k_proj", "lm_head"]),
    "embedding-modules_to_save": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"],
                                      modules_to_save=["model.norm"]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_adapter_to_gguf_gives_peft_logits_in_llama_cpp(src7, tmp_path, form):
    hf = tmp_path / "hf"
    code, _, err = cli("merge", src7, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", "4096")
    assert code == 0, err
    ad = pk.make_adapter(hf, tmp_path / "ad", seed=3, **FORMS[form])
    tokens = text_tokens(src7)
    ref = pk.peft_logits(hf, ad, torch.tensor([tokens]))[0].numpy()
    out = merge_gguf(src7, tmp_path / "m.gguf", "float32", "--adapter", ad)
    got = judge_logits(out, [tokens], f"adapter {form}")[0]
    base = judge_logits(merge_gguf(src7, tmp_path / "base.gguf", "float32"), [tokens], "base")[0]
    fig = figures(f"adapter-{form}-float32", got, ref, tokens)
    assert fig["max_abs"] <= 1e-4 * max(1.0, fig["max_abs_logit"]) and fig["rms_rel"] <= 1e-4, fig
    assert abs(base - ref).max() > 1e-2 * fig["max_abs_logit"]  # the adapter matters
