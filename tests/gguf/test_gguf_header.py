"""The restack's own GGUF header parser (formats/gguf/header.py): what it reads is what the gguf
package's GGUFReader reads (the judge), the restack no longer needs GGUFReader at all, and a
damaged header (counts, lengths, offsets past the end of the file) is one line naming the file,
with nothing written. The damaged files are made by changing the bytes GGUFReader places each
field at."""

import hashlib

import gguf
import numpy as np
import pytest
from gguf import GGUFReader
from helpers import cli
from old_layout import to_per_expert

from mixtral_convert.errors import ConvertError
from mixtral_convert.formats.gguf import header as gguf_header
from mixtral_convert.formats.gguf import source as gguf_source


@pytest.fixture(scope="module")
def old(ggufs, tmp_path_factory):
    """(the q8_0 stacked original, its per-expert rewrite)."""
    d = tmp_path_factory.mktemp("hdr")
    return ggufs["q8_0"], to_per_expert(ggufs["q8_0"], d / "old.gguf", experts=[2, 0, 1, 3, 7, 4, 6, 5])


def part_at(field, i: int) -> int:
    """The file offset of part i of a GGUFReader field (its parts lie one after another)."""
    return field.offset + sum(int(p.nbytes) for p in field.parts[:i])


def same(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("which", ["old", "q8_0", "bfloat16", "float32"])
def test_the_header_is_what_ggufs_reader_reads(which, old, ggufs):
    path = old[1] if which == "old" else ggufs[which]
    h, r = gguf_header.parse(path), GGUFReader(path)
    want = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(h.fields) == list(want)
    for k, f in want.items():
        raw = bytes(r.data[f.offset:f.offset + sum(int(p.nbytes) for p in f.parts)])
        assert h.fields[k].raw == raw, k  # carried byte for byte
        assert same(h.fields[k].contents(), f.contents()), k
    assert b"".join(h.kvs) == b"".join(h.fields[k].raw for k in want if not k.startswith("split."))
    assert h.alignment == r.alignment and h.data_start == r.data_offset
    assert [(t.name, t.tensor_type, t.shape, t.data_offset, t.n_bytes) for t in h.tensors] == \
        [(t.name, t.tensor_type, tuple(int(x) for x in reversed(t.shape.tolist())), int(t.data_offset),
          int(t.n_bytes)) for t in r.tensors]
    assert len(h.tensors) > 20 and "tokenizer.ggml.tokens" in h.fields


def test_the_restack_needs_no_ggufs_reader(old, tmp_path, monkeypatch, capsys):
    """GGUFReader parses a 32000-token header in seconds: the restack (merge --to gguf) and its verify
    --source read the headers themselves."""
    def refused(*a, **k):
        raise RuntimeError("GGUFReader called")
    monkeypatch.setattr(gguf_source, "GGUFReader", refused)
    monkeypatch.setattr(gguf, "GGUFReader", refused)
    stacked, per_expert = old
    out = tmp_path / "new.gguf"
    code, _, err = cli("merge", per_expert, "--to", "gguf", "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(stacked.read_bytes()).digest()
    code, text, err = cli("verify", out, "--source", per_expert, capsys=capsys)
    assert code == 0 and "byte for byte" in text, text + err


def _damage(path, how: str) -> tuple[bytes, str]:
    """The file's bytes damaged as `how` says, and a phrase the refusal must hold."""
    r = GGUFReader(path)
    data = bytearray(path.read_bytes())

    def put(at: int, fmt: str, value) -> None:
        data[at:at + np.dtype(fmt).itemsize] = np.array([value], dtype=fmt).tobytes()

    tokens = r.fields["tokenizer.ggml.tokens"]
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.3.weight")
    if how == "tensor offset past the end":
        put(part_at(t.field, 5), "<u8", len(data))
        return bytes(data), "tensor 'blk.1.ffn_down.3.weight'"
    if how == "string length past the end":
        put(part_at(r.fields["general.architecture"], 3), "<u8", 1 << 40)
        return bytes(data), "metadata 'general.architecture'"
    if how == "a token's length past the end":
        put(part_at(tokens, len(tokens.parts) - 2), "<u8", len(data))
        return bytes(data), "metadata 'tokenizer.ggml.tokens' item"
    if how == "array count past the end":
        put(part_at(tokens, 4), "<u8", 1 << 60)
        return bytes(data), "claims 1152921504606846976 items"
    if how == "tensor count past the end":
        put(8, "<u8", 1 << 50)
        return bytes(data), "tensors"
    if how == "unknown tensor type":
        put(part_at(t.field, 4), "<u4", 9999)
        return bytes(data), "unknown ggml type 9999"
    if how == "cut inside the header":
        return bytes(data[:part_at(t.field, 2)]), "past the end of the file"
    if how == "cut inside the data":
        return bytes(data[:int(t.data_offset) + 10]), "tensor 'blk.1.ffn_down.3.weight'"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["tensor offset past the end", "string length past the end",
                                 "a token's length past the end", "array count past the end",
                                 "tensor count past the end", "unknown tensor type", "cut inside the header",
                                 "cut inside the data"])
def test_a_damaged_header_is_one_line_naming_the_file(how, old, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    data, phrase = _damage(old[1], how)
    bad.write_bytes(data)
    with pytest.raises(ConvertError) as e:
        gguf_header.parse(bad)
    assert str(e.value).startswith(f"{bad}: ") and phrase in str(e.value), str(e.value)
    out = tmp_path / "new.gguf"
    code, text, err = cli("merge", bad, "--to", "gguf", "-o", out, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and phrase in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
