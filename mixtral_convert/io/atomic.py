"""Output that is never half-written: a temporary sibling directory renamed into place.

Before anything is written: the output must be absent, empty, or (with --force) hold nothing
that looks like a checkpoint but was not written by this tool; the disk must have room for it.
The temporary sibling `.<out>.mixtral-convert-partial` carries a marker file, locked while its
run lives, so a later run recognises one left by a killed run as its own and removes it, and
refuses to touch one a live run is writing. On success, once the source files are checked to be
what they were when they were opened (io.reads: size, mtime_ns, inode), it is renamed into place; on any error
or interrupt it is removed, and an OSError while writing (ENOSPC above all) becomes one line
naming the output, with the bytes needed against the bytes free.

`--force` replaces only files that an earlier run of this tool wrote (plain names listed in the
manifest it left, with the size it recorded); it never deletes anything else.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from ..errors import ConvertError
from . import manifest as mf
from . import reads
from .manifest import MANIFEST, OUTPUT_SUFFIXES
from .progress import human_bytes
from .small import fsync_dir, json_bytes, write_small

MARKER = ".mixtral-convert-partial"
OLD = ".mixtral-convert-old"  # a previous output being swapped out under --force

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


def temp_for(out: Path) -> Path:
    return out.parent / f".{out.name}{MARKER}"


def _old_for(out: Path) -> Path:
    return out.parent / f".{out.name}{OLD}"


# ----------------------------------------------------------------------------- markers and locks
def _mark(tmp: Path) -> Optional[int]:
    """Create the marker and hold an exclusive lock on it for the life of this run."""
    fd = os.open(tmp / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a filesystem without locks: the pid below is the fallback
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _live_owner(marker: Path) -> Optional[str]:
    """A description of the live run holding `marker`, or None when it is stale."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None  # nobody holds it: the run that made it is gone
            except BlockingIOError:
                return "another mixtral-convert run"
            except OSError:
                pass
        try:  # no locks here: fall back to the pid written in it
            pid = int(os.read(fd, 32).split()[0])
            if pid != os.getpid():
                os.kill(pid, 0)
                return f"another mixtral-convert run (pid {pid})"
        except (ValueError, IndexError, ProcessLookupError):
            return None
        except PermissionError:
            return f"another process (pid {pid})"
        return None
    finally:
        os.close(fd)


def remove_stale(d: Path, what: str, remove: bool = True) -> None:
    """Remove a temporary or swapped-out directory a killed run of this tool left, or refuse
    (with `remove` False: only refuse where removing would be refused)."""
    if d.is_dir() and not d.is_symlink():
        if (d / MARKER).is_file():
            owner = _live_owner(d / MARKER)
            if owner:
                raise ConvertError(f"{d}: {owner} is writing this output now; wait for it to finish, or choose "
                                   "another -o")
            if remove:
                shutil.rmtree(d)
            return
        if not any(d.iterdir()):
            if remove:
                d.rmdir()  # killed between creating it and marking it
            return
    raise ConvertError(f"{d}: exists and was not made by mixtral-convert (no {MARKER} marker); it is in the "
                       f"way of the {what}: remove it or choose another -o")


@contextmanager
def _signals_blocked():
    """Defer SIGINT/SIGTERM while a few renames or a cleanup run: they are handled right after."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ----------------------------------------------------------------------------- the output directory
def _check_existing(out: Path, force: bool) -> tuple[set[str], Optional[dict]]:
    """What of `out` this run may replace: (names, previous manifest)."""
    if not (out.exists() and any(out.iterdir())):
        return set(), None
    if not force:
        raise ConvertError(f"{out}: exists and is not empty; choose another -o, or pass --force to "
                           "replace what mixtral-convert wrote there")
    ours, prev = mf.owned_names(out)
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ours and p.name != MARKER and p.name.endswith(OUTPUT_SUFFIXES))
    if foreign:
        raise ConvertError(f"{out}: holds '{foreign[0]}' which mixtral-convert did not write; --force "
                           "only replaces its own files: move it away or choose another -o")
    for name in sorted(ours):
        p = out / name
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() or not p.is_file():
            raise ConvertError(f"{p}: is not a regular file, so mixtral-convert did not write it; --force only "
                               "replaces its own files: move it away or choose another -o")
        if name != MANIFEST and not prev.get("incomplete") and p.stat().st_size != prev["files"][name]["size"]:
            raise ConvertError(f"{p}: {p.stat().st_size} bytes, not the {prev['files'][name]['size']} "
                               "mixtral-convert wrote (changed since); --force only replaces its own files: "
                               "move it away or choose another -o")
    return ours | {MARKER}, prev


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: the directory whose disk an output lands on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_space(out: Path, base: Path, need: int, freed: int = 0) -> Optional[int]:
    """The bytes free on `base`'s disk (None: unknown); ConvertError naming `out` when they, plus
    `freed` (what the files the run replaces hold), are fewer than `need`. The one free-space check."""
    free = _free(base)
    if need and free is not None and free + freed < need:
        also = f" (+{human_bytes(freed)} in the files it replaces)" if freed else ""
        raise ConvertError(f"{out}: not enough free space on {base}: {human_bytes(need)} needed (it needs {need} "
                           f"bytes), {human_bytes(free)} free ({free} bytes){also}; free some space or choose "
                           "another -o")
    return free


def _space(need: int, free: Optional[int], now: Optional[int] = None) -> str:
    parts = []
    if need:
        parts.append(f"{human_bytes(need)} needed")
    if free is not None:
        parts.append(f"{human_bytes(free)} free" + (" at the start" if now is not None else ""))
    if now is not None:
        parts.append(f"{human_bytes(now)} free when it ran out")
    return f" ({', '.join(parts)})" if parts else ""


def _under(name, root: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(name))).is_relative_to(root)
    except (TypeError, ValueError):
        return False


def write_error(e: BaseException, out: Path, tmp: Path, need: int, free0, free_now) -> Optional[ConvertError]:
    """The one-line error for an OSError raised while writing `out`; None if it is not about the output."""
    if not isinstance(e, OSError):
        return None
    if e.filename and not (_under(e.filename, tmp) or _under(e.filename, out)):
        return None  # e.g. reading the source: named by the caller
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"{out}: no space left on device while writing{_space(need, free0, free_now)}; "
                            "nothing was left behind: free some space or choose another -o")
    return ConvertError(f"{out}: cannot write the output ({e.strerror or e}); nothing was left behind: "
                        "choose another -o")


@dataclass
class Preflight:
    """What `preflight` found: the output may be written there (else it raised)."""

    out: Path
    base: Path  # the nearest existing directory on the output's path: the disk that receives it
    free: Optional[int]  # bytes free there (None: unknown)
    ours: set
    prev: Optional[dict]


def preflight(out: Path, force: bool = False, need_bytes: int = 0, dry: bool = False) -> Preflight:
    """Every check `atomic_output_dir` makes before it creates anything (ConvertError naming the
    output and the fix when one fails). Creates nothing; removes a stale temporary directory a
    killed run of this tool left, unless `dry`."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory; choose another -o")
    tmp, old = temp_for(out), _old_for(out)
    for d, what in ((tmp, "temporary output"), (old, "replaced output")):
        if d.exists() or d.is_symlink():
            remove_stale(d, what, remove=not dry)
    ours, prev = _check_existing(out, force)
    base = nearest_existing(out.parent)
    if not base.is_dir():
        raise ConvertError(f"{out.parent}: '{base}' is not a directory; choose another -o")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "Permission denied"
        try:
            if os.statvfs(base).f_flag & os.ST_RDONLY:
                why = "Read-only file system"
        except OSError:
            pass
        raise ConvertError(f"{out}: cannot create the output there ({why}); choose another -o")
    free0 = check_space(out, base, need_bytes)
    return Preflight(out, base, free0, ours, prev)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, need_bytes: int = 0,
                      sources: Iterable[reads.SourceFile] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes `out`, on any failure or
    interrupt it is removed. Everything is checked before anything is created; right before the
    rename, every file of `sources` must still be the file it was when it was opened (else
    `reads.SourceChanged`, and nothing is published)."""
    pf = preflight(out, force, need_bytes)
    old = _old_for(pf.out)
    with staged(pf, need_bytes, sources, lambda tmp: _commit(tmp, pf.out, old, pf.ours, pf.prev)) as tmp:
        yield tmp


@contextmanager
def staged(pf: Preflight, need_bytes: int, sources: Iterable[reads.SourceFile],
           commit: Callable[[Path], None]) -> Iterator[Path]:
    """The marked temporary directory beside `pf.out` (and the missing parents) created and
    yielded; then every file of `sources` checked unchanged and `commit(tmp)` publishes it, signals
    blocked. On any failure or interrupt the directory and the parents it created are removed, and
    an OSError about the output becomes one line (`write_error`)."""
    sources = list(sources)
    out = pf.out
    tmp = temp_for(out)
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    lock = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        lock = _mark(tmp)
    except OSError as e:
        with _signals_blocked():
            _cleanup(tmp, created)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(f"{out}: no space left on device{_space(need_bytes, pf.free)}; free some space or "
                               "choose another -o") from None
        raise ConvertError(f"{out}: cannot create the output there ({e.strerror or e}); choose another -o") from None
    try:
        yield tmp
        with _signals_blocked():
            reads.check_unchanged(sources)
            commit(tmp)
    except BaseException as e:
        free_now = _free(pf.base)
        with _signals_blocked():
            _cleanup(tmp, created)
        mapped = write_error(e, out, tmp, need_bytes, pf.free, free_now)
        if mapped is not None:
            raise mapped from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _cleanup(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in created:  # parents this run created, deepest first, if still empty
        try:
            d.rmdir()
        except OSError:
            break


def _commit(tmp: Path, out: Path, old: Path, ours: set[str], prev: Optional[dict]) -> None:
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
    elif all(p.name in ours for p in out.iterdir()):
        # only our earlier output: swap whole directories, then drop the old one
        (out / MARKER).touch()
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _replace_in_place(tmp, out, ours, prev)
    (out / MARKER).unlink(missing_ok=True)
    fsync_dir(out)
    fsync_dir(out.parent)


def _replace_in_place(tmp: Path, out: Path, ours: set[str], prev: Optional[dict]) -> None:
    """--force over a directory that also holds foreign, harmless files (kept). Not one rename:
    first a manifest marked incomplete that lists the old and the new files (so an interrupted
    replacement is neither mistaken for a complete output nor refused by the next --force),
    then the new files, then the stale old ones go, and the new manifest comes last."""
    new = mf.read(tmp)
    union = dict(prev["files"]) if prev else {}
    union.update(new["files"])
    interim = dict(new, files=union, incomplete=True)
    write_small(out / (MANIFEST + ".tmp"), json_bytes(interim))
    os.replace(out / (MANIFEST + ".tmp"), out / MANIFEST)
    for name in new["files"]:
        os.replace(tmp / name, out / name)
    for name in ours - set(new["files"]) - {MANIFEST, MARKER}:
        (out / name).unlink(missing_ok=True)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    shutil.rmtree(tmp)


@contextmanager
def atomic_file(path: Path, tmp: Optional[Path] = None, sources: Iterable[reads.SourceFile] = ()) -> Iterator[Path]:
    """Yield a temporary sibling path (`tmp`, or a hidden name with this process's id); it
    replaces `path` on success (once every file of `sources` is checked unchanged, as for
    `atomic_output_dir`) and is removed on failure or interrupt."""
    tmp = tmp if tmp is not None else path.parent / f".{path.name}.{os.getpid()}{MARKER}"
    sources = list(sources)
    try:
        yield tmp
        reads.check_unchanged(sources)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
