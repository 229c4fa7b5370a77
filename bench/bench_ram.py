#!/usr/bin/env python3
"""make bench-ram: the tool's own ceiling, with no disk in the way.

Generates an L-layer full-width checkpoint (bench.py's, random finite bf16) on a tmpfs
(default /dev/shm/mixtral-convert-bench, which needs about three times its size in memory), then
runs each step --runs times with source and output both in RAM, and reports per step the median
wall and CPU seconds (user + sys, from wait4), GB/s of wall time, GB of the source per CPU second
(what one core moves), and the peak anonymous RSS. Every command of the tool (split-sparse, split,
merge, verify --source, concat --sha256, merge --to gguf in bfloat16 and q8_0) is measured beside
what moving or hashing the same bytes costs on the same tmpfs:

    cp       cp SRC COPY
    cat      cat SRC > COPY
    direct   bench/direct_copy.py -o COPY SRC (a reader and a writer thread, 16 MiB buffers; tmpfs
             refuses O_DIRECT, so here it reads and writes plainly)
    sha256   SHA-256 of SRC alone, as the tool computes it for its manifests (hashlib, 16 MiB reads)

GB per CPU second are of the source checkpoint for every step (verify reads it and the shards;
merge and concat write it; gguf-q8_0 writes about half as many bytes).

    python bench/bench_ram.py [--layers 1] [--runs 3] [--steps cp,cat,direct,sha256,split-sparse,...] [--dir D] [--keep]

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
from bench import BASE, DIRECT_COPY, GB, MC, MIXTRAL_8X7B, MiB, cut, measure, model_bytes, sha256

STEPS = ("cp", "cat", "direct", "sha256", "split-sparse", "split", "merge", "verify", "concat", "gguf-bf16",
         "gguf-q8_0")
SHA256 = ("import hashlib, sys\nh, b = hashlib.sha256(), bytearray(16 << 20)\nm = memoryview(b)\n"
          "with open(sys.argv[1], 'rb', buffering=0) as f:\n    while n := f.readinto(b):\n        h.update(m[:n])\n"
          "print(h.hexdigest())")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/mixtral-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint (and --dir) for another run")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent.parent / "bench-out" / "ram.json")
    a = ap.parse_args()
    steps = [s for s in a.steps.split(",") if s]
    if not steps or set(steps) - set(STEPS):
        ap.error(f"--steps: unknown {', '.join(sorted(set(steps) - set(STEPS))) or '(none given)'}")
    est = model_bytes(MIXTRAL_8X7B, a.layers)
    a.dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(a.dir).free < 3.2 * est:
        raise SystemExit(f"{a.dir}: needs about {3.2 * est / GB:.1f} GB free (3 copies of {est / GB:.1f} GB)")
    src = a.dir / "src"
    try:
        if not (src / BASE).exists():
            import torch

            from mixtral_convert.synth import tiny_config, write_torrent
            print(f"generating a {a.layers}-layer checkpoint in {src} ...", flush=True)
            write_torrent(src, tiny_config(n_layers=a.layers, **MIXTRAL_8X7B), seed=0, dtype=torch.bfloat16)
        size = (src / BASE).stat().st_size
        n = str(a.world_size)
        shards, pieces, out, copy = a.dir / "base", a.dir / "pieces", a.dir / "out", a.dir / "copy"
        inputs = {"merge": shards, "verify": shards, "concat": pieces}

        def prepare(step: str) -> None:
            """The step's input (split's shards, or the source cut in 10 pieces), made outside the timing;
            the other one removed, so that at most three copies of the checkpoint are in memory."""
            need = inputs.get(step)
            if need is None or need.exists():
                return
            for other in {shards, pieces} - {need}:
                shutil.rmtree(other, ignore_errors=True)
            if need == shards:
                measure(MC + ["split", str(src), "-n", n, "-o", str(shards), "-q"])
            else:
                cut(src / BASE, 10, pieces)
        tokenizer = a.dir / "tokenizer-llama.model"
        if {"gguf-bf16", "gguf-q8_0"} & set(steps) and not tokenizer.exists():
            from mixtral_convert.synth import train_tokenizer
            tokenizer.write_bytes(train_tokenizer(MIXTRAL_8X7B["vocab_size"], llama=True))
        gguf = MC + ["merge", str(src), "--to", "gguf", "-o", str(out / "m.gguf"), "--tokenizer", str(tokenizer),
                     "--max-position-embeddings", "32768", "-q", "--dtype"]
        cmds = {"cp": ["cp", str(src / BASE), str(copy)],
                "cat": ["sh", "-c", 'cat "$0" > "$1"', str(src / BASE), str(copy)],
                "direct": DIRECT_COPY + ["-o", str(copy), str(src / BASE)],
                "sha256": [sys.executable, "-c", SHA256, str(src / BASE)],
                "split-sparse": MC + ["split-sparse", str(src), "-n", n, "-o", str(out), "-q"],
                "split": MC + ["split", str(src), "-n", n, "-o", str(out), "-q"],
                "merge": MC + ["merge", str(shards), "-o", str(out), "-q"],
                "verify": MC + ["verify", str(shards), "--source", str(src), "-q"],
                "concat": MC + ["concat", str(pieces), "--sha256", sha256(src / BASE) if "concat" in steps else "",
                                "-o", str(copy), "-q"],
                "gguf-bf16": gguf + ["bfloat16"], "gguf-q8_0": gguf + ["q8_0"]}
        runs: dict[str, list[dict]] = {s: [] for s in steps}
        for rep in range(a.runs):
            for s in steps:
                prepare(s)
                r = measure(cmds[s]) | {"loadavg_1min": os.getloadavg()[0]}
                runs[s].append(r)
                shutil.rmtree(out, ignore_errors=True)
                for f in a.dir.glob("copy*"):
                    f.unlink()
                print(f"  run {rep + 1}/{a.runs} {s:12s} {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s "
                      f"({r['cpu_user_s']:.2f} user, {r['cpu_sys_s']:.2f} sys)  {size / GB / r['wall_s']:5.2f} GB/s  "
                      f"{size / GB / r['cpu_s']:5.2f} GB/s per CPU-s  anon {r['peak_anon_bytes'] / MiB:4.0f} MiB  "
                      f"(load {r['loadavg_1min']:.1f})", flush=True)
    finally:
        for d in ("out", "base", "pieces"):
            shutil.rmtree(a.dir / d, ignore_errors=True)
        (a.dir / "copy").unlink(missing_ok=True)
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    print(f"\nRAM-backed ({a.dir}), L={a.layers} ({size / GB:.1f} GB), N={a.world_size}, {a.runs} runs, "
          f"{os.cpu_count()} CPUs\n")
    gbc = {s: size / GB / statistics.median(r["cpu_s"] for r in rs) for s, rs in runs.items()}
    side = [k for k in ("cat", "direct", "sha256") if k in gbc]
    print("| step | wall s median (min-max) | CPU s median (user/sys) | GB/s | GB per CPU-s | "
          + "".join(f"x {k}'s GB per CPU-s | " for k in side) + "peak anon MiB | load 1-min |")
    print("|---" * (7 + len(side)) + "|")
    for s, rs in runs.items():
        w, c = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
        mw, mc = statistics.median(w), statistics.median(c)
        u, y = statistics.median(r["cpu_user_s"] for r in rs), statistics.median(r["cpu_sys_s"] for r in rs)
        load = [r["loadavg_1min"] for r in rs]
        print(f"| {s} | {mw:.2f} ({min(w):.2f}-{max(w):.2f}) | {mc:.2f} ({u:.2f}/{y:.2f}) | {size / GB / mw:.2f} | "
              f"{gbc[s]:.2f} | " + "".join(f"{gbc[s] / gbc[k]:.2f} | " for k in side)
              + f"{max(r['peak_anon_bytes'] for r in rs) / MiB:.0f} | {min(load):.1f}-{max(load):.1f} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"layers": a.layers, "bytes": size, "runs": runs, "gb_per_cpu_s": gbc}, indent=2)
                      + "\n")


if __name__ == "__main__":
    main()
