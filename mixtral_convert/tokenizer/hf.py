"""An HF tokenizer directory for a SentencePiece BPE model (Llama's and Mistral's
`tokenizer.model`): `tokenizer.json` that encodes text to the same ids as SentencePiece does,
`tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`, as Mixtral's hub
repositories ship them (docs/formats.md, "HF tokenizer files").

The model file is read as its protobuf wire format (`sentencepiece_model.proto`: pieces with
score and type, the trainer's model type and byte fallback, the normalizer's rules), so no
protobuf package is needed. From it, the `tokenizers` pipeline SentencePiece's encoder amounts to:
- normalizer: the model's precompiled character map (none for Mixtral's, whose rule is
  "identity"), leading/trailing/repeated spaces dropped when the model removes extra whitespace,
  spaces replaced by U+2581, and U+2581 prepended to non-empty text (the dummy prefix);
- model: BPE over the whole normalized text (no pre-tokenizer), vocabulary = the pieces and
  their ids, a merge (a, b) for every split of a normal piece into two normal pieces, ranked by
  the piece's score (SentencePiece merges the best-scoring adjacent pair first); characters
  outside the vocabulary become byte pieces <0xXX> (byte fallback) or one fused unknown;
- post-processor: BOS first (add_bos_token true, add_eos_token false); control pieces (<s>,
  </s>, [INST] ...) are special added tokens, so a chat template's "<s>" is one token;
  user-defined pieces (v3's [REFERENCE_DOC_0..19]) are added tokens too, not special and not
  normalized, as transformers' own SentencePiece converter writes them;
- decoder: U+2581 back to spaces, byte pieces to bytes, the dummy prefix stripped.
An added token splits the text, and each part between added tokens gets the dummy prefix, as
SentencePiece gives when each part is encoded alone (what a chat template's parts are). For a
user-defined piece SentencePiece itself does not split: its text before and after is one
sentence, so ids differ next to the piece (docs/formats.md, "HF tokenizer files"). A
user-defined piece whose spelling ordinary text holds (whitespace, U+2581, one character) is
refused, as are models whose encoding this cannot reproduce at all (unigram,
whitespace-as-suffix, unused pieces); their own tokenizer.json can be carried instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConvertError

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user-defined", UNUSED: "unused", BYTE: "byte"}
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
BPE_TYPE = 2
TOKENIZER_CLASS = "LlamaTokenizerFast"


@dataclass
class SpModel:
    """What encoding depends on in a SentencePiece ModelProto."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = 1  # TrainerSpec.model_type (field 3), default unigram
    byte_fallback: bool = False  # TrainerSpec field 35
    whitespace_suffix: bool = False  # TrainerSpec.treat_whitespace_as_suffix, field 24
    charsmap: bytes = b""  # NormalizerSpec.precompiled_charsmap, field 2
    add_dummy_prefix: bool = True  # NormalizerSpec field 3
    remove_extra_whitespaces: bool = True  # NormalizerSpec field 4
    escape_whitespaces: bool = True  # NormalizerSpec field 5

    def ids_of(self, kind: int) -> list[int]:
        return [i for i, (_, _, t) in enumerate(self.pieces) if t == kind]


# ----------------------------------------------------------------------------- protobuf wire format
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of a message: an int for varints, bytes for length-delimited and
    fixed-width fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
            if len(value) != n:
                raise ValueError("truncated field")
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
            if len(value) != n:
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, value


def parse_model(data: bytes, where: str = "tokenizer.model") -> SpModel:
    """A serialized SentencePiece ModelProto, read for what encoding depends on."""
    m = SpModel()
    try:
        for num, value in _fields(data):
            if num == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                m.pieces.append((piece, score, kind))
            elif num == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        m.model_type = v
                    elif n == 24:
                        m.whitespace_suffix = bool(v)
                    elif n == 35:
                        m.byte_fallback = bool(v)
            elif num == 3:  # NormalizerSpec
                for n, v in _fields(value):
                    if n == 2:
                        m.charsmap = bytes(v)
                    elif n == 3:
                        m.add_dummy_prefix = bool(v)
                    elif n == 4:
                        m.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        m.escape_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error, TypeError) as e:
        raise ConvertError(f"{where}: not a SentencePiece model ({e}); use the tokenizer.model released with "
                           "this checkpoint") from None
    if not m.pieces:
        raise ConvertError(f"{where}: not a SentencePiece model (no pieces); use the tokenizer.model released "
                           "with this checkpoint")
    return m


# ----------------------------------------------------------------------------- tokenizer.json
def check_supported(m: SpModel, where: str) -> None:
    """ConvertError unless tokenizer.json can encode exactly as this model does."""
    fix = ("; carry the model's own tokenizer.json and tokenizer_config.json instead: put them beside the "
           "checkpoint, or pass --tokenizer DIR (a directory holding them; --tokenizer hf://org/name fetches only "
           "tokenizer.model)")
    if m.model_type != BPE_TYPE:
        raise ConvertError(f"{where}: a {MODEL_TYPES.get(m.model_type, m.model_type)} SentencePiece model; only BPE "
                           f"models (Llama's, Mistral's) are converted to tokenizer.json{fix}")
    if m.whitespace_suffix:
        raise ConvertError(f"{where}: treats whitespace as a suffix, which tokenizer.json is not built for{fix}")
    ids = m.ids_of(UNUSED)
    if ids:
        raise ConvertError(f"{where}: has {len(ids)} unused piece(s) (first {m.pieces[ids[0]][0]!r}, id {ids[0]}), "
                           f"which tokenizer.json cannot reproduce exactly{fix}")
    ordinary = [i for i in m.ids_of(USER_DEFINED) if touches_ordinary_text(m.pieces[i][0])]
    if ordinary:
        i = ordinary[0]
        raise ConvertError(f"{where}: has {len(ordinary)} user-defined piece(s) that ordinary text spells (first "
                           f"{m.pieces[i][0]!r}, id {i}: whitespace, U+2581 or one character); tokenizer.json's "
                           f"added tokens split text there where SentencePiece does not, so ids would differ{fix}")
    if len(m.ids_of(UNKNOWN)) != 1:
        raise ConvertError(f"{where}: has {len(m.ids_of(UNKNOWN))} unknown pieces, expected exactly one")
    if len({p for p, _, _ in m.pieces}) != len(m.pieces):
        raise ConvertError(f"{where}: the same piece appears under two ids; the model is corrupt")


def touches_ordinary_text(piece: str) -> bool:
    """Whether a user-defined piece's spelling is one ordinary text holds: a single character, or
    one with whitespace or U+2581 (SentencePiece matches it against the escaped text, tokenizer.json's
    unnormalized added token against the raw text). Markup such as [REFERENCE_DOC_0] is not."""
    return len(piece) < 2 or SPACE in piece or any(c.isspace() for c in piece)


def added_pieces(m: SpModel) -> list[tuple[int, str, bool]]:
    """(id, piece, special) of every piece tokenizer.json holds as an added token: the unknown and
    control pieces special, the user-defined ones not; by id."""
    kinds = {UNKNOWN: True, CONTROL: True, USER_DEFINED: False}
    return [(i, p, kinds[t]) for i, (p, _, t) in enumerate(m.pieces) if t in kinds]


def merges_of(m: SpModel) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, the best-scoring
    piece's first; splits of one piece by their parts' ids."""
    normal = {p: i for i, (p, _, t) in enumerate(m.pieces) if t == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-m.pieces[i][1], i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(m: SpModel, bos: Optional[str], where: str):
    """The `tokenizers.Tokenizer` that encodes as SentencePiece does (see the module's docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    check_supported(m, where)
    vocab = {p: i for i, (p, _, _) in enumerate(m.pieces)}
    unk = m.pieces[m.ids_of(UNKNOWN)[0]][0]
    tok = Tokenizer(models.BPE(vocab, merges_of(m), unk_token=unk, fuse_unk=True, byte_fallback=m.byte_fallback))
    space = SPACE if m.escape_whitespaces else " "
    steps = [normalizers.Precompiled(m.charsmap)] if m.charsmap else []
    if m.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if m.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if m.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))  # only to non-empty text, as SentencePiece
    tok.normalizer = normalizers.Sequence(steps)
    dec = ([decoders.Replace(SPACE, " ")] if m.escape_whitespaces else []) + [decoders.ByteFallback(), decoders.Fuse()]
    if m.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    added = added_pieces(m)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for _, p, special in added if special])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for _, p, special in added if not special])
    return tok


def tokenizer_json(m: SpModel, bos: Optional[str], where: str) -> bytes:
    """tokenizer.json's bytes (deterministic for a given model)."""
    return (build_tokenizer(m, bos, where).to_str(pretty=True) + "\n").encode()


# ----------------------------------------------------------------------------- the small files
def tokenizer_config(m: SpModel, bos: Optional[str], eos: Optional[str], unk: Optional[str],
                     chat_template=None) -> dict:
    """tokenizer_config.json with Mixtral's hub settings (BOS added, EOS not, legacy spaces)."""
    cfg = {
        "add_bos_token": bos is not None, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": special}
                                 for i, p, special in added_pieces(m)},
        "additional_special_tokens": [], "bos_token": bos, "clean_up_tokenization_spaces": False,
        "eos_token": eos, "legacy": True, "pad_token": None, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": TOKENIZER_CLASS, "unk_token": unk,
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def special_tokens_map(bos: Optional[str], eos: Optional[str], unk: Optional[str]) -> dict:
    return {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if v is not None}


def generation_config(bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    return {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id}


def read_model(path: Path) -> SpModel:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    return parse_model(data, str(path))
