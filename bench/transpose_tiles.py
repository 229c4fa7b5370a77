#!/usr/bin/env python3
"""How fast a rank's w2 band is transposed for the sparse layout, by tile height.

The band: columns r*Hs:(r+1)*Hs of a 4096 x 14336 bf16 expert w2 (Mixtral-8x7B, N=8), copied
transposed into a contiguous [Hs, 4096] block, as `io.lazy.transpose_into` does it (a few
source rows at a time). One thread; the tile heights are interleaved over 15 repetitions and
the median throughput is printed (GB/s of output).

    python bench/transpose_tiles.py
"""

import statistics
import time

import torch


def tiled(tile):
    def f(dst, s):
        for i in range(0, s.shape[0], tile):
            dst[:, i:i + tile].copy_(s[i:i + tile].t())
    return f


def main() -> None:
    torch.set_num_threads(1)
    src = torch.randn(4096, 14336).to(torch.bfloat16)[:, 1792:3584]
    nbytes = 1792 * 4096 * 2
    fns = {t: tiled(t) for t in (8, 16, 24, 32, 48)}
    times = {t: [] for t in fns}
    dst = torch.empty(1792, 4096, dtype=torch.bfloat16)
    for _ in range(15):
        for t, f in fns.items():
            a = time.perf_counter()
            f(dst, src)
            times[t].append(time.perf_counter() - a)
    for t, ts in times.items():
        print(f"tile {t:3d} rows: {nbytes / statistics.median(ts) / 1e9:.2f} GB/s (median of {len(ts)})")


if __name__ == "__main__":
    main()
