"""Interruption, a full or unwritable disk, stale and live temporary directories, and --force:
nothing half-written is ever left, nothing the tool did not write is ever deleted."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from helpers import cli, is_root

from mixtral_convert.io.atomic import MARKER
from mixtral_convert.synth import tiny_config, write_torrent

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "mixtral-convert-manifest.json"
# big enough that a split at N=8 is still writing for a while (~180 MB of bf16)
BIG = dict(dim=1024, hidden_dim=1792, n_heads=16, head_dim=64, n_kv_heads=8, num_experts=8, n_layers=2,
           vocab_size=256)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def temp_of(out: Path) -> Path:
    return out.parent / f".{out.name}{MARKER}"


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- signals
@pytest.fixture(scope="session")
def big_src(tmp_path_factory) -> Path:
    """Built once per test session, shared by the xdist workers (under a file lock)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    src = root / "big_src"
    with open(root / "big_src.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "big_src.done").exists():
            shutil.rmtree(src, ignore_errors=True)
            write_torrent(src, tiny_config(**BIG), seed=3)
            (root / "big_src.done").touch()
    return src


def start(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # SIGINT as a terminal delivers it (a background job inherits it ignored)
    return subprocess.Popen([sys.executable, "-m", "mixtral_convert", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_mid_write(p: subprocess.Popen, out: Path) -> None:
    """Wait until the run is writing shards into its temporary directory, then SIGSTOP it there,
    so that the signal under test is certain to land mid-write."""
    tmp = temp_of(out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if any(f.stat().st_size > 0 for f in tmp.glob("consolidated.*-of-08.model.pth")):
                os.kill(p.pid, signal.SIGSTOP)
                break
        except FileNotFoundError:
            pass
        if p.poll() is not None:
            pytest.fail(f"the run ended before it was caught writing: {p.returncode} {p.stderr.read()}")
        time.sleep(0.002)
    else:
        p.kill()
        pytest.fail("the run never started writing")
    assert tmp.is_dir() and (tmp / MARKER).is_file() and not out.exists()


@pytest.mark.parametrize("mode", ["in-turn", "together"])
@pytest.mark.parametrize("sig,code,line", [
    (signal.SIGINT, 130, "error: interrupted (SIGINT); nothing was left half-written"),
    (signal.SIGTERM, 143, "error: terminated (SIGTERM); nothing was left half-written"),
])
def test_signal_mid_write_removes_everything(big_src, tmp_path, sig, code, line, mode):
    """Also with the N files written together: the writer threads are stopped and joined before
    the temporary directory is removed."""
    out = tmp_path / "o"
    p = start("split", big_src, "-n", 8, "-o", out, "--write-ranks", mode)
    stop_mid_write(p, out)
    os.kill(p.pid, sig)
    os.kill(p.pid, signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr
    assert one_line_error(stderr) == line
    assert leftovers(tmp_path) == []  # neither the output nor its temporary directory


def test_sigkill_then_rerun_without_force(big_src, tmp_path, capsys):
    out = tmp_path / "o"
    p = start("split-sparse", big_src, "-n", 8, "-o", out)
    stop_mid_write(p, out)
    p.kill()
    p.communicate(timeout=60)
    assert leftovers(tmp_path) == [temp_of(out).name]  # only the marked temporary directory
    code, _, err = cli("split-sparse", big_src, "-n", 8, "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    assert leftovers(tmp_path) == ["o"]  # the stale temporary directory is gone
    assert cli("verify", out, "-q", capsys=capsys)[0] == 0


def test_live_runs_temp_dir_is_left_alone(wide_src, tmp_path, capsys):
    out = tmp_path / "o"
    tmp = temp_of(out)
    tmp.mkdir()
    (tmp / "consolidated.00-of-02.model.pth").write_bytes(b"being written")
    with open(tmp / MARKER, "w") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)  # as a live run holds it
        code, _, err = cli("split", wide_src, "-n", 2, "-o", out, capsys=capsys)
        assert code == 2 and "another mixtral-convert run is writing this output now" in one_line_error(err)
        assert (tmp / "consolidated.00-of-02.model.pth").read_bytes() == b"being written"
    # the lock is gone with its run: now it is stale and removed
    assert cli("split", wide_src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
    assert leftovers(tmp_path) == ["o"]


def test_foreign_dir_with_the_temp_name_is_refused(wide_src, tmp_path, capsys):
    out = tmp_path / "o"
    temp_of(out).mkdir()
    (temp_of(out) / "precious.txt").write_text("not yours")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, capsys=capsys)
    assert code == 2 and "was not made by mixtral-convert" in one_line_error(err)
    assert (temp_of(out) / "precious.txt").read_text() == "not yours" and not out.exists()


# ----------------------------------------------------------------------------- full or unwritable disk
@pytest.fixture()
def tmpfs(tmp_path):
    """mount(size, ro) -> a fresh tmpfs; unmounted at teardown. Needs root."""
    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size="256k", ro=False):
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_free_space_is_checked_before_starting(wide_src, tmpfs, capsys):
    mnt = tmpfs("256k")
    out = mnt / "a" / "b" / "o"
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, capsys=capsys)
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"error: {out}: not enough free space on {mnt}: ")
    assert "needed" in line and "free" in line and "choose another -o" in line
    assert leftovers(mnt) == []  # not even the parents


def test_disk_full_while_writing(wide_src, tmpfs, capsys, monkeypatch):
    """The up-front check is fooled (as when something else fills the disk meanwhile): the
    write hits ENOSPC, which is one line naming the output, and nothing is left behind."""
    mnt = tmpfs("256k")
    real = shutil.disk_usage
    calls = []

    def fake(path):
        calls.append(path)
        if len(calls) == 1:
            return namedtuple("usage", "total used free")(1 << 40, 0, 1 << 40)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", fake)
    out = mnt / "o"
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, capsys=capsys)
    line = one_line_error(err)
    assert code == 2, err
    assert line.startswith(f"error: {out}: no space left on device while writing (")
    assert "needed" in line and "free at the start" in line and "free when it ran out" in line
    assert "nothing was left behind" in line
    assert leftovers(mnt) == []


def test_unwritable_output(wide_src, tmpfs, tmp_path, capsys):
    mnt = tmpfs("1m", ro=True)
    code, _, err = cli("split", wide_src, "-n", 2, "-o", mnt / "o", capsys=capsys)
    assert code == 2
    assert one_line_error(err) == (f"error: {mnt / 'o'}: cannot create the output there (Read-only file system); "
                                   "choose another -o")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", "/proc/mixtral-convert-test/o", capsys=capsys)
    assert code == 2 and one_line_error(err).startswith("error: /proc/mixtral-convert-test/o: ")  # (0 B free there)
    (tmp_path / "file").write_text("x")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", tmp_path / "file", capsys=capsys)
    assert code == 2 and "exists and is not a directory" in one_line_error(err)


# ----------------------------------------------------------------------------- --force
def test_force_never_deletes_what_it_did_not_write(wide_src, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "o"
    assert cli("split", wide_src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
    m = json.loads((out / MANIFEST).read_text())
    good = json.dumps(m)
    # a tampered manifest naming a file outside the directory: not trusted at all
    m["files"]["../victim.txt"] = {"size": 7, "sha256": "0" * 64}
    (out / MANIFEST).write_text(json.dumps(m))
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, "--force", capsys=capsys)
    assert code == 2 and "did not write" in one_line_error(err)
    assert victim.read_text() == "keep me"
    # a file of ours that was changed since (another size) is not ours any more
    (out / MANIFEST).write_text(good)
    (out / "config.json").write_text('{"edited": "by hand"}')
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, "--force", capsys=capsys)
    assert code == 2 and "changed since" in one_line_error(err)
    assert (out / "config.json").read_text() == '{"edited": "by hand"}'
    # a directory where the manifest lists a file is not ours either
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, "--force", capsys=capsys)
    assert code == 2 and "not a regular file" in one_line_error(err)


def test_force_over_our_output_swaps_it_whole(wide_src, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli("split", wide_src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
    assert cli("split-sparse", wide_src, "-n", 4, "-o", out, "-q", "--force", capsys=capsys)[0] == 0
    assert leftovers(tmp_path) == ["o"]
    assert sorted(p.name for p in out.glob("*.pth")) == [f"consolidated.{r:02d}-of-04.model.pth" for r in range(4)]
    assert cli("verify", out, "-q", capsys=capsys)[0] == 0
    # with a foreign file kept in place: replaced file by file, the manifest complete at the end
    (out / "notes.txt").write_text("mine")
    assert cli("split", wide_src, "-n", 2, "-o", out, "-q", "--force", capsys=capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == ["o"]
    assert "incomplete" not in json.loads((out / MANIFEST).read_text())
    assert cli("verify", out, "-q", capsys=capsys)[0] == 0
    assert cli("verify", out, "--source", wide_src, "-q", capsys=capsys)[0] == 0
