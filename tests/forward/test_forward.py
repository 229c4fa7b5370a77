"""forward and verify --forward: numerical parity of every layout and world size with the source,
in one process and over torch.distributed (gloo, CPU); input checking; and why the check exists:
a wrong layout rule used by both split and merge round-trips bit for bit, passes the byte
verify, and is caught only by the forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ODD, WIDE, cli, greedy, load, load_lazy, same_bytes

from mixtral_convert.forward.reference import forward
from mixtral_convert.model import layouts
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.model.layouts import Chunk, ExpertSlice, Piece, valid_world_sizes
from mixtral_convert.model.tensors import compile_pattern
from mixtral_convert.synth import tiny_config

CMD = {"base": "split", "sparse": "split-sparse"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("tok") / "t.pt"
    torch.save(torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5)), f)  # 96 = min vocab
    return f


_SPLITS: dict = {}


def converted(src: Path, layout: str, N: int) -> Path:
    """src split into layout at N (cached per session and worker)."""
    key = (src, layout, N)
    if key not in _SPLITS:
        out = src.parent / f"{layout}-{N}"
        code, _, _ = cli(CMD[layout], src, "-n", N, "-o", out, "-q")
        assert code == 0
        _SPLITS[key] = out
    return _SPLITS[key]


def reference_logits(src: Path, toks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    cfg = ModelConfig.from_json_file(src / "params.json")
    return forward(cfg, load_lazy(src / "consolidated.00.pth"), toks, dtype=dtype)


# ----- parity for both layouts and every valid N, in one process ------------------------------

PARITY = ([("wide", layout, N) for layout in ("base", "sparse") for N in (1, 2, 4, 8)]
          + [("odd", layout, N) for layout in ("base", "sparse") for N in (1, 2)])


def test_parity_cases_are_every_valid_world_size():
    for name, kw in (("wide", WIDE), ("odd", ODD)):
        for layout in ("base", "sparse"):
            listed = {N for n, lay, N in PARITY if (n, lay) == (name, layout)}
            assert listed == set(valid_world_sizes(layout, tiny_config(**kw)))


@pytest.mark.parametrize("name,layout,N", PARITY, ids=[f"{n}-{lay}-N{N}" for n, lay, N in PARITY])
def test_verify_forward_parity(request, capsys, name, layout, N):
    src = request.getfixturevalue(f"{name}_src")
    d = converted(src, layout, N)
    code, out, _ = cli("verify", d, "--source", src, "--forward", "--json", capsys=capsys)
    rep = json.loads(out)
    f = rep["forward"]
    print(f"{name} {layout} N={N}: max abs {f['max_abs_diff']:.3g} (max |logit| {f['max_abs_logit']:.3g}), "
          f"rel {f['max_rel_diff']:.3g}, rms {f['rms_rel_diff']:.3g}, top-1 {f['top1_agreement']}")
    assert code == 0 and rep["ok"] and f["ok"], rep
    assert f["max_abs_diff"] <= 1e-5 * max(1, f["max_abs_logit"])  # 10x tighter than the tolerance
    assert f["top1_agreement"] == 1.0 and f["tokens_shape"] == [2, 16]


@pytest.mark.parametrize("layout,N,flag", [("base", 8, "--compute-dtype"), ("sparse", 2, "--dtype")])
def test_verify_forward_bf16(wide_src, capsys, layout, N, flag):
    """--compute-dtype, or its older name --dtype, sets the dtype verify's forward computes in."""
    code, out, _ = cli("verify", converted(wide_src, layout, N), "--source", wide_src, "--forward", "--json",
                       flag, "bfloat16", capsys=capsys)
    f = json.loads(out)["forward"]
    print(f"bf16 {layout} N={N}: {f}")
    assert code == 0 and f["ok"] and f["dtype"] == "bfloat16"
    assert f["rms_rel_diff"] < 0.05 and f["top1_agreement"] >= 0.9


def test_forward_command_on_source_and_layouts(wide_src, tokens, tmp_path, capsys):
    """forward on the torrent gives model.forward's logits exactly; on converted layouts, the
    sharded forward's, within fp32 rounding."""
    toks = load(tokens)
    ref = reference_logits(wide_src, toks)
    code, out, _ = cli("forward", wide_src, "--tokens-file", tokens, "--output", tmp_path / "src.pt", capsys=capsys)
    assert code == 0 and "reference forward" in out
    got = load(tmp_path / "src.pt")
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    for layout, N in (("base", 4), ("sparse", 8)):
        o = tmp_path / f"{layout}.pt"
        code, out, _ = cli("forward", converted(wide_src, layout, N), "--tokens-file", tokens, "-o", o, capsys=capsys)
        assert code == 0 and "sharded forward" in out and f"{N} ranks" in out
        assert (load(o) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_prompt_prints_next_tokens(wide_src, capsys):
    cfg = ModelConfig.from_json_file(wide_src / "params.json")
    want, text = greedy(cfg, load_lazy(wide_src / "consolidated.00.pth"), wide_src / "tokenizer.model",
                                      "the quick fox", 3)
    for path in (wide_src, converted(wide_src, "sparse", 4)):
        code, out, _ = cli("forward", path, "--prompt", "the quick fox", "--new-tokens", "3", capsys=capsys)
        assert code == 0
        assert f"ids {want}" in out and repr(text) in out
        assert len([ln for ln in out.splitlines() if ln.startswith("  ")]) == 5  # top 5 candidates


# ----- --distributed: real processes over gloo -----------------------------------------------

@pytest.mark.parametrize("layout,N", [("base", 2), ("sparse", 4)])
def test_distributed_equals_single_process(wide_src, tokens, tmp_path, capsys, monkeypatch, layout, N):
    """Bit for bit: the same per-rank code, sums in rank order; the workers are given this
    process's thread count (a different one changes matmul rounding, ~1e-7 relative)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    d = converted(wide_src, layout, N)
    code, out, err = cli("forward", d, "--tokens-file", tokens, "-o", tmp_path / "one.pt", capsys=capsys)
    assert code == 0
    code, out, err = cli("forward", d, "--tokens-file", tokens, "-o", tmp_path / "dist.pt", "--distributed",
                         capsys=capsys)
    assert code == 0, err
    assert f"{N} processes (gloo)" in out
    one, dist = load(tmp_path / "one.pt"), load(tmp_path / "dist.pt")
    diff = (one - dist).abs().max().item()
    ref = reference_logits(wide_src, load(tokens))
    print(f"{layout} N={N}: |distributed - in-process| {diff:.3g}, |distributed - reference| "
          f"{(dist - ref).abs().max().item():.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert torch.equal(one, dist)
    assert (dist - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_distributed_reads_safetensors_shards(wide_src, tokens, tmp_path, capsys, monkeypatch):
    """--distributed finds a rank's shard through the same directory listing as every other
    command, so .model.safetensors shards run too (they used to be reported missing)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    d = tmp_path / "st"
    assert cli("split", wide_src, "-n", 2, "-o", d, "--format", "safetensors", "-q", capsys=capsys)[0] == 0
    code, out, err = cli("forward", d, "--tokens-file", tokens, "-o", tmp_path / "dist.pt", "--distributed",
                         capsys=capsys)
    assert code == 0, err
    assert "2 processes (gloo)" in out
    code, out, err = cli("forward", converted(wide_src, "base", 2), "--tokens-file", tokens, "-o", tmp_path / "pth.pt",
                         capsys=capsys)
    assert code == 0, err
    assert torch.equal(load(tmp_path / "dist.pt"), load(tmp_path / "pth.pt"))


def test_torchrun_launch(wide_src, tokens, tmp_path):
    """Launched by torchrun, each process joins torchrun's group (no processes of its own)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside python")
    d = converted(wide_src, "base", 2)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mixtral_convert",
                        "forward", str(d), "--tokens-file", str(tokens), "-o", str(tmp_path / "l.pt"), "--distributed"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote logits") == 1 and "2 processes (gloo)" in p.stdout  # rank 0 only
    ref = reference_logits(wide_src, load(tokens))
    assert (load(tmp_path / "l.pt") - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_world_size_must_match_layout(wide_src, tokens, tmp_path, capsys, monkeypatch):
    d = converted(wide_src, "base", 2)  # before WORLD_SIZE is set: split would write only this process's ranks
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    code, _, err = cli("forward", d, "--tokens-file", tokens, "-o", tmp_path / "l.pt", "--distributed", capsys=capsys)
    assert code == 2 and "a 2-rank base layout, but WORLD_SIZE is 3" in err and "--nproc-per-node 2" in err


def test_distributed_needs_a_layout(wide_src, tokens, tmp_path, capsys):
    code, _, err = cli("forward", wide_src, "--tokens-file", tokens, "-o", tmp_path / "l.pt", "--distributed",
                       capsys=capsys)
    assert code == 2 and "torrent checkpoint" in err and "drop --distributed" in err


# ----- inputs ----------------------------------------------------------------------------------

class NotATensor:
    pass


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(2, 3), "tokens are float32, expected int64"),
    (torch.zeros(6, dtype=torch.long), "expected [B, S]"),
    (torch.zeros(1, 0, dtype=torch.long), "expected [B, S]"),
    (torch.full((1, 3), 128), "token id 128 is outside the vocabulary [0, 128)"),
    (torch.full((1, 3), -1), "token id -1 is outside"),
    ({"tokens": torch.zeros(1, 2, dtype=torch.long)}, "holds a dict"),
    (NotATensor(), "refused to load the tokens file"),
    (b"not a torch file", "unreadable tokens file"),
])
def test_bad_tokens_are_one_line_errors(wide_src, tmp_path, capsys, bad, message):
    f = tmp_path / "t.pt"
    if isinstance(bad, bytes):
        f.write_bytes(bad)
    else:
        torch.save(bad, f)
    code, _, err = cli("forward", wide_src, "--tokens-file", f, "-o", tmp_path / "l.pt", capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "l.pt").exists()


def test_usage_errors(wide_src, tokens, tmp_path, capsys):
    code, _, err = cli("forward", wide_src, "--tokens-file", tokens, capsys=capsys)
    assert code == 2 and "--output" in err
    code, _, err = cli("forward", wide_src, "--tokens-file", tokens, "--prompt", "x", "-o", tmp_path / "l",
                       capsys=capsys)
    assert code == 2 and "exactly one of" in err
    code, _, err = cli("forward", wide_src, "-o", tmp_path / "l", capsys=capsys)
    assert code == 2 and "exactly one of" in err
    (tmp_path / "l.pt").write_bytes(b"keep")
    code, _, err = cli("forward", wide_src, "--tokens-file", tokens, "-o", tmp_path / "l.pt", capsys=capsys)
    assert code == 2 and "--force" in err and (tmp_path / "l.pt").read_bytes() == b"keep"
    code, _, _ = cli("forward", wide_src, "--tokens-file", tokens, "-o", tmp_path / "l.pt", "--force", capsys=capsys)
    assert code == 0 and load(tmp_path / "l.pt").shape == (2, 11, 128)
    if not torch.cuda.is_available():
        code, _, err = cli("forward", wide_src, "--tokens-file", tokens, "-o", tmp_path / "c.pt", "--device", "cuda",
                           capsys=capsys)
        assert code == 2 and "CUDA is not available" in err


# ----- why --forward exists ------------------------------------------------------------------

class RotatedChunk(Chunk):
    """WRONG: rank r holds chunk (r+1) % N. Self-consistent, so split and merge agree."""

    def pieces(self, name, shape, m, r, N, cfg):
        (p,) = super().pieces(name, shape, m, (r + 1) % N, N, cfg)
        return [Piece(r, p.key, p.row0, p.src, p.dim, p.start, p.stop, p.transpose)]


class ShiftedW2(ExpertSlice):
    """WRONG: rank r's w2 holds FFN slice (r+1) % N while its w1/w3 hold slice r."""

    def pieces(self, name, shape, m, r, N, cfg):
        hs = shape[self.dim] // N
        s = (r + 1) % N
        return [Piece(r, layouts.PREFIX + self.into.format(**m), int(m["e"]) * hs, name, self.dim, s * hs,
                      (s + 1) * hs, self.transpose)]


def _patched(table: list, pattern: str, rule) -> list:
    return [(compile_pattern(p), rule if p == pattern else r) for p, r in table]


WRONG = {
    # output rows out of rank order: fairscale gathers logits in rank order -> vocabulary permuted
    "output-rows-rotated": ("base", "output.weight", RotatedChunk(0), "max |sharded - reference|"),
    # each rank's w2 slice does not match its w1/w3 slice
    "w2-slice-shifted": ("sparse", "layers.{L}.feed_forward.experts.{e}.w2.weight",
                         ShiftedW2(1, into="layers.{L}.feed_forward.w2", transpose=True), "not the same FFN slice"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_rule_round_trips_but_forward_catches_it(wide_src, tmp_path, capsys, monkeypatch, case):
    layout, pattern, rule, message = WRONG[case]
    monkeypatch.setitem(layouts._COMPILED, layout, _patched(layouts.TABLES[layout], pattern, rule))
    d, m = tmp_path / "shards", tmp_path / "merged"
    assert cli(CMD[layout], wide_src, "-n", 4, "-o", d, "-q", capsys=capsys)[0] == 0
    # split and merge read the same (wrong) table: the round trip is bit-exact ...
    assert cli("merge", d, "-o", m, "-q", capsys=capsys)[0] == 0
    merged, orig = load(m / "consolidated.00.pth"), load(wide_src / "consolidated.00.pth")
    assert merged.keys() == orig.keys() and all(same_bytes(merged[k], v) for k, v in orig.items())
    # ... and every byte of every shard is what the table says
    code, out, _ = cli("verify", d, "--source", wide_src, capsys=capsys)
    assert code == 0 and "verified" in out
    # but the layout does not compute the source's model
    code, out, err = cli("verify", d, "--source", wide_src, "--forward", "--json", capsys=capsys)
    rep = json.loads(out)
    print(case, rep["forward"])
    assert code == 1 and not rep["ok"] and rep["problems"] == [] and not rep["forward"]["ok"]
    assert message in rep["forward"]["problems"][0]
    if case == "output-rows-rotated":
        assert rep["forward"]["top1_agreement"] < 0.5 and rep["forward"]["rms_rel_diff"] > 0.5


# ----- layer by layer ---------------------------------------------------------------------------

def test_forward_holds_one_layer_at_a_time():
    """The weights alive at once never exceed one layer's (plus the embedding and output)."""
    import weakref

    from test_sharded import split

    from mixtral_convert.forward.sharded import sharded_forward
    from mixtral_convert.model.layouts import Plan
    from mixtral_convert.synth import materialize

    cfg = tiny_config(n_layers=6)
    W = materialize(cfg, seed=3)
    toks = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    layer = sum(v.nbytes for k, v in W.items() if k.startswith("layers.0."))
    rest = sum(v.nbytes for k, v in W.items() if not k.startswith("layers."))
    state = {"alive": 0, "peak": 0}

    def tracked(get):
        def fetch(name):
            t = get(name).clone()  # a fresh tensor per load, as a real (cast or device) load makes
            state["alive"] += t.nbytes
            state["peak"] = max(state["peak"], state["alive"])
            weakref.finalize(t, lambda n=t.nbytes: state.__setitem__("alive", state["alive"] - n))
            return t
        return fetch

    forward(cfg, tracked(W.__getitem__), toks)
    assert state["peak"] <= layer + rest, (state, layer, rest)
    plan = Plan("sparse", cfg, 2, {k: v.dtype for k, v in W.items()})
    state.update(alive=0, peak=0)
    sharded_forward(plan, [tracked(s.__getitem__) for s in split(plan, W)], toks)
    assert state["peak"] <= layer + rest, (state, layer, rest)
    assert state["peak"] < 0.5 * sum(v.nbytes for v in W.values())


def test_verify_forward_with_tokens_file_and_text_report(wide_src, tokens, capsys):
    d = converted(wide_src, "sparse", 4)
    code, out, _ = cli("verify", d, "--source", wide_src, "--forward", "--tokens-file", tokens, capsys=capsys)
    assert code == 0 and "ok    forward (float32, cpu, tokens [2, 11])" in out and "top-1 agreement 1.0000" in out
    code, _, err = cli("verify", d, "--source", wide_src, "--forward", "--tokens-file", tokens, "--dtype", "float16",
                       capsys=capsys)
    assert code == 2 and "float16" in err
