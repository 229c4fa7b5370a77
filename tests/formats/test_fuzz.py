"""Damaged downloads: seeded mutations of a tiny checkpoint (bit flips, byte overwrites,
truncations) through every reader, in-process. Each mutation must either read, and then every
tensor's bytes are the bytes the damaged file holds for it, or end in the tool's own one-line
ConvertError; never another exception ("internal error" at the CLI).

Each damaged copy is written to a new inode (os.replace), so no view of an earlier copy can
ever see its file shrink under it (which would SIGBUS the test process rather than fail it).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import load_lazy

from mixtral_convert.encodings import safetensors as safetensorsfile
from mixtral_convert.encodings import safetensors as stheader
from mixtral_convert.encodings import torchzip
from mixtral_convert.errors import ConvertError
from mixtral_convert.formats import checkpoint, registry
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes
from mixtral_convert.model import names as hfnames
from mixtral_convert.synth import materialize, tiny_config, write_torrent

# small enough that the zip records and the pickle are most of the file (~6 KiB, ~1.2 KiB of tensor data)
CFG = tiny_config(dim=8, n_layers=1, head_dim=4, hidden_dim=4, n_heads=2, n_kv_heads=1, vocab_size=8,
                  num_experts=2, experts_per_tok=1)
SEED = 11
N_PTH, N_ZIP64, N_SAFETENSORS = 320, 160, 200  # mutations per file


def _raw(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


def _read_all(lazy) -> bytes:
    """Every byte of a lazy tensor, through its blocks (tiny blocks: several reads per tensor)."""
    return b"".join(_raw(b) for b in lazy.blocks(block_bytes=16))


def mutate(data: bytes, structure: list[tuple[int, int]], rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy: a truncation, 1-3 bit flips or a 1-8 byte overwrite. Half the positions
    fall in `structure` (zip records, pickle, safetensors header), where damage is interesting."""
    kind = rng.choices(["truncate", "flip", "overwrite"], [1, 5, 4])[0]
    if kind == "truncate":
        n = rng.randrange(len(data))
        return f"truncate to {n}", data[:n]

    def pos() -> int:
        if rng.random() < 0.5:
            a, b = rng.choice(structure)
            return rng.randrange(a, b)
        return rng.randrange(len(data))

    out = bytearray(data)
    if kind == "flip":
        where = [(pos(), rng.randrange(8)) for _ in range(rng.randint(1, 3))]
        for p, bit in where:
            out[p] ^= 1 << bit
        return "flip " + ", ".join(f"{p}:{bit}" for p, bit in where), bytes(out)
    p, n = pos(), rng.randint(1, 8)
    fill = rng.choice([bytes(n), b"\xff" * n, bytes(rng.randrange(256) for _ in range(n))])
    out[p:p + n] = fill
    return f"overwrite {p}+{n} with {fill.hex()}", bytes(out[:len(data)])


class Case:
    """Reads one damaged file through the readers; records what escaped or read wrong."""

    def __init__(self, label: str, where: Path):
        self.label, self.where, self.escaped, self.wrong = label, str(where), [], []

    def run(self, what: str, fn):
        try:
            return fn()
        except ConvertError as e:
            msg = str(e)
            if "\n" in msg or self.where not in msg:
                self.escaped.append(f"{what}: ConvertError not one line naming {self.where}: {msg[:200]!r}")
            return None
        except Exception as e:  # the point: nothing else may escape
            self.escaped.append(f"{what}: {type(e).__name__}: {str(e)[:160]}")
            return None


def _check_held(case: Case, what: str, name: str, got: bytes, shape, dtype, damaged: bytes, layout: dict):
    """`got` must be the bytes the damaged file holds for tensor `name`: where its description is
    unchanged, exactly the bytes at its place in the file; otherwise, bytes found in the file."""
    ref = layout.get(name)
    if ref is not None and (tuple(shape), dtype) == ref[2:]:
        off, n = ref[0], ref[1]
        ok = got == damaged[off:off + n]
    else:
        ok = got in damaged
    if not ok:
        case.wrong.append(f"{what}: tensor {name!r} {list(shape)} {dtype} reads bytes the file does not hold there")


# ----------------------------------------------------------------------------- the pristine files
def _pth(out: Path) -> tuple:
    """A torrent directory; the file, its bytes, its spans outside tensor data, and its layout."""
    pth = write_torrent(out, CFG, seed=SEED, tokenizer=False) / "consolidated.00.pth"
    recs = {r.name: r for r in torchzip.zip_records(pth)}
    layout, data_spans = {}, []
    for i, (name, shape) in enumerate(CFG.canonical_shapes().items()):  # the writer keys storages 0, 1, ...
        r = recs[f"archive/data/{i}"]
        layout[name] = (r.data_offset, r.size, tuple(shape), torch.bfloat16)
        data_spans.append((r.data_offset, r.data_offset + r.size))
    size = pth.stat().st_size
    structure, at = [], 0
    for a, b in sorted(data_spans) + [(size, size)]:
        if a > at:
            structure.append((at, a))
        at = max(at, b)
    return pth, pth.read_bytes(), structure, layout


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:  # zip64 records (sizes and offsets >= 4 GiB) on a small file
        mp.setattr(torchzip, "ZIP64_LIMIT", 100)
        zip64 = _pth(root / "zip64")
    out = {"pth": _pth(root / "pth"), "pth-zip64": zip64}
    hf = root / "hf"
    hf.mkdir()
    model = materialize(CFG, seed=SEED, dtype=torch.bfloat16)
    hf_sd = {}
    for name, t in model.items():
        n = hfnames.qk_heads(name, CFG)
        hf_sd[hfnames.canonical_to_hf(name)] = t if n is None else hfnames.permute_qk_to_hf(t, n).contiguous()
    st = hf / "model.safetensors"
    safetensorsfile.write_safetensors(st, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in hf_sd.items()],
                                      lambda s: [tensor_bytes(hf_sd[s.name])], fsync=False)
    (hf / "config.json").write_text(json.dumps({  # MixtralConfig's names (docs/formats.md, HF hub layout)
        "hidden_size": CFG.dim, "intermediate_size": CFG.hidden_dim, "num_hidden_layers": CFG.n_layers,
        "num_attention_heads": CFG.n_heads, "num_key_value_heads": CFG.n_kv_heads, "head_dim": CFG.head_dim,
        "vocab_size": CFG.vocab_size, "rms_norm_eps": CFG.norm_eps, "rope_theta": CFG.rope_theta,
        "num_local_experts": CFG.num_experts, "num_experts_per_tok": CFG.experts_per_tok}))
    entries, start = stheader.parse_file(st)
    layout_st = {e.name: (start + e.begin, e.end - e.begin, e.shape, e.dtype) for e in entries}
    out["safetensors"] = (st, st.read_bytes(), [(0, start)], layout_st)
    return out


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: earlier mappings keep their own (whole) file


def _read_direct(case: Case, what: str, path: Path, fn, damaged: bytes, layout: dict) -> dict | None:
    """A reader returning {name: tensor or Lazy}: read every tensor and check its bytes."""
    got = case.run(what, lambda: fn(path))
    if got is None:
        return None
    out = {}
    for name, t in got.items():
        data = case.run(f"{what} reading {name!r}",
                        lambda t=t: _raw(t) if isinstance(t, torch.Tensor) else _read_all(t))
        if data is None:
            continue
        _check_held(case, what, name, data, t.shape, t.dtype, damaged, layout)
        out[name] = data
    return out


def _read_opened(case: Case, path: Path, direct: dict | None, hf: bool):
    """open_checkpoint on the directory; every canonical tensor must read as the file's own
    tensor read directly (through the q/k permutation for the HF layout)."""
    ck = case.run("open_checkpoint", lambda: registry.open_checkpoint(path.parent))
    if ck is None:
        return
    for name, lazy in ck.canonical.items():
        data = case.run(f"open_checkpoint reading {name!r}", lambda lazy=lazy: _read_all(lazy))
        if data is None:
            continue
        key = hfnames.canonical_to_hf(name) if hf else name
        if direct is None or key not in direct:
            case.wrong.append(f"open_checkpoint: read {name!r} although the file's own reader could not")
            continue
        expect = direct[key]
        if hf:
            t = torch.frombuffer(bytearray(expect), dtype=lazy.dtype).reshape(lazy.shape)
            expect = _raw(hfnames.from_hf_tensor(name, t, CFG).contiguous())
        if data != expect:
            case.wrong.append(f"open_checkpoint: canonical {name!r} differs from the file's tensor")


def fuzz(which: str, pristine: dict, n: int, seed: int) -> tuple[Counter, list[str], int]:
    """(what escaped: {"reader: exception": mutations}, one report per bad mutation, how many read)."""
    path, data, structure, layout = pristine[which]
    rng = random.Random(seed)
    escaped: Counter = Counter()
    reports: list[str] = []
    read_ok = 0
    for i in range(n):
        label, damaged = mutate(data, structure, rng)
        _replace(path, damaged)
        case = Case(f"#{i} {label}", path.parent)
        if which.startswith("pth"):
            direct = _read_direct(case, "load_lazy", path, load_lazy, damaged, layout)
            _read_direct(case, "torchzip.read_tensors", path, torchzip.read_tensors, damaged, layout)
            case.run("zip_records", lambda: torchzip.zip_records(path))
            case.run("check_checkpoint", lambda: torchzip.check_checkpoint(path))
        else:
            direct = _read_direct(case, "safetensorsfile.read_tensors", path, safetensorsfile.read_tensors,
                                  damaged, layout)
        _read_direct(case, "checkpoint.read_tensors", path, checkpoint.read_tensors, damaged, layout)
        _read_opened(case, path, direct, hf=which == "safetensors")
        read_ok += direct is not None
        for e in case.escaped:
            escaped[e.split(":")[0] + ": " + e.split(": ")[1].split(":")[0]] += 1
        if case.wrong:
            escaped["silently read bytes the file does not hold there"] += 1
        if case.escaped or case.wrong:
            reports.append(f"{case.label}: " + "; ".join(case.escaped + case.wrong))
    _replace(path, data)
    return escaped, reports, read_ok


@pytest.mark.parametrize("which,n", [("pth", N_PTH), ("pth-zip64", N_ZIP64), ("safetensors", N_SAFETENSORS)])
def test_damaged_files_read_right_or_fail_with_convert_error(pristine, which, n):
    escaped, reports, read_ok = fuzz(which, pristine, n, SEED)
    assert not reports, (f"{len(reports)} of {n} mutations of the {which} file escaped ConvertError or read "
                         f"wrong bytes; mutations per failure: {dict(escaped)}:\n" + "\n".join(reports[:25]))
    assert 0 < read_ok < n  # both outcomes were exercised: damage that reads and damage that is refused


def test_pristine_files_read_exactly(pristine):
    """The oracle itself: undamaged, every reader gives every tensor's bytes at its place."""
    model = materialize(CFG, seed=SEED, dtype=torch.bfloat16)
    for which in ("pth", "pth-zip64", "safetensors"):
        path, data, _, layout = pristine[which]
        case = Case("pristine", path.parent)
        direct = _read_direct(case, "read", path, checkpoint.read_tensors, data, layout)
        _read_opened(case, path, direct, hf=which == "safetensors")
        assert not case.escaped and not case.wrong and len(direct) == len(model)
    ck = registry.open_checkpoint(pristine["pth"][0].parent)
    assert all(_read_all(ck.canonical[k]) == _raw(model[k]) for k in model)
