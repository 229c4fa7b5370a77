"""verify OUT.gguf --forward: the reference forward on the GGUF's tensors, dequantized to float32
(formats.gguf.source), against the reference forward on the source, over the same tokens.

The figures are parity.py's (max abs / rel, rms rel, top-1 agreement). The bound is the stored
type's: float32, float16 and bfloat16 as parity.TOLERANCES; the quantized types by their
rounding (Q8_0: 8 bits per weight with a scale per 32; the k-quants fewer), with margins over
what the tiny fixtures measure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..formats.gguf.source import field, open_gguf, read
from ..formats.gguf.write import FILE_TYPE_NAMES
from ..io.lazy import materialize
from .inputs import torch_dtype
from .parity import TOLERANCES, ParityReport, Tolerance, compare, reference_run
from .reference import forward

# Tiny random models are harsh judges of rounding: a router near a tie picks another expert
# once a weight moves, so these bounds sit over the tiny fixtures' figures (q8_0: rms 0.11, top-1
# 0.875 on seeded random tokens), not over what a trained Mixtral shows.
QUANTIZED = {"q8_0": Tolerance(None, 0.2, 0.75), "q6_k": Tolerance(None, 0.3, 0.7),
             "q5_k_m": Tolerance(None, 0.4, 0.6), "q4_k_m": Tolerance(None, 0.5, 0.5)}


def gguf_parity(path: Path, source: Path, *, tokens_file: Optional[Path] = None, dtype: str = "float32",
                device: str = "cpu", base=None, adapter=None) -> ParityReport:
    t0 = time.perf_counter()
    rep, ref_model, tokens, ref = reference_run(source, "GGUF", tokens_file, dtype, device, base, adapter)
    cfg, dt, device = ref_model.cfg, torch_dtype(dtype), rep.device
    path = Path(path)
    ck = open_gguf(path, dequantize=True)
    ft = int(field(read(ck.files[0]), "general.file_type", path))
    stored = FILE_TYPE_NAMES.get(ft)
    if stored is None:  # no bound is known for its rounding: a guessed one would prove nothing
        raise ConvertError(f"{path}: general.file_type {ft} is not a type this tool writes ({', '.join(QUANTIZED)} or "
                           "float32, float16, bfloat16), so --forward has no tolerance for it; verify a GGUF of one "
                           "of those types")
    rep.sharded = f"reference forward, GGUF {stored} dequantized to float32 ({path.name})"
    if ck.cfg != cfg:
        rep.problems.append(f"forward: {path}: its config differs from the source's")
    else:
        out = forward(cfg, lambda n: materialize(ck.canonical[n]), tokens, dtype=dt, device=device)
        rep.tolerance_dtype = stored
        compare(ref, out, rep, QUANTIZED.get(stored) or TOLERANCES[max(stored, dtype, key=_coarseness)])
    rep.seconds = time.perf_counter() - t0
    return rep


def _coarseness(name: str) -> int:
    return ("float32", "float16", "bfloat16").index(name)
