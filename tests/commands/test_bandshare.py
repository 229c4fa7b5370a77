"""Sparse ranks written together share one read of the w2's full rows (`io.bandshare`): the same files
as ranks written in turn, each chunk read once whatever N, at most `window` chunks alive, and no hang
when a rank stops or a read fails."""

import hashlib
import random
import threading
import time

import pytest
import torch
from helpers import WIDE, cli

from mixtral_convert.io import bandshare
from mixtral_convert.io.bandshare import BandShare, Stopped


def digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("consolidated.*")}


@pytest.mark.parametrize("N,fmt", [(2, "pth"), (4, "safetensors"), (8, "pth")])
def test_shared_bands_write_the_in_turn_files_reading_each_chunk_once(wide_src, tmp_path, capsys, monkeypatch,
                                                                      N, fmt):
    shares = []
    real = BandShare.count.__func__
    monkeypatch.setattr(BandShare, "count", classmethod(lambda cls, *a, **k: shares.append(real(cls, *a, **k))
                                                        or shares[-1]))
    monkeypatch.setattr(bandshare, "CHUNK_BYTES", 1000)  # a w2's rows of hidden_dim bf16 values: several chunks
    got = {}
    for mode in ("in-turn", "together"):
        out = tmp_path / mode
        code, _, err = cli("split-sparse", wide_src, "-n", N, "-o", out, "--format", fmt, "--write-ranks", mode,
                           "-q", capsys=capsys)
        assert code == 0, err
        got[mode] = digests(out)
    assert len(got["together"]) == N and got["together"] == got["in-turn"]
    (share,) = shares
    keys = WIDE["n_layers"] * WIDE["num_experts"]  # one w2 each
    per_chunk = 1000 // (WIDE["hidden_dim"] * 2)
    chunks = -(-WIDE["dim"] // per_chunk)
    assert chunks > 2 and len(share.consumers) == keys and set(share.consumers.values()) == {N}
    assert share.reads == keys * chunks  # every chunk once, not once per rank
    assert not share._chunks  # every chunk freed


def test_without_the_share_the_files_are_the_same(wide_src, tmp_path, capsys, monkeypatch):
    got = {}
    for env in ("1", "0"):
        monkeypatch.setenv("MIXTRAL_CONVERT_SHARE_BANDS", env)
        out = tmp_path / env
        assert cli("split-sparse", wide_src, "-n", 4, "-o", out, "--write-ranks", "together", "-q",
                   capsys=capsys)[0] == 0
        got[env] = digests(out)
    assert got["1"] == got["0"] and len(got["1"]) == 4


def test_a_w2_larger_than_the_share_bound_is_read_by_each_rank(wide_src, tmp_path, capsys, monkeypatch):
    """Past MAX_SHARED_BYTES nothing is shared (no share is made) and the files are the same."""
    made = []
    real = BandShare.count.__func__
    monkeypatch.setattr(BandShare, "count", classmethod(lambda cls, *a, **k: made.append(real(cls, *a, **k))
                                                        or made[-1]))
    want = {}
    for limit in (1 << 30, WIDE["dim"] * WIDE["hidden_dim"] * 2 - 1):  # one w2's bytes, less one
        monkeypatch.setattr(bandshare, "MAX_SHARED_BYTES", limit)
        out = tmp_path / str(limit)
        assert cli("split-sparse", wide_src, "-n", 4, "-o", out, "--write-ranks", "together", "-q",
                   capsys=capsys)[0] == 0
        want[limit] = digests(out)
    assert len(made) == 2 and made[0] is not None and made[1] is None
    assert len(set(map(str, want.values()))) == 1


def _consume(share, key, rows, seen, live, delay):
    for a, chunk in share.rows(key, 0, rows, 4 * 10, lambda a, b: torch.arange(a * 10, b * 10).view(b - a, 10)):
        live.append(len(share._chunks))
        seen.append((a, chunk[:, 0].tolist()))
        time.sleep(delay * random.random())


def test_consumers_at_different_speeds_see_every_chunk_once_within_the_window():
    stop = threading.Event()
    share = BandShare({"k": 5}, stop, window=2, chunk_bytes=3 * 4 * 10)  # 3 rows a chunk
    seen, live = [[] for _ in range(5)], []
    threads = [threading.Thread(target=_consume, args=(share, "k", 20, seen[i], live, 0.002 * i)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    want = [(a, list(range(a * 10, min(a + 3, 20) * 10, 10))) for a in range(0, 20, 3)]
    assert all(s == want for s in seen)
    assert share.reads == 7 and max(live) <= 2 and not share._chunks


def test_a_consumer_that_never_comes_is_ended_by_stop():
    """Counted 2 consumers, one comes: it runs ahead into the window and waits; stop ends the wait."""
    stop = threading.Event()
    share = BandShare({"k": 2}, stop, window=2, chunk_bytes=4 * 10)  # a row a chunk
    errors = []

    def lone():
        try:
            _consume(share, "k", 10, [], [], 0)
        except Stopped as e:
            errors.append(e)

    t = threading.Thread(target=lone)
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and share.reads == 2  # waiting for the absent consumer to free chunk 0
    stop.set()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_a_failed_read_reaches_every_consumer_of_the_chunk():
    share = BandShare({"k": 3}, threading.Event(), window=2, chunk_bytes=1 << 20)
    gate, errors = threading.Barrier(3), []

    def read(a, b):
        time.sleep(0.1)  # the others arrive while it reads
        raise OSError(5, "Input/output error")

    def one():
        gate.wait()
        try:
            list(share.rows("k", 0, 4, 40, read))
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(errors) == 3 and share.reads == 0
