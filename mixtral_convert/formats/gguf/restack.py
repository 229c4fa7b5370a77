"""Mixtral GGUFs in llama.cpp's first MoE layout (docs/formats.md, "Old per-expert GGUFs"), and
their restacking into today's layout without requantizing.

The old files hold one 2-D tensor per expert (`blk.L.ffn_gate.E.weight`, `ffn_down.E`,
`ffn_up.E`); today's llama.cpp wants the E experts stacked along a new outermost axis
(`blk.L.ffn_gate_exps.weight`, numpy shape [E, H, D]). In every GGML type a row is whole blocks,
so each expert's bytes are one contiguous slab of the stacked tensor: restacking copies bytes,
in expert order, with no arithmetic. Every other tensor, and every metadata key (its raw bytes,
`general.file_type` among them), is copied as it is; the stacked tensor takes the place of the
layer's first expert of that kind. The headers are read by formats.gguf.header (checked, and much
faster than gguf's GGUFReader on a large vocabulary); the data is copied a bounded chunk at a
time, each read once by direct I/O where the file allows it (docs/performance.md, "Restacking an
old per-expert GGUF").

A layer whose experts of one kind are in different types (old quantizers could mix them) cannot
be one tensor without converting some of them: refused, naming the layer and the types, unless
`mixed_to` names the type those experts are converted to (through gguf's own dequantize and
this tool's writer for that type), which the summary and the manifest then record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, Keys, quants
from gguf import GGUFValueType as V

from ...encodings.gguf import Value, quantize_rows, string_bytes, value_bytes
from ...errors import ConvertError
from ...io.reads import SourceFile
from . import header as gguf_header
from . import per_expert
from . import source as gguf_source
from .header import Header
from .per_expert import LAYOUT
from .write import FILE_TYPE_NAMES, size_groups

T = GGMLQuantizationType
MIXED_TYPES = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16, "q8_0": T.Q8_0}
COPY_BYTES = 16 << 20  # bytes read and written at a time
CONVERT_BYTES = 4 << 20  # source bytes of a mixed expert dequantized at a time


_last: list = []  # [(key, header)]: the last file's header (merge asks whether it is per-expert, then plans it)


def read(path: Path) -> Header:
    """The header of `path` (formats.gguf.header), kept for the next call on the same unchanged file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if not (_last and _last[0][0] == key):
        _last[:] = [(key, gguf_header.parse(path))]
    return _last[0][1]


def is_per_expert(path) -> bool:
    """Whether `path` is a GGUF file (or a first piece) holding per-expert tensors (reads its header)."""
    path = Path(path)
    if not (path.name.endswith(".gguf") and path.is_file()):
        return False
    return any(per_expert.match(t.name) for t in read(path).tensors)


def fix_command(path) -> str:
    return f"mixtral-convert merge {path} --to gguf"


@dataclass
class Slab:
    """Bytes of a source tensor (one expert's, or a whole tensor's): where they are, how many, and
    for an expert converted to another type, its source type and row shape."""

    file: SourceFile
    offset: int
    nbytes: int
    src_type: Optional[T] = None  # set: dequantized and written in the tensor's type
    rows: tuple[int, ...] = ()  # numpy shape of the expert (for a conversion)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: T
    slabs: list[Slab]

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        n = 1
        for s in self.shape[:-1]:
            n *= s
        return n * (self.shape[-1] // block) * size


@dataclass
class Restack:
    """The restacked model: its metadata (raw key/value bytes, in the source's order), alignment,
    tensors in file order, the file type's name, and the experts converted (mixed types)."""

    paths: list[Path]
    kvs: list[bytes]
    alignment: int
    tensors: list[OutTensor]
    file_type: str
    experts: int
    converted: dict[str, dict] = field(default_factory=dict)

    @property
    def sources(self) -> tuple[SourceFile, ...]:
        """The source files its bytes are read from, each with its identity at opening (io.reads)."""
        return tuple(dict.fromkeys(s.file for t in self.tensors for s in t.slabs))


def plan(path: Path, mixed_to: Optional[str] = None) -> Restack:
    """What restacking `path` (a per-expert GGUF, or the first of its pieces) writes; refusals here,
    before anything is written."""
    path = Path(path)
    paths = gguf_source.pieces_of(path)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConvertError(f"{missing[0]}: a piece of {path.name}'s model is missing ({len(missing)} of {len(paths)})")
    headers = [read(p) if i == 0 else gguf_header.parse(p) for i, p in enumerate(paths)]
    r0 = headers[0]
    cfg = gguf_source.config_of(r0, path)
    ft = int(gguf_source.field(r0, "general.file_type", path, -1))
    E = cfg.num_experts
    groups: dict[tuple[int, str], dict[int, tuple]] = {}
    order: list = []  # tensors, and (L, table row) groups of per-expert tensors, in the source's order
    for p, r in zip(paths, headers, strict=True):
        for t in r.tensors:
            slab = Slab(r.file, t.data_offset, t.n_bytes)
            hit = per_expert.match(t.name)
            if hit is None:
                order.append(OutTensor(t.name, t.shape, t.tensor_type, [slab]))
                continue
            row, L, e = hit
            key = (L, row)
            if key not in groups:
                groups[key] = {}
                order.append(key)
            if e in groups[key] or e >= E:
                raise ConvertError(f"{p}: tensor '{t.name}': expert {e} {'again' if e < E else f'of {E}'}; "
                                   "the file is damaged or not a Mixtral GGUF")
            groups[key][e] = (t, slab)
    names = {t.name for t in order if isinstance(t, OutTensor)}
    out, converted = [], {}
    for item in order:
        if isinstance(item, OutTensor):
            out.append(item)
            continue
        L, row = item
        stacked = row.gguf.format(L=L)
        kind = row.gguf_per_expert.split(".")[2]  # "ffn_gate": the per-expert names' kind, for messages
        if stacked in names:
            raise ConvertError(f"{path}: layer {L} holds both '{stacked}' and per-expert {kind} tensors; "
                               "the file is damaged")
        experts = groups[item]
        if len(experts) != E:
            lack = next(e for e in range(E) if e not in experts)
            raise ConvertError(f"{path}: '{row.gguf_per_expert.format(L=L, e=lack)}' is missing ({len(experts)} of {E} "
                               "experts); the file is damaged")
        tensors = [experts[e][0] for e in range(E)]
        shapes = {t.shape for t in tensors}
        if len(shapes) != 1:
            raise ConvertError(f"{path}: layer {L}'s {kind} experts have different shapes "
                               f"({', '.join(str(list(s)) for s in sorted(shapes))}); the file is damaged")
        shape = shapes.pop()
        types = {}
        for e, t in enumerate(tensors):
            types.setdefault(t.tensor_type, []).append(e)
        ttype = tensors[0].tensor_type
        slabs = [experts[e][1] for e in range(E)]
        if len(types) > 1:
            ttype, slabs = _mixed(path, stacked, L, kind, types, tensors, slabs, shape, mixed_to, converted)
        out.append(OutTensor(stacked, (E,) + shape, ttype, slabs))
    return Restack(paths, r0.kvs, r0.alignment, out, FILE_TYPE_NAMES.get(ft, f"file type {ft}"), E,
                   converted)


def _types_text(types: dict) -> str:
    return "; ".join(f"{t.name}: expert{'s' * (len(es) > 1)} {', '.join(map(str, es))}" for t, es in types.items())


def _mixed(path, stacked, L, kind, types, tensors, slabs, shape, mixed_to, converted):
    """A layer's experts of one kind in several types: refused, or (mixed_to) those not in that type
    converted to it."""
    if mixed_to is None:
        raise ConvertError(f"{path}: layer {L}'s {kind} experts are in several types ({_types_text(types)}); "
                           f"today's '{stacked}' holds one type and restacking converts nothing on its own: pass "
                           f"--convert-mixed-experts {'|'.join(MIXED_TYPES)} to convert those experts to one type")
    if mixed_to not in MIXED_TYPES:
        raise ConvertError(f"--convert-mixed-experts {mixed_to}: use one of {', '.join(MIXED_TYPES)}")
    ttype = MIXED_TYPES[mixed_to]
    block = GGML_QUANT_SIZES[ttype][0]
    if shape[-1] % block:
        raise ConvertError(f"{path}: '{stacked}' rows of {shape[-1]} values are not whole blocks of {block}, which "
                           f"{ttype.name} needs: choose another --convert-mixed-experts type")
    out, moved = [], {}
    for e, (t, s) in enumerate(zip(tensors, slabs, strict=True)):
        if t.tensor_type == ttype:
            out.append(s)
            continue
        gguf_source.check_dequantizable(path, t.name, t.tensor_type)
        out.append(Slab(s.file, s.offset, s.nbytes, t.tensor_type, shape))
        moved.setdefault(t.tensor_type.name, []).append(e)
    converted[stacked] = {"layer": L, "source_types": {t.name: es for t, es in types.items()}, "to": ttype.name,
                          "converted_experts": moved}
    return ttype, out


# ----------------------------------------------------------------------------- writing
def pad(n: int, alignment: int) -> int:
    return (-n) % alignment


def header(kvs: list[bytes], tensors: list[OutTensor], alignment: int) -> bytes:
    """Everything before the data: the key/values as given (raw), the tensor infos, padding."""
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs))] + kvs
    pos = 0
    for t in tensors:
        dims = tuple(reversed(t.shape))
        parts.append(string_bytes(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(t.ggml_type), pos))
        pos += t.nbytes + pad(t.nbytes, alignment)
    raw = b"".join(parts)
    return raw + b"\0" * pad(len(raw), alignment)


def _kv(key: str, v: Value) -> bytes:
    return string_bytes(key) + struct.pack("<I", int(v.vtype)) + value_bytes(v)


def files(rs: Restack, out_name: str, max_shard_size: Optional[int]) -> list[tuple[str, bytes, list[OutTensor]]]:
    """(file name, header, tensors) of every output file: one, or gguf-split's pieces."""
    groups = [rs.tensors] if not max_shard_size else size_groups(rs.tensors, max_shard_size, lambda t: t.nbytes)
    if len(groups) == 1:
        return [(out_name, header(rs.kvs, rs.tensors, rs.alignment), rs.tensors)]
    stem, k = out_name[:-len(".gguf")] if out_name.endswith(".gguf") else out_name, len(groups)
    align = [] if rs.alignment == GGUF_DEFAULT_ALIGNMENT else \
        [_kv(Keys.General.ALIGNMENT, Value(V.UINT32, rs.alignment))]
    out = []
    for i, g in enumerate(groups):
        split = [_kv(Keys.Split.LLM_KV_SPLIT_NO, Value(V.UINT16, i)), _kv(Keys.Split.LLM_KV_SPLIT_COUNT,
                 Value(V.UINT16, k)), _kv(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, Value(V.INT32, len(rs.tensors)))]
        kvs = rs.kvs + split if i == 0 else split + align
        out.append((f"{stem}-{i + 1:05d}-of-{k:05d}.gguf", header(kvs, g, rs.alignment), g))
    return out


def chunks(t: OutTensor):
    """The bytes of `t` in the output, a bounded chunk at a time: each slab copied, or (a converted
    expert) dequantized by gguf and written in the tensor's type, a block of rows at a time."""
    for s in t.slabs:
        if s.src_type is None:
            for pos in range(0, s.nbytes, COPY_BYTES):
                yield read_once(s.file, s.offset + pos, min(COPY_BYTES, s.nbytes - pos))
            continue
        rows = s.rows[0]
        row_bytes = s.nbytes // rows
        step = max(1, CONVERT_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            buf = np.empty((n, row_bytes), dtype=np.uint8)
            s.file.read_into(s.offset + r0 * row_bytes, buf.reshape(-1))
            values = torch.from_numpy(quants.dequantize(buf, s.src_type).astype(np.float32, copy=False))
            yield quantize_rows(values, t.ggml_type)


def read_once(f: SourceFile, offset: int, n: int) -> np.ndarray:
    """`n` bytes at `offset` of `f`, read once: by direct I/O into a reused buffer (io.reads), past
    the page cache, where the file allows it; else a plain positioned read."""
    got = f.read_direct(offset, n)
    if got is not None:
        return got.numpy()
    buf = np.empty(n, dtype=np.uint8)
    f.read_into(offset, buf)
    return buf


def describe(info: dict) -> dict:
    """inspect's description of a GGUF (gguf_source.describe), with an old per-expert layout named:
    what it is, the types of its experts, and the command that restacks it."""
    old = [n for n in info.get("shapes", {}) if per_expert.match(n)]
    if not old:
        return info
    info = dict(info)
    info["what"] = f"{info['what']}, in {LAYOUT}"
    info["layout"] = f"per-expert: {len(old)} tensors 'blk.L.ffn_{{gate,down,up}}.E.weight' instead of today's " \
                     "stacked 'blk.L.ffn_{gate,down,up}_exps.weight'"
    info["fix"] = f"{fix_command(info['path'])}  (restacks it for today's llama.cpp, the quantized bytes copied)"
    return info
