"""verify --forward: the converted layout computes the same model as its source.

The byte check proves every shard holds what the partition table says; it cannot prove the
table is right, because split and merge read the same table (a wrong rule round-trips
perfectly). This check runs the reference forward (reference.py) on the source and the sharded
forward (sharded.py: each rank's share from its own shard, gathered in rank order and summed
as tensor parallelism does) on the shards, over the same tokens, and compares the logits.

Figures: max abs diff = max |sharded - reference|; max rel diff = that divided by
max |reference| (a scale-free figure; element-wise ratios blow up at logits near 0); rms rel
diff = ||sharded - reference|| / ||reference|| (Frobenius); top-1 agreement = fraction of
positions whose most likely next token is the same.
Tolerances (TOLERANCES) depend on the compute dtype: the two forwards do the same arithmetic
in a different order (per-rank partial sums of attention heads and experts, added up), so
they differ by rounding only, which grows with the dtype's epsilon. docs/parity.md gives the
figures measured and the margins chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConvertError
from .inputs import check_device, default_tokens, load_tokens, torch_dtype
from .run import open_model


@dataclass(frozen=True)
class Tolerance:
    max_rel: Optional[float]  # max abs diff <= max_rel * max(1, max |reference logit|) (None: not judged)
    rms_rel: float  # ||sharded - reference|| / ||reference|| <= rms_rel (Frobenius norms)
    top1: float  # top-1 agreement >= top1

    def as_dict(self) -> dict:
        d = {"rms_rel_diff_le": self.rms_rel, "top1_agreement_ge": self.top1}
        if self.max_rel is not None:
            d["max_abs_diff_le"] = f"{self.max_rel:g} * max(1, max|logit|)"
        return d


TOLERANCES = {
    # fp32: rounding only; the bound leaves a wide margin over what was measured (docs/parity.md).
    "float32": Tolerance(max_rel=1e-4, rms_rel=1e-4, top1=0.99),
    # bf16: every partial sum is rounded to 8 bits of mantissa, so a token whose router is near a
    # tie can pick another expert in one forward than in the other: the max diff is then that of
    # a different expert, so it is reported but not judged; the mean error and top-1 are. The
    # bounds are 5x the worst rms and 6x the worst top-1 miss measured on the trained fixture
    # (docs/parity.md, "On the trained fixture"); the random fixtures' rms, 0.02, is inside.
    "bfloat16": Tolerance(max_rel=None, rms_rel=0.03, top1=0.95),
    # float16 (as the shards' storage dtype, after --dtype float16): 3 more mantissa bits than
    # bf16, so an eighth of its bound, judged the same way.
    "float16": Tolerance(max_rel=None, rms_rel=0.004, top1=0.95),
}
LOOSER = ("float32", "float16", "bfloat16")  # by mantissa bits, most to fewest


def tolerance_for(compute: str, stored: Optional[torch.dtype],
                  reference: Optional[torch.dtype]) -> tuple[str, Tolerance]:
    """The tolerance of the compute dtype, or of the shards' storage dtype where --dtype made it
    coarser than the source's: the logits then also differ by the rounding of every weight."""
    name = compute
    if stored is not None and stored != reference:
        stored_name = str(stored).replace("torch.", "")
        if stored_name in LOOSER and LOOSER.index(stored_name) > LOOSER.index(name):
            name = stored_name
    return name, TOLERANCES[name]


@dataclass
class ParityReport:
    dtype: str
    device: str
    tokens_shape: list = field(default_factory=list)
    reference: str = ""
    sharded: str = ""
    max_abs_diff: Optional[float] = None
    max_rel_diff: Optional[float] = None
    rms_rel_diff: Optional[float] = None
    max_abs_logit: Optional[float] = None
    top1_agreement: Optional[float] = None
    tolerance: Optional[Tolerance] = None
    tolerance_dtype: str = ""  # whose tolerance: the compute dtype's, or the shards' storage dtype's
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "dtype": self.dtype, "device": self.device, "tokens_shape": self.tokens_shape,
                "reference": self.reference, "sharded": self.sharded, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "rms_rel_diff": self.rms_rel_diff,
                "max_abs_logit": self.max_abs_logit,
                "top1_agreement": self.top1_agreement,
                "tolerance": self.tolerance.as_dict() if self.tolerance else None,
                "tolerance_dtype": self.tolerance_dtype or self.dtype,
                "problems": self.problems, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        if self.max_abs_diff is None:
            return f"forward ({self.dtype}, {self.device}): not compared"
        judged = (f", judged with the {self.tolerance_dtype} tolerance (the shards' dtype)"
                  if self.tolerance_dtype not in ("", self.dtype) else "")
        return (f"forward ({self.dtype}, {self.device}, tokens {self.tokens_shape}{judged}): max abs diff "
                f"{self.max_abs_diff:.3g} (max |logit| {self.max_abs_logit:.3g}), max rel diff "
                f"{self.max_rel_diff:.3g}, rms rel diff {self.rms_rel_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.4f}")


def compare(ref: torch.Tensor, out: torch.Tensor, rep: ParityReport, tol: Tolerance) -> None:
    """Fill rep's figures from two logit tensors and judge them against tol."""
    if out.shape != ref.shape:
        rep.problems.append(f"the sharded logits have shape {list(out.shape)}, the reference {list(ref.shape)}")
        return
    ref, out = ref.float(), out.float()
    diff = (out - ref).abs()
    scale = ref.abs().max().item()
    rep.max_abs_logit = scale
    rep.max_abs_diff = diff.max().item() if torch.isfinite(diff).all() else float("inf")
    rep.max_rel_diff = rep.max_abs_diff / scale if scale > 0 else rep.max_abs_diff
    norm = ref.norm().item()
    rep.rms_rel_diff = (out - ref).norm().item() / norm if norm > 0 else (out - ref).norm().item()
    rep.top1_agreement = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rep.tolerance = tol
    stored = rep.tolerance_dtype not in ("", rep.dtype)
    within = rep.dtype + (f" (shards stored in {rep.tolerance_dtype})" if stored else "")
    bad = rep.problems.append
    if tol.max_rel is not None:
        bound = tol.max_rel * max(1.0, scale)
        if not rep.max_abs_diff <= bound:
            where = ([int(i) for i in torch.nonzero(diff == diff.max())[0]] if torch.isfinite(diff).all() else "?")
            bad(f"forward: max |sharded - reference| {rep.max_abs_diff:.3g} at [b, s, v] = {where} exceeds "
                f"{bound:.3g} ({tol.max_rel:g} * max(1, max|logit| {scale:.3g})) in {within}: the layout does "
                "not compute the source's model")
    if not rep.rms_rel_diff <= tol.rms_rel:
        bad(f"forward: ||sharded - reference|| / ||reference|| is {rep.rms_rel_diff:.3g}, above {tol.rms_rel:g} in "
            f"{within}: the layout does not compute the source's model")
    if not rep.top1_agreement >= tol.top1:
        bad(f"forward: top-1 agreement {rep.top1_agreement:.3f} is below {tol.top1} in {within}")


def reference_run(source: Path, what: str, tokens_file: Optional[Path], dtype: str, device: str, base=None,
                  adapter=None):
    """What every `verify --forward` starts with: (the report, the source's model computed unmerged,
    the tokens, its logits over them). `what` names the output in the message for a missing source."""
    if source is None:
        raise ConvertError(f"--forward needs --source SRC: the checkpoint whose reference forward the {what} must "
                           "match")
    dt, device = torch_dtype(dtype), check_device(device)
    rep = ParityReport(dtype, device)
    ref_model = open_model(source, dt, device, base=base, unmerged=True, adapter=adapter)
    cfg = ref_model.cfg
    tokens = load_tokens(tokens_file, cfg.vocab_size) if tokens_file else default_tokens(cfg.vocab_size)
    rep.tokens_shape, rep.reference = list(tokens.shape), ref_model.how
    return rep, ref_model, tokens, ref_model.run(tokens)


def parity(shards: Path, source: Path, *, tokens_file: Optional[Path] = None, dtype: str = "float32",
           device: str = "cpu", base=None, adapter=None) -> ParityReport:
    """Reference forward on `source` vs sharded forward on `shards`, over the same tokens.

    Input problems (unreadable source, bad tokens) raise ConvertError; a sharded forward that
    cannot run on what the shards hold (their pieces are not whole head groups or matching FFN
    slices) is a failed check, reported like a numerical mismatch.
    """
    t0 = time.perf_counter()
    rep, ref_model, tokens, ref = reference_run(source, "shards", tokens_file, dtype, device, base, adapter)
    cfg, dt, device = ref_model.cfg, torch_dtype(dtype), rep.device
    try:
        model = open_model(shards, dt, device)
        if not model.sharded:
            raise ConvertError(f"{shards}: not a converted layout directory (no Accessory shard files)")
        if model.cfg != cfg:
            raise ConvertError(f"{shards}: its config differs from the source's")
        rep.sharded = model.how
        out = model.run(tokens)
    except ConvertError as e:
        rep.problems.append(f"forward: {e}")
    else:
        rep.tolerance_dtype, tol = tolerance_for(dtype, model.weights_dtype, ref_model.weights_dtype)
        compare(ref, out, rep, tol)
    rep.seconds = time.perf_counter() - t0
    return rep
