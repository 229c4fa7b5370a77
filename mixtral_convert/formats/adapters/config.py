"""An HF PEFT adapter's directory and its adapter_config.json (docs/formats.md, "HF PEFT LoRA adapters").

`open_adapter_dir` finds the files (a local directory or hf://org/name[@rev]: only the adapter's own
files are fetched), `read_config` reads adapter_config.json and refuses, in one line, what this tool
would not merge exactly as peft does: another PEFT method, a LoRA variant that changes the forward
(layer replication, trainable tokens, LoRA biases, activated or pooled LoRA, ...), a missing or
invalid config. `scale_of` is peft's scale for one module after `rank_pattern` and `alpha_pattern`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import ConvertError
from ...io import hub

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Fields that, when set, make peft compute something this tool does not apply: refused by name.
# (value that means "not used" for each)
UNSUPPORTED = {
    "layer_replication": None, "trainable_token_indices": None, "lora_bias": False, "use_qalora": False,
    "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "velora_config": None, "monteclora_config": None, "modules_to_tie": None,
}


@dataclass(frozen=True)
class AdapterConfig:
    path: Path  # adapter_config.json
    r: int
    alpha: float
    rslora: bool
    dora: bool
    fan_in_fan_out: bool
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_parameters: tuple = ()
    modules_to_save: tuple = ()
    base_model: Optional[str] = None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) for a module name as peft's model names it, after the patterns (peft's get_pattern_key)."""
        return _pattern(self.rank_pattern, module, self.r), _pattern(self.alpha_pattern, module, self.alpha)

    def scale_of(self, module: str, r: int) -> float:
        """peft's scale for the module: alpha / r, or alpha / sqrt(r) with use_rslora (r: the stored rank)."""
        _, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():  # the first key that matches the end of the name (peft's order)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def is_adapter_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def open_adapter_dir(spec) -> tuple[Path, str]:
    """(local directory, how messages name it) of --adapter PATH or hf://org/name[@rev]."""
    if hub.is_hub(spec):
        repo, rev = hub.parse(spec)
        shown = hub.normalize(spec)
        d = hub.download(repo, rev, [CONFIG, *WEIGHTS, *hub.TOKENIZER_FILES, "added_tokens.json"], shown)
        return d, shown
    path = Path(spec)
    if path.is_file() and path.name == CONFIG:
        path = path.parent
    if not path.is_dir():
        raise ConvertError(f"--adapter {spec}: no such directory (expected a peft adapter directory with {CONFIG})")
    return path, str(path)


def weights_file(d: Path, shown: str) -> Path:
    for name in WEIGHTS:
        if (d / name).is_file():
            return d / name
    raise ConvertError(f"{shown}: no {' or '.join(WEIGHTS)} beside {CONFIG}; download the adapter's weights too")


def read_config(d: Path, shown: str) -> AdapterConfig:
    p = d / CONFIG
    if not p.is_file():
        raise ConvertError(f"{shown}: no {CONFIG}; an HF PEFT adapter directory holds {CONFIG} and "
                           f"{WEIGHTS[0]}")
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{shown}/{CONFIG}: not valid JSON ({str(e).splitlines()[0][:100]}); restore the file "
                           "peft saved") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{shown}/{CONFIG}: not a JSON object; restore the file peft saved")
    kind = raw.get("peft_type")
    if kind != "LORA":
        what = f"peft_type {kind!r}" if kind is not None else "no peft_type"
        raise ConvertError(f"{shown}/{CONFIG}: {what}; only LoRA adapters (peft_type \"LORA\") are merged, "
                           "this is another PEFT method")
    for key, unused in UNSUPPORTED.items():
        v = raw.get(key, unused)
        if v != unused and v not in (None, [], {}, False):
            raise ConvertError(f"{shown}/{CONFIG}: '{key}' is {json.dumps(v)[:60]}; peft applies it and this tool "
                               "does not: merge with peft itself")
    if raw.get("bias", "none") != "none":
        raise ConvertError(f"{shown}/{CONFIG}: 'bias' is {raw.get('bias')!r}; Mixtral's linears have no biases and "
                           "this tool merges only bias \"none\" adapters")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConvertError(f"{shown}/{CONFIG}: 'r' is {r!r}; expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConvertError(f"{shown}/{CONFIG}: 'lora_alpha' is {alpha!r}; expected a number")
    pats = {}
    for key in ("rank_pattern", "alpha_pattern"):
        v = raw.get(key) or {}
        if not isinstance(v, dict) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v.values()):
            raise ConvertError(f"{shown}/{CONFIG}: '{key}' must map module name patterns to numbers")
        pats[key] = v
    tp = raw.get("target_parameters") or []
    mts = raw.get("modules_to_save") or []
    if not isinstance(tp, list) or not isinstance(mts, list):
        raise ConvertError(f"{shown}/{CONFIG}: 'target_parameters' and 'modules_to_save' must be lists")
    return AdapterConfig(p, r, float(alpha), bool(raw.get("use_rslora", False)), bool(raw.get("use_dora", False)),
                         bool(raw.get("fan_in_fan_out", False)), pats["rank_pattern"], pats["alpha_pattern"],
                         tuple(tp), tuple(mts), raw.get("base_model_name_or_path"))
