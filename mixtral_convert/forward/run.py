"""forward: logits of any checkpoint this tool reads, computed the way its layout would run.

PATH is a source checkpoint (the reference forward of reference.py over its canonical tensors) or a
converted Accessory directory (the sharded forward of sharded.py: every rank's share from its
own shard file, read by positioned reads, combined as tensor parallelism would). With `distributed`, the ranks
run as separate processes over torch.distributed (distributed.py). Everything runs layer by
layer: one layer's weights (one expert at a time) are on the device at once.

Inputs: a tokens file (a LongTensor [B, S], loaded with weights_only=True and checked) or a
text prompt (encoded with the checkpoint's tokenizer.model; the result then also holds the
top next-token candidates and a short greedy continuation). Output: float32 logits [B, S, V].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConvertError
from ..formats.registry import open_checkpoint
from ..io.lazy import TensorGetter
from ..model.config import ModelConfig
from . import peft
from .distributed import run_distributed
from .inputs import check_device, torch_dtype
from .job import ForwardFn, Job, Result, compute
from .reference import forward
from .sharded import sharded_forward


@dataclass
class Model:
    cfg: ModelConfig
    run: ForwardFn
    tokenizer: Optional[Path]
    how: str
    sharded: bool
    weights_dtype: Optional[torch.dtype] = None  # the dtype the checkpoint stores (None: mixed)


def open_model(path, dtype: torch.dtype, device: str, base=None, unmerged: bool = False, adapter=None) -> Model:
    """The forward of the checkpoint at `path`: sharded for an Accessory layout, else the reference
    (`base`: a trainable-only PEFT save's; `unmerged`: a PEFT save's LoRA applied unmerged, forward.peft)."""
    ck = open_checkpoint(Path(path) if base is None else path, base=base, adapter=adapter)
    cfg = ck.cfg
    stored = {t.dtype for t in ck.canonical.values()}
    weights_dtype = stored.pop() if len(stored) == 1 else None
    if ck.plan is not None:
        plan = ck.plan
        ranks = [TensorGetter(shard) for shard in ck.shards]
        return Model(cfg, lambda t: sharded_forward(plan, ranks, t, dtype=dtype, device=device), ck.tokenizer,
                     f"sharded forward, {ck.describe()}, in one process", True, weights_dtype)
    get, how = TensorGetter(ck.canonical), f"reference forward, {ck.describe()}"
    if unmerged and peft.has_lora(ck.canonical):
        get, how = peft.unmerged_getter(ck.canonical), f"reference forward, LoRA unmerged, {ck.describe()}"
        # its weights are W + s·B·A unrounded: merged shards stored coarser differ by that rounding too
        weights_dtype = None
    return Model(cfg, lambda t: forward(cfg, get, t, dtype=dtype, device=device), ck.tokenizer, how, False,
                 weights_dtype)


def run(job: Job, distributed: bool = False) -> Optional[Result]:
    """The job on PATH; None on the ranks other than 0 of a torchrun-launched group."""
    if (job.tokens_file is None) == (job.prompt is None):
        raise ConvertError("give exactly one of --tokens-file T.pt or --prompt TEXT")
    dtype, device = torch_dtype(job.dtype), check_device(job.device)
    if distributed:
        if job.adapter is not None:
            raise ConvertError("--distributed runs a converted layout's own shard files; --adapter is merged as a "
                               "source is read: split the base with --adapter first, then run those shards")
        return run_distributed(job)
    model = open_model(job.path, dtype, device, base=job.base, adapter=job.adapter)
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
