"""Q8_0 over the cores (`encodings.q8_0`): byte for byte the gguf package's quantizer, on random
rows and on the blocks where a reimplementation would slip (zeros, the float32 and float16
extremes, exact halves after scaling, subnormals, scales float16 cannot hold, scales whose
reciprocal overflows), however the rows are cut into spans (and whichever span the machine's
cores choose); inf and NaN refused, naming the tensor, by the quantizer and by `merge --to gguf --dtype q8_0`."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf_cases import CONTEXT, copy_source
from helpers import cli, load

from mixtral_convert.encodings import q8_0
from mixtral_convert.errors import ConvertError

F32 = np.float32
TINY = np.finfo(np.float32).smallest_subnormal  # 1.4e-45
FMAX = np.finfo(np.float32).max


def gguf_bytes(rows: torch.Tensor) -> bytes:
    return quants.quantize(rows.float().numpy(), T.Q8_0).tobytes()


def same(rows: torch.Tensor, **kw) -> None:
    got = q8_0.quantize(rows, "t", **kw)
    want = gguf_bytes(rows)
    assert got.dtype == np.uint8 and got.size == len(want)
    if got.tobytes() != want:
        bad = int(np.flatnonzero(got != np.frombuffer(want, np.uint8))[0]) // 34
        raise AssertionError(f"block {bad} differs: {rows.reshape(-1, 32)[bad].tolist()}")


def blocks(*rows) -> torch.Tensor:
    """Blocks of 32 float32 values, each given as a list padded with zeros."""
    out = np.zeros((len(rows), 32), F32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r, F32)
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("span", [1, 97, 1000, 16384])
def test_random_rows_equal_gguf_for_any_span(dtype, span):
    """2503 blocks (5006 as rows of 32): a multiple of none of the spans."""
    g = torch.Generator().manual_seed(span)
    x = torch.randn(2503, 64, generator=g) * torch.logspace(-6, 4, 2503).unsqueeze(1)
    same(x.reshape(2503 * 2, 32).to(dtype), span=span)
    same(x.to(dtype).reshape(-1), span=span)  # flat rows are blocks too
    same(x.to(dtype)[:, :32].t().contiguous().t(), span=span)  # a non-contiguous source


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_the_spans_each_core_count_chooses_on_a_large_block(cores, monkeypatch):
    """Up to two cores: small spans, several to a chunk; more: wide ones, which torch spreads over its threads."""
    monkeypatch.setattr(q8_0, "workers", lambda: cores)
    assert q8_0.spans() == ((q8_0.SPAN_BLOCKS, q8_0.CHUNK_SPANS) if cores <= 2 else (q8_0.WIDE_SPAN_BLOCKS, 1))
    x = torch.randn(4096, 16384, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)  # 2 wide spans
    same(x)


def test_adversarial_blocks_equal_gguf():
    k = np.arange(-127, 127, dtype=F32)
    rows = [
        [],  # all zeros
        [-0.0] * 32,
        [FMAX, -FMAX, 1, -1],  # d = 2.7e36: float16 inf
        [-FMAX] + [FMAX / 3] * 31,
        [65504 * 127, 1, -65504 * 127],  # d at float16's largest finite
        [65519.996 * 127], [65520 * 127], [np.nextafter(F32(65520 * 127), F32(0))],  # d rounding to inf or not
        list(k[:32] + F32(0.5)), list(k[32:64] + F32(0.5)), list(k[200:232] + F32(0.5)),  # ties, d = 1 ...
        [127] + list(k[100:131] + F32(0.5)), [-127] + list(-k[100:131] - F32(0.5)),
        [127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, np.nextafter(F32(0.5), F32(0)),
         -np.nextafter(F32(0.5), F32(0)), np.nextafter(F32(0.5), F32(1)), np.nextafter(F32(1.5), F32(0))],
        [127 * 2.0**-60, 0.5 * 2.0**-60, 2.5 * 2.0**-60, -3.5 * 2.0**-60],  # ties at a power-of-two scale
        [1.0, TINY, -TINY, 3 * TINY, 1e-40],  # subnormal values in a normal block
        [TINY], [63 * TINY], [64 * TINY, -TINY],  # max/127 rounds to 0, to 0, to the smallest subnormal
        [1e-37, -5e-38, TINY], [3e-37, 1e-39], [3.7e-37], [4e-37, -2e-37],  # 1/d overflows, or just does not
        [1.4e-36, 1e-38], [1.5e-36, -1.5e-36, 7e-37],  # d subnormal (1/d finite), d normal
        [6.1e-5 * 127, 3e-5], [1e-7 * 127, 1e-9],  # d at float16's subnormal edge and below
    ]
    same(blocks(*rows))
    shuffled = blocks(*rows)[np.random.default_rng(0).permutation(len(rows))]
    same(shuffled, span=3)
    same(shuffled, span=2)  # chunks of 8 blocks: the special ones in later chunks too


def test_rounding_of_every_float_near_each_integer_and_half_and_in_the_quarter_to_one():
    """Blocks scaled by exactly 1 (max 127: d = 1, 1/d = 1), so that x * id is x itself: every float32
    within 8 ulps of k and k + 0.5 for k < 128, and every float32 in [0.25, 1), both signs."""
    near = []
    for v in np.arange(0, 127.5, 0.5, dtype=F32):
        b = np.array([v], F32).view(np.int32)[0]
        near.append(np.arange(max(b - 8, 0), b + 9, dtype=np.int32).view(F32))
    quarter = np.arange(np.array([0.25], F32).view(np.int32)[0], np.array([1.0], F32).view(np.int32)[0],
                        dtype=np.int32).view(F32)
    vals = np.concatenate(near + [quarter])
    vals = vals[vals <= 127]
    vals = np.concatenate([vals, -vals])
    vals = np.concatenate([vals, np.zeros(-len(vals) % 31, F32)]).reshape(-1, 31)
    x = np.concatenate([np.full((len(vals), 1), 127, F32), vals], axis=1)
    same(torch.from_numpy(x))


def test_blocks_whose_scale_has_no_float32_reciprocal_are_quantized_by_gguf_itself(monkeypatch):
    """max|x| under about 3.7e-37: d is a subnormal whose 1/d overflows, and gguf-py casts NaN to int8
    (platform-defined); those blocks, and only those, go to gguf-py."""
    seen = []
    real = quants.quantize
    monkeypatch.setattr(q8_0.quants, "quantize", lambda a, t: seen.append(a.copy()) or real(a, t))
    rows = blocks([1.0, -2.0], [1e-37, -5e-38], [3e-37], [TINY], [3.8e-37], [2e-37, 1.0e-45])
    want = gguf_bytes(rows)
    seen.clear()
    assert q8_0.quantize(rows, "t").tobytes() == want
    assert len(seen) == 1 and np.array_equal(seen[0], rows.numpy()[[1, 2, 5]])


def test_inf_and_nan_are_refused_naming_the_tensor():
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = torch.randn(40, 64)
        x[17, 5] = bad
        x[30, 40] = bad
        with pytest.raises(ConvertError) as e:
            q8_0.quantize(x.to(torch.bfloat16), "model.pth: tensor 'layers.0.attention.wq.weight'", span=7)
        msg = str(e.value)
        assert "\n" not in msg and "'layers.0.attention.wq.weight'" in msg, msg
        assert "inf or NaN" in msg and "--dtype bfloat16" in msg, msg


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ConvertError, match="not whole Q8_0 blocks"):
        q8_0.quantize(torch.zeros(4, 48), "t")


def test_merge_refuses_a_source_with_nan_and_writes_nothing(src7, tmp_path, capsys):
    src = copy_source(src7, tmp_path / "src")
    sd = load(src / "consolidated.00.pth")
    sd["layers.1.feed_forward.experts.2.w1.weight"][5, 3] = float("nan")
    torch.save(sd, src / "consolidated.00.pth")
    out = tmp_path / "o" / "x.gguf"
    code, _, err = cli("merge", src, "--to", "gguf", "--dtype", "q8_0", "-o", out, "--max-position-embeddings",
                       CONTEXT, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "'layers.1.feed_forward.experts.2.w1.weight'" in err and str(src) in err and "Q8_0" in err, err
    assert not (tmp_path / "o").exists()
    assert cli("merge", src, "--to", "gguf", "--dtype", "bfloat16", "-o", out, "-q", "--max-position-embeddings",
               CONTEXT)[0] == 0  # the fix the message names
