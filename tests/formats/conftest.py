"""Fixtures of the HF tokenizer and repository tests: a SentencePiece model trained with the
settings of Mistral's tokenizer.model (BPE, byte fallback, "identity" normalization, whitespace
kept as it is, digits split), and the strings every tokenizer.json must encode as it does."""

import io
import random
from pathlib import Path

import pytest

VOCAB = 1024
WORDS = ["hello", "world", "the", "quick", "brown", "fox", "mixtral", "expert", "layer", "token", "北京", "東京",
         "你好", "世界", "こんにちは", "😀", "🚀", "café", "naïve", "Привет", "мир", "데이터", "x=1;", "(a,b)",
         "foo_bar", "don't", "e.g.", "3.14", "#include", "<b>", "--", "...", "\t"]


def train_mixtral_like(vocab_size: int = VOCAB, seed: int = 0) -> bytes:
    import sentencepiece as spm
    rng = random.Random(seed)
    words = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                     for _ in range(1500)]
    lines = []
    for _ in range(6000):
        s = " ".join(rng.choice(words) + (str(rng.randint(0, 9999)) if rng.random() < 0.2 else "")
                     for _ in range(rng.randint(1, 12)))
        lines.append(("  " if rng.random() < 0.3 else "") + s + ("\n" if rng.random() < 0.1 else ""))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, hard_vocab_limit=True, minloglevel=2)
    return model.getvalue()


def probe_strings(n: int = 3000, seed: int = 7) -> list[str]:
    """Hand-picked edge cases, then n random strings: words joined by runs of spaces, with leading
    and trailing spaces, newlines and tabs; digits and punctuation; CJK, emoji and accents (some
    in the vocabulary, most not: byte fallback); any code point of the BMP and beyond; NFKC-
    sensitive characters; U+2581 itself. None holds a control piece's text (<s>, </s>, <unk>),
    which an HF tokenizer reads as that special token where SentencePiece spells it out."""
    rng = random.Random(seed)
    fixed = ["", " ", "  ", "   ", "\n", " \n ", "\t", "a", " a", "a ", "  a  b  ", "hello world", " hello",
             "hello  world", "hello\nworld", "\n\nhello", "12345", "3.14159", "1 2  3", "❤️", "👩‍👩‍👧", "𝔘𝔫𝔦",
             "\u2581", "\u2581hello", "hello\u2581", "ﬁ ① Ａ ｶ", "e\u0301", "\u00a0x\u3000y", "\u200b", "\r\n",
             "北京欢迎你", "Grüße, Jürgen!", "¿Qué?", "«ok»", "🚀🚀🚀", "\x00", "\x7f\x1b", "\ud7ff\ue000\uffff"]
    pools = [
        lambda: rng.choice(WORDS),
        lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 10))),
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
        lambda: "".join(rng.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 4))),  # CJK
        lambda: "".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(rng.randint(1, 3))),  # emoji
        lambda: "".join(chr(rng.randint(0xC0, 0x24F)) for _ in range(rng.randint(1, 4))),  # accents
        lambda: "".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                        for _ in range(rng.randint(1, 3))),  # anything
    ]
    out = list(fixed)
    while len(out) < len(fixed) + n:
        parts = [rng.choice(pools)() for _ in range(rng.randint(1, 8))]
        s = "".join(rng.choice([" ", " ", " ", "  ", "   ", "\n", "\t", ""]) + p for p in parts)
        s = s + rng.choice(["", "", " ", "  ", "\n"])
        if not any(t in s for t in ("<s>", "</s>", "<unk>")):
            out.append(s)
    return out


@pytest.fixture(scope="session")
def mixtral_like_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixtral_tok") / "tokenizer.model"
    path.write_bytes(train_mixtral_like())
    return path


@pytest.fixture(scope="session")
def strings() -> list[str]:
    return probe_strings()
