#!/usr/bin/env python3
"""Restack speed and memory on full-width Mixtral-8x7B layers against the project's references
(docs/performance.md, "Restacking an old per-expert GGUF").

    python bench/restack_speed.py [--layers 2] [--runs 3] [--dir D] [--keep]

Writes a GGUF in llama.cpp's old per-expert layout with the gguf package's writer: LAYERS layers of
8x7B's width (dim 4096, FFN 14336, 8 experts; 32/8 heads), a vocabulary of 32000, every weight
Q8_0 with random bytes (restacking copies bytes and never looks at their values). Then, --runs
times, it runs the two references of `make bench` (bench/bench.py) that move the same bytes, in an
order rotated from one repetition to the next, and then the tool, each from a cold page cache
(sync; drop_caches: needs root, otherwise the report says WARM):

    cat     `cat OLD > REF && sync` (the page cache's path)
    direct  bench/direct_copy.py -o REF OLD (reader and writer threads, O_DIRECT, fsync)
    tool    `mixtral-convert merge OLD --to gguf -o NEW -q` (fsync included, manifest with sha256)
    start   `mixtral-convert --help` (context, not a reference: what starting the CLI costs, cold)

Each run's wall seconds, CPU seconds and peak anonymous / max RSS are measured as bench.py does
(bench.measure). The report gives the medians, the tool's ratio to the faster reference of the same
repetition (median and spread), the 1-minute load average before each run, and checks that every
run's output has the same sha256, which the manifest records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DIRECT_COPY, MC, MiB, drop_caches, measure, sha256

DIM, FFN, E, V, HEADS, KV = 4096, 14336, 8, 32000, 32, 8


def q8(rng, rows: int, cols: int) -> np.ndarray:
    return rng.integers(0, 256, size=(rows, cols // 32 * 34), dtype=np.uint8)


def write_old(path: Path, layers: int) -> None:
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    for k, v in (("llama.context_length", 32768), ("llama.embedding_length", DIM), ("llama.block_count", layers),
                 ("llama.feed_forward_length", FFN), ("llama.attention.head_count", HEADS),
                 ("llama.attention.head_count_kv", KV), ("llama.expert_count", E), ("llama.expert_used_count", 2),
                 ("llama.vocab_size", V), ("general.file_type", 7)):
        w.add_uint32(k, v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 1e6)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)
    w.add_tensor("token_embd.weight", q8(rng, V, DIM), raw_dtype=T.Q8_0)
    for L in range(layers):
        w.add_tensor(f"blk.{L}.attn_norm.weight", np.ones(DIM, dtype=np.float32))
        for n, rows in (("attn_q", DIM), ("attn_k", DIM // 4), ("attn_v", DIM // 4), ("attn_output", DIM)):
            w.add_tensor(f"blk.{L}.{n}.weight", q8(rng, rows, DIM), raw_dtype=T.Q8_0)
        w.add_tensor(f"blk.{L}.ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        w.add_tensor(f"blk.{L}.ffn_gate_inp.weight", np.zeros((E, DIM), dtype=np.float32))
        for e in range(E):
            w.add_tensor(f"blk.{L}.ffn_gate.{e}.weight", q8(rng, FFN, DIM), raw_dtype=T.Q8_0)
            w.add_tensor(f"blk.{L}.ffn_down.{e}.weight", q8(rng, DIM, FFN), raw_dtype=T.Q8_0)
            w.add_tensor(f"blk.{L}.ffn_up.{e}.weight", q8(rng, FFN, DIM), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    w.add_tensor("output.weight", q8(rng, V, DIM), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the generated old-layout file for the next run")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="restack-"))
    work.mkdir(parents=True, exist_ok=True)
    old, ref, new = work / f"old-L{args.layers}.gguf", work / "ref.gguf", work / "new.gguf"
    manifest = new.with_name(new.name + ".mixtral-convert-manifest.json")
    if not old.exists():
        write_old(old, args.layers)
    size = old.stat().st_size
    refs = {"cat": ["sh", "-c", 'cat "$0" > "$1" && sync', old, ref], "direct": DIRECT_COPY + ["-o", ref, old]}
    tool = MC + ["merge", old, "--to", "gguf", "-o", new, "--force", "-q"]
    start = MC + ["--help"]
    runs, cold, digests = [], True, set()
    for rep in range(args.runs):
        roles = list(refs)
        roles = roles[rep % len(roles):] + roles[:rep % len(roles)]
        r = {}
        for role in roles + ["start", "tool"]:
            cold = drop_caches() and cold
            load = os.getloadavg()[0]
            cmd = {"tool": tool, "start": start}.get(role) or refs[role]
            r[role] = measure([str(c) for c in cmd]) | {"load": load}
            ref.unlink(missing_ok=True)
        digest = sha256(new)
        listed = json.loads(manifest.read_text())["files"][new.name]["sha256"]
        if listed != digest:
            raise SystemExit(f"run {rep + 1}: the manifest's sha256 {listed} is not the file's {digest}")
        digests.add(digest)
        new.unlink()
        manifest.unlink()
        fastest = min(r["cat"]["wall_s"], r["direct"]["wall_s"])
        r["ratio"] = r["tool"]["wall_s"] / fastest
        runs.append(r)
        print(f"  run {rep + 1}/{args.runs}: " + "  ".join(
            f"{k} {r[k]['wall_s']:5.1f} s (load {r[k]['load']:.2f})" for k in ("cat", "direct", "start", "tool")) +
            f"  x{r['ratio']:.2f} of the faster  tool cpu {r['tool']['cpu_s']:.1f} s  "
            f"anon {r['tool']['peak_anon_bytes'] / MiB:.0f} MiB  rss {r['tool']['max_rss_bytes'] / MiB:.0f} MiB",
            flush=True)
    if len(digests) != 1:
        raise SystemExit(f"the runs' outputs differ: {sorted(digests)}")
    med = {k: statistics.median(r[k]["wall_s"] for r in runs) for k in ("cat", "direct", "tool")}
    med_start = statistics.median(r["start"]["wall_s"] for r in runs)
    ratios = [r["ratio"] for r in runs]
    print(f"{args.layers} full-width layers, {size / 1e9:.2f} GB Q8_0, {args.runs} runs, "
          f"{'cold' if cold else 'WARM (could not drop caches)'} page cache; medians: "
          + ", ".join(f"{k} {med[k]:.1f} s ({size / med[k] / 1e6:.0f} MB/s)" for k in med)
          + f"; CLI start (--help) {med_start:.1f} s"
          + f"; tool/faster reference x{statistics.median(ratios):.2f} (x{min(ratios):.2f}-x{max(ratios):.2f}); "
          f"tool cpu {statistics.median(r['tool']['cpu_s'] for r in runs):.1f} s, peak anon "
          f"{max(r['tool']['peak_anon_bytes'] for r in runs) / MiB:.0f} MiB, max RSS "
          f"{max(r['tool']['max_rss_bytes'] for r in runs) / MiB:.0f} MiB; load before runs "
          f"{min(r[k]['load'] for r in runs for k in med):.2f}-{max(r[k]['load'] for r in runs for k in med):.2f}")
    if not args.keep:
        old.unlink()
    if args.dir is None and not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
