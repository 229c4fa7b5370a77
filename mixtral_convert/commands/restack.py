"""`merge OLD.gguf --to gguf` on a GGUF in llama.cpp's first, per-expert MoE layout: restacked
into today's layout with the quantized bytes copied (formats.gguf.restack); and `verify NEW.gguf
--source OLD.gguf`, which proves the restacked file byte for byte (docs/formats.md, "Old
per-expert GGUFs")."""

from __future__ import annotations

import hashlib
import time
from contextlib import closing
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConvertError
from ..formats.gguf import header as gguf_header
from ..formats.gguf import restack as rs
from ..formats.gguf import source as gguf_source
from ..formats.gguf.write import SPLIT_RE
from ..formats.hf import parse_size
from ..io import beside
from ..io import manifest as mf
from ..io.direct import write_file
from ..io.pipeline import HashBeside
from ..io.prefetch import prefetched
from ..io.progress import progress_bar
from ..io.small import json_bytes, write_manifest
from .common import MARGIN, Result
from .dryrun import DryRun, Planned
from .verify import Report, unchanged_while_compared

FORMAT = "gguf-per-expert"  # the source's format, as the manifest records it


def default_out(src: Path) -> Path:
    m = SPLIT_RE.search(src.name)
    stem = src.name[:m.start()] if m else src.name[:-len(".gguf")]
    return src.with_name(f"{stem}-stacked.gguf")


def merge_old_gguf(src, to: str, out=None, force: bool = False, quiet: bool = False, dtype: Optional[str] = None,
                   dry_run: bool = False, dequantize: bool = False, mixed_experts: Optional[str] = None,
                   **given) -> Optional[object]:
    """The restack when `src` is a per-expert GGUF merged `--to gguf` without a conversion asked
    (no --dtype, or the file's own type; no --dequantize): a Result (a DryRun with `dry_run`).
    None for every other merge, which goes on as usual."""
    wanted = to == "gguf" and not dequantize and rs.is_per_expert(src)
    if wanted and dtype is not None:
        r = rs.read(Path(src))
        ft = int(gguf_source.field(r, "general.file_type", src, -1))
        wanted = dtype == rs.FILE_TYPE_NAMES.get(ft)
    if not wanted:
        if mixed_experts is not None:
            raise ConvertError("--convert-mixed-experts is for restacking a GGUF in llama.cpp's per-expert layout "
                               "(merge OLD.gguf --to gguf, without --dtype or --dequantize): leave it out")
        return None
    for flag, dest in (("--name", "name"), ("--max-position-embeddings", "max_position_embeddings"),
                       ("--tokenizer", "tokenizer"), ("--base", "base")):
        if given.get(dest) is not None:
            raise ConvertError(f"{flag}: restacking {src} carries every metadata key as it is; leave it out")
    if given.get("drop_biases"):
        raise ConvertError(f"--drop-biases: {src} has no biases to drop; leave it out")
    src = Path(src)
    size = given.get("max_shard_size")
    max_shard = parse_size(size) if size is not None else None
    plan = rs.plan(src, mixed_experts)
    sources = plan.sources  # checked unchanged before the output is renamed into place
    out = Path(out) if out is not None else default_out(src)
    if out.resolve() in {p.resolve() for p in plan.paths}:
        raise ConvertError(f"{out}: is the source; choose another -o")
    files = rs.files(plan, out.name, max_shard)
    sizes = {name: len(head) + sum(t.nbytes + rs.pad(t.nbytes, plan.alignment) for t in ts)
             for name, head, ts in files}
    info = _manifest_info(plan)
    if dry_run:
        return _dry_run(src, out, force, files, sizes, plan, info)
    t0 = time.perf_counter()
    total = sum(t.nbytes for t in plan.tensors)
    entries = {}
    with beside.atomic_output_files(out, list(sizes), force, need_bytes=sum(sizes.values()) + MARGIN,
                                    sources=sources) as tmp:
        with progress_bar(f"restack {src.name}", total, quiet) as prog:
            for name, head, tensors in files:
                # read a few chunks ahead on one thread, hashed on another while the writers write them
                with closing(prefetched(((t.name, c) for t in tensors for c in rs.chunks(t)), depth=2)) as stream, \
                        HashBeside(hashlib.sha256()) as h:
                    n = write_file(tmp / name, head, tensors, _taker(stream, prog), hasher=h,
                                   pad=lambda k: rs.pad(k, plan.alignment))
                    entries[name] = {"size": n, "sha256": h.hexdigest()}
        write_manifest(tmp, entries, _name=beside.manifest_name(out), **info)
    return Result(out, sorted(entries), total, time.perf_counter() - t0, notes=notes(plan))


def _taker(stream, progress):
    """`produce(t)` for write_file over one file's chunk stream (read a chunk ahead on a second thread)."""
    def produce(t):
        left = t.nbytes
        while left > 0:
            name, chunk = next(stream)
            if name != t.name:
                raise AssertionError(f"writer asked for {t.name} but the chunks are {name}'s")
            left -= chunk.nbytes
            yield chunk
            progress.advance(chunk.nbytes)
    return produce


def _source(plan: rs.Restack) -> dict:
    first = plan.paths[0]
    return {"path": str(first.parent.resolve()), "format": FORMAT, "files": {p.name: p.stat().st_size
                                                                            for p in plan.paths}}


def _manifest_info(plan: rs.Restack) -> dict:
    stacked = sum(1 for t in plan.tensors if len(t.slabs) > 1)
    info = dict(layout="gguf", world_size=1, dtype=plan.file_type, source=_source(plan),
                restacked={"from": rs.LAYOUT, "stacked_tensors": stacked, "experts": plan.experts,
                           "bytes": "copied (no arithmetic)" if not plan.converted else
                           "copied, but for the converted experts"})
    if plan.converted:
        info["converted_mixed_experts"] = plan.converted
    return info


def notes(plan: rs.Restack) -> list[str]:
    out = []
    for name, c in plan.converted.items():
        moved = "; ".join(f"experts {', '.join(map(str, es))} from {t}" for t, es in c["converted_experts"].items())
        out.append(f"'{name}': layer {c['layer']}'s experts were in several types; {moved} converted to {c['to']} "
                   "(dequantized by gguf, lossy: recorded in the manifest)")
    return out


def _dry_run(src: Path, out: Path, force: bool, files, sizes: dict, plan: rs.Restack, info: dict) -> DryRun:
    planned = [Planned(name, sizes[name], f"{len(ts)} tensors, {plan.file_type}, restacked") for name, _, ts in files]
    fake = {p.name: {"size": p.size, "sha256": "0" * 64} for p in planned}
    manifest = beside.manifest_name(out)
    planned.append(Planned(manifest, len(json_bytes(mf.build(fake, **info))), "every file's size and sha256, "
                           "the source's identity"))
    rep = DryRun(f"merge --to gguf (restack of {rs.LAYOUT})", str(src), out, plan.file_type, plan.file_type, planned)
    pf = beside.preflight(out, list(sizes), force, rep.need, True)
    rep.out, rep.base, rep.free = pf.out, pf.base, pf.free
    return rep


# ----------------------------------------------------------------------------- verify
def verify_restacked(path: Path, source: Path, quiet: bool = False) -> Report:
    """NEW.gguf against the per-expert OLD.gguf it was restacked from: the same metadata bytes
    (gguf-split's keys aside), and every tensor's bytes the source's (a stacked one: its experts'
    slabs in order; converted experts: converting them again)."""
    t0 = time.perf_counter()
    path = Path(path)
    rep = Report(str(path), f"{source} ({rs.LAYOUT})", layout="gguf", world_size=1)
    try:
        plan = _plan_of(path, Path(source))
        _verify(path, Path(source), plan, rep, quiet)
        unchanged_while_compared(plan.sources, rep)
    finally:
        rep.seconds = time.perf_counter() - t0
    return rep


def _plan_of(path: Path, source: Path) -> rs.Restack:
    """Restacking `source` as `path` was (the experts its manifest says were converted, converted again)."""
    conv = None
    mp = path.with_name(beside.manifest_name(Path(SPLIT_RE.sub(".gguf", path.name))))
    if mp.is_file():  # the experts it says were converted are converted again the same way
        import json
        conv = {c["to"] for c in (json.loads(mp.read_text()).get("converted_mixed_experts") or {}).values()}
    to = {n for n, t in rs.MIXED_TYPES.items() if t.name in (conv or ())}
    return rs.plan(source, to.pop() if to else None)


def _verify(path: Path, source: Path, plan: rs.Restack, rep: Report, quiet: bool) -> None:
    bad = rep.problems.append
    headers = [gguf_header.parse(p) for p in gguf_source.pieces_of(path)]
    if b"".join(headers[0].kvs) != b"".join(plan.kvs):
        return bad(f"{path}: its metadata differs from {source}'s (every key is carried byte for byte)")
    rep.checks.append(f"metadata: every key's bytes equal {source.name}'s (general.file_type {plan.file_type})")
    have = {t.name: (h.file, t) for h in headers for t in h.tensors}
    if list(have) != [t.name for t in plan.tensors]:
        return bad(f"{path}: holds other tensors (or another order) than restacking {source.name} gives")
    total = sum(t.nbytes for t in plan.tensors)
    with progress_bar("verify restack", total, quiet) as prog:
        for t in plan.tensors:
            f, got = have[t.name]
            if got.tensor_type != t.ggml_type or got.shape != t.shape:
                return bad(f"{path}: tensor '{t.name}' is {got.tensor_type.name} {list(got.shape)}, restacking "
                           f"gives {t.ggml_type.name} {list(t.shape)}")
            pos = 0
            for chunk in rs.chunks(t):
                want = chunk.reshape(-1)
                data = np.empty(want.nbytes, dtype=np.uint8)
                f.read_into(got.data_offset + pos, data)
                if not np.array_equal(data, want):
                    off = pos + int(np.flatnonzero(data != want)[0])
                    return bad(f"{path}: tensor '{t.name}' differs from {source.name}'s at byte {off} of its data")
                pos += want.nbytes
                rep.bytes_compared += want.nbytes
                prog.advance(want.nbytes)
    how = "their experts' slabs in order" if not plan.converted else \
        f"the {len(plan.converted)} tensor(s) of mixed types converted again the same way"
    rep.checks.append(f"{len(plan.tensors)} tensors byte for byte equal {source.name}'s restacked ({how}; "
                      f"{rep.bytes_compared} bytes)")
