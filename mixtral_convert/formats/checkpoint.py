"""What every format's reader returns, and what the registry asks of a format.

A `Checkpoint` is one model as this tool sees it whatever its files: the config, every
canonical tensor (the torrent release's names, docs/formats.md) as a lazy tensor, and the
tokenizer. Accessory layouts also keep their shards and the plan that places canonical tensors
in them. A `Reader` says whether a directory is in its format and opens it; a `Target` writes
a checkpoint in its format (`merge --to NAME`). `formats.registry` holds the list of both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..encodings import safetensors as safetensorsfile
from ..encodings import torchzip
from ..errors import ConvertError
from ..io.lazy import Lazy, dtype_name, files_of
from ..io.reads import SourceFile
from ..model.config import ModelConfig
from ..model.layouts import Plan
from ..tokenizer import files as tokenizer


@dataclass(frozen=True)
class TokenizerRef:
    """The tokenizer a checkpoint comes with: its file (or HF tokenizer directory), how messages name
    it (a tar member's copy by its archive and member name), or why none is usable although the
    source ships one (tekken.json, a damaged member)."""

    path: Optional[Path] = None
    shown_as: str = ""  # how messages name it, when not by its path
    missing: str = ""  # the message, when there is none to use

    @property
    def where(self) -> str:
        return self.shown_as or str(self.path)


@dataclass(frozen=True)
class Sharded:
    """An Accessory layout's shards (per rank: shard key -> lazy tensor) and the plan they follow."""

    plan: Plan
    shards: list[dict[str, Lazy]]

    @property
    def N(self) -> int:
        return self.plan.N


@dataclass(frozen=True)
class Checkpoint:
    """One model: where it comes from (path, the reader's `kind` and `label`, its files, the hub
    name it was resolved from), its config, every canonical tensor (lazy), its tokenizer, and for
    an Accessory layout its shards. Frozen: a changed view of it (another tokenizer, tensors cast
    with --dtype, the hub name) is a new one, made with `dataclasses.replace`."""

    path: Path  # the directory (or the archive)
    kind: str  # the reader's name (formats.registry.READERS): "torrent", "fused", "mistral", "hf", "base",
    # "sparse", "peft", "gguf"; Mistral's .tar gives "mistral"
    cfg: ModelConfig
    files: list[Path]
    tok: TokenizerRef
    canonical: dict[str, Lazy]  # canonical name -> lazy tensor
    label: str = ""  # what the format is called in messages
    sharded: Optional[Sharded] = None  # Accessory layouts
    remote: Optional[str] = None  # hf://org/name[@rev] when resolved from the hub
    source_dtype: Optional[torch.dtype] = None  # set when --dtype casts the tensors as they are read
    # the files opened to read it, each with its identity at opening: the reader's own, and every file its
    # tensors (canonical and shards) read from, added here; a command checks them unchanged before it
    # publishes anything (io.atomic) or reports a comparison (verify)
    sources: tuple[SourceFile, ...] = ()
    # set when its values are not the model's own but an approximation (a quantized GGUF read dequantized):
    # how it was read, recorded in the manifest as the source's `lossy`
    lossy: Optional[dict] = None

    def __post_init__(self):
        lazies = list(self.canonical.values()) + [t for shard in self.shards for t in shard.values()]
        object.__setattr__(self, "sources", tuple(dict.fromkeys(self.sources + files_of(lazies))))

    @property
    def tokenizer(self) -> Optional[Path]:
        return self.tok.path

    @property
    def tokenizer_where(self) -> str:
        """How messages name the tokenizer: a tar member by its archive and name, not its copy."""
        return self.tok.where

    @property
    def N(self) -> int:
        return self.sharded.N if self.sharded is not None else 1

    @property
    def plan(self) -> Optional[Plan]:
        return self.sharded.plan if self.sharded is not None else None

    @property
    def shards(self) -> list[dict[str, Lazy]]:
        return self.sharded.shards if self.sharded is not None else []

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self.canonical.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The tensors' dtype (one for all once `check` has passed; every reader checks)."""
        return next(iter(self.canonical.values())).dtype

    def check(self) -> "Checkpoint":
        """Canonical names and shapes as the config implies, one dtype; ConvertError otherwise."""
        check_tensors(self.cfg, {k: (t.shape, t.dtype) for k, t in self.canonical.items()}, self.where)
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.canonical.values())

    @property
    def where(self) -> str:
        """How messages name the source."""
        return self.remote or str(self.path)

    def describe(self) -> str:
        if self.plan is not None:
            return f"Accessory {self.kind} layout, {self.N} rank{'s' * (self.N > 1)}"
        if len(self.files) == 1 and self.kind == "torrent":
            return f"{self.label} ({self.files[0].name})"
        names = ", ".join(f.name for f in self.files[:3])
        return f"{self.label} ({names}" + (f", ... {len(self.files)} files)" if len(self.files) > 3 else ")")

    def source_info(self) -> dict:
        """The source's identity, as the manifest records it: each file's identity as recorded when it
        was opened (what the output's publication was conditional on), its size when it was not opened."""
        seen = {os.path.realpath(f.path): f.identity for f in self.sources}
        info = {"path": self.remote or str(self.path.resolve()), "format": self.kind,
                "files": {f.name: seen[os.path.realpath(f)] if os.path.realpath(f) in seen else f.stat().st_size
                          for f in self.files}}
        if self.source_dtype is not None:
            info["dtype"] = dtype_name(self.source_dtype)
        if self.lossy is not None:
            info["lossy"] = self.lossy
        return info


@dataclass(frozen=True)
class Reader:
    """A source format. `claims(dir, names)` says whether the directory (whose file names are
    `names`) is in this format; `open(dir, names)` reads it (descriptions only, no tensor data).
    Two formats named in `conflicts` must not both claim one directory (`conflict_why` says why).
    A `single_file` reader reads one file instead (an archive, a GGUF file): `claims(file, None)`
    and `open(file, None)`. A reader with `on_base` reads saves that hold only what a finetune
    changed (an adapter): `on_base(dir, names, base)` opens one on top of the model it was trained
    from (`--base`), `on_base_what` says what such a save is."""

    name: str
    what: str  # for "no checkpoint found": what files make this format
    claims: Callable[[Path, Optional[set[str]]], bool]
    open: Callable[[Path, Optional[set[str]]], Checkpoint]
    conflicts: tuple[str, ...] = ()
    conflict_why: str = "multiple formats, which Accessory rejects"
    single_file: bool = False
    on_base: Optional[Callable[[Path, set[str], Checkpoint], Checkpoint]] = None
    on_base_what: str = ""


@dataclass(frozen=True)
class TargetOption:
    """A command-line option a target declares (`merge --to NAME --FLAG VALUE`): given, `parse(text)`
    is passed to the target's `prepare` and `plan` as keyword `dest`; not given, `default` is parsed
    (None: the keyword is None)."""

    flag: str  # "--max-shard-size"
    dest: str  # "max_shard_size"
    help: str
    metavar: str = "VALUE"
    parse: Callable[[str], Any] = str
    default: Optional[str] = None


CAST_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TargetPlan:
    """What a target writes, computed once per run from shapes (the tokenizer and the layout of the files
    included): `files`, each (name, exact size, what it holds), is what --dry-run prints and the space check
    adds up; `write(tmp, progress)` writes exactly those files into the temporary directory `tmp` and returns
    their manifest entries {name: {size, sha256}}."""

    files: list[tuple[str, int, str]]
    write: Callable[[Path, Any], dict[str, dict]]


@dataclass(frozen=True)
class Target:
    """An output format of merge. `plan(ck, **options)` (a TargetPlan) says what it writes and how, once
    per run, writing nothing; the plan's `write` then writes it. Before that, `prepare(ck, options)`
    checks what the target needs of the source and returns the options resolved (e.g. the context
    length from the source when not given).

    What it can hold is declared, so that a refusal is one check in one place: `dtypes` (what
    `--dtype` may name), `holds_biases` (whether the format has bias tensors on the linears), and
    `same_kinds` (source kinds already in this format: merging one to it is refused)."""

    name: str
    suffix: str  # default output: SOURCE + suffix
    plan: Callable[..., TargetPlan]
    help: str = ""  # one line for --to's help
    options: tuple[TargetOption, ...] = ()
    prepare: Optional[Callable[[Checkpoint, dict], dict]] = None
    dtypes: tuple[str, ...] = CAST_DTYPES
    holds_biases: bool = False
    same_kinds: tuple[str, ...] = ()
    # The writer applies --dtype itself (given as the option `dtype`; the checkpoint is not cast
    # first): GGUF keeps norms and the router in F32 from the source's values, and quantizes.
    applies_dtype: bool = False
    # "dir": the output is a directory; "file": the output names a file (PATH.gguf: llama.cpp and Ollama
    # take a file), written with its pieces and manifest beside it (io.beside), the option `out_name` its name
    output: str = "dir"

    def resolve(self, ck: Checkpoint, given: dict[str, Optional[str]]) -> dict[str, Any]:
        """This target's options from the command line's (`dest` -> text, or None when not given),
        parsed (defaults applied) and prepared. Options of other targets are not looked at: the
        registry refuses them (`registry.target_options`)."""
        options = {}
        for o in self.options:
            text = given.get(o.dest)
            text = o.default if text is None else text
            options[o.dest] = None if text is None else o.parse(text)
        return self.prepare(ck, options) if self.prepare is not None else options


def read_tensors(path: Path) -> dict[str, Lazy]:
    """A .pth/.pt (torch zip) or .safetensors file's tensors, as lazy tensors (nothing read)."""
    if Path(path).name.endswith(".safetensors"):
        return safetensorsfile.read_tensors(path)
    return torchzip.read_tensors(path)


def find_tokenizer(path: Path) -> Optional[Path]:
    """tokenizer.model, else the directory itself when it holds an HF tokenizer (tokenizer.files)."""
    return tokenizer.find(path)


def check_tensors(cfg: ModelConfig, found: dict[str, tuple], where: str) -> None:
    """Canonical names, shapes and one dtype, exactly as the config implies (optional tensors, the
    biases, may be present or not)."""
    expected = cfg.canonical_shapes(optional=True)
    required = cfg.canonical_shapes()
    missing = [k for k in required if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        raise ConvertError(f"{where}: {len(missing)} tensor(s) the config implies are missing, first "
                           f"'{missing[0]}'; the file does not match params.json (wrong n_layers or num_experts?)")
    if extra:
        raise ConvertError(f"{where}: {len(extra)} unexpected tensor(s), first '{extra[0]}'; "
                           "the file does not match params.json")
    for k, shape in expected.items():
        if k in found and tuple(found[k][0]) != shape:
            raise ConvertError(f"{where}: tensor '{k}' has shape {list(found[k][0])}, params.json implies "
                               f"{list(shape)}; the checkpoint and params.json disagree")
    dtypes = {}
    for k, (_, dt) in found.items():
        dtypes.setdefault(dt, k)
    if len(dtypes) > 1:
        desc = ", ".join(f"{str(dt).replace('torch.', '')} (e.g. '{k}')" for dt, k in dtypes.items())
        raise ConvertError(f"{where}: mixed dtypes {desc}; convert the checkpoint to a single dtype first")
