#!/usr/bin/env python3
"""make bench-ram: the tool's own ceiling, with no disk in the way.

Generates an L-layer full-width checkpoint (bench.py's, random finite bf16) on a tmpfs
(default /dev/shm/mixtral-convert-bench, which needs about twice its size in memory), then runs
each step --runs times with source and output both in RAM, and reports per step the median
wall and CPU seconds (user + sys, from wait4), GB/s of wall time, GB/s per CPU second (what
one core moves), and the peak anonymous RSS, beside `cp` of the same file on the same tmpfs.

    python bench/bench_ram.py [--layers 1] [--runs 3] [--steps cp,split-sparse,split,merge] [--dir D] [--keep]

With PYTHONPATH=TREE it measures the mixtral_convert of another tree (e.g. a `git archive` of
an older commit) on the same checkpoint, for before/after pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BASE, GB, MC, MIXTRAL_8X7B, MiB, measure, model_bytes

STEPS = ("cp", "split-sparse", "split", "merge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", default="cp,split-sparse,split,merge")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/mixtral-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint (and --dir) for another run")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent.parent / "bench-out" / "ram.json")
    a = ap.parse_args()
    steps = [s for s in a.steps.split(",") if s]
    est = model_bytes(MIXTRAL_8X7B, a.layers)
    a.dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(a.dir).free < 2.2 * est:
        raise SystemExit(f"{a.dir}: needs about {2.2 * est / GB:.1f} GB free (2 copies of {est / GB:.1f} GB)")
    src = a.dir / "src"
    try:
        if not (src / BASE).exists():
            import torch

            from mixtral_convert.synth import tiny_config, write_torrent
            print(f"generating a {a.layers}-layer checkpoint in {src} ...", flush=True)
            write_torrent(src, tiny_config(n_layers=a.layers, **MIXTRAL_8X7B), seed=0, dtype=torch.bfloat16)
        size = (src / BASE).stat().st_size
        n = str(a.world_size)
        shards = a.dir / "base"
        if "merge" in steps:  # merge's input, made outside the timing
            measure(MC + ["split", str(src), "-n", n, "-o", str(shards), "-q"])
        cmds = {"cp": ["cp", str(src / BASE), str(a.dir / "copy")],
                "split-sparse": MC + ["split-sparse", str(src), "-n", n, "-o", str(a.dir / "out"), "-q"],
                "split": MC + ["split", str(src), "-n", n, "-o", str(a.dir / "out"), "-q"],
                "merge": MC + ["merge", str(shards), "-o", str(a.dir / "out"), "-q"]}
        runs: dict[str, list[dict]] = {s: [] for s in steps}
        for rep in range(a.runs):
            for s in steps:
                r = measure(cmds[s]) | {"loadavg_1min": os.getloadavg()[0]}
                runs[s].append(r)
                shutil.rmtree(a.dir / "out", ignore_errors=True)
                (a.dir / "copy").unlink(missing_ok=True)
                print(f"  run {rep + 1}/{a.runs} {s:12s} {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s "
                      f"({r['cpu_user_s']:.2f} user, {r['cpu_sys_s']:.2f} sys)  {size / GB / r['wall_s']:5.2f} GB/s  "
                      f"{size / GB / r['cpu_s']:5.2f} GB/s per CPU-s  anon {r['peak_anon_bytes'] / MiB:4.0f} MiB  "
                      f"(load {r['loadavg_1min']:.1f})", flush=True)
    finally:
        shutil.rmtree(a.dir / "out", ignore_errors=True)
        shutil.rmtree(a.dir / "base", ignore_errors=True)
        (a.dir / "copy").unlink(missing_ok=True)
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    print(f"\nRAM-backed ({a.dir}), L={a.layers} ({size / GB:.1f} GB), N={a.world_size}, {a.runs} runs, "
          f"{os.cpu_count()} CPUs\n")
    print("| step | wall s median (min-max) | CPU s median (user/sys) | GB/s | GB/s per CPU-s | peak anon MiB |")
    print("|---|---|---|---|---|---|")
    for s, rs in runs.items():
        w, c = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
        mw, mc = statistics.median(w), statistics.median(c)
        u, y = statistics.median(r["cpu_user_s"] for r in rs), statistics.median(r["cpu_sys_s"] for r in rs)
        print(f"| {s} | {mw:.2f} ({min(w):.2f}-{max(w):.2f}) | {mc:.2f} ({u:.2f}/{y:.2f}) | {size / GB / mw:.2f} | "
              f"{size / GB / mc:.2f} | {max(r['peak_anon_bytes'] for r in rs) / MiB:.0f} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"layers": a.layers, "bytes": size, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
