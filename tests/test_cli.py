"""The command line: valid world sizes, safe outputs, one-line errors naming the file and fix, inspect, help."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import cli, load

from mixtral_convert.encodings.torchzip import write_checkpoint
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes
from mixtral_convert.synth import tiny_config, write_torrent


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("cmd,N,valid", [
    ("split", 3, "1, 2, 4, 8"),          # wide: E 8, KV 8
    ("split", 16, "1, 2, 4, 8"),
    ("split-sparse", 5, "1, 2, 4, 8"),
])
def test_invalid_world_size_lists_valid(wide_src, tmp_path, capsys, cmd, N, valid):
    code, _, err = cli(cmd, wide_src, "-n", N, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2
    assert f"valid world sizes: {valid}" in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_world_size_divisibility_per_dimension(tmp_path, capsys):
    """Each constraint alone: experts (base only), FFN dim (sparse only), KV heads, vocab, dim."""
    cases = [  # overrides, N, base ok?, sparse ok?
        (dict(num_experts=6, hidden_dim=96), 4, False, True),   # E 6 not divisible by 4
        (dict(num_experts=4, hidden_dim=90), 4, True, False),   # H 90 not divisible by 4
        (dict(n_kv_heads=2, n_heads=8), 4, False, False),      # KV 2
        (dict(vocab_size=126), 4, False, False),                 # V 126
    ]
    for i, (over, N, base_ok, sparse_ok) in enumerate(cases):
        src = write_torrent(tmp_path / f"s{i}", tiny_config(**over))
        for cmd, ok in (("split", base_ok), ("split-sparse", sparse_ok)):
            code, _, err = cli(cmd, src, "-n", N, "-o", tmp_path / f"o{i}{cmd}", "-q", capsys=capsys)
            assert (code == 0) == ok, (over, cmd, err)


def test_nonempty_output_needs_force_and_force_keeps_foreign_files(wide_src, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, capsys=capsys)
    assert code == 2 and "--force" in one_line_error(err)
    assert cli("split", wide_src, "-n", 2, "-o", out, "-q", "--force", capsys=capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    # re-split at another N with --force: the old shards (ours) go, no stale ranks remain
    assert cli("split", wide_src, "-n", 4, "-o", out, "-q", "--force", capsys=capsys)[0] == 0
    assert sorted(p.name for p in out.glob("*.pth")) == [f"consolidated.{r:02d}-of-04.model.pth" for r in range(4)]
    assert (out / "notes.txt").read_text() == "mine"
    assert cli("verify", out, "--source", wide_src, "-q", capsys=capsys)[0] == 0


def test_force_refuses_foreign_checkpoint_files(wide_src, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "consolidated.00-of-02.model.pth").write_bytes(b"someone else's")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", out, "--force", capsys=capsys)
    assert code == 2 and "did not write" in one_line_error(err)
    assert (out / "consolidated.00-of-02.model.pth").read_bytes() == b"someone else's"


def _write(path, sd):
    write_checkpoint(path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                     lambda s: [tensor_bytes(sd[s.name])])


@pytest.fixture()
def src(tmp_path):
    return write_torrent(tmp_path / "src", tiny_config())


def test_bad_sources_are_named(src, tmp_path, capsys):
    def run():
        code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
        assert code == 2 and not (tmp_path / "o").exists()
        return one_line_error(err)

    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    params = (src / "params.json").read_text()
    (src / "params.json").write_text("{not json")
    assert "params.json" in run() and "not valid JSON" in run()
    (src / "params.json").write_text(json.dumps({k: v for k, v in json.loads(params).items() if k != "hidden_dim"}))
    assert "'hidden_dim'" in run()
    (src / "params.json").write_text(params)

    bad = dict(sd)
    del bad["layers.1.attention.wk.weight"]
    _write(src / "consolidated.00.pth", bad)
    assert "'layers.1.attention.wk.weight'" in run() and "missing" in run()
    bad = dict(sd, **{"layers.0.ffn_norm.weight": torch.ones(3, dtype=torch.bfloat16)})
    _write(src / "consolidated.00.pth", bad)
    assert "'layers.0.ffn_norm.weight'" in run() and "shape" in run()
    bad = dict(sd, **{"norm.weight": sd["norm.weight"].float()})
    _write(src / "consolidated.00.pth", bad)
    assert "mixed dtypes" in run()
    bad = dict(sd, **{"extra.weight": torch.ones(2, dtype=torch.bfloat16)})
    _write(src / "consolidated.00.pth", bad)
    assert "'extra.weight'" in run()
    _write(src / "consolidated.00.pth", sd)
    data = (src / "consolidated.00.pth").read_bytes()
    (src / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    assert "consolidated.00.pth" in run() and "truncated" in run()
    (src / "consolidated.00.pth").write_bytes(data)
    (src / "tokenizer.model").unlink()
    assert "tokenizer.model" in run()
    from mixtral_convert.synth import train_tokenizer
    (src / "tokenizer.model").write_bytes(train_tokenizer(100))
    assert "100 pieces" in run()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickled_callable_is_refused_without_running(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_torrent(tmp_path / "src", tiny_config())
    sd = load(src / "consolidated.00.pth")
    sd["norm.weight"] = _Evil()
    torch.save(sd, src / "consolidated.00.pth")
    for args in (["split", src, "-n", 2], ["inspect", src], ["inspect", src / "consolidated.00.pth"]):
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and "refused" in one_line_error(err)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_missing_source_and_split_pieces_hint(tmp_path, capsys):
    code, _, err = cli("split", tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "nothing" in one_line_error(err)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "consolidated.00.pth-split0").write_bytes(b"x")
    code, _, err = cli("split", tmp_path / "dl", capsys=capsys)
    assert code == 2 and "concat" in one_line_error(err)


def test_inspect_tells_what_things_are(wide_src, tmp_path, capsys):
    code, out, _ = cli("inspect", wide_src, "--json", capsys=capsys)
    info = json.loads(out)
    assert code == 0 and info["format"] == "torrent" and info["tensors"] == len(load(wide_src / "consolidated.00.pth"))
    assert info["dtypes"] == {"bfloat16": info["tensors"]} and info["tokenizer"] == {"pieces": 128}
    assert info["bytes"] == sum(v.numel() * 2 for v in load(wide_src / "consolidated.00.pth").values())
    assert cli("split-sparse", wide_src, "-n", 4, "-o", tmp_path / "s", "-q", capsys=capsys)[0] == 0
    code, out, _ = cli("inspect", tmp_path / "s", "--json", capsys=capsys)
    info2 = json.loads(out)
    assert info2["format"] == "sparse" and info2["world_size"] == 4 and info2["bytes"] == info["bytes"]
    code, out, _ = cli("inspect", tmp_path / "s" / "consolidated.02-of-04.model.pth", capsys=capsys)
    assert code == 0 and "Accessory sparse shard (rank 2 of 4)" in out
    code, out, _ = cli("inspect", tmp_path / "s" / "tokenizer.model", capsys=capsys)
    assert code == 0 and "128" in out


def test_help_explains_every_command():
    for cmd in ([], ["split"], ["split-sparse"], ["merge"], ["verify"], ["inspect"]):
        p = subprocess.run([sys.executable, "-m", "mixtral_convert", *cmd, "--help"], capture_output=True, text=True)
        assert p.returncode == 0 and "Usage:" in p.stdout
    p = subprocess.run([sys.executable, "-m", "mixtral_convert", "split", "--help"], capture_output=True, text=True)
    assert "--world-size" in p.stdout and "base layout" in p.stdout


def test_console_script_installed():
    import shutil
    exe = shutil.which("mixtral-convert", path=os.path.dirname(sys.executable))
    assert exe, "the mixtral-convert console script is not installed beside the interpreter"
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and "mixtral-convert" in p.stdout
