"""Tiny HF PEFT adapters made by peft itself, on a tiny transformers Mixtral that is the tool's own HF output
of a synthetic torrent checkpoint, and peft's unmerged logits over them (the judge)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from mixtral_convert import synth

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 90, 7, 7, 120, 3]])


def tiny_cfg(**over):
    base = dict(dim=64, n_layers=2, head_dim=8, hidden_dim=48, n_heads=8, n_kv_heads=4,
                vocab_size=128, num_experts=4, experts_per_tok=2)
    base.update(over)
    return synth.tiny_config(**base)


def base_dirs(root: Path, cfg, cli) -> tuple[Path, Path]:
    """(torrent base, its HF conversion by the tool) in float32."""
    src = synth.write_torrent(root / "base", cfg, seed=3, dtype=torch.float32)
    hf = root / "base_hf"
    code = cli("merge", src, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", "4096")
    if code[0] != 0:
        raise RuntimeError(f"merge --to hf failed: {code}")
    return src, hf


def load_hf(path: Path):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                          attn_implementation="eager")
    return m.eval()


def randomize_lora(model, seed: int) -> None:
    """Every LoRA tensor (and DoRA magnitude) non-zero, sized so the delta is visible but not dominant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g) / max(p.shape) ** 0.5)
            elif "modules_to_save" in name or "trainable_tokens" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_adapter(hf_base: Path, out: Path, seed: int = 0, **lora_kw) -> Path:
    """peft's get_peft_model + save_pretrained of a LoraConfig(**lora_kw) on the HF base."""
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(load_hf(hf_base), LoraConfig(init_lora_weights=False, **lora_kw))
        randomize_lora(pm, seed)
        pm.save_pretrained(str(out))
    return out


def peft_logits(hf_base: Path, adapter: Path, tokens=TOKENS) -> torch.Tensor:
    """peft's unmerged PeftModel logits (float32), the adapter loaded and applied by peft."""
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_hf(hf_base), str(adapter)).eval()
        with torch.no_grad():
            return pm(tokens).logits.float()


def hf_logits(path: Path, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(path)(tokens).logits.float()


def config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())
