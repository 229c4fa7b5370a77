"""The k-quants (`--dtype q4_k_m | q5_k_m | q6_k`) through llama.cpp's own quantizer.

The tool writes a temporary GGUF in the source's half type (BF16 for a bfloat16 source, which
holds it exactly; F16 otherwise, under the float16 overflow rule) inside the output's temporary
directory, then llama-cpp-python's `llama_model_quantize` (the quantizer of `llama-quantize`)
writes the k-quant mix from it, and the temporary file is removed; an interrupt or a failure
removes both with the rest of the temporary directory. llama-cpp-python is an optional extra (a
source build): without it the refusal says what to install. The mix (which tensors get Q6_K,
Q4_K, or a fallback type where rows are not whole 256-blocks) is llama.cpp's, so --dry-run gives
a bound for the file (every quantized tensor at Q8_0, more than any k-quant or fallback takes),
not its exact size; the pieces of --max-shard-size are not offered for k-quants.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ...encodings.gguf import file_size
from ...errors import ConvertError
from ...io.manifest import sha256_file
from ..checkpoint import Checkpoint, TargetPlan
from . import write as gguf_write

INSTALL = "pip install 'mixtral-convert[kquants]' (llama-cpp-python, built from source with cmake and a C++ compiler)"


def quantizer():
    """llama_cpp, or the one-line refusal naming what to install."""
    try:
        import llama_cpp  # the optional extra: imported only for a k-quant
    except ImportError:
        raise ConvertError(f"--dtype q4_k_m, q5_k_m and q6_k use llama.cpp's quantizer, which is not installed: "
                           f"{INSTALL}; or use --dtype q8_0") from None
    logger = getattr(llama_cpp, "_logger", None)
    if logger is not None and hasattr(logger, "set_verbose"):
        logger.set_verbose(False)  # llama.cpp's errors only, not its per-tensor log
    return llama_cpp


def _check(dtype: str, max_shard_size: Optional[int]) -> None:
    if max_shard_size:
        raise ConvertError(f"--max-shard-size with --dtype {dtype}: the k-quant file is llama.cpp's; write one file "
                           "and cut it with llama.cpp's gguf-split, or use --dtype q8_0 for pieces")


def _half(ck: Checkpoint) -> str:
    return "bfloat16" if ck.dtype == torch.bfloat16 else "float16"


def plan_kquant(ck: Checkpoint, out_name: str, dtype: str, max_shard_size: Optional[int],
                max_position_embeddings: int, name: Optional[str], chat_template: Optional[str] = None) -> TargetPlan:
    """The temporary half-type GGUF's layout, computed once; the size given is a bound: every quantized
    tensor at Q8_0 (its rows must be whole Q8_0 blocks too)."""
    _check(dtype, max_shard_size)
    llama_cpp = quantizer()
    half = _half(ck)
    inter = f".{out_name}.{half}.gguf"
    lay = gguf_write.file_plan(ck, inter, half, None, max_position_embeddings, name, chat_template)
    (_, meta, tensors), = lay.files
    bounds = gguf_write.gguf_tensors(ck.cfg, ck.canonical, "q8_0", ck.where)
    gguf_write.check_blocks(bounds)
    bound = file_size(meta, [t.info for t in bounds])  # general.file_type is a u32 in either file

    def write(tmp: Path, progress) -> dict[str, dict]:
        gguf_write.write_files(tmp, lay, progress)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf_write.KQUANTS[dtype])
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(tmp / inter).encode(), str(tmp / out_name).encode(), params)
        (tmp / inter).unlink()
        if rc != 0 or not (tmp / out_name).is_file():
            raise ConvertError(f"{out_name}: llama.cpp's quantizer failed ({rc}) making {dtype} from the {half} GGUF")
        return {out_name: {"size": (tmp / out_name).stat().st_size, "sha256": sha256_file(tmp / out_name)}}

    return TargetPlan([(out_name, bound, f"{len(tensors)} tensors, {dtype} (at most this size: the k-quant mix is "
                                         "llama.cpp's)")], write)
