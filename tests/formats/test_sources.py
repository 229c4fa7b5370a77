"""Every source in, every layout out: the torrent, Mistral's fused files, HF hub directories
(one file or an index), hf:// from an offline cache, Accessory .pth and .safetensors shards;
split, split-sparse, merge --to torrent|hf; each back to the original bit for bit.

The test builds every source format itself from the synthetic torrent, with the layout rules
written out here from docs/formats.md (not through the code under test, except for HF names)."""

import json
import socket

import pytest
import torch
from helpers import HUB_SHA, ODD, cli, hub_repo, load, same_bytes
from safetensors.torch import load_file, save_file

from mixtral_convert.model import names as hfnames
from mixtral_convert.model.config import ModelConfig
from mixtral_convert.synth import tiny_config, write_torrent


# ----------------------------------------------------------------------------- builders
def to_hf_rows(W: torch.Tensor, n: int) -> torch.Tensor:
    """docs/formats.md "HF hub layout", written out independently of mixtral_convert."""
    R, D = W.shape
    return W.view(n, R // n // 2, 2, D).transpose(1, 2).reshape(R, D)


def hf_state(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("attention.wq.weight"):
            v = to_hf_rows(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = to_hf_rows(v, cfg.n_kv_heads)
        out[hfnames.canonical_to_hf(k)] = v.contiguous()
    return out


def hf_config(cfg: ModelConfig, rope_parameters=False, drop_head_dim=False) -> dict:
    c = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": cfg.dim,
         "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "num_local_experts": cfg.num_experts,
         "num_experts_per_tok": cfg.experts_per_tok, "torch_dtype": "bfloat16"}
    if rope_parameters:
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        c["rope_theta"] = cfg.rope_theta
    if drop_head_dim:
        del c["head_dim"]
    return c


def write_hf_dir(src, out, files=1, rope_parameters=False, tokenizer=True):
    cfg = ModelConfig.from_json_file(src / "params.json")
    out.mkdir(parents=True)
    state = hf_state(load(src / "consolidated.00.pth"), cfg)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, rope_parameters, cfg.head_dim * cfg.n_heads == cfg.dim)))
    if files == 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(state)
        wm = {}
        for i in range(files):
            fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            part = {k: state[k] for k in names[i::files]}
            save_file(part, out / fname, metadata={"format": "pt"})
            wm.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if tokenizer:
        (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    return out


def write_fused_dir(src, out, files=2, hf_params=False):
    """docs/formats.md "Mistral fused files": per layer w1/w3 [E*H, D], w2 [E*H, D] of transposed experts,
    split by key."""
    cfg = ModelConfig.from_json_file(src / "params.json")
    sd = load(src / "consolidated.00.pth")
    fused = {}
    for k, v in sd.items():
        if ".feed_forward.experts." in k:
            continue
        fused[k.replace(".feed_forward.gate.", ".block_sparse_moe.gate.")] = v
    def ex(L, e, w):
        return sd[f"layers.{L}.feed_forward.experts.{e}.{w}.weight"]

    for L in range(cfg.n_layers):
        fused[f"layers.{L}.block_sparse_moe.w1"] = torch.cat([ex(L, e, "w1") for e in range(cfg.num_experts)])
        fused[f"layers.{L}.block_sparse_moe.w3"] = torch.cat([ex(L, e, "w3") for e in range(cfg.num_experts)])
        fused[f"layers.{L}.block_sparse_moe.w2"] = torch.cat([ex(L, e, "w2").t() for e in range(cfg.num_experts)])
    out.mkdir(parents=True)
    names = sorted(fused)
    for i in range(files):
        torch.save({k: fused[k].clone() for k in names[i::files]}, out / f"consolidated.{i:02d}.pt")
    params = hf_config(cfg) if hf_params else cfg.to_params()
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    return out


@pytest.fixture(scope="module")
def sources(wide_src, tmp_path_factory):
    """Every source format, holding the same model as wide_src."""
    d = tmp_path_factory.mktemp("sources")
    out = {"torrent": wide_src,
           "fused": write_fused_dir(wide_src, d / "fused", files=2),
           "fused-hfparams": write_fused_dir(wide_src, d / "fused-hfparams", files=1, hf_params=True),
           "hf": write_hf_dir(wide_src, d / "hf", files=1),
           "hf-index": write_hf_dir(wide_src, d / "hf-index", files=3, rope_parameters=True)}
    for name, cmd, N in (("base-st", "split", 4), ("sparse-st", "split-sparse", 2)):
        code, _, err = cli(cmd, wide_src, "-n", N, "-o", d / name, "-q", "--format", "safetensors")
        assert code == 0, err
        out[name] = d / name
    return out


def assert_same_as_torrent(torrent_dir, merged_dir):
    src, back = load(torrent_dir / "consolidated.00.pth"), load(merged_dir / "consolidated.00.pth")
    assert set(src) == set(back)
    for k in src:
        assert same_bytes(src[k], back[k]), k


SOURCES = ["torrent", "fused", "fused-hfparams", "hf", "hf-index", "base-st", "sparse-st"]
KINDS = {"torrent": "torrent", "fused": "fused", "fused-hfparams": "fused", "hf": "hf", "hf-index": "hf",
         "base-st": "base", "sparse-st": "sparse"}


# ----------------------------------------------------------------------------- every source
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("cmd,N,fmt", [("split", 2, "pth"), ("split-sparse", 4, "pth"),
                                       ("split", 8, "safetensors"), ("split-sparse", 1, "safetensors")])
def test_every_source_through_every_layout_and_back(sources, wide_src, tmp_path, capsys, source, cmd, N, fmt):
    src = sources[source]
    out = tmp_path / "shards"
    code, _, err = cli(cmd, src, "-n", N, "-o", out, "-q", "--format", fmt, capsys=capsys)
    assert code == 0, err
    ext = "pth" if fmt == "pth" else "safetensors"
    assert sorted(p.name for p in out.glob("consolidated.*")) == [
        f"consolidated.{r:02d}-of-{N:02d}.model.{ext}" for r in range(N)]
    for against in (wide_src, src):
        code, text, err = cli("verify", out, "--source", against, capsys=capsys)
        assert code == 0, text + err
    code, _, err = cli("merge", out, "-o", tmp_path / "merged", "-q", capsys=capsys)
    assert code == 0, err
    assert_same_as_torrent(wide_src, tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == (wide_src / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("source", SOURCES[1:])
def test_every_source_merges_to_torrent_and_is_detected(sources, wide_src, tmp_path, capsys, source):
    code, text, err = cli("inspect", sources[source], "--json", capsys=capsys)
    assert code == 0, err
    info = json.loads(text)
    assert info["format"] == KINDS[source]
    assert ModelConfig.from_params(info["config"]) == ModelConfig.from_json_file(wide_src / "params.json")
    code, _, err = cli("merge", sources[source], "-o", tmp_path / "m", "-q", capsys=capsys)
    assert code == 0, err
    assert_same_as_torrent(wide_src, tmp_path / "m")


def test_safetensors_shards_hold_the_same_tensors_as_pth(sources, wide_src, tmp_path, capsys):
    for cmd, name, N in (("split", "base-st", 4), ("split-sparse", "sparse-st", 2)):
        pth = tmp_path / name
        assert cli(cmd, wide_src, "-n", N, "-o", pth, "-q", capsys=capsys)[0] == 0
        for r in range(N):
            a = load(pth / f"consolidated.{r:02d}-of-{N:02d}.model.pth")
            b = load_file(sources[name] / f"consolidated.{r:02d}-of-{N:02d}.model.safetensors")  # the reference reader
            assert list(a) == list(b) or set(a) == set(b)
            assert all(same_bytes(a[k], b[k]) for k in a)
        manifest = json.loads((sources[name] / "mixtral-convert-manifest.json").read_text())
        assert manifest["shard_format"] == "safetensors"
        info = json.loads(cli("inspect", sources[name] / f"consolidated.00-of-{N:02d}.model.safetensors", "--json",
                              capsys=capsys)[1])
        assert info["what"].startswith("Accessory")


def test_mixed_shard_formats_refused(sources, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for f in sources["base-st"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "consolidated.00-of-04.model.pth").write_bytes(b"x")
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "both .model.pth and .model.safetensors" in err


# ----------------------------------------------------------------------------- merge --to hf
def test_merge_to_hf_is_the_hub_layout(sources, wide_src, tmp_path, capsys):
    cfg = ModelConfig.from_json_file(wide_src / "params.json")
    want = hf_state(load(wide_src / "consolidated.00.pth"), cfg)
    # from a sparse safetensors Accessory directory, split into several files
    out = tmp_path / "hf"
    code, _, err = cli("merge", sources["sparse-st"], "--to", "hf", "--max-shard-size", "60KB", "-o", out, "-q",
                       "--max-position-embeddings", 4096, capsys=capsys)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    got = {}
    for f in files:
        part = load_file(out / f)
        assert all(index["weight_map"][k] == f for k in part)
        assert (out / f).stat().st_size <= 60_000 or len(part) == 1
        got.update(part)
    assert set(got) == set(want)
    for k in want:
        assert same_bytes(got[k], want[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert ModelConfig.from_hf_config(config) == cfg and config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.model").read_bytes() == (wide_src / "tokenizer.model").read_bytes()
    # the default: one model.safetensors; and the HF output is a source again, back to the torrent
    one = tmp_path / "hf1"
    assert cli("merge", sources["base-st"], "--to", "hf", "-o", one, "-q", "--max-position-embeddings", 4096,
               capsys=capsys)[0] == 0
    assert sorted(p.name for p in one.iterdir() if p.suffix in (".safetensors", ".json")) == [
        "config.json", "generation_config.json", "mixtral-convert-manifest.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    got = load_file(one / "model.safetensors")
    assert all(same_bytes(got[k], want[k]) for k in want)
    for d in (out, one):
        assert cli("merge", d, "-o", tmp_path / f"{d.name}-back", "-q", capsys=capsys)[0] == 0
        assert_same_as_torrent(wide_src, tmp_path / f"{d.name}-back")
    # the torrent itself goes to hf too
    assert cli("merge", wide_src, "--to", "hf", "-o", tmp_path / "t", "-q", "--max-position-embeddings", 4096,
               capsys=capsys)[0] == 0
    got = load_file(tmp_path / "t" / "model.safetensors")
    assert all(same_bytes(got[k], want[k]) for k in want)


def test_odd_shapes_through_hf_and_fused(odd_src, tmp_path, capsys):
    """head_dim != dim / heads, KV 2, top-1, 3 layers, other eps and theta: the permutation and
    the config survive both ways."""
    cfg = ModelConfig.from_json_file(odd_src / "params.json")
    hf = write_hf_dir(odd_src, tmp_path / "hf", files=2)
    fused = write_fused_dir(odd_src, tmp_path / "fused", files=3)
    for i, src in enumerate((hf, fused)):
        out = tmp_path / f"s{i}"
        assert cli("split-sparse", src, "-n", 2, "-o", out, "-q", capsys=capsys)[0] == 0
        assert ModelConfig.from_json_file(out / "config.json") == cfg
        assert cli("verify", out, "--source", odd_src, "-q", capsys=capsys)[0] == 0
        back = tmp_path / f"hfback{i}"
        assert cli("merge", out, "--to", "hf", "-o", back, "-q", "--max-position-embeddings", 4096,
                   capsys=capsys)[0] == 0
        got, want = load_file(back / "model.safetensors"), hf_state(load(odd_src / "consolidated.00.pth"), cfg)
        assert set(got) == set(want) and all(same_bytes(got[k], want[k]) for k in want)


def test_hf_config_variants():
    cfg = tiny_config()
    base = hf_config(cfg)
    assert ModelConfig.from_hf_config(base) == cfg
    assert ModelConfig.from_hf_config(hf_config(cfg, rope_parameters=True, drop_head_dim=True)) == cfg
    assert ModelConfig.from_params(base) == cfg  # a params.json in HF names
    assert ModelConfig.from_hf_config(dict(base, head_dim=None)) == cfg
    no_theta = {k: v for k, v in base.items() if k != "rope_theta"}
    assert ModelConfig.from_hf_config(no_theta).rope_theta == 1e6
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


# ----------------------------------------------------------------------------- tokenizer
def test_source_without_tokenizer(wide_src, tmp_path, capsys):
    src = write_hf_dir(wide_src, tmp_path / "hf", tokenizer=False)
    code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "--tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    for i, tok in enumerate((wide_src / "tokenizer.model", wide_src)):
        out = tmp_path / f"o{i}"
        code, _, err = cli("split", src, "-n", 2, "-o", out, "-q", "--tokenizer", tok, capsys=capsys)
        assert code == 0, err
        assert (out / "tokenizer.model").read_bytes() == (wide_src / "tokenizer.model").read_bytes()
        assert cli("verify", out, "--source", wide_src, "-q", capsys=capsys)[0] == 0
    code, _, err = cli("split", src, "-n", 2, "-o", tmp_path / "o9", "--tokenizer", tmp_path / "nope", capsys=capsys)
    assert code == 2 and "--tokenizer" in err


# ----------------------------------------------------------------------------- hf:// offline
SHA = HUB_SHA
SHA2 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the network was used")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def test_hf_uri_resolved_offline_from_the_cache(offline_hub, wide_src, tmp_path, monkeypatch, capsys):
    hf = write_hf_dir(wide_src, tmp_path / "hfsrc", files=2, tokenizer=False)
    hub_repo(offline_hub, "org/tiny-mixtral", {p.name: p for p in hf.iterdir()})
    # a second revision, only reachable by its hash, in the fused layout with a tokenizer
    fused = write_fused_dir(wide_src, tmp_path / "fusedsrc", files=2)
    hub_repo(offline_hub, "org/tiny-mixtral", {p.name: p for p in fused.iterdir()}, sha=SHA2, ref="other")
    hub_repo(offline_hub, "org/tok", {"tokenizer.model": wide_src / "tokenizer.model"})

    code, text, err = cli("inspect", "hf://org/tiny-mixtral", "--json", capsys=capsys)
    assert code == 0, err
    info = json.loads(text)
    assert info["format"] == "hf" and info["path"] == "hf://org/tiny-mixtral" and info["tokenizer"] is None
    # no tokenizer in the repo: a clear error, then --tokenizer hf://
    code, _, err = cli("split", "hf://org/tiny-mixtral", "-n", 2, "-o", tmp_path / "x", capsys=capsys)
    assert code == 2 and "--tokenizer" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("split", "hf://org/tiny-mixtral", "-n", 2, "-q", "--tokenizer", "hf://org/tok", capsys=capsys)
    assert code == 0, err
    out = tmp_path / "tiny-mixtral" / "converted"  # default output: the working directory, not the cache
    assert cli("verify", out, "--source", wide_src, "-q", capsys=capsys)[0] == 0
    manifest = json.loads((out / "mixtral-convert-manifest.json").read_text())
    assert manifest["source"]["path"] == "hf://org/tiny-mixtral" and manifest["source"]["format"] == "hf"
    # a revision by hash; verify and merge take hf:// too
    code, _, err = cli("split-sparse", f"hf://org/tiny-mixtral@{SHA2}", "-n", 4, "-o", tmp_path / "s", "-q",
                       capsys=capsys)
    assert code == 0, err
    assert cli("verify", tmp_path / "s", "--source", "hf://org/tiny-mixtral", "-q", capsys=capsys)[0] == 0
    assert cli("merge", "hf://org/tiny-mixtral@other", "-o", tmp_path / "m", "-q", capsys=capsys)[0] == 0
    assert_same_as_torrent(wide_src, tmp_path / "m")
    # not in the cache: one line, no traceback, no network
    code, _, err = cli("split", "hf://org/absent", "-o", tmp_path / "y", capsys=capsys)
    assert code == 2 and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: hf://org/absent: ")  # named as written, though click's Path gives hf:/org/absent
    code, _, err = cli("split", "hf://bad spec", "-o", tmp_path / "y", capsys=capsys)
    assert code == 2


def test_hf_uri_honours_hf_home(wide_src, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    hub_repo(tmp_path / "home" / "hub", "org/t", {p.name: p for p in wide_src.iterdir() if p.is_file()})
    code, _, err = cli("split", "hf://org/t", "-n", 2, "-o", tmp_path / "o", "-q", capsys=capsys)
    assert code == 0, err
    assert cli("verify", tmp_path / "o", "--source", wide_src, "-q", capsys=capsys)[0] == 0


# ----------------------------------------------------------------------------- transformers
def reference_logits(W: dict, cfg: ModelConfig, tokens: list[int]) -> torch.Tensor:
    """docs/parity.md "The reference forward" from canonical (Meta-order) weights, float32, no tensor parallelism."""
    F = torch.nn.functional
    T, hd = len(tokens), cfg.head_dim

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    freqs = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]

    def rope(x):  # adjacent pairs (2i, 2i+1)
        x2 = x.reshape(T, x.shape[1], hd // 2, 2)
        a, b = x2[..., 0], x2[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = W["tok_embeddings.weight"][tokens]
    rep = cfg.n_heads // cfg.n_kv_heads
    for L in range(cfg.n_layers):
        p = f"layers.{L}."
        x = rms(h, W[p + "attention_norm.weight"])
        q = rope((x @ W[p + "attention.wq.weight"].T).reshape(T, cfg.n_heads, hd))
        k = rope((x @ W[p + "attention.wk.weight"].T).reshape(T, cfg.n_kv_heads, hd)).repeat_interleave(rep, 1)
        v = (x @ W[p + "attention.wv.weight"].T).reshape(T, cfg.n_kv_heads, hd).repeat_interleave(rep, 1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + mask).softmax(-1)
        h = h + torch.einsum("hqk,khd->qhd", att, v).reshape(T, -1) @ W[p + "attention.wo.weight"].T
        x = rms(h, W[p + "ffn_norm.weight"])
        probs = (x @ W[p + "feed_forward.gate.weight"].T).softmax(-1)
        top, idx = probs.topk(cfg.experts_per_tok, -1)
        top = top / top.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(T):
            for j in range(cfg.experts_per_tok):
                f = p + f"feed_forward.experts.{int(idx[t, j])}."
                act = F.silu(W[f + "w1.weight"] @ x[t]) * (W[f + "w3.weight"] @ x[t])
                y[t] += top[t, j] * (W[f + "w2.weight"] @ act)
        h = h + y
    return rms(h, W["norm.weight"]) @ W["output.weight"].T


def test_transformers_loads_merge_to_hf_with_forward_parity(tmp_path, capsys):
    """The q/k permutation proved by the model itself: transformers' MixtralForCausalLM, loaded
    from `merge --to hf` of a sharded checkpoint, gives the reference logits of the canonical
    weights; and an HF directory transformers itself saved reads back as the same canonical model."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(**dict(ODD, n_heads=8, n_kv_heads=2))  # GQA, head_dim 16 != 48/8, top-1
    src = write_torrent(tmp_path / "src", cfg, seed=5, dtype=torch.float32, params=cfg.to_params())  # theta 5e5 kept
    assert ModelConfig.from_json_file(src / "params.json") == cfg
    W = load(src / "consolidated.00.pth")
    shards, hf = tmp_path / "shards", tmp_path / "hf"
    assert cli("split-sparse", src, "-n", 2, "-o", shards, "-q", "--format", "safetensors", capsys=capsys)[0] == 0
    assert cli("merge", shards, "--to", "hf", "-o", hf, "-q", "--max-position-embeddings", 64, capsys=capsys)[0] == 0
    model, info = transformers.MixtralForCausalLM.from_pretrained(hf, local_files_only=True, output_loading_info=True,
                                                                   dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    attn = model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight.data, to_hf_rows(W["layers.1.attention.wq.weight"], cfg.n_heads))
    assert torch.equal(attn.k_proj.weight.data, to_hf_rows(W["layers.1.attention.wk.weight"], cfg.n_kv_heads))
    tokens = [1, 17, 5, 90, 33, 2, 64, 8, 11]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    want = reference_logits(W, cfg, tokens)
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())
    # transformers' own save_pretrained output (its names, its config.json) is a source: same canonical bytes
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert cli("merge", saved, "-o", tmp_path / "back", "-q", capsys=capsys)[0] == 0
    back = load(tmp_path / "back" / "consolidated.00.pth")
    assert set(back) == set(W) and all(same_bytes(back[k], W[k]) for k in W)


def test_hf_qk_permutation_is_read_in_bounded_blocks():
    """A block of canonical wq/wk rows is gathered from a bounded range of HF rows (the block
    plus at most one head), never the whole tensor."""
    from mixtral_convert.formats.hf import RowPermuted
    from mixtral_convert.io.lazy import Stored
    from mixtral_convert.model.names import qk_gather

    class Recorder(Stored):
        def __init__(self, t):
            super().__init__(t)
            self.calls = []

        def read(self, r0, r1, c0=None, c1=None):
            self.calls.append((r0, r1))
            return super().read(r0, r1, c0, c1)

    n, hd, D = 6, 16, 8
    W = torch.randn(n * hd, D)
    base = Recorder(to_hf_rows(W, n))
    canon = RowPermuted(base, qk_gather(n * hd, n, to_hf=False))
    for rows in (1, 5, hd, 3 * hd):
        base.calls.clear()
        assert torch.equal(torch.cat(list(canon.blocks(block_bytes=rows * D * 4))), W)
        assert all(r1 - r0 <= rows + hd for r0, r1 in base.calls)
    assert torch.equal(canon.read(17, 40, 2, 5), W[17:40, 2:5])
    back = RowPermuted(Stored(W), qk_gather(n * hd, n, to_hf=True))
    assert torch.equal(back.read(0, n * hd), to_hf_rows(W, n))


@pytest.mark.parametrize("other", ["consolidated.00.pth", "consolidated.safetensors"])
def test_accessory_shards_beside_another_format_refused(sources, tmp_path, capsys, other):
    """Accessory refuses a directory of several formats ('multiple formats'); so does every command."""
    d = tmp_path / "both"
    d.mkdir()
    for f in sources["base-st"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / other).write_bytes(b"x")
    code, _, err = cli("split", d, "-n", 2, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "holds both" in err and other.split(".")[1] in err and "Accessory rejects" in err, err
    assert not (tmp_path / "o").exists()


def test_hub_fetches_what_a_mistral_inference_repository_holds(tmp_path, monkeypatch):
    """hf:// on a repository with params.json asks for consolidated.safetensors as well as the
    consolidated.NN.pt files, and for Mistral's tokenizer.model.v3 / .v1 among the small files."""
    from mixtral_convert.formats import registry
    from mixtral_convert.io import hub
    asked = []

    def download(repo, rev, patterns, spec):
        asked.append(list(patterns))
        d = tmp_path / f"snap{len(asked)}"
        d.mkdir()
        (d / "params.json").write_text("{}")
        return d
    monkeypatch.setattr(hub, "download", download)
    hub.resolve_checkpoint("hf://mistralai/some-release", registry.HUB_SMALL_FILES, registry.hub_weight_patterns)
    assert {"tokenizer.model.v3", "tokenizer.model.v1", "params.json"} <= set(asked[0])
    assert "consolidated.safetensors" in asked[1] and "consolidated.*.pt" in asked[1]


# ----------------------------------------------------------------------------- one dispatch
def test_a_new_single_file_reader_and_a_new_adapter_kind_are_one_registry_entry_each(wide_src, tmp_path, monkeypatch):
    """Every source goes through READERS: a reader of single files (as the .tar and .gguf readers
    are) and a reader of adapters read on top of a base (`--base`, as the PEFT reader is) are each
    one entry, with no special case in open_checkpoint."""
    from dataclasses import replace

    from mixtral_convert.errors import ConvertError
    from mixtral_convert.formats import registry
    from mixtral_convert.formats.checkpoint import Reader

    def adapter_on(path, names, base):  # an adapter that scales the output layer by 2
        from mixtral_convert.io.lazy import Stored, materialize
        canonical = dict(base.canonical, **{"output.weight": Stored(materialize(base.canonical["output.weight"]) * 2)})
        return replace(base, path=path, kind="toy-adapter", canonical=canonical)

    single = Reader("toy-file", "a .toy file", claims=lambda p, _: p.name.endswith(".toy"),
                    open=lambda p, _: replace(registry.open_checkpoint(p.read_text()), kind="toy-file"),
                    single_file=True)
    adapter = Reader("toy-adapter", "adapter.toy.json", claims=lambda p, names: "adapter.toy.json" in names,
                     open=lambda p, names: (_ for _ in ()).throw(ConvertError(f"{p}: pass --base")),
                     on_base=adapter_on, on_base_what="a toy adapter")
    monkeypatch.setattr(registry, "READERS", (single, adapter) + registry.READERS)

    (tmp_path / "m.toy").write_text(str(wide_src))
    ck = registry.open_checkpoint(tmp_path / "m.toy")
    assert ck.kind == "toy-file" and ck.cfg == registry.open_checkpoint(wide_src).cfg

    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter.toy.json").write_text("{}")
    on = registry.open_checkpoint(ad, base=wide_src)
    src = load(wide_src / "consolidated.00.pth")
    assert on.kind == "toy-adapter" and on.path == ad
    assert same_bytes(on.canonical["output.weight"].read(0, 4), src["output.weight"][:4] * 2)
    with pytest.raises(ConvertError, match=rf"--base {wide_src}: is for a toy adapter or a trainable-only PEFT save "
                                           rf"\(llama_type mixtral_peft\); {wide_src} is not one: leave --base out"):
        registry.open_checkpoint(wide_src, base=wide_src)


def test_hf_qk_with_an_odd_head_dim_is_refused_not_read_unpermuted(tmp_path, capsys):
    """HF's q/k permutation pairs each head's rows in two halves: with an odd head_dim it cannot be
    undone, and such a checkpoint is refused naming the tensor (it was read in HF's order, silently)."""
    cfg = tiny_config(dim=24, n_heads=4, n_kv_heads=2, head_dim=3, hidden_dim=32, num_experts=2, vocab_size=64,
                      n_layers=1)
    write_torrent(tmp_path / "t", cfg, seed=3)
    sd = load(tmp_path / "t" / "consolidated.00.pth")
    d = tmp_path / "hf"
    d.mkdir()
    save_file({hfnames.canonical_to_hf(k): v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config(max_position_embeddings=4096)))
    code, _, err = cli("inspect", d, capsys=capsys)
    assert code == 2 and err.strip() == (
        "error: tensor 'layers.0.attention.wq.weight': 12 rows are not 4 heads of an even head_dim, so HF's q/k "
        "permutation (rotate-half rotary) cannot be applied or undone; check the config's head count and head_dim")


def test_the_qk_gather_from_hf_is_the_inverse_of_the_gather_to_hf():
    from mixtral_convert.model.names import qk_gather
    for rows, n in [(8, 1), (32, 4), (48, 6), (12, 3)]:
        to, back = qk_gather(rows, n, True), qk_gather(rows, n, False)
        assert torch.equal(to[back], torch.arange(rows)) and torch.equal(back[to], torch.arange(rows))
        assert not torch.equal(to, torch.arange(rows))  # a real permutation
        W = torch.arange(rows * 2.0).reshape(rows, 2)
        # HF's rotate-half order: each head's even rows, then its odd rows
        hd = rows // n
        want = torch.cat([torch.cat([W[h * hd:(h + 1) * hd:2], W[h * hd + 1:(h + 1) * hd:2]]) for h in range(n)])
        assert torch.equal(hfnames.permute_qk_to_hf(W, n), want)
        assert torch.equal(hfnames.permute_qk_from_hf(want, n), W)
