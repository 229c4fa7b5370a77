"""Throughput of `mixtral-convert concat` against `cat pieces > out && sync`, cold page cache.

Builds a real torch checkpoint of --size-gib (a few big random tensors), cuts it into --pieces
byte pieces, then alternates, --runs times each: drop the page cache, time
`cat piece... > out && sync`; drop the page cache, time `python -m mixtral_convert concat DIR
-o out -q` (which fsyncs its output and checks the checkpoint). Prints a table and JSON with the
median of each and the ratio. Dropping the cache needs root (`/proc/sys/vm/drop_caches`); without
it the runs are warm and the report says so. All big files are deleted at the end.

    python bench/bench_concat.py --size-gib 4 --dir /big/scratch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "consolidated.00.pth"


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def build_checkpoint(path: Path, size: int, tensor_mib: int) -> None:
    """A torch checkpoint of about `size` bytes: random bf16 tensors of `tensor_mib` MiB."""
    import torch
    state, left, i = {}, size, 0
    while left > 0:
        nbytes = min(tensor_mib << 20, left)
        buf = bytearray(os.urandom(nbytes))
        state[f"layers.{i}.weight"] = torch.frombuffer(buf, dtype=torch.uint8).view(torch.bfloat16)
        left -= nbytes
        i += 1
    torch.save(state, path)


def cut(path: Path, n: int, directory: Path) -> list[Path]:
    size = path.stat().st_size
    bounds = [size * i // n for i in range(n + 1)]
    pieces = []
    with open(path, "rb") as src:
        for i in range(n):
            p = directory / f"{BASE}-split{i}"
            with open(p, "wb") as dst:
                left = bounds[i + 1] - bounds[i]
                while left:
                    chunk = src.read(min(left, 64 << 20))
                    dst.write(chunk)
                    left -= len(chunk)
            pieces.append(p)
    return pieces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--pieces", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tensor-mib", type=int, default=512)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a "
                    "temporary directory under the current one)")
    ap.add_argument("--chunk-mib", type=int, default=None,
                    help="override mixtral_convert.commands.concat.CHUNK (buffer size) for this run")
    ap.add_argument("--nbuf", type=int, default=None,
                    help="override mixtral_convert.commands.concat.NBUF (buffers in flight)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-concat-", dir=args.dir or Path.cwd()))
    try:
        size = int(args.size_gib * (1 << 30))
        need = 2 * size + (1 << 30)
        if shutil.disk_usage(scratch).free < need:
            sys.exit(f"not enough space in {scratch}: need {need} bytes")
        src, pieces_dir = scratch / "src.pth", scratch / "pieces"
        pieces_dir.mkdir()
        print(f"building a {args.size_gib} GiB torch checkpoint in {scratch} ...", flush=True)
        build_checkpoint(src, size, args.tensor_mib)
        total = src.stat().st_size
        pieces = cut(src, args.pieces, pieces_dir)
        src.unlink()
        out = scratch / BASE

        patch = ""
        if args.chunk_mib:
            patch += f"c.CHUNK = {args.chunk_mib} << 20; "
        if args.nbuf:
            patch += f"c.NBUF = {args.nbuf}; "
        ours = [sys.executable, "-c",
                f"import sys, mixtral_convert.commands.concat as c; {patch}"
                f"from mixtral_convert.entry import main; main(sys.argv[1:])",
                "concat", str(pieces_dir), "-o", str(out), "-q"]
        cat = ["sh", "-c", 'cat "$@" > "$0" && sync', str(out), *map(str, pieces)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))

        times: dict[str, list[float]] = {"cat": [], "concat": []}
        cpu: dict[str, list[float]] = {"cat": [], "concat": []}  # user + sys seconds
        cold = True
        digest = expected_md5 = None
        for run in range(args.runs):
            for name, cmd in (("cat", cat), ("concat", ours)):
                cold &= drop_caches()
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
                if name == "concat":
                    digest = res.stdout.split()[1]
                elif run == 0:  # the reference md5 of cat's output, outside the timing
                    with open(out, "rb") as f:
                        expected_md5 = hashlib.file_digest(f, "md5").hexdigest()
                out.unlink()
                print(f"run {run + 1} {name:6s} {times[name][-1]:7.2f} s wall "
                      f"{cpu[name][-1]:6.2f} s cpu", flush=True)
        assert digest == expected_md5, (digest, expected_md5)

        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "bytes": total, "pieces": args.pieces, "runs": args.runs, "cold_cache": cold,
            "chunk_mib": args.chunk_mib, "nbuf": args.nbuf,
            "cat_s": times["cat"], "concat_s": times["concat"],
            "cat_median_s": med["cat"], "concat_median_s": med["concat"],
            "cat_MBps": total / med["cat"] / 1e6, "concat_MBps": total / med["concat"] / 1e6,
            "concat_over_cat_time": med["concat"] / med["cat"],
            "cat_cpu_s": cpu["cat"], "concat_cpu_s": cpu["concat"],
            "cat_median_cpu_s": statistics.median(cpu["cat"]),
            "concat_median_cpu_s": statistics.median(cpu["concat"]),
            "loadavg_1min_at_end": os.getloadavg()[0],
            "command": " ".join(sys.argv),
        }
        print()
        print(f"{'':28s} {'median s':>9s} {'MB/s':>8s} {'cpu s':>7s}   runs (wall s)")
        for name, label in (("cat", "cat pieces > out && sync"), ("concat", "mixtral-convert concat")):
            print(f"{label:28s} {med[name]:9.2f} {result[name + '_MBps']:8.0f} "
                  f"{result[name + '_median_cpu_s']:7.2f}   "
                  + " ".join(f"{t:.2f}" for t in times[name]))
        print(f"concat takes {result['concat_over_cat_time']:.2f}x the time of cat "
              f"({total} bytes, {args.pieces} pieces, "
              f"{'cold' if cold else 'WARM (could not drop caches)'} page cache, "
              f"load average {result['loadavg_1min_at_end']:.1f} at the end)")
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
