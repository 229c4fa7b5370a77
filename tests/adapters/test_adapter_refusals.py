"""Bad adapters get one line (exit 2) and nothing is written (docs/formats.md, "HF PEFT LoRA adapters")."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_make as pk
from helpers import cli

from mixtral_convert import synth

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    cfg = pk.tiny_cfg()
    return cfg, synth.write_torrent(root / "base", cfg, seed=3, dtype=torch.bfloat16)


def refused(tmp_path, capsys, src, adapter, *needles):
    out = tmp_path / "out"
    code, stdout, err = cli("merge", src, "--adapter", adapter, "-o", out, capsys=capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, stdout, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return lines[0]


def edit_config(adapter: Path, **changes) -> Path:
    p = adapter / "adapter_config.json"
    c = json.loads(p.read_text())
    c.update(changes)
    p.write_text(json.dumps(c))
    return adapter


def test_adapter_for_another_model_names_tensor_and_both_shapes(tmp_path, capsys, base):
    cfg, src = base
    other = pk.hub_adapter(tmp_path / "other", pk.tiny_cfg(dim=32))
    refused(tmp_path, capsys, src, other, "lora_A.weight", "[4, 32]", "[4, 64]", "another model")
    deeper = pk.hub_adapter(tmp_path / "deeper", pk.tiny_cfg(n_layers=3))
    refused(tmp_path, capsys, src, deeper, "layers.2", "does not have", "2 layers")


def test_another_peft_method_is_named(tmp_path, capsys, base):
    cfg, src = base
    from peft import IA3Config, get_peft_model
    hf = tmp_path / "hf"
    assert cli("merge", src, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", "4096")[0] == 0
    pm = get_peft_model(pk.load_hf(hf), IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=["o_proj"]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    refused(tmp_path, capsys, src, tmp_path / "ia3", "IA3", "only LoRA adapters")
    loha = edit_config(pk.hub_adapter(tmp_path / "loha", cfg), peft_type="LOHA")
    refused(tmp_path, capsys, src, loha, "LOHA")


def test_unknown_target_module(tmp_path, capsys, base):
    cfg, src = base
    extra = {"base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight": torch.zeros(4, 64),
             "base_model.model.model.layers.0.self_attn.rotary_emb.lora_B.weight": torch.zeros(8, 4)}
    ad = pk.hub_adapter(tmp_path / "unknown", cfg, extra=extra)
    refused(tmp_path, capsys, src, ad, "rotary_emb", "does not know")


def test_missing_or_invalid_config(tmp_path, capsys, base):
    cfg, src = base
    ad = pk.hub_adapter(tmp_path / "missing", cfg)
    (ad / "adapter_config.json").unlink()
    refused(tmp_path, capsys, src, ad, "no adapter_config.json")
    ad = pk.hub_adapter(tmp_path / "invalid", cfg)
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    refused(tmp_path, capsys, src, ad, "not valid JSON")
    ad = edit_config(pk.hub_adapter(tmp_path / "badr", cfg), r=0)
    refused(tmp_path, capsys, src, ad, "'r' is 0")
    ad = edit_config(pk.hub_adapter(tmp_path / "wrongr", cfg), r=8)
    refused(tmp_path, capsys, src, ad, "has rank 4", "r 8")
    ad = pk.hub_adapter(tmp_path / "noweights", cfg)
    (ad / "adapter_model.safetensors").unlink()
    refused(tmp_path, capsys, src, ad, "no adapter_model.safetensors or adapter_model.bin")


@pytest.mark.parametrize("field,value", [("layer_replication", [[0, 1], [0, 2]]), ("trainable_token_indices", [5]),
                                         ("lora_bias", True), ("use_qalora", True), ("alora_invocation_tokens", [3]),
                                         ("bias", "all")])
def test_what_peft_applies_and_the_tool_does_not(tmp_path, capsys, base, field, value):
    cfg, src = base
    ad = edit_config(pk.hub_adapter(tmp_path / field, cfg), **{field: value})
    refused(tmp_path, capsys, src, ad, f"'{field}'")


def test_base_model_name_differing_is_a_warning(tmp_path, capsys, base):
    cfg, src = base
    ad = pk.hub_adapter(tmp_path / "named", cfg, base_model_name_or_path="mistralai/Mixtral-8x7B-v0.1")
    code, _, err = cli("merge", src, "--adapter", ad, "-o", tmp_path / "out", "-q", capsys=capsys)
    assert code == 0 and "warning:" in err and "Mixtral-8x7B-v0.1" in err, err
    assert (tmp_path / "out" / "consolidated.00.pth").is_file()
    ad = pk.hub_adapter(tmp_path / "same", cfg, base_model_name_or_path=str(src))
    code, _, err = cli("merge", src, "--adapter", ad, "-o", tmp_path / "out2", "-q", capsys=capsys)
    assert code == 0 and "warning" not in err, err


def test_vocabulary_resized_in_one_tensor_only(tmp_path, capsys, base):
    cfg, src = base
    ad = pk.hub_adapter(tmp_path / "half", cfg, extra={"base_model.model.lm_head.weight": torch.zeros(130, 64)})
    refused(tmp_path, capsys, src, ad, "resizes the vocabulary to 130", "embed_tokens")
    ad = pk.hub_adapter(tmp_path / "wrapper", cfg,
                        extra={"base_model.model.lm_head.modules_to_save.weight": torch.zeros(128, 64)})
    refused(tmp_path, capsys, src, ad, "lm_head.modules_to_save.weight", "re-save")


def test_fused_experts_for_another_expert_count_and_verify_without_source(tmp_path, capsys, base):
    cfg, src = base
    extra = {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.zeros(3 * 4 + 1, 48),
             "base_model.model.model.layers.0.mlp.experts.lora_B.weight": torch.zeros(64, 13)}
    ad = pk.hub_adapter(tmp_path / "fused", cfg, extra=extra, target_parameters=["mlp.experts.down_proj"])
    refused(tmp_path, capsys, src, ad, "mlp.experts.lora_A.weight", "[13, 48]", "4 experts")
    code, _, err = cli("verify", tmp_path, "--adapter", ad, capsys=capsys)
    assert code == 2 and "--adapter needs --source" in err, err


def test_forward_distributed_with_adapter_is_refused(tmp_path, capsys, base):
    cfg, src = base
    ad = pk.hub_adapter(tmp_path / "ad", cfg)
    torch.save(torch.tensor([[1, 2, 3]]), tmp_path / "t.pt")
    code, _, err = cli("forward", src, "--adapter", ad, "--distributed", "--tokens-file", tmp_path / "t.pt",
                       "-o", tmp_path / "l.pt", capsys=capsys)
    assert code == 2 and "split the base with --adapter first" in err and not (tmp_path / "l.pt").exists(), err
