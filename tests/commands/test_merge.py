"""merge checks its source the same way whatever the target: the tokenizer against the
vocabulary, one dtype for every tensor; and it refuses before writing anything."""

import shutil

import pytest
import torch
from helpers import cli, load, same_bytes, write_pth

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


def test_accessory_finetune_directory_publishes_to_hf(wide_src, tmp_path, capsys):
    """What LLaMA2-Accessory writes after finetuning (docs/formats.md, "Accessory finetune outputs"):
    shards saved as {"model": state_dict} in the training precision (float32 here), a config.json
    with every ModelArgs field, and optimizer / other / rank-specific files beside. merge --to hf
    --dtype bfloat16 reads it as the model, ignores the rest, and writes the bf16 weights."""
    import json

    from safetensors import safe_open
    epoch = tmp_path / "output" / "epoch0"
    assert cli("split-sparse", wide_src, "-n", 2, "-o", epoch, "-q", capsys=capsys)[0] == 0
    (epoch / "mixtral-convert-manifest.json").unlink()  # Accessory writes none
    for f in sorted(epoch.glob("*.model.pth")):
        torch.save({"model": {k: v.float() for k, v in load(f).items()}}, f)
        torch.save({"optimizer": {"step": torch.tensor(3)}}, f.with_name(f.name.replace(".model.", ".optimizer.")))
        torch.save({"epoch": torch.tensor(0)}, f.with_name(f.name.replace(".model.", ".other.")))
    torch.save({"rng": torch.zeros(4)}, epoch / "rank-specific-00000-of-00002.pth")
    cfg = json.loads((epoch / "config.json").read_text())
    cfg.update(max_seq_len=4096, max_batch_size=32, load_balancing_weight=0.1, rope_scaling=None)
    (epoch / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "my-model"
    code, _, err = cli("merge", epoch, "--to", "hf", "--dtype", "bfloat16", "--max-position-embeddings", 32768,
                       "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    assert cli("verify", out, "-q", capsys=capsys)[0] == 0
    canon = load(wide_src / "consolidated.00.pth")  # bf16 -> f32 -> bf16 is exact
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert same_bytes(f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
                          canon["layers.1.feed_forward.experts.3.w2.weight"])
        assert same_bytes(f.get_tensor("model.norm.weight"), canon["norm.weight"])
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32768
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
