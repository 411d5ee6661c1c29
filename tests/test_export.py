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


CONTEXT = 64  # train.seq_len of the trained run below; model.max_seq_len is 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny llama-style model trained 2 steps on the built-in corpus, exported by the CLI
    with --verify: (config, trained state, run dir, export folder, what export printed)."""
    import contextlib
    import io

    from maxgpt import cli, loop

    tmp = tmp_path_factory.mktemp("exported")
    cfg = make_config("tiny", "data.source=builtin", "model.vocab_size=512", "train.steps=2",
                      "train.batch_size=8", f"train.seq_len={CONTEXT}", "train.eval_every=0",
                      "data.num_workers=0")
    assert cfg.model.max_seq_len > CONTEXT
    state, _ = loop.run(cfg, tmp / "run", echo=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["export", "--run-dir", str(tmp / "run"), "--out", str(tmp / "hf"),
                         "--verify"]) == 0
    return cfg, state, tmp / "run", tmp / "hf", printed.getvalue()


def test_export_command_folder_works_with_transformers(exported, tmp_path, capsys):
    """The CLI's folder, verified without sentencepiece; then transformers' own tokenizer
    (bos first by default) and generation API give what maxgpt's greedy generation gives."""
    from maxgpt import cli, train
    from maxgpt.data.tokenizer import BOS_ID
    from maxgpt.generate import generate

    cfg, state, run, out, printed = exported
    assert "verified with transformers, without sentencepiece" in printed
    assert f"context {CONTEXT}" in printed
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} == {
        p.name for p in out.iterdir()}

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.max_position_embeddings == CONTEXT and tokenizer.model_max_length == CONTEXT
    prompt = "import os\ndef "
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             min_new_tokens=6)[0, len(ids):].tolist()
    ours = generate(train.abstract_model(cfg)[0], state["params"], cfg.model, [ids],
                    max_new_tokens=6, temperature=0, min_new_tokens=6)[0]
    assert theirs == ours

    # refusals: a non-empty folder without --overwrite
    assert cli.main(["export", "--run-dir", str(run), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    # and back: continue pretraining from the export
    run2 = tmp_path / "continued"
    assert cli.main(["import", "--hf", str(out), "--run-dir", str(run2), "train.steps=1",
                     "train.batch_size=8", f"train.seq_len={CONTEXT}", "train.eval_every=0",
                     "data.num_workers=0"]) == 0
    assert cli.main(["train", "--run-dir", str(run2)]) == 0
    assert f"parameters from {run2 / 'imported' / 'checkpoints' / '0'}" in (
        capsys.readouterr().err)


def test_exported_files_are_world_readable(exported):
    """0644 under the usual umask, safetensors included (it writes 0600 files itself)."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    out = exported[3]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
    if umask == 0o022:
        assert set(modes.values()) == {0o644}


def test_verify_without_torch_refuses_before_writing(exported, tmp_path, capsys, monkeypatch):
    """--verify's prerequisites are checked first: one line, exit 2, no folder, so the same
    command works once torch is installed."""
    import importlib.util

    from maxgpt import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    out = tmp_path / "hf"
    assert cli.main(["export", "--run-dir", str(exported[2]), "--out", str(out),
                     "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--verify needs torch" in err and "nothing was written" in err
    assert len(err.splitlines()) == 1 and not out.exists()


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
    from maxgpt import cli, loop

    loop.run(make_config("tiny", "train.steps=1", "train.batch_size=8", "train.seq_len=16"),
              tmp_path / "run", echo=False)
    assert cli.main(["export", "--run-dir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "hf")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


TEXTS = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog.",
         "  leading   spaces\t\ttabs\n\n\n  newlines   ", "\n", " ", "", "x" * 300, "\t" * 9,
         "naïve café — ünïcödé 日本語の文章 🤖🧪 emoji, Ωμέγα, Привет, עברית",
         "12345 + 678 = 99999; 3.14159e-10", "<s> literal </s> <unk> <pad> <0x41> ▁▁ tokens",
         "\x00\x01\x7f\u200b\ufeff\U0010ffff odd code points",
         "import os\nfor i in range(10):\n\tprint(f'{i:03d}')  # comment\r\n",
         "    " * 20 + "}\n" + " " * 33 + "end", "a\u3000b\xa0c\u2028d\r\ne\x0bf\x0c  \u3000"]


def varied_texts(n=150, seed=0):
    """TEXTS and random strings over an alphabet of code, whitespace runs and unicode."""
    import random

    rng = random.Random(seed)
    alphabet = list("abcdefxyz_ABC0123456789 \t\n.,;:(){}[]'\"#=+-*/\\") + [
        "  ", "    ", "\n\n", "é", "ß", "日", "本", "🤖", "\u0301", "▁", "<s>", "def ", "self."]
    return TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
                    for _ in range(n)]


@pytest.fixture(scope="module")
def unigram_proto(tmp_path_factory):
    """A small unigram sentencepiece model trained the way maxgpt trains (seconds)."""
    from maxgpt.data import builtin
    from maxgpt.data.tokenizer import train_tokenizer

    docs = [p.read_text(errors="replace") for p in builtin.stdlib_files()[:40]]
    docs.append("日本語 café naïve 🤖 " * 50)
    path = tmp_path_factory.mktemp("unigram") / "unigram.model"
    return train_tokenizer(docs, path, 400, model_type="unigram", sample_bytes=400_000,
                           progress=False).model_proto


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_json_gives_sentencepiece_ids(kind, unigram_proto, tmp_path):
    """tokenizer.json, read by `tokenizers` and by transformers, splits code, whitespace runs,
    newlines, unicode, unknown characters (byte fallback) and literal special-token text
    exactly as maxgpt's sentencepiece model does, and decodes back to the text."""
    from tokenizers import Tokenizer as FastTokenizer

    from maxgpt.data import builtin
    from maxgpt.data.tokenizer import BOS_ID, Tokenizer
    from maxgpt.hf_tokenizer import model_spec, tokenizer_json, write_tokenizer_files

    proto = builtin.tokenizer_path(512).read_bytes() if kind == "bpe" else unigram_proto
    assert model_spec(proto)["model_type"] == kind
    ours = Tokenizer(proto)
    write_tokenizer_files(tmp_path, proto, tokenizer_json(proto), CONTEXT)
    fast = FastTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast.encode_special_tokens = True  # what split_special_tokens sets in transformers
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = varied_texts()
    byte_fallback, ties = 0, []
    for text in texts:
        ids, theirs = ours.encode(text), fast.encode(text, add_special_tokens=False).ids
        assert hf(text)["input_ids"] == [BOS_ID, *theirs], repr(text)
        assert hf.decode(theirs) == ours.decode(ids), repr(text)  # a literal ▁ reads " "
        byte_fallback += any(ours._sp.is_byte(i) for i in ids)
        if kind == "bpe" or theirs == ids:
            assert theirs == ids, repr(text)
            continue
        # unigram: sentencepiece sums piece scores in float32, tokenizers in float64, so two
        # segmentations of equal score (e.g. 8+11+1 or 1+8+11 spaces) can break differently
        score = [sum(ours._sp.get_score(i) for i in x) for x in (ids, theirs)]
        assert score[1] == pytest.approx(score[0], abs=1e-4), repr(text)
        ties.append(text)
    assert byte_fallback >= 3  # unknown characters were exercised
    assert len(ties) <= len(texts) // 20, ties
    assert hf.bos_token_id == BOS_ID and hf.eos_token_id == 3 and hf.pad_token_id == 0


def test_an_unsupported_tokenizer_is_refused_before_writing(tmp_path):
    """A sentencepiece model with NFKC normalisation (sentencepiece's default, not what maxgpt
    trains) is refused with one line, and the export folder is not created."""
    import io

    import sentencepiece as spm

    from maxgpt.export import write_folder

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                   vocab_size=350, byte_fallback=True, minloglevel=2,
                                   character_coverage=0.99, pad_id=0, unk_id=1, bos_id=2,
                                   eos_id=3)
    cfg = make_config(*FAMILIES["llama"]).model
    with pytest.raises(ConfigError, match="normalization 'nmt_nfkc'.*retrain it"):
        write_folder(cfg, {}, tmp_path / "hf", model.getvalue())  # refused before weights
    assert not (tmp_path / "hf").exists()


# lm-evaluation-harness's `hf` backend in a process where sentencepiece and protobuf cannot be
# imported (lm-eval[hf] installs neither): None in sys.modules makes `import` fail and
# importlib.util.find_spec report the package absent, which is what transformers checks.
LM_EVAL_CHILD = """
import json, sys
for name in ("sentencepiece", "google.protobuf"):
    sys.modules[name] = None
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

folder, requests = sys.argv[1], json.loads(sys.stdin.read())
def instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=tuple(a), idx=i)
            for i, a in enumerate(args)]
out = {}
for flags in ({}, {"add_bos_token": False}):
    lm = HFLM(pretrained=folder, device="cpu", dtype="float32", batch_size=3, **flags)
    key = ",".join(f"{k}={v}" for k, v in flags.items()) or "default"
    out[key] = {
        "max_length": lm.max_length,
        "loglikelihood": [ll for ll, _ in lm.loglikelihood(
            instances("loglikelihood", requests["choices"]), disable_tqdm=True)],
        "rolling": lm.loglikelihood_rolling(
            instances("loglikelihood_rolling", [[d] for d in requests["documents"]]),
            disable_tqdm=True),
        "first_tokens": [lm.tok_encode(d)[:2] for d in requests["documents"]]}
print(json.dumps(out))
"""

QUESTIONS = [("Question: which keyword defines a function in Python?\nAnswer:",
              [" def", " class", " lambda x: x", " import"]),
             ("import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(",
              ["arg)", "os.path.join(arg, 'x'))", " sys.argv)"]),
             ("The capital of France is", [" Paris.", " Berlin.", " 日本 🤖"])]
DOCUMENTS = ["def add(a, b):\n    return a + b\n",
             "Ünïcödé, tabs\tand   spaces.\n\n\nThe end.",
             "class Parser:\n    def __init__(self, text):\n        self.text = text\n" * 12]


def maxgpt_logprobs(cfg, params, sequences) -> list[np.ndarray]:
    """For each token list, log p(ids[t+1] | ids[:t+1]) from maxgpt's JAX forward: one
    right-padded batch (causal, so padding after a sequence cannot change it)."""
    from maxgpt import train

    model = nnx.merge(train.abstract_model(cfg)[0], params)
    T = max(len(s) for s in sequences)
    batch = np.zeros((len(sequences), T), np.int32)
    for row, ids in zip(batch, sequences):
        row[:len(ids)] = ids
    logits = np.asarray(model(jnp.asarray(batch)))[..., :cfg.model.vocab_size]
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return [logp[k, np.arange(len(ids) - 1), ids[1:]] for k, ids in enumerate(sequences)]


def test_lm_eval_hf_backend_without_sentencepiece_scores_as_maxgpt(exported):
    """lm-eval's real `hf` backend on the export, without sentencepiece or protobuf:

    - multiple-choice loglikelihoods with default flags equal maxgpt's for `bos context
      choice` (bos first, as every training document starts), within 1e-3 nats;
    - perplexity (loglikelihood_rolling) with `add_bos_token=False` equals maxgpt's over the
      same windows (the first starts with bos), relative 1e-4; lm-eval prepends bos to rolling
      windows itself, so the default (tokenizer adds bos) gives two there;
    - the context lm-eval uses is the trained one (train.seq_len), so a long document is
      scored in several windows."""
    import subprocess
    import sys

    from maxgpt.data.tokenizer import BOS_ID, Tokenizer

    cfg, state, _, out, _ = exported
    sp = Tokenizer((out / "tokenizer.model").read_bytes())
    params = state["params"]
    choices = [(q, c) for q, cs in QUESTIONS for c in cs]
    child = subprocess.run([sys.executable, "-c", LM_EVAL_CHILD, str(out)], input=json.dumps(
        {"choices": choices, "documents": DOCUMENTS}), capture_output=True, text=True,
        timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    default, no_bos = results["default"], results["add_bos_token=False"]
    assert default["max_length"] == no_bos["max_length"] == CONTEXT

    # log p(choice | bos context), split where lm-eval splits the whole encoding
    sequences = [[BOS_ID, *sp.encode(q + c)] for q, c in choices]
    ours = [lp[len(sp.encode(q)):].sum()
            for lp, (q, _) in zip(maxgpt_logprobs(cfg, params, sequences), choices)]
    np.testing.assert_allclose(default["loglikelihood"], ours, atol=1e-3, rtol=0)
    spread = [np.ptp(ours[i:i + len(cs)]) for i, (_, cs) in zip(
        np.cumsum([0] + [len(cs) for _, cs in QUESTIONS]), QUESTIONS)]
    assert min(spread) > 1e-2  # the choices are told apart, so equality means something

    windows = []  # (document, inputs + last target, targets): CONTEXT inputs at most, the
    for k, doc in enumerate(DOCUMENTS):  # first window bos + the document's first tokens
        ids, done = sp.encode(doc), 0
        while done < len(ids):
            end = min(len(ids), done + CONTEXT)
            windows.append((k, [BOS_ID, *ids[:end]] if done == 0 else ids[end - CONTEXT - 1:end],
                            end - done))
            done = end
    ours_rolling = np.zeros(len(DOCUMENTS))
    for (k, _, n), lp in zip(windows, maxgpt_logprobs(cfg, params, [w for _, w, _ in windows])):
        ours_rolling[k] += lp[-n:].sum()
    assert len(sp.encode(DOCUMENTS[2])) > 2 * CONTEXT  # several windows
    np.testing.assert_allclose(no_bos["rolling"], ours_rolling, rtol=1e-4)
    assert all(t[0] != BOS_ID for t in no_bos["first_tokens"])
    assert all(t == [BOS_ID, sp.encode(d)[0]] for t, d in zip(default["first_tokens"],
                                                                 DOCUMENTS))
    rel = np.abs(np.subtract(no_bos["rolling"], ours_rolling)) / np.abs(ours_rolling)
    nats = np.abs(np.subtract(default["loglikelihood"], ours))
    wrong_rel = np.abs(np.subtract(default["rolling"], ours_rolling)) / np.abs(ours_rolling)
    wrong_nats = np.abs(np.subtract(no_bos["loglikelihood"], ours))
    print(f"perplexity rel diff {rel.max():.1e} (default flags: {wrong_rel.max():.1e}), "
          f"choice loglikelihood diff {nats.max():.1e} (add_bos_token=False: "
          f"{wrong_nats.max():.1e})")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_trained_context_is_what_evaluators_read(kind, tmp_path):
    """write_folder(context=train.seq_len): lm-eval's window (n_positions, then
    max_position_embeddings) is the trained context; a learned position table keeps that many
    rows (later rows were never trained), RoPE has none; the folder loads and computes
    maxgpt's logits, and imports back."""
    from lm_eval.models.utils import resolve_max_length

    from maxgpt.data import builtin
    from maxgpt.export import model_overrides, read_folder, write_folder

    cfg = make_config(*FAMILIES[kind]).model
    context = 12
    assert cfg.max_seq_len > context
    model, params = randomized(Transformer(cfg, nnx.Rngs(4)), std=0.1)
    write_folder(cfg, params, tmp_path / "hf", builtin.tokenizer_path(512).read_bytes(),
                 context=context)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert resolve_max_length(hf.config, tokenizer) == context
    assert tokenizer.model_max_length == context
    config, state = read_folder(tmp_path / "hf")
    if kind == "gpt2":
        assert state["transformer.wpe.weight"].shape == (context, cfg.embed_dim)
    assert model_overrides(config)["max_seq_len"] == context
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, context))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_verify_loads_without_sentencepiece(exported, tmp_path):
    """--verify's child process really lacks sentencepiece: the same folder without
    tokenizer.json (what maxgpt exported before) does not load there, with a one-line error."""
    import shutil

    from maxgpt.data.tokenizer import Tokenizer
    from maxgpt.hf_verify import verify

    cfg, state, _, out, _ = exported
    shutil.copytree(out, tmp_path / "hf")
    (tmp_path / "hf/tokenizer.json").unlink()
    tokenizer = Tokenizer((out / "tokenizer.model").read_bytes())
    with pytest.raises(ConfigError, match="does not load without sentencepiece: ") as error:
        verify(cfg.model, state["params"], tmp_path / "hf", tokenizer, ["x"], CONTEXT)
    assert "\n" not in str(error.value)
