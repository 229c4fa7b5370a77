#!/usr/bin/env python3
"""A golden run: the same conversions of the same tiny fixtures, every output file hashed.

Run it on two trees and diff the outputs to prove a change leaves every output byte-identical:

    python bench/golden.py OUT_DIR > before.txt      # on the old tree
    python bench/golden.py OUT_DIR > after.txt       # on the new one
    diff before.txt after.txt

Manifests hold the command line, the time and absolute paths, so they are listed by name only.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from mixtral_convert.synth import tiny_config, train_tokenizer, write_torrent  # noqa: E402

WIDE = dict(dim=64, n_heads=8, n_kv_heads=8, head_dim=8, hidden_dim=96, num_experts=8, vocab_size=128, n_layers=2)


def run(*args) -> None:
    p = subprocess.run([sys.executable, "-m", "mixtral_convert", *map(str, args), "-q"], capture_output=True,
                       text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, args))}: exit {p.returncode}: {p.stderr.strip()}")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "golden-out").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src, src32 = root / "src", root / "src32"
    write_torrent(src, tiny_config(**WIDE))
    write_torrent(src32, tiny_config(**WIDE), dtype=torch.float32)
    src384 = root / "src384"  # a vocabulary that holds the byte pieces llama.cpp's GGUF needs
    write_torrent(src384, tiny_config(**dict(WIDE, vocab_size=384)), tokenizer=False)
    (src384 / "tokenizer.model").write_bytes(train_tokenizer(384, llama=True))
    steps = [
        ("split", src, "-n", 4, "-o", root / "base4"),
        ("split-sparse", src, "-n", 2, "-o", root / "sparse2"),
        ("split", src, "-n", 2, "--format", "safetensors", "-o", root / "base2st"),
        ("split-sparse", src32, "-n", 4, "-o", root / "sparse4-32"),
        ("split", src, "-n", 2, "--dtype", "float32", "-o", root / "base2-f32"),
        ("merge", root / "base4", "-o", root / "base4-merged"),
        ("merge", root / "sparse2", "--to", "hf", "--max-position-embeddings", 4096, "-o", root / "hf"),
        ("merge", root / "sparse4-32", "--to", "hf", "--max-shard-size", "20KB", "--max-position-embeddings", 64,
         "-o", root / "hf-sharded"),
        ("split-sparse", root / "hf", "-n", 4, "-o", root / "hf-sparse4"),
        ("split", root / "sparse2", "-n", 8, "-o", root / "sparse2-base8"),
        ("merge", root / "base2st", "--dtype", "float16", "-o", root / "base2st-f16"),
        ("merge", src384, "--to", "gguf", "--dtype", "bfloat16", "--max-position-embeddings", 4096,
         "-o", root / "gguf" / "bf16.gguf"),
        ("split-sparse", src384, "-n", 2, "-o", root / "sparse2-384"),
        ("merge", root / "sparse2-384", "--to", "gguf", "--dtype", "q8_0", "--max-position-embeddings", 4096,
         "-o", root / "gguf" / "q8_0.gguf"),
    ]
    for step in steps:
        run(*step)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root)
            if "manifest" in p.name:
                print(f"{rel} (manifest)")
            else:
                print(f"{rel} {hashlib.sha256(p.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
