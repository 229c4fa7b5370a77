"""bench/gpu_parity.py, the GPU parity check that needs nothing beyond torch, click and sentencepiece: here
on the CPU (the same checks, --device cpu), with the gguf package, pytest, isal, peft and transformers
made unimportable, as on the GPU machine that lacks them."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import WIDE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_parity.py"
BLOCKED = r"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("gguf", "pytest", "isal", "peft", "transformers"):
            raise ImportError("not installed on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(*args):
    return subprocess.run([sys.executable, "-c", BLOCKED, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_the_gpu_script_runs_every_case_without_the_packages_the_gpu_machine_lacks(tmp_path):
    r = run("--device", "cpu", "--skip-full-width", "--out", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu-parity.json").read_text())["rows"]
    assert sorted((x["layout"], x["N"], x["dtype"]) for x in rows) == sorted(
        (lay, N, d) for lay in ("base", "sparse") for N in (1, 2, 4, 8) for d in ("float32", "bfloat16"))
    assert all(x["ok"] for x in rows)
    fp32 = [x for x in rows if x["dtype"] == "float32"]
    assert max(x["max_rel"] for x in fp32) < 1e-4  # sharded and reference compute the same model
    assert "sharded vs reference" in r.stdout and r.stdout.count(" ok\n") + r.stdout.endswith(" ok") >= 16


def test_the_gpu_script_uses_the_tests_model_and_says_when_there_is_no_cuda():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_parity
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert gpu_parity.WIDE == WIDE
    if not torch.cuda.is_available():
        r = run()
        assert r.returncode == 2 and "no CUDA device" in r.stderr, r.stderr
