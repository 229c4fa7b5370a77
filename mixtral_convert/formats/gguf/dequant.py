"""A quantized GGUF as a source, on request (docs/formats.md, "Quantized GGUFs as sources").

Every command opens a GGUF through the GGUF reader (formats.gguf.source.open_source): a lossless
one (F32, F16, BF16 tensors only) as always; a quantized one with every tensor read as float32,
through the gguf package's own `gguf.quants.dequantize` (formats.gguf.source.GgufTensor, a
block of rows at a time; F16/BF16 tensors in it widened exactly), marked lossy (`Checkpoint.lossy`).
Reading it is fine (inspect, verify's source, the forward); writing from it (split, split-sparse, merge) needs
`--dequantize` (`settle`), whose outputs default to bfloat16 (float32 keeps the dequantized
values exactly), and record the lossy source and its types in the manifest (`source.lossy`) and
the summary (`notes`). A type the gguf package cannot dequantize is refused by tensor and type.
"""

from __future__ import annotations

from typing import Optional

from ...errors import ConvertError
from ..checkpoint import Checkpoint

DEFAULT_DTYPE = "bfloat16"


def _types(ck: Checkpoint) -> str:
    return ", ".join(f"{n} x{c}" for n, c in ck.lossy["tensor_types"].items())


def settle(ck: Checkpoint, dequantize: bool, dtype: Optional[str]) -> tuple[Checkpoint, Optional[str]]:
    """split / merge from `ck`: a quantized GGUF only with --dequantize (then the output dtype defaults
    to bfloat16); --dequantize of anything else is refused. Returns (ck, the output dtype)."""
    if ck.lossy is None:
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
    if ck.lossy is None:
        return []
    return [f"the source {ck.files[0].name} is a quantized GGUF ({ck.lossy['file_type']}: {_types(ck)}): written "
            "from its values as gguf.quants.dequantize gives them, not the original model's (lossy; recorded in "
            "the manifest)"]
