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
    # peft's random init (init_lora_weights=False) draws from torch's global generator, and a DoRA magnitude is
    # computed from it before randomize_lora: seeded here, so an adapter does not depend on the tests run before
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
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


def hub_adapter(out: Path, cfg, r: int = 4, alpha: float = 8, seed: int = 5, experts=("w1", "w2", "w3"),
                extra: dict | None = None, **conf) -> Path:
    """The hub's layout (peft on transformers 4, what nearly every published Mixtral adapter is), written with
    peft's key names: per-expert w1/w2/w3, the router block_sparse_moe.gate, q/k/v/o_proj."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    sd = {}
    P = "base_model.model.model.layers."

    def pair(mod, o, i):
        sd[f"{mod}.lora_A.weight"] = 0.3 * torch.randn(r, i, generator=g) / i ** 0.5
        sd[f"{mod}.lora_B.weight"] = 0.3 * torch.randn(o, r, generator=g) / max(o, r) ** 0.5

    D, H, E, q, kv = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for L in range(cfg.n_layers):
        for name, o, i in (("q_proj", q, D), ("k_proj", kv, D), ("v_proj", kv, D), ("o_proj", D, q)):
            pair(f"{P}{L}.self_attn.{name}", o, i)
        pair(f"{P}{L}.block_sparse_moe.gate", E, D)
        for e in range(E):
            for w, o, i in (("w1", H, D), ("w2", D, H), ("w3", H, D)):
                if w in experts:
                    pair(f"{P}{L}.block_sparse_moe.experts.{e}.{w}", o, i)
    sd.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"))
    c = dict(peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate", *experts],
             base_model_name_or_path=None)
    c.update(conf)
    (out / "adapter_config.json").write_text(json.dumps(c))
    return out
