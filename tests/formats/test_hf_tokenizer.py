"""tokenizer.json built from a SentencePiece model encodes exactly as SentencePiece does: the
same ids on a few thousand strings (spaces of every kind, digits, punctuation, CJK, emoji,
characters outside the vocabulary through byte fallback, newlines), for a model trained as
Mistral's are and for the synthetic checkpoints' model (NFKC normalization, extra whitespace
removed, no byte fallback). The model file is read without protobuf; unsupported models are
refused by name."""

import io

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from mixtral_convert.errors import ConvertError
from mixtral_convert.synth import train_tokenizer
from mixtral_convert.tokenizer import hf as H


def sp_of(path):
    return spm.SentencePieceProcessor(model_file=str(path))


def built(path) -> Tokenizer:
    sp = sp_of(path)
    return Tokenizer.from_str(H.tokenizer_json(H.read_model(path), sp.id_to_piece(sp.bos_id()), str(path)).decode())


@pytest.fixture(scope="module")
def synth_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth_tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer(128, seed=1))
    return path


def test_model_file_read_without_protobuf(mixtral_like_tokenizer, synth_tokenizer):
    for path in (mixtral_like_tokenizer, synth_tokenizer):
        sp, m = sp_of(path), H.read_model(path)
        assert len(m.pieces) == sp.get_piece_size()
        for i, (piece, score, kind) in enumerate(m.pieces):
            assert piece == sp.id_to_piece(i) and score == pytest.approx(sp.get_score(i), abs=0)
            assert (kind == H.BYTE, kind == H.CONTROL, kind == H.UNKNOWN) == (sp.is_byte(i), sp.is_control(i),
                                                                             sp.is_unknown(i))
    m = H.read_model(mixtral_like_tokenizer)
    assert (m.model_type, m.byte_fallback, m.charsmap, m.add_dummy_prefix, m.remove_extra_whitespaces) == (
        H.BPE_TYPE, True, b"", True, False)
    s = H.read_model(synth_tokenizer)
    assert (s.byte_fallback, bool(s.charsmap), s.remove_extra_whitespaces) == (False, True, True)


@pytest.mark.parametrize("which", ["mixtral_like", "synth"])
def test_tokenizer_json_encodes_as_sentencepiece(which, mixtral_like_tokenizer, synth_tokenizer, strings):
    path = mixtral_like_tokenizer if which == "mixtral_like" else synth_tokenizer
    sp, tok = sp_of(path), built(path)
    want = sp.encode(strings)
    got = [e.ids for e in tok.encode_batch(strings, add_special_tokens=False)]
    diff = [(s, w, g) for s, w, g in zip(strings, want, got, strict=True) if w != g]
    assert not diff, f"{len(diff)} of {len(strings)} differ, first {diff[0]}"
    # the strings reach every path: byte fallback (or the unknown piece), runs of the space piece
    flat = [i for ids in want for i in ids]
    if which == "mixtral_like":
        assert sum(sp.is_byte(i) for i in flat) > 1000
    else:
        assert flat.count(sp.unk_id()) > 100
    assert len(strings) >= 3000 and any("  " in s for s in strings) and any(s.startswith(" ") for s in strings)
    # with the special tokens: BOS first, as the post-processor adds it
    assert tok.encode("hello world").ids == [sp.bos_id()] + sp.encode("hello world")
    # and back: decoding gives SentencePiece's text (but for the unknown piece, which SentencePiece
    # renders as " \u2047 ")
    if which == "mixtral_like":
        for s in strings[:300]:
            assert tok.decode(sp.encode(s), skip_special_tokens=False) == sp.decode(sp.encode(s)), s


def test_special_pieces_are_added_tokens_and_build_is_deterministic(mixtral_like_tokenizer):
    a, b = (H.tokenizer_json(H.read_model(mixtral_like_tokenizer), "<s>", "t") for _ in range(2))
    assert a == b
    tok = Tokenizer.from_str(a.decode())
    assert tok.encode("<s>[x]</s>", add_special_tokens=False).ids[0] == 1  # a chat template's "<s>" is BOS
    assert tok.get_vocab_size(with_added_tokens=True) == sp_of(mixtral_like_tokenizer).get_piece_size()
    cfg = H.tokenizer_config(H.read_model(mixtral_like_tokenizer), "<s>", "</s>", "<unk>", "{{ x }}")
    assert cfg["tokenizer_class"] == "LlamaTokenizerFast" and cfg["add_bos_token"] and not cfg["add_eos_token"]
    assert {k: cfg["added_tokens_decoder"][k]["content"] for k in ("0", "1", "2")} == {"0": "<unk>", "1": "<s>",
                                                                                       "2": "</s>"}
    assert cfg["chat_template"] == "{{ x }}"


def test_unsupported_models_refused_by_name(tmp_path):
    unigram = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "the quick brown fox"] * 200),
                                   model_writer=unigram, vocab_size=22, model_type="unigram", minloglevel=2,
                                   hard_vocab_limit=False)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(unigram.getvalue())
    with pytest.raises(ConvertError, match=r"tokenizer.model: a unigram SentencePiece model.*tokenizer.json"):
        H.tokenizer_json(H.read_model(path), "<s>", str(path))
    user = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "the quick brown fox"] * 200),
                                   model_writer=user, vocab_size=30, model_type="bpe", minloglevel=2,
                                   user_defined_symbols=["<tool>", "\n", "ab cd"], hard_vocab_limit=False)
    path.write_bytes(user.getvalue())
    # markup such as <tool> becomes an added token; spellings ordinary text holds are refused, with the way out
    with pytest.raises(ConvertError, match=r"2 user-defined piece\(s\) that ordinary text spells \(first '\\n'.*"
                                           r"--tokenizer DIR"):
        H.tokenizer_json(H.read_model(path), "<s>", str(path))
    for junk in (b"", b"\xff\xff\xff", b"not a model at all"):
        path.write_bytes(junk)
        with pytest.raises(ConvertError, match="not a SentencePiece model"):
            H.read_model(path)
