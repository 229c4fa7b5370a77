"""GGUF files in (issue 27): old per-expert Mixtral GGUFs restacked into today's layout by `merge
--to gguf` with the bytes copied, named by `inspect`, proved by `verify --source`; quantized GGUFs
as sources only with --dequantize, through gguf's own `gguf.quants.dequantize`. The old files are
the tool's own outputs rewritten by tests/gguf/old_layout.py with the gguf package's writer
(mixtral-convert writes nothing in the old layout). llama.cpp's judgement: test_old_gguf_llama.py."""

import hashlib
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from gguf_cases import merge_gguf
from helpers import cli, load
from old_layout import expert_bytes, to_per_expert

from mixtral_convert.formats.gguf import restack as gguf_restack

ORDER = [3, 1, 0, 2, 7, 6, 5, 4]  # the experts sprinkled, as the first MoE converter could write them


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def old(ggufs, tmp_path_factory):
    """{type: (stacked original, its per-expert rewrite)} for q8_0 and float16."""
    d = tmp_path_factory.mktemp("old")
    return {t: (ggufs[t], to_per_expert(ggufs[t], d / f"old-{t}.gguf", experts=ORDER)) for t in ("q8_0", "float16")}


@pytest.mark.parametrize("dtype", ["q8_0", "float16"])
def test_restacked_file_is_the_original_stacked_file_byte_for_byte(old, dtype, tmp_path, capsys):
    stacked, per_expert = old[dtype]
    names = set(tensors(per_expert))
    assert "blk.1.ffn_down.5.weight" in names and not any(n.endswith("_exps.weight") for n in names)
    out = tmp_path / "new.gguf"
    code, text, err = cli("merge", per_expert, "--to", "gguf", "-o", out, capsys=capsys)
    assert code == 0, err
    assert sha(out) == sha(stacked)  # every tensor, every metadata key, general.file_type, the order
    want, got = tensors(stacked), tensors(out)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type and np.array_equal(got[name].data, t.data), name
    m = json.loads((tmp_path / "new.gguf.mixtral-convert-manifest.json").read_text())
    assert m["restacked"]["stacked_tensors"] == 6 and m["dtype"] == dtype and m["source"]["format"] == "gguf-per-expert"
    assert m["files"]["new.gguf"]["sha256"] == sha(out)
    assert cli("verify", out, capsys=capsys)[0] == 0


def test_default_output_and_the_dtype_rule(old, tmp_path, capsys):
    """No -o: OLD-stacked.gguf beside it; --dtype equal to the file's type restacks too; another --dtype
    is a conversion, which a quantized source needs --dequantize for."""
    stacked, per_expert = old["q8_0"]
    src = tmp_path / "m.gguf"
    src.write_bytes(per_expert.read_bytes())
    code, out, err = cli("merge", src, "--to", "gguf", "--dry-run", capsys=capsys)
    assert code == 0 and "m-stacked.gguf  " in out and f"({stacked.stat().st_size} bytes)" in out, out + err
    assert not (tmp_path / "m-stacked.gguf").exists()
    assert cli("merge", src, "--to", "gguf", "-q", capsys=capsys)[0] == 0
    assert sha(tmp_path / "m-stacked.gguf") == sha(stacked)
    code, _, err = cli("merge", src, "--to", "gguf", "-o", src, "--force", capsys=capsys)
    assert code == 2 and "is the source" in err and sha(src) == sha(per_expert), err
    assert cli("merge", src, "--to", "gguf", "--dtype", "q8_0", "-o", tmp_path / "b.gguf", "-q", capsys=capsys)[0] == 0
    assert sha(tmp_path / "b.gguf") == sha(stacked)
    code, _, err = cli("merge", src, "--to", "gguf", "--dtype", "float16", "-o", tmp_path / "c.gguf", capsys=capsys)
    assert code == 2 and "--dequantize" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c.gguf").exists()
    code, _, err = cli("merge", src, "--to", "gguf", "--name", "x", "-o", tmp_path / "d.gguf", capsys=capsys)
    assert code == 2 and "--name" in err and not (tmp_path / "d.gguf").exists(), err


def test_restack_in_gguf_split_pieces_equals_the_tools_own_pieces(old, src7, tmp_path, capsys):
    _, per_expert = old["q8_0"]
    merge_gguf(src7, tmp_path / "want.gguf", "q8_0", "--max-shard-size", "60KB")
    code, _, err = cli("merge", per_expert, "--to", "gguf", "-o", tmp_path / "got.gguf", "--max-shard-size", "60KB",
                       "-q", capsys=capsys)
    assert code == 0, err
    want = sorted(tmp_path.glob("want-*-of-*.gguf"))
    got = sorted(tmp_path.glob("got-*-of-*.gguf"))
    assert len(want) > 2 and [p.name[4:] for p in got] == [p.name[5:] for p in want]
    assert [sha(p) for p in got] == [sha(p) for p in want]


def test_inspect_names_the_layout_and_the_command_that_fixes_it(old, capsys):
    stacked, per_expert = old["q8_0"]
    code, out, _ = cli("inspect", per_expert, "--json", capsys=capsys)
    info = json.loads(out)
    assert code == 0 and "per-expert layout, which today's llama.cpp no longer loads" in info["what"]
    assert info["fix"].startswith(f"mixtral-convert merge {per_expert} --to gguf")
    assert info["types"] == {"F32": 7, "Q8_0": 2 + 2 * (4 + 3 * 8)}
    code, out, _ = cli("inspect", stacked, "--json", capsys=capsys)
    assert code == 0 and "fix" not in json.loads(out) and "per-expert" not in json.loads(out)["what"]


def test_verify_against_the_old_file_proves_the_restack(old, tmp_path, capsys):
    stacked, per_expert = old["q8_0"]
    code, out, err = cli("verify", stacked, "--source", per_expert, capsys=capsys)
    assert code == 0 and "byte for byte" in out, out + err
    bad = tmp_path / "bad.gguf"
    data = bytearray(stacked.read_bytes())
    t = tensors(stacked)["blk.1.ffn_up_exps.weight"]
    data[t.data_offset + 5 * t.data[0].nbytes + 7] ^= 1  # a byte of expert 5
    bad.write_bytes(bytes(data))
    code, out, err = cli("verify", bad, "--source", per_expert, capsys=capsys)
    assert code == 1 and "blk.1.ffn_up_exps.weight" in err and "differs" in err, out + err


def test_copied_a_bounded_chunk_at_a_time(old, tmp_path, monkeypatch, capsys):
    stacked, per_expert = old["q8_0"]
    monkeypatch.setattr(gguf_restack, "COPY_BYTES", 1000)
    sizes = []
    chunks = gguf_restack.chunks

    def spy(t):
        for c in chunks(t):
            sizes.append(c.nbytes)
            yield c
    monkeypatch.setattr(gguf_restack, "chunks", spy)
    assert cli("merge", per_expert, "--to", "gguf", "-o", tmp_path / "n.gguf", "-q", capsys=capsys)[0] == 0
    assert sha(tmp_path / "n.gguf") == sha(stacked) and max(sizes) <= 1000 and len(sizes) > 100


def test_mixed_expert_types_refused_by_layer_or_converted_with_the_flag(ggufs, tmp_path, capsys):
    """Layer 1's ffn_down experts 2 and 5 from the F16 file, the rest Q8_0: refused in one line naming the
    layer and both types, nothing written; with --convert-mixed-experts q8_0 those two are gguf's dequantize
    of their F16 bytes quantized to Q8_0 by gguf, every other byte copied; the summary and manifest say so."""
    mixed = to_per_expert(ggufs["q8_0"], tmp_path / "mixed.gguf", mixed={(1, "down"): (ggufs["float16"], [2, 5])})
    out = tmp_path / "n.gguf"
    code, _, err = cli("merge", mixed, "--to", "gguf", "-o", out, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
    assert "layer 1's ffn_down" in err and "Q8_0: experts 0, 1, 3, 4, 6, 7" in err and "F16: experts 2, 5" in err
    assert "--convert-mixed-experts" in err
    code, _, err = cli("merge", mixed, "--to", "gguf", "-o", out, "--convert-mixed-experts", "q8_0", capsys=capsys)
    assert code == 0 and "experts 2, 5 from F16 converted to Q8_0" in err, err
    got, want, f16 = tensors(out), tensors(ggufs["q8_0"]), tensors(ggufs["float16"])
    for name, t in want.items():
        if name != "blk.1.ffn_down_exps.weight":
            assert np.array_equal(got[name].data, t.data), name
    g = got["blk.1.ffn_down_exps.weight"]
    assert g.tensor_type == T.Q8_0
    for e in range(8):
        if e in (2, 5):
            values = quants.dequantize(expert_bytes(f16["blk.1.ffn_down_exps.weight"], e), T.F16).astype(np.float32)
            assert np.array_equal(expert_bytes(g, e), quants.quantize(values, T.Q8_0)), e
        else:
            assert np.array_equal(expert_bytes(g, e), expert_bytes(want["blk.1.ffn_down_exps.weight"], e)), e
    m = json.loads((tmp_path / "n.gguf.mixtral-convert-manifest.json").read_text())
    assert m["converted_mixed_experts"]["blk.1.ffn_down_exps.weight"]["converted_experts"] == {"F16": [2, 5]}
    code, out_text, err = cli("verify", out, "--source", mixed, capsys=capsys)
    assert code == 0, out_text + err
    code, _, err = cli("merge", ggufs["q8_0"], "--to", "gguf", "-o", tmp_path / "x.gguf", "--convert-mixed-experts",
                       "q8_0", capsys=capsys)
    assert code == 2 and "per-expert layout" in err, err


# ----------------------------------------------------------------------------- --dequantize
@pytest.mark.parametrize("layout", ["split", "split-sparse"])
def test_quantized_source_refused_without_the_flag(ggufs, src7, layout, tmp_path, capsys):
    tok = ("--tokenizer", src7 / "tokenizer.model")
    code, _, err = cli(layout, ggufs["q8_0"], "-n", 2, "-o", tmp_path / "a", *tok, capsys=capsys)
    assert code == 2 and "--dequantize" in err and "Q8_0" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists()
    code, _, err = cli(layout, src7, "-n", 2, "-o", tmp_path / "b", "--dequantize", capsys=capsys)
    assert code == 2 and "not a quantized GGUF" in err and not (tmp_path / "b").exists(), err
    code, _, err = cli("merge", ggufs["q8_0"], "--to", "hf", "-o", tmp_path / "c", *tok, capsys=capsys)
    assert code == 2 and "--dequantize" in err and not (tmp_path / "c").exists(), err


@pytest.mark.parametrize("dtype", ["float32", None])
def test_a_dequantized_accessory_shard_is_gguf_dequantize_bit_for_bit(ggufs, src7, dtype, tmp_path, capsys):
    """split -n 1 --dequantize: every shard tensor is gguf.quants.dequantize of the source tensor's bytes
    (float32: bit for bit; the default, bfloat16: those values rounded by torch), experts unstacked; the
    manifest and the summary record the lossy source and its types."""
    q = ggufs["q8_0"]
    out = tmp_path / "acc"
    extra = ("--dtype", dtype) if dtype else ()
    code, _, err = cli("split", q, "-n", 1, "-o", out, "--tokenizer", src7 / "tokenizer.model", "--dequantize",
                       *extra, capsys=capsys)
    assert code == 0, err
    assert "quantized GGUF (q8_0: Q8_0 x16, F32 x7)" in err and "lossy" in err
    shard = load(out / "consolidated.00-of-01.model.pth")
    want_dtype = torch.float32 if dtype else torch.bfloat16
    src = tensors(q)
    checked = 0
    for name, t in src.items():
        values = quants.dequantize(np.ascontiguousarray(t.data), t.tensor_type).astype(np.float32)
        key = {"blk.0.ffn_gate_exps.weight": "llma.layers.0.feed_forward.experts.{e}.w1.weight",
               "blk.1.ffn_down_exps.weight": "llma.layers.1.feed_forward.experts.{e}.w2.weight",
               "token_embd.weight": "llma.tok_embeddings.weight", "output.weight": "llma.output.weight",
               "blk.1.attn_q.weight": "llma.layers.1.attention.wq.weight"}.get(name)
        if key is None:
            continue
        for e in range(values.shape[0] if "{e}" in key else 1):
            want = torch.from_numpy(values[e] if "{e}" in key else values).to(want_dtype)
            got = shard[key.format(e=e)]
            assert got.dtype == want_dtype and torch.equal(got.view(torch.uint8 if dtype else torch.int16),
                                                           want.view(torch.uint8 if dtype else torch.int16)), key
            checked += 1
    assert checked == 8 + 8 + 3
    m = json.loads((out / "mixtral-convert-manifest.json").read_text())
    assert m["source"]["lossy"] == {"dequantized": "gguf.quants.dequantize, to float32", "file_type": "q8_0",
                                    "tensor_types": {"Q8_0": 16, "F32": 7}}
    assert m["dtype"] == ("float32" if dtype else "bfloat16")


def test_merge_with_dequantize_and_verify_forward_against_the_dequantized_gguf(ggufs, src7, tmp_path, capsys):
    """merge --dequantize --to gguf and --to torrent; `verify --forward` of a dequantized Accessory output
    compares with the GGUF's dequantized values (a difference of float rounding), not the original model."""
    q, tok = ggufs["q8_0"], ("--tokenizer", src7 / "tokenizer.model")
    code, _, err = cli("merge", q, "--to", "torrent", "--dequantize", "--dtype", "float32", "-o", tmp_path / "t", *tok,
                       capsys=capsys)
    assert code == 0 and "lossy" in err, err
    tor = load(tmp_path / "t" / "consolidated.00.pth")["layers.0.feed_forward.experts.6.w3.weight"]
    up = tensors(q)["blk.0.ffn_up_exps.weight"]
    assert torch.equal(tor, torch.from_numpy(quants.dequantize(expert_bytes(up, 6), T.Q8_0).astype(np.float32)))
    code, _, err = cli("merge", q, "--to", "gguf", "--dequantize", "--dtype", "q8_0", "-o", tmp_path / "rt.gguf",
                       *tok, "-q", capsys=capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "rt.gguf.mixtral-convert-manifest.json").read_text())
    assert m["source"]["lossy"]["file_type"] == "q8_0"
    code, out, err = cli("verify", tmp_path / "rt.gguf", "--source", q, capsys=capsys)  # Q8_0 of the dequantized values
    assert code == 0 and "block for block" in out, out + err
    acc = tmp_path / "acc"
    assert cli("split", q, "-n", 2, "-o", acc, *tok, "--dequantize", "--dtype", "float32", "-q", capsys=capsys)[0] == 0
    code, out, err = cli("verify", acc, "--source", q, "--forward", "--json", capsys=capsys)
    assert code == 0, out + err
    fwd = json.loads(out)["forward"]
    assert fwd["max_abs_diff"] < 1e-4, fwd
    code, out, err = cli("verify", acc, "--source", src7, "--forward", "--json", capsys=capsys)
    assert json.loads(out)["forward"]["max_abs_diff"] > 100 * fwd["max_abs_diff"]


def test_a_type_gguf_cannot_dequantize_is_refused_by_tensor_and_type(ggufs, src7, tmp_path, capsys):
    bad = to_per_expert(ggufs["q8_0"], tmp_path / "i8.gguf", stack=True,
                        replace={"output.weight": np.zeros((1024, 64), dtype=np.int8)})
    code, _, err = cli("split", bad, "-n", 1, "-o", tmp_path / "a", "--dequantize", "--tokenizer",
                       src7 / "tokenizer.model", capsys=capsys)
    assert code == 2 and "'output.weight' is I8" in err and "cannot dequantize" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
