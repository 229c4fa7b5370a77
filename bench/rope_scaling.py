#!/usr/bin/env python3
"""RoPE scaling figures for docs/formats.md ("RoPE scaling and other fields that change the model").

A tiny MixtralForCausalLM built by transformers with linear scaling (factor 2) and saved; the tool's
reference forward over the saved directory, with its scaling and with the scaling removed, against
transformers' logits over the same 16 tokens.

    PYTHONPATH=. python bench/rope_scaling.py
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import torch  # noqa: E402
from hf_tiny import hf_model, tiny_cfg  # noqa: E402

from mixtral_convert.formats.registry import open_checkpoint  # noqa: E402
from mixtral_convert.forward.reference import forward  # noqa: E402
from mixtral_convert.io.lazy import TensorGetter  # noqa: E402


def main() -> None:
    cfg = tiny_cfg(vocab_size=320)
    model = hf_model(cfg, seed=3, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": cfg.rope_theta})
    tokens = torch.tensor([[1, 17, 5, 90, 33, 2, 64, 8, 11, 200, 301, 7, 150, 42, 99, 3]])
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with torch.no_grad():
            want = model(tokens).logits.float()
        ck = open_checkpoint(Path(d))
        ours = forward(ck.cfg, TensorGetter(ck.canonical), tokens)
        plain = forward(replace(ck.cfg, rope_scaling=None), TensorGetter(ck.canonical), tokens)
    print(f"max |logit| {want.abs().max().item():.3g}")
    print(f"reference with the scaling read from config.json vs transformers: max abs diff "
          f"{(ours - want).abs().max().item():.2g}, top-1 agreement "
          f"{(ours.argmax(-1) == want.argmax(-1)).float().mean().item():.2f}")
    print(f"reference with the scaling dropped vs transformers: max abs diff {(plain - want).abs().max().item():.2g}, "
          f"top-1 agreement {(plain.argmax(-1) == want.argmax(-1)).float().mean().item():.2f}")


if __name__ == "__main__":
    main()
