"""What the GGUF tests share (their fixtures are in conftest.py): float32 torrents whose rows are
whole Q8_0 blocks (32) and whose tokenizer is SentencePiece BPE with the 256 byte pieces and
Mistral's settings (identity normalization, whitespace kept, byte fallback), which llama.cpp
tokenizes as SentencePiece does.

- `src7`: the 8x7B shape scaled down: 8 experts top-2, 4:1 query to KV heads, vocab 1024.
- `src22`: the 8x22B shape scaled down (as tests/formats/test_mistral.py's SMALL_22B, widened to
  whole blocks): 24 heads over 4 KV heads (6:1), head_dim 4, vocab 1000 (not a power of two).
- `sparse4`: `src7` split into Accessory's sparse layout for N=4.
- `finetune`: `src7` as an Accessory finetune save ({"model": state_dict} in float32, optimizer
  and other files beside, config.json with every ModelArgs field).
"""

import importlib.util
import shutil
from pathlib import Path

import torch
from helpers import cli

from mixtral_convert.synth import tiny_config, write_torrent

_spec = importlib.util.spec_from_file_location("formats_conftest",
                                               Path(__file__).parent.parent / "formats" / "conftest.py")
_formats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_formats)
train_mixtral_like, probe_strings = _formats.train_mixtral_like, _formats.probe_strings

SHAPE_7B = dict(dim=64, n_layers=2, head_dim=4, hidden_dim=96, n_heads=16, n_kv_heads=4, vocab_size=1024,
                num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
SHAPE_22B = dict(dim=96, n_layers=2, head_dim=4, hidden_dim=64, n_heads=24, n_kv_heads=4, vocab_size=1000,
                 num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
CONTEXT = 4096


def make_source(d: Path, shape: dict, seed: int, dtype=torch.float32) -> Path:
    cfg = tiny_config(**shape)
    write_torrent(d, cfg, seed=seed, dtype=dtype, tokenizer=False, params=cfg.to_params())
    (d / "tokenizer.model").write_bytes(train_mixtral_like(cfg.vocab_size))
    return d


def merge_gguf(src: Path, out: Path, dtype: str, *extra) -> Path:
    code, _, err = cli("merge", src, "--to", "gguf", "-o", out, "--dtype", dtype, "--max-position-embeddings",
                       CONTEXT, "-q", *extra)
    assert code == 0, err
    return out


def copy_source(src: Path, d: Path) -> Path:
    shutil.copytree(src, d)
    return d
