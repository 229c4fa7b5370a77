#!/usr/bin/env python3
"""Restack speed and memory on full-width Mixtral-8x7B layers (docs/performance.md, "Restacking an
old per-expert GGUF").

    .venv/bin/python bench/restack_speed.py [--layers 2] [--keep DIR]

Writes a GGUF in llama.cpp's old per-expert layout with the gguf package's writer: LAYERS layers of
8x7B's width (dim 4096, FFN 14336, 8 experts; 32/8 heads), a vocabulary of 32000, every weight
Q8_0 with random bytes (restacking copies bytes and never looks at their values). Then it times
`mixtral-convert merge OLD.gguf --to gguf` in a child process (its peak RSS from getrusage) against
`cp` of the same file, both after the source was read once (page cache warm), and prints one line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

DIM, FFN, E, V, HEADS, KV = 4096, 14336, 8, 32000, 32, 8
CHILD = ("import resource, sys\nfrom mixtral_convert.entry import main\ntry:\n    main(sys.argv[1:])\n"
         "except SystemExit as e:\n    assert not e.code, e.code\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


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
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="restack-"))
    work.mkdir(parents=True, exist_ok=True)
    old = work / "old.gguf"
    if not old.exists():
        write_old(old, args.layers)
    size = old.stat().st_size
    with open(old, "rb") as f:  # warm: both runs read from the page cache
        while f.read(64 << 20):
            pass
    t0 = time.perf_counter()
    shutil.copyfile(old, work / "copy.gguf")
    os.sync()
    cp = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, "merge", str(old), "--to", "gguf", "-o", str(work / "new.gguf"),
                          "--force", "-q"], check=True, capture_output=True, text=True)
    restack = time.perf_counter() - t0
    rss = int(run.stdout.split()[-1]) / 1024  # the child's own peak (a forked parent's pages would count in CHILDREN)
    t0 = time.perf_counter()
    GGUFReader(old)
    parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(old, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    digest = time.perf_counter() - t0
    print(f"{args.layers} full-width layers, {size / 1e9:.2f} GB Q8_0: restack {restack:.1f} s "
          f"({size / restack / 1e6:.0f} MB/s, peak RSS {rss:.0f} MiB, fsync included), "
          f"copyfile {cp:.1f} s ({size / cp / 1e6:.0f} MB/s, sync included); of the restack's parts: "
          f"gguf's GGUFReader on the header {parse:.1f} s, sha256 of the bytes (the manifest's) {digest:.1f} s")
    for p in ("copy.gguf", "new.gguf", "new.gguf.mixtral-convert-manifest.json"):
        (work / p).unlink(missing_ok=True)
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
