"""--dtype on split, split-sparse and merge: tensors cast a block at a time as they stream, the
dtype recorded, verify comparing with the source cast the same way, float16 overflow refused."""

import json
import shutil

import pytest
import torch
from helpers import WIDE, cli, load, same_bytes, write_pth

from mixtral_convert.synth import tiny_config, write_torrent


@pytest.fixture(scope="module")
def src32(tmp_path_factory):
    return write_torrent(tmp_path_factory.mktemp("f32") / "src", tiny_config(**WIDE), seed=7, dtype=torch.float32)


def test_split_to_float32_and_back_to_bfloat16_is_exact(wide_src, tmp_path, capsys):
    out = tmp_path / "f32"
    assert cli("split", wide_src, "-n", 2, "-o", out, "--dtype", "float32", "-q", capsys=capsys)[0] == 0
    canon = load(wide_src / "consolidated.00.pth")
    shard = load(out / "consolidated.01-of-02.model.pth")
    assert {t.dtype for t in shard.values()} == {torch.float32}
    assert same_bytes(shard["llma.norm.weight"], canon["norm.weight"].float())
    assert same_bytes(shard["llma.layers.1.feed_forward.experts.5.w2.weight"],
                      canon["layers.1.feed_forward.experts.5.w2.weight"].float())
    manifest = json.loads((out / "mixtral-convert-manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["source"]["dtype"] == "bfloat16"
    code, text, _ = cli("inspect", out, "--json", capsys=capsys)
    assert json.loads(text)["dtypes"] == {"float32": len(canon)}
    code, text, err = cli("verify", out, "--source", wide_src, capsys=capsys)
    assert code == 0, err
    assert "compared with the source's bfloat16 values cast to float32" in text
    # one flipped value is still caught against the cast source
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sd = {k: v.clone() for k, v in load(bad / "consolidated.00-of-02.model.pth").items()}
    sd["llma.layers.0.attention.wq.weight"][3, 2] += 1e-3
    write_pth(bad / "consolidated.00-of-02.model.pth", sd)
    code, _, err = cli("verify", bad, "--source", wide_src, capsys=capsys)
    assert code == 1 and "llma.layers.0.attention.wq.weight" in err and "[3, 2]" in err, err
    # and back: bf16 -> fp32 -> bf16 loses nothing
    assert cli("merge", out, "-o", tmp_path / "m", "--dtype", "bfloat16", "-q", capsys=capsys)[0] == 0
    merged = load(tmp_path / "m" / "consolidated.00.pth")
    assert list(merged) == list(canon) and all(same_bytes(merged[k], canon[k]) for k in canon)


def test_split_sparse_to_float16_holds_the_cast_values(src32, tmp_path, capsys):
    out = tmp_path / "f16"
    assert cli("split-sparse", src32, "-n", 4, "-o", out, "--dtype", "float16", "-q", capsys=capsys)[0] == 0
    canon = load(src32 / "consolidated.00.pth")
    shard = load(out / "consolidated.02-of-04.model.pth")
    hs = WIDE["hidden_dim"] // 4
    w2 = shard["llma.layers.0.feed_forward.w2"]
    assert w2.dtype == torch.float16
    expected = canon["layers.0.feed_forward.experts.3.w2.weight"][:, 2 * hs:3 * hs].t().to(torch.float16)
    assert same_bytes(w2[3 * hs:4 * hs], expected)
    code, text, err = cli("verify", out, "--source", src32, "--forward", capsys=capsys)
    assert code == 0, err
    assert "judged with the float16 tolerance" in text


def test_merge_to_hf_in_bfloat16(src32, tmp_path, capsys):
    from safetensors import safe_open
    assert cli("merge", src32, "--to", "hf", "-o", tmp_path / "hf", "--dtype", "bfloat16", "-q",
               "--max-position-embeddings", 4096,
               capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    canon = load(src32 / "consolidated.00.pth")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert same_bytes(f.get_tensor("lm_head.weight"), canon["output.weight"].bfloat16())


def test_float16_overflow_refused_naming_tensor_and_count(src32, tmp_path, capsys):
    src = tmp_path / "big"
    shutil.copytree(src32, src)
    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    w = sd["layers.1.feed_forward.experts.6.w1.weight"]
    w[0, :2] = 7e4
    w[-1, -1] = -1e6
    sd["norm.weight"][0] = float("inf")  # already infinite: not an overflow of the cast
    write_pth(src / "consolidated.00.pth", sd)
    code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o", "--dtype", "float16", capsys=capsys)
    assert code == 2, err
    assert "'layers.1.feed_forward.experts.6.w1.weight' has 3 value(s) beyond ±65504" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # nothing half-written beside it either
    # bfloat16 holds them
    assert cli("split", src, "-n", 2, "-o", tmp_path / "o", "--dtype", "bfloat16", "-q", capsys=capsys)[0] == 0


def test_tolerance_follows_the_coarser_of_compute_and_storage():
    from mixtral_convert.forward.parity import TOLERANCES, tolerance_for
    assert tolerance_for("float32", torch.float32, torch.float32) == ("float32", TOLERANCES["float32"])
    assert tolerance_for("float32", torch.bfloat16, torch.float32) == ("bfloat16", TOLERANCES["bfloat16"])
    assert tolerance_for("float32", torch.float16, torch.float32) == ("float16", TOLERANCES["float16"])
    assert tolerance_for("bfloat16", torch.float16, torch.float32) == ("bfloat16", TOLERANCES["bfloat16"])
    assert tolerance_for("float32", torch.float32, torch.bfloat16) == ("float32", TOLERANCES["float32"])
