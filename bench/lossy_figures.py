#!/usr/bin/env python3
"""Figures of every lossy path on the trained fixture, measured by running the tool; prints a
Markdown table (docs/parity.md, "Lossy paths on the trained model").

    .venv/bin/python bench/lossy_figures.py [--rows N] [--keep DIR]

For each row of ROWS: the fp32 fixture (fixtures/trained) is converted by the row's command
(`mixtral-convert ...`), then its logits over the held-out text (fixtures/trained/corpus.py, in
rows of 128 tokens) are computed (by default `mixtral-convert forward --tokens-file`), and
compared with the fp32 source's: rms rel = ||row - fp32|| / ||fp32|| (Frobenius), top-1
agreement, the held-out perplexity and its ratio to fp32's.

A new lossy path is one more Row: `convert` is the tool's arguments with {src} and {out}
(None: the source itself), `forward` the extra arguments of `forward`, and `logits` replaces
the tool's forward where another program is the judge (e.g. llama.cpp on a GGUF file):
a function (path of the converted output, tokens [B, S]) -> float32 logits [B, S, V].
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures" / "trained"))
sys.path.insert(0, str(ROOT / "tests"))
from llama_judge import logits as judge_logits  # noqa: E402
from measure import drift, held_out_tokens, nll  # noqa: E402

SRC = ROOT / "fixtures" / "trained"


@dataclass
class Row:
    name: str
    convert: Optional[list] = None  # mixtral-convert arguments, {src}, {out} and {work} filled in (or a list of them)
    forward: list[str] = field(default_factory=list)  # extra arguments of `forward`
    logits: Optional[Callable[[Path, torch.Tensor], torch.Tensor]] = None  # another judge
    note: str = ""


ROWS = [
    Row("fp32 (the fixture)", note="reference"),
    Row("`merge --to hf --dtype bfloat16`", ["merge", "{src}", "--to", "hf", "-o", "{out}", "-q", "--dtype", "bfloat16",
                                             "--max-position-embeddings", "512"],
        note="weights rounded to bf16, computed in fp32"),
    Row("`merge --to hf --dtype float16`", ["merge", "{src}", "--to", "hf", "-o", "{out}", "-q", "--dtype", "float16",
                                            "--max-position-embeddings", "512"],
        note="weights rounded to fp16, computed in fp32"),
    Row("`split-sparse -n 4 --dtype bfloat16`", ["split-sparse", "{src}", "-n", "4", "-o", "{out}", "-q",
                                                 "--dtype", "bfloat16"],
        note="bf16 shards, sharded forward in fp32"),
    Row("`forward --dtype bfloat16`", forward=["--dtype", "bfloat16"],
        note="fp32 weights, bf16 compute (cast layer by layer)"),
    Row("`split -n 8 --dtype bfloat16` + `forward --dtype bfloat16`",
        ["split", "{src}", "-n", "8", "-o", "{out}", "-q", "--dtype", "bfloat16"], forward=["--dtype", "bfloat16"],
        note="bf16 shards, sharded forward in bf16"),
]


def llama_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits for each row of `tokens`, each from a fresh context (tests/llama_judge.py: a child
    process, float32 KV cache, no extra buffer types)."""
    return torch.from_numpy(judge_logits(path, tokens.tolist(), path.name))


def _gguf(dtype: str, note: str) -> Row:
    return Row(f"`merge --to gguf --dtype {dtype}`, run by llama.cpp",
               ["merge", "{src}", "--to", "gguf", "-o", "{out}.gguf", "-q", "--dtype", dtype,
                "--max-position-embeddings", "512"], logits=lambda p, t: llama_logits(Path(f"{p}.gguf"), t), note=note)


GGUF_ROWS = [
    _gguf("float32", "llama.cpp's own forward on the same weights"),
    _gguf("float16", "weights in F16 (norms and router F32)"),
    _gguf("bfloat16", "weights in BF16 (norms and router F32)"),
    _gguf("q8_0", "Q8_0 blocks of 32, written by the tool"),
    _gguf("q6_k", "llama.cpp's quantizer; rows of 128 and 160 are not whole 256-blocks: it falls back per tensor"),
    _gguf("q5_k_m", "llama.cpp's quantizer (fallback types on rows that are not whole 256-blocks)"),
    _gguf("q4_k_m", "llama.cpp's quantizer (fallback types on rows that are not whole 256-blocks)"),
]


def _roundtrip(dtype: str) -> list[Row]:
    """The fp32 fixture to a `dtype` GGUF, into Accessory with --dequantize (bfloat16, the default; and
    float32, the GGUF's values exactly), and back to a `dtype` GGUF from the float32 Accessory output."""
    gguf = ["merge", "{src}", "--to", "gguf", "-o", "{work}/rt-" + dtype + ".gguf", "-q", "--dtype", dtype,
            "--max-position-embeddings", "512", "--force"]
    tok = ["--tokenizer", "{src}/tokenizer.model", "--dequantize", "-q"]
    acc = ["split-sparse", "{work}/rt-" + dtype + ".gguf", "-n", "4", "-o", "{out}", *tok]
    back = ["merge", "{work}/rt-" + dtype + "-f32", "--to", "gguf", "-o", "{out}.gguf", "-q", "--dtype", dtype,
            "--max-position-embeddings", "512"]
    return [
        _gguf(dtype, f"the {dtype} GGUF the round trip starts from"),
        Row(f"{dtype} GGUF -> `split-sparse -n 4 --dequantize` (bfloat16)", [gguf, acc],
            note=f"the {dtype} GGUF's values, rounded to bf16, sharded forward in fp32"),
        Row(f"{dtype} GGUF -> `split-sparse -n 4 --dequantize --dtype float32`", [gguf, acc + ["--dtype", "float32"]],
            note=f"the {dtype} GGUF's values exactly, sharded forward in fp32"),
        Row(f"{dtype} GGUF -> Accessory float32 -> `merge --to gguf --dtype {dtype}`, run by llama.cpp",
            [gguf, [a.replace("{out}", "{work}/rt-" + dtype + "-f32") for a in acc] + ["--dtype", "float32", "--force"],
             back], logits=lambda p, t: llama_logits(Path(f"{p}.gguf"), t),
            note=f"quantized to {dtype} a second time, from the dequantized values"),
    ]


ROUNDTRIP_ROWS = _roundtrip("q8_0") + _roundtrip("q4_k_m")


def tool(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mixtral_convert", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def tool_logits(path: Path, tokens_file: Path, out: Path, extra: list[str]) -> torch.Tensor:
    tool("forward", str(path), "--tokens-file", str(tokens_file), "-o", str(out), "--force", *extra)
    return torch.load(out, map_location="cpu", weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=None, help="use only the first N held-out rows of 128 tokens")
    ap.add_argument("--keep", type=Path, default=None, help="work in DIR (default: a temporary directory)")
    ap.add_argument("--gguf", action="store_true",
                    help="add the GGUF rows, judged by llama.cpp (needs llama-cpp-python: make install-llama)")
    ap.add_argument("--roundtrip", action="store_true",
                    help="add the round trips GGUF (q8_0, q4_k_m) -> Accessory (--dequantize) -> GGUF (needs "
                         "llama-cpp-python)")
    ap.add_argument("--only-extra", action="store_true", help="leave out ROWS but the fp32 reference")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lossy-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = held_out_tokens(SRC / "tokenizer.model", args.rows)
    tokens_file = work / "heldout.pt"
    torch.save(rows[:, :-1].contiguous(), tokens_file)
    print(f"held-out: {rows.shape[0]} rows of {rows.shape[1] - 1} tokens ({rows[:, 1:].numel()} predicted)",
          file=sys.stderr)
    ref = None
    lines = ["| path | rms rel | top-1 | perplexity | ratio to fp32 | what |", "|---|---|---|---|---|---|"]
    table = (ROWS[:1] if args.only_extra else ROWS) + (GGUF_ROWS if args.gguf else []) + \
        (ROUNDTRIP_ROWS if args.roundtrip else [])
    for i, row in enumerate(table):
        t0 = time.perf_counter()
        path = SRC
        if row.convert:
            path = work / f"row{i}"
            steps = row.convert if isinstance(row.convert[0], list) else [row.convert]
            for step in steps:  # a chain of commands; the last one's output is judged
                tool(*(a.format(src=SRC, out=path, work=work) for a in step), "--force")
        if row.logits is not None:
            logits = row.logits(path, rows[:, :-1])
        else:
            logits = tool_logits(path, tokens_file, work / f"logits{i}.pt", row.forward)
        ppl = torch.tensor(nll(logits, rows)).exp().item()
        if ref is None:
            ref, ref_ppl = logits, ppl
        rms, top1 = drift(ref, logits)
        lines.append(f"| {row.name} | {rms:.2e} | {top1:.4f} | {ppl:.3f} | {ppl / ref_ppl:.4f} | {row.note} |")
        print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
