"""What an HF PEFT adapter directory is, without a base (`inspect ADAPTER_DIR`; docs/formats.md, "HF PEFT LoRA
adapters"): LoRA or which other method; its layout (the hub's per-expert modules, or peft on transformers 5's
`target_parameters`); r, alpha and the scale per module kind after the patterns; rsLoRA, DoRA, the patterns,
`modules_to_save`; the tensors it touches; whether it carries a resized embedding or lm_head; dtype and size.
Only adapter_config.json and the weights' headers are read.
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

from ...errors import ConvertError
from . import config as adapter_config
from . import hf as hf_adapter

# module name (peft's, without the prefix) -> its kind
_KINDS = (
    (re.compile(r"model\.layers\.\d+\.self_attn\.(?P<k>[qkvo]_proj)\Z"), None),
    (re.compile(r"model\.layers\.\d+\.block_sparse_moe\.gate\Z"), "router"),
    (re.compile(r"model\.layers\.\d+\.mlp\.gate\Z"), "router"),
    (re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.(?P<k>w[123])\Z"), None),
    (re.compile(r"model\.embed_tokens\Z"), "embed_tokens"),
    (re.compile(r"lm_head\Z"), "lm_head"),
)


def _kind(mod: str, conf) -> tuple[str, str]:
    """(kind, the module name peft matches the patterns against)."""
    ex = hf_adapter.T5_EXPERTS.match(mod)
    if ex:
        targeted = [p for p in hf_adapter.EXPERT_PARAMS
                    if any(t == p or t.endswith("." + p) for t in conf.get("target_parameters") or [])]
        depth = ex["nest"].count(".base_layer")
        param = targeted[len(targeted) - 1 - depth] if depth < len(targeted) else "experts (unknown parameter)"
        return param, f"model.layers.{ex['L']}.mlp.experts.{param}"
    for rx, kind in _KINDS:
        m = rx.match(mod)
        if m:
            return kind or m["k"], (mod + ".weight" if mod.endswith("mlp.gate") else mod)
    return "unknown: " + mod, mod


def summary(path: Path) -> dict:
    path = Path(path)
    raw_path = path / adapter_config.CONFIG
    try:
        raw = json.loads(raw_path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{raw_path}: not readable JSON ({str(e).splitlines()[0][:100]})") from None
    info: dict = {"path": str(path), "what": "HF PEFT adapter", "peft_type": raw.get("peft_type")}
    f = adapter_config.weights_file(path, str(path))
    tensors = hf_adapter.load_tensors(f)
    info["files"] = [{"name": p.name, "bytes": p.stat().st_size} for p in (raw_path, f)]
    info["dtypes"] = dict(collections.Counter(str(t.dtype).replace("torch.", "") for t in tensors.values()))
    info["bytes"] = sum(t.nbytes for t in tensors.values())
    if raw.get("peft_type") != "LORA":
        info["what"] = f"HF PEFT adapter, not LoRA (peft_type {raw.get('peft_type')!r}): not merged by this tool"
        return info
    conf = adapter_config.read_config(path, str(path))  # refuses what would not merge, as --adapter does
    names = [k[len(hf_adapter.PREFIX):] if k.startswith(hf_adapter.PREFIX) else k for k in tensors]
    t5 = any(hf_adapter.T5_EXPERTS.match(n.rsplit(".lora_", 1)[0]) or ".mlp.gate." in n for n in names)
    hub = any(".block_sparse_moe." in n for n in names)
    info["layout"] = ("peft on transformers 5 (experts through target_parameters)" if t5 else
                      "hub (per-expert w1/w2/w3, block_sparse_moe.gate)" if hub else "no expert or router modules")
    kinds: dict[str, dict] = {}
    replaced = []
    for key, name in zip(tensors, names, strict=True):
        m = hf_adapter.LORA_RX.match(name)
        if not m:
            replaced.append(f"{name} {list(tensors[key].shape)}")
            continue
        if m["kind"] not in ("lora_A.weight", "lora_embedding_A"):
            continue
        kind, pattern_key = _kind(m["mod"], raw)
        rows = tensors[key].shape[0]
        r_conf, alpha = conf.rank_alpha(pattern_key)
        r = r_conf if kind in hf_adapter.EXPERT_PARAMS else rows  # fused experts: A holds experts x r rows
        e = kinds.setdefault(kind, {"modules": 0, "r": set(), "alpha": set(), "scale": set()})
        e["modules"] += 1
        e["r"].add(r)
        e["alpha"].add(alpha)
        e["scale"].add(round(alpha / math.sqrt(r) if conf.rslora else alpha / r, 6))
    info["lora"] = {k: {"modules": v["modules"], **{x: sorted(v[x]) for x in ("r", "alpha", "scale")}}
                    for k, v in kinds.items()}
    info.update(r=conf.r, lora_alpha=conf.alpha, use_rslora=conf.rslora, use_dora=conf.dora,
                rank_pattern=conf.rank_pattern, alpha_pattern=conf.alpha_pattern,
                modules_to_save=list(conf.modules_to_save), replaced_tensors=replaced)
    vocab = sorted({tensors[k].shape[0] for k, n in zip(tensors, names, strict=True)
                    if re.match(r"(model\.embed_tokens|lm_head)(\.base_layer)?\.weight\Z", n)})
    info["vocabulary"] = (f"carries embed_tokens/lm_head with {vocab} rows: resized if the base's vocab_size differs"
                          if vocab else "unchanged (no embedding or lm_head saved whole)")
    info["base_model_name_or_path"] = conf.base_model
    return info
