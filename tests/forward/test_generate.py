"""forward --prompt's greedy continuation (forward.job.compute) with a real SentencePiece model, against
transformers' greedy generate on the same random weights."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from mixtral_convert.errors import ConvertError

spm = pytest.importorskip("sentencepiece")

pytest.importorskip("transformers")

from hf_tiny import canonical_from_hub, hf_model, hub_state_dict, tiny_cfg  # noqa: E402

TEXT = ("the quick brown fox jumps over the lazy dog. a mixture of experts routes every token "
        "to two of eight feed forward networks. tensor parallel ranks hold slices of each weight. ") * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return d / "tok.model"


def test_greedy_matches_transformers_generate(tokenizer):
    cfg = tiny_cfg(vocab_size=60)
    model = hf_model(cfg, seed=3)
    W = canonical_from_hub(hub_state_dict(model, cfg), cfg)
    new, text = greedy(cfg, W, tokenizer, "the lazy fox", 5)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    prompt = torch.tensor([[sp.bos_id()] + sp.encode("the lazy fox")])
    hf = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                        attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert new == hf[0, prompt.shape[1]:].tolist()
    assert text == sp.decode(new)


def test_vocab_mismatch_is_refused(tokenizer):
    cfg = tiny_cfg(vocab_size=61)
    with pytest.raises(ConvertError, match="60 pieces"):
        greedy(cfg, {}, tokenizer, "x", 1)
