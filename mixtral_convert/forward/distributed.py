"""forward --distributed: one process per rank over torch.distributed, each from its own shard.

Every rank runs `sharded.rank_steps` (the same code as the in-process sharded forward) and turns
each collective it yields into a `dist.all_gather`: a gather is the rank-order concatenation, a
sum is the rank-order sum of the gathered parts (rather than `all_reduce`, whose summation
order is the backend's: this way the result is the in-process one, bit for bit when the ranks'
own arithmetic is). Parts travel as float32 (exact for bf16; not every gloo build reduces
bf16). Every rank ends with the full logits; rank 0 reports them.

Two ways in:
- launched by torchrun (WORLD_SIZE set in the environment): this process joins that group as
  RANK; WORLD_SIZE must equal the layout's N. Backend gloo on CPU, NCCL on CUDA (device
  cuda:LOCAL_RANK).
- otherwise `launch` starts N worker processes (`python -m mixtral_convert.forward.distributed SPEC`)
  with the same environment torchrun would give them (MASTER_ADDR 127.0.0.1, a free port),
  waits, stops the others if one fails, and reads rank 0's result back.
A rank opens only its own shard file (positioned reads): the directory's meta.json and config.json give the
layout and model, the file names give N, and the plan gives what that file must hold.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConvertError
from ..formats import accessory
from ..formats.accessory import listing, open_rank
from ..formats.torrent import TORRENT_FILE
from ..io.lazy import TensorGetter
from .inputs import check_tokens, load_tokens, torch_dtype
from .job import Job, Result, compute
from .sharded import Collective, combine, rank_steps

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this gives up


def _listing(path):
    """The layout directory's listing (names and JSON only: no shard is opened here)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConvertError(f"{path}: no such directory")
    if not any(accessory.SHARD_RE.match(p.name) for p in path.iterdir()):
        what = "a torrent checkpoint" if (path / TORRENT_FILE).exists() else "not a converted layout directory"
        raise ConvertError(f"{path}: {what}; --distributed runs the ranks of a converted layout "
                           "(split or split-sparse output): drop --distributed or pass that directory")
    return listing(path)


# ----- one rank in a group -------------------------------------------------------------------

def all_ranks(c: Collective, N: int) -> torch.Tensor:
    """The collective's result: every rank's part all-gathered, combined as in one process."""
    import torch.distributed as dist
    if c.op == "gather" and c.replicated:
        return c.tensor
    t = c.tensor.float().contiguous()
    parts = [torch.empty_like(t) for _ in range(N)]
    dist.all_gather(parts, t)
    return combine([Collective(c.op, p.to(c.tensor.dtype), c.replicated, c.what) for p in parts])


def drive(steps, N: int) -> torch.Tensor:
    """Run one rank's `rank_steps` generator to its logits, each collective over the group."""
    c = next(steps)
    while True:
        try:
            c = steps.send(all_ranks(c, N))
        except StopIteration as stop:
            return stop.value


def join(job: Job) -> Optional[Result]:
    """Join the torch.distributed group described by the environment (torchrun's variables) and
    run this rank; rank 0 gets the result, the others None."""
    import torch.distributed as dist
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConvertError("WORLD_SIZE / RANK / LOCAL_RANK in the environment are not integers") from None
    ls = _listing(job.path)
    layout, cfg, N = ls.layout, ls.cfg, ls.N
    if world != N:
        raise ConvertError(f"{job.path}: a {N}-rank {layout} layout, but WORLD_SIZE is {world}; launch "
                           f"{N} processes (torchrun --nproc-per-node {N} ...)")
    if not 0 <= rank < N:
        raise ConvertError(f"RANK {rank} is outside [0, {N})")
    dtype, device = torch_dtype(job.dtype), job.device
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise ConvertError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                               "device(s) are visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConvertError(f"WORLD_SIZE is set but {var} is not; launch with torchrun, or unset WORLD_SIZE "
                               "to let --distributed start its own processes")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        plan, shard, tok = open_rank(ls.path, rank)
        weights = TensorGetter(shard)

        def run(tokens: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return drive(rank_steps(plan, rank, weights, tokens, dtype=dtype, device=device), N)

        how = f"sharded forward, Accessory {layout} layout, {N} processes ({backend})"
        result = compute(job, cfg, run, tok, how)
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


# ----- starting the group ourselves ----------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job) -> Result:
    """Start the layout's N ranks as local processes, wait for them, return rank 0's result."""
    ls = _listing(job.path)
    cfg, N = ls.cfg, ls.N
    if job.tokens_file is not None:
        check_tokens(load_tokens(job.tokens_file, cfg.vocab_size), cfg.vocab_size, job.tokens_file)
    if job.device.startswith("cuda") and torch.cuda.device_count() < N:
        raise ConvertError(f"--distributed on {job.device} needs {N} CUDA devices (one per rank); "
                           f"{torch.cuda.device_count()} are visible")
    tmp = Path(tempfile.mkdtemp(prefix="mixtral-convert-dist-"))
    procs: list[subprocess.Popen] = []
    try:
        spec = tmp / "job.json"
        spec.write_text(json.dumps({"job": job.as_dict(), "result": str(tmp / "result.pt")}))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(N))
        pkg_root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // N)))
        for r in range(N):
            env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(N))
            with open(tmp / f"rank{r}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "mixtral_convert.forward.distributed", str(spec)],
                                              env=env_r, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        _wait(procs, tmp)
        saved = torch.load(tmp / "result.pt", map_location="cpu", weights_only=True)
        return Result(saved["logits"], saved["tokens"], saved["how"], [tuple(t) for t in saved["top"]],
                      saved["new"], saved["text"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], tmp: Path) -> None:
    """Until all ranks exit; the first to fail stops the others and is reported."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r = failed[0]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            lines = [ln for ln in (tmp / f"rank{r}.log").read_text(errors="replace").splitlines() if ln.strip()]
            err = [ln for ln in lines if ln.startswith("error: ")]
            last = (err or lines or ["(no output)"])[-1].removeprefix("error: ")
            raise ConvertError(f"rank {r} of {len(procs)} failed (exit {codes[r]}): {last}")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.05)


def run_distributed(job: Job) -> Optional[Result]:
    """--distributed: join torchrun's group when launched by it, else start our own."""
    return join(job) if "WORLD_SIZE" in os.environ else launch(job)


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        res = join(Job(**spec["job"]))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if res is not None:
        torch.save({"logits": res.logits, "tokens": res.tokens, "how": res.how, "top": [list(t) for t in res.top],
                    "new": res.new, "text": res.text}, spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
