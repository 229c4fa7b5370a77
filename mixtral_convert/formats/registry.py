"""Which format a checkpoint is in: the registry of readers and merge targets.

`open_checkpoint(path)` resolves hf://org/name[@rev] through the hub cache, lists the directory
once, and asks each reader in `READERS` (in order: the first that claims the directory opens
it). Readers that declare a conflict refuse to share a directory, as Accessory's loader does.
A new source format is one module with a `Reader`, added to `READERS`; a new merge target, one
with a `Target`, added to `TARGETS`. Every command reads through here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..io import hub
from . import accessory, hf, mistral, torrent
from .adapters import accessory_peft as peft
from .adapters import hf as hf_adapter
from .checkpoint import Checkpoint, Reader, Target
from .gguf import registration as gguf

# single-file readers first (a file they claim is read as itself), then the directory readers in order
READERS: tuple[Reader, ...] = (mistral.ARCHIVE, gguf.READER, peft.READER, accessory.READER, mistral.READER,
                               torrent.TORRENT, hf.READER, torrent.CONSOLIDATED)
TARGETS: dict[str, Target] = {t.name: t for t in (torrent.TARGET, hf.TARGET, gguf.TARGET)}
# hf://: the small files that say what a repository holds, and who names its weight files, in order
HUB_SMALL_FILES = ["config.json", torrent.PARAMS, accessory.META, hf.INDEX]
HUB_PROBES = (hf.hub_index, accessory.hub_weights, hf.hub_single, torrent.hub_weights)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ConvertError(f"unknown merge target '{name}'; use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def hub_weight_patterns(d: Path) -> list[str]:
    """The weight files of the first format whose small files are in `d` (one format, never two copies)."""
    for probe in HUB_PROBES:
        found = probe(d)
        if found:
            return found
    return []


def target_options(tgt: Target, ck: Checkpoint, given: dict[str, Optional[str]]) -> dict:
    """`tgt`'s options, parsed and prepared (Target.resolve); an option given that only other targets
    take is refused, naming them."""
    for dest, value in given.items():
        if value is None or any(o.dest == dest for o in tgt.options):
            continue
        owners = [t.name for t in TARGETS.values() if any(o.dest == dest for o in t.options)]
        flag = next(o.flag for t in TARGETS.values() for o in t.options if o.dest == dest) if owners else dest
        raise ConvertError(f"{flag} is for --to {' or '.join(owners)}; the {tgt.name} layout has no place for it: "
                           "leave it out")
    return tgt.resolve(ck, given)


def all_target_options() -> list:
    """Every target's options, each once (by flag), with the targets that take it: for the CLI."""
    seen: dict[str, tuple] = {}
    for t in TARGETS.values():
        for o in t.options:
            seen.setdefault(o.flag, (o, []))[1].append(t.name)
    return list(seen.values())


def file_reader(path) -> Optional[Reader]:
    """The single-file reader that claims `path` (an archive, a GGUF file), None when none does."""
    path = Path(path)
    return next((r for r in READERS if r.single_file and r.claims(path, None)), None) if path.is_file() else None


def is_kind(path, name: str) -> bool:
    """Whether `path` names a file of the single-file reader `name` (a GGUF output to verify, even one
    that is missing: its own checks say so)."""
    return any(r.name == name and r.claims(Path(path), None) for r in READERS if r.single_file)


def checkpoint_dir(path: Path) -> Path:
    """The directory a path names: itself, or the directory of one of its checkpoint files."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_file():
        if accessory.SHARD_RE.match(path.name) or path.name.endswith(CHECKPOINT_SUFFIXES):
            return path.parent
        raise ConvertError(f"{path}: expected a checkpoint directory or a .pth/.pt/.safetensors file")
    return path


def detect(path: Path, names: set[str]) -> Reader:
    """The reader for a directory whose file names are `names`."""
    claiming = [r for r in READERS if not r.single_file and r.claims(path, names)]
    if not claiming:
        why = torrent.hint(path, names) or mistral.hint(path, names)
        if why:
            raise ConvertError(why)
        what = "; or ".join(r.what for r in READERS if not r.single_file)
        raise ConvertError(f"{path}: no checkpoint found (expected {what})")
    first = claiming[0]
    for other in claiming[1:]:
        if other.name in first.conflicts:
            raise ConvertError(f"{path}: holds both {first.what} and {other.what} ({first.conflict_why}); "
                               "move one set elsewhere")
    return first


def reader_of(path) -> tuple[Reader, Path, Optional[set[str]]]:
    """(the reader, the path it reads, the directory's file names; None for a single-file reader)."""
    reader = file_reader(path)
    if reader is not None:
        return reader, Path(path), None
    path = checkpoint_dir(path)
    names = {p.name for p in path.iterdir()}
    return detect(path, names), path, names


def open_checkpoint(path, base=None, adapter=None) -> Checkpoint:
    """A checkpoint directory (or one of its files), a single file a reader takes (Mistral's .tar
    download, a GGUF file), or hf://org/name[@rev], of any registered format. `base` (any of those):
    the model a save that holds only what a finetune changed was trained from (Reader.on_base).
    `adapter`: an HF PEFT LoRA adapter (PATH or hf://org/name[@rev]) applied on top of whatever
    `path` (with `base`) opens, whatever its reader (formats.adapters.hf)."""
    if adapter is not None:
        return hf_adapter.apply(open_checkpoint(path, base=base), adapter)
    if hub.is_hub(path):
        ck = open_checkpoint(hub.resolve_checkpoint(path, HUB_SMALL_FILES, hub_weight_patterns), base)
        return replace(ck, remote=hub.normalize(path))
    reader, path, names = reader_of(path)
    if base is None:
        return reader.open(path, names)
    if reader.on_base is None:
        takes = " or ".join(r.on_base_what for r in READERS if r.on_base is not None)
        raise ConvertError(f"--base {base}: is for {takes}; {path} is not one: leave --base out")
    return reader.on_base(path, names, open_checkpoint(base))
