"""split then merge gives the source back bit for bit, for both layouts and every N."""

import pytest
from helpers import cli, load, same_bytes

from mixtral_convert.model.config import ModelConfig
from mixtral_convert.model.layouts import valid_world_sizes


@pytest.mark.parametrize("layout,cmd", [("base", "split"), ("sparse", "split-sparse")])
@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_split_merge_bit_exact(wide_src, tmp_path, capsys, layout, cmd, N):
    out = tmp_path / "shards"
    code, _, err = cli(cmd, wide_src, "-n", N, "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    names = [f"consolidated.{r:02d}-of-{N:02d}.model.pth" for r in range(N)]
    assert sorted(p.name for p in out.glob("*.model.pth")) == names
    code, _, err = cli("merge", out, "-o", tmp_path / "merged", "-q", capsys=capsys)
    assert code == 0, err
    src, back = load(wide_src / "consolidated.00.pth"), load(tmp_path / "merged" / "consolidated.00.pth")
    assert set(src) == set(back)
    for k in src:
        assert same_bytes(src[k], back[k]), k
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == (wide_src / "tokenizer.model").read_bytes()
    code, out_text, err = cli("verify", out, "--source", wide_src, capsys=capsys)
    assert code == 0, out_text + err


def test_other_shapes_every_valid_n(odd_src, tmp_path, capsys):
    cfg = ModelConfig.from_json_file(odd_src / "params.json")
    assert valid_world_sizes("base", cfg) == [1, 2]  # KV 2
    assert valid_world_sizes("sparse", cfg) == [1, 2]
    src = load(odd_src / "consolidated.00.pth")
    for cmd in ("split", "split-sparse"):
        for N in (1, 2):
            out = tmp_path / f"{cmd}-{N}"
            assert cli(cmd, odd_src, "-n", N, "-o", out, "-q", capsys=capsys)[0] == 0
            assert cli("verify", out, "--source", odd_src, "-q", capsys=capsys)[0] == 0
            assert cli("merge", out, "-o", tmp_path / f"m-{cmd}-{N}", "-q", capsys=capsys)[0] == 0
            back = load(tmp_path / f"m-{cmd}-{N}" / "consolidated.00.pth")
            assert all(same_bytes(src[k], back[k]) for k in src)
            # the config survives: non-default head_dim, eps, rope_theta, top-1
            assert ModelConfig.from_json_file(out / "config.json") == cfg


def test_reshard_accessory_to_other_layout(wide_src, tmp_path, capsys):
    """An Accessory directory is a source too: base N=4 -> sparse N=2 -> base N=8, no torrent file in between."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli("split", wide_src, "-n", 4, "-o", a, "-q", capsys=capsys)[0] == 0
    assert cli("split-sparse", a, "-n", 2, "-o", b, "-q", capsys=capsys)[0] == 0
    assert cli("split", b, "-n", 8, "-o", c, "-q", capsys=capsys)[0] == 0
    for d in (b, c):
        code, out, err = cli("verify", d, "--source", wide_src, capsys=capsys)
        assert code == 0, out + err


def test_default_output_dirs_and_source_untouched(tmp_path, capsys):
    from mixtral_convert.synth import tiny_config, write_torrent
    src = write_torrent(tmp_path / "src", tiny_config())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()}
    assert cli("split", src, "-n", 2, "-q", capsys=capsys)[0] == 0
    assert cli("split-sparse", src, "-n", 2, "-q", capsys=capsys)[0] == 0
    assert (src / "converted" / "consolidated.01-of-02.model.pth").is_file()
    assert (src / "converted_sparse" / "consolidated.01-of-02.model.pth").is_file()
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in src.iterdir() if p.name.startswith(".")]  # no temporary dirs left


@pytest.mark.parametrize("cmd,fmt", [("split", "pth"), ("split-sparse", "pth"), ("split-sparse", "safetensors")])
def test_ranks_written_together_or_in_turn_are_the_same_files(wide_src, tmp_path, capsys, cmd, fmt):
    import hashlib
    digests = {}
    for mode in ("in-turn", "together"):
        out = tmp_path / mode
        code, _, err = cli(cmd, wide_src, "-n", 8, "-o", out, "--format", fmt, "--write-ranks", mode, "-q",
                           capsys=capsys)
        assert code == 0, err
        digests[mode] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("consolidated.*")}
    assert len(digests["together"]) == 8 and digests["together"] == digests["in-turn"]


def test_a_rank_failing_while_written_together_stops_them_all(tmp_path, capsys):
    """One rank's writer fails (a float16 overflow in a tensor only rank 1 holds): the others are
    stopped, the error is the failing rank's one line, and nothing is left."""
    import torch
    from helpers import WIDE, load, write_pth

    from mixtral_convert.synth import tiny_config, write_torrent
    src = write_torrent(tmp_path / "src", tiny_config(**WIDE), seed=4, dtype=torch.float32)
    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    sd["layers.1.feed_forward.experts.2.w1.weight"][3, 3] = 1e6  # expert 2 of 8: rank 1 of 4 (base)
    write_pth(src / "consolidated.00.pth", sd)
    code, _, err = cli("split", src, "-n", 4, "-o", tmp_path / "o", "--dtype", "float16", "--write-ranks",
                       "together", capsys=capsys)
    assert code == 2 and "'layers.1.feed_forward.experts.2.w1.weight' has 1 value(s)" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
