"""`merge --to gguf`, read back with the gguf package's own reader (llama.cpp's judgement is in
test_llama.py): every hyper-parameter and the vocabulary in the metadata, every tensor's bytes
equal to the source cast (or Q8_0-quantized) the same way, norms and the router in F32, exact
sizes in --dry-run, gguf-split's pieces, refusals before anything is written, nothing left
after an interrupt or a full disk, --force only over its own output."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from gguf_cases import CONTEXT, copy_source, merge_gguf
from helpers import WIDE, cli, load, same_bytes

from mixtral_convert.commands.merge import merge
from mixtral_convert.commands.options import MergeOptions, OutputOptions
from mixtral_convert.formats.gguf.write import NAME_TABLE
from mixtral_convert.formats.registry import open_checkpoint
from mixtral_convert.io.lazy import materialize
from mixtral_convert.model.config import ModelConfig

TYPES = {"float32": (T.F32, torch.float32), "float16": (T.F16, torch.float16), "bfloat16": (T.BF16, torch.bfloat16)}


def meta(r: GGUFReader) -> dict:
    """Every metadata key -> its value (str, number, bool or list)."""
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def expected_tensors(canon: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GGUF name -> the source tensor it holds (experts stacked), from the name table, in the file's
    order: the embedding, layer after layer, output_norm and output."""
    rows = [(None, NAME_TABLE[0])] + [(L, r) for L in range(cfg.n_layers) for r in NAME_TABLE if "{L}" in r[0]] + \
        [(None, r) for r in NAME_TABLE[1:] if "{L}" not in r[0]]
    out = {}
    for L, (c, g) in rows:
        if "{e}" in c:
            out[g.format(L=L)] = torch.stack([canon[c.format(L=L, e=e)] for e in range(cfg.num_experts)])
        else:
            out[g.format(L=L)] = canon[c.format(L=L)]
    return out


def raw(t) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


# ----------------------------------------------------------------------------- metadata
def test_metadata_holds_every_hyperparameter_and_the_vocabulary(ggufs, src7):
    cfg = ModelConfig.from_json_file(src7 / "params.json")
    m = meta(GGUFReader(ggufs["q8_0"]))
    assert {k: m[k] for k in m if k.startswith(("general.", "llama."))} == {
        "general.architecture": "llama", "general.name": "mixtral-7b-tiny", "general.file_type": 7,
        "general.quantization_version": 2, "llama.vocab_size": 1024, "llama.context_length": CONTEXT,
        "llama.embedding_length": cfg.dim, "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.attention.key_length": cfg.head_dim,
        "llama.attention.value_length": cfg.head_dim, "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": pytest.approx(cfg.rope_theta), "llama.expert_count": 8, "llama.expert_used_count": 2,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps)}
    sp = spm.SentencePieceProcessor(model_file=str(src7 / "tokenizer.model"))
    n = sp.get_piece_size()
    assert m["tokenizer.ggml.model"] == "llama"
    assert m["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert m["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    assert m["tokenizer.ggml.token_type"] == types and types.count(6) == 256
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.unknown_token_id"]) \
        == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert (m["tokenizer.ggml.add_bos_token"], m["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert "tokenizer.chat_template" not in m
    assert [meta(GGUFReader(ggufs[t]))["general.file_type"] for t in ("float32", "float16", "bfloat16")] == [0, 1, 32]


def test_chat_template_name_and_context_length_carried(src7, tmp_path):
    src = copy_source(src7, tmp_path / "src")
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    out = merge_gguf(src, tmp_path / "a.gguf", "float16", "--name", "My Finetune")
    m = meta(GGUFReader(out))
    assert (m["tokenizer.chat_template"], m["general.name"], m["llama.context_length"]) == (template, "My Finetune",
                                                                                            CONTEXT)


def test_context_length_from_an_hf_source_and_never_guessed(src7, tmp_path, capsys):
    code, _, err = cli("merge", src7, "--to", "gguf", "-o", tmp_path / "x.gguf", capsys=capsys)
    assert code == 2 and "--max-position-embeddings" in err and "context length" in err, err
    assert list(tmp_path.iterdir()) == []
    assert cli("merge", src7, "--to", "hf", "-o", tmp_path / "hf", "-q", "--max-position-embeddings", 777)[0] == 0
    assert cli("merge", tmp_path / "hf", "--to", "gguf", "-o", tmp_path / "h.gguf", "-q")[0] == 0
    assert meta(GGUFReader(tmp_path / "h.gguf"))["llama.context_length"] == 777


# ----------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_lossless_types_hold_the_source_cast_byte_for_byte(ggufs, src7, dtype):
    cfg = ModelConfig.from_json_file(src7 / "params.json")
    expected = expected_tensors(load(src7 / "consolidated.00.pth"), cfg)
    r = GGUFReader(ggufs[dtype])
    assert [t.name for t in r.tensors] == list(expected)
    ggml, torch_dtype = TYPES[dtype]
    for t in r.tensors:
        want = expected[t.name]
        f32 = want.dim() == 1 or t.name.endswith("ffn_gate_inp.weight")
        assert t.tensor_type == (T.F32 if f32 else ggml), t.name
        assert tuple(int(x) for x in t.shape) == tuple(reversed(want.shape)), t.name
        cast = want.to(torch.float32 if f32 else torch_dtype).contiguous()
        assert raw(t) == cast.view(-1).view(torch.uint8).numpy().tobytes(), t.name


def test_q8_0_blocks_equal_quantizing_the_whole_source_tensor(ggufs, src7):
    """Written a block of rows at a time, expert after expert; equal to the gguf package's quantizer
    run once over each whole stacked tensor."""
    cfg = ModelConfig.from_json_file(src7 / "params.json")
    expected = expected_tensors(load(src7 / "consolidated.00.pth"), cfg)
    r = GGUFReader(ggufs["q8_0"])
    quantized = 0
    for t in r.tensors:
        want = expected[t.name].float().numpy()
        if t.tensor_type == T.F32:
            assert want.ndim == 1 or t.name.endswith("ffn_gate_inp.weight")
            assert raw(t) == want.tobytes()
            continue
        assert t.tensor_type == T.Q8_0
        assert raw(t) == quants.quantize(want, T.Q8_0).tobytes(), t.name
        quantized += 1
    assert quantized == 1 + 2 * 3 + 4 * 2 + 1  # embedding, 4 attention + 3 experts per layer, output


def test_sources_in_bfloat16_and_accessory_layouts_give_the_same_file(src7, sparse4, finetune, ggufs, tmp_path):
    """The same model from Accessory's sparse N=4 layout and a finetune save is the same GGUF, byte
    for byte after the header (general.name differs)."""
    data = lambda p: p.read_bytes()[-sum(t.n_bytes for t in GGUFReader(p).tensors):]  # noqa: E731
    want = data(ggufs["q8_0"])
    for i, src in enumerate((sparse4, finetune)):
        assert data(merge_gguf(src, tmp_path / f"{i}.gguf", "q8_0")) == want


# ----------------------------------------------------------------------------- sizes, pieces, manifest
@pytest.mark.parametrize("extra", [(), ("--max-shard-size", "60KB")])
def test_dry_run_sizes_are_exact_and_pieces_are_named_as_gguf_split(src22, tmp_path, extra):
    opts = MergeOptions("gguf", dict(max_position_embeddings=str(CONTEXT), max_shard_size="60000" if extra else None))
    out = tmp_path / "m.gguf"
    planned = merge(src22, opts, output=OutputOptions(out, quiet=True, dry_run=True, dtype="q8_0"))
    assert list(tmp_path.iterdir()) == []
    merge(src22, opts, output=OutputOptions(out, quiet=True, dtype="q8_0"))
    written = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert {f.name: f.size for f in planned.files} == written
    manifest = json.loads((tmp_path / "m.gguf.mixtral-convert-manifest.json").read_text())
    names = sorted(n for n in written if n.endswith(".gguf"))
    assert sorted(manifest["files"]) == names and manifest["dtype"] == "q8_0"
    if not extra:
        assert names == ["m.gguf"]
        return
    k = len(names)
    assert k > 2 and names == [f"m-{i:05d}-of-{k:05d}.gguf" for i in range(1, k + 1)]
    readers = [GGUFReader(tmp_path / n) for n in names]
    total = sum(len(r.tensors) for r in readers)
    for i, r in enumerate(readers):
        m = meta(r)
        assert (m["split.no"], m["split.count"], m["split.tensors.count"]) == (i, k, total)
        assert ("llama.block_count" in m) == (i == 0)  # the model's metadata is in the first piece
    assert cli("verify", tmp_path / names[0], "-q")[0] == 0


def test_verify_without_source_checks_the_manifest(ggufs, tmp_path, capsys):
    f = tmp_path / "c.gguf"
    f.write_bytes(ggufs["bfloat16"].read_bytes())
    (tmp_path / "c.gguf.mixtral-convert-manifest.json").write_text(
        ggufs["bfloat16"].with_name(ggufs["bfloat16"].name + ".mixtral-convert-manifest.json").read_text()
        .replace(ggufs["bfloat16"].name, "c.gguf"))
    assert cli("verify", f, capsys=capsys)[0] == 0
    data = bytearray(f.read_bytes())
    data[-100] ^= 1
    f.write_bytes(bytes(data))
    code, out, err = cli("verify", f, capsys=capsys)
    assert code == 1 and "c.gguf" in err and "sha256" in (out + err), out + err


# ----------------------------------------------------------------------------- refusals and safety
def test_refusals_before_anything_is_written(src7, wide_src, tmp_path, capsys):
    def refused(src, *args, words):
        code, _, err = cli("merge", src, "--to", "gguf", "-o", tmp_path / "x.gguf",
                           "--max-position-embeddings", CONTEXT, *args, capsys=capsys)
        assert code == 2 and all(w in err for w in words), err
        assert list(tmp_path.iterdir()) == [], err
    refused(wide_src, words=["byte pieces", "256"])  # the synthetic tokenizer has none: llama.cpp would abort
    src = copy_source(src7, tmp_path.parent / "rows")
    tok = src / "tokenizer.model"
    (src / "tokenizer.model").unlink()
    refused(src, words=["tokenizer.model", "--tokenizer"])
    cfg = dict(WIDE, vocab_size=1024)
    cfg_src = tmp_path.parent / "odd"
    from gguf_cases import make_source
    make_source(cfg_src, cfg, seed=3)  # hidden_dim 48: rows of w2 are not whole 32-blocks
    refused(cfg_src, "--dtype", "q8_0", words=["ffn_down_exps", "48", "Q8_0"])
    code, _, err = cli("merge", src7, "--to", "hf", "--dtype", "q8_0", "-o", tmp_path / "h",
                       "--max-position-embeddings", CONTEXT, capsys=capsys)
    assert code == 2 and "the hf layout takes float32" in err and not (tmp_path / "h").exists()
    del tok


def test_hf_tokenizer_json_only_source_is_refused_with_the_reason(src7, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert cli("merge", src7, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", CONTEXT)[0] == 0
    (hf / "tokenizer.model").unlink()
    code, _, err = cli("merge", hf, "--to", "gguf", "-o", tmp_path / "x.gguf", capsys=capsys)
    assert code == 2 and "tokenizer.json" in err and "scores" in err and "--tokenizer" in err, err
    assert not (tmp_path / "x.gguf").exists()
    assert cli("merge", hf, "--to", "gguf", "-o", tmp_path / "x.gguf", "--tokenizer", src7 / "tokenizer.model",
               "-q")[0] == 0


def test_float16_overflow_interrupt_and_full_disk_leave_nothing(src7, tmp_path, capsys, monkeypatch):
    src = copy_source(src7, tmp_path / "src")
    sd = load(src / "consolidated.00.pth")
    sd["layers.1.feed_forward.experts.5.w3.weight"][3, 7] = 1e6
    torch.save(sd, src / "consolidated.00.pth")
    out = tmp_path / "o" / "x.gguf"
    code, _, err = cli("merge", src, "--to", "gguf", "--dtype", "float16", "-o", out, "--max-position-embeddings",
                       CONTEXT, capsys=capsys)
    assert code == 2 and "layers.1.feed_forward.experts.5.w3.weight" in err and "65504" in err, err
    assert not (tmp_path / "o").exists()
    import mixtral_convert.io.direct as direct  # every output file's bytes go through its _pwrite
    monkeypatch.setattr(direct, "STAGE_BYTES", 4096)  # a write per page: the failure comes mid-file
    real = direct._pwrite
    calls = {"n": 0}

    def failing(fd, data, at, exc):
        calls["n"] += 1
        if calls["n"] > 20:
            raise exc
        return real(fd, data, at)
    for exc, code_want in ((OSError(errno.ENOSPC, "No space left on device"), 2), (KeyboardInterrupt(), 130)):
        calls["n"] = 0
        monkeypatch.setattr(direct, "_pwrite", lambda fd, data, at, exc=exc: failing(fd, data, at, exc))
        code, _, err = cli("merge", src7, "--to", "gguf", "-o", out, "--max-position-embeddings", CONTEXT, "-q",
                           capsys=capsys)
        assert code == code_want, err
        assert calls["n"] > 20, "the failing write was never reached"
        assert not (tmp_path / "o").exists(), list((tmp_path / "o").iterdir())
    monkeypatch.setattr(direct, "_pwrite", real)


def test_force_replaces_only_its_own_output(src7, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    merge_gguf(src7, out, "q8_0", "--max-shard-size", "100KB")
    pieces = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("merge", src7, "--to", "gguf", "-o", out, "--max-position-embeddings", CONTEXT, capsys=capsys)
    assert code == 2 and "--force" in err
    merge_gguf(src7, out, "bfloat16", "--force")  # one file now: the old pieces go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf", "x.gguf.mixtral-convert-manifest.json"]
    assert pieces != ["x.gguf", "x.gguf.mixtral-convert-manifest.json"]
    out.write_bytes(out.read_bytes() + b"x")  # changed since: not what the manifest records
    code, _, err = cli("merge", src7, "--to", "gguf", "-o", out, "--max-position-embeddings", CONTEXT, "--force",
                       capsys=capsys)
    assert code == 2 and "did not write it" in err, err


# ----------------------------------------------------------------------------- read back
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "q8_0"])
def test_verify_against_the_source_and_its_forward(ggufs, src7, tmp_path, capsys, dtype):
    """bfloat16 on the trained fixture: its verify --forward tolerance is derived from a trained model
    (docs/parity.md), and a random model's logits move more than that under bf16 rounding."""
    src, gguf_file = src7, ggufs.get(dtype)
    if dtype == "bfloat16":
        src = Path(__file__).resolve().parents[2] / "fixtures" / "trained"
        gguf_file = merge_gguf(src, tmp_path / "trained-bf16.gguf", "bfloat16")
    code, out, err = cli("verify", gguf_file, "--source", src, "--forward", "--json", capsys=capsys)
    assert code == 0, out + err
    rep = json.loads(out)
    assert rep["ok"] and any(("byte for byte" if dtype != "q8_0" else "block for block") in c for c in rep["checks"])
    fwd = rep["forward"]
    bound, top1 = {"float32": (1e-4, 0.99), "bfloat16": (0.03, 0.95), "q8_0": (0.2, 0.75)}[dtype]
    assert fwd["rms_rel_diff"] <= bound and fwd["top1_agreement"] >= top1, fwd
    assert dtype != "float32" or fwd["rms_rel_diff"] < 1e-6, fwd  # the same weights: rounding of the sums only
    bad = tmp_path / "bad.gguf"
    data = bytearray(ggufs[dtype].read_bytes())
    data[-4000] ^= 0x40  # inside output.weight
    bad.write_bytes(bytes(data))
    code, out, err = cli("verify", bad, "--source", src7, capsys=capsys)
    assert code == 1 and "output.weight" in err and "differs" in err, out + err


def test_a_lossless_gguf_is_a_source_for_split_and_merge(ggufs, src7, tmp_path, capsys):
    """A bf16 source -> bf16 GGUF -> Accessory base N=2 -> torrent: the source byte for byte. A bf16
    GGUF of a float32 source (its norms F32) reads as float32: weights bf16-rounded, norms exact."""
    from gguf_cases import SHAPE_7B, make_source
    src = make_source(tmp_path / "bf16src", SHAPE_7B, seed=5, dtype=torch.bfloat16)
    g = merge_gguf(src, tmp_path / "bf.gguf", "bfloat16")
    tok = ("--tokenizer", src / "tokenizer.model")
    assert cli("split", g, "-n", 2, "-o", tmp_path / "b", "-q", *tok, capsys=capsys)[0] == 0
    assert cli("merge", tmp_path / "b", "-o", tmp_path / "t", "-q", capsys=capsys)[0] == 0
    got, want = load(tmp_path / "t" / "consolidated.00.pth"), load(src / "consolidated.00.pth")
    assert list(got) == list(want) and all(same_bytes(got[k], v) for k, v in want.items())
    ck = open_checkpoint(ggufs["bfloat16"])
    src32 = load(src7 / "consolidated.00.pth")
    assert ck.dtype == torch.float32
    for k in ("norm.weight", "layers.1.feed_forward.experts.7.w2.weight", "layers.0.feed_forward.gate.weight"):
        want = src32[k] if k.endswith(("norm.weight", "gate.weight")) else src32[k].to(torch.bfloat16).float()
        assert torch.equal(materialize(ck.canonical[k]), want), k
    code, _, err = cli("split", ggufs["q8_0"], "-n", 2, "-o", tmp_path / "q", *tok, capsys=capsys)
    assert code == 2 and "quantized" in err and not (tmp_path / "q").exists(), err
    code, _, err = cli("split", ggufs["float32"], "-n", 2, "-o", tmp_path / "n", capsys=capsys)
    assert code == 2 and "--tokenizer" in err, err


def test_damaged_gguf_source_is_one_line(ggufs, tmp_path, capsys):
    data = ggufs["float32"].read_bytes()
    for i, blob in enumerate((data[:len(data) // 2], b"GGUF" + b"\xff" * 60, b"NOPE" + data[4:200])):
        p = tmp_path / f"d{i}.gguf"
        p.write_bytes(blob)
        code, _, err = cli("inspect", p, capsys=capsys)
        assert code == 2 and str(p) in err and len(err.strip().splitlines()) == 1, err


def test_inspect_says_what_a_gguf_is(ggufs, capsys):
    code, out, _ = cli("inspect", ggufs["q8_0"], "--json", capsys=capsys)
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "llama" and info["file_type"] == "q8_0" and info["pieces"] == 1
    assert info["types"] == {"F32": 2 * 3 + 1, "Q8_0": 16} and info["tokenizer"]["tokens"] == 1024
    assert info["shapes"]["blk.0.ffn_down_exps.weight"] == [8, 64, 96]


def test_k_quants_without_llama_cpp_refused_in_one_line(src7, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    code, _, err = cli("merge", src7, "--to", "gguf", "--dtype", "q4_k_m", "-o", tmp_path / "k.gguf",
                       "--max-position-embeddings", CONTEXT, capsys=capsys)
    assert code == 2 and "pip install 'mixtral-convert[kquants]'" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_streamed_a_block_at_a_time_with_the_same_bytes(src7, ggufs, tmp_path, monkeypatch):
    """With blocks of a few rows, no read of the source is larger than a block (so no expert and no
    layer is ever whole in memory), and the file is the same."""
    import mixtral_convert.formats.gguf.write as target
    import mixtral_convert.io.lazy as lazy
    monkeypatch.setattr(target, "QUANT_BLOCK_BYTES", 1024)
    monkeypatch.setattr(lazy.Lazy.blocks, "__defaults__", (2048, None))
    biggest = {"n": 0}
    real = lazy.OnDisk.read  # every source tensor's bytes come off the disk here

    def read(self, r0, r1, c0=None, c1=None):
        out = real(self, r0, r1, c0, c1)
        biggest["n"] = max(biggest["n"], out.numel() * out.element_size())
        return out
    monkeypatch.setattr(lazy.OnDisk, "read", read)
    for dtype in ("q8_0", "bfloat16"):
        out = merge_gguf(src7, tmp_path / f"{dtype}.gguf", dtype)
        assert out.read_bytes()[-1000:] == ggufs[dtype].read_bytes()[-1000:]
        assert [raw(t) for t in GGUFReader(out).tensors] == [raw(t) for t in GGUFReader(ggufs[dtype]).tensors]
    assert 0 < biggest["n"] <= 2048


def test_sigint_mid_write_leaves_nothing_and_a_killed_runs_leftover_goes(tmp_path, capsys):
    """A real SIGINT while the file is being written (the run stopped there with SIGSTOP first):
    exit 130, nothing beside the output. After a SIGKILL, only the marked temporary directory is
    left, and the next run removes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from gguf_cases import make_source
    src = make_source(tmp_path / "src", dict(dim=1024, n_layers=2, head_dim=64, hidden_dim=1792, n_heads=16,
                                             n_kv_heads=8, vocab_size=1024, num_experts=8, experts_per_tok=2),
                      seed=4, dtype=torch.bfloat16)
    out = tmp_path / "o" / "x.gguf"
    tmp = out.parent / ".x.gguf.mixtral-convert-partial"
    args = [sys.executable, "-m", "mixtral_convert", "merge", src, "--to", "gguf", "--dtype", "q8_0", "-o", out,
            "--max-position-embeddings", CONTEXT]

    def start_and_stop():
        p = subprocess.Popen([str(a) for a in args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if (tmp / "x.gguf").exists() and (tmp / "x.gguf").stat().st_size > 1 << 20:
                os.kill(p.pid, signal.SIGSTOP)
                return p
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.002)
        p.kill()
        raise AssertionError("the run never started writing")

    p = start_and_stop()
    os.kill(p.pid, signal.SIGINT)
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "nothing was left half-written" in err, err
    assert list(tmp_path.iterdir()) == [src]  # the directory the run created for the output went too
    p = start_and_stop()
    p.kill()
    p.communicate(timeout=60)
    assert [q.name for q in out.parent.iterdir()] == [tmp.name]
    code, _, err = cli("merge", *args[4:], "-q", capsys=capsys)
    assert code == 0, err
    assert sorted(q.name for q in out.parent.iterdir()) == ["x.gguf", "x.gguf.mixtral-convert-manifest.json"]


def _replaced_at_the_third_read(monkeypatch, f: Path) -> list:
    """After the third positioned read of any source, a copy of `f` (same bytes) is renamed over it."""
    import os
    import shutil

    from mixtral_convert.io import reads
    real, calls = reads._preadv, []

    def preadv(fd, bufs, off):
        calls.append(off)
        if len(calls) == 3:
            shutil.copy(f, f.with_name(f.name + ".new"))
            os.replace(f.with_name(f.name + ".new"), f)
        return real(fd, bufs, off)

    monkeypatch.setattr(reads, "_preadv", preadv)
    return calls


def test_verify_of_a_gguf_whose_source_changes_mid_run_is_refused(src7, ggufs, tmp_path, capsys, monkeypatch):
    """verify OUT.gguf --source SRC checks that the source's files did not change before it reports:
    a copy renamed over the source mid-run (the same bytes) is a refusal, not a proof."""
    src = copy_source(src7, tmp_path / "src")
    code, text, _ = cli("verify", ggufs["q8_0"], "--source", src, capsys=capsys)
    assert code == 0 and "kept their size, mtime and inode while they were read" in text
    calls = _replaced_at_the_third_read(monkeypatch, src / "consolidated.00.pth")
    code, _, err = cli("verify", ggufs["q8_0"], "--source", src, capsys=capsys)
    assert len(calls) > 3 and code == 2
    assert err.strip() == (
        f"error: {src / 'consolidated.00.pth'}: the source changed while it was read (it was replaced by another file "
        "(its inode changed)); the comparison would mix old and new bytes, so nothing was proved: wait until the "
        "file is complete, then run again")


def test_merge_to_gguf_of_a_source_that_changes_mid_run_is_refused(src7, tmp_path, capsys, monkeypatch):
    src = copy_source(src7, tmp_path / "src")
    _replaced_at_the_third_read(monkeypatch, src / "consolidated.00.pth")
    code, _, err = cli("merge", src, "--to", "gguf", "-o", tmp_path / "m.gguf", "--max-position-embeddings",
                       CONTEXT, capsys=capsys)
    assert code == 2 and "the source changed while it was read (it was replaced" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_forward_of_a_gguf_of_an_unknown_file_type_is_refused(src7, ggufs, monkeypatch):
    """A file type with no known rounding bound gets no borrowed tolerance (it got q4_k_m's): refused."""
    from mixtral_convert.errors import ConvertError
    from mixtral_convert.forward import gguf_parity
    monkeypatch.setattr(gguf_parity, "FILE_TYPE_NAMES", {})  # as a file type this tool does not write
    with pytest.raises(ConvertError, match=r"general.file_type 0 is not a type this tool writes"):
        gguf_parity.gguf_parity(ggufs["float32"], src7)


def test_the_layout_and_the_tokenizer_are_computed_once_per_run(src22, tmp_path, monkeypatch):
    """merge --to gguf reads the SentencePiece model and lays the files out once (formats.checkpoint.TargetPlan):
    the plan that --dry-run prints is the one written."""
    from mixtral_convert.formats.gguf import write as gguf_write
    calls = {"read_model": 0, "gguf_tensors": 0}
    for mod, fn in ((gguf_write.sptok, "read_model"), (gguf_write, "gguf_tensors")):
        real = getattr(mod, fn)

        def counted(*a, _real=real, _fn=fn, **k):
            calls[_fn] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, fn, counted)
    merge(src22, MergeOptions("gguf", dict(max_position_embeddings=str(CONTEXT), max_shard_size="60000")),
          output=OutputOptions(tmp_path / "m.gguf", quiet=True, dtype="q8_0"))
    assert calls == {"read_model": 1, "gguf_tensors": 1}
    assert len(list(tmp_path.glob("m-*-of-*.gguf"))) > 1


def test_the_registration_declares_the_writers_dtypes_without_importing_gguf():
    """formats.gguf.registration names --dtype's GGUF choices without the gguf package; they are the
    writer's, in its order."""
    from mixtral_convert.formats.gguf import registration
    from mixtral_convert.formats.gguf import write as gguf_write
    assert registration.DTYPES == gguf_write.DTYPES
    import subprocess
    import sys
    code = ("import importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'gguf': raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import mixtral_convert.cli, mixtral_convert.commands.merge, mixtral_convert.commands.verdict\n"
            "from mixtral_convert.formats.registry import TARGETS\n"
            "print(TARGETS['gguf'].dtypes)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 0 and "q8_0" in r.stdout, r.stderr[-2000:]
