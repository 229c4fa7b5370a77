#!/usr/bin/env python3
"""make bench: mixtral-convert against `cp` and against the load-everything approach.

Generates a checkpoint whose every tensor has Mixtral-8x7B's full size (L layers, random
finite bf16), then measures, each from a cold page cache where the machine allows dropping it:
cp + sync (one read, one write: the physical limit), the load-everything baselines written
here (torch.load the whole file, slice, torch.save per rank, as the seed tutorial's scripts
do), split -n N, split-sparse -n N, merge and verify. For each: wall time, peak anonymous RSS
(sampled from /proc: the memory that cannot be dropped) and max RSS (VmHWM). Prints a table
with ratios to cp and to the baseline, writes it as JSON, and checks that our shards hold the
same tensors, byte for byte, as the baseline's.

    python bench/bench.py [--layers 2 4] [--world-size 8] [--dir bench-out] [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The benchmark's subject: every tensor exactly Mixtral-8x7B's size (docs/formats.md, "Torrent release").
MIXTRAL_8X7B = dict(dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                    num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)


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
                if line.startswith(("RssAnon:", "VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return vals


def measure(cmd: list[str], env=None) -> dict:
    """Run cmd; wall time, peak anonymous RSS and max RSS of its process tree (sampled every 10 ms)."""
    peak = {"anon": 0, "rss": 0, "hwm": 0}
    done = threading.Event()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while not done.is_set():
            anon = rss = 0
            for pid in _tree(p.pid):
                s = _status(pid)
                anon += s.get("RssAnon", 0)
                rss += s.get("VmRSS", 0)
                peak["hwm"] = max(peak["hwm"], s.get("VmHWM", 0))
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": wall, "peak_anon_bytes": peak["anon"], "max_rss_bytes": max(peak["rss"], peak["hwm"])}


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


def run_layers(L: int, N: int, work: Path, runs: int, skip_baseline: bool) -> dict:
    import torch
    from mixtral_convert.synth import tiny_config, write_torrent
    src = work / f"src-L{L}"
    if not (src / "consolidated.00.pth").exists():
        print(f"generating a {L}-layer full-width checkpoint in {src} ...", flush=True)
        write_torrent(src, tiny_config(n_layers=L, **MIXTRAL_8X7B), seed=0, dtype=torch.bfloat16)
    size = (src / "consolidated.00.pth").stat().st_size
    mc = [sys.executable, "-m", "mixtral_convert"]
    rows: dict[str, list[dict]] = {}
    cold = True

    def bench(name, cmd, before=None):
        nonlocal cold
        for _ in range(runs):
            if before:
                before()
            cold = drop_caches() and cold
            rows.setdefault(name, []).append(measure(cmd))
            print(f"  L={L} {name}: {rows[name][-1]['wall_s']:.1f} s", flush=True)

    out = {k: work / f"{k}-L{L}" for k in ("cp", "base", "sparse", "bl-base", "bl-sparse", "merged")}
    rm = lambda *ps: [shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True) for p in ps]  # noqa: E731
    bench("cp+sync", ["sh", "-c", f"cp {src}/consolidated.00.pth {out['cp']} && sync"], lambda: rm(out["cp"]))
    rm(out["cp"])
    checks = {}
    for layout, cmd in (("base", "split"), ("sparse", "split-sparse")):
        bench(cmd, mc + [cmd, str(src), "-n", str(N), "-o", str(out[layout]), "-q"], lambda l=layout: rm(out[l]))
        if not skip_baseline:
            bl = out["bl-" + layout]
            bench(f"baseline {cmd}", [sys.executable, "-c", BASELINE, str(src / "consolidated.00.pth"), str(bl),
                                      layout, str(N)], lambda b=bl: rm(b))
            checks[f"{cmd} == baseline"] = same_tensors(out[layout], bl) or "identical"
            rm(bl)
    bench("merge", mc + ["merge", str(out["base"]), "-o", str(out["merged"]), "-q"], lambda: rm(out["merged"]))
    rm(out["merged"], out["sparse"])
    bench("verify", mc + ["verify", str(out["base"]), "--source", str(src), "-q"])
    rm(out["base"])
    result = {"layers": L, "world_size": N, "checkpoint_bytes": size, "cold_cache": cold, "runs": {}}
    for name, rs in rows.items():
        result["runs"][name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"n": len(rs)}
    result["checks"] = checks
    return result


def table(results: list[dict]) -> str:
    lines = ["| L | step | wall s | x cp | x baseline | peak anon MiB | max RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        cp = res["runs"]["cp+sync"]["wall_s"]
        for name, r in res["runs"].items():
            base = res["runs"].get(f"baseline {name}") or res["runs"].get("baseline split")
            xb = f"{r['wall_s'] / base['wall_s']:.2f}" if base and not name.startswith(("baseline", "cp")) else ""
            lines.append(f"| {res['layers']} | {name} | {r['wall_s']:.1f} | {r['wall_s'] / cp:.2f} | {xb} | "
                         f"{r['peak_anon_bytes'] / 2**20:.0f} | {r['max_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1, help="runs per step (medians are reported)")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench.json")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    results = []
    for L in a.layers:
        results.append(run_layers(L, a.world_size, a.dir, a.runs, a.skip_baseline))
        if not a.keep:
            shutil.rmtree(a.dir / f"src-L{L}", ignore_errors=True)
    info = {"machine": {"cpus": os.cpu_count(), "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
            "results": results}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=2))
    print(table(results))
    for res in results:
        for k, v in res["checks"].items():
            print(f"L={res['layers']}: {k}: {v}")
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
