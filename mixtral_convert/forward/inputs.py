"""The inputs of a forward: the compute dtype, the device, and the tokens (a file saved with
torch.save, loaded with weights_only=True and checked against the vocabulary, or a seeded
random default)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import ConvertError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConvertError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                           f"cuda build {torch.version.cuda or 'none'}); use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConvertError(f"--device {device}: use cpu or cuda")
    return device


def load_tokens(path, vocab_size: int) -> torch.Tensor:
    """A LongTensor [B, S] with values in [0, vocab_size), from a file saved with torch.save."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: tokens file not found")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: unreadable tokens file (not a torch.save zip archive); save a LongTensor "
                           "[B, S] with torch.save")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["refused"])[0]
        raise ConvertError(f"{path}: refused to load the tokens file: it holds objects other than tensors "
                           f"({first[:120]}); save a plain LongTensor with torch.save") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"{path}: unreadable tokens file ({first[:160]}); save a LongTensor [B, S] "
                           "with torch.save") from None
    return check_tokens(t, vocab_size, str(path))


def check_tokens(t, vocab_size: int, where: str = "tokens") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{where}: holds a {type(t).__name__}, expected a LongTensor [B, S]")
    if t.dtype != torch.long:
        raise ConvertError(f"{where}: tokens are {str(t.dtype).replace('torch.', '')}, expected int64 "
                           "(a LongTensor); convert with .long()")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ConvertError(f"{where}: tokens have shape {list(t.shape)}, expected [B, S] with B, S >= 1")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConvertError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return t


def default_tokens(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random tokens (verify --forward's default input)."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
