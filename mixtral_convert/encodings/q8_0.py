"""Q8_0 quantization over the cores, byte for byte what `gguf.quants.quantize(rows, Q8_0)` writes.

A Q8_0 block is 32 values as a float16 scale `d` and 32 int8 `q`. gguf-py (0.19) computes, per
block of float32 values `x`: `d = max|x| / 127` (a float32 division), `id = 1/d` in float32 (0
where d is 0), `q = round(x * id)` with halves rounded away from zero, and stores `d` cast to
float16 by numpy. Its numpy code runs on one core at about 6 CPU seconds per GB of bfloat16 source.

Here the bulk is torch's vectorized ops on spans of rows, on the calling thread: `max|x|` by torch
(a maximum is exact); `d`, `id` and the float16 cast of `d` by numpy with gguf-py's own expressions
(one value per 32, cheap); `x * id` in float32 (an IEEE product, as numpy's); and the rounding as
`trunc(y + copysign(0.49999997, y))` into int8. For |y| < 2**22 that is y rounded half away from
zero: adding the largest float32 below one half cannot carry a fraction under .5 across the next
integer (the sum is exact, or rounds to the float just below it) and carries every fraction of .5
or more (tests/gguf/test_q8_0.py checks every float32 within 8 ulps of each k and k + .5 up to 128
and all of [0.25, 1)). |y| stays under 127.5 for finite input.

How the work meets the cores (docs/performance.md, "Q8_0 over the cores"): a span's ops take a few
microseconds each, and Python threads running them in parallel hand the GIL back and forth between
every call; two threads measured twice the CPU seconds of one and more wall time, where two
processes scaled. So no thread pool: on up to two cores (`workers()`) the spans are small (1,000
blocks, under torch's parallel grain, in the cache), the cheapest CPU per byte, and the other core
is the writer's and the hash's; with more cores the spans are wide (16,384 blocks) and torch spreads
each op over its own threads, which need no GIL. The bytes do not depend on the span.

Two cases leave that path: a block whose scale is a nonzero float32 subnormal so small that `1/d`
overflows (max|x| below about 3.7e-37) makes gguf-py cast NaN to int8, whose result numpy leaves to
the platform; such blocks are quantized by gguf-py itself, so they match wherever it runs. inf and
NaN have no Q8_0 form (the scale would be inf or NaN): `NonFiniteValues` refuses them.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from ..errors import ConvertError
from ..io.workers import workers

QK = 32  # values per block
BLOCK_BYTES = 2 + QK  # float16 scale + 32 int8
SPAN_BLOCKS = 1000  # blocks per torch call: 32,000 values, under torch's parallel grain (32,768), 125 KiB float32
CHUNK_SPANS = 4  # spans whose scales are computed together (500 KiB of float32)
WIDE_SPAN_BLOCKS = 16384  # with more than two cores: 2 MiB of float32 per call, spread by torch over its threads
_HALF_DOWN = torch.tensor(0.5 - 2.0**-25, dtype=torch.float32)  # the largest float32 below 0.5


class NonFiniteValues(ConvertError):
    """inf or NaN in a tensor quantized to Q8_0."""

    def __init__(self, label: str):
        super().__init__(f"{label} holds inf or NaN, which Q8_0 cannot hold (a block's scale would be inf or "
                         "NaN); fix the source, or use --dtype bfloat16 or float32, which keep them")


def _scales(amax: np.ndarray, out: np.ndarray, label: str) -> np.ndarray:
    """Each block's 1/d (float32) from its max |x|, with d as float16 into out[:, :2]: gguf-py's
    own numpy expressions (the same float32 division, reciprocal and float16 cast)."""
    if not np.isfinite(amax).all():
        raise NonFiniteValues(label)
    d = amax / 127
    with np.errstate(divide="ignore", over="ignore"):  # a d beyond float16's range is inf there, as in gguf-py
        inv = np.where(d == 0, 0, 1 / d)
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return inv


def _range(x: torch.Tensor, out: np.ndarray, label: str, span: int, spans_per_chunk: int) -> None:
    """Quantize the blocks of x [n, 32] into out [n, 34], `spans_per_chunk` spans of `span` blocks at a
    time: their max |x|, then the scales, then the rounding, while the chunk's float32 copy is in the cache."""
    chunk = spans_per_chunk * span
    f_, m_ = torch.empty(chunk, QK), torch.empty(chunk)
    y_, h_ = torch.empty(span, QK), torch.empty(span, QK)
    q_ = torch.from_numpy(out[:, 2:]).view(torch.int8)
    n = x.shape[0]
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        fs, ms = f_[:c1 - c0].split(span), m_[:c1 - c0].split(span)
        for xs, f, m in zip(x[c0:c1].split(span), fs, ms, strict=True):
            f.copy_(xs)
            torch.amax(torch.abs(f, out=y_[:len(f)]), dim=1, out=m)
        inv = _scales(m_[:c1 - c0].numpy(), out[c0:c1], label)
        for f, iv, q in zip(fs, torch.from_numpy(inv).unsqueeze(1).split(span),
                            q_[c0:c1].split(span), strict=True):
            y, h = y_[:len(f)], h_[:len(f)]
            torch.mul(f, iv, out=y)
            torch.copysign(_HALF_DOWN, y, out=h)
            q.copy_(y.add_(h))  # float -> int8 truncates toward zero
        special = np.flatnonzero(np.isinf(inv))  # 1/d overflowed: gguf-py casts NaN to int8; gguf-py does these
        if special.size:
            with np.errstate(all="ignore"):
                out[c0 + special] = quants.quantize(f_[torch.from_numpy(special)].numpy(), GGMLQuantizationType.Q8_0)


def spans() -> tuple[int, int]:
    """(blocks per span, spans per chunk) for this machine: small spans on one thread where the cores
    are two or fewer (the other one writes and hashes), wide ones that torch spreads over its own
    threads where there are more."""
    return (SPAN_BLOCKS, CHUNK_SPANS) if workers() <= 2 else (WIDE_SPAN_BLOCKS, 1)


def quantize(rows: torch.Tensor, label: str = "tensor", span: int | None = None) -> np.ndarray:
    """Rows of float values (any float dtype; the last dimension a multiple of 32) as Q8_0 bytes
    (uint8, flat), equal to `gguf.quants.quantize(rows.float().numpy(), Q8_0).reshape(-1)`.
    `label` names the tensor in the error for inf or NaN; `span` (blocks per torch call) defaults to
    `spans()`'s choice for this machine and changes no byte."""
    if rows.numel() % QK or (rows.dim() and rows.shape[-1] % QK):
        raise ConvertError(f"{label}: rows of {rows.shape[-1]} values are not whole Q8_0 blocks of {QK}")
    x = rows.contiguous().reshape(-1, QK)
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    span, chunk = (span, CHUNK_SPANS) if span else spans()
    _range(x, out, label, span, chunk)
    return out.reshape(-1)
