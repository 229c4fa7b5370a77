"""GGUF for llama.cpp (and Ollama, LM Studio): `merge --to gguf` (docs/formats.md, "GGUF").

Mixtral is llama.cpp's architecture `llama` with experts. The canonical tensors keep their row
order (q and k in Meta's order, which is llama.cpp's), renamed through `NAME_TABLE`; each
layer's experts are stacked into one 3-D tensor per weight (`ffn_gate_exps` = every expert's
w1 [E, H, D], `ffn_up_exps` w3, `ffn_down_exps` w2 [E, D, H]), streamed expert after expert,
a block of rows at a time, so no layer is ever whole in memory. Types (`--dtype`): float32,
float16, bfloat16 and q8_0 are written here (q8_0 byte for byte as the gguf package's quantizer,
over the cores: encodings.q8_0); 1-D tensors and the router stay F32, as llama.cpp's converter
keeps them. The k-quants are made from a temporary F16/BF16 GGUF by llama.cpp's own quantizer
(formats.gguf.kquant); the merge target, which picks one or the other, is formats.gguf.target.

Metadata: every hyper-parameter, the context length under the HF export's rule (the source's
or --max-position-embeddings, never guessed), general.file_type, general.name (the source's
name or --name), and the SentencePiece vocabulary (pieces, scores, types, BOS/EOS/UNK, BOS
added, EOS not) with the chat template a tokenizer_config.json beside it holds, or --chat-template's.
Refused before anything is written: no tokenizer.model (an HF tokenizer.json alone holds BPE
merges, not the scores and piece types llama.cpp's SentencePiece tokenizer ranks merges by),
a vocabulary llama.cpp would tokenize differently or abort on (no 256 byte pieces), rows that
are not whole quantization blocks.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, Keys, LlamaFileType
from gguf import GGUFValueType as V

from ...encodings.gguf import TensorInfo, Value, quantize_rows, write_gguf
from ...errors import ConvertError
from ...io.lazy import Cast, Lazy
from ...io.prefetch import prefetched
from ...model import tensors
from ...model.config import ModelConfig
from ...tokenizer import files as tokfiles
from ...tokenizer import hf as sptok
from ..checkpoint import Checkpoint

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]  # "llama"
T = GGMLQuantizationType
# --dtype -> (tensor type of the weight matrices, general.file_type)
TYPES = {"float32": (T.F32, LlamaFileType.ALL_F32), "float16": (T.F16, LlamaFileType.MOSTLY_F16),
         "bfloat16": (T.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
KQUANTS = {"q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
           "q6_k": LlamaFileType.MOSTLY_Q6_K}
DTYPES = tuple(TYPES) + tuple(KQUANTS)
FILE_TYPE_NAMES = {int(ft): n for n, (_, ft) in TYPES.items()} | {int(ft): n for n, ft in KQUANTS.items()}
SOURCE_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
QUANT_BLOCK_BYTES = 4 << 20  # source bytes per block quantized at once (its float32 copy is twice it)

# (canonical pattern, GGUF pattern) in the file's order, from the tensor table's `gguf` column: `{L}` the layer;
# `{e}` the expert, stacked on the GGUF side (expert e is index e of the 3-D tensor).
NAME_TABLE: tuple[tuple[str, str], ...] = tuple((r.pattern, r.gguf) for r in tensors.gguf_rows())
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf\Z")


@dataclass
class GTensor:
    """One GGUF tensor and the canonical tensors it is made of (E of them when stacked)."""

    info: TensorInfo
    sources: list[Lazy]
    where: str = "source"  # the source's path, for messages


def gguf_tensors(cfg: ModelConfig, canonical: dict[str, Lazy], dtype: str, where: str = "source") -> list[GTensor]:
    """The file's tensors in order (the embedding, each layer's, output_norm and output), typed
    for `dtype` (a key of TYPES)."""
    wtype = TYPES[dtype][0]
    order = tensors.gguf_rows()
    first = next(i for i, r in enumerate(order) if r.per_layer)
    rows = [(None, r) for r in order[:first]] + [(L, r) for L in range(cfg.n_layers) for r in order if r.per_layer] + \
        [(None, r) for r in order[first:] if not r.per_layer]
    out: list[GTensor] = []
    for L, row in rows:
        srcs = stack_sources(row, L, canonical, cfg)
        shape = ((len(srcs),) if row.per_expert else ()) + tuple(srcs[0].shape)
        name = row.gguf.format(L=L)
        ttype = T.F32 if len(shape) == 1 or row.keep_f32 else wtype
        if ttype == T.F16:  # the float16 overflow rule, as every --dtype float16
            srcs = [s if s.dtype == torch.float16 else Cast(s, torch.float16, where) for s in srcs]
        out.append(GTensor(TensorInfo(name, shape, ttype), srcs, where))
    return out


def stack_sources(row: tensors.Row, L: Optional[int], canonical: dict[str, Lazy], cfg: ModelConfig) -> list[Lazy]:
    """The canonical tensors a GGUF tensor of `row` is made of, in order: each expert of a per-expert row (the
    GGUF tensor stacks them, expert e at index e: `unstack` is the inverse), else the one tensor."""
    return [canonical[row.pattern.format(L=L, e=e)] for e in range(cfg.num_experts if row.per_expert else 1)]


def unstack(row: tensors.Row, L: Optional[str], offset: int, rows: int, step: int) -> list[tuple[str, int]]:
    """The canonical tensors a stored GGUF tensor of `row` holds, with each one's first byte: expert e of a
    stacked tensor (`rows` experts of `step` bytes each, from `offset`) is index e, the inverse of
    `stack_sources`; any other tensor is itself."""
    if not row.per_expert:
        return [(row.pattern.format(L=L), offset)]
    return [(row.pattern.format(L=L, e=e), offset + e * step) for e in range(rows)]


def check_blocks(gts: list[GTensor]) -> None:
    """ConvertError (naming the tensor) when a tensor's rows are not whole blocks of its type."""
    for t in gts:
        t.info.nbytes  # noqa: B018


# ----------------------------------------------------------------------------- metadata
def _u32(x) -> Value:
    return Value(V.UINT32, int(x))


def model_metadata(cfg: ModelConfig, name: str, file_type: int, context_length: int) -> dict[str, Value]:
    """general.* and llama.* keys."""
    a = ARCH
    return {
        Keys.General.ARCHITECTURE: Value(V.STRING, a),
        Keys.General.NAME: Value(V.STRING, name),
        Keys.General.FILE_TYPE: _u32(file_type),
        Keys.General.QUANTIZATION_VERSION: _u32(2),  # ggml's GGML_QNT_VERSION
        Keys.LLM.VOCAB_SIZE.format(arch=a): _u32(cfg.vocab_size),
        Keys.LLM.CONTEXT_LENGTH.format(arch=a): _u32(context_length),
        Keys.LLM.EMBEDDING_LENGTH.format(arch=a): _u32(cfg.dim),
        Keys.LLM.BLOCK_COUNT.format(arch=a): _u32(cfg.n_layers),
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): _u32(cfg.hidden_dim),
        Keys.Attention.HEAD_COUNT.format(arch=a): _u32(cfg.n_heads),
        Keys.Attention.HEAD_COUNT_KV.format(arch=a): _u32(cfg.n_kv_heads),
        Keys.Attention.KEY_LENGTH.format(arch=a): _u32(cfg.head_dim),
        Keys.Attention.VALUE_LENGTH.format(arch=a): _u32(cfg.head_dim),
        Keys.Rope.DIMENSION_COUNT.format(arch=a): _u32(cfg.head_dim),
        Keys.Rope.FREQ_BASE.format(arch=a): Value(V.FLOAT32, float(cfg.rope_theta)),
        Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a): Value(V.FLOAT32, float(cfg.norm_eps)),
        Keys.LLM.EXPERT_COUNT.format(arch=a): _u32(cfg.num_experts),
        Keys.LLM.EXPERT_USED_COUNT.format(arch=a): _u32(cfg.experts_per_tok),
        **({} if cfg.rope_scaling is None else {  # model.rope; none written when the model has none
            Keys.Rope.SCALING_TYPE.format(arch=a): Value(V.STRING, cfg.rope_scaling.type),
            Keys.Rope.SCALING_FACTOR.format(arch=a): Value(V.FLOAT32, float(cfg.rope_scaling.factor))}),
    }


def sentencepiece_model(ck: Checkpoint) -> sptok.SpModel:
    """The SentencePiece model a GGUF can carry so that llama.cpp tokenizes as SentencePiece does."""
    tok = ck.tokenizer
    if tok is None:
        raise ConvertError(ck.tok.missing or f"{ck.where}: no tokenizer.model beside the checkpoint, and a GGUF "
                           "carries the vocabulary: pass --tokenizer PATH (or hf://org/name)")
    if tok.is_dir():
        raise ConvertError(f"{tok}: an HF tokenizer.json without tokenizer.model; GGUF's llama tokenizer needs the "
                           "SentencePiece scores and piece types, which tokenizer.json does not hold (it has BPE "
                           "merges): pass --tokenizer with the model's tokenizer.model")
    m = sptok.read_model(tok)
    fix = "; llama.cpp would not tokenize as SentencePiece does: use the checkpoint's own tokenizer.model"
    if m.model_type != sptok.BPE_TYPE:
        raise ConvertError(f"{tok}: a {sptok.MODEL_TYPES.get(m.model_type, m.model_type)} SentencePiece model, not "
                           f"BPE{fix}")
    nbytes = len(m.ids_of(sptok.BYTE))
    if nbytes != 256:
        raise ConvertError(f"{tok}: has {nbytes} byte pieces, not the 256 (<0x00> .. <0xFF>) llama.cpp needs (it "
                           f"aborts tokenizing text outside the vocabulary){fix}")
    if m.charsmap or m.remove_extra_whitespaces or m.whitespace_suffix or not m.escape_whitespaces:
        raise ConvertError(f"{tok}: normalizes text (a character map, collapsed or suffixed whitespace), which "
                           f"llama.cpp does not apply{fix}")
    return m


def tokenizer_metadata(m: sptok.SpModel, tok: Path, template: Optional[str] = None) -> dict[str, Value]:
    """The vocabulary's keys, with the chat template beside the tokenizer or `template` (--chat-template)."""
    ids = tokfiles.specials(tok)
    unk = m.ids_of(sptok.UNKNOWN)
    meta = {
        Keys.Tokenizer.MODEL: Value(V.STRING, "llama"),
        Keys.Tokenizer.LIST: Value(V.ARRAY, [p for p, _, _ in m.pieces], V.STRING),
        Keys.Tokenizer.SCORES: Value(V.ARRAY, [s for _, s, _ in m.pieces], V.FLOAT32),
        Keys.Tokenizer.TOKEN_TYPE: Value(V.ARRAY, [t for _, _, t in m.pieces], V.INT32),
    }
    for key, i in ((Keys.Tokenizer.BOS_ID, ids.bos_id), (Keys.Tokenizer.EOS_ID, ids.eos_id),
                   (Keys.Tokenizer.UNK_ID, unk[0] if unk else None)):
        if i is not None:
            meta[key] = _u32(i)
    meta[Keys.Tokenizer.ADD_BOS] = Value(V.BOOL, ids.bos_id is not None)
    meta[Keys.Tokenizer.ADD_EOS] = Value(V.BOOL, False)
    meta[Keys.Tokenizer.ADD_PREFIX] = Value(V.BOOL, m.add_dummy_prefix)
    template = template if template is not None else tokfiles.chat_template(tok)
    if template is not None:
        meta[Keys.Tokenizer.CHAT_TEMPLATE] = Value(V.STRING, template)
    return meta


# ----------------------------------------------------------------------------- planning
@dataclass
class FilePlan:
    """What a GGUF output is: its files, each with its metadata and tensors."""

    files: list[tuple[str, dict[str, Value], list[GTensor]]]
    dtype: str


def default_name(ck: Checkpoint) -> str:
    if ck.remote is not None:
        return ck.remote.split("://", 1)[-1].split("@")[0].rstrip("/")
    return ck.path.stem if ck.path.is_file() else ck.path.resolve().name


def source_dtype(ck: Checkpoint) -> str:
    dt = ck.dtype
    if dt not in SOURCE_TYPES:
        raise ConvertError(f"{ck.where}: tensors in {dt}; GGUF is written from float32, float16 or bfloat16 sources")
    return SOURCE_TYPES[dt]


def prepare(ck: Checkpoint, options: dict) -> dict:
    """The context length (the option, else the source's; never guessed), before anything is written.
    Returns the options with it resolved; the tokenizer is checked once, by `file_plan`."""
    max_pos = options.get("max_position_embeddings") or ck.cfg.max_position_embeddings
    if max_pos is None:
        raise ConvertError(f"{ck.where}: the source does not state the model's context length (llama.context_length); "
                           "pass --max-position-embeddings N (32768 for Mixtral-8x7B, 65536 for 8x22B)")
    return dict(options, max_position_embeddings=max_pos)


def file_plan(ck: Checkpoint, out_name: str, dtype: Optional[str], max_shard_size: Optional[int],
              max_position_embeddings: int, name: Optional[str], chat_template: Optional[str] = None) -> FilePlan:
    """Every file's name, metadata and tensors, from shapes alone (nothing read but the tokenizer, which
    is checked and turned into metadata here, once per run); the options as `prepare` resolved them."""
    dtype = dtype or source_dtype(ck)  # refuses a source that is not float32, float16 or bfloat16
    if dtype not in TYPES:
        raise ConvertError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    m = sentencepiece_model(ck)
    tokfiles.check_template(ck.tokenizer, chat_template)
    gts = gguf_tensors(ck.cfg, ck.canonical, dtype, ck.where)
    check_blocks(gts)
    meta = model_metadata(ck.cfg, name or default_name(ck), TYPES[dtype][1], max_position_embeddings)
    meta.update(tokenizer_metadata(m, ck.tokenizer, chat_template))
    groups = [gts] if not max_shard_size else size_groups(gts, max_shard_size)
    if len(groups) == 1:
        return FilePlan([(out_name, meta, gts)], dtype)
    stem, k = out_name[:-len(".gguf")] if out_name.endswith(".gguf") else out_name, len(groups)
    files = []
    for i, g in enumerate(groups):
        split = {Keys.Split.LLM_KV_SPLIT_NO: Value(V.UINT16, i), Keys.Split.LLM_KV_SPLIT_COUNT: Value(V.UINT16, k),
                 Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: Value(V.INT32, len(gts))}
        files.append((f"{stem}-{i + 1:05d}-of-{k:05d}.gguf", dict(meta, **split) if i == 0 else split, g))
    return FilePlan(files, dtype)


def size_groups(items: list, max_bytes: int, nbytes=lambda t: t.info.nbytes) -> list[list]:
    """Greedy: a file takes items while it stays within max_bytes (a larger item gets its own); the
    GGUF target's tensors and the restack's (formats.gguf.restack) alike."""
    if max_bytes <= 0:
        raise ConvertError(f"--max-shard-size must be positive, got {max_bytes}")
    groups: list[list] = [[]]
    size = 0
    for t in items:
        if groups[-1] and size + nbytes(t) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes(t)
    if len(groups) > 99999:
        raise ConvertError(f"--max-shard-size {max_bytes}: {len(groups)} pieces, more than gguf-split's 99999")
    return groups


# ----------------------------------------------------------------------------- writing
def tensor_blocks(gts: list[GTensor]):
    """(tensor name, its bytes in the file's type, source bytes read) for every block of rows of
    every tensor (a stacked one's experts in turn), in file order."""
    for t in gts:
        for src in t.sources:
            step = QUANT_BLOCK_BYTES if t.info.ggml_type not in (T.F32, T.F16, T.BF16) else None
            for block in (src.blocks(step) if step else src.blocks()):
                yield (t.info.name, quantize_rows(block, t.info.ggml_type, f"{t.where}: tensor '{src.name}'"),
                       block.numel() * src.dtype.itemsize)


def _producer(blocks, progress):
    """`produce(info)` for write_gguf over the shared block stream of one file."""
    def produce(info: TensorInfo):
        left = info.nbytes
        while left > 0:
            name, buf, src_bytes = next(blocks)
            if name != info.name:
                raise AssertionError(f"writer asked for {info.name} but the blocks are {name}'s")
            left -= buf.nbytes
            yield buf
            progress.advance(src_bytes)
    return produce


def write_files(tmp: Path, lay: FilePlan, progress) -> dict[str, dict]:
    """Every file of `lay` into `tmp` (blocks converted a little ahead on a second thread, which is
    joined on any exit); their manifest entries."""
    entries = {}
    for fname, meta, group in lay.files:
        h = hashlib.sha256()
        with closing(prefetched(tensor_blocks(group))) as blocks:
            size = write_gguf(tmp / fname, meta, [t.info for t in group], _producer(blocks, progress), hasher=h)
        entries[fname] = {"size": size, "sha256": h.hexdigest()}
    return entries
