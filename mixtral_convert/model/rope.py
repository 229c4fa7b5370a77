"""RoPE scaling: read from every spelling a source can carry it in, written in each target's own.

docs/formats.md, "RoPE scaling". Only linear scaling is carried: every target can state it and the
reference forward computes it as transformers does (each rotary frequency divided by `factor`). A
scaling this tool cannot carry or compute is refused in one line naming the file, never dropped.
The spellings:
- HF config.json: transformers 5's `rope_parameters` {"rope_type": ..., "rope_theta": ..., "factor": ...}
  or transformers 4's `rope_scaling` {"type" or "rope_type": ..., "factor": ...}.
- Accessory config.json: `rope_scaling`, a number its model code multiplies the positions by, so
  linear factor f is written 1/f.
- GGUF: `llama.rope.scaling.type` ("none" or "linear") and `llama.rope.scaling.factor`; older files
  `llama.rope.scale_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConvertError

LINEAR = "linear"
NONE_TYPES = ("default", "none", None)  # no scaling, in transformers' and llama.cpp's words


@dataclass(frozen=True)
class RopeScaling:
    """Linear RoPE scaling: positions divided by `factor` (equivalently every frequency)."""
    factor: float
    type: str = LINEAR

    def to_hf(self, rope_theta: float) -> dict:
        """config.json keys for both transformers majors: 5 reads `rope_parameters`, 4 `rope_scaling`
        (5 reads that too, first, and both say the same)."""
        return {"rope_parameters": {"rope_type": self.type, "rope_theta": rope_theta, "factor": self.factor},
                "rope_scaling": {"type": self.type, "rope_type": self.type, "factor": self.factor}}

    def to_accessory(self) -> float:
        """Accessory's `rope_scaling`: the number positions are multiplied by."""
        return 1.0 / self.factor


def _factor(value, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConvertError(f"{where}: {what} must be a positive number, got {value!r}; fix the file")
    return float(value)


def _refuse(kind, where: str) -> None:
    raise ConvertError(f"{where}: RoPE scaling type {kind!r} is not supported (only 'linear' is carried and "
                       "computed); converting would change the model")


def _one(d, where: str, key: str) -> Optional[RopeScaling]:
    """One HF spelling's dict (or null) as a RopeScaling, or None for no scaling."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConvertError(f"{where}: '{key}' must be an object or null, got {d!r}; fix the file")
    kind = d.get("rope_type", d.get("type"))
    if kind in NONE_TYPES:
        return None
    if kind != LINEAR:
        _refuse(kind, where)
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError(f"{where}: '{key}' has partial_rotary_factor {d['partial_rotary_factor']!r}; only full "
                           "rotary is supported")
    return RopeScaling(_factor(d.get("factor"), where, f"'{key}' factor"))


def from_hf(hf: dict, where: str) -> Optional[RopeScaling]:
    """The scaling an HF config.json states, in either spelling. Where both are given, a non-null
    `rope_scaling` wins, as in transformers 5 (and transformers 4 reads only that one)."""
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConvertError(f"{where}: partial_rotary_factor {hf['partial_rotary_factor']!r}; only full rotary "
                           "is supported")
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ConvertError(f"{where}: 'rope_parameters' differs per layer type; a Mixtral has one")
    if hf.get("rope_scaling"):
        return _one(hf["rope_scaling"], where, "rope_scaling")
    return _one(params, where, "rope_parameters")


def from_accessory(value, where: str) -> Optional[RopeScaling]:
    """Accessory's `rope_scaling` (a position multiplier, or null) as linear scaling."""
    if value is None:
        return None
    if isinstance(value, dict):  # not Accessory's spelling: its model code multiplies positions by it
        raise ConvertError(f"{where}: 'rope_scaling' is {value!r}; Accessory's config takes a number (1/factor "
                           "of linear scaling) or null")
    return RopeScaling(1.0 / _factor(value, where, "'rope_scaling'"))


def from_gguf(kind, factor, scale_linear, where: str) -> Optional[RopeScaling]:
    """GGUF's `llama.rope.scaling.type`/`.factor` (or the older `llama.rope.scale_linear`)."""
    if kind is None and scale_linear is not None:
        kind, factor = LINEAR, scale_linear
    if kind in NONE_TYPES:
        return None
    if kind != LINEAR:
        _refuse(kind, where)
    return RopeScaling(_factor(factor, where, "llama.rope.scaling.factor"))
