"""Hugging Face export: transformers (PyTorch, CPU) computes the same logits as maxgpt."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxgpt.config import ConfigError, load_config
from maxgpt.export import family, hf_config, to_hf
from maxgpt.model import Transformer
from tests.conftest import make_config
from tests.test_model import randomized

torch = pytest.importorskip("torch", reason="parity needs torch (CI installs the CPU build)")
transformers = pytest.importorskip("transformers")

FAMILIES = {
    "openai-gpt": ("tiny-gpt2", "model.norm_position=post", "model.vocab_size=300"),
    "gpt2": ("tiny-gpt2", "model.vocab_size=300", "model.mlp_dim=96"),
    "llama": ("tiny", "model.vocab_size=300", "model.rope_theta=500000"),  # GQA 4:2, untied
    "mistral": ("tiny", "model.vocab_size=300", "model.attention_window=6",
                "model.tie_embeddings=true"),
    "mixtral": ("tiny", "model.vocab_size=300", "model.num_experts=4",
                "model.experts_per_token=2"),  # every layer MoE, no window
}


def export(cfg, params, out):
    from safetensors.numpy import save_file

    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    save_file(to_hf(cfg, params), str(out / "model.safetensors"))


@pytest.mark.parametrize("kind", FAMILIES)
def test_transformers_gives_the_same_logits(kind, tmp_path):
    cfg = make_config(*FAMILIES[kind]).model
    assert family(cfg) == kind
    model, params = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    export(cfg, params, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    assert hf.config.model_type == kind
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_hf_to_maxgpt_to_hf_is_exact(kind, tmp_path):
    from maxgpt import cli
    from maxgpt.checkpoint import load_params
    from maxgpt.export import from_hf, read_folder
    from maxgpt.train import abstract_model

    cfg = make_config(*FAMILIES[kind]).model
    _, params = randomized(Transformer(cfg, nnx.Rngs(1)), std=0.1)
    export(cfg, params, tmp_path / "hf")
    (tmp_path / "hf/tokenizer.model").write_bytes(b"not read here")
    assert cli.main(["import", "--hf", str(tmp_path / "hf"), "--run-dir",
                     str(tmp_path / "run")]) == 0
    imported = load_config(tmp_path / "run/config.yaml")
    assert imported.model.name == f"hf-{kind}"
    _, abstract = abstract_model(imported)
    pure = nnx.to_pure_dict(abstract)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             pure)
    loaded, _ = load_params(imported.checkpoint.load_params_from, pure, shardings)
    again = to_hf(imported.model, loaded)
    _, original = read_folder(tmp_path / "hf")
    assert again.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(again[name], original[name], err_msg=name)
    assert (tmp_path / "run/tokenizer.model").read_bytes() == b"not read here"
    np.testing.assert_array_equal(from_hf(imported.model, original)["embed"][300:], 0)


def test_import_refusals(tmp_path, capsys):
    from maxgpt import cli

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli.main(["import", "--hf", str(tmp_path / "hf"), "--run-dir",
                     str(tmp_path / "run")]) == 2
    assert "unknown model_type 'bert'" in capsys.readouterr().err
    assert cli.main(["import", "--hf", str(tmp_path / "nothing"), "--run-dir",
                     str(tmp_path / "run")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_banded_gpt3_is_refused():
    cfg = make_config("tiny-gpt2", "model.attention_window=4",
                      "model.window_pattern=alternate").model
    with pytest.raises(ConfigError, match="refusing to export it approximately"):
        family(cfg)


def test_mixtral_routing_matters_and_what_transformers_saves_imports(tmp_path):
    """transformers 5 fuses Mixtral's experts in memory (experts.gate_up_proj (E, 2F, D)) and
    save_pretrained writes the hub layout back, or the fused one with save_original_format=
    False: both import to the parameters exported. With a window; tokens spread over experts."""
    from maxgpt.export import from_hf, model_overrides, read_folder

    cfg = make_config(*FAMILIES["mixtral"], "model.attention_window=6").model
    model, params = randomized(Transformer(cfg, nnx.Rngs(3)), std=0.1)
    export(cfg, params, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    assert hf.config.sliding_window == 6 and hf.config.num_local_experts == 4
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), output_router_logits=True)
    for logits in theirs.router_logits:  # one (tokens, E) per layer
        pairs = {tuple(sorted(r)) for r in torch.topk(logits, 2).indices.tolist()}
        assert len(pairs) >= 4, pairs  # routing decides, not one fixed pair of experts
    ours = np.asarray(model(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    np.testing.assert_allclose(theirs.logits.numpy(), ours, atol=1e-4, rtol=1e-4)
    for layout, fused in (("hub", False), ("fused", True)):
        hf.save_pretrained(tmp_path / layout, save_original_format=not fused)
        config, state = read_folder(tmp_path / layout)
        assert any(k.endswith("experts.gate_up_proj") for k in state) == fused, layout
        values = model_overrides(config)
        assert {k: getattr(cfg, k) for k in values if k != "name"} == {
            k: v for k, v in values.items() if k != "name"}
        again, original = to_hf(cfg, from_hf(cfg, state)), to_hf(cfg, params)
        assert again.keys() == original.keys()
        for name in original:
            np.testing.assert_array_equal(again[name], original[name], err_msg=name)


@pytest.mark.parametrize("overrides, reason", [
    (FAMILIES["mixtral"] + ("model.moe_every=2",), "moe_every=2 alternates dense and MoE"),
    (FAMILIES["mixtral"] + ("model.num_shared_experts=1",), "no shared experts"),
    (FAMILIES["mixtral"] + ("model.moe_routing=softmax_topk",), "renormalises the top-k"),
    (FAMILIES["mixtral"] + ("model.moe_dispatch=capacity",), "drops no tokens"),
    (FAMILIES["mixtral"] + ("model.attention_window=4", "model.window_pattern=alternate"),
     "not alternate ones"),
    (FAMILIES["gpt2"] + ("model.num_experts=4",), "the Hugging Face MoE, is llama-like"),
])
def test_moe_that_mixtral_does_not_compute_is_refused(overrides, reason):
    with pytest.raises(ConfigError, match=f"{reason}.*refusing to export it approximately"):
        family(make_config(*overrides).model)
    assert family(make_config(*FAMILIES["llama"], "model.moe_every=2").model) == "llama"


def test_export_command_folder_works_with_transformers(tmp_path, capsys):
    """A trained run, exported by the CLI with --verify; then transformers' own tokenizer
    and generation API on the folder give what maxgpt's greedy generation gives."""
    from maxgpt import cli, loop, train
    from maxgpt.data.tokenizer import BOS_ID
    from maxgpt.generate import generate

    cfg = make_config("tiny", "data.source=builtin", "model.vocab_size=512", "train.steps=2",
                      "train.batch_size=8", "train.seq_len=64", "train.eval_every=0",
                      "data.num_workers=0")
    state, _ = loop.run(cfg, tmp_path / "run", echo=False)
    out = tmp_path / "hf"
    assert cli.main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out),
                     "--verify"]) == 0
    assert "verified with transformers" in capsys.readouterr().out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = "import os\ndef "
    ids = [BOS_ID, *tokenizer(prompt)["input_ids"]]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             min_new_tokens=6)[0, len(ids):].tolist()
    ours = generate(train.abstract_model(cfg)[0], state["params"], cfg.model, [ids],
                    max_new_tokens=6, temperature=0, min_new_tokens=6)[0]
    assert theirs == ours

    # refusals: a non-empty folder without --overwrite
    assert cli.main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    # and back: continue pretraining from the export
    run2 = tmp_path / "continued"
    assert cli.main(["import", "--hf", str(out), "--run-dir", str(run2), "train.steps=1",
                     "train.batch_size=8", "train.seq_len=64", "train.eval_every=0",
                     "data.num_workers=0"]) == 0
    assert cli.main(["train", "--run-dir", str(run2)]) == 0
    assert f"parameters from {run2 / 'imported' / 'checkpoints' / '0'}" in (
        capsys.readouterr().err)


def test_large_exports_are_sharded_with_an_index(tmp_path, monkeypatch):
    from maxgpt import export as export_module
    from maxgpt.data import builtin
    from maxgpt.export import read_folder, write_folder

    cfg = make_config(*FAMILIES["llama"]).model
    model, params = randomized(Transformer(cfg, nnx.Rngs(2)), std=0.1)
    monkeypatch.setattr(export_module, "SHARD_BYTES", 40_000)
    proto = builtin.tokenizer_path(512).read_bytes()
    files = write_folder(cfg, params, tmp_path / "hf", proto)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    _, state = read_folder(tmp_path / "hf")
    assert state.keys() == to_hf(cfg, params).keys()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    tokens = np.arange(2, 14)[None]
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_a_run_without_tokenizer_is_not_exported(tmp_path, capsys):
    from maxgpt import cli, loop, train

    loop.run(make_config("tiny", "train.steps=1", "train.batch_size=8", "train.seq_len=16"),
              tmp_path / "run", echo=False)
    assert cli.main(["export", "--run-dir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "hf")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
