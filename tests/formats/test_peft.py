"""Accessory's PEFT saves in (docs/formats.md, "Accessory PEFT saves"): LoRA merged exactly, per the
layout rules, biases kept or refused, trainable-only saves on a base. The saves are written by
tests/peft_save.py, by hand from the layout table there."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_save as ps
from helpers import WIDE, cli, load, same_bytes

from mixtral_convert import synth
from mixtral_convert.errors import ConvertError
from mixtral_convert.formats.registry import open_checkpoint
from mixtral_convert.io import lora as lora_mod
from mixtral_convert.io.lazy import materialize
from mixtral_convert.model import tensors

CFG = synth.tiny_config(**WIDE)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    p.write_bytes(synth.train_tokenizer(CFG.vocab_size))
    return p


def save(tmp_path, tok, N, name="save", trainable_only=False, **kw):
    base, extra, norms = ps.make_model(CFG, N, **{k: v for k, v in kw.items() if k in
                                                  ("lora", "bias", "norm", "seed", "dtype", "a_same")})
    d = ps.write_save(tmp_path / name, CFG, N, base, extra, norms, trainable_only=trainable_only, tokenizer=tok,
                      bias_tuning=kw.get("bias", True), norm_tuning=kw.get("norm", True))
    return d, ps.expected_merged(CFG, N, base, extra, norms), base


def assert_model(ck, expected):
    assert set(ck.canonical) == set(expected), set(ck.canonical) ^ set(expected)
    bad = [k for k in expected if not same_bytes(materialize(ck.canonical[k]), expected[k])]
    assert bad == []


@pytest.mark.parametrize("N", [1, 2, 4])
def test_full_save_merges_exactly_per_rank(tmp_path, tok, N):
    """Every merged weight's bytes equal W + B·A with the documented placement: rank r's rows of wq/wk/wv with rank
    r's own A, wo's A from its column chunks, an expert's pair from its owner; biases chunked as the rows."""
    d, expected, _ = save(tmp_path, tok, N)
    assert_model(open_checkpoint(d), expected)


def test_rank0_lora_a_for_every_rank_is_a_different_model(tmp_path, tok, monkeypatch):
    """The column-parallel A is owned by each rank: reading rank 0's copy for every rank (treating it as
    replicated) gives other bytes than the expected model, so test_full_save_merges_exactly_per_rank fails."""
    d, expected, _ = save(tmp_path, tok, 2)
    wrong = tuple(dataclasses.replace(lr, a_parallel="replicated") if lr.a_parallel == "owned" else lr
                  for lr in tensors.LORA)
    monkeypatch.setattr(tensors, "LORA", wrong)
    ck = open_checkpoint(d)
    name = "layers.0.attention.wq.weight"
    assert not same_bytes(materialize(ck.canonical[name]), expected[name])


@pytest.mark.parametrize("rule", ["wo_a_whole", "wo_b_chunked", "wq_b_whole"])
def test_each_lora_rule_wrong_is_refused(tmp_path, tok, monkeypatch, rule):
    """wo's A chunked on columns, its B whole; wq's B chunked on rows: any other rule does not fit the
    shards Accessory writes (a one-line shape error)."""
    d, _, _ = save(tmp_path, tok, 2)
    change = {"wo_a_whole": ("wo", "a_parallel", "replicated"), "wo_b_chunked": ("wo", "b_parallel", "column_heads"),
              "wq_b_whole": ("wq", "b_parallel", "replicated")}[rule]
    wrong = tuple(dataclasses.replace(lr, **{change[1]: change[2]}) if lr.weight.short == change[0] else lr
                  for lr in tensors.LORA)
    monkeypatch.setattr(tensors, "LORA", wrong)
    with pytest.raises(ConvertError, match="has shape"):
        open_checkpoint(d)


def test_merge_bytes_do_not_depend_on_block_or_columns(tmp_path, tok, monkeypatch):
    """The fixed-order elementwise sum: a block of rows, a band of columns or a tiny internal step give the
    same bytes as one whole read."""
    d, expected, _ = save(tmp_path, tok, 4, dtype=torch.bfloat16)
    ck = open_checkpoint(d)
    for name in ("layers.1.attention.wo.weight", "layers.0.attention.wk.weight",
                 "layers.1.feed_forward.experts.5.w2.weight"):
        t = ck.canonical[name]
        whole = t.read(0, t.shape[0])
        assert same_bytes(whole, expected[name])
        rows = torch.cat([t.read(i, min(i + 3, t.shape[0])) for i in range(0, t.shape[0], 3)])
        cols = torch.cat([t.read(0, t.shape[0], c, min(c + 5, t.shape[1])) for c in range(0, t.shape[1], 5)], dim=1)
        monkeypatch.setattr(lora_mod, "CHUNK_ELEMENTS", 7)
        small = t.read(0, t.shape[0])
        monkeypatch.undo()
        assert same_bytes(rows, whole) and same_bytes(cols, whole) and same_bytes(small, whole)


def test_merged_bytes_same_after_split_1_and_split_4(tmp_path, tok, capsys):
    """LoRA + norm save (no biases): split -n 1, split -n 4, merge of each and merge of the save directly
    are one torrent, byte for byte; --to hf gives a complete repository; verify --source passes."""
    d, expected, _ = save(tmp_path, tok, 2, bias=False)
    outs = {}
    for n in (1, 4):
        assert cli("split", d, "-n", n, "-o", tmp_path / f"s{n}", "-q", capsys=capsys)[0] == 0
        assert json.loads((tmp_path / f"s{n}" / "meta.json").read_text()) == {"llama_type": "mixtral"}
        assert cli("verify", tmp_path / f"s{n}", "--source", d, capsys=capsys)[0] == 0
        assert cli("merge", tmp_path / f"s{n}", "-o", tmp_path / f"m{n}", "-q", capsys=capsys)[0] == 0
        outs[n] = (tmp_path / f"m{n}" / "consolidated.00.pth").read_bytes()
    assert cli("split-sparse", d, "-n", 4, "-o", tmp_path / "sp", "-q", capsys=capsys)[0] == 0  # column bands
    assert cli("verify", tmp_path / "sp", "--source", d, capsys=capsys)[0] == 0
    assert cli("merge", tmp_path / "sp", "-o", tmp_path / "msp", "-q", capsys=capsys)[0] == 0
    assert cli("merge", d, "-o", tmp_path / "md", "-q", capsys=capsys)[0] == 0
    assert outs[1] == outs[4] == (tmp_path / "md" / "consolidated.00.pth").read_bytes() == \
        (tmp_path / "msp" / "consolidated.00.pth").read_bytes()
    merged = load(tmp_path / "md" / "consolidated.00.pth")
    assert all(same_bytes(merged[k], expected[k]) for k in expected)
    code, _, err = cli("merge", d, "--to", "hf", "-o", tmp_path / "hf", "--max-position-embeddings", "4096",
                       capsys=capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}


def test_fp32_save_published_in_bf16_rounds_once(tmp_path, tok, capsys):
    d, expected, _ = save(tmp_path, tok, 2, bias=False)
    assert cli("merge", d, "-o", tmp_path / "m", "--dtype", "bfloat16", "-q", capsys=capsys)[0] == 0
    merged = load(tmp_path / "m" / "consolidated.00.pth")
    name = "layers.0.attention.wv.weight"
    assert same_bytes(merged[name], expected[name].to(torch.bfloat16))  # fp32 W + B·A, one rounding


def test_bias_tuned_save_splits_to_mixtral_peft_and_computes_the_model(tmp_path, tok, capsys):
    d, expected, _ = save(tmp_path, tok, 2)
    code, _, err = cli("split", d, "-n", 4, "-o", tmp_path / "s", capsys=capsys)
    assert code == 0 and "mixtral_peft" in err
    s = tmp_path / "s"
    assert json.loads((s / "meta.json").read_text()) == {"llama_type": "mixtral_peft"}
    config = json.loads((s / "config.json").read_text())
    assert (config["lora_rank"], config["bias_tuning"]) == (-1, True)
    r1 = load(s / "consolidated.01-of-04.model.pth")
    qb = expected["layers.0.attention.wq.bias"]
    assert same_bytes(r1["llma.layers.0.attention.wq.bias"], qb[qb.shape[0] // 4: qb.shape[0] // 2])
    assert same_bytes(r1["llma.layers.0.attention.wo.bias"], expected["layers.0.attention.wo.bias"])
    assert "llma.layers.0.feed_forward.experts.2.w2.bias" in r1 and not any("lora" in k for k in r1)
    assert cli("verify", s, "--source", d, capsys=capsys)[0] == 0
    code, out, _ = cli("verify", s, "--source", d, "--forward", capsys=capsys)
    assert code == 0, out  # the sharded forward with the biases against the unmerged PEFT model
    assert_model(open_checkpoint(s), expected)


@pytest.mark.parametrize("args", [("split-sparse", "-n", "2"), ("merge", "--to", "torrent"),
                                  ("merge", "--to", "hf", "--max-position-embeddings", "64")])
def test_targets_without_biases_refuse_before_writing(tmp_path, tok, capsys, args):
    d, _, _ = save(tmp_path, tok, 2)
    code, _, err = cli(args[0], d, "-o", tmp_path / "out", *args[1:], capsys=capsys)
    assert code == 2 and "'layers.0.attention.wq.bias' is a non-zero bias" in err and "split" in err
    assert not (tmp_path / "out").exists()


def test_drop_biases_is_recorded_and_verify_forward_fails(tmp_path, tok, capsys):
    d, _, _ = save(tmp_path, tok, 2)
    code, _, err = cli("split-sparse", d, "-n", 2, "-o", tmp_path / "o", "--drop-biases", capsys=capsys)
    assert code == 0 and "--drop-biases" in err
    m = json.loads((tmp_path / "o" / "mixtral-convert-manifest.json").read_text())
    assert m["dropped_biases"]["count"] == 56 and m["dropped_biases"]["max_abs"] > 0
    code, out, _ = cli("verify", tmp_path / "o", "--source", d, "--forward", capsys=capsys)
    assert code == 1 and "rms rel diff" in out and "non-zero biases" in out


def test_zero_biases_give_plain_mixtral(tmp_path, tok, capsys):
    base, extra, norms = ps.make_model(CFG, 2)
    extra = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in extra.items()}
    d = ps.write_save(tmp_path / "z", CFG, 2, base, extra, norms, tokenizer=tok)
    assert cli("split-sparse", d, "-n", 2, "-o", tmp_path / "o", "-q", capsys=capsys)[0] == 0
    assert cli("verify", tmp_path / "o", "--source", d, capsys=capsys)[0] == 0
    assert not any(k.endswith(".bias") for k in load(tmp_path / "o" / "consolidated.00-of-02.model.pth"))


@pytest.mark.parametrize("kind", ["lora_only", "bias_only", "norm_only"])
def test_partial_saves(tmp_path, tok, kind):
    kw = {"lora_only": dict(bias=False, norm=False), "bias_only": dict(lora=False, norm=False),
          "norm_only": dict(lora=False, bias=False)}[kind]
    d, expected, _ = save(tmp_path, tok, 2, **kw)
    assert_model(open_checkpoint(d), expected)


@pytest.mark.parametrize("base_kind,delta_n", [("torrent", 2), ("accessory", 4)])
def test_trainable_only_on_any_base(tmp_path, tok, capsys, base_kind, delta_n):
    d, expected, base = save(tmp_path, tok, delta_n, trainable_only=True)
    assert all(any(w in k for w in ("lora", "bias", "norm")) for k in load(d / f"consolidated.00-of-0{delta_n}"
                                                                           ".model.pth")["model"])
    src = synth.write_torrent(tmp_path / "base", CFG, seed=0, dtype=torch.float32)
    if base_kind == "accessory":
        assert cli("split", src, "-n", 2, "-o", tmp_path / "base2", "-q", capsys=capsys)[0] == 0
        src = tmp_path / "base2"
    assert_model(open_checkpoint(d, base=src), expected)
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o", "--base", src, "-q", capsys=capsys)
    assert code == 0, err
    assert cli("verify", tmp_path / "o", "--source", d, "--base", src, capsys=capsys)[0] == 0


def test_trainable_only_errors(tmp_path, tok, capsys):
    d, _, _ = save(tmp_path, tok, 2, trainable_only=True)
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "trainable-only" in err and "--base" in err
    other = synth.write_torrent(tmp_path / "other", synth.tiny_config(**dict(WIDE, hidden_dim=32)))
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o", "--base", other, capsys=capsys)
    assert code == 2 and "does not fit" in err and "hidden_dim" in err
    bad = tmp_path / "n3"
    bad.mkdir()
    for r in range(3):
        torch.save({"model": {"llma.norm.weight": torch.ones(CFG.dim)}}, bad / f"consolidated.{r:02d}-of-03.model.pth")
    for f in ("config.json", "meta.json"):
        (bad / f).write_bytes((d / f).read_bytes())
    fits = synth.write_torrent(tmp_path / "fits", CFG)
    code, _, err = cli("split", bad, "-n", 2, "-o", tmp_path / "o", "--base", fits, capsys=capsys)
    assert code == 2 and "3 rank files do not tile" in err


def test_lora_rank_checked(tmp_path, tok):
    d, _, _ = save(tmp_path, tok, 2)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, lora_rank=8)))
    with pytest.raises(ConvertError, match="lora_rank is 8"):
        open_checkpoint(d)


def test_inspect_says_what_the_save_is(tmp_path, tok, capsys):
    d, _, _ = save(tmp_path, tok, 2, trainable_only=True)
    code, out, _ = cli("inspect", d, "--json", capsys=capsys)
    info = json.loads(out)
    assert code == 0 and info["peft"] and info["lora_rank"] == 4 and info["save"].startswith("trainable-only")
    assert info["lora_modules"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"] and info["biases_nonzero"] == 56
    assert info["norm_tuning"] and info["replicated_copies_differ"] == []


def test_replicated_copies_that_differ_are_named(tmp_path, tok, capsys):
    d, _, _ = save(tmp_path, tok, 2, bias=False)
    f = d / "consolidated.01-of-02.model.pth"
    sd = load(f)
    sd["model"]["llma.layers.1.attention.wo.lora_b.weight"] += 1
    torch.save(sd, f)
    code, out, _ = cli("inspect", d, "--json", capsys=capsys)
    assert json.loads(out)["replicated_copies_differ"] == ["layers.1.attention.wo.lora_b.weight"]
    assert cli("split", d, "-n", 2, "-o", tmp_path / "o", "-q", capsys=capsys)[0] == 0
    code, out, _ = cli("verify", tmp_path / "o", "--source", d, capsys=capsys)
    assert code == 0 and "different copies" in out


def test_unmerged_forward_checks_the_merge(tmp_path, tok, monkeypatch):
    """verify --forward's reference computes x W^T + b + (x A^T) B^T: a merge that used rank 0's A would
    fail it (the check is independent of the merge)."""
    from mixtral_convert.forward.parity import parity
    d, _, _ = save(tmp_path, tok, 2)
    from mixtral_convert.commands.options import OutputOptions, SplitOptions
    from mixtral_convert.commands.split import split
    split(d, SplitOptions("base", 2), output=OutputOptions(tmp_path / "good", quiet=True))
    assert parity(tmp_path / "good", d).ok
    wrong = tuple(dataclasses.replace(lr, a_parallel="replicated") if lr.a_parallel == "owned" else lr
                  for lr in tensors.LORA)
    with monkeypatch.context() as m:
        m.setattr(tensors, "LORA", wrong)
        split(d, SplitOptions("base", 2), output=OutputOptions(tmp_path / "bad", quiet=True))
    rep = parity(tmp_path / "bad", d)
    assert not rep.ok and rep.rms_rel_diff > 1e-3


def test_trainable_only_fp32_delta_on_a_bf16_base(tmp_path, tok, capsys):
    """The delta's LoRA is merged in float32 into the base's bf16 weights (rounded once); its norms and
    biases are cast to the base's dtype; forward --base reads it too."""
    base, extra, norms = ps.make_model(CFG, 2, dtype=torch.float32)
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    d = ps.write_save(tmp_path / "delta", CFG, 2, base, extra, norms, trainable_only=True, tokenizer=tok)
    src = tmp_path / "base"
    src.mkdir()
    torch.save(base, src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps(CFG.to_params()))
    (src / "tokenizer.model").write_bytes(tok.read_bytes())
    expected = ps.expected_merged(CFG, 2, base, extra, norms)
    expected = {k: v.to(torch.bfloat16) for k, v in expected.items()}
    assert_model(open_checkpoint(d, base=src), expected)
    toks = tmp_path / "t.pt"
    torch.save(torch.tensor([[1, 5, 9, 3]]), toks)
    code, _, err = cli("forward", d, "--base", src, "--tokens-file", toks, "-o", tmp_path / "l.pt", capsys=capsys)
    assert code == 0, err


def test_distributed_forward_of_mixtral_peft_output(tmp_path, tok, capsys, monkeypatch):
    """The mixtral_peft output's ranks as processes over gloo: each adds its own bias chunks, wo's bias
    once after the all-reduce; the same logits, bit for bit, as the in-process sharded forward."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    d, _, _ = save(tmp_path, tok, 2)
    assert cli("split", d, "-n", 2, "-o", tmp_path / "s", "-q", capsys=capsys)[0] == 0
    toks = tmp_path / "t.pt"
    torch.save(torch.tensor([[1, 5, 9, 3, 7]]), toks)
    assert cli("forward", tmp_path / "s", "--tokens-file", toks, "-o", tmp_path / "one.pt", capsys=capsys)[0] == 0
    code, _, err = cli("forward", tmp_path / "s", "--tokens-file", toks, "-o", tmp_path / "dist.pt", "--distributed",
                       capsys=capsys)
    assert code == 0, err
    assert torch.equal(load(tmp_path / "one.pt"), load(tmp_path / "dist.pt"))


def test_which_copies_are_replicated_comes_from_the_table(tmp_path, tok, capsys):
    """inspect compares the copies of every tensor the table replicates (its parallelism, LoRA rows
    included), not a hand-written list: a full save whose ranks hold different routers says so (merge
    reads rank 0's), while the owned LoRA A of wq, whose copies differ by design, is not named."""
    d, _, _ = save(tmp_path, tok, 2, bias=False)
    f = d / "consolidated.01-of-02.model.pth"
    sd = load(f)
    sd["model"]["llma.layers.0.feed_forward.gate.weight"] += 1
    torch.save(sd, f)
    code, out, _ = cli("inspect", d, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["replicated_copies_differ"] == ["layers.0.feed_forward.gate.weight"]
    assert tensors.parallel_of("layers.3.attention.wq.lora_a.weight") == "owned"
    assert tensors.parallel_of("layers.3.attention.wo.lora_b.weight") == "replicated"
    assert tensors.parallel_of("layers.3.attention.wo.bias") == "replicated"
