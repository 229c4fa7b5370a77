"""mistral-inference's release format (docs/formats.md, "mistral-inference folders and .tar
downloads") in: a folder with consolidated.safetensors, params.json and tokenizer.model / .v3 / .v1, and Mistral's
uncompressed .tar download read in place; the refusals (both weight files, tekken.json alone,
compressed or truncated archives); and Mixtral-8x22B's shapes (6:1 heads to KV heads, vocab
sizes that are not powers of two) on a scaled-down model.

The fixtures are built here from the synthetic torrent with the safetensors library and Python's
tarfile, not through the code under test; every output is compared byte for byte with the
torrent's tensors."""

import bz2
import gzip
import json
import lzma
import math
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import cli, load, same_bytes
from safetensors.torch import save_file

from mixtral_convert.formats.registry import open_checkpoint
from mixtral_convert.io.lazy import materialize
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.model.layouts import valid_world_sizes
from mixtral_convert.synth import tiny_config, write_torrent

# Mixtral-8x22B scaled down: 24 heads over 4 KV heads (6:1 as 48:8), head_dim 4 (dim = heads *
# head_dim, as 6144 = 48 * 128), 8 experts top-2, rope_theta 1e6; vocab 100 for v0.3's 32768
# and 98 for v0.1's 32000 (neither a power of two; both sizes below also constrain N).
SMALL_22B = dict(dim=96, n_layers=2, head_dim=4, hidden_dim=40, n_heads=24, n_kv_heads=4, num_experts=8,
                 experts_per_tok=2, vocab_size=100, norm_eps=1e-5, rope_theta=1e6)
REAL_22B = dict(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8, num_experts=8,
                experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)
REAL_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, vocab_size=32000,
               num_experts=8, experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6)


def params_json(cfg: ModelConfig) -> dict:
    """params.json as mistral-inference releases write it (rope_theta present, moe object)."""
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
            "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
            "moe": {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_tok}}


def write_release(torrent: Path, out: Path, tokenizer: str = "tokenizer.model.v3") -> Path:
    """A mistral-inference folder holding the torrent's model (safetensors library, not ours)."""
    cfg = ModelConfig.from_json_file(torrent / "params.json")
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in load(torrent / "consolidated.00.pth").items()},
              out / "consolidated.safetensors")
    (out / "params.json").write_text(json.dumps(params_json(cfg)))
    if tokenizer:
        shutil.copy(torrent / "tokenizer.model", out / tokenizer)
    return out


def write_tar(folder: Path, tar: Path, arcdir: str = "") -> Path:
    """An uncompressed tar of the folder's files: in `arcdir/`, or at the top level."""
    with tarfile.open(tar, "w") as tf:
        for p in sorted(folder.iterdir()):
            tf.add(p, arcname=f"{arcdir}/{p.name}" if arcdir else p.name)
    return tar


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The scaled-down 8x22B as a torrent, a release folder, and two tars of it."""
    d = tmp_path_factory.mktemp("m22")
    torrent = write_torrent(d / "torrent", tiny_config(**SMALL_22B), seed=7)
    rel = write_release(torrent, d / "rel")
    return {"torrent": torrent, "dir": rel,
            "tar": write_tar(rel, d / "Mixtral-8x22B-v0.3.tar", "Mixtral-8x22B-v0.3"),
            "flat-tar": write_tar(rel, d / "flat.tar")}


def assert_same_as_torrent(torrent: Path, merged: Path):
    src, back = load(torrent / "consolidated.00.pth"), load(merged / "consolidated.00.pth")
    assert list(src) == list(back)
    for k in src:
        assert same_bytes(src[k], back[k]), k


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- bit for bit
@pytest.mark.parametrize("source", ["dir", "tar", "flat-tar"])
@pytest.mark.parametrize("cmd,N", [("split", 2), ("split-sparse", 4)])
def test_split_then_merge_is_the_torrent_bit_for_bit(small, tmp_path, capsys, source, cmd, N):
    out = tmp_path / "shards"
    code, _, err = cli(cmd, small[source], "-n", N, "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    assert (out / "tokenizer.model").read_bytes() == (small["dir"] / "tokenizer.model.v3").read_bytes()
    assert json.loads((out / "config.json").read_text()) == {
        "dim": 96, "n_layers": 2, "head_dim": 4, "hidden_dim": 40, "n_heads": 24, "n_kv_heads": 4, "norm_eps": 1e-5,
        "vocab_size": 100, "rope_theta": 1e6, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
    for against in (small["torrent"], small[source]):
        code, text, err = cli("verify", out, "--source", against, "-q", capsys=capsys)
        assert code == 0, text + err
    assert cli("merge", out, "-o", tmp_path / "merged", "-q", capsys=capsys)[0] == 0
    assert_same_as_torrent(small["torrent"], tmp_path / "merged")


def test_tar_and_directory_give_identical_shards(small, tmp_path, capsys):
    for src in ("dir", "tar"):
        assert cli("split-sparse", small[src], "-n", 2, "-o", tmp_path / src, "-q", capsys=capsys)[0] == 0
    for name in ("consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth", "config.json",
                 "meta.json", "tokenizer.model"):
        assert (tmp_path / "dir" / name).read_bytes() == (tmp_path / "tar" / name).read_bytes(), name


def test_merge_straight_from_the_tar(small, tmp_path, capsys):
    for src in ("tar", "flat-tar"):
        assert cli("merge", small[src], "-o", tmp_path / src, "-q", capsys=capsys)[0] == 0
        assert_same_as_torrent(small["torrent"], tmp_path / src)
        assert (tmp_path / src / "tokenizer.model").read_bytes() == (small["dir"] / "tokenizer.model.v3").read_bytes()
        params = json.loads((tmp_path / src / "params.json").read_text())
        assert ModelConfig.from_params(params) == tiny_config(**SMALL_22B)
    hf = open_checkpoint(small["flat-tar"]).cfg.to_hf_config()
    assert {k: hf[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                               "intermediate_size", "vocab_size", "num_local_experts", "rope_theta")} == {
        "hidden_size": 96, "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 4,
        "intermediate_size": 40, "vocab_size": 100, "num_local_experts": 8, "rope_theta": 1e6}


def test_tar_is_read_in_place(small, tmp_path):
    """Tensors are read where they lie in the archive (nothing extracted); the tokenizer is a
    copy of its member's bytes; default outputs go beside the archive."""
    before = sorted(p.name for p in small["tar"].parent.iterdir())
    ck = open_checkpoint(small["tar"])
    assert ck.kind == "mistral" and ck.files == [small["tar"]] and ck.path == small["tar"]
    # every tensor is read from the archive, where the member's header puts it
    st = next(m for m in tarfile.open(small["tar"]).getmembers() if m.name.endswith("consolidated.safetensors"))
    raw = small["tar"].read_bytes()
    n = int.from_bytes(raw[st.offset_data:st.offset_data + 8], "little")
    header = json.loads(raw[st.offset_data + 8:st.offset_data + 8 + n])
    at = {k: st.offset_data + 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert all(ck.canonical[k].file.path == small["tar"] and ck.canonical[k].offset == off for k, off in at.items())
    assert len({id(ck.canonical[k].file) for k in at}) == 1  # one opening of the archive
    t = materialize(ck.canonical["layers.0.attention.wq.weight"])
    assert t.shape == (96, 96) and same_bytes(t, load(small["torrent"] / "consolidated.00.pth")[
        "layers.0.attention.wq.weight"])
    assert ck.tokenizer.read_bytes() == (small["dir"] / "tokenizer.model.v3").read_bytes()
    assert ck.tokenizer_where.endswith("Mixtral-8x22B-v0.3.tar:Mixtral-8x22B-v0.3/tokenizer.model.v3")
    assert sorted(p.name for p in small["tar"].parent.iterdir()) == before


def test_default_outputs_beside_the_archive(small, tmp_path, capsys):
    tar = shutil.copy(small["flat-tar"], tmp_path / "Release.tar")
    assert cli("split", tar, "-n", 2, "-q", capsys=capsys)[0] == 0
    assert (tmp_path / "Release" / "converted" / "consolidated.01-of-02.model.pth").is_file()
    assert cli("merge", tar, "-q", capsys=capsys)[0] == 0
    assert_same_as_torrent(small["torrent"], tmp_path / "Release_merged")


# ----------------------------------------------------------------------------- 8x22B's numbers
def test_scaled_8x22b_world_sizes_and_refusals(small, tmp_path, capsys):
    """gcd(vocab 100, dim 96, heads 24, KV 4, experts 8 | FFN 40) = 4; with vocab 98 it is 2."""
    cfg = open_checkpoint(small["tar"]).cfg
    assert cfg == tiny_config(**SMALL_22B) and cfg.n_heads // cfg.n_kv_heads == 6
    assert valid_world_sizes("base", cfg) == [1, 2, 4] == valid_world_sizes("sparse", cfg)
    v01 = tiny_config(**dict(SMALL_22B, vocab_size=98))
    assert valid_world_sizes("base", v01) == [1, 2] == valid_world_sizes("sparse", v01)
    for cmd in ("split", "split-sparse"):
        code, _, err = cli(cmd, small["tar"], "-n", 8, "-o", tmp_path / "o", capsys=capsys)
        assert code == 2 and "valid world sizes: 1, 2, 4" in one_line(err)
    assert not (tmp_path / "o").exists()


def test_scaled_8x22b_v01_vocab(tmp_path, capsys):
    """The v0.1 analogue: vocab 98, tokenizer.model.v1, every valid N both layouts, bit for bit."""
    torrent = write_torrent(tmp_path / "t", tiny_config(**dict(SMALL_22B, vocab_size=98)), seed=9)
    tar = write_tar(write_release(torrent, tmp_path / "rel", "tokenizer.model.v1"), tmp_path / "v01.tar", "v01")
    for cmd in ("split", "split-sparse"):
        for N in (1, 2):
            out = tmp_path / f"{cmd}{N}"
            assert cli(cmd, tar, "-n", N, "-o", out, "-q", capsys=capsys)[0] == 0
            assert json.loads((out / "config.json").read_text())["vocab_size"] == 98
            assert cli("merge", out, "-o", tmp_path / f"m{cmd}{N}", "-q", capsys=capsys)[0] == 0
            assert_same_as_torrent(torrent, tmp_path / f"m{cmd}{N}")
        code, _, err = cli(cmd, tar, "-n", 4, "-o", tmp_path / "x", capsys=capsys)
        assert code == 2 and "valid world sizes: 1, 2;" in one_line(err)


@pytest.mark.parametrize("vocab", [32000, 32768])
def test_real_8x22b_numbers(vocab):
    """The real Mixtral-8x22B (v0.1: 32000, v0.3: 32768) and 8x7B: N in 1, 2, 4, 8 for both
    layouts; shapes and parameter count from params.json alone (no tensors)."""
    raw = dict(REAL_22B, vocab_size=vocab, moe={"num_experts": 8, "num_experts_per_tok": 2})
    del raw["num_experts"], raw["experts_per_tok"]
    cfg = ModelConfig.from_params(raw)
    assert cfg == ModelConfig(**dict(REAL_22B, vocab_size=vocab))
    seven = ModelConfig(**REAL_7B)
    for layout in ("base", "sparse"):
        assert valid_world_sizes(layout, cfg) == [1, 2, 4, 8]
        assert valid_world_sizes(layout, seven) == [1, 2, 4, 8]
    shapes = cfg.canonical_shapes()
    assert shapes["layers.55.attention.wq.weight"] == (6144, 6144)
    assert shapes["layers.55.attention.wk.weight"] == (1024, 6144)
    assert shapes["layers.0.feed_forward.experts.7.w2.weight"] == (6144, 16384)
    assert shapes["output.weight"] == (vocab, 6144)
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 140_620_634_112 + (vocab - 32000) * 2 * 6144  # "141B", 281 GB in bf16
    assert sum(math.prod(s) for s in seven.canonical_shapes().values()) == 46_702_792_704
    assert cfg.to_accessory()["n_kv_heads"] == 8 and cfg.to_hf_config()["num_key_value_heads"] == 8


# ----------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("present,chosen", [
    (["tokenizer.model.v1"], "tokenizer.model.v1"),
    (["tokenizer.model.v1", "tokenizer.model.v3"], "tokenizer.model.v3"),
    (["tokenizer.model.v3", "tokenizer.model"], "tokenizer.model"),
    (["tokenizer.model.v3", "tekken.json"], "tokenizer.model.v3"),
])
def test_tokenizer_choice(small, tmp_path, present, chosen):
    d = write_release(small["torrent"], tmp_path / "r", tokenizer="")
    for name in present:
        (d / name).write_bytes(b"{}" if name == "tekken.json" else (small["dir"] / "tokenizer.model.v3").read_bytes())
    assert open_checkpoint(d).tokenizer == d / chosen
    ck = open_checkpoint(write_tar(d, tmp_path / "r.tar"))
    assert ck.tokenizer_where.endswith(f"r.tar:{chosen}")


def test_tekken_alone_says_to_pass_tokenizer(small, tmp_path, capsys):
    d = write_release(small["torrent"], tmp_path / "r", tokenizer="")
    (d / "tekken.json").write_text(json.dumps({"config": {"default_vocab_size": 100}, "vocab": []}))
    tar = write_tar(d, tmp_path / "r.tar", "r")
    for src in (d, tar):
        code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
        line = one_line(err)
        assert code == 2 and "tekken.json" in line and "--tokenizer PATH" in line and "100 pieces" in line
        assert not (tmp_path / "o").exists()
        out = tmp_path / f"ok-{src.name}"
        code, _, err = cli("split", src, "-n", 2, "-o", out, "-q", "--tokenizer",
                           small["dir"] / "tokenizer.model.v3", capsys=capsys)
        assert code == 0, err
        assert (out / "tokenizer.model").read_bytes() == (small["dir"] / "tokenizer.model.v3").read_bytes()
    info = json.loads(cli("inspect", tar, "--json", capsys=capsys)[1])
    assert info["tokenizer"] is None and "tekken.json" in info["tokenizer_problem"]
    info = json.loads(cli("inspect", d / "tekken.json", "--json", capsys=capsys)[1])
    assert "Tekken" in info["what"] and "--tokenizer" in info["what"] and info["vocab_size"] == 100


def test_wrong_tokenizer_in_tar_is_named_by_member(small, tmp_path, capsys):
    d = write_release(small["torrent"], tmp_path / "r", tokenizer="")
    (d / "tokenizer.model.v3").write_bytes((small["dir"] / "tokenizer.model.v3").read_bytes())
    (d / "params.json").write_text(json.dumps(dict(params_json(tiny_config(**SMALL_22B)), vocab_size=100)))
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in d.iterdir():
        shutil.copy(p, bad / p.name)
    (bad / "tokenizer.model.v3").write_bytes(b"not a sentencepiece model")
    code, _, err = cli("split", write_tar(bad, tmp_path / "bad.tar"), "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    line = one_line(err)
    assert code == 2 and "bad.tar:tokenizer.model.v3: not a SentencePiece model" in line and "/proc/" not in line


# ----------------------------------------------------------------------------- refusals
def test_both_weight_files_is_ambiguous(small, tmp_path, capsys):
    d = tmp_path / "both"
    shutil.copytree(small["dir"], d)
    shutil.copy(small["torrent"] / "consolidated.00.pth", d)
    for src in (d, write_tar(d, tmp_path / "both.tar", "both")):
        for cmd in (("split", src, "-n", 2, "-o", tmp_path / "o"), ("inspect", src),
                    ("merge", src, "-o", tmp_path / "o")):
            code, _, err = cli(*cmd, capsys=capsys)
            line = one_line(err)
            assert code == 2 and "consolidated.safetensors" in line and "consolidated.00.pth" in line
            assert "ambiguous" in line and "mistral-inference refuses" in line
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind,opener,suffix", [("gzip", gzip.open, ".tar.gz"), ("bzip2", bz2.open, ".tar.bz2"),
                                                ("xz", lzma.open, ".tar.xz"), ("gzip", gzip.open, ".tar")])
def test_compressed_tar_refused(small, tmp_path, capsys, kind, opener, suffix):
    tar = tmp_path / f"Mixtral{suffix}"
    with opener(tar, "wb") as f:
        f.write(small["flat-tar"].read_bytes())
    for cmd in (("split", tar, "-n", 2, "-o", tmp_path / "o"), ("inspect", tar)):
        code, _, err = cli(*cmd, capsys=capsys)
        line = one_line(err)
        assert code == 2 and f"compressed tar ({kind})" in line and "extract it first" in line and "tar -xf" in line
    assert not (tmp_path / "o").exists()


def test_damaged_archives_refused(small, tmp_path, capsys):
    data = small["tar"].read_bytes()
    st = next(m for m in tarfile.open(small["tar"]).getmembers() if m.name.endswith("consolidated.safetensors"))
    cases = {"cut-inside-data.tar": (data[: st.offset_data + st.size // 2], "truncated"),
             "cut-at-end.tar": (data[: st.offset_data + st.size - 1], "truncated"),
             "not-a-tar.tar": (b"\x07" * 4096, "not a readable tar"),
             "empty.tar": (b"\0" * 10240, "empty tar")}
    corrupt = bytearray(data)
    corrupt[st.offset_data + 8] = ord("[")  # the header is no longer JSON
    cases["bad-header.tar"] = (bytes(corrupt), "header is not valid JSON")
    for name, (raw, why) in cases.items():
        (tmp_path / name).write_bytes(raw)
        code, _, err = cli("split", tmp_path / name, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
        assert code == 2 and why in one_line(err), (name, err)
    assert not (tmp_path / "o").exists()


def test_tar_contents_refused_by_name(small, tmp_path, capsys):
    d = tmp_path / "pth"
    d.mkdir()
    for f in ("consolidated.00.pth", "params.json", "tokenizer.model"):
        shutil.copy(small["torrent"] / f, d)
    no_params = tmp_path / "noparams"
    shutil.copytree(small["dir"], no_params)
    (no_params / "params.json").unlink()
    two = tmp_path / "two.tar"
    with tarfile.open(two, "w") as tf:
        for arc in ("a", "b"):
            tf.add(small["dir"] / "consolidated.safetensors", f"{arc}/consolidated.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "README").write_text("x")
    for tar, why in ((write_tar(d, tmp_path / "pth.tar"), "extract it"),
                     (write_tar(no_params, tmp_path / "noparams.tar"), "no params.json"),
                     (two, "several folders"),
                     (write_tar(other, tmp_path / "other.tar"), "no consolidated.safetensors in the archive")):
        code, _, err = cli("split", tar, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
        assert code == 2 and why in one_line(err), (tar, err)


def test_shapes_disagreeing_with_params_named(small, tmp_path, capsys):
    d = tmp_path / "r"
    shutil.copytree(small["dir"], d)
    (d / "params.json").write_text(json.dumps(dict(params_json(tiny_config(**SMALL_22B)), n_kv_heads=8)))
    for src in (d, write_tar(d, tmp_path / "r.tar")):
        code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
        line = one_line(err)
        assert code == 2 and "layers.0.attention.wk.weight" in line and "params.json" in line


# ----------------------------------------------------------------------------- inspect
def test_inspect_names_each_form(small, tmp_path, capsys):
    info = json.loads(cli("inspect", small["tar"], "--json", capsys=capsys)[1])
    assert info["format"] == "mistral" and "tar" in info["what"] and info["tensors"] == len(
        tiny_config(**SMALL_22B).canonical_shapes())
    assert {f["name"] for f in info["files"]} == {f"Mixtral-8x22B-v0.3/{n}" for n in (
        "consolidated.safetensors", "params.json", "tokenizer.model.v3")}
    assert info["archive"]["bytes"] == small["tar"].stat().st_size and info["tokenizer"] == {"pieces": 100}
    info = json.loads(cli("inspect", small["dir"], "--json", capsys=capsys)[1])
    assert info["format"] == "mistral" and info["tokenizer_file"] == "tokenizer.model.v3"
    assert ModelConfig.from_params(info["config"]) == tiny_config(**SMALL_22B)
    info = json.loads(cli("inspect", small["dir"] / "tokenizer.model.v3", "--json", capsys=capsys)[1])
    assert info["what"] == "SentencePiece tokenizer" and info["pieces"] == 100
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    data = (small["dir"] / "consolidated.safetensors").read_bytes()
    for i in range(3):
        (pieces / f"consolidated.safetensors.{i}").write_bytes(data[i * len(data) // 3:(i + 1) * len(data) // 3])
    info = json.loads(cli("inspect", pieces / "consolidated.safetensors.1", "--json", capsys=capsys)[1])
    assert "byte piece 1 of consolidated.safetensors" in info["what"] and "concat" in info["what"]
    for cmd in (("inspect", pieces), ("split", pieces, "-o", tmp_path / "o")):
        code, _, err = cli(*cmd, capsys=capsys)
        assert code == 2 and f"mixtral-convert concat {pieces}" in one_line(err)


def test_fused_names_in_safetensors_are_unfused(small, tmp_path, capsys):
    """A consolidated.safetensors with Mistral's fused block_sparse_moe names reads the same."""
    cfg = tiny_config(**SMALL_22B)
    sd = load(small["torrent"] / "consolidated.00.pth")
    fused = {k.replace(".feed_forward.gate.", ".block_sparse_moe.gate."): v for k, v in sd.items()
             if ".experts." not in k}
    for L in range(cfg.n_layers):
        ex = [[sd[f"layers.{L}.feed_forward.experts.{e}.{w}.weight"] for e in range(cfg.num_experts)]
              for w in ("w1", "w2", "w3")]
        fused[f"layers.{L}.block_sparse_moe.w1"] = torch.cat(ex[0])
        fused[f"layers.{L}.block_sparse_moe.w3"] = torch.cat(ex[2])
        fused[f"layers.{L}.block_sparse_moe.w2"] = torch.cat([t.t() for t in ex[1]])
    d = tmp_path / "fused"
    shutil.copytree(small["dir"], d)
    save_file({k: v.contiguous() for k, v in fused.items()}, d / "consolidated.safetensors")
    assert cli("merge", write_tar(d, tmp_path / "f.tar"), "-o", tmp_path / "m", "-q", capsys=capsys)[0] == 0
    assert_same_as_torrent(small["torrent"], tmp_path / "m")


def test_tokenizer_option_takes_a_directory_of_mistral_tokenizer_files(small, tmp_path, capsys):
    """--tokenizer DIR finds Mistral's tokenizer.model.v3 (or .v1) there, as the reader does."""
    d = write_release(small["torrent"], tmp_path / "r", tokenizer="")
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    (tokdir / "tokenizer.model.v3").write_bytes((small["dir"] / "tokenizer.model.v3").read_bytes())
    out = tmp_path / "o"
    code, _, err = cli("split", d, "-n", 2, "-o", out, "-q", "--tokenizer", tokdir, capsys=capsys)
    assert code == 0, err
    assert (out / "tokenizer.model").read_bytes() == (tokdir / "tokenizer.model.v3").read_bytes()
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o2", "--tokenizer", tmp_path / "r", capsys=capsys)
    assert code == 2 and "--tokenizer directory holds no tokenizer.model" in err


def test_a_tokenizer_copy_on_disk_is_removed_when_the_command_exits(tmp_path, monkeypatch):
    """Where there is no memfd, a tar member's tokenizer is copied to a temporary file; the console
    entry leaves with os._exit (no atexit handlers), so it removes the copies itself first."""
    from mixtral_convert import entry
    from mixtral_convert.formats import mistral
    monkeypatch.delattr(os, "memfd_create", raising=False)
    made = []

    def fake_main():
        made.append(mistral._memory_file(b"spm bytes", "tokenizer.model", ("test", tmp_path)))
        assert made[0].read_bytes() == b"spm bytes"

    exits = []
    monkeypatch.setattr(entry, "main", fake_main)
    monkeypatch.setattr(entry.os, "_exit", exits.append)
    entry.entry()
    assert exits == [0] and made and not made[0].exists()
