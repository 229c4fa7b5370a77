"""Helpers the tests share (fixtures live in conftest.py)."""

import os
import sys
from pathlib import Path

import torch

from mixtral_convert.encodings.torchzip import write_checkpoint
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes

# shapes that admit N in {1, 2, 4, 8} for both layouts (E, KV, H, V, D all divisible by 8)
WIDE = dict(dim=64, hidden_dim=48, n_heads=16, n_kv_heads=8, head_dim=4, num_experts=8, vocab_size=128, n_layers=2)
# other shapes: 4 experts, KV 2, 3 layers, H 36 (sparse N in {1, 2, 4}), head_dim 16 != dim / heads
ODD = dict(dim=48, hidden_dim=36, n_heads=4, n_kv_heads=2, head_dim=16, num_experts=4, experts_per_tok=1,
           vocab_size=96, n_layers=3, norm_eps=1e-6, rope_theta=5e5)


def cli(*args, capsys=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from mixtral_convert.entry import main
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


def load_lazy(path) -> dict[str, torch.Tensor]:
    """A .pth file's tensors through the package's own reader (torchzip.read_tensors), each read whole."""
    from mixtral_convert.encodings.torchzip import read_tensors
    from mixtral_convert.io.lazy import materialize
    return {k: materialize(v) for k, v in read_tensors(path).items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


PY = sys.executable


def write_pth(path, sd: dict, **kw) -> int:
    """A {name: tensor} dict as a torch zip checkpoint, through the tool's own writer."""
    return write_checkpoint(Path(path), [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                            lambda s: [tensor_bytes(sd[s.name])], **kw)


def cut_bytes(data: bytes, n: int, directory, name_of) -> list:
    """`data` cut into n byte pieces in `directory`, piece i named `name_of(i)` (as a torrent or a
    mirror cuts a checkpoint); the piece paths in order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [len(data) * i // n for i in range(n + 1)]
    pieces = []
    for i in range(n):
        p = directory / name_of(i)
        p.write_bytes(data[bounds[i]:bounds[i + 1]])
        pieces.append(p)
    return pieces


def greedy(cfg, weights, tokenizer, text: str, k: int, forward_fn=None):
    """(new ids, their text): `text` continued greedily by k tokens, as `forward --prompt` does it
    (forward.job.compute), with the reference forward over `weights` or `forward_fn`."""
    from mixtral_convert.forward.job import Job, compute
    from mixtral_convert.forward.reference import forward
    run = forward_fn or (lambda t: forward(cfg, weights, t))
    res = compute(Job("", prompt=text, new_tokens=k), cfg, run, Path(tokenizer))
    return res.new, res.text


HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache, repo, files: dict, sha=HUB_SHA, ref="main"):
    """A repository in huggingface_hub's cache layout: blobs, snapshots/SHA/... symlinks, refs/REF."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, path in files.items():
        blob = root / "blobs" / f"{sha[:8]}-{name}"
        blob.write_bytes(path.read_bytes())
        (snap / name).symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    return snap

