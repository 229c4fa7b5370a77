"""An HF PEFT LoRA adapter applied to a base checkpoint (`--adapter PATH|hf://org/name[@rev]`; docs/formats.md,
"HF PEFT LoRA adapters").

`read_deltas` maps an adapter's tensors, by their peft key names, onto canonical tensor names
(io.delta.Delta: a LoRA pair with peft's scale for its module, a DoRA magnitude, a replacement),
in canonical row order: HF's q/k permutation undone on B's rows (model.names), peft's fused
transformers-5 experts (`target_parameters`) cut per expert as ParamWrapper.get_delta_weight
does, the embedding's factors transposed. `apply` wraps a base checkpoint's canonical lazies
(io.delta.DeltaMerged); nothing else of the base changes.

Key names (the prefix `base_model.model.` then HF's module names):
- `MOD.lora_A.weight` [r, in], `MOD.lora_B.weight` [out, r]: MOD an attention projection, the
  hub's router `...block_sparse_moe.gate` and experts `...experts.E.w1`, `lm_head`; on transformers
  5 the router `...mlp.gate` and the fused experts `...mlp.experts` (its inner wrapper
  `...mlp.experts.base_layer` when both expert parameters are targeted, peft wrapping them in
  the module's parameter order: gate_up_proj inside, down_proj outside).
- `MOD.lora_embedding_A` [r, V], `MOD.lora_embedding_B` [D, r]: the embedding, delta (B·A)ᵀ.
- `MOD.lora_magnitude_vector`: DoRA's magnitude [out].
- `MOD.base_layer.weight` and plain HF names (`lm_head.weight`, `model.norm.weight`): whole
  tensors replacing the base's (peft's saved embedding layers and `modules_to_save`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import ConvertError
from ...io.delta import Columns, Delta, DeltaMerged, Lora, Rows, Transposed
from ...io.lazy import Lazy, Stored
from ...model import names as hfnames
from ...tokenizer import files as tokenizer_files
from ..checkpoint import Checkpoint, TokenizerRef, read_tensors
from . import config as adapter_config

PREFIX = "base_model.model."
LORA_RX = re.compile(r"(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                      r"|lora_magnitude_vector(?:\.weight)?)\Z")
_KIND = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "EA", "lora_embedding_B": "EB",
         "lora_magnitude_vector": "M", "lora_magnitude_vector.weight": "M"}
T5_EXPERTS = re.compile(r"model\.layers\.(?P<L>\d+)\.mlp\.experts(?P<nest>(?:\.base_layer)*)\Z")
T5_ROUTER = re.compile(r"model\.layers\.(?P<L>\d+)\.mlp\.gate\Z")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers 5's MixtralExperts parameters, in module order


def load_tensors(f: Path) -> dict[str, Lazy]:
    """The adapter's tensors, lazily: safetensors, or adapter_model.bin as a torch zip read by the tool's
    weights-only reader (tensor descriptions unpickled, bytes read block by block: a full-vocabulary lm_head
    streams); a legacy (non-zip) .bin is read whole by torch.load(weights_only=True)."""
    from ...encodings.zipcheck import is_zip
    if f.name.endswith(".safetensors") or is_zip(f):
        return read_tensors(f)
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ConvertError(f"{f}: not loadable with torch.load(weights_only=True) "
                           f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f"{f}: not a dict of tensors (a peft adapter_model.bin is one)")
    return {k: Stored(v, k) for k, v in sd.items()}


def _strip(key: str, f: Path) -> str:
    if not key.startswith(PREFIX):
        raise ConvertError(f"{f}: tensor '{key}' does not start with '{PREFIX}' (peft's prefix); not a peft "
                           "adapter for a causal LM")
    return key[len(PREFIX):]


class Reading:
    """One adapter read against a model config: canonical name -> Delta."""

    def __init__(self, cfg, conf: adapter_config.AdapterConfig, f: Path, tensors: dict[str, Lazy]):
        self.cfg, self.conf, self.f = cfg, conf, f
        self.shapes = cfg.canonical_shapes()
        self.deltas: dict[str, Delta] = {}
        self.vocab = cfg.vocab_size  # a run that added tokens saves a larger embedding and lm_head
        self.resized: list[str] = []
        mods: dict[str, dict[str, tuple[str, Lazy]]] = {}
        stripped = {_strip(key, f): key for key in tensors}
        for key, t in tensors.items():
            name = _strip(key, f)
            wrapper = re.match(r"(?P<mod>.+)\.(?P<w>original_module|modules_to_save)\.weight\Z", name)
            if wrapper:  # peft's ModulesToSaveWrapper state (a resized vocabulary saves it beside the module's tensor):
                # the original module is the base's copy, the wrapper's copy is what `MOD.weight` holds; peft loads
                # `MOD.weight` as the module to save and leaves these aside, as the tool does
                if wrapper["mod"] + ".weight" not in stripped:
                    raise ConvertError(f"{f}: '{key}' without '{PREFIX}{wrapper['mod']}.weight' beside it; peft would "
                                       "not load it as the module to save: re-save the adapter with peft")
                continue
            m = LORA_RX.match(name)
            if m:
                mods.setdefault(m["mod"], {})[_KIND[m["kind"]]] = (key, t)
            else:
                self._replacement(key, name, t)
        if self.resized and len(self.resized) != 2:
            missing = "lm_head" if "tok_embeddings.weight" in self.resized else "embed_tokens"
            raise ConvertError(f"{f}: the adapter resizes the vocabulary to {self.vocab} in one of embed_tokens and "
                               f"lm_head but does not save {missing} whole; the adapter is incomplete")
        for mod, parts in mods.items():
            self._module(mod, parts)

    # ------------------------------------------------------------------ helpers
    def _put(self, name: str, **fields) -> None:
        old = self.deltas.get(name)
        if old is None:
            self.deltas[name] = Delta(fields.pop("source"), **fields)
            return
        clash = [k for k in fields if k != "source" and getattr(old, k) is not None]
        if clash:
            raise ConvertError(f"{self.f}: '{fields['source']}' and '{old.source}' both give {name}'s {clash[0]}; "
                               "the adapter is inconsistent")
        self.deltas[name] = replace(old, **{k: v for k, v in fields.items() if k != "source"})

    def _shape(self, key: str, t: Lazy, want: tuple, what: str) -> None:
        if tuple(t.shape) != tuple(want):
            raise ConvertError(f"{self.f}: tensor '{key}' has shape {list(t.shape)}, the base's {what} needs "
                               f"{list(want)}: the adapter was made for another model")

    def _want(self, key: str, canon: str) -> tuple:
        """The base's shape of `canon`; a layer or expert the base does not have is refused."""
        if canon not in self.shapes:
            raise ConvertError(f"{self.f}: tensor '{key}' is for {canon}, which the base does not have ("
                               f"{self.cfg.n_layers} layers, {self.cfg.num_experts} experts): the adapter was made "
                               "for another model")
        return self.shapes[canon]

    def _canonical_order(self, name: str, t: Lazy) -> Lazy:
        """`t`'s rows (HF's order for q/k) in canonical order."""
        n = hfnames.qk_heads(name, self.cfg)
        if n is None:
            return t
        from ..hf import RowPermuted
        gather = hfnames.qk_gather(t.shape[0], n, False, name)
        if len(t.shape) == 1:
            return Stored(t.read(0, t.shape[0]).index_select(0, gather), t.name)
        return RowPermuted(t, gather, t.name)

    def _replacement(self, key: str, name: str, t: Lazy) -> None:
        hf = name[: -len(".base_layer.weight")] + ".weight" if name.endswith(".base_layer.weight") else name
        rt = T5_ROUTER.match(hf[: -len(".weight")]) if hf.endswith(".weight") else None
        canon = hfnames.hf_to_canonical(hf) or (f"layers.{rt['L']}.feed_forward.gate.weight" if rt else None)
        if canon is None:
            raise ConvertError(f"{self.f}: tensor '{key}' is not a LoRA tensor nor a Mixtral tensor this tool knows "
                               "(a modules_to_save entry must be a whole tensor of the model, e.g. lm_head)")
        want = self._want(key, canon)
        if canon in ("tok_embeddings.weight", "output.weight") and len(t.shape) == 2 and t.shape[1] == want[1] \
                and t.shape[0] != self.cfg.vocab_size and (not self.resized or t.shape[0] == self.vocab):
            self.vocab = t.shape[0]  # added tokens: both tensors take the adapter's vocabulary
            self.resized.append(canon)
            for n in ("tok_embeddings.weight", "output.weight"):
                self.shapes[n] = (self.vocab, want[1])
            want = self.shapes[canon]
        self._shape(key, t, want, canon)
        self._put(canon, source=key, replace=self._canonical_order(canon, t))

    # ------------------------------------------------------------------ LoRA modules
    def _module(self, mod: str, parts: dict) -> None:
        key = next(iter(parts.values()))[0]
        if "EA" in parts or "EB" in parts:
            return self._embedding(mod, parts)
        if "A" not in parts or "B" not in parts:
            missing = "lora_A" if "A" not in parts else "lora_B"
            raise ConvertError(f"{self.f}: '{key}' has no {missing} beside it; the adapter is incomplete")
        ex = T5_EXPERTS.match(mod)
        if ex:
            return self._experts(mod, ex, parts)
        rt = T5_ROUTER.match(mod)
        canon = f"layers.{rt['L']}.feed_forward.gate.weight" if rt else hfnames.hf_to_canonical(mod + ".weight")
        if canon is None or canon == "tok_embeddings.weight":
            raise ConvertError(f"{self.f}: '{key}' targets module '{mod}', which this tool does not know (Mixtral's "
                               "q/k/v/o_proj, router, experts w1/w2/w3, lm_head, embed_tokens)")
        pattern_key = mod + ".weight" if rt else mod  # peft's ParamWrapper names its parameter
        (ka, A), (kb, B) = parts["A"], parts["B"]
        out, inp = self._want(key, canon)
        r = A.shape[0]
        self._shape(ka, A, (r, inp), f"{canon} (LoRA A of rank {r})")
        self._shape(kb, B, (out, r), f"{canon} (LoRA B of rank {r})")
        self._check_rank(ka, pattern_key, r)
        mag = None
        if "M" in parts:
            km, M = parts["M"]
            self._shape(km, M, (out,), f"{canon} (DoRA magnitude)")
            mag = self._canonical_order(canon, M)
        self._put(canon, source=ka, lora=Lora(self._canonical_order(canon, B), A, self.conf.scale_of(pattern_key, r)),
                  magnitude=mag)

    def _check_rank(self, key: str, pattern_key: str, r: int) -> None:
        want, _ = self.conf.rank_alpha(pattern_key)
        if want != r:
            raise ConvertError(f"{self.f}: '{key}' has rank {r}, adapter_config.json gives this module r {want} (after "
                               "rank_pattern); the config and the weights disagree")

    def _embedding(self, mod: str, parts: dict) -> None:
        key = next(iter(parts.values()))[0]
        if hfnames.hf_to_canonical(mod + ".weight") != "tok_embeddings.weight":
            raise ConvertError(f"{self.f}: '{key}': embedding LoRA on '{mod}', which is not the model's embed_tokens")
        if "M" in parts:
            raise ConvertError(f"{self.f}: '{parts['M'][0]}': DoRA on the embedding is not merged by this tool; "
                               "merge with peft itself")
        if "EA" not in parts or "EB" not in parts:
            raise ConvertError(f"{self.f}: '{key}' lacks its lora_embedding_A/B partner; the adapter is incomplete")
        (ka, A), (kb, B) = parts["EA"], parts["EB"]
        V, D = self.shapes["tok_embeddings.weight"]
        r = A.shape[0]
        self._shape(ka, A, (r, V), f"tok_embeddings.weight (embedding LoRA A of rank {r})")
        self._shape(kb, B, (D, r), f"tok_embeddings.weight (embedding LoRA B of rank {r})")
        self._check_rank(ka, mod, r)
        # delta = s (B A)^T = s A^T B^T: rows of A^T [V, r] times B^T [r, D]
        self._put("tok_embeddings.weight", source=ka,
                  lora=Lora(Transposed(A, ka), Transposed(B, kb), self.conf.scale_of(mod, r)))

    def _experts(self, mod: str, ex, parts: dict) -> None:
        (ka, A), (kb, B) = parts["A"], parts["B"]
        if "M" in parts:
            raise ConvertError(f"{self.f}: '{parts['M'][0]}': DoRA on fused experts (peft refuses it too)")
        cfg, L = self.cfg, int(ex["L"])
        targeted = [p for p in EXPERT_PARAMS if any(t == p or t.endswith("." + p) for t in self.conf.target_parameters)]
        depth = ex["nest"].count(".base_layer")
        if depth >= len(targeted):
            raise ConvertError(f"{self.f}: '{ka}': fused experts at nesting {depth}, but adapter_config.json's "
                               f"target_parameters name {targeted or 'none of'} {list(EXPERT_PARAMS)}")
        param = targeted[len(targeted) - 1 - depth]
        self._want(ka, f"layers.{L}.feed_forward.experts.0.w1.weight")
        E, D, H = cfg.num_experts, cfg.dim, cfg.hidden_dim
        inp, out = (D, 2 * H) if param == "gate_up_proj" else (H, D)
        if A.shape[0] % E:
            raise ConvertError(f"{self.f}: tensor '{ka}' has shape {list(A.shape)}: its {A.shape[0]} rows are not "
                               f"the base's {E} experts times a rank: the adapter was made for another model")
        r = A.shape[0] // E
        self._shape(ka, A, (E * r, inp), f"{param} of layer {L} (LoRA A, {E} experts x rank {r})")
        self._shape(kb, B, (out, r * E), f"{param} of layer {L} (LoRA B, rank {r} x {E} experts)")
        pattern_key = f"model.layers.{L}.mlp.experts.{param}"
        self._check_rank(ka, pattern_key, r)
        scale = self.conf.scale_of(pattern_key, r)
        for e in range(E):
            a = Rows(A, e * r, r, ka)  # A reshaped (E, r, in)[e]
            b = Columns(B, torch.arange(r) * E + e, kb)  # B reshaped (out, r, E)[:, :, e]
            stem = f"layers.{L}.feed_forward.experts.{e}"
            if param == "gate_up_proj":  # expert e's w1 rows over its w3 rows
                self._put(f"{stem}.w1.weight", source=ka, lora=Lora(Rows(b, 0, H), a, scale))
                self._put(f"{stem}.w3.weight", source=ka, lora=Lora(Rows(b, H, H), a, scale))
            else:
                self._put(f"{stem}.w2.weight", source=ka, lora=Lora(b, a, scale))


def apply(ck: Checkpoint, spec) -> Checkpoint:
    """The base `ck` with the adapter at `spec` merged into its canonical tensors (lazily)."""
    d, shown = adapter_config.open_adapter_dir(spec)
    conf = adapter_config.read_config(d, shown)
    f = adapter_config.weights_file(d, shown)
    reading = Reading(ck.cfg, conf, f, load_tensors(f))
    deltas, cfg, tok = reading.deltas, ck.cfg, ck.tok
    if reading.vocab != cfg.vocab_size:
        cfg = replace(cfg, vocab_size=reading.vocab)
    found = d if tokenizer_files.has_hf_pair(d) else tokenizer_files.find(d)
    if found is not None:  # the run's tokenizer (with the tokens it added) comes with the adapter
        tok = TokenizerRef(found)
    known = {Path(str(x)).name.lower() for x in (ck.remote, ck.path) if x}
    if conf.base_model and Path(str(conf.base_model)).name.lower() not in known:
        print(f"warning: {shown}: adapter_config.json names base model '{conf.base_model}', the base is "
              f"{ck.where} (a mirror may rename models: merging anyway)", file=sys.stderr)
    canonical = dict(ck.canonical)
    for name, delta in deltas.items():
        canonical[name] = DeltaMerged(canonical[name], delta, name)
    out = replace(ck, kind="adapter", cfg=cfg, tok=tok, canonical=canonical, files=list(ck.files) + [f, conf.path],
                  sharded=None,
                  label=f"{ck.describe()} + peft LoRA adapter {shown}")
    return out.check()
