"""What the registry knows of GGUF, without importing the gguf package: the reader (a .gguf file and
its gguf-split pieces) and the merge target, whose work is done by `source` and `target`, imported
when a GGUF is read or written. So every other format and command runs where the gguf package is not
installed (a machine with torch alone, as the GPU parity check needs)."""

from __future__ import annotations

from ..checkpoint import Reader, Target, TargetOption
from ..hf import CHAT_TEMPLATE_OPTION, CONTEXT_OPTION, parse_size

# --dtype of `merge --to gguf` (formats.gguf.write.DTYPES, the same names in the same order: a test checks it)
DTYPES = ("float32", "float16", "bfloat16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


def _open(path, names):
    from .source import open_source
    return open_source(path)


def _plan(ck, **options):
    from .target import plan
    return plan(ck, **options)


def _prepare(ck, options):
    from .write import prepare
    return prepare(ck, options)


READER = Reader("gguf", "a .gguf file (and its gguf-split pieces)", single_file=True,
                claims=lambda path, _: path.name.endswith(".gguf"), open=_open)

TARGET = Target(
    "gguf", ".gguf", _plan, prepare=_prepare, dtypes=DTYPES, applies_dtype=True, output="file",
    help="one GGUF file for llama.cpp, Ollama and LM Studio (-o PATH.gguf; --dtype q8_0 and the k-quants too)",
    options=(TargetOption("--max-shard-size", "max_shard_size", metavar="SIZE", parse=parse_size,
                          help="cut the file into PATH-00001-of-0000K.gguf pieces of at most SIZE, as llama.cpp's "
                               "gguf-split does (default: one file)."),
             CONTEXT_OPTION,
             TargetOption("--name", "name", metavar="NAME",
                          help="general.name (default: the source's directory or hub repository)."),
             CHAT_TEMPLATE_OPTION))
