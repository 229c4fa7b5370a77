"""Mixtral's own SentencePiece models and the text the tokenizer tests encode with them.

The models are the data files of the `mistral_common` wheel (Apache-2.0; pinned in pyproject.toml's
dev extra, installed without its dependencies by `make install-dev`): found through
importlib.util.find_spec, which locates the package without running it, and checked by sha256.
- v1: `tokenizer.model.v1`, Mixtral-8x7B's and Mistral-7B's (32000 pieces, byte fallback);
- v3: `mistral_instruct_tokenizer_240323.model.v3`, Mixtral-8x22B-v0.3's (32768 pieces: 750
  control pieces such as [INST], 20 user-defined ones, [REFERENCE_DOC_0..19]).

The corpus (`corpus_lines`): the held-out documents of fixtures/trained (CPython's docstrings and
code, read where the machine has them; fixtures/trained/README.md), split into lines; sentences in
other scripts; code in other languages; runs of whitespace; characters outside the vocabulary (byte
fallback); and the random probe strings of the other tokenizer tests. None holds an added token's
spelling: `spelled_lines` mixes those into corpus lines.

`release` writes a tiny Mixtral carrying one of them as its release does (the v1 torrent, the v3
`.tar` download).

`parts_reference` is what SentencePiece gives for text split at added-token spellings, each part
encoded alone (so with its own dummy prefix), the added tokens' ids between: what an HF tokenizer.json
does with its added tokens, and what a chat template's parts are.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import random
import re
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import load
from safetensors.torch import save_file

from mixtral_convert.synth import tiny_config, write_torrent

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_COMMON = "mistral_common==1.12.0"
FILES = {  # name -> (file in mistral_common/data, sha256)
    "v1": ("tokenizer.model.v1", "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3",
           "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"),
}
VOCAB = {"v1": 32000, "v3": 32768}
# the tiny Mixtral that carries them (`release`); the .tar states no context length
SHAPE = dict(dim=32, n_layers=1, head_dim=4, hidden_dim=32, n_heads=8, n_kv_heads=2, num_experts=4,
             experts_per_tok=2)
CONTEXT = "4096"
# a chat template of the kind Mistral publishes for its instruct models, written for these tests (the tool
# has none); CHAT rendered through it holds [INST] and [/INST] twice each
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Und auf Deutsch?"}]
CHAT_TEXT = "<s>[INST] What is 2 + 2? [/INST]4.</s>[INST] Und auf Deutsch? [/INST]"


def model_path(name: str) -> Path:
    """The mistral_common data file of tokenizer `name` ("v1", "v3"), its sha256 checked."""
    spec = importlib.util.find_spec("mistral_common")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"mistral_common is not installed: pip install --no-deps {MISTRAL_COMMON} (make install-dev does)")
    fname, sha = FILES[name]
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / fname
    version = importlib.metadata.version("mistral_common")
    if f"mistral_common=={version}" != MISTRAL_COMMON:
        pytest.fail(f"mistral_common {version} is installed; the tests pin {MISTRAL_COMMON} (make install-dev)")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        pytest.fail(f"{path}: sha256 {got}, expected {sha} ({MISTRAL_COMMON})")
    return path


def release(d, name: str):
    """A tiny Mixtral carrying tokenizer `name` as its release ships it: v1 as the 8x7B torrent
    (tokenizer.model beside consolidated.00.pth), v3 as the 8x22B-v0.3 `.tar` (tokenizer.model.v3)."""
    cfg = tiny_config(**SHAPE, vocab_size=VOCAB[name])
    folder = write_torrent(d / f"tiny-{name}", cfg, seed=28, dtype=torch.float32, tokenizer=False,
                           params=cfg.to_params())
    if name == "v1":
        (folder / "tokenizer.model").write_bytes(model_path("v1").read_bytes())
        return folder
    save_file({k: v.contiguous() for k, v in load(folder / "consolidated.00.pth").items()},
              folder / "consolidated.safetensors")  # what mistral-inference's downloads hold
    (folder / "consolidated.00.pth").unlink()
    (folder / "tokenizer.model.v3").write_bytes(model_path("v3").read_bytes())
    tar = d / "tiny-8x22B-v0.3.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted(folder.iterdir()):
            tf.add(p, arcname=f"tiny-8x22B-v0.3/{p.name}")
    return tar


# ----------------------------------------------------------------------------- the corpus
SCRIPTS = [  # one sentence per script, written for these tests
    "Der Zug nach München fährt um 7:45 Uhr ab; Verspätung möglich.",
    "L'été dernier, nous avons mangé des crêpes à Saint-Malo.",
    "¿Dónde está la biblioteca? Está cerca de la estación, señor.",
    "Ваш заказ будет доставлен в четверг, если погода позволит.",
    "Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός το πρωί.",
    "القطار يغادر المحطة في الساعة الثامنة صباحا.",
    "הספרייה פתוחה עד השעה עשר בלילה.",
    "पुस्तकालय रात दस बजे तक खुला रहता है।",
    "ห้องสมุดเปิดจนถึงสี่ทุ่ม",
    "图书馆晚上十点关门，请提前归还书籍。",
    "図書館は夜十時まで開いています。カードをお持ちください。",
    "도서관은 밤 열 시까지 열려 있습니다.",
    "ბიბლიოთეკა ღიაა საღამოს ათ საათამდე.",
    "Գրադարանը բաց է մինչև երեկոյան ժամը տասը։",
    "ቤተ መጻሕፍቱ እስከ ምሽቱ አራት ሰዓት ክፍት ነው።",
    "Thư viện mở cửa đến mười giờ tối.",
    "Kütüphane akşam saat ona kadar açıktır.",
    "Biblioteka jest otwarta do dwudziestej drugiej.",
    "Το 2024 ήταν δίσεκτο έτος · 366 ημέρες.",
    "Emoji: 🚀 launch, 👩‍👩‍👧 family, 🇫🇷 flag, ❤️ heart.",
]
CODE = [
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n}",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "for f in *.txt; do grep -c 'foo' \"$f\" || true; done",
    "<div class=\"row\"><span id='a'>&nbsp;&lt;tag&gt;</span></div>",
    "\\begin{equation} e^{i\\pi} + 1 = 0 \\end{equation}",
    "x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares",
    "{\"key\": [1, 2.5e-3, null, true], \"nested\": {\"a\": \"b\"}}",
    "    def __init__(self, *args, **kwargs):\n        super().__init__(*args, **kwargs)",
]
WHITESPACE = ["", " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n\n", " \n \n ", "a  b   c    d", "  leading",
              "trailing   ", "\t tab \t mix \t", "line\r\nbreak", "x\u00a0y\u3000z", "  \n\tindented\n  code  "]
BYTE_FALLBACK = ["\U00010348\U0001d11e\U0001f9ec", "\ue000\uf8ff", "\U000e0041\U000fffd0", "\x00\x01\x1f\x7f",
                 "\u2581", "\u2581\u2581x", "𠀋𠂤𠃌", "ꙮ ᚠᚢᚦ ⵣ", "\ufeffBOM", "\u200b\u200c\u200d", "ﷺ ﷽"]


def _held_out_lines() -> list[str]:
    sys.path.insert(0, str(ROOT / "fixtures" / "trained"))
    try:
        import corpus
        docs = corpus.documents()
    except FileNotFoundError:
        return []  # no CPython standard library on this machine: the other parts still run
    finally:
        sys.path.pop(0)
    _, held = corpus.split(docs)
    return [ln for d in held for ln in d.split("\n") if ln.strip()]


@functools.lru_cache(maxsize=None)
def corpus_lines() -> tuple[str, ...]:
    """The corpus described in the module's docstring (held-out lines first), without added-token spellings."""
    spec = importlib.util.spec_from_file_location("formats_conftest_probes", ROOT / "tests" / "formats" / "conftest.py")
    formats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(formats)  # its probe_strings: random strings of every kind of character
    lines = _held_out_lines() + SCRIPTS + CODE + WHITESPACE + BYTE_FALLBACK + formats.probe_strings(300, seed=28)
    return tuple(s for s in lines if not re.search(r"</?s>|<unk>|\[/?[A-Z_0-9]+\]", s))


def held_out_count() -> int:
    return len(_held_out_lines())


def spelled_lines(spellings: list[str], n: int = 400, seed: int = 28) -> list[str]:
    """Corpus lines with added-token spellings put in: at the start, the end, mid-word, after a
    space, two in a row; every spelling at least once."""
    rng = random.Random(seed)
    base = corpus_lines()
    out = []
    for i in range(max(n, len(spellings))):
        s, line = spellings[i % len(spellings)], rng.choice(base)
        k = rng.randint(0, len(line))
        out.append(rng.choice([s + line, line + s, line[:k] + s + line[k:], line[:k] + " " + s + " " + line[k:],
                               s + rng.choice(spellings) + " " + line, s]))
    return out


def parts_reference(sp, text: str, added: dict[str, int]) -> list[int]:
    """SentencePiece's ids of `text` cut at the spellings in `added` (leftmost, longest first), each
    part encoded alone, the spelling's id between."""
    if not added:
        return sp.encode(text)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)))
    ids, at = [], 0
    for m in pattern.finditer(text):
        if m.start() > at:
            ids += sp.encode(text[at:m.start()])
        ids.append(added[m.group()])
        at = m.end()
    if at < len(text):
        ids += sp.encode(text[at:])
    return ids


def added_spellings(path: Path, kinds: tuple[int, ...]) -> dict[str, int]:
    """piece -> id of the model's pieces of the given SentencePiece types (tokenizer.hf's CONTROL,
    USER_DEFINED, UNKNOWN), as the tool's reader gives them (checked against sentencepiece by
    test_hf_tokenizer.py::test_model_file_read_without_protobuf)."""
    from mixtral_convert.tokenizer import hf as H
    m = H.read_model(path)
    return {m.pieces[i][0]: i for k in kinds for i in m.ids_of(k)}
