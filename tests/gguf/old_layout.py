"""Old per-expert Mixtral GGUFs for the tests (docs/formats.md, "Old per-expert GGUFs"), made by
REWRITING a file of today's stacked layout with the gguf package's own reader and writer
(mixtral-convert writes nothing in the old layout): each `blk.L.ffn_{gate,down,up}_exps.weight`
[E, ...] becomes E tensors `blk.L.ffn_{gate,down,up}.E.weight`, each holding that expert's slab
of bytes in the same type; every other tensor and metadata key is carried. Each kind's experts
are written where its stacked tensor stood, in the order `experts` gives (llama.cpp's first MoE
converter could sprinkle them). `mixed` takes some experts from another stacked file of the same
model (another type): {(layer, kind): (that file, [experts])}."""

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def _shape(t) -> list[int]:
    return [int(x) for x in reversed(t.shape.tolist())]


def _copy_metadata(r: GGUFReader, w: GGUFWriter) -> None:
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)


def _bytes(data) -> np.ndarray:
    """A tensor's bytes as stored, uint8 [..., bytes of a row] (what GGUFWriter takes with raw_dtype)."""
    data = np.ascontiguousarray(data)
    return data.view(np.uint8).reshape(data.shape[:-1] + (-1,)) if data.ndim else data.view(np.uint8)


def expert_bytes(t, e: int) -> np.ndarray:
    """Expert e's slab of a stacked tensor, as the file stores it (uint8, [rows, row bytes])."""
    return _bytes(t.data[e])


def to_per_expert(stacked: Path, out: Path, experts=None, mixed=None, replace=None, stack=False) -> Path:
    """The rewrite (`replace`: {tensor name: numpy array written instead, in its own dtype}; `stack`:
    the stacked tensors kept as they are, for a file of today's layout with replaced tensors)."""
    r = GGUFReader(stacked)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(out, arch)
    _copy_metadata(r, w)
    by_name = {t.name: t for t in r.tensors}
    others = {}
    for (L, kind), (path, es) in (mixed or {}).items():
        other = {t.name: t for t in GGUFReader(path).tensors}[f"blk.{L}.ffn_{kind}_exps.weight"]
        others.update({(L, kind, e): other for e in es})
    for t in r.tensors:
        name = t.name
        if name in (replace or {}):
            w.add_tensor(name, replace[name])
            continue
        if stack and name.endswith("_exps.weight"):
            w.add_tensor(name, _bytes(t.data), raw_dtype=t.tensor_type)
            continue
        if not name.endswith("_exps.weight"):
            w.add_tensor(name, _bytes(t.data), raw_dtype=t.tensor_type)
            continue
        L, kind = int(name.split(".")[1]), name.split(".")[2][len("ffn_"):-len("_exps")]
        for e in (experts if experts is not None else range(_shape(t)[0])):
            src = others.get((L, kind, e)) or by_name[name]
            w.add_tensor(f"blk.{L}.ffn_{kind}.{e}.weight", expert_bytes(src, e), raw_dtype=src.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
