#!/usr/bin/env python3
"""CPU seconds per GB of Q8_0 quantization: the gguf package's numpy quantizer against encodings.q8_0.

Quantizes one random matrix (default 256 MiB of float32, then the same values in bfloat16) --runs
times with each, interleaved, a block of rows at a time as `merge --to gguf` does (4 MiB of source per
block, --block-mib), and reports per quantizer the median (min-max) CPU seconds of the process (user + sys,
every thread) and wall seconds per GB of the matrix as given, after checking that both give the same
bytes. Each `--spans` value is encodings.q8_0 with that many blocks per torch call, on one thread;
each `--threads` value K above 1 is K Python threads quantizing whole blocks at once (the machine's
own span), which shows what the GIL costs when the calls are this small. Not a test: no time is asserted.

    python bench/q8_0_speed.py [--mib 256] [--runs 5] [--spans 1000 16384] [--threads 2] [--block-mib 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from mixtral_convert.encodings import q8_0
from mixtral_convert.formats.gguf.write import QUANT_BLOCK_BYTES


def timed(fn, blocks: list[torch.Tensor]) -> tuple[float, float, bytes]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = [fn(b) for b in blocks]
    c, w = time.process_time() - c0, time.perf_counter() - w0
    return c, w, b"".join(o.tobytes() for o in out)


def _threaded(block: torch.Tensor, k: int) -> np.ndarray:
    """The block's rows cut in k parts, each quantized on its own thread (the machine's span)."""
    with ThreadPoolExecutor(k) as pool:
        parts = list(pool.map(lambda part: q8_0.quantize(part, "bench"), block.tensor_split(k)))
    return np.concatenate(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of the float32 matrix")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--spans", type=int, nargs="+", default=[q8_0.SPAN_BLOCKS, q8_0.WIDE_SPAN_BLOCKS])
    ap.add_argument("--threads", type=int, nargs="*", default=[2])
    ap.add_argument("--block-mib", type=float, default=QUANT_BLOCK_BYTES / 2**20, help="source MiB per call")
    a = ap.parse_args()
    rows = a.mib * 2**20 // 4 // 4096
    x32 = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(0))
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for x in (x32, x32.to(torch.bfloat16)):
        gb = x.numel() * x.element_size() / 1e9
        blocks = list(x.split(max(1, int(a.block_mib * 2**20) // (4096 * x.element_size()))))
        ways = {"gguf.quants": lambda b: quants.quantize(b.float().numpy(), GGMLQuantizationType.Q8_0).reshape(-1)}
        for sp in a.spans:
            ways[f"q8_0, spans of {sp}"] = lambda b, sp=sp: q8_0.quantize(b, "bench", span=sp)
        for t in (t for t in a.threads if t > 1):
            ways[f"q8_0, {t} threads a block each"] = lambda b, t=t: _threaded(b, t)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        first = {}
        for _ in range(a.runs):
            for k, fn in ways.items():
                c, w, out = timed(fn, blocks)
                res[k].append((c, w))
                first.setdefault(k, out)
        same = len(set(first.values())) == 1
        print(f"\n{x.dtype} [{rows}, 4096] ({gb:.3f} GB) in {len(blocks)} blocks, {a.runs} interleaved runs; "
              f"same bytes: {same}")
        print("| quantizer | CPU s per GB median (min-max) | wall s per GB median (min-max) |")
        print("|---|---|---|")
        for k, v in res.items():
            cs, ws = [c / gb for c, _ in v], [w / gb for _, w in v]
            print(f"| {k} | {statistics.median(cs):.2f} ({min(cs):.2f}-{max(cs):.2f}) | "
                  f"{statistics.median(ws):.2f} ({min(ws):.2f}-{max(ws):.2f}) |")
        if not same:
            raise SystemExit("the quantizers' bytes differ")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
