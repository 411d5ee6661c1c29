"""Hugging Face layout: maxgpt parameters <-> `transformers` state dicts and config.json.

Four families map exactly (same arithmetic, so the logits agree to float rounding):

- `openai-gpt`: post-norm LayerNorm, learned positions, tanh GELU, biases, tied embeddings
  (`transformer.h.{i}.attn.c_attn`, a Conv1D of (in, out); ln_1 after attention);
- `gpt2`: the same with pre-norm and a final LayerNorm (`transformer.ln_f`);
- `llama`: pre-norm RMSNorm, RoPE, SwiGLU, no biases, full attention
  (`model.layers.{i}.self_attn.q_proj`, weights stored (out, in));
- `mistral`: llama with a sliding window on every layer (`sliding_window`).

Anything else (GPT-3's alternating banded layers, mixed choices such as RoPE with GELU) has no
Hugging Face class that computes the same function, and is refused rather than exported
approximately. Vocabulary padding rows (see ModelConfig.padded_vocab_size) are dropped on
export and zero-filled on import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from maxgpt.config import ConfigError, ModelConfig
from maxgpt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def family(m: ModelConfig) -> str:
    """The Hugging Face model_type that computes exactly this model, or a ConfigError."""
    gpt = (m.norm == "layernorm" and m.position == "learned" and m.mlp == "gelu"
           and m.use_bias and m.tie_embeddings and m.num_kv_heads == m.num_heads)
    llama = (m.norm == "rmsnorm" and m.position == "rope" and m.mlp == "swiglu"
             and not m.use_bias and m.norm_position == "pre")
    if gpt and m.attention_window == 0:
        if m.norm_position == "post":
            if m.mlp_dim != 4 * m.embed_dim:
                raise ConfigError("openai-gpt fixes the MLP at 4 x embed_dim; this model has "
                                  f"mlp_dim={m.mlp_dim}: no Hugging Face class matches it")
            return "openai-gpt"
        return "gpt2"
    if llama and m.attention_window == 0:
        return "llama"
    if llama and m.window_pattern == "all":
        return "mistral"
    raise ConfigError(
        f"no Hugging Face architecture computes {m.name} exactly (norm {m.norm}/"
        f"{m.norm_position}, positions {m.position}, mlp {m.mlp}, bias {m.use_bias}, "
        f"window {m.attention_window} on {m.window_pattern} layers); refusing to export it "
        "approximately")


def hf_config(m: ModelConfig) -> dict[str, Any]:
    kind = family(m)
    common = {"model_type": kind, "vocab_size": m.vocab_size, "bos_token_id": BOS_ID,
              "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "torch_dtype": "float32"}
    if kind in ("gpt2", "openai-gpt"):
        cfg = {**common, "n_positions": m.max_seq_len, "n_embd": m.embed_dim,
               "n_layer": m.num_layers, "n_head": m.num_heads,
               "layer_norm_epsilon": m.norm_eps, "resid_pdrop": m.dropout,
               "embd_pdrop": m.dropout, "attn_pdrop": 0.0, "tie_word_embeddings": True}
        if kind == "gpt2":
            return {**cfg, "architectures": ["GPT2LMHeadModel"], "n_inner": m.mlp_dim,
                    "activation_function": "gelu_new", "n_ctx": m.max_seq_len}
        return {**cfg, "architectures": ["OpenAIGPTLMHeadModel"], "afn": "gelu"}  # tanh GELU
    cfg = {**common, "architectures": ["LlamaForCausalLM" if kind == "llama" else
                                       "MistralForCausalLM"],
           "hidden_size": m.embed_dim, "intermediate_size": m.mlp_dim,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
           "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_embeddings,
           "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    if kind == "mistral":
        cfg["sliding_window"] = m.attention_window
    return cfg


def _gpt_names(kind: str) -> tuple[str, str]:
    return ("wte", "wpe") if kind == "gpt2" else ("tokens_embed", "positions_embed")


def to_hf(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """maxgpt parameters (pure dict, stacked layers) -> a Hugging Face state dict (numpy)."""
    kind, V, D = family(m), m.vocab_size, m.embed_dim
    p = _numpy(params)
    a, mlp = p["blocks"]["attn"], p["blocks"]["mlp"]
    an, mn = p["blocks"]["attn_norm"], p["blocks"]["mlp_norm"]
    out: dict[str, np.ndarray] = {}
    if kind in ("gpt2", "openai-gpt"):
        wte, wpe = _gpt_names(kind)
        out[f"transformer.{wte}.weight"] = p["embed"][:V]
        out[f"transformer.{wpe}.weight"] = p["pos_embed"]
        for i in range(m.num_layers):
            h = f"transformer.h.{i}."
            out[h + "attn.c_attn.weight"] = np.concatenate(  # Conv1D: (in, out), q|k|v
                [a[n][i].reshape(D, -1) for n in ("q_proj", "k_proj", "v_proj")], axis=1)
            out[h + "attn.c_attn.bias"] = np.concatenate(
                [a[n][i].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")])
            out[h + "attn.c_proj.weight"] = a["o_proj"][i].reshape(-1, D)
            out[h + "attn.c_proj.bias"] = a["o_bias"][i]
            out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = mlp["up_proj"][i], mlp[
                "up_bias"][i]
            out[h + "mlp.c_proj.weight"] = mlp["down_proj"][i]
            out[h + "mlp.c_proj.bias"] = mlp["down_bias"][i]
            for norm, name in ((an, "ln_1"), (mn, "ln_2")):
                out[h + f"{name}.weight"], out[h + f"{name}.bias"] = norm["scale"][i], norm[
                    "bias"][i]
        if kind == "gpt2":
            out["transformer.ln_f.weight"] = p["final_norm"]["scale"]
            out["transformer.ln_f.bias"] = p["final_norm"]["bias"]
        return out
    out["model.embed_tokens.weight"] = p["embed"][:V]
    for i in range(m.num_layers):
        h = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj"):  # (D, heads, H) -> (heads * H, D)
            out[h + f"self_attn.{n}.weight"] = a[n][i].reshape(D, -1).T
        out[h + "self_attn.o_proj.weight"] = a["o_proj"][i].reshape(-1, D).T
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[h + f"mlp.{n}.weight"] = mlp[n][i].T
        out[h + "input_layernorm.weight"] = an["scale"][i]
        out[h + "post_attention_layernorm.weight"] = mn["scale"][i]
    out["model.norm.weight"] = p["final_norm"]["scale"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"][:, :V].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


SHARD_BYTES = 2 * 2**30  # one safetensors file up to 2 GiB, then shards with an index
TOKENIZER_CONFIG = {  # what AutoTokenizer needs to tokenise exactly like maxgpt (tested)
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
    "legacy": False, "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": "<pad>"}


def write_folder(m: ModelConfig, params: dict, out: Path, tokenizer_proto: bytes | None,
                 overwrite: bool = False) -> list[str]:
    """A Hugging Face model folder: config.json, generation_config.json, safetensors (sharded
    with an index past SHARD_BYTES), and the tokenizer. Returns the files written."""
    from safetensors.numpy import save_file

    family(m)  # refuse before touching the output folder
    if tokenizer_proto is None:
        raise ConfigError("this run has no tokenizer (synthetic data): nothing to evaluate "
                          "an export with")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose a new "
                          "--out (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf(m, params)
    groups: list[dict[str, np.ndarray]] = [{}]
    for name, array in state.items():
        if groups[-1] and sum(a.nbytes for a in groups[-1].values()) + array.nbytes > SHARD_BYTES:
            groups.append({})
        groups[-1][name] = array
    if len(groups) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                 for i in range(len(groups))]
        index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())},
                 "weight_map": {n: f for f, g in zip(files, groups) for n in g}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, group in zip(files, groups):
        save_file(group, str(out / name), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(m), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer_proto)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return sorted(p.name for p in out.iterdir())


def verify(m: ModelConfig, params: dict, out: Path, tokenizer, texts: list[str]) -> float:
    """transformers loading `out` against maxgpt's forward on the same text: the largest
    logit difference (raises if tokens differ). Needs torch and transformers."""
    import jax.numpy as jnp
    import torch
    import transformers

    from flax import nnx

    from maxgpt.model import Transformer

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
    model = nnx.merge(graphdef, params)
    worst = 0.0
    for text in texts:
        ids = [BOS_ID, *tokenizer.encode(text)]
        theirs_ids = [BOS_ID, *hf_tokenizer(text)["input_ids"]]
        if ids != theirs_ids:
            raise ConfigError(f"the exported tokenizer splits {text[:40]!r} differently")
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits.numpy()
        ours = np.asarray(model(jnp.asarray([ids])))[..., :m.vocab_size]
        worst = max(worst, float(np.abs(theirs - ours).max()))
    return worst
