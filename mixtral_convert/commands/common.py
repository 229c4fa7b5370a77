"""What the writing commands share: the result they report, where outputs go by default, and
the tokenizer an output gets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConvertError
from ..formats.checkpoint import Checkpoint, TokenizerRef
from ..formats.mistral import TOKENIZERS as MISTRAL_TOKENIZERS
from ..io import hub
from ..io.lazy import Cast
from ..tokenizer.files import HF_CONFIG, HF_JSON, find, tokenizer_pieces

CAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARGIN = 64 << 20  # free space asked beyond the output's bytes (side files, directory entries)


@dataclass
class Result:
    out: Path
    files: list[str]
    nbytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the summary must say (biases dropped, the layout chosen)

    def lines(self, verb: str) -> list[str]:
        """The summary a command prints: what it wrote, how fast, where, and every file."""
        from ..io.progress import human_bytes
        rate = self.nbytes / self.seconds if self.seconds > 0 else 0
        return [f"{verb} {human_bytes(self.nbytes)} in {self.seconds:.1f} s ({human_bytes(rate)}/s) -> {self.out}"] + \
            [f"  {name}" for name in self.files]


def output_base(ck: Checkpoint) -> Path:
    """Where default outputs go: beside the source (for an archive, a directory named after it
    beside it), or the working directory for a hub source (never inside the hub cache)."""
    if ck.remote is not None:
        return Path.cwd() / hub.repo_name(ck.remote)
    return ck.path.with_suffix("") if ck.path.is_file() else ck.path


def use_tokenizer(ck: Checkpoint, tokenizer) -> Checkpoint:
    """--tokenizer PATH (a tokenizer.model; a directory holding one, or tokenizer.json with
    tokenizer_config.json, or Mistral's tokenizer.model.v3 / .v1; or that tokenizer.json) or
    hf://org/name."""
    if tokenizer is None:
        return ck
    if hub.is_hub(tokenizer):
        return replace(ck, tok=TokenizerRef(hub.resolve_tokenizer(tokenizer)))
    tok = Path(tokenizer)
    if tok.name in (HF_JSON, HF_CONFIG) and tok.is_file():
        tok = tok.parent
    if tok.is_dir():
        found = find(tok) or next((tok / n for n in MISTRAL_TOKENIZERS if (tok / n).is_file()), None)
        if found is None:
            raise ConvertError(f"{tok}: --tokenizer directory holds no tokenizer.model, nor {HF_JSON} with "
                               f"{HF_CONFIG}; pass a tokenizer.model file, a directory with either, or hf://org/name")
        tok = found
    if not tok.exists():
        raise ConvertError(f"{tok}: --tokenizer not found; pass a tokenizer.model file, its directory, or hf://org/name")
    return replace(ck, tok=TokenizerRef(tok))


def check_tokenizer(ck: Checkpoint) -> Path:
    """The tokenizer the output gets: present, and with one piece (or HF token, added ones included)
    per embedding row."""
    if ck.tokenizer is None:
        raise ConvertError(ck.tok.missing or f"{ck.where}: no tokenizer.model (nor tokenizer.json with "
                           "tokenizer_config.json) beside the checkpoint; Accessory needs one in the output: pass "
                           "--tokenizer PATH (or hf://org/name), or copy the release's tokenizer.model there")
    pieces = tokenizer_pieces(ck.tokenizer)
    if pieces != ck.cfg.vocab_size and ck.tokenizer.is_dir():
        raise ConvertError(f"{ck.tokenizer / HF_JSON}: has {pieces} tokens (added tokens included) but the model's "
                           f"vocabulary is {ck.cfg.vocab_size} rows; Accessory would mis-size the embedding: use the "
                           "tokenizer files released with this checkpoint")
    if pieces != ck.cfg.vocab_size:
        raise ConvertError(f"{ck.tokenizer_where}: has {pieces} pieces but the model's vocabulary is "
                           f"{ck.cfg.vocab_size} rows; Accessory would mis-size the embedding: use the "
                           "tokenizer.model released with this checkpoint")
    return ck.tokenizer


def cast_to(ck: Checkpoint, dtype: Optional[str]) -> Checkpoint:
    """--dtype: the checkpoint's tensors read in `dtype` (a block at a time, as they are written);
    None or the source's own dtype changes nothing. The source's dtype is kept in `source_dtype`.
    Returns the checkpoint so read (a new one when anything changes)."""
    if dtype is None:
        return ck
    if dtype not in CAST_DTYPES:
        raise ConvertError(f"--dtype {dtype}: use one of {', '.join(CAST_DTYPES)}")
    source = ck.check().dtype  # a source of mixed dtypes is refused
    if CAST_DTYPES[dtype] == source:
        return ck
    return replace(ck, source_dtype=source,
                   canonical={k: Cast(t, CAST_DTYPES[dtype], ck.where) for k, t in ck.canonical.items()})
