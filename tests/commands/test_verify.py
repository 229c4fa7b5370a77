"""verify: exit 0 when equal, 1 naming the tensor and rank on any single changed byte or
structural fault, 2 on bad input; NaN payloads are data."""

import json
import shutil

import pytest
import torch
from helpers import cli, load, same_bytes, write_pth

from mixtral_convert.encodings.torchzip import zip_records
from mixtral_convert.synth import tiny_config, write_torrent


@pytest.fixture(scope="module")
def shards(wide_src, tmp_path_factory):
    out = {}
    for cmd, layout in (("split", "base"), ("split-sparse", "sparse")):
        d = tmp_path_factory.mktemp(layout) / "o"
        from mixtral_convert.entry import main
        try:
            main([cmd, str(wide_src), "-n", "4", "-o", str(d), "-q"])
        except SystemExit as e:
            assert e.code == 0
        out[layout] = d
    return out


def _storage_key(path, key):
    """The data record holding tensor `key` (storages are written in key order)."""
    return f"archive/data/{list(load(path)).index(key)}"


def _flip(path, key, byte_index, tmp_path):
    """Copy `path` and flip one bit of byte `byte_index` of tensor `key`'s data."""
    rec = {r.name: r for r in zip_records(path)}[_storage_key(path, key)]
    b = bytearray(path.read_bytes())
    b[rec.data_offset + byte_index] ^= 0x10
    return b


CASES = [
    ("base", 0, "llma.tok_embeddings.weight", 0),
    ("base", 3, "llma.norm.weight", 5),  # a replicated tensor on the last rank
    ("base", 2, "llma.layers.1.feed_forward.experts.5.w2.weight", -1),  # last byte of an expert
    ("base", 1, "llma.layers.0.attention.wo.weight", 77),
    ("sparse", 1, "llma.layers.1.feed_forward.w2", 1001),
    ("sparse", 3, "llma.layers.0.feed_forward.gate.weight", 3),
    ("sparse", 0, "llma.output.weight", 2048),
]


@pytest.mark.parametrize("layout,rank,key,byte", CASES)
def test_single_byte_change_is_caught_and_named(shards, tmp_path, capsys, layout, rank, key, byte):
    d = tmp_path / "copy"
    shutil.copytree(shards[layout], d)
    f = d / f"consolidated.{rank:02d}-of-04.model.pth"
    n = load(f)[key].numel() * load(f)[key].element_size()
    f.write_bytes(_flip(f, key, byte % n, tmp_path))
    code, out, err = cli("verify", d, "--source", _src_of(shards[layout]), capsys=capsys)
    assert code == 1, out + err
    assert f"'{key}'" in err and f"rank {rank}" in err


def _src_of(shard_dir):
    m = json.loads((shard_dir / "mixtral-convert-manifest.json").read_text())
    return m["source"]["path"]


def test_clean_shards_verify_and_json(shards, capsys):
    for d in shards.values():
        code, out, _ = cli("verify", d, "--source", _src_of(d), "--json", capsys=capsys)
        rep = json.loads(out)
        assert code == 0 and rep["ok"] and rep["problems"] == [] and rep["bytes_compared"] > 0


def test_structural_faults_exit_1(shards, tmp_path, capsys):
    src = _src_of(shards["base"])
    cases = {
        "missing rank": lambda d: (d / "consolidated.02-of-04.model.pth").unlink(),
        "bad meta": lambda d: (d / "meta.json").write_text('{"llama_type": "llama"}'),
        "wrong layout in meta": lambda d: (d / "meta.json").write_text('{"llama_type": "mixtral_sparse"}'),
        "config differs": lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-06')),
        "unknown config key": lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "mixtral"})),
        "tokenizer missing": lambda d: (d / "tokenizer.model").unlink(),
        "torrent file beside": lambda d: shutil.copy(src + "/consolidated.00.pth", d),
    }
    for name, damage in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(shards["base"], d)
        damage(d)
        code, out, err = cli("verify", d, "--source", src, capsys=capsys)
        assert code == 1, f"{name}: {code} {out} {err}"
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, name


def test_meta_json_not_an_object_is_one_line(shards, tmp_path, capsys):
    """meta.json holding a JSON list (or a string) is a mismatch named in one line, not an
    internal error."""
    for text in ('["mixtral"]', '"mixtral"', "3"):
        d = tmp_path / "meta"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(shards["base"], d)
        (d / "meta.json").write_text(text)
        code, out, err = cli("verify", d, "--source", _src_of(shards["base"]), capsys=capsys)
        assert code == 1, (text, err)
        assert err.startswith(f"error: {d / 'meta.json'}: llama_type") and "internal error" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_forward_without_source_refused_before_hashing(shards, capsys, monkeypatch):
    """verify --forward needs --source; that is said before a single byte is hashed (on a
    93 GB directory the hashing alone takes minutes)."""
    from mixtral_convert.io import manifest

    def hashed(*a, **k):
        raise AssertionError("hashed before refusing")
    monkeypatch.setattr(manifest, "sha256_file", hashed)
    code, out, err = cli("verify", shards["base"], "--forward", capsys=capsys)
    assert code == 2 and "--forward needs --source" in err, err


def test_extra_and_reshaped_tensor_exit_1(shards, tmp_path, capsys):
    src = _src_of(shards["base"])
    for what in ("extra", "reshaped"):
        d = tmp_path / what
        shutil.copytree(shards["base"], d)
        f = d / "consolidated.01-of-04.model.pth"
        sd = {k: v.clone() for k, v in load(f).items()}
        if what == "extra":
            sd["llma.bonus"] = torch.zeros(3)
        else:
            sd["llma.norm.weight"] = sd["llma.norm.weight"][:-1].clone()
        write_pth(f, sd)
        code, out, err = cli("verify", d, "--source", src, capsys=capsys)
        assert code == 1 and ("llma.bonus" if what == "extra" else "llma.norm.weight") in err


def test_bad_usage_exit_2(shards, tmp_path, capsys):
    assert cli("verify", tmp_path / "nope", "--source", _src_of(shards["base"]), capsys=capsys)[0] == 2
    assert cli("verify", shards["base"], "--source", tmp_path / "nope", capsys=capsys)[0] == 2
    d = tmp_path / "no_manifest"
    shutil.copytree(shards["base"], d)
    (d / "mixtral-convert-manifest.json").unlink()
    code, _, err = cli("verify", d, capsys=capsys)  # neither a manifest nor --source
    assert code == 2 and "no mixtral-convert-manifest.json and no --source" in err


def test_nan_and_inf_payloads_are_data(tmp_path, capsys):
    """Different NaN bit patterns must survive split and merge exactly and never count as mismatches."""
    cfg = tiny_config()
    src = write_torrent(tmp_path / "src", cfg, dtype=torch.float32)
    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    w = sd["layers.0.feed_forward.experts.1.w2.weight"].view(torch.int32)
    w[0, 0] = 0x7FC00001  # quiet NaN with a payload
    w[3, 5] = 0x7F800001  # signalling NaN
    w[7, 9] = 0xFFC00000 - (1 << 32)  # negative NaN
    w[1, 1] = 0x7F800000  # +inf
    from mixtral_convert.encodings.torchzip import write_checkpoint
    from mixtral_convert.io.lazy import TensorSpec, tensor_bytes
    write_checkpoint(src / "consolidated.00.pth", [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                     lambda s: [tensor_bytes(sd[s.name])])
    for cmd in ("split", "split-sparse"):
        out = tmp_path / cmd
        assert cli(cmd, src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
        assert cli("verify", out, "--source", src, "-q", capsys=capsys)[0] == 0
        assert cli("merge", out, "-o", tmp_path / f"{cmd}-m", "-q", capsys=capsys)[0] == 0
        back = load(tmp_path / f"{cmd}-m" / "consolidated.00.pth")
        assert all(same_bytes(back[k], sd[k]) for k in sd)
