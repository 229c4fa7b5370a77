"""HF PEFT LoRA adapters merged by the tool, judged by peft itself: for each form peft saves, the tool's
`merge --adapter --to hf` output gives, in transformers, peft's unmerged PeftModel logits (docs/formats.md,
"HF PEFT LoRA adapters"). Each adapter is made (or, for the hub layout, loaded and converted) by peft."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_make as pk
from helpers import cli

pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FORMS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate"], target_parameters=EXPERTS),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=ATTN + ["gate"], target_parameters=EXPERTS),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate"], target_parameters=EXPERTS,
                     rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 24, "gate_up_proj": 3}),
    "up_only": dict(r=3, lora_alpha=5, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    "down_only": dict(r=3, lora_alpha=5, target_modules=[], target_parameters=["mlp.experts.down_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN + ["lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "fan_in_fan_out": dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=ATTN),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                            modules_to_save=["lm_head", "embed_tokens", "model.norm", "post_attention_layernorm"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_base")
    cfg = pk.tiny_cfg()
    src, hf = pk.base_dirs(root, cfg, lambda *a: cli(*a))
    return cfg, src, hf, pk.hf_logits(hf)


def judge(tmp_path, hf, base_logits, adapter, src, case=None):
    """The tool's merge of `adapter` into `src`, written as HF, gives peft's logits; the adapter matters."""
    ref = pk.peft_logits(hf, adapter)
    out = tmp_path / "merged_hf"
    code, _, err = cli("merge", src, "--adapter", adapter, "--to", "hf", "-o", out, "-q",
                       "--max-position-embeddings", "4096")
    assert code == 0, err
    got = pk.hf_logits(out)
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    moved = (base_logits - ref).abs().max().item()
    out_figures = os.environ.get("MIXTRAL_CONVERT_FIGURES")
    if out_figures:  # docs/parity.md's table of adapter forms
        with open(out_figures, "a") as f:
            f.write(json.dumps({"case": adapter.name if case is None else case, "max_abs": diff,
                                "max_abs_logit": scale, "base_moved": moved}) + "\n")
    assert diff <= 1e-4 * scale, (diff, scale)
    assert moved > 1e-2 * scale, moved  # the adapter changes the model, so the comparison means something
    return diff / scale


@pytest.mark.parametrize("form", list(FORMS))
def test_peft_form_merged_gives_peft_logits(tmp_path, bases, form):
    cfg, src, hf, base_logits = bases
    adapter = pk.make_adapter(hf, tmp_path / "adapter", seed=list(FORMS).index(form), **FORMS[form])
    judge(tmp_path, hf, base_logits, adapter, src, form)


def test_adapter_model_bin_read_with_weights_only(tmp_path, bases):
    """An adapter saved as adapter_model.bin (a pickle, read with weights_only=True) merges like the safetensors."""
    cfg, src, hf, base_logits = bases
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(pk.load_hf(hf), LoraConfig(init_lora_weights=False, **FORMS["plain"]))
    pk.randomize_lora(pm, 11)
    pm.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    judge(tmp_path, hf, base_logits, tmp_path / "adapter", src, "adapter_model.bin")


@pytest.mark.parametrize("rslora", [False, True])
def test_hub_per_expert_layout_gives_peft_logits(tmp_path, bases, rslora):
    """The hub's layout (per-expert w1/w2/w3, block_sparse_moe.gate), which peft 0.21 converts on loading.
    With rsLoRA only w2 of the experts: peft 0.21 fuses w1 and w3 into gate_up_proj with r and alpha doubled,
    which keeps alpha/r but makes rsLoRA's alpha/sqrt(r) sqrt(2) larger than the adapter was trained with
    (transformers 4: each of w1, w3 its own module); the tool keeps each module's own scale."""
    cfg, src, hf, base_logits = bases
    experts = ("w2",) if rslora else ("w1", "w2", "w3")
    adapter = pk.hub_adapter(tmp_path / "hub", cfg, use_rslora=rslora, experts=experts)
    judge(tmp_path, hf, base_logits, adapter, src, "hub" + ("-rslora-w2" if rslora else ""))


def test_added_tokens_take_the_adapters_vocabulary_and_tokenizer(tmp_path, bases, capsys):
    """A run that added tokens: its larger embed_tokens and lm_head (modules_to_save) and its tokenizer are used;
    transformers gives peft's logits on the new ids too; the valid N are those of the new vocabulary."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    cfg, src, hf, base_logits = bases
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    tok.add_tokens(["<tool_call>", "<think>"])
    assert len(tok) == cfg.vocab_size + 2
    model = pk.load_hf(hf)
    model.resize_token_embeddings(len(tok))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"]))
    pk.randomize_lora(pm, 21)
    ad = tmp_path / "adapter"
    pm.save_pretrained(str(ad))
    tok.save_pretrained(str(ad))
    tokens = torch.tensor([[1, 5, 9, cfg.vocab_size, 17, cfg.vocab_size + 1, 3]])
    ref_model = pk.load_hf(hf)
    ref_model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(ref_model, str(ad)).eval()(tokens).logits.float()
    out = tmp_path / "merged_hf"
    code, _, err = cli("merge", src, "--adapter", ad, "--to", "hf", "-o", out, "-q", "--max-position-embeddings",
                       "4096", capsys=capsys)
    assert code == 0, err
    got = pk.hf_logits(out, tokens)
    assert got.shape[-1] == cfg.vocab_size + 2
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert transformers.AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("<think>") == cfg.vocab_size + 1
    # 130 rows: N=4 no longer divides the vocabulary, refused with the valid ones; N=2 does
    code, _, err = cli("split", src, "--adapter", ad, "-n", "4", "-o", tmp_path / "n4", capsys=capsys)
    assert code == 2 and "-n 4" in err and "1, 2" in err and not (tmp_path / "n4").exists(), err
    code, _, err = cli("split", src, "--adapter", ad, "-n", "2", "-o", tmp_path / "n2", "-q", capsys=capsys)
    assert code == 0, err
