"""`concat` on the pieces community mirrors cut Mixtral-8x22B's one consolidated.safetensors
into (`consolidated.safetensors.0` ... `.N`): joined in numeric order, and the joined file proved
whole as a torch zip is: the header parses, the tensors' data regions tile the data in order
(no gap, no overlap) and the size is exact; refusals leave nothing behind."""

import hashlib
import json
import random
import shutil
import struct

import pytest
import torch
from helpers import cli, cut_bytes, same_bytes
from safetensors.torch import load_file, save_file

from mixtral_convert.commands import concat as op
from mixtral_convert.encodings import safetensors as stheader
from mixtral_convert.errors import ConvertError

BASE = "consolidated.safetensors"


def make_safetensors(path, seed=0) -> bytes:
    """A real safetensors file (the library's writer) of a few tensors and dtypes."""
    g = torch.Generator().manual_seed(seed)
    save_file({"tok_embeddings.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
               "norm.weight": torch.randn(16, generator=g),
               "layers.0.attention.wq.weight": torch.randn(16, 16, generator=g).half(),
               "output.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16)}, path)
    return path.read_bytes()


def cut(data: bytes, n: int, directory, base=BASE) -> list:
    """Cut data into n byte pieces named base.0, base.1, ..."""
    return cut_bytes(data, n, directory, lambda i: f"{base}.{i}")


def crafted(entries: dict, data_len: int, meta=None) -> bytes:
    """A safetensors file whose header says exactly `entries` {name: (dtype, shape, [b, e])}."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


def listing(d):
    return {p.name: p.stat().st_size for p in d.iterdir()}


def refused(args, capsys, directory, *needles) -> str:
    before = listing(directory)
    code, out, err = cli("concat", *args, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out, err)
    for n in needles:
        assert n in err, err
    assert listing(directory) == before  # nothing written, nothing left behind
    return err


# ----------------------------------------------------------------------------- joining
def test_pieces_joined_in_numeric_order_then_split_ready(tmp_path, capsys):
    data = make_safetensors(tmp_path / "orig.safetensors")
    d = tmp_path / "m22"
    pieces = cut(data, 12, d)  # .10 and .11 sort after .9 by number, not by name
    (d / "params.json").write_text("{}")
    (d / "tokenizer.model.v3").write_bytes(b"x")
    given = pieces[:]
    random.Random(3).shuffle(given)
    assert op.find_pieces(given) == pieces
    code, out, err = cli("concat", *given, "--sha256", hashlib.sha256(data).hexdigest(), capsys=capsys)
    assert code == 0, err
    assert (d / BASE).read_bytes() == data
    assert f"sha256  {hashlib.sha256(data).hexdigest()}" in out and "md5" not in out and "4 tensors" in out
    assert "beside it" in out  # params.json and a tokenizer (.v3 counts) sit beside the result
    want = load_file(tmp_path / "orig.safetensors")
    got = load_file(d / BASE)
    assert all(same_bytes(got[k], want[k]) for k in want)
    assert not [p for p in d.iterdir() if p.name.endswith(op.PARTIAL_SUFFIX)]


def test_directory_input_and_output_dir(tmp_path, capsys):
    data = make_safetensors(tmp_path / "orig.safetensors")
    cut(data, 3, tmp_path / "p")
    (tmp_path / "out").mkdir()
    assert cli("concat", tmp_path / "p", "-o", tmp_path / "out", "-q", capsys=capsys)[0] == 0
    assert (tmp_path / "out" / BASE).read_bytes() == data
    r = op.concat([tmp_path / "p"], quiet=True)
    assert r.output == tmp_path / "p" / BASE and (r.tensors, r.records) == (4, 4)
    assert r.checked.startswith("whole safetensors file (4 tensors")


def test_other_safetensors_names_are_pieces_too(tmp_path, capsys):
    data = make_safetensors(tmp_path / "orig.safetensors")
    cut(data, 2, tmp_path / "p", base="model.safetensors")
    assert cli("concat", tmp_path / "p", "-q", capsys=capsys)[0] == 0
    assert (tmp_path / "p" / "model.safetensors").read_bytes() == data


# ----------------------------------------------------------------------------- refusals
def test_missing_piece_named(tmp_path, capsys):
    d = tmp_path / "p"
    pieces = cut(make_safetensors(tmp_path / "o.safetensors"), 4, d)
    pieces[1].unlink()
    refused([d], capsys, d, "missing piece(s): consolidated.safetensors.1")


def test_mixed_with_split_pieces_refused(tmp_path, capsys):
    d = tmp_path / "p"
    cut(make_safetensors(tmp_path / "o.safetensors"), 2, d)
    (d / "consolidated.00.pth-split0").write_bytes(b"x")
    refused([d], capsys, d, "pieces of different files", "consolidated.safetensors.*", "consolidated.00.pth-split*")


@pytest.mark.parametrize("how,why", [
    ("drop-last-byte", "1 bytes missing from the end (truncated)"),
    ("drop-from-middle", "bytes missing from the end"),
    ("extra", "64 bytes after the last tensor"),
    ("header-cut", "header is not valid JSON"),
])
def test_damaged_pieces_caught_without_checksum(tmp_path, capsys, how, why):
    d = tmp_path / "p"
    pieces = cut(make_safetensors(tmp_path / "o.safetensors"), 3, d)
    if how == "drop-last-byte":
        pieces[2].write_bytes(pieces[2].read_bytes()[:-1])
    elif how == "drop-from-middle":
        pieces[1].write_bytes(pieces[1].read_bytes()[:-100])
    elif how == "extra":
        pieces[2].write_bytes(pieces[2].read_bytes() + bytes(64))
    else:
        pieces[0].write_bytes(pieces[0].read_bytes()[:8])  # the header length, then bytes from later on
    err = refused([d], capsys, d, why, "nothing was written")
    assert "the joined file" in err


def test_corrupt_header_caught(tmp_path, capsys):
    d = tmp_path / "p"
    data = bytearray(make_safetensors(tmp_path / "o.safetensors"))
    data[8] = ord("!")  # the JSON header's first byte
    cut(bytes(data), 2, d)
    refused([d], capsys, d, "header is not valid JSON", "nothing was written")


@pytest.mark.parametrize("entries,data_len,why", [
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [16, 24])}, 24, "starts at data byte 16, the previous one "
                                                                   "ends at 8 (a gap)"),
    ({"a": ("F32", [4], [0, 16]), "b": ("F32", [2], [8, 16])}, 16, "(an overlap)"),
    ({"a": ("F32", [2], [8, 16])}, 16, "starts at data byte 8, the previous one ends at 0 (a gap)"),
    ({"a": ("F32", [3], [0, 8])}, 8, "do not fit its shape"),
    ({"a": ("Q4", [2], [0, 8])}, 8, "unsupported or malformed"),
    ({"a": ("F32", [2], [0, 8])}, 12, "4 bytes after the last tensor"),
])
def test_layout_faults_caught(tmp_path, capsys, entries, data_len, why):
    d = tmp_path / "p"
    cut(crafted(entries, data_len), 2, d)
    refused([d], capsys, d, why)


def test_good_crafted_file_any_key_order_passes(tmp_path, capsys):
    """Data regions in another order than the header's keys still tile: accepted, as the
    library accepts it."""
    raw = crafted({"b": ("F32", [2], [8, 16]), "a": ("BF16", [4], [0, 8])}, 16, meta={"format": "pt"})
    cut(raw, 3, tmp_path / "p")
    assert cli("concat", tmp_path / "p", "-q", capsys=capsys)[0] == 0
    assert stheader.check_file(tmp_path / "p" / BASE) == 2
    assert set(load_file(tmp_path / "p" / BASE)) == {"a", "b"}


def test_stheader_parse_of_a_range_inside_a_file(tmp_path):
    """parse() reads through read_at only: a safetensors file at an offset inside another."""
    data = make_safetensors(tmp_path / "o.safetensors")
    blob = b"P" * 512 + data + b"Q" * 100
    entries, start = stheader.parse(lambda off, n: blob[512 + off:512 + off + n], len(data), "blob")
    assert len(entries) == 4
    want = load_file(tmp_path / "o.safetensors")
    for e in entries:
        t = torch.frombuffer(bytearray(blob[512 + start + e.begin:512 + start + e.end]), dtype=e.dtype).view(e.shape)
        assert same_bytes(t, want[e.name])
    with pytest.raises(ConvertError, match="bytes missing from the end"):
        stheader.parse(lambda off, n: blob[512 + off:512 + off + n], len(data) - 2, "blob")


def test_torch_pieces_still_checked_as_torch(tmp_path, capsys):
    """A '-splitN' set is still checked as a torch zip, even when the output is renamed."""
    d = tmp_path / "p"
    d.mkdir()
    data = make_safetensors(tmp_path / "o.safetensors")
    (d / "consolidated.00.pth-split0").write_bytes(data[:100])
    (d / "consolidated.00.pth-split1").write_bytes(data[100:])
    refused([d], capsys, d, "not a loadable torch checkpoint")
    shutil.rmtree(d)
    cut(data, 2, d)
    assert cli("concat", d, "-o", tmp_path / "renamed.bin", "-q", capsys=capsys)[0] == 0  # checked as safetensors
    assert (tmp_path / "renamed.bin").read_bytes() == data
