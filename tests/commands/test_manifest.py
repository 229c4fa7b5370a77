"""The manifest in every output, and `verify SHARDS` without --source checking it."""

import hashlib
import json
import shutil

import pytest
import torch
from helpers import cli, load

from mixtral_convert import __version__
from mixtral_convert.encodings.torchzip import write_checkpoint
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes
from mixtral_convert.synth import tiny_config, write_torrent

MANIFEST = "mixtral-convert-manifest.json"


@pytest.fixture(scope="module")
def outputs(wide_src, tmp_path_factory):
    from mixtral_convert.entry import main
    d = tmp_path_factory.mktemp("outs")
    runs = {"base": ["split", wide_src, "-n", 4], "sparse": ["split-sparse", wide_src, "-n", 2]}
    for name, args in runs.items():
        try:
            main([str(a) for a in args] + ["-o", str(d / name), "-q"])
        except SystemExit as e:
            assert e.code == 0
    for args in (["merge", str(d / "sparse"), "-o", str(d / "merged"), "-q"],
                 ["merge", str(d / "base"), "--to", "hf", "-o", str(d / "hf"), "--max-position-embeddings", "4096",
                  "--max-shard-size", "200KB", "-q"]):
        try:
            main(args)
        except SystemExit as e:
            assert e.code == 0
    return d


@pytest.mark.parametrize("name", ["base", "sparse", "merged"])
def test_manifest_lists_every_file_and_the_source(outputs, wide_src, name):
    d = outputs / name
    m = json.loads((d / MANIFEST).read_text())
    assert m["tool"] == "mixtral-convert" and m["version"] == __version__
    on_disk = sorted(p.name for p in d.iterdir() if p.name != MANIFEST)
    assert sorted(m["files"]) == on_disk
    for f, e in m["files"].items():
        data = (d / f).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    src = m["source"]
    if name == "merged":
        assert src["format"] == "sparse" and src["path"] == str((outputs / "sparse").resolve())
    else:
        st = (wide_src / "consolidated.00.pth").stat()
        assert src["format"] == "torrent" and src["path"] == str(wide_src.resolve())
        assert src["files"]["consolidated.00.pth"]["size"] == st.st_size
        assert src["files"]["consolidated.00.pth"]["mtime"].endswith("Z")


@pytest.mark.parametrize("name", ["base", "sparse", "merged", "hf"])
def test_verify_without_source_passes_on_clean_output(outputs, capsys, name):
    code, out, err = cli("verify", outputs / name, "--json", capsys=capsys)
    rep = json.loads(out)
    assert code == 0 and rep["ok"], rep
    assert rep["bytes_compared"] == sum(e["size"] for e in json.loads(
        (outputs / name / MANIFEST).read_text())["files"].values())


def _flip(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


DAMAGE = {
    # name: (damage, file named in the error, words in it)
    "one bit in a shard": (lambda d: _flip(d / "consolidated.02-of-04.model.pth", 4000),
                           "consolidated.02-of-04.model.pth", "sha256"),
    "norm_eps edited in config.json": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-06')), "config.json", "sha256"),
    "truncated shard": (lambda d: (d / "consolidated.01-of-04.model.pth").write_bytes(
        (d / "consolidated.01-of-04.model.pth").read_bytes()[:-100]), "consolidated.01-of-04.model.pth", "bytes"),
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model", "missing"),
    "missing shard": (lambda d: (d / "consolidated.03-of-04.model.pth").unlink(),
                      "consolidated.03-of-04.model.pth", "missing"),
    "unlisted shard": (lambda d: shutil.copy(d / "consolidated.00-of-04.model.pth",
                                             d / "consolidated.00-of-02.model.pth"),
                       "consolidated.00-of-02.model.pth", "not listed"),
    "manifest not JSON": (lambda d: (d / MANIFEST).write_text("{"), MANIFEST, "corrupt"),
    "manifest of something else": (lambda d: (d / MANIFEST).write_text('{"files": {}}'), MANIFEST, "corrupt"),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_verify_without_source_catches_corruption(outputs, tmp_path, capsys, what):
    damage, named, words = DAMAGE[what]
    d = tmp_path / "copy"
    shutil.copytree(outputs / "base", d)
    damage(d)
    code, out, err = cli("verify", d, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 1, out + err
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0] and words in lines[0], err


def test_verify_without_source_catches_corruption_of_an_hf_output(outputs, tmp_path, capsys):
    d = tmp_path / "hf"
    shutil.copytree(outputs / "hf", d)
    first = sorted(d.glob("model-*.safetensors"))[0]
    assert len(list(d.glob("model-*.safetensors"))) > 1  # several files and an index
    _flip(first, first.stat().st_size - 10)
    code, out, err = cli("verify", d, capsys=capsys)
    assert code == 1 and first.name in err and "sha256" in err, out + err


def test_structure_is_checked_too(outputs, tmp_path, capsys):
    """A shard rewritten with the wrong shape and a manifest updated to match still fails:
    the layout's key sets and shapes come from config.json through the plan."""
    d = tmp_path / "copy"
    shutil.copytree(outputs / "base", d)
    f = d / "consolidated.01-of-04.model.pth"
    sd = {k: v.clone() for k, v in load(f).items()}
    sd["llma.norm.weight"] = sd["llma.norm.weight"][:-1].clone()
    write_checkpoint(f, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                     lambda s: [tensor_bytes(sd[s.name])])
    m = json.loads((d / MANIFEST).read_text())
    m["files"][f.name].update(size=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    (d / MANIFEST).write_text(json.dumps(m))
    code, _, err = cli("verify", d, capsys=capsys)
    assert code == 1 and "'llma.norm.weight' has shape" in err and "rank 1" in err


def test_no_manifest_and_no_source_is_bad_usage(outputs, tmp_path, capsys):
    d = tmp_path / "copy"
    shutil.copytree(outputs / "base", d)
    (d / MANIFEST).unlink()
    code, _, err = cli("verify", d, capsys=capsys)
    assert code == 2 and err.strip() == (f"error: {d}: no {MANIFEST} and no --source; pass --source SRC (the "
                                         "checkpoint it was made from) to compare every byte with it")


def test_nan_and_inf_payloads_pass_manifest_verify(tmp_path, capsys):
    src = write_torrent(tmp_path / "src", tiny_config(), dtype=torch.float32)
    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    w = sd["layers.1.attention.wv.weight"].view(torch.int32)
    w[0, 0], w[1, 1], w[2, 2] = 0x7FC00001, 0x7F800001, 0x7F800000  # NaN payload, sNaN, +inf
    write_checkpoint(src / "consolidated.00.pth", [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                     lambda s: [tensor_bytes(sd[s.name])])
    for cmd in ("split", "split-sparse"):
        out = tmp_path / cmd
        assert cli(cmd, src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
        assert cli("verify", out, "-q", capsys=capsys)[0] == 0
        assert cli("verify", out, "--source", src, "-q", capsys=capsys)[0] == 0
        assert cli("merge", out, "-o", tmp_path / f"{cmd}-m", "-q", capsys=capsys)[0] == 0
        assert cli("verify", tmp_path / f"{cmd}-m", "-q", capsys=capsys)[0] == 0
        back = load(tmp_path / f"{cmd}-m" / "consolidated.00.pth")["layers.1.attention.wv.weight"]
        assert torch.equal(back.view(torch.int32), w)
