"""The options of the commands, one small frozen object per family, built by the CLI (cli.py) and
passed whole, so that no operation takes a long list of parameters:

- `SourceOptions`: how a source is read (--base, --adapter, --tokenizer, --dequantize), for every
  command that reads one;
- `OutputOptions`: where and how an output is written (-o, --force, -q, --dry-run, --dtype as a cast,
  --drop-biases), for split, split-sparse and merge;
- `SplitOptions`: the layout and what split writes of it (-n, --ranks, --format, --write-ranks);
- `MergeOptions`: the target (--to), the targets' own options (formats.checkpoint.TargetOption, as
  text), and --convert-mixed-experts for a restack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..formats.checkpoint import Checkpoint
from ..formats.registry import open_checkpoint


@dataclass(frozen=True)
class SourceOptions:
    base: Optional[str] = None  # the model a trainable-only PEFT save was trained from
    adapter: Optional[str] = None  # an HF PEFT adapter merged as the source is read
    tokenizer: Optional[str] = None  # the tokenizer when the source has none (or another)
    dequantize: bool = False  # a quantized GGUF may be written from, dequantized

    def open(self, path) -> Checkpoint:
        """The checkpoint at `path` with its base and adapter (the tokenizer and --dequantize are the
        writing commands' to apply: commands.common.use_tokenizer, formats.gguf.dequant.settle)."""
        return open_checkpoint(path, base=self.base, adapter=self.adapter)


@dataclass(frozen=True)
class OutputOptions:
    out: Optional[Path] = None  # None: the command's default beside the source
    force: bool = False
    quiet: bool = False
    dry_run: bool = False
    dtype: Optional[str] = None  # cast what is written (None: the source's dtype)
    drop_biases: bool = False


@dataclass(frozen=True)
class SplitOptions:
    layout: str  # "base" or "sparse"
    world_size: int
    ranks: Optional[tuple[int, ...]] = None  # only these ranks' shards (None: all, or torchrun's share)
    fmt: str = "pth"  # "pth" or "safetensors"
    write_ranks: str = "auto"  # "auto", "together" or "in-turn"


@dataclass(frozen=True)
class MergeOptions:
    to: str = "torrent"
    target_options: dict[str, Optional[str]] = field(default_factory=dict)  # dest -> text as given, None if not
    convert_mixed_experts: Optional[str] = None
