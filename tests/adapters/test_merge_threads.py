"""The LoRA merge spread over threads (io/lora.py's add_lora): the same bytes as the fixed-order float32 sum computed
one scalar at a time, whatever the thread count and the rows per tile, on data where another order gives other
bytes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import same_bytes

from mixtral_convert.io import lora as lora_mod
from mixtral_convert.io.delta import Delta, DeltaMerged, Lora
from mixtral_convert.io.lazy import Stored
from mixtral_convert.io.lora import LoraMerged, Segment, add_lora


def factors(rows, cols, rank, seed):
    """W, b, a in float32 with magnitudes spread over 2^±12, so that the order of the rank sum shows in the bits."""
    g = torch.Generator().manual_seed(seed)

    def spread(*shape):
        return torch.randn(*shape, generator=g) * torch.pow(2.0, torch.randint(-12, 13, shape, generator=g).float())

    return spread(rows, cols), spread(rows, rank), spread(rank, cols)


def scalar_reference(w, b, a, scale):
    """W + (((0 + b0·a0) + b1·a1) + ...)·scale, every operation on numpy float32 scalars (exactly rounded)."""
    W, B, A = w.numpy(), b.numpy(), a.numpy()
    out = np.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            acc = np.float32(0)
            for k in range(B.shape[1]):
                acc = np.float32(acc + np.float32(B[i, k] * A[k, j]))
            if scale is not None:
                acc = np.float32(acc * scale)
            out[i, j] = np.float32(W[i, j] + acc)
    return torch.from_numpy(out)


def vector_reference(w, b, a, scale=None):
    """The same order, a whole column of terms at a time (numpy float32 arrays)."""
    W, B, A = w.numpy(), b.numpy(), a.numpy()
    acc = np.zeros_like(W)
    for k in range(B.shape[1]):
        acc = acc + B[:, k:k + 1] * A[k:k + 1, :]
    if scale is not None:
        acc = acc * np.float32(scale)
    return torch.from_numpy(W + acc)


def spans(monkeypatch):
    """Record the row spans add_lora hands to its tile loop."""
    seen, tiles = [], lora_mod._tiles

    def recording(out, b, a, scale, r0, r1):
        seen.append((r0, r1))
        tiles(out, b, a, scale, r0, r1)

    monkeypatch.setattr(lora_mod, "_tiles", recording)
    return seen


def test_the_data_tells_orders_apart():
    """The checks below can fail: on this data, the rank sum reversed, in float64 or by BLAS gives other bits."""
    w, b, a = factors(11, 37, 16, seed=1)
    ref = scalar_reference(w, b, a, None)
    assert not same_bytes(ref, scalar_reference(w, b.flip(1), a.flip(0), None))
    assert not same_bytes(ref, (w.double() + b.double() @ a.double()).float())
    assert not same_bytes(ref, torch.addmm(w, b, a))


@pytest.mark.parametrize("scale", [None, 0.7071])
@pytest.mark.parametrize("threads,tile_elements", [(1, 1 << 18), (1, 37), (2, 37), (3, 74), (5, 37), (4, 1)])
def test_any_thread_count_and_tile_gives_the_fixed_order_bytes(monkeypatch, threads, tile_elements, scale):
    w, b, a = factors(11, 37, 16, seed=1)
    ref = scalar_reference(w, b, a, None if scale is None else np.float32(scale))
    monkeypatch.setattr(lora_mod, "CHUNK_ELEMENTS", tile_elements)
    seen = spans(monkeypatch)
    out = w.clone()
    add_lora(out, b, a, None if scale is None else torch.tensor(scale, dtype=torch.float32), threads=threads)
    assert same_bytes(out, ref)
    tiles = -(-11 // max(1, tile_elements // 37))
    assert len(seen) == min(threads, tiles) and seen[0][0] == 0 and seen[-1][1] == 11


def test_full_width_rows_on_the_pool(monkeypatch):
    """Mixtral-8x7B's width at the default tile size: four threads, each a run of several tiles, give the fixed
    order's bytes and so those of one thread."""
    w, b, a = factors(300, 4096, 16, seed=2)
    ref = vector_reference(w, b, a, 0.25)
    one, four = w.clone(), w.clone()
    add_lora(one, b, a, torch.tensor(0.25), threads=1)
    seen = spans(monkeypatch)
    add_lora(four, b, a, torch.tensor(0.25), threads=4)
    assert seen == [(0, 75), (75, 150), (150, 225), (225, 300)]
    assert same_bytes(one, ref) and same_bytes(four, ref)


@pytest.mark.parametrize("threads", [1, 3])
def test_merged_tensors_the_same_bytes_on_any_thread_count(monkeypatch, threads):
    """DeltaMerged (peft, with its scale) and LoraMerged (Accessory, two row segments), read as the writer reads
    them, on `workers()` threads and a few rows per tile: the fixed-order bytes rounded once to bfloat16."""
    w, b, a = factors(40, 37, 8, seed=3)
    monkeypatch.setattr(lora_mod, "workers", lambda: threads)
    monkeypatch.setattr(lora_mod, "CHUNK_ELEMENTS", 3 * 37)
    seen = spans(monkeypatch)
    w16 = w.to(torch.bfloat16)
    scale = float(np.float32(2 / np.sqrt(8)))
    peft = DeltaMerged(Stored(w16, "w"), Delta("w", lora=Lora(Stored(b), Stored(a), scale)))
    assert same_bytes(peft.read(0, 40), scalar_reference(w16.float(), b, a, np.float32(scale)).to(torch.bfloat16))
    segs = [Segment(0, 25, Stored(b[:25]), Stored(a)), Segment(25, 40, Stored(b[25:]), Stored(a.flip(1)))]
    acc = LoraMerged(Stored(w16, "w"), segs)
    expect = torch.cat([scalar_reference(w16[:25].float(), b[:25], a, None),
                        scalar_reference(w16[25:].float(), b[25:], a.flip(1), None)]).to(torch.bfloat16)
    assert same_bytes(acc.read(0, 40), expect)
    assert same_bytes(acc.read(7, 33), expect[7:33])
    assert any(r0 > 0 for r0, _ in seen) == (threads > 1)  # the rows were cut over the threads
