"""What a forward computes, whichever way it runs (one process, or one rank of a group): the
job, its result, and `compute`, which turns a forward function into that result (logits of a
tokens file, or of a prompt plus its most likely next tokens)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConvertError
from ..model.config import ModelConfig
from .inputs import load_tokens

ForwardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Job:
    """What to compute (plain values: it is also handed to distributed workers as JSON)."""

    path: str
    tokens_file: Optional[str] = None
    prompt: Optional[str] = None
    new_tokens: int = 5
    top: int = 5
    dtype: str = "float32"
    device: str = "cpu"
    base: Optional[str] = None  # a trainable-only PEFT save's base (--base)
    adapter: Optional[str] = None  # an HF PEFT LoRA adapter merged into it (--adapter)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    logits: torch.Tensor  # float32 [B, S, V]
    tokens: torch.Tensor  # [B, S]
    how: str = ""  # which forward ran
    top: list = field(default_factory=list)  # prompt: [(id, piece, probability)] for the next token
    new: list = field(default_factory=list)  # prompt: greedy continuation ids
    text: str = ""  # prompt: their decoded text


def compute(job: Job, cfg: ModelConfig, run: ForwardFn, tokenizer: Optional[Path], how: str = "") -> Result:
    """The job's result with forward `run`: the logits of its tokens, or of its prompt plus the
    most likely next tokens."""
    if job.prompt is None:
        tokens = load_tokens(job.tokens_file, cfg.vocab_size)
        return Result(run(tokens), tokens, how)
    sp = _sentencepiece(tokenizer, cfg)
    ids = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(job.prompt)
    tokens = torch.tensor([ids], dtype=torch.long)
    logits = run(tokens)
    p = torch.softmax(logits[0, -1], dim=-1)
    vals, idx = torch.topk(p, min(job.top, cfg.vocab_size))
    top = [(int(i), sp.id_to_piece(int(i)), float(v)) for v, i in zip(vals, idx, strict=True)]
    new = [top[0][0]] if job.new_tokens > 0 else []
    while len(new) < job.new_tokens:  # greedy; no KV cache: each step reruns the whole forward
        new.append(int(run(torch.tensor([ids + new]))[0, -1].argmax()))
    return Result(logits, tokens, how, top, new, sp.decode(new))


def _sentencepiece(tokenizer: Optional[Path], cfg: ModelConfig):
    import sentencepiece as spm
    if tokenizer is None or not Path(tokenizer).is_file():
        raise ConvertError("--prompt needs the checkpoint's tokenizer.model beside its weights; "
                           "pass token ids with --tokens-file instead")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{tokenizer}: not a SentencePiece model ({str(e).strip()[:120]})") from None
    if sp.get_piece_size() != cfg.vocab_size:
        raise ConvertError(f"{tokenizer}: {sp.get_piece_size()} pieces but the model's vocab_size is "
                           f"{cfg.vocab_size}")
    return sp
