"""Deterministic synthetic Mixtral checkpoints in the torrent layout, with any shapes.

Used by the tests, `make demo` and the benchmark. Tensors are generated a block at a time and
streamed through the same writer as every conversion, so a full-width multi-GB checkpoint
needs little memory. The tokenizer is a SentencePiece BPE model trained on generated text to
exactly `vocab_size` pieces, as Accessory demands.
"""

from __future__ import annotations

import io
import random
import zlib
from pathlib import Path

import torch

from .encodings.torchzip import write_checkpoint
from .io.lazy import BLOCK_BYTES, TensorSpec, tensor_bytes
from .model.config import ModelConfig, write_json


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) that keep a forward pass's activations in a sane range."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "tok_embeddings.weight":
        return 0.0, 1.0
    return 0.0, shape[-1] ** -0.5


def tensor_blocks(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """The tensor's contents, deterministic in (seed, name), as row blocks."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    mean, std = _scale(name, shape)
    row = 1
    for s in shape[1:]:
        row *= s
    step = max(1, BLOCK_BYTES // (4 * row))
    for r0 in range(0, shape[0], step):
        rows = min(step, shape[0] - r0)
        block = torch.randn((rows,) + tuple(shape[1:]), generator=g)
        yield block.mul_(std).add_(mean).to(dtype)


def materialize(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The whole synthetic model in memory (tiny configs only)."""
    return {k: torch.cat(list(tensor_blocks(k, s, dtype, seed))) for k, s in cfg.canonical_shapes().items()}


def write_torrent(out: Path, cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16,
                  tokenizer: bool = True, params: dict | None = None) -> Path:
    """A torrent-layout directory: consolidated.00.pth, params.json, tokenizer.model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, s, dtype) for k, s in cfg.canonical_shapes().items()]
    write_checkpoint(out / "consolidated.00.pth", specs,
                     lambda spec: (tensor_bytes(b) for b in tensor_blocks(spec.name, spec.shape, dtype, seed)),
                     fsync=False)
    p = params if params is not None else {k: v for k, v in cfg.to_params().items() if k != "rope_theta"}
    write_json(out / "params.json", p)
    if tokenizer:
        (out / "tokenizer.model").write_bytes(train_tokenizer(cfg.vocab_size, seed))
    return out


def train_tokenizer(vocab_size: int, seed: int = 0, llama: bool = False) -> bytes:
    """A SentencePiece BPE model with exactly vocab_size pieces (vocab_size >= 24). With `llama`,
    Llama's and Mistral's settings (byte fallback: the 256 byte pieces llama.cpp needs; no
    normalization, whitespace kept; vocab_size >= 300)."""
    import sentencepiece as spm
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"[: 16 if vocab_size < 2000 else 26]
    n_words = max(4000, 3 * vocab_size)  # BPE needs enough distinct text to reach vocab_size
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n_words)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(max(3000, n_words // 2))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=True, minloglevel=2,
        **(dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False)
           if llama else {}))
    return model.getvalue()


def tiny_config(**overrides) -> ModelConfig:
    """A small but fully general config: 4 experts, GQA, 2 layers."""
    base = dict(dim=64, n_layers=2, head_dim=8, hidden_dim=96, n_heads=8, n_kv_heads=4,
                vocab_size=128, num_experts=4, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
    base.update(overrides)
    return ModelConfig(**base)
