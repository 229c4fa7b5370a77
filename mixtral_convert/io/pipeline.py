"""The byte pipeline's pieces, shared by every writer: `write_all` (the one loop that writes a
buffer to a file descriptor, however short the kernel's writes) and `Worker` (a thread applying
`work` to each buffer it is handed, in order: a hash, a CRC, a write, so that they run beside the
thread producing the bytes; zlib, hashlib and os.write release the GIL on large buffers), and
`HashBeside` (a hash fed through such a thread, for a writer that takes a `hasher`)."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Optional


def write_all(fd: int, data) -> int:
    """Write every byte of `data` to `fd`; returns the count."""
    view = memoryview(data).cast("B")
    total = view.nbytes
    while view.nbytes:
        view = view[os.write(fd, view):]
    return total


class Worker(threading.Thread):
    """Applies `work(view)` to each buffer `put` to it, in order, on its own thread, and then calls
    `done(token)` (when given). After a failure (kept in `error`, raised by `wait`) or `halt()` it
    skips the work but still reports each buffer done, so that a producer waiting to reuse a
    buffer never waits forever. The queue keeps each buffer alive until it has been handled;
    `maxsize` bounds how far the producer may run ahead."""

    def __init__(self, work: Callable[[memoryview], Any], name: str = "worker",
                 done: Optional[Callable[[Any], None]] = None, maxsize: int = 0):
        super().__init__(name=name, daemon=True)
        self.work, self.done = work, done
        self.error: Optional[BaseException] = None
        self.halted = False
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.start()

    def put(self, view, token: Any = None) -> None:
        self.q.put((view, token))

    def run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                view, token = item
                try:
                    if self.error is None and not self.halted:
                        self.work(view)
                except BaseException as e:  # surfaced to the producer by wait() / error
                    self.error = e
                if self.done is not None:
                    self.done(token)
            finally:
                self.q.task_done()

    def wait(self) -> None:
        """Until every buffer put so far is handled; raises the first failure."""
        self.q.join()
        if self.error is not None:
            raise self.error

    def halt(self) -> None:
        self.halted = True

    def close(self, timeout: Optional[float] = None) -> None:
        self.q.put(None)
        self.join(timeout)


class HashBeside:
    """A hashlib object (`h`) fed on a `Worker` thread of its own: `update` queues the buffer and
    returns, so that hashing (SHA-256, for the manifest) runs beside the thread that writes the
    same bytes instead of before it; at most `depth` buffers wait. The caller leaves each buffer
    unchanged until it is hashed (a fresh block, as the writers hand over). `hexdigest` waits for
    every queued buffer (and raises a failure of the thread); `close` stops the thread."""

    def __init__(self, h, depth: int = 4):
        self.h = h
        self._worker = Worker(h.update, f"hash-{h.name}", maxsize=depth)

    def update(self, data) -> None:
        self._worker.put(data)

    def hexdigest(self) -> str:
        self._worker.wait()
        return self.h.hexdigest()

    def close(self) -> None:
        self._worker.halt()
        self._worker.close()

    def __enter__(self) -> "HashBeside":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
