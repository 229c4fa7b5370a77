"""The adapter merge's determinism and its commands (docs/formats.md, "HF PEFT LoRA adapters"): the merged bytes
are the same whatever the base's format (torrent, HF, Accessory base and sparse at N=2, Mistral's .tar) and
whatever the block asked for; split / split-sparse / merge / forward / verify take --adapter."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_make as pk
from helpers import HUB_SHA, cli, hub_repo, load, same_bytes

from mixtral_convert import synth
from mixtral_convert.formats.registry import open_checkpoint
from mixtral_convert.io.delta import DeltaMerged, row_norm

pytest.importorskip("peft")


def mistral_tar(torrent: Path, rel: Path, tar: Path) -> Path:
    """Mistral's .tar download of the torrent's model (consolidated.safetensors, params.json, tokenizer.model.v3 in
    a folder), written with the safetensors and tarfile libraries."""
    import json as _json
    import shutil
    import tarfile

    from safetensors.torch import save_file
    rel.mkdir()
    save_file({k: v.contiguous() for k, v in load(torrent / "consolidated.00.pth").items()},
              str(rel / "consolidated.safetensors"))
    p = _json.loads((torrent / "params.json").read_text())
    (rel / "params.json").write_text(_json.dumps(dict(p, rope_theta=1e6)))  # mistral-inference's params name it
    shutil.copy(torrent / "tokenizer.model", rel / "tokenizer.model.v3")
    with tarfile.open(tar, "w") as tf:
        for f in sorted(rel.iterdir()):
            tf.add(f, arcname=f"Mixtral-tiny/{f.name}")
    return tar


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bfloat16 base in four layouts, and two adapters made by peft on its float32 twin: the hub layout
    (every linear), and DoRA on attention and lm_head with an embedding LoRA and a modules_to_save norm."""
    root = tmp_path_factory.mktemp("adapter_merge")
    cfg = pk.tiny_cfg()
    src = synth.write_torrent(root / "bf16", cfg, seed=3, dtype=torch.bfloat16)
    _, hf32 = pk.base_dirs(root, cfg, lambda *a: cli(*a))
    bases = {"torrent": src, "hf": root / "hf", "base2": root / "base2", "sparse2": root / "sparse2"}
    for args in (("merge", src, "--to", "hf", "-o", bases["hf"], "--max-position-embeddings", "4096"),
                 ("split", src, "-n", "2", "-o", bases["base2"]),
                 ("split-sparse", src, "-n", "2", "-o", bases["sparse2"])):
        code, _, err = cli(*args, "-q")
        assert code == 0, err
    bases["tar"] = mistral_tar(src, root / "rel", root / "Mixtral-tiny.tar")
    adapters = {
        "hub": pk.hub_adapter(root / "hub", cfg),
        "dora": pk.make_adapter(hf32, root / "dora", seed=7, r=4, lora_alpha=8, use_dora=True,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]),
        "emb": pk.make_adapter(hf32, root / "emb", seed=8, r=4, lora_alpha=8, use_rslora=True,
                               target_modules=["embed_tokens", "q_proj"], modules_to_save=["model.norm"],
                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    }
    return cfg, bases, adapters


def merged_tensors(tmp_path, base, adapter, name):
    out = tmp_path / name
    code, _, err = cli("merge", base, "--adapter", adapter, "-o", out, "-q")
    assert code == 0, err
    return load(out / "consolidated.00.pth")


@pytest.mark.parametrize("which", ["hub", "dora", "emb"])
def test_same_bytes_whatever_the_base_layout(tmp_path, setup, which):
    cfg, bases, adapters = setup
    ref = merged_tensors(tmp_path, bases["torrent"], adapters[which], "from_torrent")
    plain = load(bases["torrent"] / "consolidated.00.pth")
    changed = [k for k in ref if not same_bytes(ref[k], plain[k])]
    assert len(changed) > 4 and all(v.dtype == torch.bfloat16 for v in ref.values())
    for kind in ("hf", "base2", "sparse2", "tar"):
        got = merged_tensors(tmp_path, bases[kind], adapters[which], f"from_{kind}")
        assert set(got) == set(ref)
        bad = [k for k in ref if not same_bytes(got[k], ref[k])]
        assert bad == [], (kind, bad[:3])


def test_split_with_adapter_is_the_merged_model(tmp_path, setup):
    """split --adapter -n 2 (and split-sparse), merged back without it, gives the bytes merge --adapter gives."""
    cfg, bases, adapters = setup
    ref = merged_tensors(tmp_path, bases["torrent"], adapters["hub"], "direct")
    for cmd in ("split", "split-sparse"):
        out = tmp_path / cmd
        code, _, err = cli(cmd, bases["hf"], "--adapter", adapters["hub"], "-n", "2", "-o", out, "-q")
        assert code == 0, err
        code, _, err = cli("verify", out, "--source", bases["base2"], "--adapter", adapters["hub"], "-q")
        assert code == 0, err
        code, _, err = cli("merge", out, "-o", tmp_path / f"{cmd}_back", "-q")
        assert code == 0, err
        back = load(tmp_path / f"{cmd}_back" / "consolidated.00.pth")
        assert [k for k in ref if not same_bytes(back[k], ref[k])] == []
        # the same shards are not the base's: verify without the adapter fails
        code, _, _ = cli("verify", out, "--source", bases["torrent"], "-q")
        assert code == 1


def test_blocks_and_column_bands_give_the_same_bytes(setup):
    """A merged tensor read whole equals it read 3 rows at a time and in column bands (DoRA's norm needs whole rows;
    the embedding's factors are transposed)."""
    cfg, bases, adapters = setup
    for which in ("dora", "emb"):
        ck = open_checkpoint(bases["torrent"], adapter=adapters[which])
        merged = [t for t in ck.canonical.values() if isinstance(t, DeltaMerged) and len(t.shape) == 2]
        assert merged
        for t in merged:
            R, C = t.shape
            whole = t.read(0, R)
            rows = torch.cat([t.read(i, min(R, i + 3)) for i in range(0, R, 3)])
            bands = torch.cat([t.read(0, R, c, min(C, c + 5)) for c in range(0, C, 5)], dim=1)
            assert same_bytes(whole, rows) and same_bytes(whole, bands), t.name


def test_row_norm_is_the_norm_in_a_fixed_order():
    v = torch.randn(7, 37, dtype=torch.float32)
    assert torch.allclose(row_norm(v), torch.linalg.norm(v.double(), dim=1).float(), rtol=1e-6)
    assert same_bytes(row_norm(v)[2:5], row_norm(v[2:5]))


def test_forward_and_verify_forward_with_adapter(tmp_path, setup, capsys):
    """forward --adapter gives the merged model's logits; verify --source BASE --adapter A --forward passes
    on shards split with the adapter."""
    cfg, bases, adapters = setup
    tokens = tmp_path / "t.pt"
    torch.save(torch.tensor([[1, 4, 9, 16, 25, 36]]), tokens)
    code, _, err = cli("forward", bases["torrent"], "--adapter", adapters["dora"], "--tokens-file", tokens,
                       "-o", tmp_path / "a.pt")
    assert code == 0, err
    merged = tmp_path / "merged"
    code, _, err = cli("merge", bases["torrent"], "--adapter", adapters["dora"], "-o", merged, "-q")
    assert code == 0, err
    code, _, err = cli("forward", merged, "--tokens-file", tokens, "-o", tmp_path / "b.pt")
    assert code == 0, err
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    plain = tmp_path / "plain.pt"
    code, _, err = cli("forward", bases["torrent"], "--tokens-file", tokens, "-o", plain)
    assert torch.equal(a, b) and not torch.allclose(a, torch.load(plain, weights_only=True), atol=1e-3)
    for which in ("dora", "emb"):
        out = tmp_path / f"shards_{which}"
        code, _, err = cli("split", bases["torrent"], "--adapter", adapters[which], "-n", "2", "-o", out, "-q")
        assert code == 0, err
        code, stdout, err = cli("verify", out, "--source", bases["torrent"], "--adapter", adapters[which],
                                "--forward", "--json", capsys=capsys)
        assert code == 0, stdout + err
        assert "LoRA unmerged" in json.loads(stdout)["forward"]["reference"]
        # without the adapter, the shards are another model: the forward check fails
        code, stdout, err = cli("verify", out, "--source", bases["torrent"], "--forward", capsys=capsys)
        assert code == 1


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_adapter_model_bin_same_bytes_as_safetensors(tmp_path, setup, zipped, capsys):
    """adapter_model.bin, a torch zip (read lazily by the tool's weights-only reader) or torch's legacy format
    (torch.load(weights_only=True)), merges to the bytes of the same tensors in adapter_model.safetensors; a
    pickle holding anything but tensors is refused."""
    import shutil

    from safetensors.torch import load_file
    cfg, bases, adapters = setup
    ref = merged_tensors(tmp_path, bases["torrent"], adapters["emb"], "st")
    ad = tmp_path / "bin"
    shutil.copytree(adapters["emb"], ad)
    sd = load_file(str(ad / "adapter_model.safetensors"))
    (ad / "adapter_model.safetensors").unlink()
    torch.save(sd, ad / "adapter_model.bin", _use_new_zipfile_serialization=zipped)
    code, _, err = cli("merge", bases["torrent"], "--adapter", ad, "-o", tmp_path / "out_bin", "-q", capsys=capsys)
    assert code == 0, err
    got = load(tmp_path / "out_bin" / "consolidated.00.pth")
    assert [k for k in ref if not same_bytes(got[k], ref[k])] == []
    torch.save({"x": torch.zeros(1), "evil": {1, 2}}, ad / "adapter_model.bin", _use_new_zipfile_serialization=zipped)
    code, _, err = cli("merge", bases["torrent"], "--adapter", ad, "-o", tmp_path / "no")
    assert code == 2 and not (tmp_path / "no").exists()


def test_hub_adapter_from_the_cache(tmp_path, setup, monkeypatch, capsys):
    """--adapter hf://org/name[@rev] resolves through huggingface_hub (offline here, from a cache laid out as it
    lays one out) and merges to the bytes the local directory gives."""
    cfg, bases, adapters = setup
    ref = merged_tensors(tmp_path, bases["torrent"], adapters["hub"], "local")
    sha = HUB_SHA
    hub_repo(tmp_path / "cache", "org/qlora", {f.name: f for f in adapters["hub"].iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("hf://org/qlora", f"hf://org/qlora@{sha}"):
        out = tmp_path / spec.replace("/", "_").replace(":", "").replace("@", "_")
        code, _, err = cli("merge", bases["torrent"], "--adapter", spec, "-o", out, "-q", capsys=capsys)
        assert code == 0, err
        got = load(out / "consolidated.00.pth")
        assert [k for k in ref if not same_bytes(got[k], ref[k])] == []
    code, _, err = cli("merge", bases["torrent"], "--adapter", "hf://org/absent", "-o", tmp_path / "x", capsys=capsys)
    assert code == 2 and "hf://org/absent" in err and not (tmp_path / "x").exists(), err


def test_the_adapters_files_are_sources_checked_unchanged(tmp_path, setup, monkeypatch, capsys):
    """The adapter applied on top of the base records its weights file among the Checkpoint's sources (beside the
    base's), and merge --adapter whose adapter file is replaced while it is read writes nothing."""
    import os
    import shutil

    from mixtral_convert.io import reads
    cfg, bases, adapters = setup
    ad = tmp_path / "ad"
    shutil.copytree(adapters["dora"], ad)
    for kind, base_files in (("torrent", ["consolidated.00.pth"]),
                             ("sparse2", ["consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth"])):
        ck = open_checkpoint(bases[kind], adapter=ad)
        got = sorted(f.path.name for f in ck.sources)
        assert got == sorted(base_files + ["adapter_model.safetensors"]), (kind, got)
    f = ad / "adapter_model.safetensors"
    real, calls = reads._preadv, []

    def preadv(fd, bufs, off):  # the adapter's weights replaced by a copy (another inode) once reading has begun
        calls.append(off)
        if len(calls) == 2:
            tmp = f.with_name(f.name + ".new")
            shutil.copy(f, tmp)
            os.replace(tmp, f)
        return real(fd, bufs, off)

    monkeypatch.setattr(reads, "_preadv", preadv)
    out = tmp_path / "out"
    code, _, err = cli("merge", bases["torrent"], "--adapter", ad, "-o", out, capsys=capsys)
    assert code == 2 and f"error: {f}: the source changed while it was read (it was replaced" in err, err
    assert len(calls) > 2 and not out.exists()
