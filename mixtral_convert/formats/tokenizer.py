"""The tokenizer beside a checkpoint: a SentencePiece `tokenizer.model`, checked against the
model's vocabulary (Accessory sizes its embedding from the tokenizer)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvertError


def tokenizer_pieces(path: Path) -> int:
    """How many pieces a SentencePiece model has; ConvertError when it is not one."""
    import sentencepiece as spm  # noqa: PLC0415 - imported only when a tokenizer is checked
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).strip()[:120]}); use the "
                           "tokenizer.model released with this checkpoint") from None
