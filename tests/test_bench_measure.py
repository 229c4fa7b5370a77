"""bench.measure counts the memory the tool holds in shared anonymous mappings (its block pool,
io/buffers.py: Linux reports them under RssShmem, not RssAnon), so a bound on peak memory is checked
against all of it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

CHILD = """
import mmap, time
buf = mmap.mmap(-1, 96 << 20)  # shared anonymous, as the block pool maps its buffers
for i in range(0, len(buf), 4096):
    buf[i] = 1
time.sleep(0.5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_counts_shared_anonymous_mappings():
    from bench import measure
    r = measure([sys.executable, "-c", CHILD])
    assert r["peak_anon_bytes"] >= 96 << 20, r["peak_anon_bytes"] >> 20
    assert r["peak_anon_bytes"] < 400 << 20  # the mapping, the interpreter; nothing counted twice
