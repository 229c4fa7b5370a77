"""`hf://org/name[@revision]`: a checkpoint or tokenizer on the Hugging Face hub, resolved to a
local snapshot directory through huggingface_hub.

Only the files needed are fetched (`allow_patterns`): first the small ones (configs, index,
tokenizer), which say what the repository holds; then only the weights of one format (the
safetensors files the index lists, or Accessory shards, or Mistral's consolidated files),
never two copies of the same model. HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE) resolves
from the cache only; HF_HUB_CACHE, then HF_HOME/hub, say where the cache is. They are read
at call time, not when huggingface_hub was imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConvertError

PREFIX = "hf://"
_SPEC = re.compile(r"hf:/{1,2}(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?\Z")
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model.v3", "tokenizer.model.v1"]  # the last two: Mistral's names


def is_hub(spec) -> bool:
    # click's Path type turns "hf://a/b" into "hf:/a/b": accept both spellings
    return str(spec).startswith("hf:/")


def normalize(spec) -> str:
    """The reference as the user wrote it, hf://org/name[@rev], whichever spelling came in."""
    text = str(spec)
    return PREFIX + text[len("hf:/"):].lstrip("/") if is_hub(text) else text


def parse(spec) -> tuple[str, Optional[str]]:
    m = _SPEC.match(str(spec))
    if not m:
        raise ConvertError(f"{normalize(spec)}: not a hub reference; write hf://org/name or hf://org/name@revision")
    return m.group("repo"), m.group("rev")


def _truthy(v: Optional[str]) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Optional[str]:
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def download(repo: str, revision: Optional[str], patterns: list[str], spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{spec}: huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir(),
                                 local_files_only=offline())
    except Exception as e:  # its errors are many (offline, gated, not found, HTTP): one line each
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = (" (offline: HF_HUB_OFFLINE is set and the cache at "
                f"{cache_dir() or 'the default location'} lacks it)" if offline() else "")
        raise ConvertError(f"{spec}: cannot resolve through huggingface_hub{hint}: {first[:200]}") from None
    return Path(path)


def resolve_checkpoint(spec, small_files: list[str], weight_patterns: Callable[[Path], list[str]]) -> Path:
    """A local snapshot directory holding one checkpoint of the repository and its tokenizer: first
    the small files (`small_files`, the formats' configs, and the tokenizer's), then the weight files
    `weight_patterns(directory of the small files)` names (the registry asks each format)."""
    repo, rev = parse(spec)
    spec = normalize(spec)
    small = list(dict.fromkeys(small_files + TOKENIZER_FILES))
    d = download(repo, rev, small, spec)
    patterns = weight_patterns(d)
    if not patterns:
        raise ConvertError(f"{spec}: the repository has none of config.json (HF), params.json (Mistral) or "
                           "meta.json (Accessory); is it a Mixtral checkpoint?")
    return download(repo, rev, small + patterns, spec)


def resolve_tokenizer(spec) -> Path:
    """tokenizer.model of a hub repository."""
    repo, rev = parse(spec)
    spec = normalize(spec)
    d = download(repo, rev, ["tokenizer.model"], spec)
    tok = d / "tokenizer.model"
    if not tok.is_file():
        raise ConvertError(f"{spec}: the repository has no tokenizer.model")
    return tok


def repo_name(spec) -> str:
    return parse(spec)[0].split("/")[-1]
