"""A GGUF file read back (docs/formats.md, "GGUF"): as a source checkpoint, and for inspect,
verify and the forward.

The file (and the gguf-split pieces beside it, found from the first piece's split.count) is
opened with the gguf package's memory-mapped `GGUFReader`; an untrusted file is checked first:
the magic, the version, every tensor inside the file, the model's names and shapes as its
metadata implies (any failure is one line naming the file). The tensors become the canonical
lazy tensors through the target's name table (expert e of a stacked `ffn_*_exps` is its index
e). F32, F16 and BF16 tensors are read as they are stored; a lossless GGUF is a source like any
other (split and merge take it), its F32 norms and router given in the weights' dtype when
that holds them exactly (else every tensor in float32, which holds both). Quantized tensors
are only read dequantized to float32: for the forward (`open_gguf(..., dequantize=True)`), and as
a source marked lossy (`open_source`, the reader's), which only --dequantize writes from
(formats.gguf.dequant). An old per-expert file's experts are read by their own names
(formats.gguf.per_expert).
"""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, quants

from ...encodings.gguf import TORCH_TYPES
from ...errors import ConvertError
from ...io.lazy import Lazy
from ...io.reads import SourceFile
from ...model import rope, tensors
from ...model.config import ModelConfig
from ..checkpoint import Checkpoint, TokenizerRef, check_tensors
from .per_expert import canonical_hit
from .write import ARCH, FILE_TYPE_NAMES, SPLIT_RE, unstack

T = GGMLQuantizationType


class GgufTensor(Lazy):
    """Rows of a tensor of a GGUF file (one expert's slice of a stacked one), read by positioned
    reads (`io.reads`: a truncated or failing file is one line, not a SIGBUS) and copied out as
    stored, or dequantized to float32 a block of rows at a time. `offset` is its first byte in
    `file`; `raw` the numpy dtype and trailing shape of one row as the file stores it (bytes of
    quantized blocks for a quantized type)."""

    def __init__(self, file: SourceFile, offset: int, raw: tuple[np.dtype, tuple[int, ...]], ggml_type,
                 shape: tuple[int, ...], name: str, dequantize: bool):
        self.file, self.offset, self.raw = file, offset, raw
        self.ggml_type, self.shape, self.name = ggml_type, tuple(shape), name
        self.stored = ggml_type in TORCH_TYPES
        self.dtype = TORCH_TYPES[ggml_type] if self.stored else torch.float32
        if not self.stored and not dequantize:
            raise ConvertError(f"tensor '{name}' is {ggml_type.name}: a quantized GGUF is not a source to convert "
                               "from (its values are rounded); convert from the original checkpoint")

    def files(self):
        yield self.file

    def read(self, r0, r1, c0=None, c1=None):
        if not self.shape:
            r0, r1 = 0, 1
        np_dtype, row = self.raw
        block = np.empty((r1 - r0,) + row, dtype=np_dtype)
        self.file.read_into(self.offset + r0 * block[:1].nbytes, block.view(np.uint8).reshape(-1))
        if self.stored:
            t = torch.from_numpy(block.view(np.uint8)).view(self.dtype).reshape((r1 - r0,) + self.shape[1:])
        else:
            t = torch.from_numpy(quants.dequantize(block, self.ggml_type).astype(np.float32))
        return t if c0 is None else t[:, c0:c1]


def pieces_of(path: Path) -> list[Path]:
    """The file, or every gguf-split piece of the model whose first piece it is."""
    m = SPLIT_RE.search(path.name)
    if m is None:
        return [path]
    k = int(m.group(2))
    stem = path.name[:m.start()]
    return [path.with_name(f"{stem}-{i:05d}-of-{k:05d}.gguf") for i in range(1, k + 1)]


def read(path: Path) -> GGUFReader:
    """GGUFReader over a file, checked; ConvertError naming the file for anything damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = f.seek(0, 2)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) < 8 or int.from_bytes(head[:4], "little") != GGUF_MAGIC:
        raise ConvertError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        r = GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on damage
        raise ConvertError(f"{path}: a damaged GGUF file ({type(e).__name__}: {str(e)[:100]}); re-create or "
                           "re-download it") from None
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ConvertError(f"{path}: tensor '{t.name}' ends beyond the file's {size} bytes; truncated")
    return r


def field(r: GGUFReader, key: str, path, default=None):
    f = r.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise ConvertError(f"{path}: no '{key}' in the metadata; not a Mixtral GGUF written for llama.cpp")
    try:
        return f.contents()
    except Exception:  # a field whose parts the reader could not decode
        raise ConvertError(f"{path}: metadata '{key}' is malformed; the file is damaged") from None


def config_of(r: GGUFReader, path) -> ModelConfig:
    arch = field(r, "general.architecture", path)
    if arch != ARCH:
        raise ConvertError(f"{path}: architecture '{arch}', not a Mixtral ('{ARCH}' with experts)")
    k = lambda name, d=None: field(r, f"{ARCH}.{name}", path, d)  # noqa: E731
    dim, heads = k("embedding_length"), k("attention.head_count")
    params = {"dim": dim, "n_layers": k("block_count"), "hidden_dim": k("feed_forward_length"), "n_heads": heads,
              "n_kv_heads": k("attention.head_count_kv"), "head_dim": k("attention.key_length", dim // heads),
              "vocab_size": k("vocab_size", len(field(r, "tokenizer.ggml.tokens", path))),
              "norm_eps": _f32(k("attention.layer_norm_rms_epsilon")), "rope_theta": _f32(k("rope.freq_base")),
              "max_position_embeddings": k("context_length"),
              "moe": {"num_experts": k("expert_count"), "num_experts_per_tok": k("expert_used_count")}}
    cfg = ModelConfig.from_params(params, str(path))
    return replace(cfg, rope_scaling=scaling_of(r, path, cfg.head_dim))


def scaling_of(r: GGUFReader, path, head_dim: int):
    """The RoPE scaling the metadata states (model.rope); partial rotary or a sliding window is refused."""
    get = lambda name: field(r, f"{ARCH}.{name}", path) if f"{ARCH}.{name}" in r.fields else None  # noqa: E731
    dims = get("rope.dimension_count")
    if dims is not None and dims != head_dim:
        raise ConvertError(f"{path}: llama.rope.dimension_count {dims} is not the head size {head_dim}; partial "
                           "rotary is not supported")
    if get("attention.sliding_window") is not None:
        raise ConvertError(f"{path}: llama.attention.sliding_window is set; a sliding window is not supported")
    attn = get("rope.scaling.attn_factor")
    if attn is not None and _f32(attn) != 1.0:
        raise ConvertError(f"{path}: llama.rope.scaling.attn_factor {_f32(attn)} is not supported (only 1)")
    factor, old = get("rope.scaling.factor"), get("rope.scale_linear")
    return rope.from_gguf(get("rope.scaling.type"), None if factor is None else _f32(factor),
                          None if old is None else _f32(old), str(path))


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (the shortest that rounds to it):
    1e-05, not 9.99999974e-06."""
    return float(str(np.float32(x)))


def tensors_of(paths: list[Path], dequantize: bool = False):
    """(config, canonical name -> lazy, GGUF tensors by name, readers) of a GGUF file and its pieces."""
    readers = [read(p) for p in paths]
    cfg = config_of(readers[0], paths[0])
    canonical: dict[str, Lazy] = {}
    stored = {}
    for p, r in zip(paths, readers, strict=True):
        src = SourceFile(p)  # tensor data is read from here, not from the reader's mapping
        for t in r.tensors:
            hit = tensors.gguf_match(t.name) or canonical_hit(t.name)  # (an old per-expert file's experts)
            if hit is None:
                raise ConvertError(f"{p}: tensor '{t.name}' is not a Mixtral GGUF tensor name")
            row, m = hit
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            stored[t.name] = (t, shape)
            if "e" in m:  # one expert's own tensor (the old per-expert layout)
                names = [(row.pattern.format(L=m["L"], e=m["e"]), int(t.data_offset))]
                stacked = False
            else:
                stacked = row.per_expert
                step = t.data[0].nbytes if stacked else 0  # one expert's bytes
                names = unstack(row, m.get("L"), int(t.data_offset), shape[0], step)
            each = shape[1:] if stacked else shape
            raw = t.data.shape[2:] if stacked else t.data.shape[1:] if t.data.ndim else ()
            for name, offset in names:
                canonical[name] = GgufTensor(src, offset, (t.data.dtype, raw), t.tensor_type, each, name, dequantize)
    return cfg, canonical, stored, readers


def open_gguf(path: Path, dequantize: bool = False) -> Checkpoint:
    """A GGUF file (the first piece of a split one) as a Checkpoint, in one dtype."""
    path = Path(path)
    paths = pieces_of(path)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConvertError(f"{missing[0]}: a piece of {path.name}'s model is missing ({len(missing)} of {len(paths)})")
    cfg, canonical, _, _ = tensors_of(paths, dequantize)
    found = {k: (v.shape, v.dtype) for k, v in canonical.items()}
    weights = {v.dtype for k, v in canonical.items() if len(v.shape) == 2 and not tensors.match(k)[0].keep_f32}
    check_tensors(cfg, {k: (s, next(iter(weights))) for k, (s, _) in found.items()}, str(path))
    if len(weights) != 1:
        raise ConvertError(f"{path}: its weight matrices are in several types; convert from the original checkpoint")
    dtype = weights.pop()
    try:
        narrowed = {k: _narrowed(v, dtype, path) for k, v in canonical.items() if v.dtype != dtype}
    except ValueError:  # F32 norms or router the weights' dtype cannot hold: everything read in float32
        dtype, narrowed = torch.float32, {k: _Narrowed(v, torch.float32) for k, v in canonical.items()
                                          if v.dtype != torch.float32}
    canonical.update(narrowed)
    canonical = {k: canonical[k] for k in cfg.canonical_shapes()}
    return Checkpoint(path.parent, "gguf", cfg, paths, _no_tokenizer(path), canonical, label="GGUF")


class _Narrowed(Lazy):
    def __init__(self, base: Lazy, dtype: torch.dtype):
        self.base, self.dtype, self.shape, self.name = base, dtype, base.shape, base.name

    def files(self):
        return self.base.files()

    def read(self, r0, r1, c0=None, c1=None):
        return self.base.read(r0, r1, c0, c1).to(self.dtype)


def _narrowed(v: GgufTensor, dtype: torch.dtype, path) -> Lazy:
    """An F32 norm or router in the weights' dtype, when that dtype holds its values exactly
    (what the GGUF writer stores for a source of that dtype: its values widened); else ValueError."""
    full = v.read(0, v.shape[0]) if v.shape else v.read(0, 1)
    if not torch.equal(full.to(dtype).to(full.dtype), full):
        raise ValueError(v.name)
    return _Narrowed(v, dtype)


def describe(path: Path) -> dict:
    """What inspect says of a GGUF file: architecture, config, type, tensors' types and shapes,
    the tokenizer, the pieces (metadata and tensor infos only; no tensor data is read)."""
    path = Path(path)
    paths = [p for p in pieces_of(path) if p.is_file()]
    readers = [read(p) for p in paths]
    r = readers[0]
    cfg = config_of(r, path)
    ft = int(field(r, "general.file_type", path))
    tensors = [t for rd in readers for t in rd.tensors]
    tokens = field(r, "tokenizer.ggml.tokens", path, [])
    tok = {"model": field(r, "tokenizer.ggml.model", path, "none"), "tokens": len(tokens)}
    for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{k}" in r.fields:
            tok[k] = field(r, f"tokenizer.ggml.{k}", path)
    tok["chat_template"] = "tokenizer.chat_template" in r.fields
    return {"path": str(path), "what": f"GGUF for llama.cpp ({ARCH} with {cfg.num_experts} experts), "
            f"{FILE_TYPE_NAMES.get(ft, f'file type {ft}')}", "architecture": ARCH,
            "name": field(r, "general.name", path, ""), "file_type": FILE_TYPE_NAMES.get(ft, ft),
            "context_length": cfg.max_position_embeddings, "config": cfg.to_params(),
            "pieces": len(pieces_of(path)), "pieces_present": len(paths), "tensors": len(tensors),
            "types": dict(collections.Counter(t.tensor_type.name for t in tensors)),
            "shapes": {t.name: [int(x) for x in reversed(t.shape.tolist())] for t in tensors},
            "tokenizer": tok, "file_bytes": sum(p.stat().st_size for p in paths)}


def quantized_types(path: Path) -> dict[str, int]:
    """Tensor type name -> count, for the quantized tensors of a GGUF (and its pieces); {} when lossless."""
    counts = collections.Counter(t.tensor_type.name for p in pieces_of(Path(path)) if p.is_file()
                                 for t in read(p).tensors if t.tensor_type not in TORCH_TYPES)
    return dict(counts)


def check_dequantizable(path, name: str, ttype: T) -> None:
    """ConvertError naming the tensor when the gguf package cannot dequantize its type."""
    size = GGML_QUANT_SIZES[ttype][1]
    try:
        quants.dequantize(np.zeros((1, size), dtype=np.uint8), ttype)
    except NotImplementedError:
        raise ConvertError(f"{path}: tensor '{name}' is {ttype.name}, which the gguf package cannot dequantize; "
                           "it cannot be converted here") from None


def open_source(path: Path) -> Checkpoint:
    """A GGUF file as a source (the reader's open): lossless as `open_gguf` reads it; a quantized one
    with every tensor read dequantized to float32 and marked lossy (`Checkpoint.lossy`: its file type
    and each tensor type's count), which only --dequantize writes from (formats.gguf.dequant)."""
    path = Path(path)
    paths = pieces_of(path)
    if any(not p.is_file() for p in paths) or not quantized_types(path):
        return open_gguf(path)  # (which names a missing piece)
    cfg, canonical, stored, readers = tensors_of(paths, dequantize=True)
    for name, (t, _) in stored.items():
        if t.tensor_type not in TORCH_TYPES:
            check_dequantizable(path, name, t.tensor_type)
    canonical = {k: v if v.dtype == torch.float32 else _Narrowed(v, torch.float32) for k, v in canonical.items()}
    check_tensors(cfg, {k: (v.shape, v.dtype) for k, v in canonical.items()}, str(path))
    canonical = {k: canonical[k] for k in cfg.canonical_shapes()}
    ft = int(field(readers[0], "general.file_type", path, -1))
    lossy = {"dequantized": "gguf.quants.dequantize, to float32", "file_type": FILE_TYPE_NAMES.get(ft, ft),
             "tensor_types": dict(collections.Counter(t.tensor_type.name for t, _ in stored.values()))}
    return Checkpoint(path.parent, "gguf", cfg, paths, _no_tokenizer(path), canonical,
                      label="GGUF, quantized (read dequantized)", lossy=lossy)


def _no_tokenizer(path: Path) -> TokenizerRef:
    return TokenizerRef(missing=f"{path}: a GGUF holds its vocabulary but no tokenizer.model; pass --tokenizer "
                                "PATH (the model's tokenizer.model)")
