"""RoPE scaling is carried, or refused, never dropped (docs/formats.md, "RoPE scaling").

The source is a tiny MixtralForCausalLM that transformers itself builds with linear scaling (factor 2)
and saves (transformers 5's `rope_parameters`); a copy spells it as transformers 4 did (`rope_scaling`
beside a top-level `rope_theta`). Each goes through split (Accessory's `rope_scaling`, a position
multiplier), merge --to hf (transformers loads it back, and its logits are the judge) and merge --to gguf
(`llama.rope.scaling.*`). Computation-changing fields this tool cannot carry are refused in one line,
with nothing written."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from helpers import cli

transformers = pytest.importorskip("transformers")
from gguf import GGUFReader  # noqa: E402
from hf_tiny import hf_model, tiny_cfg  # noqa: E402

from mixtral_convert.formats.registry import open_checkpoint  # noqa: E402
from mixtral_convert.forward.reference import forward  # noqa: E402
from mixtral_convert.io.lazy import TensorGetter  # noqa: E402
from mixtral_convert.model import rope  # noqa: E402
from mixtral_convert.model.rope import RopeScaling  # noqa: E402
from mixtral_convert.synth import train_tokenizer, write_torrent  # noqa: E402

CFG = tiny_cfg(vocab_size=320)
SCALED = {"rope_type": "linear", "factor": 2.0, "rope_theta": CFG.rope_theta}
TOKENS = torch.tensor([[1, 17, 5, 90, 33, 2, 64, 8, 11, 200, 301, 7, 150, 42, 99, 3]])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def model():
    return hf_model(CFG, seed=3, rope_parameters=dict(SCALED))


@pytest.fixture(scope="module")
def want(model):
    """transformers' own logits of the scaled model: the judge."""
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """{"tf5": as transformers 5 saves it, "tf4": the same with transformers 4's spelling}."""
    d = tmp_path_factory.mktemp("rope")
    model.save_pretrained(d / "tf5")
    (d / "tf5" / "tokenizer.model").write_bytes(train_tokenizer(CFG.vocab_size, seed=3, llama=True))
    config = json.loads((d / "tf5" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and "rope_scaling" not in config
    shutil.copytree(d / "tf5", d / "tf4")
    params = config.pop("rope_parameters")
    config.update(rope_theta=params["rope_theta"], rope_scaling={"type": "linear", "factor": params["factor"]})
    (d / "tf4" / "config.json").write_text(json.dumps(config))
    return {"tf5": d / "tf5", "tf4": d / "tf4"}


def unscaled_logits(src) -> torch.Tensor:
    ck = open_checkpoint(src)
    return forward(replace(ck.cfg, rope_scaling=None), TensorGetter(ck.canonical), TOKENS)


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("spelling", ["tf5", "tf4"])
def test_both_hf_spellings_are_read_and_computed_as_transformers_does(sources, want, spelling):
    ck = open_checkpoint(sources[spelling])
    assert ck.cfg.rope_scaling == RopeScaling(2.0)
    got = forward(ck.cfg, TensorGetter(ck.canonical), TOKENS)
    assert close(got, want)
    # the scaling matters: without it the logits are far off
    assert not close(unscaled_logits(sources[spelling]), want)


def test_inspect_says_the_scaling_plainly(sources, capsys):
    code, out, _ = cli("inspect", sources["tf4"], "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["rope_scaling"] == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize("both", [
    {"rope_parameters": dict(SCALED), "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": dict(SCALED), "rope_scaling": None},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_scaling": {"type": "linear", "factor": 3.0}},
])
def test_both_spellings_at_once_read_as_transformers_reads_them(both):
    judge = transformers.MixtralConfig(**json.loads(json.dumps(both))).rope_parameters
    assert rope.from_hf(both, "config.json") == RopeScaling(judge["factor"])


def test_the_other_spellings():
    assert rope.from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "c") is None
    assert rope.from_accessory(0.25, "c") == RopeScaling(4.0) and rope.from_accessory(None, "c") is None
    assert rope.from_gguf(None, None, 8.0, "g") == RopeScaling(8.0)  # the older llama.rope.scale_linear
    assert rope.from_gguf("none", 2.0, None, "g") is None


# ----------------------------------------------------------------------------- split, merge --to hf
@pytest.mark.parametrize("spelling", ["tf5", "tf4"])
def test_split_carries_it_and_merge_to_hf_gives_transformers_the_same_model(sources, want, tmp_path, capsys,
                                                                             spelling):
    src, shards, hf = sources[spelling], tmp_path / "shards", tmp_path / "hf"
    assert cli("split", src, "-n", 2, "-o", shards, "-q", capsys=capsys)[0] == 0
    acc = json.loads((shards / "config.json").read_text())
    assert acc["rope_scaling"] == 0.5  # Accessory multiplies the positions by it: 1 / factor
    code, out, err = cli("verify", shards, "--source", src, "--forward", capsys=capsys)
    assert code == 0, out + err
    code, _, err = cli("merge", shards, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", 4096,
                      capsys=capsys)
    assert code == 0, err
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_parameters"] == SCALED
    assert config["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 2.0}
    back = transformers.MixtralForCausalLM.from_pretrained(hf, local_files_only=True, dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "linear" and back.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        assert close(back(TOKENS).logits.float(), want)


def test_verify_forward_fails_when_the_shards_lose_the_scaling(sources, tmp_path, capsys):
    src, shards = sources["tf5"], tmp_path / "shards"
    assert cli("split", src, "-n", 2, "-o", shards, "-q", capsys=capsys)[0] == 0
    config = json.loads((shards / "config.json").read_text())
    del config["rope_scaling"]
    (shards / "config.json").write_text(json.dumps(config))
    code, out, err = cli("verify", shards, "--source", src, "--forward", capsys=capsys)
    assert code != 0 and "rope_scaling" in out + err


def test_a_params_json_with_a_sliding_window_is_refused(tmp_path, capsys):
    src = write_torrent(tmp_path / "src", CFG, params=dict(CFG.to_params(), sliding_window=4096))
    code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "out", capsys=capsys)
    assert code == 2 and "params.json" in err and "sliding_window" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_merge_to_torrent_refuses_a_scaled_model(sources, tmp_path, capsys):
    out = tmp_path / "torrent"
    code, _, err = cli("merge", sources["tf5"], "--to", "torrent", "-o", out, capsys=capsys)
    assert code == 2 and "RoPE scaling" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- GGUF
def test_merge_to_gguf_writes_the_scaling_keys_and_reads_them_back(sources, want, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, _, err = cli("merge", sources["tf4"], "--to", "gguf", "--dtype", "float32", "-o", out, "-q", capsys=capsys)
    assert code == 0, err
    fields = GGUFReader(out).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0
    ck = open_checkpoint(out)
    assert ck.cfg.rope_scaling == RopeScaling(2.0)
    assert close(forward(ck.cfg, TensorGetter(ck.canonical), TOKENS), want)
    code, out_text, err = cli("verify", out, "--source", sources["tf5"], "--forward", capsys=capsys)
    assert code == 0 and "ok    forward (" in out_text, out_text + err


def test_a_gguf_with_a_scaling_type_it_cannot_compute_is_refused(sources, tmp_path, capsys, monkeypatch):
    out = tmp_path / "yarn.gguf"
    with monkeypatch.context() as m:  # a GGUF that says yarn, written by this tool's own writer
        m.setattr(rope, "from_hf", lambda hf, where: RopeScaling(2.0, "yarn"))
        assert cli("merge", sources["tf5"], "--to", "gguf", "--dtype", "float32", "-o", out, "-q",
                   capsys=capsys)[0] == 0
    assert GGUFReader(out).fields["llama.rope.scaling.type"].contents() == "yarn"
    code, _, err = cli("split", out, "-n", 2, "-o", tmp_path / "s", capsys=capsys)
    assert code == 2 and "'yarn'" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- refusals
REFUSED = {
    "dynamic": ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}, "'dynamic'"),
    "yarn-tf4": ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "'yarn'"),
    "llama3": ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6}, "'llama3'"),
    "partial": ("rope_parameters", dict(SCALED, partial_rotary_factor=0.5), "partial_rotary_factor"),
    "sliding_window": ("sliding_window", 4096, "sliding_window"),
    "tied": ("tie_word_embeddings", True, "tie_word_embeddings"),
    "attention_bias": ("attention_bias", True, "attention_bias"),
    "mlp_bias": ("mlp_bias", True, "mlp_bias"),
    "hidden_act": ("hidden_act", "gelu", "hidden_act"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("cmd", [("split", "-n", "2"), ("merge", "--to", "gguf", "--dtype", "float32")])
def test_what_changes_the_model_and_cannot_be_carried_is_refused_in_one_line(sources, tmp_path, capsys, case, cmd):
    src = tmp_path / "src"
    shutil.copytree(sources["tf5"], src)
    key, value, said = REFUSED[case]
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    out = tmp_path / ("out.gguf" if "gguf" in cmd else "out")
    code, _, err = cli(*cmd[:1], src, *cmd[1:], "-o", out, capsys=capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and said in err and "config.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written


def test_llama_cpp_computes_the_scaled_gguf_as_transformers_does(sources, want, tmp_path, capsys):
    """llama.cpp (in tests/llama_judge.py's child process) gives transformers' logits for the scaled model.
    Skipped without llama_cpp, unless MIXTRAL_CONVERT_LLAMA=required (make test-llama runs it)."""
    from llama_judge import logits, require_llama
    require_llama()
    out = tmp_path / "m.gguf"
    assert cli("merge", sources["tf5"], "--to", "gguf", "--dtype", "float32", "-o", out, "-q", capsys=capsys)[0] == 0
    got = torch.from_numpy(logits(out, [TOKENS[0].tolist()], "float32, linear RoPE scaling")[0])
    assert close(got, want[0])
