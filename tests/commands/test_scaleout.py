"""--ranks and torchrun-style processes write a set of shards equal to a single-process run's."""

import filecmp
import json
import os
import subprocess
import sys

import pytest
from helpers import cli


@pytest.mark.parametrize("cmd", ["split", "split-sparse"])
def test_ranks_in_separate_processes_equal_single_run(wide_src, tmp_path, capsys, cmd):
    single, shared = tmp_path / "single", tmp_path / "shared"
    assert cli(cmd, wide_src, "-n", 4, "-o", single, "-q", capsys=capsys)[0] == 0
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-m", "mixtral_convert", cmd, str(wide_src), "-n", "4",
                               "-o", str(shared), "-q", "--ranks", ranks], env=env)
             for ranks in ("0,3", "2", "1")]
    assert [p.wait() for p in procs] == [0, 0, 0]
    for r in range(4):
        name = f"consolidated.{r:02d}-of-04.model.pth"
        assert filecmp.cmp(single / name, shared / name, shallow=False), name
    for name in ("config.json", "meta.json", "tokenizer.model"):
        assert filecmp.cmp(single / name, shared / name, shallow=False), name
    ms, mp = (json.loads((d / "mixtral-convert-manifest.json").read_text())["files"] for d in (single, shared))
    assert ms == mp  # same sizes and sha256 of every file
    assert not [p for p in shared.iterdir() if p.name.startswith(".")]  # no parts or temporaries left
    assert cli("verify", shared, "--source", wide_src, "-q", capsys=capsys)[0] == 0


def test_torchrun_environment_splits_the_ranks(wide_src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    for rank in (1, 0):  # as two torchrun processes would, one after the other
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        assert cli("split", wide_src, "-n", 8, "-o", out, "-q", capsys=capsys)[0] == 0
        have = sorted(p.name for p in out.glob("*.model.pth"))
        if rank == 1:
            assert have == [f"consolidated.{r:02d}-of-08.model.pth" for r in (1, 3, 5, 7)]
            assert not (out / "mixtral-convert-manifest.json").exists()
    monkeypatch.delenv("WORLD_SIZE")
    assert (out / "mixtral-convert-manifest.json").exists()
    assert cli("verify", out, "--source", wide_src, "-q", capsys=capsys)[0] == 0


def test_ranks_refuses_bad_numbers_and_existing_files(wide_src, tmp_path, capsys):
    code, _, err = cli("split", wide_src, "-n", 4, "-o", tmp_path / "o", "--ranks", "4", capsys=capsys)
    assert code == 2 and "--ranks" in err and "0..3" in err
    assert cli("split", wide_src, "-n", 4, "-o", tmp_path / "o", "--ranks", "1", "-q", capsys=capsys)[0] == 0
    code, _, err = cli("split", wide_src, "-n", 4, "-o", tmp_path / "o", "--ranks", "1", capsys=capsys)
    assert code == 2 and "--force" in err
    assert cli("split", wide_src, "-n", 4, "-o", tmp_path / "o", "--ranks", "1", "--force", "-q", capsys=capsys)[0] == 0


def test_ranks_space_check_keeps_a_margin_and_counts_the_files_force_replaces(wide_src, tmp_path, capsys,
                                                                             monkeypatch):
    """--ranks asks for the ranks' bytes plus the margin every output gets, less what the files it
    replaces with --force already hold."""
    from mixtral_convert.commands.common import MARGIN
    from mixtral_convert.io import atomic
    out = tmp_path / "o"
    assert cli("split", wide_src, "-n", 4, "-o", out, "--ranks", "1", "-q", capsys=capsys)[0] == 0
    rank1 = (out / "consolidated.01-of-04.model.pth").stat().st_size
    need = rank1  # a rank's tensor bytes are a little less than its file; the file is what is replaced
    monkeypatch.setattr(atomic, "_free", lambda p: need + MARGIN // 2)  # enough for the data, not the margin
    code, _, err = cli("split", wide_src, "-n", 4, "-o", out, "--ranks", "2", capsys=capsys)
    assert code == 2 and "not enough free space" in err and not (out / "consolidated.02-of-04.model.pth").exists()
    monkeypatch.setattr(atomic, "_free", lambda p: MARGIN + 1000)  # short unless rank 1's own bytes count
    code, _, err = cli("split", wide_src, "-n", 4, "-o", out, "--ranks", "1", "--force", "-q", capsys=capsys)
    assert code == 0, err
