"""`merge --to gguf`: the target's plan (docs/formats.md, "GGUF"; declared to the registry by
formats.gguf.registration). float32, float16, bfloat16 and q8_0 are written by formats.gguf.write;
the k-quants by llama.cpp's quantizer from a temporary half-type GGUF (formats.gguf.kquant)."""

from __future__ import annotations

from typing import Optional

from ...encodings.gguf import file_size
from ..checkpoint import Checkpoint, TargetPlan
from . import write as gguf_write
from .kquant import plan_kquant


def plan(ck: Checkpoint, out_name: str, dtype: Optional[str], max_shard_size: Optional[int],
         max_position_embeddings: int, name: Optional[str], chat_template: Optional[str] = None) -> TargetPlan:
    """The GGUF file (or its pieces): its layout, metadata and tokenizer computed once; the k-quants
    through llama.cpp's quantizer."""
    if dtype in gguf_write.KQUANTS:
        return plan_kquant(ck, out_name, dtype, max_shard_size, max_position_embeddings, name, chat_template)
    lay = gguf_write.file_plan(ck, out_name, dtype, max_shard_size, max_position_embeddings, name, chat_template)
    files = [(fname, file_size(meta, [t.info for t in ts]), f"{len(ts)} tensors, {lay.dtype}")
             for fname, meta, ts in lay.files]
    return TargetPlan(files, lambda tmp, progress: gguf_write.write_files(tmp, lay, progress))
