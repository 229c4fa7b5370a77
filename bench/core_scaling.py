#!/usr/bin/env python3
"""How one process scales with cores, and how torchrun spreads ranks over them (docs/performance.md,
"Cores"). With no disk in the way: the checkpoint (bench.py's, L full-width layers, random bf16) and
every output on a tmpfs, so the figures are the tool's CPU path alone.

For each step (split -n N, split-sparse -n N, merge --to gguf --dtype q8_0) and each core count k in
--cores (default 1, 2 and `nproc` when larger), the step runs pinned to cores 0..k-1 (`taskset`);
then `split` under `torchrun --nproc-per-node P` for P in --procs, every process pinned the same way
(each takes ranks RANK, RANK + P, ... of the N, as split does under torchrun). Runs interleaved, each
--runs times; medians (min-max) of wall and CPU seconds (user + sys of the process tree, from wait4),
and every output's sha256 checked equal to the first run's.

    python bench/core_scaling.py [--layers 1] [--runs 3] [--cores 1 2] [--procs 2] [--dir /dev/shm/D]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MC, MIXTRAL_8X7B, measure


def digest(d: Path) -> str:
    """One sha256 over the output's files (names and bytes; the manifest aside: it records the time)."""
    h = hashlib.sha256()
    for p in sorted(d.rglob("*") if d.is_dir() else [d]):
        if p.is_file() and "manifest" not in p.name:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while b := f.read(16 << 20):
                    h.update(b)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ncpu = len(os.sched_getaffinity(0))
    ap.add_argument("--cores", type=int, nargs="+", default=sorted({1, 2, ncpu} & set(range(1, ncpu + 1))))
    ap.add_argument("--procs", type=int, nargs="*", default=[2])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/mixtral-convert-cores"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    src = a.dir / f"src-L{a.layers}"
    if not (src / "consolidated.00.pth").exists():
        import torch

        from mixtral_convert.synth import tiny_config, train_tokenizer, write_torrent
        print(f"generating a {a.layers}-layer full-width checkpoint in {src} ...", flush=True)
        write_torrent(src, tiny_config(n_layers=a.layers, **MIXTRAL_8X7B), seed=0, dtype=torch.bfloat16)
        (a.dir / "tokenizer-llama.model").write_bytes(train_tokenizer(MIXTRAL_8X7B["vocab_size"], llama=True))
    out = a.dir / "out"
    N = str(a.world_size)
    steps = {
        "split": lambda o: ["split", src, "-n", N, "-o", o, "-q"],
        "split-sparse": lambda o: ["split-sparse", src, "-n", N, "-o", o, "-q"],
        "gguf-q8_0": lambda o: ["merge", src, "--to", "gguf", "--dtype", "q8_0", "-o", o / "m.gguf", "-q",
                                "--tokenizer", a.dir / "tokenizer-llama.model", "--max-position-embeddings", "32768"],
    }
    variants = [(step, k, None) for step in steps for k in a.cores] + [("split", max(a.cores), p) for p in a.procs]
    results: dict = {v: [] for v in variants}
    sums: dict = {}
    for _ in range(a.runs):
        for step, k, procs in variants:
            shutil.rmtree(out, ignore_errors=True)
            if step == "gguf-q8_0":
                out.mkdir(parents=True)
            pin = ["taskset", "-c", f"0-{k - 1}"]
            args = [str(x) for x in steps[step](out)]
            if procs is None:
                cmd = pin + MC + args
            else:
                cmd = pin + [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(procs), "-m", "mixtral_convert"] + args
            r = measure(cmd)
            results[(step, k, procs)].append(r)
            sums.setdefault(step, set()).add(digest(out))
    shutil.rmtree(out, ignore_errors=True)
    bad = [s for s, d in sums.items() if len(d) != 1]
    gb = (src / "consolidated.00.pth").stat().st_size / 1e9
    print(f"\n{a.layers} layer(s), {gb:.2f} GB source on {a.dir}, N={N}, {a.runs} runs each, {ncpu} cores allowed; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'step':<13} {'cores':>5} {'procs':>5} {'wall s':>20} {'cpu s':>20} {'GB/s':>6}")
    for (step, k, procs), rs in results.items():
        w = [x["wall_s"] for x in rs]
        c = [x["cpu_s"] for x in rs]
        print(f"{step:<13} {k:>5} {procs or 1:>5} {statistics.median(w):8.2f} ({min(w):.2f}-{max(w):.2f}) "
              f"{statistics.median(c):8.2f} ({min(c):.2f}-{max(c):.2f}) {gb / statistics.median(w):6.2f}")
    print("outputs identical across runs, cores and procs: " + ("yes" if not bad else f"NO: {bad}"))
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
