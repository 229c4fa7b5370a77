"""Direct I/O (io/direct.py, io/reads.py): output files written from aligned stage buffers with
O_DIRECT, ranges read once read past the page cache into reused buffers. The bytes must be the
page cache path's, whatever the pieces, and a refused or failing direct write or read must end
as the plain path does. The fixtures are small, so the tests lower the sizes at which direct
I/O starts: with the defaults only the benchmark's full-width tensors would take that path."""

import errno
import fcntl
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli

from mixtral_convert.errors import ConvertError
from mixtral_convert.io import buffers, direct, reads
from mixtral_convert.io.lazy import OnDisk
from mixtral_convert.io.manifest import MANIFEST

PTH = "consolidated.00.pth"


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    out, left = [], total
    while left:
        n = min(left, rng.choice([1, 7, 63, 4096, 5000, 8191, 8192, 20000]))
        out.append(rng.randbytes(n))
        left -= n
    return out


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.mark.parametrize("want_direct", [True, False])
def test_output_file_holds_every_piece_in_order(tmp_path, want_direct):
    """Pieces of every size, across stage buffers (8 KiB here) and ending mid-block: the file is
    their concatenation, by direct writes or plain ones."""
    pieces = _pieces(1, 300_001)
    with direct.OutputFile(tmp_path / "f", stage_bytes=8192, direct=want_direct) as out:
        if want_direct and not out.direct:
            pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
        assert out.direct is want_direct and _is_direct(out.fd) is want_direct
        for p in pieces:
            assert out.write(p) == len(p)
        assert out.finish(fsync=True) == 300_001
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_a_refused_direct_write_goes_on_with_plain_writes(tmp_path, monkeypatch):
    """A filesystem that takes the O_DIRECT flag but refuses the write (EINVAL): the same bytes,
    by plain writes from then on."""
    real, refused = direct._pwrite, []

    def pwrite(fd, view, at):
        if _is_direct(fd) and at >= 16384:
            refused.append(at)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, view, at)
    monkeypatch.setattr(direct, "_pwrite", pwrite)
    pieces = _pieces(2, 100_000)
    with direct.OutputFile(tmp_path / "f", stage_bytes=8192) as out:
        if not out.direct:
            pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
        for p in pieces:
            out.write(p)
        out.finish()
        assert refused and not out.direct and not _is_direct(out.fd)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("want_direct", [True, False])
def test_a_failed_write_reaches_the_caller(tmp_path, monkeypatch, want_direct):
    """ENOSPC on a write (on the writers' threads when direct) is raised to the caller as the
    OSError it was, at a later write or at finish."""
    real, calls = direct._pwrite, []

    def pwrite(fd, view, at):
        calls.append(at)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, view, at)
    monkeypatch.setattr(direct, "_pwrite", pwrite)
    with pytest.raises(OSError) as e, direct.OutputFile(tmp_path / "f", stage_bytes=8192, direct=want_direct) as out:
        for p in _pieces(3, 200_000):
            out.write(p)
        out.finish()
    assert e.value.errno == errno.ENOSPC and len(calls) > 3


# ----------------------------------------------------------------------------- reads
def test_direct_reads_give_the_bytes_of_any_range(tmp_path, monkeypatch):
    """Ranges at unaligned offsets and of unaligned lengths, to the file's last byte: the bytes
    a plain read gives, in reused buffers."""
    monkeypatch.setattr(reads, "DIRECT_MIN", 1)
    data = random.Random(4).randbytes(3 * 4096 + 123)
    (tmp_path / "f").write_bytes(data)
    f = reads.SourceFile(tmp_path / "f")
    if not f.direct:
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    for off, n in [(0, 4096), (1, 1), (4095, 2), (100, 8000), (5000, len(data) - 5000), (len(data) - 1, 1)]:
        got = f.read_direct(off, n)
        assert got is not None and got.numpy().tobytes() == data[off:off + n], (off, n)


def test_reused_buffers_come_back_and_the_pool_is_bounded(monkeypatch):
    monkeypatch.setattr(buffers, "_pool", [])
    monkeypatch.setattr(buffers, "_kept", 0)
    a = buffers.empty((1 << 20,), torch.uint8)
    where = a.data_ptr()
    view = a[10:20].view(torch.int16)
    del a
    assert buffers._kept == 0  # a view still holds it
    del view
    assert buffers._kept == 1 << 20
    b = buffers.empty((512, 1024), torch.bfloat16)  # the same size class: the same buffer
    assert b.data_ptr() == where and buffers._kept == 0
    del b
    many = [buffers.empty((1 << 20,), torch.uint8) for _ in range(buffers.KEEP_BYTES // (1 << 20) + 8)]
    del many
    assert buffers._kept <= buffers.KEEP_BYTES


def test_a_truncated_source_read_directly_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(reads, "DIRECT_MIN", 1)
    t = torch.arange(10_000, dtype=torch.float32)
    (tmp_path / "f").write_bytes(b"h" * 64 + t.numpy().tobytes())
    f = reads.SourceFile(tmp_path / "f")
    if not f.direct:
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    d = OnDisk(f, 64, t.shape, t.dtype)
    assert torch.equal(d.read(0, 10_000), t)
    os.truncate(tmp_path / "f", 20_000)
    with pytest.raises(ConvertError) as e:
        d.read(100, 9000)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'f'}: only ") and "(the file has 20000 bytes now, 40064 when it was opened)" \
        in msg and "re-download" in msg


# ----------------------------------------------------------------------------- whole commands
@pytest.fixture
def small_direct(monkeypatch):
    """Direct I/O from 4 KiB up, stage buffers of 8 KiB; counts the direct reads taken."""
    monkeypatch.setattr(reads, "DIRECT_MIN", 4096)
    monkeypatch.setattr(buffers, "POOLED", 4096)
    monkeypatch.setattr(direct, "STAGE_BYTES", 8192)
    taken = []
    real = reads.SourceFile.read_direct

    def read_direct(self, offset, n):
        got = real(self, offset, n)
        taken.append(got is not None)
        return got
    monkeypatch.setattr(reads.SourceFile, "read_direct", read_direct)
    return taken


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != MANIFEST}


@pytest.mark.parametrize("args", [("split", "-n", 2), ("split-sparse", "-n", 4), ("split", "-n", 4, "--write-ranks",
                                  "together"), ("merge", "--to", "hf", "--max-position-embeddings", 64)])
def test_direct_and_page_cache_outputs_are_identical(wide_src, tmp_path, capsys, monkeypatch, small_direct, args):
    src = tmp_path / "src"
    shutil.copytree(wide_src, src)
    monkeypatch.setenv("MIXTRAL_CONVERT_DIRECT_IO", "0")
    assert cli(args[0], src, *args[1:], "-o", tmp_path / "plain", "-q", capsys=capsys)[0] == 0
    assert not any(small_direct)  # the page cache throughout
    monkeypatch.setenv("MIXTRAL_CONVERT_DIRECT_IO", "1")
    assert cli(args[0], src, *args[1:], "-o", tmp_path / "direct", "-q", capsys=capsys)[0] == 0
    if not any(small_direct):
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    plain, direct_ = _files(tmp_path / "plain"), _files(tmp_path / "direct")
    assert plain.keys() == direct_.keys() and all(plain[k] == direct_[k] for k in plain)
    back = tmp_path / "back"  # and the round trip of the direct output, read directly too
    if args[0] != "merge":
        assert cli("merge", tmp_path / "direct", "-o", back, "-q", capsys=capsys)[0] == 0
        assert (back / PTH).read_bytes() == (src / PTH).read_bytes()


def test_eio_on_a_direct_read_is_one_line(wide_src, tmp_path, capsys, monkeypatch, small_direct):
    src = tmp_path / "src"
    shutil.copytree(wide_src, src)
    real, calls = reads._preadv, []

    def preadv(fd, bufs, off):
        calls.append(fd)
        if len(calls) > 5 and _is_direct(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, off)
    monkeypatch.setattr(reads, "_preadv", preadv)
    out = tmp_path / "out"
    code, _, err = cli("split", src, "-n", 2, "-o", out, capsys=capsys)
    if not any(small_direct):
        pytest.skip(f"{tmp_path}: the filesystem refuses O_DIRECT")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {src / PTH}: cannot read ") and "(Input/output error)" in lines[0]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["src"]


def test_what_the_ranks_read_through_the_page_cache(wide_src, monkeypatch, small_direct):
    """--write-ranks auto decides by the bytes read through the page cache: with direct reads,
    only the tensors read in bands of columns (wo and the embedding; the sparse layout's w2 too),
    without them every tensor rank 0 reads."""
    from mixtral_convert.commands.split import cached_bytes
    from mixtral_convert.formats.registry import open_checkpoint
    from mixtral_convert.model.layouts import Plan

    monkeypatch.setattr(reads, "DIRECT_MIN", 1)  # every contiguous range, however small
    ck = open_checkpoint(wide_src)
    if not next(iter(ck.canonical.values())).file.direct:
        pytest.skip(f"{wide_src}: the filesystem refuses O_DIRECT")
    size = {k: v.nbytes for k, v in ck.canonical.items()}
    bands = sum(n for k, n in size.items() if k.endswith("attention.wo.weight") or k == "tok_embeddings.weight")
    w2 = sum(n for k, n in size.items() if k.endswith(".w2.weight"))
    assert cached_bytes(Plan("base", ck.cfg, 2, ck.dtypes), ck) == bands
    assert cached_bytes(Plan("sparse", ck.cfg, 2, ck.dtypes), ck) == bands + w2
    monkeypatch.setenv("MIXTRAL_CONVERT_DIRECT_IO", "0")
    ck = open_checkpoint(wide_src)
    experts_of_rank_0 = sum(n for k, n in size.items() if ".experts." in k and int(k.split(".")[4]) < 4)
    rest = sum(n for k, n in size.items() if ".experts." not in k)
    assert cached_bytes(Plan("base", ck.cfg, 2, ck.dtypes), ck) == experts_of_rank_0 + rest


def test_files_in_memory_take_the_page_cache_path(tmp_path):
    """On tmpfs the page cache is the file: direct I/O would only add a copy, so it is not used."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if reads._fs_type(fd) not in reads._IN_MEMORY:
            pytest.skip("/dev/shm is not tmpfs")
    finally:
        os.close(fd)
    d = Path(shm / f"mixtral-convert-test-{os.getpid()}")
    d.mkdir()
    try:
        with direct.OutputFile(d / "f") as out:
            out.write(b"x" * 10_000)
            out.finish()
            assert not out.direct and not _is_direct(out.fd)
        assert not reads.SourceFile(d / "f").direct
        with direct.OutputFile(tmp_path / "f") as out:  # beside it, on the disk, the direct path
            assert out.direct == reads.direct_io_wanted(out.fd)
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("block_bytes", [64, 200, 1000, 10**6])
def test_blocks_of_a_tensor_made_of_transposed_bands(block_bytes):
    """A canonical w2 assembled from N ranks' pieces (each a transposed band of columns) is
    produced in groups of blocks handed out as views: the blocks, in order, are the tensor,
    whatever the block size (a group may end on a short block)."""
    from mixtral_convert.io.lazy import Assembled, Placement, Stored

    dim, hidden, N = 12, 20, 4
    want = torch.randn(dim, hidden).to(torch.bfloat16)
    hs = hidden // N
    pieces = [Stored(want[:, r * hs:(r + 1) * hs].t().contiguous()) for r in range(N)]  # each rank's (hs, dim)
    a = Assembled((dim, hidden), torch.bfloat16,
                  [Placement((0, dim, r * hs, (r + 1) * hs), pieces[r], (0, hs, 0, dim), transpose=True)
                   for r in range(N)])
    blocks = list(a.blocks(block_bytes))
    assert all(b.shape[1] == hidden for b in blocks) and len(blocks) >= min(dim, dim * hidden * 2 // block_bytes)
    assert torch.equal(torch.cat(blocks).view(torch.int16), want.view(torch.int16))
