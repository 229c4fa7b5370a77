"""Targets own their options and what they can hold: a new target is one registration, and a
refusal is one check in one place (formats.checkpoint.Target, formats.registry)."""

import json

from helpers import cli

from mixtral_convert.commands.merge import merge
from mixtral_convert.commands.options import MergeOptions, OutputOptions
from mixtral_convert.formats import registry
from mixtral_convert.formats.checkpoint import Target, TargetOption, TargetPlan
from mixtral_convert.io.small import write_small


def _npy_target(calls: list) -> Target:
    """A made-up target: every tensor's first bytes and the options it was given, in one JSON file."""

    def prepare(ck, options):
        calls.append(("prepare", dict(options)))
        return dict(options, level=options["level"] * 10)

    def plan(ck, level):
        calls.append(("plan", level))
        body = json.dumps({"level": level, "tensors": {k: list(t.shape) for k, t in ck.canonical.items()}}).encode()

        def write(tmp, progress):
            calls.append(("write", level))
            return {"model.json": write_small(tmp / "model.json", body)}

        return TargetPlan([("model.json", len(body), "made up")], write)

    return Target("made-up", "_made_up", plan, help="a test format", prepare=prepare, dtypes=("float32",),
                  options=(TargetOption("--level", "level", "how hard", parse=int, default="2"),))


def test_a_made_up_target_is_one_registration(wide_src, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(registry.TARGETS, "made-up", _npy_target(calls))
    res = merge(wide_src, MergeOptions("made-up", {"level": "3"}), output=OutputOptions(tmp_path / "o", quiet=True))
    body = json.loads((res.out / "model.json").read_text())
    assert body["level"] == 30 and calls == [("prepare", {"level": 3}), ("plan", 30), ("write", 30)]
    assert body["tensors"]["layers.1.attention.wq.weight"] == [64, 64]
    manifest = json.loads((res.out / "mixtral-convert-manifest.json").read_text())
    assert manifest["layout"] == "made-up" and "model.json" in manifest["files"]
    calls.clear()
    # not given: the option's default, parsed
    merge(wide_src, MergeOptions("made-up"), output=OutputOptions(tmp_path / "d", quiet=True))
    assert calls[0] == ("prepare", {"level": 2})


def test_a_dtype_the_target_cannot_take_is_refused_before_writing(wide_src, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.TARGETS, "made-up", _npy_target([]))
    try:
        merge(wide_src, MergeOptions("made-up"), output=OutputOptions(tmp_path / "o", quiet=True, dtype="bfloat16"))
        raise AssertionError("not refused")
    except Exception as e:  # the one-line ConvertError
        assert "made-up layout takes float32" in str(e), e
    assert not (tmp_path / "o").exists()


def test_an_option_of_another_target_is_refused_naming_it(wide_src, tmp_path, capsys):
    assert cli("split", wide_src, "-n", 2, "-o", tmp_path / "s", "-q", capsys=capsys)[0] == 0
    code, _, err = cli("merge", tmp_path / "s", "--to", "torrent", "--max-shard-size", "1GB", "-o", tmp_path / "o",
                       capsys=capsys)
    assert code == 2 and "--max-shard-size is for --to hf" in err and "torrent layout has no place" in err, err
    assert not (tmp_path / "o").exists()


def test_to_choices_and_option_help_come_from_the_targets(capsys):
    code, out, _ = cli("merge", "--help", capsys=capsys)
    assert code == 0
    for t in registry.TARGETS.values():
        assert t.name in out
        for o in t.options:
            assert o.flag in out
