"""Every failure is one line naming the file, tensor or option, exit 2, no traceback unless
--debug; every validation happens before anything is written; nothing but tensors is ever
unpickled, by any command."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import cli, load

from mixtral_convert.encodings.torchzip import write_checkpoint
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes
from mixtral_convert.synth import tiny_config, train_tokenizer, write_torrent

PACKAGE = Path(__file__).resolve().parent.parent / "mixtral_convert"


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _write(path, sd):
    write_checkpoint(path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                     lambda s: [tensor_bytes(sd[s.name])])


# ----------------------------------------------------------------------------- --debug, internal errors
def test_traceback_only_with_debug(tmp_path, capsys):
    code, _, err = cli("split", tmp_path / "nothing", capsys=capsys)
    assert code == 2 and one_line_error(err) == f"error: {tmp_path / 'nothing'}: no such file or directory"
    code, _, err = cli("--debug", "split", tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'nothing'}: no such file or directory"


def test_unexpected_exception_is_one_line(wide_src, tmp_path, capsys, monkeypatch):
    import mixtral_convert.commands.split as convert

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(convert, "split", boom)
    code, _, err = cli("split", wide_src, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and one_line_error(err) == ("error: internal error: RuntimeError: boom second line (re-run with "
                                                 "--debug for the traceback and report it)")
    code, _, err = cli("--debug", "split", wide_src, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "Traceback" in err and 'raise RuntimeError("boom' in err


def test_usage_errors_are_one_line(wide_src, capsys):
    code, _, err = cli("split", capsys=capsys)
    assert code == 2 and one_line_error(err) == "error: Missing argument 'SRC'. (see 'mixtral-convert --help')"
    code, _, err = cli("split", wide_src, "-n", "0", capsys=capsys)
    assert code == 2 and "-n" in one_line_error(err)
    code, _, err = cli("frobnicate", capsys=capsys)
    assert code == 2 and "frobnicate" in one_line_error(err)


def test_unreadable_source_file_is_named(tmp_path, capsys):
    src = write_torrent(tmp_path / "src", tiny_config())
    (src / "consolidated.00.pth").unlink()
    (src / "consolidated.00.pth").mkdir()  # a directory where the file should be
    code, _, err = cli("split", src, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "consolidated.00.pth" in one_line_error(err)


# ----------------------------------------------------------------------------- validate before writing
def _damages(src: Path):
    """(name, damage, expected words): each leaves the source invalid in one way."""
    sd = {k: v.clone() for k, v in load(src / "consolidated.00.pth").items()}
    params = json.loads((src / "params.json").read_text())

    def without(key):
        bad = dict(sd)
        del bad[key]
        return bad

    return [
        ("params.json missing", lambda: (src / "params.json").unlink(), ["params.json", "not found"]),
        ("params.json not JSON", lambda: (src / "params.json").write_text("{not json"),
         ["params.json", "not valid JSON"]),
        ("params.json key missing", lambda: (src / "params.json").write_text(
            json.dumps({k: v for k, v in params.items() if k != "n_heads"})), ["params.json", "'n_heads'"]),
        ("params.json value wrong", lambda: (src / "params.json").write_text(
            json.dumps(dict(params, dim="64"))), ["params.json", "'dim' must be an integer"]),
        ("params.json without moe", lambda: (src / "params.json").write_text(
            json.dumps({k: v for k, v in params.items() if k != "moe"})), ["params.json", "'moe'"]),
        ("missing tensor", lambda: _write(src / "consolidated.00.pth", without("layers.0.attention.wv.weight")),
         ["'layers.0.attention.wv.weight'", "missing"]),
        ("extra tensor", lambda: _write(src / "consolidated.00.pth", dict(sd, **{"bonus.weight": torch.zeros(2)})),
         ["'bonus.weight'", "unexpected"]),
        ("wrong shape", lambda: _write(src / "consolidated.00.pth", dict(
            sd, **{"layers.1.feed_forward.experts.3.w2.weight": torch.zeros(5, 5, dtype=torch.bfloat16)})),
         ["'layers.1.feed_forward.experts.3.w2.weight'", "shape [5, 5]"]),
        ("mixed dtypes",
         lambda: _write(src / "consolidated.00.pth", dict(sd, **{"norm.weight": sd["norm.weight"].half()})),
         ["mixed dtypes", "float16", "bfloat16"]),
        ("truncated checkpoint", lambda: (src / "consolidated.00.pth").write_bytes(
            (src / "consolidated.00.pth").read_bytes()[:-5000]), ["consolidated.00.pth", "truncated"]),
        ("not a zip", lambda: (src / "consolidated.00.pth").write_bytes(b"\x80\x02}q\x00." * 100),
         ["consolidated.00.pth", "not a torch zip checkpoint"]),
        ("not a dict", lambda: torch.save([torch.zeros(2)], src / "consolidated.00.pth"),
         ["consolidated.00.pth", "expected a dict of tensors"]),
        ("tokenizer missing", lambda: (src / "tokenizer.model").unlink(), ["tokenizer.model"]),
        ("tokenizer not sentencepiece", lambda: (src / "tokenizer.model").write_bytes(b"garbage"),
         ["tokenizer.model", "not a SentencePiece model"]),
        ("tokenizer piece count", lambda: (src / "tokenizer.model").write_bytes(train_tokenizer(100)),
         ["tokenizer.model", "100 pieces", "128"]),
    ]


@pytest.mark.parametrize("cmd", ["split", "split-sparse"])
def test_every_validation_happens_before_writing(tmp_path, capsys, cmd):
    src = tmp_path / "src"
    write_torrent(src, tiny_config())
    pristine = {p.name: p.read_bytes() for p in src.iterdir()}
    for name, damage, words in _damages(src):
        damage()
        out = tmp_path / "new" / "deeper" / "o"
        code, _, err = cli(cmd, src, "-n", 2, "-o", out, capsys=capsys)
        line = one_line_error(err)
        assert code == 2, (name, err)
        assert all(w in line for w in words), (name, line)
        assert not (tmp_path / "new").exists(), name  # nothing created, not even the parents
        for p in list(src.iterdir()):
            p.unlink() if p.is_file() else p.rmdir()
        for n, data in pristine.items():
            (src / n).write_bytes(data)
    # invalid N, listing the valid ones
    code, _, err = cli(cmd, src, "-n", 3, "-o", tmp_path / "new" / "o", capsys=capsys)
    assert code == 2 and one_line_error(err).startswith("error: -n 3: world size 3 does not divide")
    assert "valid world sizes: 1, 2, 4; pass -n with one of them" in err
    assert not (tmp_path / "new").exists()
    assert cli(cmd, src, "-n", 2, "-o", tmp_path / "new" / "o", "-q", capsys=capsys)[0] == 0  # pristine again


def test_merge_validates_before_writing(wide_src, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert cli("split", wide_src, "-n", 2, "-o", shards, "-q", capsys=capsys)[0] == 0
    tok = (shards / "tokenizer.model").read_bytes()
    (shards / "tokenizer.model").write_bytes(train_tokenizer(100))
    code, _, err = cli("merge", shards, "-o", tmp_path / "new" / "m", capsys=capsys)
    assert code == 2 and "100 pieces" in one_line_error(err) and not (tmp_path / "new").exists()
    (shards / "tokenizer.model").write_bytes(tok)
    (shards / "consolidated.01-of-02.model.pth").unlink()
    code, _, err = cli("merge", shards, "-o", tmp_path / "new" / "m", capsys=capsys)
    assert code == 2 and "rank file(s) 01 missing" in one_line_error(err) and not (tmp_path / "new").exists()
    code, _, err = cli("merge", wide_src, "-o", tmp_path / "new" / "m", capsys=capsys)
    assert code == 2 and "already in the torrent layout" in one_line_error(err) and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- untrusted pickles
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickled_callable_is_refused_by_every_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = write_torrent(tmp_path / "clean", tiny_config())
    shards = tmp_path / "shards"
    assert cli("split", clean, "-n", 2, "-o", shards, "-q", capsys=capsys)[0] == 0
    evil_src = write_torrent(tmp_path / "evil_src", tiny_config())
    sd = load(evil_src / "consolidated.00.pth")
    sd["norm.weight"] = _Evil()
    torch.save(sd, evil_src / "consolidated.00.pth")
    f = shards / "consolidated.01-of-02.model.pth"
    sd = load(f)
    sd["llma.norm.weight"] = _Evil()
    torch.save(sd, f)
    runs = [
        ["split", evil_src, "-n", 2, "-o", tmp_path / "o1"],
        ["split-sparse", evil_src, "-n", 2, "-o", tmp_path / "o2"],
        ["split", shards, "-n", 1, "-o", tmp_path / "o3"],  # re-shard an Accessory directory
        ["merge", shards, "-o", tmp_path / "o4"],
        ["verify", shards, "--source", evil_src],
        ["verify", shards, "--source", clean],
        ["inspect", evil_src],
        ["inspect", evil_src / "consolidated.00.pth"],
        ["inspect", shards],
        ["inspect", f],
    ]
    for args in runs:
        code, _, err = cli(*args, capsys=capsys)
        line = one_line_error(err)
        assert code in (1, 2), args
        assert "refused to load" in line and "only plain tensor checkpoints are accepted" in line, (args, line)
        assert "(it would call posix.system)" in line or "system" in line, line
        assert not (tmp_path / "PWNED_BY_PICKLE").exists(), args
    # verify without --source: the manifest already flags the changed file, which is never loaded
    code, _, err = cli("verify", shards, capsys=capsys)
    assert code == 1 and f.name in one_line_error(err)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "evil_src", "shards"]


def test_weights_only_everywhere():
    """Static: every torch.load in the package passes weights_only=True; no pickle.load, no
    numpy allow_pickle."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30 and any(p.parent.name == "formats" for p in paths)  # the whole package, sub-packages too
    loads = 0
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if fn.endswith("torch.load") or fn == "load" and "map_location" in kw:
                assert kw.get("weights_only") == "True", f"{path.name}:{node.lineno}: {ast.unparse(node)}"
                loads += 1
            assert not fn.startswith(("pickle.load", "cPickle.load", "dill.load")), f"{path.name}:{node.lineno}"
            assert kw.get("allow_pickle") != "True", f"{path.name}:{node.lineno}"
            assert not fn.endswith(("pickle.Unpickler", "_pickle.Unpickler")), f"{path.name}:{node.lineno}"
    assert loads >= 3  # the checkpoint reader, concat's check and the tokens file are all seen
