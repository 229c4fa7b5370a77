"""split / split-sparse: any readable checkpoint -> an Accessory layout at world size N.

For each rank, for each of its shard tensors (from the plan), the tensor is assembled from
the source's canonical tensors a block at a time and streamed to disk; then config.json,
meta.json, tokenizer.model and a manifest are written, all inside a temporary directory that
is renamed into place at the end.

Scale-out: with `ranks` (or under torchrun: process RANK of WORLD_SIZE takes ranks
RANK, RANK + WORLD_SIZE, ...) only those shards are written, each atomically, into a shared
output directory; the files equal a single-process run's byte for byte, and the process that
completes the set writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..formats.accessory import LLAMA_TYPE, shard_file_name, shard_size, shard_writer, side_contents, side_files
from ..formats.checkpoint import Checkpoint, dtype_name
from ..formats.gguf import dequant as gguf_dequant
from ..io import bandshare
from ..io.atomic import MANIFEST, atomic_file, atomic_output_dir, check_space
from ..io.direct import STAGE_BYTES
from ..io.lazy import BLOCK_BYTES, Assembled, Cast, OnDisk, TensorSpec
from ..io.prefetch import file_producer, release_freed_blocks
from ..io.progress import Progress, progress_bar
from ..io.small import fsync_all, json_bytes, write_manifest, write_small
from ..model.layouts import Plan
from ..tokenizer.files import carried
from . import biases, dryrun
from .common import MARGIN, Result, cast_to, check_tokenizer, output_base, use_tokenizer
from .dryrun import DryRun, Planned
from .options import OutputOptions, SourceOptions, SplitOptions

DEFAULT_OUT = {"base": "converted", "sparse": "converted_sparse"}
_PART = ".mixtral-convert-part-{:05d}.json"


def ranks_from_env(N: int) -> Optional[list[int]]:
    """Under torchrun (WORLD_SIZE > 1): this process's share of the N ranks."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return list(range(rank, N, world)) if world > 1 else None


def _write_rank(plan: Plan, r: int, ck: Checkpoint, path: Path, prog: Progress, fmt: str, gate=None,
                block_bytes: int = BLOCK_BYTES, share=None) -> dict:
    specs = [TensorSpec(k, st.shape, st.dtype) for k, st in plan.ranks[r].items()]
    h = hashlib.sha256()
    with file_producer(specs, lambda s: plan.shard_tensor(r, s.name, ck.canonical), prog, gate,
                       block_bytes, share) as produce:
        size = shard_writer(fmt)(path, specs, produce, hasher=h, stage_bytes=min(STAGE_BYTES, block_bytes))
    return {"size": size, "sha256": h.hexdigest(), "rank": r}


WRITE_RANKS = ("auto", "together", "in-turn")


def _together(mode: str, plan: Plan, ck: Checkpoint) -> bool:
    """Whether to write the ranks' files together: asked for, or (auto) when what the ranks read
    through the page cache would not stay there while they are written one after another. (Sparse
    ranks written together share one read of each w2's full rows, `io.bandshare`; on a source the
    page cache holds, that measured no faster than the ranks in turn, with more CPU and memory:
    docs/performance.md, "Shared w2 rows".)"""
    if plan.N == 1 or len({len(shard) for shard in plan.ranks}) != 1 or mode == "in-turn":
        return False
    return mode == "together" or cached_bytes(plan, ck) > _available_memory() // 2


def _share_bands() -> bool:
    """MIXTRAL_CONVERT_SHARE_BANDS=0 turns the shared band reads off (to measure them)."""
    return os.environ.get("MIXTRAL_CONVERT_SHARE_BANDS", "1") != "0"


def cached_bytes(plan: Plan, ck: Checkpoint) -> int:
    """The bytes of the source tensors that the ranks read through the page cache: those read in
    bands of columns (a rank's wo, embedding, sparse w2), which every rank reads a part of. The
    ranges read once (whole experts, a rank's rows) are read by direct I/O, past the page cache,
    where the file allows it (io.reads)."""
    through: dict[int, int] = {}

    def visit(lz, region) -> None:
        if isinstance(lz, Assembled):
            for p in lz.placements:
                visit(p.src, p.src_region)
        elif isinstance(lz, Cast):
            visit(lz.base, region)
        elif not (isinstance(lz, OnDisk) and lz.read_once(region)):
            through[id(lz)] = lz.nbytes

    for name in plan.ranks[0]:  # every rank reads the same tensors' bands
        visit(plan.shard_tensor(0, name, ck.canonical), None)
    return sum(through.values())


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown: assume it fits


class _Stopped(Exception):
    """Another rank's writer failed, or the run was interrupted."""


def _write_ranks_together(plan: Plan, ck: Checkpoint, tmp: Path, prog: Progress, fmt: str) -> dict[str, dict]:
    """Every rank's file at once, a thread each, kept within one tensor of each other (a barrier
    before every tensor). Ranks that read the same source region (a band of columns of an expert's
    w2, of wo, of the embedding) then read it while it is in the page cache for all of them: written
    one rank after another, a source larger than memory was read again for every rank
    (docs/performance.md). Smaller blocks keep the memory of N writers within the bound of one."""
    N = plan.N
    stop, barrier, results, errors = threading.Event(), threading.Barrier(N), {}, []
    share = None if not _share_bands() else bandshare.BandShare.count(
        (plan.shard_tensor(r, name, ck.canonical) for r in range(N) for name in plan.ranks[r]), stop)

    def gate(i: int) -> None:
        if stop.is_set():
            raise _Stopped()
        try:
            if barrier.wait() == 0:
                release_freed_blocks()  # once per tensor, by one of the writers
        except threading.BrokenBarrierError:
            raise _Stopped() from None

    def job(r: int) -> None:
        try:
            results[r] = _write_rank(plan, r, ck, tmp / shard_file_name(r, N, fmt), prog, fmt, gate,
                                     max(1 << 20, BLOCK_BYTES // N), share)
        except (_Stopped, bandshare.Stopped):
            pass
        except BaseException as e:  # re-raised by the caller's thread
            errors.append(e)
            stop.set()
            barrier.abort()

    threads = [threading.Thread(target=job, args=(r,), daemon=True) for r in range(N)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # in steps, so that Ctrl-C reaches this thread
    finally:  # stop the others and wait for them before the output is cleaned up
        stop.set()
        barrier.abort()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return {shard_file_name(r, N, fmt): results[r] for r in range(N)}


def _manifest_info(ck: Checkpoint, layout: str, N: int, fmt: str, dropped=None) -> dict:
    extra = {"dropped_biases": dropped.as_dict()} if dropped is not None else {}
    return dict(layout=layout, llama_type=LLAMA_TYPE[layout], world_size=N, shard_format=fmt,
                dtype=dtype_name(ck.dtype), source=ck.source_info(), **extra)


def split(src: Path, opts: SplitOptions, source: Optional[SourceOptions] = None,
          output: Optional[OutputOptions] = None):
    """Write `src` in `opts.layout` for `opts.world_size` ranks (a Result); with `output.dry_run`, only
    say what would be written (a dryrun.DryRun). A model with non-zero biases goes to the base layout as
    mixtral_peft ("peft", biases in place); the sparse layout refuses it, unless `output.drop_biases`
    (commands.biases)."""
    source, output = source or SourceOptions(), output or OutputOptions()
    layout, N, fmt = opts.layout, opts.world_size, opts.fmt
    shard_writer(fmt)  # an unknown format fails before anything is read
    if opts.write_ranks not in WRITE_RANKS:
        raise ConvertError(f"--write-ranks {opts.write_ranks}: use one of {', '.join(WRITE_RANKS)}")
    ck = source.open(src)
    sources = ck.sources  # checked unchanged before any output is renamed into place
    ck, dtype = gguf_dequant.settle(ck, source.dequantize, output.dtype)  # a quantized GGUF only with --dequantize
    ck = cast_to(use_tokenizer(ck, source.tokenizer), dtype)
    out = Path(output.out) if output.out is not None else output_base(ck) / DEFAULT_OUT[layout]
    ck, keeps, dropped = biases.settle(ck, layout == "base" and not output.drop_biases, output.drop_biases,
                                       "split-sparse (Accessory's mixtral_sparse)")
    layout = "peft" if keeps else layout
    plan = Plan(layout, ck.cfg, N, ck.dtypes)
    tokenizer = check_tokenizer(ck)
    ranks = opts.ranks if opts.ranks is not None else ranks_from_env(N)
    ranks = sorted(set(ranks)) if ranks is not None else None
    force, quiet = output.force, output.quiet
    if output.dry_run:
        return _dry_run(ck, plan, tokenizer, out, ranks, force, fmt, dropped)
    if ranks is not None:
        return _split_ranks(ck, plan, tokenizer, out, ranks, force, quiet, fmt, dropped, sources)
    total = sum(st.nbytes for shard in plan.ranks for st in shard.values())
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + MARGIN, sources=sources) as tmp:
        files = {}
        with progress_bar(f"{layout} N={N}", total, quiet) as prog:
            if _together(opts.write_ranks, plan, ck):
                files.update(_write_ranks_together(plan, ck, tmp, prog, fmt))
            else:
                for r in range(N):
                    name = shard_file_name(r, N, fmt)
                    files[name] = _write_rank(plan, r, ck, tmp / name, prog, fmt)
            fsync_all(tmp / n for n in files)
        files.update(side_files(ck.cfg, tokenizer, layout, tmp, atomic=False))
        write_manifest(tmp, files, **_manifest_info(ck, layout, N, fmt, dropped))
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0,
                  notes=_notes(layout, dropped) + gguf_dequant.notes(ck))  # a lossy source said


def _notes(layout: str, dropped) -> list[str]:
    notes = [dropped.note()] if dropped is not None else []
    if layout == "peft":
        notes.append("the model has non-zero biases: written as llama_type mixtral_peft (lora_rank -1: any LoRA "
                     "merged, biases in place), which Accessory's mixtral_peft loads")
    return notes


def _dry_run(ck: Checkpoint, plan: Plan, tokenizer: Path, out: Path, ranks: Optional[list[int]], force: bool,
             fmt: str, dropped=None) -> DryRun:
    N, layout = plan.N, plan.layout
    planned = []
    for r in (ranks if ranks is not None else range(N)):
        specs = [TensorSpec(k, st.shape, st.dtype) for k, st in plan.ranks[r].items()]
        planned.append(Planned(shard_file_name(r, N, fmt), shard_size(specs, fmt), f"rank {r}: {len(specs)} tensors",
                               {"rank": r}))
    planned += [Planned(name, len(data), "") for name, data in side_contents(ck.cfg, layout).items()]
    planned += [Planned(name, p.stat().st_size, f"copied from {p}") for name, p in carried(tokenizer).items()]
    cmd = "split-sparse" if layout == "sparse" else "split"
    return dryrun.dry_run(f"{cmd} -n {N}", ck, out, force, planned, _manifest_info(ck, layout, N, fmt, dropped),
                   shared=ranks is not None)


def _split_ranks(ck: Checkpoint, plan: Plan, tokenizer: Path, out: Path, ranks: list[int], force: bool,
                 quiet: bool, fmt: str, dropped=None, sources=()) -> Result:
    """Cooperative mode: write only `ranks` into a shared `out`, each file atomically."""
    N, layout = plan.N, plan.layout
    bad = [r for r in ranks if not 0 <= r < N]
    if bad or not ranks:
        raise ConvertError(f"--ranks: {bad[0] if bad else 'none'} is not a rank of world size {N} "
                           f"(use numbers 0..{N - 1})")
    names = {r: shard_file_name(r, N, fmt) for r in ranks}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{out}: cannot create the output directory ({e.strerror})") from None
    existing = [n for n in names.values() if (out / n).exists()]
    if existing and not force:
        raise ConvertError(f"{out / existing[0]}: already exists; pass --force to replace it")
    total = sum(st.nbytes for r in ranks for st in plan.ranks[r].values())
    check_space(out, out, total + MARGIN, freed=sum((out / n).stat().st_size for n in existing))
    t0 = time.perf_counter()
    with progress_bar(f"{layout} N={N} ranks {','.join(map(str, ranks))}", total, quiet) as prog:
        for r in ranks:
            with atomic_file(out / names[r], sources=sources) as tmp:
                entry = _write_rank(plan, r, ck, tmp, prog, fmt)
                fsync_all([tmp])
            with atomic_file(out / _PART.format(r)) as tmp:
                write_small(tmp, json_bytes({names[r]: entry}))
    side = side_files(ck.cfg, tokenizer, layout, out, atomic=True)
    _combine_manifest(out, ck, layout, N, side, fmt, dropped)
    return Result(out, sorted(names.values()) + sorted(side), total, time.perf_counter() - t0,
                  notes=_notes(layout, dropped) + gguf_dequant.notes(ck))


def _combine_manifest(out: Path, ck: Checkpoint, layout: str, N: int, side: dict, fmt: str, dropped=None) -> None:
    """Once every rank's part is present (whichever process gets there), write the manifest."""
    parts = [out / _PART.format(r) for r in range(N)]
    if not all(p.exists() for p in parts):
        return
    files = dict(side)
    for p in parts:
        files.update(json.loads(p.read_text()))
    with atomic_file(out / MANIFEST) as tmp:
        write_manifest(tmp.parent, files, **_manifest_info(ck, layout, N, fmt, dropped), _name=tmp.name)
    for p in parts:
        p.unlink(missing_ok=True)
