"""Mixtral's own tokenizers (tests/real_tokenizers.py: mistral_common's v1 and v3 files) through
`merge --to hf`, judged by transformers' AutoTokenizer against SentencePiece, id for id, on the
corpus: the v1 torrent (Mixtral-8x7B) and the v3 `.tar` download (Mixtral-8x22B-v0.3, whose 20
user-defined pieces were refused before). And `--chat-template FILE`, for the instruct downloads
that ship no template: it reaches tokenizer_config.json (and GGUF's metadata), [INST] and [/INST]
come out as single special ids, and without it no template is written."""

import json

import pytest
import sentencepiece as spm
from gguf import GGUFReader
from helpers import cli
from real_tokenizers import (
    CHAT,
    CHAT_TEXT,
    CONTEXT,
    TEMPLATE,
    VOCAB,
    added_spellings,
    corpus_lines,
    held_out_count,
    model_path,
    parts_reference,
    release,
    spelled_lines,
)
from transformers import AutoTokenizer

from mixtral_convert.tokenizer import hf as H


@pytest.fixture(scope="module", params=["v1", "v3"])
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"real-{request.param}")
    src = release(d, request.param)
    code, _, err = cli("merge", src, "--to", "hf", "-o", d / "hf", "--max-position-embeddings", CONTEXT, "-q")
    assert code == 0, err
    return request.param, src, d / "hf"


def test_hf_tokenizer_gives_sentencepieces_ids(converted):
    name, _, out = converted
    path = model_path(name)
    sp, tok = spm.SentencePieceProcessor(model_file=str(path)), AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB[name] == sp.get_piece_size()
    # ordinary text: the corpus, every line SentencePiece's ids; BOS first when special tokens are added
    lines = list(corpus_lines())
    assert len(lines) >= 300 + held_out_count() * 0.95
    want = sp.encode(lines)
    got = tok(lines, add_special_tokens=False)["input_ids"]
    diff = [(s, w, g) for s, w, g in zip(lines, want, got, strict=True) if w != g]
    assert not diff, f"{len(diff)} of {len(lines)} lines differ, first {diff[0]}"
    assert tok(lines[:50])["input_ids"] == [[sp.bos_id()] + w for w in want[:50]]
    assert tok.batch_decode(got[:500]) == sp.decode(want[:500])
    flat = {i for ids in want for i in ids}
    assert sum(sp.is_byte(i) for i in flat) >= 50  # byte fallback reached, many bytes
    # text with the added tokens' spellings: control (and <unk>) special, user-defined not; each part between
    # them SentencePiece's ids for that part
    user = added_spellings(path, (H.USER_DEFINED,))
    added = added_spellings(path, (H.CONTROL, H.UNKNOWN, H.USER_DEFINED))
    assert len(user) == {"v1": 0, "v3": 20}[name] and len(added) == {"v1": 3, "v3": 771}[name]
    for piece, i in user.items():  # SentencePiece itself emits each user-defined piece whole
        assert sp.encode(piece) == [sp.piece_to_id("\u2581"), i], piece
    spelled = spelled_lines(sorted(added))
    got = tok(spelled, add_special_tokens=False)["input_ids"]
    want = [parts_reference(sp, s, added) for s in spelled]
    diff = [(s, w, g) for s, w, g in zip(spelled, want, got, strict=True) if w != g]
    assert not diff, f"{len(diff)} of {len(spelled)} lines differ, first {diff[0]}"
    kinds = {i: t.special for i, t in tok.added_tokens_decoder.items()}
    assert kinds == {i: s not in user for s, i in added.items()}
    if user:
        # the documented difference: SentencePiece does not cut the text at a user-defined piece, so the text
        # after it has no dummy prefix there (and text starting with one has it before the piece)
        only_user = spelled_lines(sorted(user), n=200)
        whole = sum(sp.encode(s) != parts_reference(sp, s, user) for s in only_user)
        print(f"{name}: {whole} of {len(only_user)} lines with a user-defined spelling differ from SentencePiece "
              "encoding the whole line")
        assert 0 < whole <= len(only_user)


def test_chat_template_given_for_a_download_without_one(tmp_path, capsys):
    src = release(tmp_path, "v3")  # the .tar: tokenizer.model.v3, no tokenizer_config.json
    sp = spm.SentencePieceProcessor(model_file=str(model_path("v3")))
    inst, end = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
    # without the option no template is written, to HF or to GGUF
    code, _, err = cli("merge", src, "--to", "hf", "-o", tmp_path / "plain", "--max-position-embeddings", CONTEXT,
                       "-q")
    assert code == 0, err
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
    code, _, err = cli("merge", src, "--to", "gguf", "-o", tmp_path / "plain.gguf", "--max-position-embeddings",
                       CONTEXT, "-q")
    assert code == 0, err
    assert "tokenizer.chat_template" not in GGUFReader(tmp_path / "plain.gguf").fields
    # with it: the file's text, byte for byte, in tokenizer_config.json and in the GGUF
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    code, _, err = cli("merge", src, "--to", "hf", "-o", tmp_path / "hf", "--max-position-embeddings", CONTEXT, "-q",
                       "--chat-template", tmp_path / "chat_template.jinja")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == CHAT_TEXT
    ids = tok.apply_chat_template(CHAT, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert text.count("[INST]") == 2 and ids.count(inst) == 2 and ids.count(end) == 2 and ids[0] == sp.bos_id()
    assert ids == parts_reference(sp, text, added_spellings(model_path("v3"), (H.CONTROL, H.UNKNOWN)))
    code, _, err = cli("merge", src, "--to", "gguf", "-o", tmp_path / "m.gguf", "--max-position-embeddings", CONTEXT,
                       "-q", "--chat-template", tmp_path / "chat_template.jinja")
    assert code == 0, err
    field = GGUFReader(tmp_path / "m.gguf").fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == TEMPLATE
    # a source whose HF tokenizer files are carried as they are (here: the template-less output, split for
    # Accessory): the template becomes chat_template.jinja beside them, which transformers reads
    assert cli("split", tmp_path / "plain", "-n", 1, "-o", tmp_path / "acc", "-q")[0] == 0
    code, _, err = cli("merge", tmp_path / "acc", "--to", "hf", "-o", tmp_path / "hf2", "-q",
                       "--max-position-embeddings", CONTEXT, "--chat-template", tmp_path / "chat_template.jinja")
    assert code == 0, err
    assert (tmp_path / "hf2" / "chat_template.jinja").read_text() == TEMPLATE
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf2").apply_chat_template(CHAT, tokenize=False) == CHAT_TEXT
    # the HF output, which has one now, refuses another; so does an unreadable file; torrent has no place for it
    code, _, err = cli("merge", tmp_path / "hf", "--to", "gguf", "-o", tmp_path / "again.gguf", "-q",
                       "--chat-template", tmp_path / "chat_template.jinja", capsys=capsys)
    assert code == 2 and "has a chat template already" in err and "tokenizer_config.json" in err
    code, _, err = cli("merge", src, "--to", "hf", "-o", tmp_path / "x", "--max-position-embeddings", CONTEXT,
                       "--chat-template", tmp_path / "missing.jinja", capsys=capsys)
    assert code == 2 and "missing.jinja: cannot read" in err and not (tmp_path / "x").exists()
    code, _, err = cli("merge", src, "-o", tmp_path / "t", "--chat-template", tmp_path / "chat_template.jinja",
                       capsys=capsys)
    assert code == 2 and "--chat-template is for --to hf or gguf" in err
