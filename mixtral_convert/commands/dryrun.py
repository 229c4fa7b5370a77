"""--dry-run: what split, split-sparse or merge would write, from the same detection, validation
and plan as the real run, with nothing written.

Every output file is listed with its exact size (the torch zip and safetensors writers' layouts
are computed, not estimated; the manifest's size is its own with placeholder hashes, which have
the real ones' length), with the tensors per rank, the dtype, and the space needed against the
space free where the output would go. The output directory goes through the same checks as a
real run (`io.atomic.preflight`): a run that would be refused is refused now, with the same line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..formats.checkpoint import Checkpoint, dtype_name
from ..io import manifest as mf
from ..io.atomic import check_space, nearest_existing, preflight
from ..io.progress import human_bytes
from ..io.small import json_bytes
from .common import MARGIN


@dataclass
class Planned:
    name: str
    size: int
    what: str = ""
    entry: dict = field(default_factory=dict)  # what the manifest records beside size and sha256


@dataclass
class DryRun:
    command: str
    source: str
    out: Path
    dtype: str
    source_dtype: str
    files: list[Planned] = field(default_factory=list)
    base: Optional[Path] = None
    free: Optional[int] = None

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def need(self) -> int:
        return self.nbytes + MARGIN

    def lines(self) -> list[str]:
        cast = f" (cast from {self.source_dtype})" if self.dtype != self.source_dtype else ""
        out = [f"dry run: {self.command} would write {self.out} from {self.source}, {self.dtype}{cast}:"]
        width = max(len(f.name) for f in self.files)
        for f in self.files:
            out.append(f"  {f.name:<{width}}  {human_bytes(f.size):>10}  ({f.size} bytes)  {f.what}".rstrip())
        free = f"{human_bytes(self.free)} free" if self.free is not None else "free space unknown"
        out.append(f"total {human_bytes(self.nbytes)} in {len(self.files)} files; needs {human_bytes(self.need)} "
                   f"(with a {human_bytes(MARGIN)} margin), {free} on {self.base}")
        out.append("nothing was written")
        return out


def dry_run(command: str, ck: Checkpoint, out: Path, force: bool, planned: list[Planned], info: dict,
            shared: bool = False, manifest: str = mf.MANIFEST, check=preflight) -> DryRun:
    """The report for `planned` files into `out` (plus the manifest), after the output checks
    (`shared`: a directory other processes write into too, as with --ranks: only its disk's space)."""
    fake = {p.name: {"size": p.size, "sha256": "0" * 64, **p.entry} for p in planned}
    size = len(json_bytes(mf.build(fake, **info)))
    planned = planned + [Planned(manifest, size, "every file's size and sha256, the source's identity")]
    rep = DryRun(command, ck.where, Path(out), info.get("dtype") or dtype_name(ck.dtype),
                 dtype_name(ck.source_dtype or ck.dtype), planned)
    if shared:
        rep.base = nearest_existing(Path(out).resolve())
        rep.free = check_space(Path(out), rep.base, 0)
    else:
        pf = check(out, force, rep.need, True)  # the output checks of a real run
        rep.out, rep.base, rep.free = pf.out, pf.base, pf.free
    return rep
