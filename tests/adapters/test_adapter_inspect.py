"""inspect of an HF PEFT adapter directory alone (docs/formats.md, "HF PEFT LoRA adapters")."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_make as pk
from helpers import cli

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_adapter")
    return pk.base_dirs(root, pk.tiny_cfg(), lambda *a: cli(*a))[1]


def inspect_json(path, capsys):
    code, out, err = cli("inspect", path, "--json", capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def test_inspect_peft_t5_layout_with_patterns(tmp_path, hf, capsys):
    ad = pk.make_adapter(hf, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "gate"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                         rank_pattern={"q_proj": 2, "down_proj": 9}, alpha_pattern={"k_proj": 12})
    info = inspect_json(ad, capsys)
    assert info["peft_type"] == "LORA" and info["layout"].startswith("peft on transformers 5")
    lora = info["lora"]
    assert lora["q_proj"] == {"modules": 2, "r": [2], "alpha": [8.0], "scale": [round(8 / 2 ** 0.5, 6)]}
    assert lora["k_proj"]["alpha"] == [12.0] and lora["k_proj"]["scale"] == [6.0]
    assert lora["down_proj"]["r"] == [9] and lora["down_proj"]["scale"] == [round(8 / 3, 6)]
    assert lora["gate_up_proj"]["r"] == [4] and lora["router"]["modules"] == 2
    assert info["use_rslora"] is True and info["use_dora"] is False and info["dtypes"] == {"float32": 20}


def test_inspect_hub_layout_dora_modules_to_save_and_other_methods(tmp_path, hf, capsys):
    hub = inspect_json(pk.hub_adapter(tmp_path / "hub", pk.tiny_cfg()), capsys)
    assert hub["layout"].startswith("hub") and hub["lora"]["w2"]["modules"] == 8
    ad = pk.make_adapter(hf, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj"],
                         modules_to_save=["lm_head"])
    info = inspect_json(ad, capsys)
    assert info["use_dora"] is True and info["modules_to_save"] == ["lm_head"]
    assert info["replaced_tensors"] == ["lm_head.weight [128, 64]"] and "[128] rows" in info["vocabulary"]
    from peft import IA3Config, get_peft_model
    get_peft_model(pk.load_hf(hf), IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(
        str(tmp_path / "ia3"))
    info = inspect_json(tmp_path / "ia3", capsys)
    assert "not LoRA" in info["what"] and info["peft_type"] == "IA3"
