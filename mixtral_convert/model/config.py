"""The model's hyper-parameters and the canonical tensor names and shapes they imply.

Canonical names are the torrent release's (docs/formats.md, "Torrent release"). Every layout is described
relative to them; nothing here knows Mixtral-8x7B's numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from . import rope, tensors
from .rope import RopeScaling

DEFAULT_ROPE_THETA = 1e6

# Keys LLaMA2-Accessory's ModelArgs accepts (docs/formats.md, "Accessory layouts"); anything else crashes it.
ACCESSORY_KEYS = frozenset({
    "dim", "hidden_dim", "head_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
    "norm_eps", "rope_theta", "moe", "load_balancing_weight", "rope_scaling",
    "max_seq_len", "max_batch_size",
})


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    num_experts: int
    experts_per_tok: int
    norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    # the context length the model was trained for (HF's max_position_embeddings: 32768 for
    # Mixtral-8x7B, 65536 for 8x22B). Only an HF config.json states it; the torrent's params.json
    # does not, and Accessory's max_seq_len is the runtime's cache size (its loader overwrites
    # it), not this. Not part of the model's identity: configs that lack it compare equal.
    max_position_embeddings: Optional[int] = field(default=None, compare=False)
    # linear RoPE scaling (model.rope); None: none. It changes the model, so configs compare on it.
    rope_scaling: Optional[RopeScaling] = None

    # ----- reading -------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict, where: str = "params.json") -> "ModelConfig":
        """From a torrent params.json or an Accessory config.json (same key names)."""
        if not isinstance(params, dict):
            raise ConvertError(f"{where}: expected a JSON object, got {type(params).__name__}")
        if "dim" not in params and "hidden_size" in params:
            # a params.json may use HF's names (docs/formats.md, "Mistral fused files")
            return cls.from_hf_config(params, where)
        if params.get("sliding_window") is not None:  # mistral-inference's params.json may state one
            raise ConvertError(f"{where}: 'sliding_window' is {params['sliding_window']!r}; only null is supported "
                               "(it changes the computation, and converting would drop it)")
        moe = params.get("moe")
        if not isinstance(moe, dict):
            raise ConvertError(f"{where}: missing the 'moe' object "
                               "({'num_experts': E, 'num_experts_per_tok': K}); is this a Mixtral checkpoint?")
        try:
            dim = _int(params, "dim", where)
            n_heads = _int(params, "n_heads", where)
            head_dim = int(params["head_dim"]) if params.get("head_dim") is not None else None
            if head_dim is None:
                if dim % n_heads:
                    raise ConvertError(f"{where}: 'head_dim' is absent and dim {dim} is not divisible by "
                                       f"n_heads {n_heads}")
                head_dim = dim // n_heads
            cfg = cls(
                dim=dim,
                n_layers=_int(params, "n_layers", where),
                head_dim=head_dim,
                hidden_dim=_int(params, "hidden_dim", where),
                n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads),
                vocab_size=_int(params, "vocab_size", where),
                num_experts=_int(moe, "num_experts", where + " moe"),
                experts_per_tok=_int(moe, "num_experts_per_tok", where + " moe"),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA),
                max_position_embeddings=(_int(params, "max_position_embeddings", where)
                                         if params.get("max_position_embeddings") is not None else None),
                rope_scaling=rope.from_accessory(params.get("rope_scaling"), where),
            )
        except (TypeError, ValueError) as e:
            raise ConvertError(f"{where}: malformed value ({e})") from None
        cfg.check(where)
        return cfg

    @classmethod
    def from_hf_config(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """From an HF hub config.json (MixtralConfig names, docs/formats.md "HF hub layout"); rope_theta at
        top level or in rope_parameters; head_dim absent or null means hidden_size / heads."""
        if not isinstance(hf, dict):
            raise ConvertError(f"{where}: expected a JSON object, got {type(hf).__name__}")
        if "num_local_experts" not in hf:
            raise ConvertError(f"{where}: no 'num_local_experts' (model_type {hf.get('model_type')!r}); "
                               "is this a Mixtral checkpoint?")
        theta = hf.get("rope_theta")
        if theta is None and isinstance(hf.get("rope_parameters"), dict):
            theta = hf["rope_parameters"].get("rope_theta")
        params = {
            "dim": hf.get("hidden_size"), "n_layers": hf.get("num_hidden_layers"),
            "head_dim": hf.get("head_dim"), "hidden_dim": hf.get("intermediate_size"),
            "n_heads": hf.get("num_attention_heads"), "n_kv_heads": hf.get("num_key_value_heads"),
            "vocab_size": hf.get("vocab_size"), "norm_eps": hf.get("rms_norm_eps", 1e-5), "rope_theta": theta,
            "max_position_embeddings": hf.get("max_position_embeddings"),
            "moe": {"num_experts": hf.get("num_local_experts"), "num_experts_per_tok": hf.get("num_experts_per_tok")},
        }
        for ours, theirs in (("dim", "hidden_size"), ("n_layers", "num_hidden_layers"),
                             ("hidden_dim", "intermediate_size"), ("n_heads", "num_attention_heads"),
                             ("vocab_size", "vocab_size")):
            if params[ours] is None:
                raise ConvertError(f"{where}: missing required key '{theirs}'")
        if hf.get("num_experts_per_tok") is None:
            raise ConvertError(f"{where}: missing required key 'num_experts_per_tok'")
        refuse_hf_fields(hf, where)
        scaling = rope.from_hf(hf, where)
        return replace(cls.from_params(params, where), rope_scaling=scaling)

    def to_hf_config(self, torch_dtype: str = "bfloat16", max_position_embeddings: Optional[int] = None,
                     bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> dict:
        """config.json of the HF hub layout (transformers' MixtralConfig names). The context length
        is the argument, else the one read from the source; with neither the key is left out, never
        guessed (merge --to hf refuses before that). BOS/EOS ids are the tokenizer's."""
        max_pos = max_position_embeddings or self.max_position_embeddings
        cfg = {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "num_local_experts": self.num_experts, "num_experts_per_tok": self.experts_per_tok,
            "max_position_embeddings": max_pos, "sliding_window": None, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if max_pos is None:
            del cfg["max_position_embeddings"]
        if self.rope_scaling is not None:
            cfg.update(self.rope_scaling.to_hf(self.rope_theta))
        return cfg

    @classmethod
    def from_json_file(cls, path: Path) -> "ModelConfig":
        return cls.from_params(read_json(path), str(path))

    def check(self, where: str) -> None:
        for name, value in asdict(self).items():
            if name == "rope_scaling" or (value is None and name == "max_position_embeddings"):
                continue
            if name in ("norm_eps", "rope_theta"):
                if not value > 0:
                    raise ConvertError(f"{where}: '{name}' must be positive, got {value}")
            elif value <= 0:
                raise ConvertError(f"{where}: '{name}' must be a positive integer, got {value}")
        if self.n_heads % self.n_kv_heads:
            raise ConvertError(f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.experts_per_tok > self.num_experts:
            raise ConvertError(f"{where}: num_experts_per_tok {self.experts_per_tok} exceeds num_experts "
                               f"{self.num_experts}")

    # ----- writing -------------------------------------------------------------------
    def to_params(self) -> dict:
        """params.json of the torrent layout (with rope_theta made explicit); a scaled model's adds
        Accessory's `rope_scaling` (the torrent target refuses it: `refuse_scaling`)."""
        params = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "moe": {"num_experts_per_tok": self.experts_per_tok, "num_experts": self.num_experts},
        }
        if self.rope_scaling is not None:
            params["rope_scaling"] = self.rope_scaling.to_accessory()
        return params

    def refuse_scaling(self, where: str) -> None:
        """For a target that cannot state RoPE scaling."""
        if self.rope_scaling is not None:
            raise ConvertError(f"{where}: the model has linear RoPE scaling (factor {self.rope_scaling.factor}), "
                               "which this layout cannot state; write --to hf, --to gguf or split instead")

    def to_accessory(self) -> dict:
        """config.json for LLaMA2-Accessory: only keys its ModelArgs accepts."""
        cfg = self.to_params()
        if not set(cfg) <= ACCESSORY_KEYS:
            raise ConvertError(f"config.json for Accessory would hold keys its ModelArgs rejects: "
                               f"{sorted(set(cfg) - ACCESSORY_KEYS)}; a bug in mixtral-convert, please report it")
        return cfg

    # ----- tensors -------------------------------------------------------------------
    def canonical_shapes(self, optional: bool = False) -> dict[str, tuple[int, ...]]:
        """Every canonical (torrent) tensor name -> its shape, in a stable order (model.tensors)."""
        return tensors.canonical_shapes(self, optional)


# HF config.json fields that change the computation, with the value a Mixtral has; another is refused, never
# dropped (no target of this tool computes it, nor does the reference forward).
_PLAIN = {"sliding_window": None, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          "hidden_act": "silu"}


def refuse_hf_fields(hf: dict, where: str) -> None:
    """One line for the first field whose value changes the model in a way this tool does not carry."""
    for key, plain in _PLAIN.items():
        if key in hf and hf[key] != plain:
            raise ConvertError(f"{where}: '{key}' is {hf[key]!r}; only {json.dumps(plain)} is supported (it changes "
                               "the computation, and converting would drop it)")


def _int(d: dict, key: str, where: str) -> int:
    if key not in d or d[key] is None:
        raise ConvertError(f"{where}: missing required key '{key}'; restore the file released with the checkpoint")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ConvertError(f"{where}: '{key}' must be an integer, got {v!r}; restore the file released with "
                           "the checkpoint")
    return int(v)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or replace the file") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
