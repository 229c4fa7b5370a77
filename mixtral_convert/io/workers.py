"""The threads the CPU-bound arithmetic is spread over (LoRA merges; Q8_0 only reads the count): as many as
torch's intra-op thread count (the cores, or OMP_NUM_THREADS), from one pool kept for the process.
torch and numpy release the GIL in the work they are given, so the threads run in parallel."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def workers() -> int:
    """How many threads to spread over: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def executor(n: int) -> ThreadPoolExecutor:
    """A pool of at least n threads, one kept for the process and made with `workers()` threads or n if
    more, so that in a run it is never replaced while another thread submits to it (only a caller asking
    for more threads than `workers()`, as the tests do, replaces it; its submitted work still runs)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            size = max(n, workers())
            _pool, _pool_size = ThreadPoolExecutor(max_workers=size, thread_name_prefix="mixtral-convert"), size
        return _pool
