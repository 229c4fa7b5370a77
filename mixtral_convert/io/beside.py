"""Output that is a file, not a directory: `PATH.gguf` (or its pieces `PATH-00001-of-0000K.gguf`)
with its manifest `PATH.gguf.mixtral-convert-manifest.json` beside it, never half-written.

llama.cpp, Ollama (`FROM ./model.gguf`) and LM Studio take a file, so the GGUF target's output
is named by its file. The files are written into a marked temporary directory beside it (the
same one `atomic` uses for a directory output: a killed run's is recognised and removed, a
live run's refused), then renamed into place with signals deferred: the pieces after the
first, the first (or only) file, then the manifest. On any error or interrupt the temporary
directory is removed and nothing is left. `--force` replaces only files the previous manifest
lists with the sizes it recorded; anything else in the way is refused by name.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConvertError
from . import atomic, reads, small
from . import manifest as mf
from .atomic import Preflight


def manifest_name(out: Path) -> str:
    return f"{out.name}.{mf.MANIFEST}"


def _previous(out: Path) -> dict:
    """The manifest an earlier run left beside `out` ({} when none)."""
    p = out.parent / manifest_name(out)
    if not p.is_file():
        return {}
    try:
        import json
        m = json.loads(p.read_text())
        return m.get("files") or {} if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def preflight(out: Path, names: list[str], force: bool = False, need_bytes: int = 0, dry: bool = False) -> Preflight:
    """Every check before anything is created, for the files `names` (beside `out`, the manifest
    added): each is absent, or (with --force) one the previous manifest lists at its size."""
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise ConvertError(f"{out}: is a directory; -o names the .gguf file (e.g. {out / 'model.gguf'})")
    tmp = atomic.temp_for(out)
    if tmp.exists() or tmp.is_symlink():
        atomic.remove_stale(tmp, "temporary output", remove=not dry)
    prev = _previous(out)
    for name in list(names) + [manifest_name(out)]:
        p = out.parent / name
        if not (p.exists() or p.is_symlink()):
            continue
        if not force:
            raise ConvertError(f"{p}: exists; choose another -o, or pass --force to replace what mixtral-convert "
                               "wrote there")
        if p.is_symlink() or not p.is_file() or (name != manifest_name(out) and
                                                 (prev.get(name) or {}).get("size") != p.stat().st_size):
            raise ConvertError(f"{p}: not a file the manifest beside it lists at its size, so mixtral-convert did "
                               "not write it; --force only replaces its own files: move it away or choose another -o")
    base = atomic.nearest_existing(out.parent)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: cannot create the output there (not a writable directory); choose another -o")
    free0 = atomic.check_space(out, base, need_bytes)
    return Preflight(out, base, free0, set(prev), {"files": prev})


@contextmanager
def atomic_output_files(out: Path, names: list[str], force: bool = False, need_bytes: int = 0,
                        sources: Iterable[reads.SourceFile] = ()) -> Iterator[Path]:
    """Yield a temporary directory to write `names` (and the manifest, `manifest_name(out)`) into;
    on success they are renamed beside `out` (once every file of `sources` is checked unchanged,
    as for atomic.atomic_output_dir), on any failure or interrupt it is removed."""
    pf = preflight(out, names, force, need_bytes)
    with atomic.staged(pf, need_bytes, sources, lambda tmp: _commit(tmp, pf.out, list(names), pf.ours)) as tmp:
        yield tmp


def _commit(tmp: Path, out: Path, names: list[str], old: set[str]) -> None:
    """The pieces after the first, then the first (llama.cpp's entry point), then the manifest;
    files of the previous output this one does not rewrite go last."""
    for name in names[1:] + names[:1] + [manifest_name(out)]:
        os.replace(tmp / name, out.parent / name)
    for name in old - set(names):
        if Path(name).name == name:
            (out.parent / name).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    small.fsync_dir(out.parent)
