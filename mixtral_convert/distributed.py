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
- otherwise `launch` starts N worker processes (`python -m mixtral_convert.distributed SPEC`)
  with the same environment torchrun would give them (MASTER_ADDR 127.0.0.1, a free port),
  waits, stops the others if one fails, and reads rank 0's result back.
A rank opens only its own shard file (mmap): the directory's meta.json and config.json give the
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

from .config import ModelConfig, read_json
from .errors import ConvertError
from .forward import Job, Result, check_tokens, compute, load_tokens, torch_dtype
from .layouts import LAYOUT_OF_LLAMA_TYPE, Plan, shard_file_name
from .sharded import Collective, combine, rank_steps
from .sources import SHARD_RE, TORRENT_FILE
from .torchfile import load_lazy

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this gives up


# ----- the layout, without reading any shard ---------------------------------------------------

def layout_info(path) -> tuple[str, ModelConfig, int, list[Path], Optional[Path]]:
    """(layout, config, N, shard files, tokenizer) of an Accessory directory, from its names and
    JSON files only."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConvertError(f"{path}: no such directory")
    names = {p.name for p in path.iterdir()}
    shards = [n for n in names if SHARD_RE.match(n)]
    if not shards:
        what = "a torrent checkpoint" if TORRENT_FILE in names else "not a converted layout directory"
        raise ConvertError(f"{path}: {what}; --distributed runs the ranks of a converted layout "
                           "(split or split-sparse output): drop --distributed or pass that directory")
    sizes = {int(SHARD_RE.match(n).group(2)) for n in shards}
    if len(sizes) != 1:
        raise ConvertError(f"{path}: shards of several world sizes {sorted(sizes)}; remove the stale set")
    N = sizes.pop()
    files = [path / shard_file_name(r, N) for r in range(N)]
    missing = [f for f in files if f.name not in names]
    if missing:
        raise ConvertError(f"{missing[0]}: missing (rank {files.index(missing[0])} of {N})")
    meta = read_json(path / "meta.json")
    llama_type = meta.get("llama_type") if isinstance(meta, dict) else None
    if llama_type not in LAYOUT_OF_LLAMA_TYPE:
        raise ConvertError(f"{path / 'meta.json'}: llama_type {llama_type!r} is not a Mixtral layout")
    cfg = ModelConfig.from_json_file(path / "config.json")
    tok = path / "tokenizer.model"
    return LAYOUT_OF_LLAMA_TYPE[llama_type], cfg, N, files, (tok if tok.is_file() else None)


def open_rank(path, r: int) -> tuple[Plan, dict[str, torch.Tensor], Optional[Path]]:
    """Rank r's plan and its shard's tensors (mmap'd), checked against what the plan puts there."""
    layout, cfg, N, files, tok = layout_info(path)
    f = files[r]
    sd = load_lazy(f)
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) != 1:
        raise ConvertError(f"{f}: tensors of several dtypes {sorted(map(str, dtypes))}; expected one")
    dt = dtypes.pop()
    plan = Plan(layout, cfg, N, {k: dt for k in cfg.canonical_shapes()})
    for k, st in plan.ranks[r].items():
        if k not in sd:
            raise ConvertError(f"{f.name} (rank {r}): tensor '{k}' missing (the {layout} layout puts it there)")
        if tuple(sd[k].shape) != st.shape:
            raise ConvertError(f"{f.name} (rank {r}): tensor '{k}' has shape {list(sd[k].shape)}, the "
                               f"{layout} layout at N={N} demands {list(st.shape)}")
    extra = [k for k in sd if k not in plan.ranks[r]]
    if extra:
        raise ConvertError(f"{f.name} (rank {r}): unexpected tensor '{extra[0]}' (not in the {layout} layout)")
    return plan, sd, tok


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
    layout, cfg, N, _, _ = layout_info(job.path)
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
        plan, weights, tok = open_rank(job.path, rank)

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
    layout, cfg, N, _, _ = layout_info(job.path)
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
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // N)))
        for r in range(N):
            env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(N))
            with open(tmp / f"rank{r}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "mixtral_convert.distributed", str(spec)],
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
