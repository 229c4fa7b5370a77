"""`merge --to hf` writes a complete HF repository, which transformers uses as it uses a hub
repository (offline, no extra step): AutoTokenizer gives SentencePiece's ids plus BOS,
AutoModelForCausalLM the tool's reference logits, pipeline("text-generation") its greedy tokens.
config.json's context length is the source's or --max-position-embeddings', never a constant;
BOS/EOS ids are the tokenizer's. An HF source with tokenizer.json and tokenizer_config.json but
no tokenizer.model converts without --tokenizer, its files ride through Accessory outputs
(chat template included) and back out; sources with only tokenizer.model get no new files."""

import io
import json
import random
import shutil

import pytest
import sentencepiece as spm
import torch
from helpers import WIDE, cli, greedy, hub_repo, load

from mixtral_convert.forward.reference import forward
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.synth import tiny_config, write_torrent

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
            "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def src(tmp_path_factory, mixtral_like_tokenizer):
    """A float32 torrent with the Mistral-like tokenizer (1024 pieces)."""
    cfg = tiny_config(**dict(WIDE, vocab_size=1024))
    d = write_torrent(tmp_path_factory.mktemp("repo") / "src", cfg, seed=11, dtype=torch.float32, tokenizer=False,
                      params=cfg.to_params())
    shutil.copy(mixtral_like_tokenizer, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def repo(src, tmp_path_factory):
    """merge --to hf of an Accessory sparse N=2 directory of `src`."""
    d = tmp_path_factory.mktemp("repo_out")
    assert cli("split-sparse", src, "-n", 2, "-o", d / "shards", "-q")[0] == 0
    assert cli("merge", d / "shards", "--to", "hf", "-o", d / "hf", "-q", "--max-position-embeddings", 32768)[0] == 0
    return d / "hf"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def sp_of(path):
    return spm.SentencePieceProcessor(model_file=str(path))


def hf_only_source(repo, d, template=TEMPLATE):
    """An HF hub directory whose tokenizer is tokenizer.json + tokenizer_config.json only."""
    shutil.copytree(repo, d)
    for name in ("tokenizer.model", "mixtral-convert-manifest.json", "generation_config.json"):
        (d / name).unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template), indent=1))
    return d


# ----------------------------------------------------------------------------- the repository
def test_merge_to_hf_writes_a_complete_repository(repo, src):
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                            "mixtral-convert-manifest.json"] + TOKENIZER_FILES)
    manifest = json.loads((repo / "mixtral-convert-manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(n for n in names if n != "mixtral-convert-manifest.json")
    config = json.loads((repo / "config.json").read_text())
    assert (config["max_position_embeddings"], config["bos_token_id"], config["eos_token_id"]) == (32768, 1, 2)
    assert ModelConfig.from_hf_config(config) == ModelConfig.from_json_file(src / "params.json")
    assert json.loads((repo / "generation_config.json").read_text())["bos_token_id"] == 1
    assert json.loads((repo / "generation_config.json").read_text())["eos_token_id"] == 2
    tc = json.loads((repo / "tokenizer_config.json").read_text())
    assert {k: tc[k] for k in ("tokenizer_class", "bos_token", "eos_token", "unk_token", "add_bos_token",
                               "add_eos_token")} == {
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}
    assert "chat_template" not in tc  # the source has none
    assert json.loads((repo / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # an HF repository is a source again: back to the torrent, bit for bit
    assert cli("merge", repo, "-o", repo.parent / "back", "-q")[0] == 0
    a, b = load(src / "consolidated.00.pth"), load(repo.parent / "back" / "consolidated.00.pth")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ids_in_config_come_from_the_tokenizer(wide_src, tmp_path, capsys):
    """A tokenizer whose BOS is 3 and EOS 5: config.json, generation_config.json and the tokenizer
    files say so (the old constant 1/2 would not)."""
    model = io.BytesIO()
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.sample(words, 10)) for _ in range(2000)]), model_writer=model,
        vocab_size=128, model_type="bpe", unk_id=0, bos_id=3, eos_id=5, pad_id=-1, hard_vocab_limit=True,
        minloglevel=2)
    (tmp_path / "tok.model").write_bytes(model.getvalue())
    code, _, err = cli("merge", wide_src, "--to", "hf", "-o", tmp_path / "hf", "-q", "--tokenizer",
                       tmp_path / "tok.model", "--max-position-embeddings", 65536, capsys=capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (3, 5, 65536)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (3, 5)
    tok = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert tok["post_processor"]["special_tokens"]["<s>"]["ids"] == [3]


def test_transformers_uses_the_directory_as_a_hub_repository(repo, src, strings, offline):
    transformers = pytest.importorskip("transformers")
    sp = sp_of(src / "tokenizer.model")
    tok = transformers.AutoTokenizer.from_pretrained(repo)
    assert len(tok) == 1024
    got = tok(strings)["input_ids"]
    diff = [(s, g) for s, g in zip(strings, got, strict=True) if g != [1] + sp.encode(s)]
    assert not diff, f"{len(diff)} of {len(strings)} differ, first {diff[0]}"
    # the model: the tool's reference logits
    cfg = ModelConfig.from_json_file(src / "params.json")
    W = load(src / "consolidated.00.pth")
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
    ids = tok("The quick brown fox 😀 北京", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    want = forward(cfg, W, ids)
    assert (logits - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())
    # and a pipeline, greedy: the reference's continuation (up to EOS, where generate stops)
    gen = transformers.pipeline("text-generation", model=str(repo), dtype=torch.float32)
    out = gen("hello world", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = [1] + sp.encode("hello world")
    assert out[:len(prompt)] == prompt and len(prompt) < len(out) <= len(prompt) + 4
    new, _ = greedy(cfg, W, src / "tokenizer.model", "hello world", 4)
    assert out[len(prompt):] == new[:len(out) - len(prompt)]
    assert len(out) == len(prompt) + 4 or out[-1] == 2


# ----------------------------------------------------------------------------- max_position_embeddings
def test_context_length_carried_given_or_refused(repo, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(repo, hf)
    (hf / "mixtral-convert-manifest.json").unlink()
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=65536)))
    for extra, want in (((), 65536), (("--max-position-embeddings", 4096), 4096)):
        out = tmp_path / f"o{want}"
        code, _, err = cli("merge", hf, "--to", "hf", "-o", out, "-q", *extra, capsys=capsys)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == want
    # Accessory keeps no context length (its max_seq_len is the runtime's): the option, or a clear refusal
    assert cli("split", hf, "-n", 2, "-o", tmp_path / "b2", "-q", capsys=capsys)[0] == 0
    assert "max_seq_len" not in json.loads((tmp_path / "b2" / "config.json").read_text())
    code, _, err = cli("merge", tmp_path / "b2", "--to", "hf", "-o", tmp_path / "x", capsys=capsys)
    assert code == 2 and "--max-position-embeddings" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    code, _, err = cli("merge", tmp_path / "b2", "-o", tmp_path / "y", "--max-position-embeddings", 9, capsys=capsys)
    assert code == 2 and "--to hf" in err and not (tmp_path / "y").exists()


def test_merge_to_hf_without_a_tokenizer_refused(wide_src, tmp_path, capsys):
    d = tmp_path / "src"
    shutil.copytree(wide_src, d)
    (d / "tokenizer.model").unlink()
    code, _, err = cli("merge", d, "--to", "hf", "-o", tmp_path / "x", "--max-position-embeddings", 8, capsys=capsys)
    assert code == 2 and "--tokenizer" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- chat template
def test_chat_template_of_a_tokenizer_config_beside_tokenizer_model(src, tmp_path, offline, capsys):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "src"
    shutil.copytree(src, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "tokenizer_class": "X"}))
    assert cli("merge", d, "--to", "hf", "-o", tmp_path / "hf", "-q", "--max-position-embeddings", 32768,
               capsys=capsys)[0] == 0
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE and tc["tokenizer_class"] == "LlamaTokenizerFast"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == [1] + sp_of(d / "tokenizer.model").encode("[INST] hi there [/INST]")


# ----------------------------------------------------------------------------- HF tokenizer files in
def test_hf_tokenizer_files_without_tokenizer_model(repo, src, tmp_path, offline, capsys):
    transformers = pytest.importorskip("transformers")
    hf = hf_only_source(repo, tmp_path / "hf")
    code, text, err = cli("inspect", hf, "--json", capsys=capsys)
    assert code == 0 and json.loads(text)["tokenizer"] == {"pieces": 1024}, err
    out = tmp_path / "b2"
    code, _, err = cli("split", hf, "-n", 2, "-o", out, "-q", capsys=capsys)  # no --tokenizer
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "meta.json", "consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth",
         "mixtral-convert-manifest.json"] + TOKENIZER_FILES)
    assert all((out / n).read_bytes() == (hf / n).read_bytes() for n in TOKENIZER_FILES)
    assert set(TOKENIZER_FILES) <= set(json.loads((out / "mixtral-convert-manifest.json").read_text())["files"])
    for args in ((), ("--source", hf)):
        code, text, err = cli("verify", out, *args, capsys=capsys)
        assert code == 0, text + err
        assert "tokenizer.json: 1024 tokens = vocab_size" in text
    # the same weights, but a source whose tokenizer is a tokenizer.model: not what split made of it
    code, text, err = cli("verify", out, "--source", src, capsys=capsys)
    assert code == 1 and "is an HF tokenizer, the source's" in text, text + err
    # HF -> Accessory -> HF: the chat template and every tokenizer file survive, byte for byte
    back = tmp_path / "back"
    assert cli("merge", out, "--to", "hf", "-o", back, "-q", "--max-position-embeddings", 32768, capsys=capsys)[0] == 0
    assert all((back / n).read_bytes() == (hf / n).read_bytes() for n in TOKENIZER_FILES)
    assert not (back / "tokenizer.model").exists() and (back / "generation_config.json").is_file()
    assert json.loads((back / "config.json").read_text())["bos_token_id"] == 1
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert tok.chat_template == TEMPLATE
    sp = sp_of(src / "tokenizer.model")
    assert tok("  Grüße 北京 😀")["input_ids"] == [1] + sp.encode("  Grüße 北京 😀")
    # ... and through the torrent layout, which then reads as having that tokenizer
    assert cli("merge", out, "-o", tmp_path / "t", "-q", capsys=capsys)[0] == 0
    assert all((tmp_path / "t" / n).read_bytes() == (hf / n).read_bytes() for n in TOKENIZER_FILES)
    assert cli("split", tmp_path / "t", "-n", 4, "-o", tmp_path / "t4", "-q", capsys=capsys)[0] == 0
    # a changed tokenizer file is found by verify
    (out / "tokenizer_config.json").write_text("{}")
    code, text, _ = cli("verify", out, "--source", hf, capsys=capsys)
    assert code == 1 and "tokenizer_config.json: differs from the source's" in text


def test_hf_tokenizer_vocabulary_counts_added_tokens(repo, tmp_path, capsys):
    hf = hf_only_source(repo, tmp_path / "hf")
    tok = json.loads((hf / "tokenizer.json").read_text())
    extra = {"id": 1024, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
    (hf / "tokenizer.json").write_text(json.dumps(dict(tok, added_tokens=tok["added_tokens"] + [extra])))
    code, _, err = cli("split", hf, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "tokenizer.json: has 1025 tokens" in err and "1024 rows" in err, err
    assert not (tmp_path / "o").exists()
    # a token only tokenizer_config.json declares counts too (transformers adds it)
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["1024"] = dict(cfg["added_tokens_decoder"]["1"], content="<pad>")
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = cli("split", hf, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "1025 tokens" in err, err
    (hf / "tokenizer.json").write_text("{not json")
    code, _, err = cli("split", hf, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "tokenizer.json: not a tokenizers file" in err and len(err.strip().splitlines()) == 1


def test_hf_source_with_both_tokenizers(repo, src, tmp_path, capsys):
    """tokenizer.model is what Accessory loads (it probes it first); the HF files ride along."""
    hf = hf_only_source(repo, tmp_path / "hf")
    shutil.copy(src / "tokenizer.model", hf / "tokenizer.model")
    out = tmp_path / "s4"
    assert cli("split-sparse", hf, "-n", 4, "-o", out, "-q", capsys=capsys)[0] == 0
    assert all((out / n).read_bytes() == (hf / n).read_bytes() for n in TOKENIZER_FILES + ["tokenizer.model"])
    code, text, err = cli("verify", out, "--source", hf, capsys=capsys)
    assert code == 0 and "tokenizer.model: 1024 pieces = vocab_size" in text, text + err
    # the HF files carried, not rebuilt: the chat template is the source's
    assert cli("merge", out, "--to", "hf", "-o", tmp_path / "back", "-q", "--max-position-embeddings", 8,
               capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE


def test_sources_with_only_tokenizer_model_get_no_new_files(wide_src, tmp_path, capsys):
    assert cli("split", wide_src, "-n", 2, "-o", tmp_path / "b2", "-q", capsys=capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "b2").iterdir()) == [
        "config.json", "consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth", "meta.json",
        "mixtral-convert-manifest.json", "tokenizer.model"]
    assert cli("merge", tmp_path / "b2", "-o", tmp_path / "m", "-q", capsys=capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "consolidated.00.pth", "mixtral-convert-manifest.json", "params.json", "tokenizer.model"]


def test_hf_uri_with_hf_tokenizer_files(repo, tmp_path, monkeypatch, capsys):
    """hf://org/name fetches the HF tokenizer files with the other small files (offline, from the cache)."""
    hf = hf_only_source(repo, tmp_path / "hf")
    hub_repo(tmp_path / "cache", "org/tiny", {f.name: f for f in hf.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("split", "hf://org/tiny", "-n", 2, "-o", tmp_path / "b2", "-q", capsys=capsys)
    assert code == 0, err
    assert all((tmp_path / "b2" / n).read_bytes() == (hf / n).read_bytes() for n in TOKENIZER_FILES)
