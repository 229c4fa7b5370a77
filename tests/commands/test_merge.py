"""merge checks its source the same way whatever the target: the tokenizer against the
vocabulary, one dtype for every tensor; and it refuses before writing anything."""

import shutil

import pytest
from helpers import cli, load, write_pth

from mixtral_convert.synth import train_tokenizer


@pytest.mark.parametrize("to", ["torrent", "hf"])
def test_tokenizer_with_wrong_piece_count_refused_for_every_target(wide_src, tmp_path, capsys, to):
    d = tmp_path / "b2"
    assert cli("split", wide_src, "-n", 2, "-o", d, "-q", capsys=capsys)[0] == 0
    (d / "tokenizer.model").write_bytes(train_tokenizer(96))  # the model has 128 rows
    code, _, err = cli("merge", d, "--to", to, "-o", tmp_path / "out", capsys=capsys)
    assert code == 2 and "96 pieces" in err and "128 rows" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["torrent", "hf"])
def test_mixed_dtypes_refused_for_every_target(wide_src, tmp_path, capsys, to):
    """An Accessory directory whose norms are float32 and the rest bfloat16 (every shard alike, so
    the layout itself is consistent) has no one dtype to declare in config.json: refused, named."""
    d = tmp_path / "b2"
    assert cli("split", wide_src, "-n", 2, "-o", d, "-q", capsys=capsys)[0] == 0
    for f in sorted(d.glob("*.model.pth")):
        sd = {k: (v.float() if k.endswith("norm.weight") else v.clone()) for k, v in load(f).items()}
        write_pth(f, sd)
    code, _, err = cli("merge", d, "--to", to, "-o", tmp_path / "out", capsys=capsys)
    assert code == 2 and "mixed dtypes" in err and "float32" in err and "bfloat16" in err, err
    assert not (tmp_path / "out").exists()


def test_merge_to_hf_declares_the_tensors_dtype(wide_src, tmp_path, capsys):
    import json
    src = tmp_path / "src32"
    shutil.copytree(wide_src, src)
    sd = {k: v.float() for k, v in load(src / "consolidated.00.pth").items()}
    write_pth(src / "consolidated.00.pth", sd)
    assert cli("merge", src, "--to", "hf", "-o", tmp_path / "hf", "-q", "--max-position-embeddings", 4096,
               capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
