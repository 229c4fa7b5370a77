"""`verify` as the command line runs it: the byte checks of an Accessory directory (commands.verify) or
of a GGUF file (commands.verify_gguf), then, with --forward, the parity of the forwards
(forward.parity, forward.gguf_parity), in one verdict that prints itself and gives the exit code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConvertError
from ..formats.registry import is_kind
from .options import SourceOptions


@dataclass(frozen=True)
class ForwardCheck:
    """--forward: the tokens (None: seeded random) and where and in what the forwards compute."""

    tokens_file: Optional[Path] = None
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class Verdict:
    report: object  # commands.verify.Report
    forward: Optional[object] = None  # forward.parity.ParityReport

    def lines(self, as_json: bool) -> tuple[list[str], list[str]]:
        """(what to print on stdout, the problems: the first is the headline, none when all is equal)."""
        return self.report.lines(self.forward, as_json)


def verify(shards: Path, against: Optional[Path], source: SourceOptions, forward: Optional[ForwardCheck] = None,
           quiet: bool = False) -> Verdict:
    """Prove `shards` (a directory or a .gguf) is `against` (None: its manifest), and with `forward`
    that it computes what `against` computes."""
    from ..forward.parity import parity
    from .verify import verify as check
    if is_kind(shards, "gguf"):  # a GGUF output: a file, with its own checks and forward
        from ..forward.gguf_parity import gguf_parity as parity
        from .verify_gguf import verify_gguf as check
    if forward is not None and against is None:  # refused before anything is hashed
        raise ConvertError("--forward needs --source SRC: the checkpoint whose reference forward the shards must match")
    rep = check(shards, against, quiet=quiet, base=source.base, adapter=source.adapter)
    fwd = None
    if forward is not None:
        fwd = parity(shards, against, tokens_file=forward.tokens_file, dtype=forward.dtype, device=forward.device,
                     base=source.base, adapter=source.adapter)
    return Verdict(rep, fwd)
