"""--dry-run: the plan of split, split-sparse and merge, with every file's exact size, and
nothing written; a run that would be refused is refused the same way."""

import re
import shutil
from collections import namedtuple

import pytest
from helpers import cli

MANIFEST = "mixtral-convert-manifest.json"


def planned(text: str) -> dict[str, int]:
    """file name -> bytes, from the plan's lines."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+)\s+\S+ \S+\s+\((\d+) bytes\)", text, re.M)}


def listing(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("args", [
    ["split", "-n", "2"],
    ["split-sparse", "-n", "4", "--format", "safetensors"],
    ["split-sparse", "-n", "2", "--dtype", "float32"],
    ["split", "-n", "4", "--ranks", "1,3"],
])
def test_split_plan_gives_every_file_and_its_exact_size(wide_src, tmp_path, capsys, args):
    out = tmp_path / "out"
    before = listing(tmp_path)
    code, text, err = cli(args[0], wide_src, *args[1:], "-o", out, "--dry-run", capsys=capsys)
    assert code == 0, err
    assert listing(tmp_path) == before and "nothing was written" in text  # not even -o
    plan = planned(text)
    assert cli(args[0], wide_src, *args[1:], "-o", out, "-q", capsys=capsys)[0] == 0
    written = {p.name: p.stat().st_size for p in out.iterdir() if not p.name.startswith(".")}
    if "--ranks" in args:  # the manifest comes once every rank is written
        written.setdefault(MANIFEST, plan[MANIFEST])
    assert set(plan) == set(written)
    assert {k: v for k, v in plan.items() if k != MANIFEST} == {k: v for k, v in written.items() if k != MANIFEST}
    assert abs(plan[MANIFEST] - written[MANIFEST]) <= 16  # its text holds the command line: "--dry-run" aside
    if "--dtype" in args:
        assert "float32 (cast from bfloat16)" in text


@pytest.mark.parametrize("to", ["torrent", "hf"])
def test_merge_plan_gives_every_file_and_its_exact_size(wide_src, tmp_path, capsys, to):
    src = tmp_path / "b2"
    assert cli("split", wide_src, "-n", 2, "-o", src, "-q", capsys=capsys)[0] == 0
    extra = ["--max-position-embeddings", "4096", "--max-shard-size", "300KB"] if to == "hf" else []
    code, text, err = cli("merge", src, "--to", to, "-o", tmp_path / "m", "--dry-run", *extra, capsys=capsys)
    assert code == 0, err
    assert not (tmp_path / "m").exists()
    plan = planned(text)
    assert cli("merge", src, "--to", to, "-o", tmp_path / "m", "-q", *extra, capsys=capsys)[0] == 0
    written = {p.name: p.stat().st_size for p in (tmp_path / "m").iterdir()}
    assert set(plan) == set(written)
    assert {k: v for k, v in plan.items() if k != MANIFEST} == {k: v for k, v in written.items() if k != MANIFEST}
    if to == "hf":
        assert sum(n.startswith("model-") for n in plan) > 1  # several weight files and their index


def test_dry_run_refuses_what_the_run_would_refuse(wide_src, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = cli("split", wide_src, "-n", 2, "-o", taken, "--dry-run", capsys=capsys)
    assert code == 2 and "exists and is not empty" in err
    code, _, err = cli("split", wide_src, "-n", 3, "-o", tmp_path / "o", "--dry-run", capsys=capsys)
    assert code == 2 and "valid world sizes" in err
    from mixtral_convert.io import atomic
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code, _, err = cli("split", wide_src, "-n", 2, "-o", tmp_path / "o", "--dry-run", capsys=capsys)
    assert code == 2 and "not enough free space" in err
    assert listing(tmp_path) == ["taken"]


def test_dry_run_leaves_a_killed_runs_leftovers_alone(wide_src, tmp_path, capsys):
    """A real run would remove a killed run's temporary directory; a dry run leaves it."""
    stale = tmp_path / ".o.mixtral-convert-partial"
    stale.mkdir()
    (stale / ".mixtral-convert-partial").write_text("12345\n")
    code, text, err = cli("split", wide_src, "-n", 2, "-o", tmp_path / "o", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert stale.is_dir()
    shutil.rmtree(stale)
