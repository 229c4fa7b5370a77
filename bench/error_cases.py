#!/usr/bin/env python3
"""Every user-facing failure case of split/inspect/verify, run through the real CLI on a tiny
fixture: prints a Markdown table of case | exit code | the line on stderr (temp dir shown as T).
Mounts two small tmpfs (a full disk, a read-only one) when run as root; skips them otherwise.

    .venv/bin/python bench/error_cases.py
"""
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import torch

from mixtral_convert.synth import tiny_config, write_torrent

T = pathlib.Path(tempfile.mkdtemp(prefix="errs-"))
src = write_torrent(T / "src", tiny_config(), seed=1)
CK = "consolidated.00.pth"

def variant(name, edit):
    d = T / name
    shutil.copytree(src, d)
    edit(d)
    return d

def run(case, *args, expect=None):
    p = subprocess.run([sys.executable, "-m", "mixtral_convert", *map(str, args)], capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    line = err[-1] if err else p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    line = line.replace(str(T), "T")
    print(f"| {case} | {p.returncode} | `{line}` |")

def sd_edit(fn):
    def e(d):
        sd = torch.load(d / CK, weights_only=True)
        fn(sd)
        torch.save(sd, d / CK)
    return e

def params_edit(fn):
    def e(d):
        p = json.loads((d / "params.json").read_text())
        fn(p)
        (d / "params.json").write_text(json.dumps(p))
    return e

print("| case | exit | message |\n|---|---|---|")
run("missing SRC argument", "split")
run("source directory does not exist", "split", T / "nope", "-o", T / "o")
run("missing params.json", "split", variant("noparams", lambda d: (d / "params.json").unlink()), "-o", T / "o")
run("params.json not JSON", "split", variant("badjson", lambda d: (d / "params.json").write_text("{dim: 64")),
    "-o", T / "o")
run("params.json missing a key", "split", variant("nokey", params_edit(lambda p: p.pop("dim"))), "-o", T / "o")
WK = "layers.0.attention.wk.weight"
run("params.json malformed value", "split",
    variant("badval", params_edit(lambda p: p.__setitem__("n_heads", "eight"))), "-o", T / "o")
run("missing tensor", "split",
    variant("missing", sd_edit(lambda sd: sd.pop("layers.1.feed_forward.experts.2.w3.weight"))), "-o", T / "o")
run("extra tensor", "split",
    variant("extra", sd_edit(lambda sd: sd.__setitem__("layers.0.attention.bias", torch.zeros(4)))), "-o", T / "o")
run("wrongly shaped tensor", "split",
    variant("shape", sd_edit(lambda sd: sd.__setitem__(WK, sd[WK][:-1].clone()))), "-o", T / "o")
run("mixed dtypes", "split",
    variant("dtype", sd_edit(lambda sd: sd.__setitem__("norm.weight", sd["norm.weight"].float()))), "-o", T / "o")


def trunc(d):
    b = (d / CK).read_bytes()
    (d / CK).write_bytes(b[: len(b) // 2])


run("truncated checkpoint", "split", variant("trunc", trunc), "-o", T / "o")
run("not a zip checkpoint", "split", variant("notzip", lambda d: (d / CK).write_bytes(b"hello" * 100)), "-o", T / "o")
def tok(d):
    other = write_torrent(T / "othertok", tiny_config(vocab_size=96), seed=2)
    shutil.copy(other / "tokenizer.model", d / "tokenizer.model")
run("tokenizer pieces != vocab", "split", variant("tok", tok), "-n", 2, "-o", T / "o")
run("no tokenizer.model", "split", variant("notok", lambda d: (d / "tokenizer.model").unlink()), "-n", 2, "-o", T / "o")
run("invalid N (base)", "split", src, "-n", 3, "-o", T / "o")
run("invalid N (sparse)", "split-sparse", src, "-n", 64, "-o", T / "o")
class Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED > " + str(T / "pwned"),))
run("pickled callable", "inspect", variant("evil", lambda d: torch.save({"x": Evil()}, d / CK)))
print(f"|   (the callable ran: {(T / 'pwned').exists()}) | | |")
(T / "full").mkdir()
(T / "full" / "x").write_text("mine")
run("non-empty -o without --force", "split", src, "-n", 2, "-o", T / "full")
(T / "ro").mkdir()
if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=50m", "tmpfs", str(T / "ro")]).returncode == 0:
    run("unwritable -o (read-only filesystem)", "split", src, "-n", 2, "-o", T / "ro" / "o")
    subprocess.run(["umount", str(T / "ro")])
mnt = T / "tiny"
mnt.mkdir()
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)]).returncode == 0:
    run("not enough free space on -o's disk", "split", src, "-n", 2, "-o", mnt / "o")
    print(f"|   (left on that disk: {sorted(p.name for p in mnt.iterdir())}) | | |")
    subprocess.run(["umount", str(mnt)])
run("unknown option", "split", src, "--world", 2)
out = T / "good"
subprocess.run([sys.executable, "-m", "mixtral_convert", "split", str(src), "-n", "2", "-o", str(out), "-q"],
               check=True)
run("verify, clean", "verify", out, "--source", src, "-q")
shard = out / "consolidated.01-of-02.model.pth"
b = bytearray(shard.read_bytes())
with zipfile.ZipFile(shard) as z:
    info = z.getinfo("archive/data/5")
n, m = struct.unpack("<HH", bytes(b[info.header_offset + 26:info.header_offset + 30]))
off = info.header_offset + 30 + n + m + 3
b[off] ^= 0x01
shard.write_bytes(bytes(b))
run("verify --source, one flipped bit in rank 1", "verify", out, "--source", src)
run("verify without --source (manifest), same bit", "verify", out)
shutil.rmtree(T, ignore_errors=True)
