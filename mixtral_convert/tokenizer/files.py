"""The tokenizer beside a checkpoint, in either form Accessory accepts (docs/formats.md, "HF tokenizer files"):
a SentencePiece `tokenizer.model`, or an HF tokenizer directory (`tokenizer.json` with
`tokenizer_config.json`).

A checkpoint's tokenizer is a path: its tokenizer.model, or, when there is none, the directory
holding the HF pair (Accessory probes in that order too). Its vocabulary, which must equal the
embedding's rows, is the piece count of a SentencePiece model or `len(tokenizer)` of an HF one
(the tokenizer.json vocabulary plus added tokens, counted with the `tokenizers` library).
The HF files beside either (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja) travel with the model: every output carries them, so a chat template
survives HF -> Accessory -> HF; `merge --to hf` builds them from a tokenizer.model that has
none (tokenizer.hf).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..errors import ConvertError
from ..io.atomic import atomic_file
from ..io.small import copy_file, json_bytes
from ..model.config import read_json
from . import hf as hf_tokenizer

SP_FILE = "tokenizer.model"
HF_JSON, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
HF_SPECIALS, HF_TEMPLATE = "special_tokens_map.json", "chat_template.jinja"
HF_FILES = (HF_JSON, HF_CONFIG, HF_SPECIALS, HF_TEMPLATE)
GENERATION = "generation_config.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def has_hf_pair(d: Path) -> bool:
    return (d / HF_JSON).is_file() and (d / HF_CONFIG).is_file()


def find(d: Path) -> Optional[Path]:
    """The tokenizer of directory `d`: its tokenizer.model, else `d` itself when it holds
    tokenizer.json and tokenizer_config.json, else None."""
    if (d / SP_FILE).is_file():
        return d / SP_FILE
    return d if has_hf_pair(d) else None


def hf_dir(tok: Path) -> Path:
    """Where the HF files of a tokenizer are: the HF directory itself, or beside tokenizer.model."""
    return tok if tok.is_dir() else tok.parent


def hf_files(tok: Path) -> dict[str, Path]:
    """The HF tokenizer files present beside `tok`, by name."""
    d = hf_dir(tok)
    return {name: d / name for name in HF_FILES if (d / name).is_file()}


# ----------------------------------------------------------------------------- vocabulary and specials
def tokenizer_pieces(path: Path) -> int:
    """The vocabulary of a tokenizer (a SentencePiece file or an HF directory); ConvertError when
    it is neither."""
    path = Path(path)
    if path.is_dir():
        return hf_vocab_size(path)
    import sentencepiece as spm  # imported only when a tokenizer is checked
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).strip()[:120]}); use the "
                           "tokenizer.model released with this checkpoint") from None


def _load_hf(d: Path):
    from tokenizers import Tokenizer  # imported only when an HF tokenizer is used
    try:
        return Tokenizer.from_file(str(d / HF_JSON))
    except Exception as e:  # tokenizers raises plain Exception for every parse error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"{d / HF_JSON}: not a tokenizers file ({first[:120]}); use the tokenizer.json "
                           "released with this checkpoint") from None


def _content(value) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_config(d: Path) -> dict:
    cfg = read_json(d / HF_CONFIG)
    if not isinstance(cfg, dict):
        raise ConvertError(f"{d / HF_CONFIG}: expected a JSON object; use the file released with this checkpoint")
    return cfg


def hf_vocab_size(d: Path) -> int:
    """len(tokenizer) as transformers (and so Accessory) counts it: tokenizer.json's vocabulary
    with its added tokens, plus the tokens tokenizer_config.json declares that are in neither."""
    tok, cfg = _load_hf(d), _hf_config(d)
    declared = {_content(v) for v in (cfg.get("added_tokens_decoder") or {}).values()}
    declared |= {_content(v) for v in (cfg.get("additional_special_tokens") or [])}
    declared |= {_content(cfg.get(k)) for k in _SPECIAL_KEYS}
    missing = {t for t in declared if t is not None and tok.token_to_id(t) is None}
    return tok.get_vocab_size(with_added_tokens=True) + len(missing)


@dataclass(frozen=True)
class Specials:
    bos: Optional[str]
    eos: Optional[str]
    unk: Optional[str]
    bos_id: Optional[int]
    eos_id: Optional[int]


def specials(tok: Path) -> Specials:
    """BOS, EOS and UNK of a tokenizer, as pieces and ids (None where it has none)."""
    if tok.is_dir():
        cfg = _hf_config(tok)
        smap = read_json(tok / HF_SPECIALS) if (tok / HF_SPECIALS).is_file() else {}
        smap = smap if isinstance(smap, dict) else {}
        names = {k: _content(cfg.get(k)) or _content(smap.get(k)) for k in ("bos_token", "eos_token", "unk_token")}
        hf = _load_hf(tok)
        ids = {k: hf.token_to_id(v) if v is not None else None for k, v in names.items()}
        return Specials(names["bos_token"], names["eos_token"], names["unk_token"], ids["bos_token"], ids["eos_token"])
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    bos, eos, unk = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    piece = lambda i: sp.id_to_piece(i) if i is not None else None  # noqa: E731
    return Specials(piece(bos), piece(eos), piece(unk), bos, eos)


# ----------------------------------------------------------------------------- writing
def _copy(src: Path, dst: Path, atomic: bool) -> dict:
    if not atomic:
        return copy_file(src, dst)
    with atomic_file(dst) as tmp:
        return copy_file(src, tmp)


def carried(tok: Path, skip: Iterable[str] = ()) -> dict[str, Path]:
    """What `carry` copies: output name -> source file."""
    skip = set(skip)
    files = {}
    if not tok.is_dir() and SP_FILE not in skip:
        files[SP_FILE] = tok
    files.update({name: path for name, path in hf_files(tok).items() if name not in skip})
    return files


def carry(tok: Path, out: Path, skip: Iterable[str] = (), atomic: bool = False) -> dict[str, dict]:
    """tokenizer.model (when the tokenizer is one) and the HF files beside it, copied into `out`
    (each renamed into place when `atomic`), except the names in `skip`; their manifest entries."""
    return {name: _copy(path, out / name, atomic) for name, path in carried(tok, skip).items()}


def check_hf_ready(tok: Path) -> None:
    """ConvertError (before anything is written) when an HF repository's tokenizer files cannot be
    carried or built from `tok`."""
    if not has_hf_pair(hf_dir(tok)):
        hf_tokenizer.check_supported(hf_tokenizer.read_model(tok), str(tok))


def chat_template(tok: Path) -> Optional[str]:
    """The chat template beside a tokenizer: chat_template.jinja's text, else tokenizer_config.json's
    `chat_template` (a string); None when neither has one."""
    files = hf_files(tok)
    if HF_TEMPLATE in files:
        return files[HF_TEMPLATE].read_text(encoding="utf-8")
    if HF_CONFIG in files:
        t = _hf_config(hf_dir(tok)).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def read_template(path) -> str:
    """--chat-template FILE: a Jinja chat template (such as a model's own chat_template.jinja), as text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConvertError(f"--chat-template {path}: cannot read ({why}); pass the model's "
                           "chat_template.jinja") from None
    if not text.strip():
        raise ConvertError(f"--chat-template {path}: empty; pass the model's chat_template.jinja")
    return text


def check_template(tok: Optional[Path], given: Optional[str]) -> None:
    """--chat-template is for a source without a template: refused where the tokenizer has one."""
    if given is not None and tok is not None and chat_template(tok) is not None:
        where = hf_files(tok).get(HF_TEMPLATE) or hf_files(tok)[HF_CONFIG]
        raise ConvertError(f"--chat-template: the source's tokenizer has a chat template already ({where}), which "
                           "is carried; leave --chat-template out")


def built(tok: Path, template: Optional[str] = None) -> dict[str, bytes]:
    """The tokenizer files an HF repository needs that `carry` does not copy, as bytes:
    generation_config.json always; tokenizer.json, tokenizer_config.json (with the chat template
    of a tokenizer_config.json beside it, or `template`, --chat-template's) and
    special_tokens_map.json built from tokenizer.model when there is no HF pair; with an HF pair,
    which is carried as it is, `template` becomes chat_template.jinja."""
    sp = specials(tok)
    files = {}
    d = hf_dir(tok)
    if has_hf_pair(d) and template is not None:
        files[HF_TEMPLATE] = template.encode("utf-8")
    if not has_hf_pair(d):
        m = hf_tokenizer.read_model(tok)
        if template is None:
            template = _hf_config(d).get("chat_template") if (d / HF_CONFIG).is_file() else None
        files[HF_JSON] = hf_tokenizer.tokenizer_json(m, sp.bos, str(tok))
        files[HF_CONFIG] = json_bytes(hf_tokenizer.tokenizer_config(m, sp.bos, sp.eos, sp.unk, template))
        if not (d / HF_SPECIALS).is_file():
            files[HF_SPECIALS] = json_bytes(hf_tokenizer.special_tokens_map(sp.bos, sp.eos, sp.unk))
    files[GENERATION] = json_bytes(hf_tokenizer.generation_config(sp.bos_id, sp.eos_id))
    return files


def differences(ours: Path, theirs: Path) -> Optional[str]:
    """The first file of tokenizer `ours` (and the HF files beside it) that differs from the same
    file of `theirs`; files only one side has are not compared."""
    if ours.is_dir() != theirs.is_dir():
        return (f"{ours}: is {'an HF tokenizer' if ours.is_dir() else 'a SentencePiece model'}, the source's "
                f"{theirs} is not")
    if not ours.is_dir() and ours.read_bytes() != theirs.read_bytes():
        return f"{ours}: differs from the source's {theirs}"
    mine, source = hf_files(ours), hf_files(theirs)
    for name in sorted(set(mine) & set(source)):
        if mine[name].read_bytes() != source[name].read_bytes():
            return f"{mine[name]}: differs from the source's {source[name]}"
    return None
