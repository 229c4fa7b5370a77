"""`concat`: join the torrent's byte pieces (`consolidated.00.pth-split0` ... `-splitN`) into one
checkpoint, safely; or the pieces community mirrors cut Mixtral-8x22B's one
`consolidated.safetensors` into (`consolidated.safetensors.0` ... `.N`).

What this module holds (the pieces and the checksums are found by `concat_inputs`):
- `concat`: streams the pieces into a hidden sibling temporary file with large buffers, hashing
  md5 and sha256 in worker threads while the main thread reads (hashlib releases the GIL on
  large buffers), fsyncs, checks the result is a loadable torch zip checkpoint (or a whole
  safetensors file: `encodings.safetensors.check_file`), compares the
  checksums, and only then renames it into place (and, if asked, removes the pieces). On any
  failure, SIGINT (KeyboardInterrupt) or SIGTERM (`entry.Terminated`) the temporary file is removed.
- `check_joined`: the joined file proved whole, with `encodings.torchzip.check_checkpoint` (the zip /
  torch structure) or `encodings.safetensors.check_file`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..encodings.safetensors import check_file as check_safetensors
from ..encodings.torchzip import DamagedZip, check_checkpoint
from ..errors import ConvertError
from ..formats.mistral import TOKENIZERS
from ..io.atomic import atomic_file, check_space
from ..io.direct import OutputFile
from ..io.pipeline import Worker
from ..io.progress import progress_bar
from ..io.reads import SourceFile
from ..io.small import fsync_dir
from .concat_inputs import (  # noqa: F401 (find_pieces, default_output: concat's API)
    PARTIAL_SUFFIX,
    Expected,
    default_output,
    find_pieces,
    partial_path,
    piece_match,
    read_checksums,
)

# Bytes per buffer and buffers in flight (memory is bounded by NBUF * CHUNK); why these sizes: docs/concat.md.
HASHES = ("md5", "sha256")
CHUNK = 1 << 20
NBUF = 16


@dataclass
class Result:
    output: Path
    pieces: list[Path]
    nbytes: int
    seconds: float
    md5: Optional[str]  # None: not computed (no md5 was given or asked for)
    sha256: Optional[str]
    tensors: int
    records: int
    compared: list[str]            # e.g. ["md5 (--md5)", "sha256 (SHA256SUMS)"]
    removed_pieces: bool
    split_ready: bool              # params.json and tokenizer.model sit beside the output
    assets_beside_pieces: bool     # ... or beside the pieces only
    checked: str = ""              # what the joined file was proved to be, for the summary

    @property
    def throughput(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")

    def lines(self, quiet: bool) -> list[str]:
        """What concat prints: the hashes alone when `quiet`; else what was written, how fast, the
        hashes, what was checked and what the user can run next."""
        from ..io.progress import human_bytes
        hashes = [f"{kind:<8}{digest}" for kind, digest in (("md5", self.md5), ("sha256", self.sha256))
                  if digest is not None]
        if quiet:
            return hashes
        out = [f"wrote {self.output}: {self.nbytes} bytes ({human_bytes(self.nbytes)}) from {len(self.pieces)} pieces "
               f"in {self.seconds:.1f} s, {human_bytes(self.throughput)}/s"] + hashes
        compared = ", ".join(self.compared) if self.compared else "none given (printed above)"
        out.append(f"checked: {self.checked}; checksums matched: {compared}")
        if self.removed_pieces:
            out.append(f"removed the {len(self.pieces)} pieces")
        if self.split_ready:
            out.append(f"params.json and the tokenizer are beside it: `mixtral-convert split {self.output.parent}` "
                       "can now run on that directory")
        elif self.assets_beside_pieces:
            out.append(f"params.json and the tokenizer are beside the pieces: copy them next to {self.output.name}, "
                       f"then `mixtral-convert split {self.output.parent}` can run")
        return out


# ----------------------------------------------------------------------------- copying

class _Slots:
    """The copy's buffers: which are free, and how many workers each busy one still waits for."""

    def __init__(self, n: int, size: int, progress):
        self.bufs = [bytearray(size) for _ in range(n)]
        self.free = list(range(n))
        self.pending: dict[int, tuple[int, int]] = {}  # slot -> (workers still to finish, nbytes)
        self.done: queue.Queue = queue.Queue()
        self.progress = progress
        self.workers: list[Worker] = []

    def take(self) -> int:
        while not self.free:
            self.reap(block=True)
        return self.free.pop()

    def hand_out(self, slot: int, n: int) -> None:
        self.pending[slot] = (len(self.workers), n)
        for w in self.workers:
            w.put(memoryview(self.bufs[slot])[:n], slot)
        self.reap(block=False)

    def reap(self, block: bool) -> None:
        """Take back the buffers every worker is done with; raise a worker's failure."""
        while True:
            try:
                slot = self.done.get(block=block)
            except queue.Empty:
                return
            left, n = self.pending[slot]
            if left == 1:
                del self.pending[slot]
                self.free.append(slot)
                self.progress.advance(n)
            else:
                self.pending[slot] = (left - 1, n)
            block = False
            for w in self.workers:
                if w.error is not None:
                    raise w.error


def _copy(pieces: list[Path], sizes: list[int], out: OutputFile, progress, kinds=HASHES) -> dict[str, str]:
    """Copy the pieces to `out` in order; return the hex digest of everything written for each hash
    in `kinds` (only those are computed: md5 runs on one core at well under the disk's speed)."""
    hashers = {k: getattr(hashlib, k)() for k in kinds}
    slots = _Slots(NBUF, max(1, min(CHUNK, sum(sizes))), progress)
    slots.workers = [Worker(out.write, "concat-write", slots.done.put)]
    slots.workers += [Worker(h.update, f"concat-{k}", slots.done.put) for k, h in hashers.items()]
    try:
        for piece, size in zip(pieces, sizes, strict=True):
            got = 0
            with open(piece, "rb", buffering=0) as src:
                try:
                    os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except (AttributeError, OSError):
                    pass
                while True:
                    slot = slots.take()
                    n = src.readinto(slots.bufs[slot])
                    if not n:
                        slots.free.append(slot)
                        break
                    got += n
                    slots.hand_out(slot, n)
            if got != size:
                raise ConvertError(f"{piece}: changed while reading ({size} bytes at the start, "
                                   f"{got} read)")
        while slots.pending:
            slots.reap(block=True)
    finally:
        for w in slots.workers:
            w.halt()
        for w in slots.workers:
            w.close(timeout=30)
    return {k: h.hexdigest() for k, h in hashers.items()}


def _as_convert_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return ConvertError(f"{where}{e.strerror or e}")
    return e


# ----------------------------------------------------------------------------- checking

def check_joined(path: Path, name: str = "") -> tuple[int, int]:
    """(tensors, data records) of the joined file, or the one-line error that a piece is bad.
    `name`: the joined file's name (the pieces' base name; the file checked is a temporary
    sibling); a `.safetensors` file is checked as safetensors, anything else as a torch zip."""
    if (name or path.name).endswith(".safetensors"):
        try:
            n = check_safetensors(path, "the joined file")
        except ConvertError as e:
            raise ConvertError(f"{e}; a piece is probably truncated, missing or corrupt; nothing was written") from None
        return n, n
    try:
        return check_checkpoint(path)
    except DamagedZip as e:
        raise ConvertError(f"the joined file is not a loadable torch checkpoint ({e.why}); a piece is "
                           f"probably truncated, missing or corrupt; nothing was written") from None


# ----------------------------------------------------------------------------- the operation

def _output_for(pieces: list[Path], output: Path | None, force: bool) -> Path:
    """Where the joined file goes (default: beside the pieces, under their base name), checked."""
    if output is None:
        output = default_output(pieces)
    elif output.is_dir():
        output = output / piece_match(pieces[0])["base"]
    output = Path(output)
    if output.resolve() in {p.resolve() for p in pieces}:
        raise ConvertError(f"{output}: OUTPUT is one of the pieces")
    if not output.parent.is_dir():
        raise ConvertError(f"{output.parent}: no such directory for OUTPUT")
    if output.exists() and not force:
        raise ConvertError(f"{output} already exists; use --force to overwrite it")
    return output


def _hash_kinds(expected: Expected, hashes) -> list[str]:
    """The hashes to compute: those a given checksum needs and those asked for; with neither, sha256."""
    unknown = sorted(set(hashes) - set(HASHES))
    if unknown:
        raise ConvertError(f"--hash {unknown[0]}: use md5 or sha256")
    needed = [k for k in HASHES if getattr(expected, k)] or ["sha256"]
    return [k for k in HASHES if k in needed or k in hashes]


def _join(pieces: list[Path], sizes: list[int], tmp: Path, output: Path, kinds, quiet: bool) -> dict[str, str]:
    """The pieces copied into `tmp`, fsynced, its size checked; the digests of what was written."""
    total = sum(sizes)
    with OutputFile(tmp) as out, progress_bar(f"concat {output.name}", total, quiet) as progress:
        try:
            got = _copy(pieces, sizes, out, progress, kinds)
            progress.describe(f"fsync {output.name}")
            out.finish(fsync=True)
        except OSError as e:  # a failed write (disk full, I/O error): name the file
            e.filename = e.filename or str(output)
            raise
    written = tmp.stat().st_size
    if written != total:
        raise ConvertError(f"{tmp}: wrote {written} bytes, expected {total}")
    return got


def _compare(expected: Expected, got: dict[str, str], kinds, output: Path) -> list[str]:
    """Each given checksum against the digest of the joined bytes; what was compared."""
    compared = []
    for kind in kinds:
        for want, source in getattr(expected, kind):
            if want != got[kind]:
                raise ConvertError(f"{kind} mismatch: {output.name} is {got[kind]}, {source} says "
                                   f"{want}; a piece is corrupt or from another release")
            compared.append(f"{kind} ({source})")
    return compared


def _assets(d: Path) -> bool:
    return (d / "params.json").is_file() and any((d / t).is_file() for t in TOKENIZERS)


def concat(inputs: Iterable[Path], output: Path | None = None, md5: str | None = None,
           sha256: str | None = None, checksums: Path | None = None, force: bool = False,
           remove_pieces: bool = False, quiet: bool = False, hashes=()) -> Result:
    """Join the pieces into `output`, verified; see the module docstring. The hashes computed are
    those a given checksum needs and those in `hashes`; with neither, sha256 alone."""
    pieces = find_pieces(inputs)
    output = _output_for(pieces, output, force)
    expected = read_checksums(output.name, md5, sha256, checksums)
    kinds = _hash_kinds(expected, hashes)
    opened = [SourceFile(p) for p in pieces]  # each piece's identity, checked unchanged before the output is published
    sizes = [f.size for f in opened]
    total = sum(sizes)
    tmp = partial_path(output)
    check_space(output, output.parent, total, freed=tmp.stat().st_size if tmp.exists() else 0)
    base = piece_match(pieces[0])["base"]
    start = time.perf_counter()
    try:
        with atomic_file(output, tmp=tmp, sources=opened) as tmp:
            got = _join(pieces, sizes, tmp, output, kinds, quiet)
            compared = _compare(expected, got, kinds, output)
            tensors, records = check_joined(tmp, base)
        fsync_dir(output.parent)
    except OSError as e:
        raise _as_convert_error(e) from None
    seconds = time.perf_counter() - start
    if remove_pieces:
        for p in pieces:
            p.unlink()
        fsync_dir(pieces[0].parent)
    return Result(output=output, pieces=pieces, nbytes=total, seconds=seconds, md5=got.get("md5"),
                  sha256=got.get("sha256"), tensors=tensors, records=records, compared=compared,
                  removed_pieces=remove_pieces, split_ready=_assets(output.parent),
                  assets_beside_pieces=_assets(pieces[0].parent),
                  checked=(f"whole safetensors file ({tensors} tensors tiling its data; header and size exact)"
                           if base.endswith(".safetensors") else
                           f"loadable torch checkpoint ({tensors} tensors, {records} data records)"))
