"""merge: an Accessory layout (base or sparse, any N), or any other source, back to the torrent
layout, to the HF hub layout, or to a GGUF file.

Each canonical tensor is assembled from the shards through the same plan that split uses, read
in the other direction, and streamed by the target format's writer (formats.registry.TARGETS:
`torrent` writes consolidated.00.pth and params.json, `hf` safetensors with q/k permuted and
config.json); the tokenizer is checked and carried beside (tokenizer.model and the HF tokenizer
files; `hf` builds those a tokenizer.model alone lacks), and a manifest lists every file. A
target whose output is a file (`gguf`: PATH.gguf, its vocabulary inside) is written beside its
manifest instead (io.beside), with nothing carried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..formats.checkpoint import dtype_name
from ..formats.gguf import dequant as gguf_dequant
from ..formats.registry import TARGETS, is_kind, target
from ..formats.registry import target_options as target_options_of
from ..io import beside
from ..io.atomic import atomic_output_dir
from ..io.progress import progress_bar
from ..io.small import write_manifest
from ..tokenizer.files import carried, carry
from . import biases, dryrun
from .common import MARGIN, Result, cast_to, check_tokenizer, output_base, use_tokenizer
from .dryrun import Planned
from .options import MergeOptions, OutputOptions, SourceOptions


def merge(shards: Path, opts: Optional[MergeOptions] = None, source: Optional[SourceOptions] = None,
          output: Optional[OutputOptions] = None):
    """Write the checkpoint at `shards` in the target layout `opts.to` (a Result); with `output.dry_run`,
    only say what would be written (a dryrun.DryRun). `opts.target_options`: the target's own options as
    the command line gives them (text, or None when not given; formats.checkpoint.TargetOption)."""
    opts, source, output = opts or MergeOptions(), source or SourceOptions(), output or OutputOptions()
    to = opts.to
    tgt = target(to)
    # an old per-expert GGUF restacked (its bytes copied); with an adapter the GGUF is read as a source
    # instead: a restack copies bytes and would drop it
    restacked = None
    if source.adapter is None and is_kind(shards, "gguf"):
        from .restack import merge_old_gguf  # (the gguf package is imported only for a GGUF)
        restacked = merge_old_gguf(
            shards, to, out=output.out, force=output.force, quiet=output.quiet, dtype=output.dtype,
            dry_run=output.dry_run, dequantize=source.dequantize, mixed_experts=opts.convert_mixed_experts,
            tokenizer=source.tokenizer, base=source.base, drop_biases=output.drop_biases, **opts.target_options)
    elif opts.convert_mixed_experts is not None:
        raise ConvertError("--convert-mixed-experts is for restacking a GGUF in llama.cpp's per-expert layout (merge "
                           "OLD.gguf --to gguf, without --dtype or --dequantize): leave it out")
    if restacked is not None:
        return restacked
    ck = source.open(shards)
    sources = ck.sources  # checked unchanged before the output is renamed into place
    ck, dtype = gguf_dequant.settle(ck, source.dequantize, output.dtype)  # a quantized GGUF only with --dequantize
    ck = use_tokenizer(ck, source.tokenizer)
    out, force, quiet, dry_run = output.out, output.force, output.quiet, output.dry_run
    if ck.kind in tgt.same_kinds:
        raise ConvertError(f"{ck.path}: already in the {to} layout; merge reads Accessory shard directories "
                           "(or other sources); for another layout pass --to "
                           + " or --to ".join(n for n in TARGETS if n != to))
    if ck.tokenizer is not None:
        check_tokenizer(ck)  # validated before anything is written, like split
    ck.check()  # mixed dtypes are refused before anything is written
    ck, _, dropped = biases.settle(ck, tgt.holds_biases, output.drop_biases, f"--to {to}")  # before anything is written
    if dtype is not None and dtype not in tgt.dtypes:
        raise ConvertError(f"--dtype {dtype}: the {to} layout takes {', '.join(tgt.dtypes)}")
    options = target_options_of(tgt, ck, opts.target_options)
    if tgt.applies_dtype:
        options["dtype"] = dtype
    else:
        ck = cast_to(ck, dtype)
    base = output_base(ck)
    out = Path(out) if out is not None else base.parent / f"{base.name}{tgt.suffix}"
    total = ck.nbytes
    if tgt.output == "file":
        return _merge_to_file(ck, tgt, out, force, quiet, dry_run, options, dropped, sources)
    planned = tgt.plan(ck, **options)  # once: what --dry-run prints is what is written
    if dry_run:
        listed = [Planned(*p) for p in planned.files]
        if ck.tokenizer is not None:
            skip = {p.name for p in listed}
            listed += [Planned(name, p.stat().st_size, f"copied from {p}") for name, p in
                       carried(ck.tokenizer, skip=skip).items()]
        return dryrun.dry_run(f"merge --to {to}", ck, out, force, listed, _manifest_info(ck, to, dropped))
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, need_bytes=total + MARGIN, sources=sources) as tmp:
        with progress_bar(f"{to} from {ck.kind} N={ck.N}", total, quiet) as prog:
            files = planned.write(tmp, prog)
        if ck.tokenizer is not None:
            files.update(carry(ck.tokenizer, tmp, skip=files))
        write_manifest(tmp, files, **_manifest_info(ck, to, dropped))
    return Result(Path(out), sorted(files), total, time.perf_counter() - t0,
                  notes=([dropped.note()] if dropped is not None else []) + gguf_dequant.notes(ck))


def _merge_to_file(ck, tgt, out: Path, force: bool, quiet: bool, dry_run: bool, options: dict, dropped=None,
                   sources=()):
    """A target whose output is a file (PATH.gguf, its pieces beside it), with its manifest beside it."""
    out = Path(out)
    options = dict(options, out_name=out.name)
    plan = tgt.plan(ck, **options)  # once; refusals come here, before anything is created
    planned = [Planned(*p) for p in plan.files]
    names = [p.name for p in planned]
    info = _manifest_info(ck, tgt.name, dropped, options.get("dtype"))
    if dry_run:
        return dryrun.dry_run(f"merge --to {tgt.name}", ck, out, force, planned, info,
                              manifest=beside.manifest_name(out),
                              check=lambda o, f, need, dry: beside.preflight(o, names, f, need, dry))
    t0 = time.perf_counter()
    need = sum(p.size for p in planned) + MARGIN
    with beside.atomic_output_files(out, names, force, need_bytes=need, sources=sources) as tmp:
        with progress_bar(f"{tgt.name} from {ck.kind} N={ck.N}", ck.nbytes, quiet) as prog:
            files = plan.write(tmp, prog)
        write_manifest(tmp, files, _name=beside.manifest_name(out), **info)
    return Result(out, sorted(files), ck.nbytes, time.perf_counter() - t0,
                  notes=([dropped.note()] if dropped is not None else []) + gguf_dequant.notes(ck))


def _manifest_info(ck, to: str, dropped=None, dtype: Optional[str] = None) -> dict:
    extra = {"dropped_biases": dropped.as_dict()} if dropped is not None else {}
    return dict(layout=to, world_size=1, dtype=dtype or dtype_name(ck.dtype),
                source=dict(ck.source_info(), world_size=ck.N), **extra)
