"""llama.cpp as the judge, run in a child process: what the GGUF tests and bench/lossy_figures.py ask of
llama-cpp-python (logits of token rows, tokenizations, the build's system info).

Each request runs in a fresh `python llama_judge.py REQUEST OUT` child, so that a crash inside llama.cpp
(a segfault, an abort) is reported as one `LlamaCrashed` error naming the GGUF file and what was being
judged, and the test that asked fails alone: the pytest run goes on.

Models are loaded without llama.cpp's extra buffer types (`use_extra_bufts = False`, what `llama-cli
--no-repack` sets): on CPUs with AMX, the AMX buffer type crashes in `ggml_backend_amx_mul_mat` on small
2-D Q8_0 weights (llama.cpp issue 20824, open). The extra buffer types only repack weights for other
kernels; on this project's CI host (no AMX) the figures with and without them were compared equal
(docs/parity.md). The KV cache is float32 (type_k = type_v = 0): the default f16 cache alone moves
logits by ~6e-4 relative.

MIXTRAL_CONVERT_JUDGE_CRASH=1 makes the child fault on purpose (a real SIGSEGV, after the model is
loaded, where an evaluation would run): the test of the isolation itself uses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TIMEOUT_S = 600


class LlamaError(RuntimeError):
    """llama.cpp refused the request (e.g. a GGUF it cannot load): the child's Python error, in one line."""


class LlamaCrashed(LlamaError):
    """llama.cpp ended the child process abnormally (a signal, or an exit without a result)."""


def require_llama() -> None:
    """At a test module's top: skip it when llama_cpp is not importable (`make test` on a fresh machine),
    unless MIXTRAL_CONVERT_LLAMA=required (`make test-llama`, which builds it first), where that fails."""
    import importlib.util

    import pytest
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("MIXTRAL_CONVERT_LLAMA") == "required":
            raise ImportError("llama_cpp is required (MIXTRAL_CONVERT_LLAMA=required) but not installed")
        pytest.skip("llama-cpp-python is not installed (make test-llama builds it)", allow_module_level=True)


def _run(request: dict, what: str, read):
    """Runs one request in a child and returns read(folder of its results), or raises LlamaCrashed."""
    with tempfile.TemporaryDirectory(prefix="llama-judge-") as tmp:
        out = Path(tmp)
        (out / "request.json").write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, __file__, str(out / "request.json"), str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        if (out / "error.txt").exists():
            raise LlamaError(f"llama.cpp refused {Path(request['model']).name} ({what}): "
                             + (out / "error.txt").read_text())
        if proc.returncode != 0 or not (out / "done").exists():
            rc = proc.returncode
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise LlamaCrashed(f"llama.cpp died ({how}) judging {Path(request['model']).name} ({what}): {tail}")
        return read(out)


def logits(path, rows: list[list[int]], what: str) -> np.ndarray:
    """llama.cpp's float32 logits [len(rows), T, V] for each row of tokens, each from a fresh context."""
    return _run({"op": "logits", "model": str(path), "rows": rows}, what, lambda out: np.load(out / "logits.npy"))


def tokenize(path, texts: list[str], what: str, add_bos: bool = True, special: bool = False) -> dict:
    """{"ids": one id list per text, "bos": bos id, "eos": eos id, "text": the detokenized ids} (vocab only)."""
    req = {"op": "tokenize", "model": str(path), "texts": texts, "add_bos": add_bos, "special": special}
    return _run(req, what, lambda out: json.loads((out / "tokens.json").read_text()))


def system_info() -> str:
    """The llama.cpp build's system info line (AMX_INT8 = 1 where the AMX path is built in)."""
    return _run({"op": "info", "model": ""}, "system info", lambda out: (out / "info.txt").read_text())


# ---- the child ----

def _load(llama_cpp, path: str, n_ctx: int = 512, vocab_only: bool = False):
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def no_extra_bufts():  # llama.cpp issue 20824: no AMX (or other repacking) buffer types
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_extra_bufts
    try:
        return llama_cpp.Llama(model_path=path, logits_all=not vocab_only, n_ctx=n_ctx, n_batch=512, n_threads=2,
                               type_k=0, type_v=0, vocab_only=vocab_only, verbose=False)
    finally:
        lib.llama_model_default_params = default


def _child(request_file: str, out_dir: str) -> None:
    import ctypes

    import llama_cpp
    req = json.loads(Path(request_file).read_text())
    out = Path(out_dir)
    if req["op"] == "info":
        (out / "info.txt").write_text(llama_cpp.llama_print_system_info().decode())
    elif req["op"] == "logits":
        rows = req["rows"]
        llm = _load(llama_cpp, req["model"], n_ctx=max(len(r) for r in rows) + 8)
        if os.environ.get("MIXTRAL_CONVERT_JUDGE_CRASH") == "1":
            ctypes.string_at(0)  # a real segfault, where llama.cpp's evaluation would run
        got = []
        for row in rows:
            llm.reset()
            llm.eval(row)
            got.append(np.array(llm.scores[:len(row)], dtype=np.float32))
        llm.close()
        np.save(out / "logits.npy", np.stack(got))
    elif req["op"] == "tokenize":
        llm = _load(llama_cpp, req["model"], vocab_only=True)
        ids = [llm.tokenize(t.encode("utf-8"), add_bos=req["add_bos"], special=req["special"]) for t in req["texts"]]
        text = [llm.detokenize(i).decode("utf-8", errors="replace") for i in ids]
        result = {"ids": ids, "bos": llm.token_bos(), "eos": llm.token_eos(), "text": text}
        llm.close()
        (out / "tokens.json").write_text(json.dumps(result))
    else:
        raise SystemExit(f"unknown request {req['op']!r}")
    (out / "done").touch()


if __name__ == "__main__":
    try:
        _child(sys.argv[1], sys.argv[2])
    except Exception as e:  # a refusal (llama-cpp-python raises ValueError for a model it cannot load)
        (Path(sys.argv[2]) / "error.txt").write_text(f"{type(e).__name__}: {e}")
        sys.exit(3)
