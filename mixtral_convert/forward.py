"""forward: logits of any checkpoint this tool reads, computed the way its layout would run.

PATH is a source checkpoint (the reference forward of model.py over its canonical tensors) or a
converted Accessory directory (the sharded forward of sharded.py: every rank's share from its
own shard file, mmap'd, combined as tensor parallelism would). With `distributed`, the ranks
run as separate processes over torch.distributed (distributed.py). Everything runs layer by
layer: one layer's weights (one expert at a time) are on the device at once.

Inputs: a tokens file (a LongTensor [B, S], loaded with weights_only=True and checked) or a
text prompt (encoded with the checkpoint's tokenizer.model; the result then also holds the
top next-token candidates and a short greedy continuation). Output: float32 logits [B, S, V].
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import ModelConfig
from .errors import ConvertError
from .lazy import Stored

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


# ----- inputs ---------------------------------------------------------------------------------

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


# ----- the model ------------------------------------------------------------------------------

@dataclass
class Model:
    cfg: ModelConfig
    run: ForwardFn
    tokenizer: Optional[Path]
    how: str
    sharded: bool


def _tensor(lz) -> torch.Tensor:
    """A lazy tensor as a tensor: the mmap view itself when stored, else assembled whole (only
    ever one tensor of one layer at a time, as the forward asks for them)."""
    if isinstance(lz, Stored):
        return lz.t
    return lz.read(0, lz.shape[0]) if lz.shape else lz.read(0, 1).reshape(())


def open_model(path, dtype: torch.dtype, device: str) -> Model:
    """The forward of the checkpoint at `path`: sharded for an Accessory layout, else the reference."""
    from .model import forward
    from .sharded import sharded_forward
    from .sources import open_checkpoint

    ck = open_checkpoint(Path(path))
    cfg = ck.cfg
    if ck.plan is not None:
        plan = ck.plan
        ranks = [{k: _tensor(s) for k, s in shard.items()} for shard in ck.shards]
        return Model(cfg, lambda t: sharded_forward(plan, ranks, t, dtype=dtype, device=device), ck.tokenizer,
                     f"sharded forward, {ck.describe()}, in one process", True)
    canonical = ck.canonical
    return Model(cfg, lambda t: forward(cfg, lambda n: _tensor(canonical[n]), t, dtype=dtype, device=device),
                 ck.tokenizer, f"reference forward, {ck.describe()}", False)


# ----- the computation ------------------------------------------------------------------------

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
    top = [(int(i), sp.id_to_piece(int(i)), float(v)) for v, i in zip(vals, idx)]
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


def run(job: Job, distributed: bool = False) -> Optional[Result]:
    """The job on PATH; None on the ranks other than 0 of a torchrun-launched group."""
    if (job.tokens_file is None) == (job.prompt is None):
        raise ConvertError("give exactly one of --tokens-file T.pt or --prompt TEXT")
    dtype, device = torch_dtype(job.dtype), check_device(job.device)
    if distributed:
        from .distributed import run_distributed
        return run_distributed(job)
    model = open_model(job.path, dtype, device)
    return compute(job, model.cfg, model.run, model.tokenizer, model.how)


def write_logits(logits: torch.Tensor, out, force: bool = False) -> Path:
    """torch.save the logits to `out` atomically (a temporary sibling renamed into place)."""
    out = Path(out)
    if out.exists() and not force:
        raise ConvertError(f"{out}: exists; pass --force to replace it")
    if out.is_dir():
        raise ConvertError(f"{out}: is a directory; give a file name such as logits.pt")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(logits.float().contiguous(), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
