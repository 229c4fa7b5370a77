"""PEFT saves written the way Accessory writes them (docs/formats.md, "Accessory finetune outputs" and
"Accessory PEFT saves"), independently of the tool.

Per rank: `consolidated.RR-of-NN.model.pth` = torch.save({"model": state_dict}) with `llma.` keys;
config.json = every ModelArgs field plus lora_rank / bias_tuning / norm_tuning; meta.json
{"llama_type": "mixtral_peft"}. The layout is spelled out here by hand from the docs, not from the tool's
tables, and `expected_merged` computes the merged model from the same per-rank tensors, so a wrong
rule in the tool fails against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixtral_convert import synth

ATTN = ("wq", "wk", "wv", "wo")
FFN = ("w1", "w2", "w3")


def linears(cfg):
    """(canonical weight name, short) of every PEFT linear."""
    for L in range(cfg.n_layers):
        for m in ATTN:
            yield f"layers.{L}.attention.{m}.weight", m
        for e in range(cfg.num_experts):
            for m in FFN:
                yield f"layers.{L}.feed_forward.experts.{e}.{m}.weight", m


def stem(name: str) -> str:
    return name[: -len(".weight")]


def make_model(cfg, N, rank=4, lora=True, bias=True, norm=True, seed=0, dtype=torch.float32, a_same=False):
    """(base weights, per-rank LoRA/bias dicts, tuned norms): canonical tensors and, for the
    column-parallel A, one different [r, in] per rank (the copies differ, as after training)."""
    g = torch.Generator().manual_seed(1234 + seed)
    base = synth.materialize(cfg, seed=seed, dtype=dtype)
    extra = {}  # canonical-ish names -> tensor; column-parallel A: name + f"@{r}" per rank
    for w, m in linears(cfg):
        out, inp = base[w].shape
        s = stem(w)
        if bias:
            extra[s + ".bias"] = (torch.randn(out, generator=g) * 0.05).to(dtype)
        if lora:
            extra[s + ".lora_b.weight"] = (torch.randn(out, rank, generator=g) * 0.1).to(dtype)
            if m in ("wq", "wk", "wv"):
                a0 = (torch.randn(rank, inp, generator=g) * 0.1).to(dtype)
                for r in range(N):
                    extra[s + f".lora_a.weight@{r}"] = a0 if a_same else (torch.randn(rank, inp, generator=g)
                                                                          * 0.1).to(dtype)
            else:
                extra[s + ".lora_a.weight"] = (torch.randn(rank, inp, generator=g) * 0.1).to(dtype)
    norms = {}
    if norm:
        for k in base:
            if k.endswith("norm.weight"):
                norms[k] = (base[k].float() + torch.randn(base[k].shape, generator=g) * 0.05).to(dtype)
    return base, extra, norms


def chunk(t, dim, r, N):
    n = t.shape[dim] // N
    return t.narrow(dim, r * n, n).clone()


def shard(cfg, base, extra, norms, r, N, trainable_only=False):
    """Rank r's state dict (docs/formats.md, spelled out)."""
    sd = {}
    model = dict(base, **norms)
    per = cfg.num_experts // N
    for k, t in model.items():
        if trainable_only and "norm" not in k:
            continue
        if k == "tok_embeddings.weight" or k.endswith("attention.wo.weight"):
            sd[k] = chunk(t, 1, r, N)
        elif k == "output.weight" or any(k.endswith(f"attention.{m}.weight") for m in ("wq", "wk", "wv")):
            sd[k] = chunk(t, 0, r, N)
        elif ".experts." in k:
            if int(k.split(".")[4]) // per == r:
                sd[k] = t.clone()
        else:
            sd[k] = t.clone()
    for k, t in extra.items():
        col = any(f"attention.{m}." in k for m in ("wq", "wk", "wv"))
        if ".experts." in k:
            if int(k.split(".")[4]) // per == r:
                sd[k] = t.clone()
        elif "@" in k:
            name, owner = k.split("@")
            if int(owner) == r:
                sd[name] = t.clone()
        elif col:  # bias and lora_b: rows
            sd[k] = chunk(t, 0, r, N)
        elif k.endswith("wo.lora_a.weight"):
            sd[k] = chunk(t, 1, r, N)
        else:  # wo's lora_b and bias: whole, the same on every rank
            sd[k] = t.clone()
    return {"llma." + k: v for k, v in sd.items()}


def write_save(out: Path, cfg, N, base, extra, norms, rank=4, trainable_only=False, tokenizer=None,
               bias_tuning=True, norm_tuning=True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(N):
        torch.save({"model": shard(cfg, base, extra, norms, r, N, trainable_only)},
                   out / f"consolidated.{r:02d}-of-{N:02d}.model.pth")
    config = dict(cfg.to_accessory(), max_seq_len=2048, max_batch_size=32, load_balancing_weight=0.1,
                  rope_scaling=None, lora_rank=rank if any("lora" in k for k in extra) else -1,
                  bias_tuning=bias_tuning, norm_tuning=norm_tuning)
    (out / "config.json").write_text(json.dumps(config))
    (out / "meta.json").write_text(json.dumps({"llama_type": "mixtral_peft"}))
    if tokenizer is not None:
        (out / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return out


def fixed_order_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """b·a summed over k in order, elementwise float32 (the documented merge arithmetic), written out here."""
    acc = torch.zeros(b.shape[0], a.shape[1])
    for k in range(b.shape[1]):
        acc = acc + b[:, k:k + 1].float() * a[k:k + 1, :].float()
    return acc


def expected_merged(cfg, N, base, extra, norms) -> dict[str, torch.Tensor]:
    """The merged canonical model: W + B·A per the docs (column-parallel rows of rank r with rank r's A),
    rounded once to W's dtype; tuned norms in place; biases as they are."""
    out = dict(base, **norms)
    for w, m in linears(cfg):
        s = stem(w)
        if s + ".bias" in extra:
            out[s + ".bias"] = extra[s + ".bias"]
        if s + ".lora_b.weight" not in extra:
            continue
        W, B = base[w], extra[s + ".lora_b.weight"]
        if m in ("wq", "wk", "wv"):
            n = W.shape[0] // N
            delta = torch.cat([fixed_order_product(B[r * n:(r + 1) * n], extra[s + f".lora_a.weight@{r}"])
                               for r in range(N)])
        else:
            delta = fixed_order_product(B, extra[s + ".lora_a.weight"])
        out[w] = (W.float() + delta).to(W.dtype)
    return out
