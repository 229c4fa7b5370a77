#!/usr/bin/env python3
"""The LoRA merge's cost (docs/performance.md, "LoRA merge"): reading one weight merged with W + B·A
(io/lora.py: a fixed-order elementwise float32 sum, block and machine independent) against reading it
plain, and against a BLAS matmul merge (what the fixed order replaces), per 16 MiB block as the writer
reads it.

    python bench/lora_merge.py [ROWS COLS RANK [THREADS]]   # default 4096 4096 16 (Mixtral-8x7B's wq)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

from mixtral_convert.io.lazy import Stored
from mixtral_convert.io.lora import LoraMerged, Segment


def timed(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    rows, cols, rank = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (4096, 4096, 16)
    if len(sys.argv) > 4:
        torch.set_num_threads(int(sys.argv[4]))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    b = torch.randn(rows, rank, generator=g).to(torch.bfloat16)
    a = torch.randn(rank, cols, generator=g).to(torch.bfloat16)
    plain = Stored(w, "w")
    merged = LoraMerged(plain, [Segment(0, rows, Stored(b), Stored(a))])

    def read(t):  # each block copied, as the writer's buffer is (a plain read alone is a view)
        for r0, r1 in t.row_blocks():
            t.read(r0, r1).clone()

    def blas():
        for r0, r1 in plain.row_blocks():
            torch.addmm(w[r0:r1].float(), b[r0:r1].float(), a.float()).to(torch.bfloat16)

    t_plain, t_merged, t_blas = timed(lambda: read(plain)), timed(lambda: read(merged)), timed(blas)
    mb = w.nbytes / 2**20
    print(f"weight [{rows}, {cols}] bf16 ({mb:.0f} MiB), LoRA rank {rank}, {torch.get_num_threads()} threads")
    print(f"plain read     {t_plain * 1e3:8.1f} ms  {mb / t_plain:8.0f} MiB/s")
    print(f"merged (fixed) {t_merged * 1e3:8.1f} ms  {mb / t_merged:8.0f} MiB/s")
    print(f"merged (BLAS)  {t_blas * 1e3:8.1f} ms  {mb / t_blas:8.0f} MiB/s  (not block independent)")


if __name__ == "__main__":
    main()
