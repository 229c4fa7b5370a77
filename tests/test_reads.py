"""The read layer (io/reads.py): source bytes come from positioned reads, a failing read is one
line naming the file and the offset, and a source that changes during a run is refused."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli, load, same_bytes
from safetensors.torch import save_file

from mixtral_convert.io import reads
from mixtral_convert.io.atomic import MARKER
from mixtral_convert.io.lazy import OnDisk
from mixtral_convert.io.manifest import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
PTH = "consolidated.00.pth"


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists() and not (parent / f".{out.name}{MARKER}").exists(), sorted(os.listdir(parent))


@pytest.fixture
def src(wide_src, tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(wide_src, d)
    os.utime(d / PTH, ns=(10**18, 10**18))  # an mtime in the past: any rewrite now changes it
    return d


@pytest.fixture
def st_src(wide_src, tmp_path) -> Path:
    """The same model as mistral-inference's consolidated.safetensors."""
    d = tmp_path / "st"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in load(wide_src / PTH).items()}, str(d / "consolidated.safetensors"))
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(wide_src / name, d / name)
    return d


# ----------------------------------------------------------------------------- the reads themselves
def test_views_read_the_bytes_they_describe(tmp_path):
    """Row slices, the transpose, narrow and wide column bands, 1-D and 0-D: the same bytes as
    the same view of the tensor in memory."""
    t = torch.randn(37, 300).to(torch.bfloat16)
    (tmp_path / "f").write_bytes(b"x" * 24 + t.view(-1).view(torch.uint8).numpy().tobytes())
    f = reads.SourceFile(tmp_path / "f")
    d = OnDisk(f, 24, t.shape, t.dtype)
    cases = [(d.read(3, 20), t[3:20]), (d.read(0, 37, 7, 9), t[:, 7:9]), (d.read(5, 30, 10, 290), t[5:30, 10:290]),
             (d[4:33].read(2, 9, 100, 150), t[4:33][2:9, 100:150]), (d.t().read(10, 200, 2, 30), t.t()[10:200, 2:30]),
             (d.t().read(299, 300), t.t()[299:300]), (d[36:37].read(0, 1, 0, 0), t[36:37, 0:0])]
    for got, want in cases:
        assert got.shape == want.shape and same_bytes(got, want)
    v = torch.arange(10, dtype=torch.float32)
    (tmp_path / "v").write_bytes(v.numpy().tobytes())
    g = reads.SourceFile(tmp_path / "v")
    assert same_bytes(OnDisk(g, 8, (7,), torch.float32).read(2, 5), v[4:7])
    assert OnDisk(g, 12, (), torch.float32).read(0, 1).tolist() == [3.0]


def test_partial_reads_are_continued(src, tmp_path, capsys, monkeypatch):
    """preadv may return fewer bytes than asked: the rest is read, and the output is the same."""
    assert cli("split-sparse", src, "-n", 2, "-o", tmp_path / "a", "-q", capsys=capsys)[0] == 0
    real = reads._preadv
    monkeypatch.setattr(reads, "_preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))
    assert cli("split-sparse", src, "-n", 2, "-o", tmp_path / "b", "-q", capsys=capsys)[0] == 0
    for name in ("consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _failing(monkeypatch, after: int, fail):
    real, calls = reads._preadv, []

    def preadv(fd, bufs, off):
        calls.append(off)
        return fail(fd, bufs, off) if len(calls) > after else real(fd, bufs, off)

    monkeypatch.setattr(reads, "_preadv", preadv)
    return calls


def _eio(fd, bufs, off):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("cmd", ["split", "split-sparse"])
@pytest.mark.parametrize("which", ["pth", "safetensors"])
def test_eio_is_one_line_and_nothing_is_left(src, st_src, tmp_path, capsys, monkeypatch, cmd, which):
    """An I/O error on a source read (a failing disk, a dropped network request) names the file,
    the offset and what to do; the temporary output is removed."""
    d, name = (src, PTH) if which == "pth" else (st_src, "consolidated.safetensors")
    calls = _failing(monkeypatch, 5, _eio)
    out = tmp_path / "out"
    code, _, err = cli(cmd, d, "-n", 2, "-o", out, capsys=capsys)
    line = one_line_error(err)
    assert code == 2 and len(calls) > 5
    assert line.startswith(f"error: {d / name}: cannot read ") and f"at offset {calls[5]} (Input/output error)" in line
    assert "check the disk" in line and "re-download" in line
    nothing_left(tmp_path, out)


def test_short_read_is_one_line(src, tmp_path, capsys, monkeypatch):
    """The file ends before the bytes its header promised (it shrank after it was opened)."""
    calls = _failing(monkeypatch, 3, lambda fd, bufs, off: 0)
    out = tmp_path / "out"
    code, _, err = cli("merge", src, "--to", "hf", "--max-position-embeddings", 64, "-o", out, capsys=capsys)
    line = one_line_error(err)
    assert code == 2
    size = (src / PTH).stat().st_size
    assert line.startswith(f"error: {src / PTH}: only 0 of ") and f"at offset {calls[3]} (the file has {size} " in line
    nothing_left(tmp_path, out)


DRIVER = r"""
import os, sys
from mixtral_convert.commands import options
from mixtral_convert.entry import main
real = options.open_checkpoint
def opened_then_truncated(path, **kw):
    ck = real(path, **kw)
    os.truncate(sys.argv[1], int(sys.argv[2]))  # as a second download or a sync tool would
    return ck
options.open_checkpoint = opened_then_truncated
main(sys.argv[3:])
"""


@pytest.mark.parametrize("which", ["pth", "safetensors"])
def test_source_truncated_after_opening(src, st_src, tmp_path, which):
    """Truncated once the checkpoint is opened: a mapped read would die of SIGBUS (exit 135, no
    message, the temporary directory left behind); a positioned read ends in one line."""
    d, name = (src, PTH) if which == "pth" else (st_src, "consolidated.safetensors")
    f = d / name
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(f), str(f.stat().st_size // 2), "split-sparse", str(d),
                        "-n", "2", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    line = one_line_error(r.stderr)
    assert line.startswith(f"error: {f}: only ") and " at offset " in line and "re-download" in line
    assert f"(the file has {f.stat().st_size} bytes now, " in line
    nothing_left(tmp_path, out)


# ----------------------------------------------------------------------------- a source that changes
def _rewrite_in_place(f: Path):
    """Overwrite some of `f`'s bytes in place (a second download into the same path)."""
    def change():
        with open(f, "r+b") as fh:
            fh.seek(f.stat().st_size // 2)
            fh.write(b"\x55" * 64)
    return change


def _replace(f: Path):
    """Put another file in its place (a sync tool's rename over it)."""
    def change():
        tmp = f.with_name(f.name + ".new")
        shutil.copy(f, tmp)
        os.replace(tmp, f)
    return change


def _changed_during_the_run(monkeypatch, change, after: int = 2):
    real, calls = reads._preadv, []

    def preadv(fd, bufs, off):
        calls.append(off)
        if len(calls) == after:
            change()
        return real(fd, bufs, off)

    monkeypatch.setattr(reads, "_preadv", preadv)
    return calls


@pytest.mark.parametrize("how,why", [(_rewrite_in_place, "it was modified (its mtime changed)"),
                                     (_replace, "it was replaced by another file (its inode changed)")])
@pytest.mark.parametrize("args", [("split", "-n", 2), ("split-sparse", "-n", 4), ("split", "-n", 2, "--ranks", 1)])
def test_split_of_a_source_modified_during_the_run_is_refused(src, tmp_path, capsys, monkeypatch, how, why, args):
    f = src / PTH
    calls = _changed_during_the_run(monkeypatch, how(f))
    out = tmp_path / "out"
    code, _, err = cli(args[0], src, *args[1:], "-o", out, capsys=capsys)
    line = one_line_error(err)
    assert code == 2 and len(calls) > 2
    assert line == (f"error: {f}: the source changed while it was read ({why}); the output would mix old and new "
                    "bytes, so nothing was written: wait until the file is complete, then run again")
    if "--ranks" in args:  # the shared directory may exist; no rank file, no manifest in it
        assert not any(n.endswith((".pth", MANIFEST)) for n in os.listdir(out))
    else:
        nothing_left(tmp_path, out)


def test_merge_of_shards_modified_during_the_run_is_refused(src, tmp_path, capsys, monkeypatch):
    assert cli("split-sparse", src, "-n", 2, "-o", tmp_path / "sh", "-q", capsys=capsys)[0] == 0
    f = tmp_path / "sh" / "consolidated.01-of-02.model.pth"
    _changed_during_the_run(monkeypatch, _rewrite_in_place(f), after=3)
    out = tmp_path / "merged"
    code, _, err = cli("merge", tmp_path / "sh", "-o", out, capsys=capsys)
    assert code == 2 and one_line_error(err).startswith(f"error: {f}: the source changed while it was read (it was "
                                                        "modified")
    nothing_left(tmp_path, out)


def test_verify_of_a_source_modified_while_compared_is_refused(src, tmp_path, capsys, monkeypatch):
    assert cli("split", src, "-n", 2, "-o", tmp_path / "sh", "-q", capsys=capsys)[0] == 0
    code, out, _ = cli("verify", tmp_path / "sh", "--source", src, capsys=capsys)
    assert code == 0 and "kept their size, mtime and inode while they were read" in out
    _changed_during_the_run(monkeypatch, _replace(src / PTH), after=3)
    code, _, err = cli("verify", tmp_path / "sh", "--source", src, capsys=capsys)
    assert code == 2 and one_line_error(err) == (
        f"error: {src / PTH}: the source changed while it was read (it was replaced by another file (its inode "
        "changed)); the comparison would mix old and new bytes, so nothing was proved: wait until the file is "
        "complete, then run again")


def test_manifest_records_the_identity_that_was_checked(src, tmp_path, capsys):
    assert cli("split", src, "-n", 2, "-o", tmp_path / "sh", "-q", capsys=capsys)[0] == 0
    m = json.loads((tmp_path / "sh" / MANIFEST).read_text())
    st = (src / PTH).stat()
    entry = m["source"]["files"][PTH]
    assert (entry["size"], entry["mtime_ns"], entry["inode"]) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert entry["mtime"] == "2001-09-09T01:46:40.000000000Z"  # 10**18 ns, as set by the fixture
    assert "found unchanged right before this output was renamed into place" in m["source"]["checked"]
    assert cli("merge", tmp_path / "sh", "-o", tmp_path / "m", "-q", capsys=capsys)[0] == 0
    files = json.loads((tmp_path / "m" / MANIFEST).read_text())["source"]["files"]
    for name, e in files.items():
        assert e["inode"] == (tmp_path / "sh" / name).stat().st_ino


# ----------------------------------------------------------------------------- sources on the Checkpoint
# --to gguf: tests/gguf/test_gguf.py
@pytest.mark.parametrize("to,extra", [("hf", ("--max-position-embeddings", "4096")), ("torrent", ())])
def test_merge_to_every_target_of_a_source_modified_during_the_run_is_refused(src, tmp_path, capsys, monkeypatch,
                                                                              to, extra):
    assert cli("split", src, "-n", 2, "-o", tmp_path / "sh", "-q", capsys=capsys)[0] == 0
    f = tmp_path / "sh" / "consolidated.00-of-02.model.pth"
    _changed_during_the_run(monkeypatch, _rewrite_in_place(f), after=3)
    out = tmp_path / ("m.gguf" if to == "gguf" else "m")
    code, _, err = cli("merge", tmp_path / "sh", "--to", to, "-o", out, *extra, capsys=capsys)
    assert code == 2 and one_line_error(err).startswith(f"error: {f}: the source changed while it was read (it was "
                                                        "modified")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["sh", "src"]


def test_concat_of_a_piece_replaced_during_the_run_is_refused(tmp_path, capsys, monkeypatch):
    from mixtral_convert.commands import concat
    whole = tmp_path / PTH
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, whole)
    data = whole.read_bytes()
    whole.unlink()
    for i in range(3):
        (tmp_path / f"{PTH}-split{i}").write_bytes(data[i * len(data) // 3:(i + 1) * len(data) // 3])
    piece = tmp_path / f"{PTH}-split1"
    real = concat._join

    def join_then_replace(*a, **k):
        got = real(*a, **k)
        _replace(piece)()  # the same bytes, another file: what was joined is no longer what lies there
        return got

    monkeypatch.setattr(concat, "_join", join_then_replace)
    code, _, err = cli("concat", tmp_path, capsys=capsys)
    assert code == 2 and one_line_error(err) == (
        f"error: {piece}: the source changed while it was read (it was replaced by another file (its inode "
        "changed)); the output would mix old and new bytes, so nothing was written: wait until the file is "
        "complete, then run again")
    assert not whole.exists()


def test_a_checkpoint_records_the_files_its_reader_opened(src, st_src, tmp_path, capsys):
    """No module-level registry: each Checkpoint carries the files it was opened from, each with
    its identity at opening; two checkpoints opened in one process keep their own."""
    from mixtral_convert.formats.registry import open_checkpoint
    assert cli("split-sparse", src, "-n", 2, "-o", tmp_path / "sh", "-q", capsys=capsys)[0] == 0
    a, b, c = open_checkpoint(src), open_checkpoint(st_src), open_checkpoint(tmp_path / "sh")
    assert [f.path for f in a.sources] == [src / PTH]
    assert [f.path for f in b.sources] == [st_src / "consolidated.safetensors"]
    assert sorted(f.path.name for f in c.sources) == ["consolidated.00-of-02.model.pth",
                                                       "consolidated.01-of-02.model.pth"]
    st = (src / PTH).stat()
    assert (a.sources[0].identity.size, a.sources[0].identity.inode) == (st.st_size, st.st_ino)
