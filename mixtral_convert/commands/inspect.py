"""inspect: say what a file or directory is without reading tensor data.

A checkpoint directory (torrent, Mistral fused, mistral-inference, HF hub or Accessory layout),
Mistral's .tar download (its members listed) or hf://org/name, a single .pth/.pt/.safetensors
file (its tensors' dtypes, count and bytes, and which layout its names belong to), a byte piece
of one, a params.json/config.json (either naming), or a tokenizer (tokenizer.model, .v1, .v3;
tekken.json named as what it is). Only the pickled tensor descriptions or safetensors headers
are read (weights_only).
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from ..encodings import tar as tarball
from ..errors import ConvertError
from ..formats import mistral
from ..formats.accessory import SHARD_RE
from ..formats.adapters import accessory_peft as peft
from ..formats.adapters import config as adapter_config
from ..formats.adapters import summary as adapter_summary
from ..formats.checkpoint import read_tensors
from ..formats.gguf import restack as gguf_restack
from ..formats.gguf import source as gguf_source
from ..formats.registry import file_reader, open_checkpoint
from ..io import hub
from ..io.progress import human_bytes
from ..model import tensors as tensors_table
from ..model.config import ModelConfig, read_json
from ..model.layouts import PREFIX
from ..model.names import hf_to_canonical
from ..tokenizer.files import tokenizer_pieces
from .concat_inputs import piece_of


def inspect(path: Path) -> dict:
    if hub.is_hub(path):
        return _directory(path)
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_dir() and adapter_config.is_adapter_dir(path):
        return adapter_summary.summary(path)
    if path.is_dir():
        return _directory(path)
    reader = file_reader(path)
    if reader is not None and reader.name == "archive":
        info = _directory(path)
        info["archive"] = {"name": path.name, "bytes": path.stat().st_size}
        info["files"] = tarball.listing(path)  # its members
        return info
    if reader is not None and reader.name == "gguf":
        return gguf_restack.describe(gguf_source.describe(path))  # names an old per-expert layout
    if path.name in mistral.TOKENIZERS:
        return {"path": str(path), "what": "SentencePiece tokenizer", "pieces": tokenizer_pieces(path)}
    if path.name == mistral.TEKKEN:
        return _tekken(path)
    piece = piece_of(path)
    if piece is not None:
        base, index = piece
        return {"path": str(path), "what": f"byte piece {index} of {base} (not loadable alone): join the pieces "
                f"with `mixtral-convert concat {path.parent}`", "file_bytes": path.stat().st_size}
    if path.suffix == ".json":
        raw = read_json(path)
        cfg = ModelConfig.from_params(raw, str(path))
        return {"path": str(path), "what": "model config", "config": cfg.to_params()}
    return _file(path)


def lines(info: dict, as_json: bool = False) -> list[str]:
    """What inspect prints of `info`: JSON, or a headline and one line per field."""
    if as_json:
        return [json.dumps(info, indent=2)]
    out = [f"{info['path']}: {info['what']}"]
    for k, v in info.items():
        if k in ("path", "what"):
            continue
        if k in ("bytes", "file_bytes"):
            v = f"{v} ({human_bytes(v)})"
        elif k == "files":
            v = ", ".join(f"{f['name']} ({human_bytes(f['bytes'])})" for f in v)
        elif k == "parameters":
            v = f"{v:,}"
        out.append(f"  {k}: {v}")
    return out


def _directory(path: Path) -> dict:
    if not hub.is_hub(path) and Path(path).is_dir() and peft.claims(Path(path), {p.name for p in Path(path).iterdir()}):
        save = peft.summary(Path(path))
        if save["save"] != "full":  # no model without its base: what the save is
            return {"path": str(path), "what": f"Accessory mixtral_peft save, {save['save']}", **save}
        return dict(_model(path), **save)
    return _model(path)


def _model(path) -> dict:
    ck = open_checkpoint(path)
    path = ck.remote or ck.path
    dtypes = collections.Counter(str(t.dtype).replace("torch.", "") for t in ck.canonical.values())
    info = {
        "path": str(path), "what": ck.describe(), "format": ck.kind, "world_size": ck.N,
        "config": ck.cfg.to_params(), "parameters": sum(math.prod(t.shape) for t in ck.canonical.values()),
        "tensors": len(ck.canonical), "bytes": ck.nbytes, "dtypes": dict(dtypes),
        "files": [{"name": f.name, "bytes": f.stat().st_size} for f in ck.files],
        "tokenizer": ({"pieces": tokenizer_pieces(ck.tokenizer)} if ck.tokenizer else None),
    }
    if ck.cfg.rope_scaling is not None:  # config's rope_scaling is Accessory's number (1/factor); this says it plainly
        info["rope_scaling"] = {"type": ck.cfg.rope_scaling.type, "factor": ck.cfg.rope_scaling.factor}
    if ck.tokenizer is not None:
        info["tokenizer_file"] = ck.tok.shown_as or ck.tokenizer.name
    elif ck.tok.missing:
        info["tokenizer_problem"] = ck.tok.missing
    if ck.plan is not None:
        info["shard_tensors"] = [len(r) for r in ck.plan.ranks]
    return info


def _tekken(path: Path) -> dict:
    raw = read_json(path)
    config = raw.get("config") if isinstance(raw, dict) else None
    vocab = config.get("default_vocab_size") if isinstance(config, dict) else None
    return {"path": str(path), "what": "Tekken tokenizer (Mistral's tiktoken-based format, not SentencePiece): "
            "Accessory cannot load it; convert with --tokenizer PATH, a SentencePiece tokenizer.model of the "
            "same vocabulary", "vocab_size": vocab}


def _file(path: Path) -> dict:
    tensors = read_tensors(path)
    dtypes = collections.Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    names = list(tensors)
    m = SHARD_RE.match(path.name)
    if names and all(n.startswith(PREFIX) for n in names):
        sparse = any(tensors_table.is_sparse_stack(n[len(PREFIX):]) for n in names)
        what = f"Accessory {'sparse' if sparse else 'base'} shard" + (
            f" (rank {int(m.group(1))} of {int(m.group(2))})" if m else "")
    elif any((hit := tensors_table.match(n)) and hit[0].per_expert for n in names):
        what = "torrent-layout Mixtral checkpoint" + ("" if "tok_embeddings.weight" in tensors else
                                                      " (or one of its key-split files)")
    elif any(tensors_table.is_fused(n) for n in names):
        what = "Mistral fused block_sparse_moe checkpoint (or one of its key-split files)"
    elif any(hf_to_canonical(n) for n in names):
        what = "HF hub Mixtral safetensors file (q/k permuted; or one of several)"
    else:
        what = "torch checkpoint (not a recognised Mixtral layout)"
    return {"path": str(path), "what": what, "tensors": len(tensors),
            "bytes": sum(t.nbytes for t in tensors.values()),
            "file_bytes": path.stat().st_size, "dtypes": dict(dtypes),
            "first_tensors": {n: list(tensors[n].shape) for n in names[:6]}}
