#!/usr/bin/env python3
"""make bench: mixtral-convert against the fastest way to move the same bytes, with the disk's noise shown.

Generates a checkpoint whose every tensor has Mixtral-8x7B's full size (L layers, random finite bf16),
then, --runs times, runs each step right after its reference runs, every run from a cold page cache
(sync; echo 3 > /proc/sys/vm/drop_caches: needs root, otherwise the report says WARM). Each step has
two references that move the same bytes, and cp as context where there is a cp for it:

    cat    `cat` into the same place + `sync` (the page cache's path)
    direct bench/direct_copy.py: a reader and a writer thread, 16 MiB page-aligned buffers, O_DIRECT on
           both sides where the filesystem takes it, each output fsynced (the disk's path)
    cp     `cp` (+ `sync`): context only

    step          what it moves                                        cp
    split-sparse  SRC to one file                                      cp SRC DST && sync
    split         SRC to one file                                      cp SRC DST && sync
    gguf-bf16/-q8_0  SRC to one file (merge SRC --to gguf --dtype bfloat16 / q8_0)   cp SRC DST && sync
    merge         SHARDS (split's output) to a directory               cp -r SHARDS DST && sync
    verify        SRC and SHARDS read, nothing written                 -
    concat        PIECES (SRC cut in --pieces byte pieces) joined      -
    adapter       SRC to one file (merge SRC --adapter A: rank --rank  cp SRC DST && sync
                  LoRA on every linear, a full-vocabulary float32 lm_head in modules_to_save;
                  bench/adapter_merge.py writes A)

The references of a repetition run in turn (their order rotates from one repetition to the next),
then the tool. Ratios are taken per repetition against the faster of cat and direct in that
repetition (the limit this machine showed then), and against each reference on its own, so drift of
the disk hits both sides; the report gives each ratio's median and spread (min-max) over the runs,
the medians (min-max) of every run's wall seconds, their CPU seconds, and the 1-minute load average
before the runs.

With `--steps ...,baseline`, the load-everything baseline written here (torch.load the whole file,
slice, torch.save per rank, as the seed tutorial's scripts do) also runs right after split and
split-sparse. CPU seconds are user + sys of the process tree (from wait4); the peak anonymous RSS is
sampled from /proc every 10 ms (the memory that cannot be dropped; the highest of the runs).

Checks: every run's output files have the same sha256 as the first run's (the manifest aside: it
records the time and the source's mtime) and the manifest's sha256 agree with them; merge and concat
give back the source byte for byte; with baseline, our shards hold the same tensors, byte for byte,
as the baseline's (first run).

Disk: at most about 2x the source at a time (3x with baseline): each reference's copy is removed
before the next run. split-sparse runs before split so
that only split's shards are kept for merge and verify; the source is removed before merge's pair and
put back from merge's output once its sha256 equals the source's (concat's likewise). Every output is
deleted once measured, the generated source at the end unless --keep; a run that would not fit in
the free space is refused before anything is written.

    python bench/bench.py [--layers 2 4 8] [--runs 3] [--steps split,merge] [--dir D] [--json F] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The benchmark's subject: every tensor exactly Mixtral-8x7B's size (docs/formats.md, "Torrent release").
MIXTRAL_8X7B = dict(dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                    num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
MIXTRAL_8X22B = dict(dim=6144, hidden_dim=16384, n_heads=48, n_kv_heads=8, head_dim=128, vocab_size=32768,
                     num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
PROJECT = {"Mixtral-8x7B": (MIXTRAL_8X7B, 32), "Mixtral-8x22B": (MIXTRAL_8X22B, 56)}

BASE = "consolidated.00.pth"
MANIFEST = "mixtral-convert-manifest.json"
# the order within a repetition
ORDER = ("split-sparse", "split", "gguf-bf16", "gguf-q8_0", "adapter", "merge", "verify", "concat")
STEPS = ("split", "split-sparse", "merge", "verify", "concat", "baseline", "gguf-bf16", "gguf-q8_0", "adapter")
REFS = ("cat", "direct", "cp")  # the references (cp: context, not in the ratio to the faster)
DIRECT_COPY = [sys.executable, str(Path(__file__).resolve().parent / "direct_copy.py")]
GGUF_STEPS = {"gguf-bf16": "bfloat16", "gguf-q8_0": "q8_0"}  # merge SRC --to gguf --dtype X
MC = [sys.executable, "-m", "mixtral_convert"]
GB = 1e9
MiB = 2**20


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    out += _tree(int(c))
    except OSError:
        pass
    return out


def _status(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:", "VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return vals


def measure(cmd: list[str]) -> dict:
    """Run cmd: wall time, CPU time (user + sys of it and every descendant it waited for, from wait4),
    peak anonymous RSS and max RSS of its process tree (sampled every 10 ms). Anonymous memory counts
    RssShmem too: the tool's block pool (io/buffers.py) maps shared anonymous memory, which the kernel
    reports there and not under RssAnon (before 2026-12-03 it was missed, so the peaks were low)."""
    peak = {"anon": 0, "rss": 0, "hwm": 0}
    done = threading.Event()

    def sample(pid: int) -> None:
        while not done.is_set():
            anon = rss = 0
            for p in _tree(pid):
                s = _status(p)
                anon += s.get("RssAnon", 0) + s.get("RssShmem", 0)
                rss += s.get("VmRSS", 0)
                peak["hwm"] = max(peak["hwm"], s.get("VmHWM", 0))
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            time.sleep(0.01)

    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        th = threading.Thread(target=sample, args=(p.pid,), daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
        if p.returncode != 0:
            log.seek(0)
            out = log.read()[-3000:].decode(errors="replace")
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out}")
    # max RSS from the samples, not ru_maxrss: that counts the forked Python before exec
    return {"wall_s": wall, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_anon_bytes": peak["anon"], "max_rss_bytes": max(peak["rss"], peak["hwm"])}


BASELINE = r'''
import sys, os, torch
src, out, layout, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sd = torch.load(src, map_location="cpu", weights_only=True)          # everything in RAM
E = max(int(k.split(".")[4]) for k in sd if ".experts." in k) + 1
os.makedirs(out, exist_ok=True)
for r in range(N):
    shard = {}
    for k, v in sd.items():
        if ".experts." in k:
            e, w = int(k.split(".")[4]), k.split(".")[5]
            L = k.split(".")[1]
            if layout == "base":
                if e // (E // N) == r:
                    shard["llma." + k] = v
            else:
                f = f"llma.layers.{L}.feed_forward.{w}"
                hs = v.shape[1 if w == "w2" else 0] // N
                piece = v[:, r*hs:(r+1)*hs].t() if w == "w2" else v[r*hs:(r+1)*hs]
                shard.setdefault(f, [None] * E)[e] = piece
        elif k.endswith(("norm.weight", "gate.weight")):
            shard["llma." + k] = v
        elif k.endswith(("wo.weight",)) or k == "tok_embeddings.weight":
            n = v.shape[1] // N; shard["llma." + k] = v[:, r*n:(r+1)*n].clone()
        else:
            n = v.shape[0] // N; shard["llma." + k] = v[r*n:(r+1)*n].clone()
    shard = {k: (torch.cat(v) if isinstance(v, list) else v) for k, v in shard.items()}
    torch.save(shard, os.path.join(out, f"consolidated.{r:02d}-of-{N:02d}.model.pth"))
os.sync()
'''


def same_tensors(a_dir: Path, b_dir: Path) -> str:
    """'' when every shard in a_dir holds the same tensors, byte for byte, as b_dir's."""
    import torch
    for fa in sorted(a_dir.glob("*.model.pth")):
        A = torch.load(fa, mmap=True, weights_only=True)
        B = torch.load(b_dir / fa.name, mmap=True, weights_only=True)
        if set(A) != set(B):
            return f"{fa.name}: key sets differ"
        for k in A:
            x, y = A[k].contiguous(), B[k].contiguous()
            if x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
                return f"{fa.name}: {k} differs"
    return ""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def hash_dir(d: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}


def rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def cut(path: Path, n: int, directory: Path) -> list[Path]:
    """The torrent's byte pieces of `path`: BASE-split0 .. -split{n-1} in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    bounds = [size * i // n for i in range(n + 1)]
    pieces = []
    with open(path, "rb") as src:
        for i in range(n):
            pieces.append(directory / f"{BASE}-split{i}")
            with open(pieces[-1], "wb") as dst:
                off, left = bounds[i], bounds[i + 1] - bounds[i]
                while left:
                    k = os.copy_file_range(src.fileno(), dst.fileno(), left, off)
                    if k <= 0:
                        raise SystemExit(f"short read cutting {path} at byte {off}")
                    off, left = off + k, left - k
    return pieces


def model_bytes(params: dict, n_layers: int) -> int:
    """Tensor bytes (bf16) of the model: ModelConfig.canonical_shapes."""
    from mixtral_convert.synth import tiny_config
    shapes = tiny_config(n_layers=n_layers, **params).canonical_shapes().values()
    return 2 * sum(math.prod(s) for s in shapes)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Layers:
    """Every repetition of every step on one L-layer checkpoint."""

    def __init__(self, L: int, a: argparse.Namespace):
        self.L, self.a, self.n = L, a, str(a.world_size)
        w = a.dir
        self.src_dir = w / f"src-L{L}"
        self.adapter, self.adapted = w / f"adapter-L{L}", w / f"adapted-L{L}"
        self.src = self.src_dir / BASE
        self.tmp, self.sparse, self.base, self.merged, self.bl, self.pieces = (
            w / f"{k}-L{L}" for k in ("ref", "sparse", "base", "merged", "baseline", "pieces"))
        self.runs: list[dict] = []
        self.hashes: dict[str, list[dict[str, str]]] = {}
        self.problems: dict[str, list[str]] = {}
        self.checks: dict[str, str] = {}
        self.cold = True
        self.baseline = "baseline" in a.steps

    def prepare(self) -> None:
        est = model_bytes(MIXTRAL_8X7B, self.L)
        have = self.src.stat().st_size if self.src.exists() else 0
        copies = 3 if self.baseline else 2
        need = copies * est + (1 << 30) - have
        free = shutil.disk_usage(self.a.dir).free
        if free < need:
            raise SystemExit(f"L={self.L}: needs about {need / GB:.1f} GB free in {self.a.dir} ({copies} copies "
                             f"of a {est / GB:.1f} GB checkpoint + 1 GiB), {free / GB:.1f} GB are; "
                             "use --dir or fewer layers")
        if self.baseline and 1.25 * est > mem_available():
            self.baseline = False
            self.checks["baseline"] = (f"skipped: it loads the whole {est / GB:.1f} GB checkpoint; "
                                       f"{mem_available() / GB:.1f} GB of memory available")
        if not self.src.exists():
            import torch

            from mixtral_convert.synth import tiny_config, write_torrent
            print(f"generating a {self.L}-layer full-width checkpoint in {self.src_dir} ...", flush=True)
            write_torrent(self.src_dir, tiny_config(n_layers=self.L, **MIXTRAL_8X7B), seed=0, dtype=torch.bfloat16)
        if set(GGUF_STEPS) & set(self.a.steps):  # llama.cpp's vocabulary needs the byte pieces: a llama-style tokenizer
            from mixtral_convert.synth import train_tokenizer
            self.tokenizer = self.a.dir / "tokenizer-llama.model"
            if not self.tokenizer.exists():
                self.tokenizer.write_bytes(train_tokenizer(MIXTRAL_8X7B["vocab_size"], llama=True))
        if "adapter" in self.a.steps and not self.adapter.exists():
            from adapter_merge import write_adapter

            from mixtral_convert.synth import tiny_config
            print(f"writing a rank-{self.a.rank} adapter on every linear in {self.adapter} ...", flush=True)
            write_adapter(self.adapter, tiny_config(n_layers=self.L, **MIXTRAL_8X7B), self.a.rank)
        self.size = self.src.stat().st_size
        self.src_sha = sha256(self.src)

    def timed(self, rep: int, step: str, role: str, cmd: list[str]) -> dict:
        self.cold = drop_caches() and self.cold
        load = os.getloadavg()[0]
        r = measure([str(c) for c in cmd])
        r |= {"rep": rep, "step": step, "role": role, "loadavg_1min_before": load, "cmd": " ".join(map(str, cmd))}
        self.runs.append(r)
        return r

    def group(self, rep: int, step: str, refs: dict[str, list], tool: list, cleanup: Path | None = None) -> None:
        """The references (role -> command; their order rotated by the repetition), each followed by
        removing `cleanup`, then the tool."""
        roles = list(refs)
        roles = roles[rep % len(roles):] + roles[:rep % len(roles)]
        r = {}
        for role in roles:
            r[role] = self.timed(rep, step, role, refs[role])
            if cleanup:
                rm(cleanup)
        t = self.timed(rep, step, "tool", tool)
        fastest = min((r[k]["wall_s"] for k in ("cat", "direct") if k in r))
        refs_s = "  ".join(f"{k} {r[k]['wall_s']:5.1f} s" for k in REFS if k in r)
        print(f"  L={self.L} run {rep + 1}/{self.a.runs} {step:12s} {refs_s} | tool {t['wall_s']:6.1f} s  "
              f"x{t['wall_s'] / fastest:.2f} of the faster  cpu {t['cpu_s']:6.1f} s  "
              f"anon {t['peak_anon_bytes'] / MiB:5.0f} MiB  (load {t['loadavg_1min_before']:.1f})", flush=True)

    def one_file(self, src: Path) -> dict[str, list]:
        """The references of a step that moves `src` to one file."""
        return {"cat": ["sh", "-c", 'cat "$0" > "$1" && sync', src, self.tmp],
                "direct": DIRECT_COPY + ["-o", self.tmp, src],
                "cp": ["sh", "-c", 'cp "$0" "$1" && sync', src, self.tmp]}

    def record(self, rep: int, step: str, hashes: dict[str, str], out: Path | None = None) -> None:
        """Compare this run's output hashes with the first run's, and with the manifest's."""
        self.hashes.setdefault(step, []).append(hashes)
        first = self.hashes[step][0]
        bad = sorted(n for n in set(first) | set(hashes) if first.get(n) != hashes.get(n))
        probs = self.problems.setdefault(f"{step}: every run's outputs have run 1's sha256", [])
        if bad:
            probs.append(f"run {rep + 1}: {', '.join(bad)} differ")
        if out is not None:
            files = json.loads((out / MANIFEST).read_text())["files"]
            mism = sorted(n for n in set(files) | set(hashes) if files.get(n, {}).get("sha256") != hashes.get(n))
            probs = self.problems.setdefault(f"{step}: the manifest's sha256 are the files'", [])
            if mism:
                probs.append(f"run {rep + 1}: {', '.join(mism)}")

    def back_to_source(self, step: str, path: Path) -> None:
        """`path` (merge's or concat's output) becomes the source again once it is byte for byte the source."""
        got = self.hashes[step][-1].get(BASE)
        if got != self.src_sha:
            raise SystemExit(f"{step}'s {BASE} differs from the source (sha256 {got} != {self.src_sha}); "
                             "the source was removed for this step and is regenerated on the next run")
        if path != self.src:
            os.replace(path, self.src)
        self.checks[f"{step} gives back the source byte for byte"] = f"yes ({len(self.hashes[step])} runs)"

    def split(self, rep: int, cmd: str, layout: str, out: Path, keep: bool) -> None:
        tool = MC + [cmd, self.src_dir, "-n", self.n, "-o", out, "-q"]
        if cmd not in self.a.steps:
            if keep:  # merge or verify need split's shards: made outside the timing
                subprocess.run([str(c) for c in tool], check=True)
            return
        self.group(rep, cmd, self.one_file(self.src), tool, cleanup=self.tmp)
        self.record(rep, cmd, hash_dir(out), out)
        if self.baseline:
            b = self.timed(rep, cmd, "baseline", [sys.executable, "-c", BASELINE, self.src, self.bl, layout, self.n])
            print(f"  L={self.L} run {rep + 1}/{self.a.runs} baseline {cmd}: {b['wall_s']:.1f} s "
                  f"anon {b['peak_anon_bytes'] / MiB:.0f} MiB", flush=True)
            if rep == 0:
                self.checks[f"{cmd} == baseline (tensors, run 1)"] = same_tensors(out, self.bl) or "identical"
            rm(self.bl)
        if not keep:
            rm(out)

    def repetition(self, rep: int) -> None:
        st = self.a.steps
        self.split(rep, "split-sparse", "sparse", self.sparse, keep=False)
        self.split(rep, "split", "base", self.base, keep="merge" in st or "verify" in st)
        for step, dtype in GGUF_STEPS.items():
            if step in st:
                out = self.a.dir / f"gguf-L{self.L}.gguf"
                self.group(rep, step, self.one_file(self.src),
                           MC + ["merge", self.src_dir, "--to", "gguf", "--dtype", dtype, "-o", out, "--tokenizer",
                                 self.tokenizer, "--max-position-embeddings", "32768", "-q"], cleanup=self.tmp)
                manifest = out.with_name(out.name + "." + MANIFEST)
                self.record(rep, step, {out.name: sha256(out)})
                listed = json.loads(manifest.read_text())["files"][out.name]["sha256"]
                if listed != self.hashes[step][-1][out.name]:
                    self.problems.setdefault(f"{step}: the manifest's sha256 is the file's", []).append(
                        f"run {rep + 1}")
                rm(out, manifest)
        if "adapter" in st:
            self.group(rep, "adapter", self.one_file(self.src),
                       MC + ["merge", self.src_dir, "--adapter", self.adapter, "-o", self.adapted, "-q"],
                       cleanup=self.tmp)
            self.record(rep, "adapter", hash_dir(self.adapted), self.adapted)
            rm(self.adapted)
        if "merge" in st:
            self.src.unlink()  # merge's output takes its place: two copies on disk, not three
            shards = sorted(p for p in self.base.iterdir() if p.is_file())
            refs = {"cat": ["sh", "-c", 'mkdir -p "$0" && for f in "$@"; do cat "$f" > "$0/${f##*/}"; done && sync',
                            self.tmp, *shards],
                    "direct": DIRECT_COPY + ["-d", self.tmp, *shards],
                    "cp": ["sh", "-c", 'cp -r "$0" "$1" && sync', self.base, self.tmp]}
            self.group(rep, "merge", refs, MC + ["merge", self.base, "-o", self.merged, "-q"], cleanup=self.tmp)
            self.record(rep, "merge", hash_dir(self.merged), self.merged)
            self.back_to_source("merge", self.merged / BASE)
            rm(self.merged)
        if "verify" in st:
            shards = sorted(self.base.glob("*.model.pth"))
            self.group(rep, "verify", {"cat": ["sh", "-c", 'cat "$@" > /dev/null', "cat", self.src, *shards],
                                       "direct": DIRECT_COPY + ["--null", self.src, *shards]},
                       MC + ["verify", self.base, "--source", self.src_dir, "-q"])
        rm(self.base)
        if "concat" in st:
            pieces = cut(self.src, self.a.pieces, self.pieces)
            self.src.unlink()  # concat's output takes its place
            self.group(rep, "concat", {"cat": ["sh", "-c", 'cat "$@" > "$0" && sync', self.tmp, *pieces],
                                       "direct": DIRECT_COPY + ["-o", self.tmp, *pieces]},
                       MC + ["concat", self.pieces, "--sha256", self.src_sha, "-o", self.src, "-q"], cleanup=self.tmp)
            self.record(rep, "concat", {BASE: sha256(self.src)})
            self.back_to_source("concat", self.src)
            rm(self.pieces)

    def run(self) -> dict:
        try:
            self.prepare()
            for rep in range(self.a.runs):
                self.repetition(rep)
        finally:
            rm(self.tmp, self.sparse, self.base, self.merged, self.bl, self.pieces, self.adapted)
            if not self.a.keep or not self.src.exists():
                rm(self.src_dir, self.adapter)
        for k, probs in self.problems.items():
            n = len(self.hashes[k.split(":")[0]][0])
            self.checks[k] = ("NO: " + "; ".join(probs)) if probs else f"yes ({n} file(s) x {self.a.runs} runs)"
        res = {"layers": self.L, "world_size": int(self.n), "checkpoint_bytes": self.size,
               "checkpoint_sha256": self.src_sha, "cold_cache": self.cold, "steps": list(self.a.steps),
               "runs": self.runs, "output_sha256": self.hashes, "checks": self.checks}
        res["summary"] = summarize(res)
        return res


def spread(v: list[float]) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}


def summarize(res: dict) -> dict:
    """Per step: every role's wall seconds (median, min-max), CPU seconds, the tool's ratios per
    repetition to the faster of cat and direct, to each reference, and to the baseline."""
    gb = res["checkpoint_bytes"] / GB
    out = {}
    for step in ORDER:
        rs = [x for x in res["runs"] if x["step"] == step]
        if not rs:
            continue
        by = {role: {x["rep"]: x for x in rs if x["role"] == role} for role in REFS + ("tool", "baseline")}
        tool, bl = by["tool"], by["baseline"]
        med = lambda d, k: statistics.median(x[k] for x in d.values())  # noqa: E731
        fastest = {k: min(by[r][k]["wall_s"] for r in ("cat", "direct") if k in by[r]) for k in sorted(tool)}
        s = {"n": len(tool), "tool_wall": spread([tool[k]["wall_s"] for k in sorted(tool)]),
             "tool_wall_s": med(tool, "wall_s"), "tool_cpu_s": med(tool, "cpu_s"),
             "tool_cpu_user_s": med(tool, "cpu_user_s"), "tool_cpu_sys_s": med(tool, "cpu_sys_s"),
             "refs": {r: {"wall": spread([by[r][k]["wall_s"] for k in sorted(by[r])]), "cpu_s": med(by[r], "cpu_s")}
                      for r in REFS if by[r]},
             "faster_wall": spread(list(fastest.values())),
             "direct_faster_runs": sum(by["direct"][k]["wall_s"] < by["cat"][k]["wall_s"] for k in fastest),
             "x_ref": spread([tool[k]["wall_s"] / fastest[k] for k in sorted(tool)]),
             "load_1min": spread([x["loadavg_1min_before"] for x in rs]),
             "peak_anon_bytes": max(x["peak_anon_bytes"] for x in tool.values()),
             "peak_anon_median_bytes": med(tool, "peak_anon_bytes"),
             "max_rss_bytes": max(x["max_rss_bytes"] for x in tool.values())}
        for r in REFS:
            if by[r]:
                s[f"x_{r}"] = spread([tool[k]["wall_s"] / by[r][k]["wall_s"] for k in sorted(tool)])
        s["ref_wall_s"] = s["faster_wall"]["median"]
        s["tool_s_per_gb"], s["ref_s_per_gb"] = s["tool_wall_s"] / gb, s["ref_wall_s"] / gb
        if bl:
            s["baseline"] = {"wall_s": med(bl, "wall_s"), "cpu_s": med(bl, "cpu_s"),
                             "x_ref": spread([bl[k]["wall_s"] / fastest[k] for k in sorted(bl)]),
                             "peak_anon_bytes": max(x["peak_anon_bytes"] for x in bl.values()),
                             "max_rss_bytes": max(x["max_rss_bytes"] for x in bl.values())}
            s["x_baseline"] = spread([tool[k]["wall_s"] / bl[k]["wall_s"] for k in sorted(bl)])
        out[step] = s
    return out


def ratio(d: dict) -> str:
    return f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"


def secs(d: dict | None) -> str:
    return f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})" if d else "-"


def tables(results: list[dict]) -> str:
    lines = ["| L | GB | step | cat + sync s | direct copy s | cp s (context) | tool s | tool / faster of cat and "
             "direct | tool/cat | tool/direct | tool/cp | tool/baseline | tool CPU s (user/sys) | cat CPU s | "
             "direct CPU s | tool s/GB | peak anon MiB | load 1-min |",
             "|---" * 18 + "|"]
    for res in results:
        gb = res["checkpoint_bytes"] / GB
        for step, s in res["summary"].items():
            r = s["refs"]
            x = {k: ratio(s[k]) if k in s else "-" for k in ("x_cat", "x_direct", "x_cp", "x_baseline")}
            cpu = {role: f"{r[role]['cpu_s']:.1f}" if role in r else "-" for role in REFS}
            load = s["load_1min"]
            lines.append(f"| {res['layers']} | {gb:.1f} | {step} | {secs(r.get('cat', {}).get('wall'))} | "
                         f"{secs(r.get('direct', {}).get('wall'))} | {secs(r.get('cp', {}).get('wall'))} | "
                         f"{secs(s['tool_wall'])} | {ratio(s['x_ref'])} | {x['x_cat']} | {x['x_direct']} | "
                         f"{x['x_cp']} | {x['x_baseline']} | {s['tool_cpu_s']:.1f} ({s['tool_cpu_user_s']:.1f}/"
                         f"{s['tool_cpu_sys_s']:.1f}) | {cpu['cat']} | {cpu['direct']} | {s['tool_s_per_gb']:.2f} | "
                         f"{s['peak_anon_bytes'] / MiB:.0f} | {load['min']:.1f}-{load['max']:.1f} |")
            if "baseline" in s:
                b = s["baseline"]
                lines.append(f"| {res['layers']} | {gb:.1f} | baseline {step} |  |  |  | {b['wall_s']:.1f} | "
                             f"{ratio(b['x_ref'])} |  |  |  |  | {b['cpu_s']:.1f} |  |  | {b['wall_s'] / gb:.2f} | "
                             f"{b['peak_anon_bytes'] / MiB:.0f} |  |")
    Ls = [r["layers"] for r in results]
    head = " | ".join([f"s/GB L={L}" for L in Ls] + [f"tool/faster L={L}" for L in Ls] +
                      [f"anon MiB L={L}" for L in Ls])
    lines += ["", "Side by side (seconds per GB should stay flat as L grows, i.e. time linear in size; "
              "peak memory should stay flat):", "", f"| step | {head} |", "|---" * (1 + 3 * len(Ls)) + "|"]
    for step in ORDER:
        cells = [r["summary"].get(step) for r in results]
        if not any(cells):
            continue
        row = [f"{c['tool_s_per_gb']:.2f}" if c else "" for c in cells]
        row += [ratio(c["x_ref"]) if c else "" for c in cells]
        row += [f"{c['peak_anon_bytes'] / MiB:.0f}" if c else "" for c in cells]
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def projection(results: list[dict]) -> tuple[str, dict]:
    """Linear projection: the largest measured L's seconds per GB times each model's bytes."""
    res = max(results, key=lambda r: r["layers"])
    ratio_file = res["checkpoint_bytes"] / model_bytes(MIXTRAL_8X7B, res["layers"])  # container overhead
    sizes = {name: model_bytes(p, n) * ratio_file for name, (p, n) in PROJECT.items()}
    proj = {"from_layers": res["layers"], "bytes": sizes, "minutes": {}}
    cols = " | ".join(f"{name} ({PROJECT[name][1]} layers, {b / GB:.0f} GB): tool min / faster ref min"
                      for name, b in sizes.items())
    lines = [f"Linear projection from the L={res['layers']} medians (seconds per GB x the model's bytes; "
             "assumes the throughput stays what it was at that size):", "",
             f"| step | tool s/GB | faster ref s/GB | {cols} |", "|---" * (3 + len(sizes)) + "|"]
    for step, s in res["summary"].items():
        mins = {name: (s["tool_s_per_gb"] * b / GB / 60, s["ref_s_per_gb"] * b / GB / 60) for name, b in sizes.items()}
        proj["minutes"][step] = {n: {"tool": t, "ref": r} for n, (t, r) in mins.items()}
        lines.append(f"| {step} | {s['tool_s_per_gb']:.2f} | {s['ref_s_per_gb']:.2f} | "
                     + " | ".join(f"{t:.1f} / {r:.1f}" for t, r in mins.values()) + " |")
    return "\n".join(lines), proj


def machine(d: Path) -> dict:
    df = subprocess.run(["df", "--output=source,fstype,size,avail", str(d)], capture_output=True, text=True)
    src = df.stdout.splitlines()[-1].split() if df.returncode == 0 else ["?"] * 4
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "disk_device": src[0], "disk_fstype": src[1], "disk_size_kib": src[2], "disk_avail_kib_at_start": src[3],
            "kernel": platform.release(), "python": platform.python_version(), "git": git.stdout.strip(),
            "loadavg_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="repetitions of every pair (medians and spreads reported)")
    ap.add_argument("--steps", default="split,split-sparse,gguf-bf16,gguf-q8_0,adapter,merge,verify,concat",
                    help=f"comma-separated, from {','.join(STEPS)} (default: all but baseline)")
    ap.add_argument("--rank", type=int, default=16, help="the adapter step's LoRA rank")
    ap.add_argument("--pieces", type=int, default=10, help="byte pieces the checkpoint is cut in for concat")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--tool-tree", type=Path, default=None,
                    help="run the mixtral_convert package of this source tree (e.g. `git archive` of an older commit, "
                         "for a before/after under the same harness) instead of this one's")
    a = ap.parse_args()
    if a.tool_tree is not None:
        if not (a.tool_tree / "mixtral_convert" / "entry.py").is_file():
            ap.error(f"--tool-tree {a.tool_tree}: no mixtral_convert/entry.py there")
        MC[:] = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(a.tool_tree.resolve())!r}); "
                 "from mixtral_convert.entry import entry; entry()"]
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = sorted(set(a.steps) - set(STEPS))
    if unknown or not a.steps:
        ap.error(f"--steps: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STEPS)}")
    if "baseline" in a.steps and not {"split", "split-sparse"} & set(a.steps):
        ap.error("--steps baseline is compared with split and split-sparse: name one of them too")
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    a.dir.mkdir(parents=True, exist_ok=True)
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(a.dir),
            "command": " ".join(sys.argv), "results": []}
    for L in a.layers:
        info["results"].append(Layers(L, a).run())
    m = info["machine"] | {"loadavg_at_end": os.getloadavg()}
    info["machine"] = m
    text, info["projection"] = projection(info["results"])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=2) + "\n")
    cold = all(r["cold_cache"] for r in info["results"])
    print(f"\n{info['date']}: {m['cpus']} CPUs, {m['mem_bytes'] / 2**30:.1f} GiB memory, disk {m['disk_device']} "
          f"({m['disk_fstype']}) for {a.dir}; {'cold' if cold else 'WARM (could not drop caches)'} page cache "
          f"before every run; load average {m['loadavg_at_start'][0]:.1f} at the start, {m['loadavg_at_end'][0]:.1f} "
          f"at the end; {a.runs} runs of each pair, N={a.world_size}; tree {m['git']}"
          f"{f', the tool from {a.tool_tree}' if a.tool_tree else ''}\n")
    print(tables(info["results"]))
    print()
    print(text)
    print()
    for res in info["results"]:
        for k, v in res["checks"].items():
            print(f"L={res['layers']}: {k}: {v}")
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
