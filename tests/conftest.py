import os
import sys
from pathlib import Path

import pytest
import torch

from mixtral_convert.synth import tiny_config, write_torrent

# shapes that admit N in {1, 2, 4, 8} for both layouts (E, KV, H, V, D all divisible by 8)
WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
# other shapes: 4 experts, KV 2, 3 layers, H 36 (sparse N in {1, 2, 4}), head_dim 16 != dim / heads
ODD = dict(dim=48, hidden_dim=36, n_heads=4, n_kv_heads=2, head_dim=16, num_experts=4, experts_per_tok=1,
           vocab_size=96, n_layers=3, norm_eps=1e-6, rope_theta=5e5)


@pytest.fixture(scope="session")
def wide_src(tmp_path_factory) -> Path:
    return write_torrent(tmp_path_factory.mktemp("wide") / "src", tiny_config(**WIDE), seed=1)


@pytest.fixture(scope="session")
def odd_src(tmp_path_factory) -> Path:
    return write_torrent(tmp_path_factory.mktemp("odd") / "src", tiny_config(**ODD), seed=2)


def cli(*args, capsys=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from mixtral_convert.cli import main
    if capsys is not None:
        capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out if out else ""), (out.err if out else "")


def load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


PY = sys.executable
