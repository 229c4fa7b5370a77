"""The streaming writer produces files that torch, zipfile and unzip all accept."""

import shutil
import subprocess
import zipfile

import pytest
import torch
from helpers import load_lazy

import mixtral_convert.encodings.torchzip as tf
from mixtral_convert.io.lazy import TensorSpec, tensor_bytes


def _write(path, sd):
    return tf.write_checkpoint(path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                               lambda s: [tensor_bytes(sd[s.name])])


def _sample():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(33, 7, generator=g).to(torch.bfloat16),
            "b": torch.randn(5, generator=g), "c": torch.randint(0, 9, (4, 3), generator=g),
            "d": torch.randn(2, 3, 4, generator=g).half()}


@pytest.mark.parametrize("zip64", [False, True])
def test_written_file_loads_everywhere(tmp_path, monkeypatch, zip64):
    if zip64:  # force the zip64 records (sizes/offsets >= 4 GiB) on a small file
        monkeypatch.setattr(tf, "ZIP64_LIMIT", 64)
    sd = _sample()
    p = tmp_path / "x.pth"
    size = _write(p, sd)
    assert size == p.stat().st_size
    for mmap in (False, True):
        back = torch.load(p, weights_only=True, mmap=mmap)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None  # every CRC-32 is right
    for r in tf.zip_records(p):
        assert r.data_offset % 64 == 0
    if shutil.which("unzip"):
        assert subprocess.run(["unzip", "-tq", str(p)], capture_output=True).returncode == 0


def test_pickle_is_torchs_own(tmp_path):
    sd = _sample()
    _write(tmp_path / "ours.pth", sd)
    torch.save(sd, tmp_path / "theirs.pth")
    ours = zipfile.ZipFile(tmp_path / "ours.pth").read("archive/data.pkl")
    theirs = zipfile.ZipFile(tmp_path / "theirs.pth").read("theirs/data.pkl")
    assert ours == theirs


def test_hasher_sees_the_whole_file(tmp_path):
    import hashlib
    h = hashlib.sha256()
    sd = _sample()
    tf.write_checkpoint(tmp_path / "x.pth", [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()],
                        lambda s: [tensor_bytes(sd[s.name])], hasher=h)
    assert h.hexdigest() == hashlib.sha256((tmp_path / "x.pth").read_bytes()).hexdigest()


def test_wrong_byte_count_is_an_error(tmp_path):
    with pytest.raises(AssertionError):
        tf.write_checkpoint(tmp_path / "x.pth", [TensorSpec("a", (4,), torch.float32)], lambda s: [b"123"])


def test_load_lazy_refuses_non_checkpoints(tmp_path):
    from mixtral_convert.errors import ConvertError
    (tmp_path / "t.pth").write_bytes(b"hello")
    with pytest.raises(ConvertError, match="not a torch zip checkpoint"):
        load_lazy(tmp_path / "t.pth")
    torch.save({"a": 1}, tmp_path / "n.pth")
    with pytest.raises(ConvertError, match="not a tensor"):
        load_lazy(tmp_path / "n.pth")
    torch.save({"model": {"x": torch.ones(2)}}, tmp_path / "m.pth")
    assert list(load_lazy(tmp_path / "m.pth")) == ["x"]


def _producer_threads():
    import threading
    return [t for t in threading.enumerate() if "produce" in t.name and t.is_alive()]


def test_file_producer_streams_every_tensor_in_order_through_one_worker(tmp_path):
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.io.prefetch import file_producer
    from mixtral_convert.io.progress import Progress
    sd = _sample()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    before = len(_producer_threads())
    with file_producer(specs, lambda s: Stored(sd[s.name], s.name), Progress()) as produce:
        tf.write_checkpoint(tmp_path / "x.pth", specs, produce)
        assert len(_producer_threads()) <= before + 1  # one worker for the whole file
    back = torch.load(tmp_path / "x.pth", weights_only=True)
    for k, v in sd.items():
        assert torch.equal(back[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert len(_producer_threads()) == before  # joined on the way out


def test_file_producer_joins_its_worker_when_the_writer_fails(tmp_path):
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.io.prefetch import file_producer
    from mixtral_convert.io.progress import Progress
    sd = _sample()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    before = len(_producer_threads())
    with pytest.raises(KeyboardInterrupt):
        with file_producer(specs, lambda s: Stored(sd[s.name], s.name), Progress()) as produce:
            for _ in produce(specs[0]):
                raise KeyboardInterrupt  # as Ctrl-C lands in the writer, mid-tensor
    assert len(_producer_threads()) == before  # no worker left inside a torch kernel at exit


def test_file_producer_refuses_blocks_of_another_tensor():
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.io.prefetch import file_producer
    from mixtral_convert.io.progress import Progress
    sd = _sample()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with file_producer(specs, lambda s: Stored(sd[s.name], s.name), Progress()) as produce:
        with pytest.raises(AssertionError, match="asked for b but the blocks are a.weight's"):
            list(produce(specs[1]))  # a writer that skipped a tensor gets no wrong bytes


def test_prefetch_worker_never_blocks_on_a_full_queue_after_the_consumer_left():
    """The worker has produced its last block and the queue is full when the consumer stops
    (Ctrl-C at the end of a file): closing must still join it, not wait forever."""
    import threading
    from contextlib import closing

    from mixtral_convert.io.prefetch import prefetched
    finished = threading.Event()

    def blocks():
        yield torch.zeros(4)
        yield torch.zeros(4)  # fills the queue (depth 1) while the consumer holds the first
        finished.set()

    done = threading.Event()

    def consume():
        with closing(prefetched(blocks(), depth=1)) as it:
            next(it)
            assert finished.wait(10)  # the worker is now past its last block, queue full
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(20)
    assert done.is_set(), "closing() hung joining a worker stuck on a full queue"
