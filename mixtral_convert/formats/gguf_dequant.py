"""A quantized GGUF as a source, on request (docs/formats.md, "Quantized GGUFs as sources").

Every command opens a GGUF through `open_gguf_source`: a lossless one (F32, F16, BF16 tensors
only) as formats.gguf_source always did; a quantized one with every tensor read as float32,
through the gguf package's own `gguf.quants.dequantize` (formats.gguf_source.GgufTensor, a
block of rows at a time; F16/BF16 tensors in it widened exactly), marked lossy. Reading it is
fine (inspect, verify's source, the forward); writing from it (split, split-sparse, merge) needs
`--dequantize` (`settle`), whose outputs default to bfloat16 (float32 keeps the dequantized
values exactly), and record the lossy source and its types in the manifest (`source.lossy`) and
the summary (`notes`). A type the gguf package cannot dequantize is refused by tensor and type.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..encodings.gguf import TORCH_TYPES
from ..errors import ConvertError
from .checkpoint import Checkpoint, TokenizerRef, check_tensors
from .gguf import FILE_TYPE_NAMES
from .gguf_restack import _check_dequantizable
from .gguf_source import _Narrowed, field, open_gguf, pieces_of, tensors_of

DEFAULT_DTYPE = "bfloat16"


@dataclass(frozen=True)
class LossyCheckpoint(Checkpoint):
    """A quantized GGUF read dequantized: `lossy` says its file type and each tensor type's count."""

    lossy: Optional[dict] = None

    def source_info(self) -> dict:
        return dict(super().source_info(), lossy=self.lossy)


def quantized_types(path: Path) -> dict[str, int]:
    """Tensor type name -> count, for the quantized tensors of a GGUF (and its pieces); {} when lossless."""
    from .gguf_source import read
    counts = collections.Counter(t.tensor_type.name for p in pieces_of(Path(path)) if p.is_file()
                                 for t in read(p).tensors if t.tensor_type not in TORCH_TYPES)
    return dict(counts)


def open_gguf_source(path: Path) -> Checkpoint:
    """A GGUF file as a Checkpoint: lossless as gguf_source reads it; quantized, dequantized to float32."""
    path = Path(path)
    paths = pieces_of(path)
    missing = [p for p in paths if not p.is_file()]
    if missing or not quantized_types(path):
        return open_gguf(path)  # (which names a missing piece)
    cfg, canonical, stored, readers = tensors_of(paths, dequantize=True)
    for name, (t, _) in stored.items():
        if t.tensor_type not in TORCH_TYPES:
            _check_dequantizable(path, name, t.tensor_type)
    canonical = {k: v if v.dtype == torch.float32 else _Narrowed(v, torch.float32) for k, v in canonical.items()}
    check_tensors(cfg, {k: (v.shape, v.dtype) for k, v in canonical.items()}, str(path))
    canonical = {k: canonical[k] for k in cfg.canonical_shapes()}
    ft = int(field(readers[0], "general.file_type", path, -1))
    types = dict(collections.Counter(t.tensor_type.name for t, _ in stored.values()))
    lossy = {"dequantized": "gguf.quants.dequantize, to float32", "file_type": FILE_TYPE_NAMES.get(ft, ft),
             "tensor_types": types}
    tok = TokenizerRef(missing=f"{path}: a GGUF holds its vocabulary but no tokenizer.model; pass --tokenizer "
                              "PATH (the model's tokenizer.model)")
    return LossyCheckpoint(path.parent, "gguf", cfg, paths, tok, canonical, label="GGUF, quantized (read dequantized)",
                           lossy=lossy)


def _types(ck: LossyCheckpoint) -> str:
    return ", ".join(f"{n} x{c}" for n, c in ck.lossy["tensor_types"].items())


def settle(ck: Checkpoint, dequantize: bool, dtype: Optional[str]) -> tuple[Checkpoint, Optional[str]]:
    """split / merge from `ck`: a quantized GGUF only with --dequantize (then the output dtype defaults
    to bfloat16); --dequantize of anything else is refused. Returns (ck, the output dtype)."""
    if not isinstance(ck, LossyCheckpoint):
        if dequantize:
            raise ConvertError(f"--dequantize: {ck.where} is not a quantized GGUF, there is nothing to dequantize: "
                               "leave it out")
        return ck, dtype
    if not dequantize:
        raise ConvertError(f"{ck.files[0]}: a quantized GGUF ({_types(ck)}), its values rounded: pass --dequantize "
                           "to convert from its values as gguf dequantizes them (lossy, recorded in the manifest), "
                           "or convert from the original checkpoint")
    return ck, dtype or DEFAULT_DTYPE


def notes(ck: Checkpoint) -> list[str]:
    """What the summary says of a dequantized source."""
    if not isinstance(ck, LossyCheckpoint):
        return []
    return [f"the source {ck.files[0].name} is a quantized GGUF ({ck.lossy['file_type']}: {_types(ck)}): written "
            "from its values as gguf.quants.dequantize gives them, not the original model's (lossy; recorded in "
            "the manifest)"]
