"""`mixtral-convert concat`: ordering, refusals, checksums, the checkpoint check, cleanup."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import cut_bytes

from mixtral_convert import entry as cli
from mixtral_convert.commands import concat as op
from mixtral_convert.io import direct

ROOT = Path(__file__).resolve().parents[2]
BASE = "consolidated.00.pth"


# ----------------------------------------------------------------------------- helpers

def make_checkpoint(path: Path, scale: int = 1, seed: int = 0) -> bytes:
    """A small real torch checkpoint with several tensors of a few dtypes; returns its bytes."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "tok_embeddings.weight": torch.randn(64 * scale, 32, generator=g).to(torch.bfloat16),
        "norm.weight": torch.ones(32),
        "layers.0.attention.wq.weight": torch.randn(32 * scale, 32, generator=g),
        "layers.0.feed_forward.gate.weight": torch.randn(4, 32, generator=g).half(),
        "layers.0.feed_forward.experts.0.w1.weight": torch.randn(48 * scale, 32, generator=g),
        "output.weight": torch.randn(64 * scale, 32, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7),
    }
    torch.save(state, path)
    return path.read_bytes()


def cut(data: bytes, n: int, directory: Path, base: str = BASE, pad: int = 0) -> list[Path]:
    """Cut data into n byte pieces named base-split0.. (suffix zero-padded to `pad` digits)."""
    return cut_bytes(data, n, directory, lambda i: f"{base}-split{i:0{pad}d}")


def run(argv, capsys):
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGTERM, old)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry of `directory` with its size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()} if directory.is_dir() else {}


def no_leftovers(directory: Path, output: Path | None = None, before: dict | None = None) -> None:
    """No partial file in `directory`; `output` absent (when given); and, given the listing from
    before the run, nothing created, removed or changed there."""
    left = [p.name for p in directory.iterdir() if p.name.endswith(op.PARTIAL_SUFFIX)]
    assert left == [], f"partial files left: {left}"
    if output is not None:
        assert not output.exists(), f"{output} was left behind"
    if before is not None:
        assert listing(directory) == before, f"{directory} changed: {sorted(set(listing(directory)) ^ set(before))}"


def refused(argv, capsys, *needles, directory: Path, output: Path | None = None) -> str:
    before = listing(directory)
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    no_leftovers(directory, output, before)
    return err


@pytest.fixture
def ckpt(tmp_path):
    """(bytes of a checkpoint, directory holding it cut into 10 pieces)."""
    src = tmp_path / "src.pth"
    data = make_checkpoint(src)
    src.unlink()
    d = tmp_path / "release"
    cut(data, 10, d)
    return data, d


def digests(data: bytes) -> tuple[str, str]:
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- success

def test_shuffled_12_pieces_joined_in_order_with_hashlib_hashes(tmp_path, capsys):
    data = make_checkpoint(tmp_path / "x.pth", scale=4)
    pieces = cut(data, 13, tmp_path / "p")
    shuffled = pieces[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != pieces
    code, out, err = run(["concat", *shuffled, "--hash", "md5", "--hash", "sha256"], capsys)
    assert code == 0, err
    joined = (tmp_path / "p" / BASE).read_bytes()
    assert joined == data
    md5, sha = digests(joined)
    assert f"md5     {md5}\n" in out and f"sha256  {sha}\n" in out
    assert "7 tensors" in out
    no_leftovers(tmp_path / "p")


def test_numeric_order_split10_after_split9(tmp_path, capsys):
    data = make_checkpoint(tmp_path / "x.pth", scale=2)
    cut(data, 12, tmp_path / "p")  # split0..split11, unpadded: lexical order would be wrong
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names.index(f"{BASE}-split10") < names.index(f"{BASE}-split2")
    code, out, err = run(["concat", tmp_path / "p", "-o", tmp_path / "out.pth"], capsys)
    assert code == 0, err
    assert (tmp_path / "out.pth").read_bytes() == data


def test_find_pieces_orders_by_number(tmp_path):
    order = [10, 2, 0, 9, 1, 11, 3, 4, 5, 6, 7, 8]
    for i in order:
        (tmp_path / f"{BASE}-split{i}").write_bytes(b"x")
    got = op.find_pieces([tmp_path / f"{BASE}-split{i}" for i in order])
    assert [p.name for p in got] == [f"{BASE}-split{i}" for i in range(12)]
    assert op.default_output(got) == tmp_path / BASE


def test_directory_input_default_output_and_split_hint(ckpt, capsys):
    data, d = ckpt
    (d / "params.json").write_text("{}")
    (d / "tokenizer.model").write_bytes(b"x")
    (d / "README").write_text("not a piece")
    code, out, err = run(["concat", d], capsys)
    assert code == 0, err
    assert (d / BASE).read_bytes() == data
    assert f"`mixtral-convert split {d}` can now run" in out
    assert all((d / f"{BASE}-split{i}").exists() for i in range(10))


def test_no_hint_without_params_and_tokenizer(ckpt, capsys):
    data, d = ckpt
    code, out, err = run(["concat", d], capsys)
    assert code == 0 and "split" not in out.replace("-split", "")


def test_quiet_prints_only_hashes(ckpt, capsys):
    """With no checksum to compare, sha256 alone is computed and printed."""
    data, d = ckpt
    code, out, err = run(["concat", d, "--quiet"], capsys)
    md5, sha = digests(data)
    assert code == 0 and err == ""
    assert out == f"sha256  {sha}\n"


@pytest.mark.parametrize("given,printed", [
    (["--sha256", "SHA"], ["sha256"]), (["--md5", "MD5"], ["md5"]),
    (["--md5", "MD5", "--sha256", "SHA"], ["md5", "sha256"]),
    (["--hash", "md5"], ["md5", "sha256"]), (["--md5", "MD5", "--hash", "sha256"], ["md5", "sha256"]),
])
def test_only_the_hashes_needed_are_computed(ckpt, capsys, monkeypatch, given, printed):
    """md5 is computed only when a checksum needs it or --hash asks for it (it runs on one core,
    slower than the disk); sha256 likewise, and alone when nothing is given."""
    import hashlib as real
    data, d = ckpt
    md5, sha = digests(data)
    computed = []

    class Spy:
        def __getattr__(self, name):
            if name in ("md5", "sha256"):
                computed.append(name)
            return getattr(real, name)
    monkeypatch.setattr(op, "hashlib", Spy())
    argv = ["concat", d, "--force", "-q"] + [{"MD5": md5, "SHA": sha}.get(a, a) for a in given]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(computed) == printed
    assert out == "".join(f"{k:<8}{ {'md5': md5, 'sha256': sha}[k] }\n" for k in printed)


def test_output_into_directory(ckpt, tmp_path, capsys):
    data, d = ckpt
    (tmp_path / "dest").mkdir()
    code, out, err = run(["concat", d, "-o", tmp_path / "dest"], capsys)
    assert code == 0, err
    assert (tmp_path / "dest" / BASE).read_bytes() == data
    assert not (d / BASE).exists()


# ----------------------------------------------------------------------------- refusals

def test_gap_refused_naming_the_missing_piece(ckpt, capsys):
    data, d = ckpt
    (d / f"{BASE}-split4").unlink()
    refused(["concat", d], capsys, f"{BASE}-split4", "missing", directory=d, output=d / BASE)


def test_missing_first_piece_refused(ckpt, capsys):
    data, d = ckpt
    (d / f"{BASE}-split0").unlink()
    refused(["concat", d], capsys, f"{BASE}-split0", directory=d, output=d / BASE)


def test_missing_piece_when_files_given(ckpt, capsys):
    data, d = ckpt
    files = [d / f"{BASE}-split{i}" for i in range(10) if i != 7]
    refused(["concat", *files], capsys, f"{BASE}-split7", directory=d, output=d / BASE)


def test_duplicate_index_refused(ckpt, capsys):
    data, d = ckpt
    (d / f"{BASE}-split03").write_bytes((d / f"{BASE}-split3").read_bytes())
    refused(["concat", d], capsys, "duplicate piece index 3", f"{BASE}-split03",
            directory=d, output=d / BASE)


def test_same_piece_given_twice_refused(ckpt, capsys):
    data, d = ckpt
    refused(["concat", d, d / f"{BASE}-split2"], capsys, "duplicate piece",
            f"{BASE}-split2", directory=d, output=d / BASE)


def test_mixed_base_names_refused(ckpt, capsys):
    data, d = ckpt
    (d / "other.pth-split10").write_bytes(b"abc")
    refused(["concat", d], capsys, "different files", "other.pth-split*", f"{BASE}-split*",
            directory=d, output=d / BASE)


def test_empty_piece_refused(ckpt, capsys):
    data, d = ckpt
    (d / f"{BASE}-split6").write_bytes(b"")
    refused(["concat", d], capsys, "empty piece", f"{BASE}-split6", directory=d, output=d / BASE)


def test_not_a_piece_and_missing_input_refused(ckpt, tmp_path, capsys):
    data, d = ckpt
    (tmp_path / "notes.txt").write_text("x")
    refused(["concat", tmp_path / "notes.txt"], capsys, "notes.txt", "-splitN", directory=d)
    refused(["concat", tmp_path / "nope"], capsys, "no such file", directory=d)
    (tmp_path / "emptydir").mkdir()
    refused(["concat", tmp_path / "emptydir"], capsys, "no '*-splitN' pieces", directory=d)


@pytest.mark.parametrize("which,why", [(0, "100 bytes missing"), (4, "100 bytes missing"),
                                       (9, "no zip end record")])
def test_truncated_piece_caught_without_checksum(ckpt, capsys, which, why):
    data, d = ckpt
    p = d / f"{BASE}-split{which}"
    p.write_bytes(p.read_bytes()[:-100])
    err = refused(["concat", d], capsys, "not a loadable torch checkpoint", why, directory=d,
                  output=d / BASE)
    assert "nothing was written" in err


def test_piece_with_extra_bytes_caught_without_checksum(ckpt, capsys):
    data, d = ckpt
    p = d / f"{BASE}-split5"
    p.write_bytes(p.read_bytes() + b"\0" * 64)
    refused(["concat", d], capsys, "not a loadable torch checkpoint", "64 extra bytes", directory=d,
            output=d / BASE)


def test_not_a_zip_caught(tmp_path, capsys):
    d = tmp_path / "p"
    cut(os.urandom(100_000), 3, d)
    refused(["concat", d], capsys, "no zip end record", directory=d, output=d / BASE)


def test_not_a_dict_of_tensors_caught(tmp_path, capsys):
    torch.save([torch.ones(3), torch.zeros(2)], tmp_path / "x.pth")
    d = tmp_path / "p"
    cut((tmp_path / "x.pth").read_bytes(), 3, d)
    refused(["concat", d], capsys, "dict of tensors", directory=d, output=d / BASE)


def test_short_tensor_record_caught(tmp_path, capsys):
    """A zip that is well formed but whose data/N record holds fewer bytes than its tensor."""
    make_checkpoint(tmp_path / "x.pth")
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(tmp_path / "x.pth") as zin, \
            zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        shortened = None
        for info in zin.infolist():
            body = zin.read(info)
            if shortened is None and "/data/" in info.filename and len(body) > 64:
                body, shortened = body[:-16], info.filename
            zout.writestr(info.filename, body)
    assert shortened
    d = tmp_path / "p"
    cut(bad.read_bytes(), 3, d)
    refused(["concat", d], capsys, shortened, "its tensors need", directory=d, output=d / BASE)


# ----------------------------------------------------------------------------- checksums

def test_md5_and_sha256_match(ckpt, capsys):
    data, d = ckpt
    md5, sha = digests(data)
    code, out, err = run(["concat", d, "--md5", md5.upper(), "--sha256", sha], capsys)
    assert code == 0, err
    assert "md5 (--md5)" in out and "sha256 (--sha256)" in out


def test_wrong_md5_refused(ckpt, capsys):
    data, d = ckpt
    wrong = hashlib.md5(b"other").hexdigest()
    refused(["concat", d, "--md5", wrong], capsys, "md5 mismatch", wrong,
            hashlib.md5(data).hexdigest(), directory=d, output=d / BASE)


def test_wrong_sha256_refused(ckpt, capsys):
    data, d = ckpt
    wrong = hashlib.sha256(b"other").hexdigest()
    refused(["concat", d, "--sha256", wrong], capsys, "sha256 mismatch", wrong,
            directory=d, output=d / BASE)


def test_malformed_checksum_option_refused(ckpt, capsys):
    data, d = ckpt
    refused(["concat", d, "--md5", "abc"], capsys, "--md5", directory=d, output=d / BASE)
    refused(["concat", d, "--sha256", hashlib.md5(b"").hexdigest()], capsys, "--sha256",
            directory=d, output=d / BASE)


@pytest.mark.parametrize("style", ["md5sum", "sha256sum", "sha256sum-binary", "bsd"])
def test_checksums_file_match(ckpt, tmp_path, capsys, style):
    data, d = ckpt
    md5, sha = digests(data)
    line = {"md5sum": f"{md5}  {BASE}", "sha256sum": f"{sha}  ./{BASE}",
            "sha256sum-binary": f"{sha} *{BASE}", "bsd": f"SHA256 ({BASE}) = {sha}"}[style]
    sums = tmp_path / "SUMS"
    sums.write_text(f"# release\n{hashlib.md5(b'x').hexdigest()}  params.json\n{line}\n")
    code, out, err = run(["concat", d, "--checksums", sums], capsys)
    assert code == 0, err
    assert "SUMS line 3" in out


def test_checksums_file_mismatch(ckpt, tmp_path, capsys):
    data, d = ckpt
    sums = tmp_path / "SHA256SUMS"
    wrong = hashlib.sha256(b"other").hexdigest()
    sums.write_text(f"{wrong}  {BASE}\n")
    refused(["concat", d, "--checksums", sums], capsys, "sha256 mismatch", "SHA256SUMS line 1",
            directory=d, output=d / BASE)


def test_checksums_file_without_output_line(ckpt, tmp_path, capsys):
    data, d = ckpt
    sums = tmp_path / "SUMS"
    sums.write_text(f"{hashlib.md5(b'x').hexdigest()}  params.json\n")
    refused(["concat", d, "--checksums", sums], capsys, f"no md5 or sha256 line for '{BASE}'",
            "params.json", directory=d, output=d / BASE)


# ----------------------------------------------------------------------------- output handling

def test_existing_output_refused_without_force(ckpt, capsys):
    data, d = ckpt
    (d / BASE).write_bytes(b"old")
    refused(["concat", d], capsys, "already exists", "--force", directory=d)
    assert (d / BASE).read_bytes() == b"old"


def test_force_overwrites(ckpt, capsys):
    data, d = ckpt
    (d / BASE).write_bytes(b"old")
    code, out, err = run(["concat", d, "--force"], capsys)
    assert code == 0, err
    assert (d / BASE).read_bytes() == data


def test_force_keeps_old_output_when_checks_fail(ckpt, capsys):
    data, d = ckpt
    (d / BASE).write_bytes(b"old")
    refused(["concat", d, "--force", "--md5", "0" * 32], capsys, "md5 mismatch", directory=d)
    assert (d / BASE).read_bytes() == b"old"


def test_output_may_not_be_a_piece(ckpt, capsys):
    data, d = ckpt
    refused(["concat", d, "-o", d / f"{BASE}-split3", "--force"], capsys, "one of the pieces",
            directory=d)
    assert (d / f"{BASE}-split3").stat().st_size > 0


def test_remove_pieces_after_success(ckpt, capsys):
    data, d = ckpt
    code, out, err = run(["concat", d, "--remove-pieces"], capsys)
    assert code == 0, err
    assert (d / BASE).read_bytes() == data
    assert not any("-split" in p.name for p in d.iterdir())
    assert "removed the 10 pieces" in out


@pytest.mark.parametrize("how", ["md5", "truncated"])
def test_remove_pieces_not_after_failure(ckpt, capsys, how):
    data, d = ckpt
    argv = ["concat", d, "--remove-pieces"]
    if how == "md5":
        argv += ["--md5", "0" * 32]
    else:
        p = d / f"{BASE}-split2"
        p.write_bytes(p.read_bytes()[:-1])
    refused(argv, capsys, directory=d, output=d / BASE)
    assert len([p for p in d.iterdir() if "-split" in p.name]) == 10


def test_not_enough_space_refused(ckpt, capsys, monkeypatch):
    data, d = ckpt
    import shutil
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    refused(["concat", d], capsys, "not enough free space", f"needs {len(data)} bytes",
            "100 bytes", directory=d, output=d / BASE)


def test_disk_full_while_writing(ckpt, capsys, monkeypatch):
    data, d = ckpt
    import errno

    def full(fd, view, at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(direct, "_pwrite", full)
    refused(["concat", d, "--remove-pieces"], capsys, str(d / BASE), "No space left",
            directory=d, output=d / BASE)
    assert len([p for p in d.iterdir() if "-split" in p.name]) == 10


def test_stale_partial_file_replaced(ckpt, capsys):
    data, d = ckpt
    stale = op.partial_path(d / BASE)
    stale.write_bytes(b"left by a killed run" * 1000)
    code, out, err = run(["concat", d], capsys)
    assert code == 0, err
    assert (d / BASE).read_bytes() == data and not stale.exists()


def test_small_buffers_many_chunks(ckpt, capsys, monkeypatch):
    """The reader/writer/hasher pipeline with many buffers in flight gives the same bytes."""
    data, d = ckpt
    monkeypatch.setattr(op, "CHUNK", 1000)
    code, out, err = run(["concat", d, "-q", "--hash", "md5"], capsys)
    md5, sha = digests(data)
    assert code == 0 and out == f"md5     {md5}\nsha256  {sha}\n"
    assert (d / BASE).read_bytes() == data


# ----------------------------------------------------------------------------- signals

SLOW = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import mixtral_convert.commands.concat as c
    c.CHUNK = 64 << 10
    from mixtral_convert.io import direct
    direct.STAGE_BYTES = 64 << 10
    OutputFile = direct.OutputFile
    write = OutputFile.write
    def slow(self, view):
        time.sleep(0.05)
        return write(self, view)
    OutputFile.write = slow
    from mixtral_convert.entry import main
    main(sys.argv[1:])
""")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_copy_leaves_nothing(tmp_path, sig, code, word):
    data = make_checkpoint(tmp_path / "x.pth", scale=300)   # ~ 8 MiB: ~6 s when throttled
    (tmp_path / "x.pth").unlink()
    d = tmp_path / "p"
    pieces = cut(data, 10, d)
    partial = op.partial_path(d / BASE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "concat", str(d), "--remove-pieces"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "copy never started"
            time.sleep(0.01)
        assert partial.stat().st_size < len(data) // 2, "the throttle did not hold"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    # (click prints an empty line before turning Ctrl-C into Abort)
    assert err.strip().startswith("error: ") and word in err, err
    no_leftovers(d, d / BASE)
    assert all(p.read_bytes() for p in pieces), "pieces must stay"


def test_subprocess_entry_point(ckpt):
    data, d = ckpt
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mixtral_convert", "concat", str(d), "-q"],
                       env=env, capture_output=True, text=True)
    md5, sha = digests(data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sha256  {sha}\n"


def test_the_refusal_check_sees_a_file_left_behind(tmp_path):
    """`refused` compares the directory before and after: a joined file (or anything else) left
    behind fails it even when the test names no output."""
    d = tmp_path / "d"
    d.mkdir()
    (d / f"{BASE}-split0").write_bytes(b"x")
    before = listing(d)
    no_leftovers(d, None, before)  # nothing changed: passes
    (d / BASE).write_bytes(b"joined")
    with pytest.raises(AssertionError, match="changed"):
        no_leftovers(d, None, before)
