"""Fixtures of the GGUF tests (the checkpoints are described in gguf_cases.py)."""

import json
from pathlib import Path

import pytest
import torch
from gguf_cases import SHAPE_7B, SHAPE_22B, make_source, merge_gguf
from helpers import cli, load


@pytest.fixture(scope="session")
def src7(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("g7") / "mixtral-7b-tiny", SHAPE_7B, seed=21)


@pytest.fixture(scope="session")
def src22(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("g22") / "mixtral-22b-tiny", SHAPE_22B, seed=22)


@pytest.fixture(scope="session")
def sparse4(src7, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gsparse") / "sparse4"
    assert cli("split-sparse", src7, "-n", 4, "-o", d, "-q")[0] == 0
    return d


@pytest.fixture(scope="session")
def finetune(src7, tmp_path_factory) -> Path:
    """What LLaMA2-Accessory writes after finetuning (docs/formats.md, "Accessory finetune outputs")."""
    epoch = tmp_path_factory.mktemp("gft") / "output" / "epoch0"
    assert cli("split", src7, "-n", 2, "-o", epoch, "-q")[0] == 0
    (epoch / "mixtral-convert-manifest.json").unlink()  # Accessory writes none
    for f in sorted(epoch.glob("*.model.pth")):
        torch.save({"model": {k: v.float() for k, v in load(f).items()}}, f)
        torch.save({"optimizer": {"step": torch.tensor(3)}}, f.with_name(f.name.replace(".model.", ".optimizer.")))
    cfg = json.loads((epoch / "config.json").read_text())
    cfg.update(max_seq_len=4096, max_batch_size=32, load_balancing_weight=0.1, rope_scaling=None)
    (epoch / "config.json").write_text(json.dumps(cfg))
    return epoch


@pytest.fixture(scope="session")
def ggufs(src7, tmp_path_factory):
    """`src7` as GGUF in every type the tool writes itself: {dtype: path}."""
    d = tmp_path_factory.mktemp("gout")
    return {t: merge_gguf(src7, d / f"m-{t}.gguf", t) for t in ("float32", "float16", "bfloat16", "q8_0")}
