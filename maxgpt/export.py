"""Hugging Face layout: maxgpt parameters <-> `transformers` state dicts and config.json.

Five families map exactly (same arithmetic, so the logits agree to float rounding):

- `openai-gpt`: post-norm LayerNorm, learned positions, tanh GELU, biases, tied embeddings
  (`transformer.h.{i}.attn.c_attn`, a Conv1D of (in, out); ln_1 after attention);
- `gpt2`: the same with pre-norm and a final LayerNorm (`transformer.ln_f`);
- `llama`: pre-norm RMSNorm, RoPE, SwiGLU, no biases, full attention
  (`model.layers.{i}.self_attn.q_proj`, weights stored (out, in));
- `mistral`: llama with a sliding window on every layer (`sliding_window`);
- `mixtral`: mistral (window or none) with a mixture of experts in every layer: top-k of the
  router logits, a softmax over those k, every assignment computed (`block_sparse_moe.gate`,
  `block_sparse_moe.experts.{j}.w1|w3|w2`: gate, up, down, each (out, in)).

Anything else (GPT-3's alternating banded layers, mixed choices such as RoPE with GELU, MoE
layers with shared experts, Switch routing or capacity drops) has no Hugging Face class that
computes the same function, and is refused rather than exported approximately. Vocabulary
padding rows (see ModelConfig.padded_vocab_size) are dropped on export and zero-filled on
import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from maxgpt.config import ConfigError, ModelConfig
from maxgpt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from maxgpt.hf_tokenizer import TOKENIZER_FILES, tokenizer_json, write_tokenizer_files
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike, absolute, as_path, is_remote, one_line, upload_tree


def family(m: ModelConfig) -> str:
    """The Hugging Face model_type that computes exactly this model, or a ConfigError."""
    gpt = (m.norm == "layernorm" and m.position == "learned" and m.mlp == "gelu"
           and m.use_bias and m.tie_embeddings and m.num_kv_heads == m.num_heads)
    llama = (m.norm == "rmsnorm" and m.position == "rope" and m.mlp == "swiglu"
             and not m.use_bias and m.norm_position == "pre")
    if m.moe:
        return _mixtral(m, llama)
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


def _mixtral(m: ModelConfig, llama: bool) -> str:
    """"mixtral" for an MoE model that Hugging Face's Mixtral computes exactly, else why not."""
    why = [(not llama, "mixtral, the Hugging Face MoE, is llama-like (rmsnorm/pre, rope, "
                       f"swiglu, no bias), this model has norm {m.norm}/{m.norm_position}, "
                       f"positions {m.position}, mlp {m.mlp}, bias {m.use_bias}"),
           (m.moe_every != 1, "mixtral has experts in every layer, model.moe_every="
                              f"{m.moe_every} alternates dense and MoE layers"),
           (m.num_shared_experts > 0, "mixtral has no shared experts (model.num_shared_experts="
                                      f"{m.num_shared_experts})"),
           (m.moe_routing != "topk_softmax", "mixtral renormalises the top-k weights to sum to 1 "
                                             f"(model.moe_routing={m.moe_routing})"),
           (m.moe_dispatch != "dropless", "mixtral drops no tokens (model.moe_dispatch="
                                          f"{m.moe_dispatch})"),
           (m.attention_window > 0 and m.window_pattern != "all",
            f"mixtral's sliding window is on every layer, not {m.window_pattern} ones")]
    for refused, reason in why:
        if refused:
            raise ConfigError(f"{reason}: no Hugging Face architecture computes {m.name} "
                              "exactly; refusing to export it approximately")
    return "mixtral"


def hf_config(m: ModelConfig, context: int | None = None) -> dict[str, Any]:
    """config.json. `context` (default model.max_seq_len) is the length evaluators may feed:
    lm-evaluation-harness reads n_positions, then max_position_embeddings, as its window.
    Export passes train.seq_len, the context the model was trained at; a learned position
    table is then cut to that many rows (see to_hf), RoPE needs no table."""
    kind, context = family(m), context or m.max_seq_len
    common = {"model_type": kind, "vocab_size": m.vocab_size, "bos_token_id": BOS_ID,
              "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "torch_dtype": "float32"}
    if kind in ("gpt2", "openai-gpt"):
        cfg = {**common, "n_positions": context, "n_embd": m.embed_dim,
               "n_layer": m.num_layers, "n_head": m.num_heads,
               "layer_norm_epsilon": m.norm_eps, "resid_pdrop": m.dropout,
               "embd_pdrop": m.dropout, "attn_pdrop": 0.0, "tie_word_embeddings": True}
        if kind == "gpt2":
            return {**cfg, "architectures": ["GPT2LMHeadModel"], "n_inner": m.mlp_dim,
                    "activation_function": "gelu_new", "n_ctx": context}
        return {**cfg, "architectures": ["OpenAIGPTLMHeadModel"], "afn": "gelu"}  # tanh GELU
    cfg = {**common, "architectures": [f"{kind.capitalize()}ForCausalLM"],
           "hidden_size": m.embed_dim, "intermediate_size": m.mlp_dim,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
           "max_position_embeddings": context, "rms_norm_eps": m.norm_eps,
           "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
           "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_embeddings,
           "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    if kind == "mistral":
        cfg["sliding_window"] = m.attention_window
    if kind == "mixtral":  # no biases to switch off; the router's aux loss is left at default
        del cfg["attention_bias"], cfg["mlp_bias"]
        cfg.update(sliding_window=m.attention_window or None, num_local_experts=m.num_experts,
                   num_experts_per_tok=m.experts_per_token, output_router_logits=False,
                   router_jitter_noise=0.0)
    return cfg


MIXTRAL_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # hub name: ours


def _gpt_names(kind: str) -> tuple[str, str]:
    return ("wte", "wpe") if kind == "gpt2" else ("tokens_embed", "positions_embed")


def to_hf(m: ModelConfig, params: dict, context: int | None = None) -> dict[str, np.ndarray]:
    """maxgpt parameters (pure dict, stacked layers) -> a Hugging Face state dict (numpy).
    A learned position table keeps its first `context` rows (default all): training at
    train.seq_len never reads a position past it, so later rows are untrained."""
    kind, V, D = family(m), m.vocab_size, m.embed_dim
    p = _numpy(params)
    a, mlp = p["blocks"]["attn"], p["blocks"]["mlp"]
    an, mn = p["blocks"]["attn_norm"], p["blocks"]["mlp_norm"]
    out: dict[str, np.ndarray] = {}
    if kind in ("gpt2", "openai-gpt"):
        wte, wpe = _gpt_names(kind)
        out[f"transformer.{wte}.weight"] = p["embed"][:V]
        out[f"transformer.{wpe}.weight"] = p["pos_embed"][:context or m.max_seq_len]
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
        if kind == "mixtral":  # the hub layout: one (out, in) Linear per expert and matrix
            out[h + "block_sparse_moe.gate.weight"] = mlp["router"][i].T  # (E, D)
            for j in range(m.num_experts):
                for w, n in MIXTRAL_EXPERTS.items():
                    out[h + f"block_sparse_moe.experts.{j}.{w}.weight"] = mlp[n][i, j].T
        else:
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


def write_folder(m: ModelConfig, params: dict, out: PathLike, tokenizer_proto: bytes | None,
                 context: int | None = None, overwrite: bool = False,
                 check: Callable[[Path], None] | None = None) -> list[str]:
    """A Hugging Face model folder: config.json, generation_config.json, safetensors (sharded
    with an index past SHARD_BYTES), and the tokenizer files (maxgpt.hf_tokenizer). `context`
    is the trained context (train.seq_len; see hf_config). Returns the files written.

    `out` may be local or a URI; a remote folder is built locally, given to `check` (e.g. a
    load with transformers, which reads local folders only) and uploaded only if that
    passes, config.json last."""
    family(m)  # refuse before touching the output folder
    if tokenizer_proto is None:
        raise ConfigError("this run has no tokenizer (synthetic data): nothing to evaluate "
                          "an export with")
    if context is not None and not 0 < context <= m.max_seq_len:
        raise ConfigError(f"the export context {context} must be in 1..model.max_seq_len="
                          f"{m.max_seq_len}")
    fast = tokenizer_json(tokenizer_proto)  # also refuses before anything is written
    out = as_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose a new "
                          "--out (nothing was changed)")
    remote = is_remote(out)
    folder = Path(tempfile.mkdtemp(prefix="maxgpt-export-")) if remote else Path(out)
    try:
        files = _write_local_folder(m, params, folder, context or m.max_seq_len)
        write_tokenizer_files(folder, tokenizer_proto, fast, context or m.max_seq_len)
        files += TOKENIZER_FILES
        _readable(folder, files)
        if check is not None:
            check(folder)
        if remote:
            upload_tree(folder, out, last="config.json")
    finally:
        if remote:
            shutil.rmtree(folder)
    return sorted(files)


def _write_local_folder(m: ModelConfig, params: dict, out: Path, context: int) -> list[str]:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = to_hf(m, params, context)
    groups: list[dict[str, np.ndarray]] = [{}]
    for name, array in state.items():
        if groups[-1] and sum(a.nbytes for a in groups[-1].values()) + array.nbytes > SHARD_BYTES:
            groups.append({})
        groups[-1][name] = array
    shards = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    files = [*shards, "config.json", "generation_config.json"]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())},
                 "weight_map": {n: f for f, g in zip(shards, groups) for n in g}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append("model.safetensors.index.json")
    for name, group in zip(shards, groups):
        save_file(group, str(out / name), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(m, context), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2))
    return files


def _readable(folder: Path, files: list[str]) -> None:
    """The files written, all with an ordinary new file's mode (0644 under the usual umask
    022): safetensors creates its files 0600."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    for name in files:
        (folder / name).chmod(0o666 & ~umask)


def model_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """`model.*` values for a Hugging Face config.json; refuses what maxgpt cannot compute."""
    kind = hf.get("model_type")
    if kind in ("gpt2", "openai-gpt"):
        act = hf.get("activation_function" if kind == "gpt2" else "afn",
                     "gelu_new" if kind == "gpt2" else "gelu")
        if act != ("gelu_new" if kind == "gpt2" else "gelu"):  # both mean the tanh GELU
            raise ConfigError(f"{kind} with activation {act!r} is not supported (maxgpt's GELU "
                              "is the tanh approximation)")
        D = hf["n_embd"]
        return {"name": f"hf-{kind}", "vocab_size": hf["vocab_size"],
                "max_seq_len": hf["n_positions"], "num_layers": hf["n_layer"], "embed_dim": D,
                "num_heads": hf["n_head"], "num_kv_heads": hf["n_head"],
                "mlp_dim": (hf.get("n_inner") or 4 * D) if kind == "gpt2" else 4 * D,
                "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                "norm_position": "pre" if kind == "gpt2" else "post", "position": "learned",
                "mlp": "gelu", "use_bias": True, "tie_embeddings": True, "attention_window": 0}
    if kind in ("llama", "mistral", "mixtral"):
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ConfigError(f"{kind} with rope scaling ({rope or hf.get('rope_scaling')}) is "
                              "not supported")
        heads, D = hf["num_attention_heads"], hf["hidden_size"]
        if (hf.get("head_dim") or D // heads) != D // heads:  # save_pretrained writes None
            raise ConfigError(f"head_dim {hf['head_dim']} != hidden_size / heads: not supported")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get(
                "mlp_bias"):
            raise ConfigError(f"this {kind} variant (activation, biases) is not supported")
        window = (hf.get("sliding_window") or 0) if kind != "llama" else 0
        theta, eps = (1e6, 1e-5) if kind == "mixtral" else (10000.0, 1e-6)  # their defaults
        moe = ({"num_experts": hf.get("num_local_experts", 8),
                "experts_per_token": hf.get("num_experts_per_tok", 2), "moe_every": 1,
                "moe_routing": "topk_softmax", "moe_dispatch": "dropless",
                "num_shared_experts": 0} if kind == "mixtral" else {})
        return {"name": f"hf-{kind}", "vocab_size": hf["vocab_size"],
                "max_seq_len": hf.get("max_position_embeddings", 2048),
                "num_layers": hf["num_hidden_layers"], "embed_dim": D, "num_heads": heads,
                "num_kv_heads": hf.get("num_key_value_heads") or heads,
                "mlp_dim": hf["intermediate_size"], "norm": "rmsnorm",
                "norm_eps": hf.get("rms_norm_eps", eps), "norm_position": "pre",
                "position": "rope",
                "rope_theta": rope.get("rope_theta", hf.get("rope_theta", theta)),
                "mlp": "swiglu", "use_bias": False,
                "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "attention_window": window, "window_pattern": "all", **moe}
    raise ConfigError(f"unknown model_type {kind!r}: maxgpt imports openai-gpt, gpt2, llama, "
                      "mistral and mixtral")


def from_hf(m: ModelConfig, state: dict[str, np.ndarray]) -> dict:
    """A Hugging Face state dict -> maxgpt parameters (numpy), the inverse of `to_hf`."""
    kind, D, L = family(m), m.embed_dim, m.num_layers
    N, K, H = m.num_heads, m.num_kv_heads, m.head_dim
    pad = m.padded_vocab_size - m.vocab_size

    def get(name):
        if name not in state:
            raise ConfigError(f"the checkpoint lacks {name}")
        return np.asarray(state[name], np.float32)

    layers = "transformer.h" if kind in ("gpt2", "openai-gpt") else "model.layers"

    def stack(fn):  # fn(prefix of layer i) for every layer, stacked on a leading axis
        return np.stack([fn(f"{layers}.{i}.") for i in range(L)])

    embed_name = ("transformer." + _gpt_names(kind)[0] if kind in ("gpt2", "openai-gpt")
                  else "model.embed_tokens") + ".weight"
    params: dict[str, Any] = {"embed": np.pad(get(embed_name), ((0, pad), (0, 0)))}
    if kind in ("gpt2", "openai-gpt"):
        def qkv(h, part, bias=False):
            w = get(h + "attn.c_attn." + ("bias" if bias else "weight"))
            piece = np.split(w, 3, axis=-1)[part]
            return piece.reshape(N, H) if bias else piece.reshape(D, N, H)

        params["pos_embed"] = get(f"transformer.{_gpt_names(kind)[1]}.weight")
        attn = {n: stack(lambda h, j=j: qkv(h, j)) for j, n in enumerate(
            ("q_proj", "k_proj", "v_proj"))}
        attn.update({n: stack(lambda h, j=j: qkv(h, j, bias=True)) for j, n in enumerate(
            ("q_bias", "k_bias", "v_bias"))})
        attn["o_proj"] = stack(lambda h: get(h + "attn.c_proj.weight").reshape(N, H, D))
        attn["o_bias"] = stack(lambda h: get(h + "attn.c_proj.bias"))
        mlp = {"up_proj": stack(lambda h: get(h + "mlp.c_fc.weight")),
               "up_bias": stack(lambda h: get(h + "mlp.c_fc.bias")),
               "down_proj": stack(lambda h: get(h + "mlp.c_proj.weight")),
               "down_bias": stack(lambda h: get(h + "mlp.c_proj.bias"))}
        norms = {ours: {"scale": stack(lambda h, t=theirs: get(h + f"{t}.weight")),
                        "bias": stack(lambda h, t=theirs: get(h + f"{t}.bias"))}
                 for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"))}
        params["blocks"] = {"attn": attn, "mlp": mlp, **norms}
        if kind == "gpt2":
            params["final_norm"] = {"scale": get("transformer.ln_f.weight"),
                                    "bias": get("transformer.ln_f.bias")}
        return params
    heads = {"q_proj": N, "k_proj": K, "v_proj": K}
    attn = {n: stack(lambda h, n=n: get(h + f"self_attn.{n}.weight").T.reshape(D, heads[n], H))
            for n in heads}
    attn["o_proj"] = stack(lambda h: get(h + "self_attn.o_proj.weight").T.reshape(N, H, D))
    if kind == "mixtral":
        experts = [_mixtral_experts(get, state, f"model.layers.{i}.", m.num_experts)
                   for i in range(L)]
        mlp = {n: np.stack([e[n] for e in experts]) for n in experts[0]}
    else:
        mlp = {n: stack(lambda h, n=n: get(h + f"mlp.{n}.weight").T)
               for n in ("gate_proj", "up_proj", "down_proj")}
    params["blocks"] = {
        "attn": attn, "mlp": mlp,
        "attn_norm": {"scale": stack(lambda h: get(h + "input_layernorm.weight"))},
        "mlp_norm": {"scale": stack(lambda h: get(h + "post_attention_layernorm.weight"))}}
    params["final_norm"] = {"scale": get("model.norm.weight")}
    if not m.tie_embeddings:
        params["lm_head"] = np.pad(get("lm_head.weight").T, ((0, 0), (0, pad)))
    return params


def _mixtral_experts(get, state, h: str, E: int) -> dict[str, np.ndarray]:
    """One Mixtral layer's router (D, E) and experts (E, D, F), (E, F, D), from the hub layout
    (what we and `save_pretrained` write) or transformers' fused in-memory one (what
    `save_pretrained(save_original_format=False)` writes)."""
    if h + "mlp.experts.gate_up_proj" in state:  # (E, 2F, D) gate then up; down (E, D, F)
        gate, up = np.split(get(h + "mlp.experts.gate_up_proj"), 2, axis=1)
        return {"router": get(h + "mlp.gate.weight").T, "gate_proj": gate.transpose(0, 2, 1),
                "up_proj": up.transpose(0, 2, 1),
                "down_proj": get(h + "mlp.experts.down_proj").transpose(0, 2, 1)}
    moe = h + "block_sparse_moe."
    return {"router": get(moe + "gate.weight").T, **{
        n: np.stack([get(moe + f"experts.{j}.{w}.weight").T for j in range(E)])
        for w, n in MIXTRAL_EXPERTS.items()}}


def _read_json(path, what: str) -> dict[str, Any]:
    """A JSON object from a file of a Hugging Face folder; one clear line if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{path} is not valid JSON{where} (a damaged {what} file?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a {what}), not "
                          f"{json.dumps(data)[:40]}")
    return data


def read_config(hf_dir: PathLike) -> dict[str, Any]:
    if not (as_path(hf_dir) / "config.json").is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    return _read_json(as_path(hf_dir) / "config.json", "Hugging Face config")


# safetensors dtype names -> numpy; bfloat16 (how most hub checkpoints are stored) comes from
# ml_dtypes (a jax dependency), which safetensors.numpy does not use.
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _load_safetensors(path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file (local or a URI) as numpy arrays."""
    from safetensors import SafetensorError, deserialize

    try:
        tensors = deserialize(path.read_bytes())
    except SafetensorError as e:  # a truncated download, another format, random bytes
        raise ConfigError(f"{path} is not a readable safetensors file ({one_line(e)}); "
                          "download it again") from None
    state = {}
    for name, tensor in tensors:
        dtype = SAFETENSORS_DTYPES.get(tensor["dtype"])
        if dtype is None:
            raise ConfigError(f"{path}: tensor {name} is {tensor['dtype']}; maxgpt reads "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
        state[name] = np.frombuffer(tensor["data"], dtype).reshape(tensor["shape"])
    return state


def read_folder(hf_dir: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json and all weights (one safetensors file or an index of shards), from a
    local folder or a URI. A file that is not what it claims is the user's error, named."""
    hf_dir = as_path(hf_dir)
    config = read_config(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{index} has no weight_map of parameter names to files")
        files = sorted(set(weight_map.values()))
    state: dict[str, np.ndarray] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ConfigError(f"{hf_dir / name} is missing (only safetensors weights are read)")
        state.update(_load_safetensors(hf_dir / name))
    return config, state


def import_folder(hf_dir: PathLike, run_dir: PathLike, overrides=()) -> RunDir:
    """`maxgpt import`: a new run directory whose training starts from the Hugging Face
    weights (via checkpoint.load_params_from), with the folder's sentencepiece tokenizer.
    Either may be local or a URI."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from maxgpt.layouts import check_architecture
    from maxgpt.config import load_config
    from maxgpt.train import abstract_model

    run_dir, hf_dir = RunDir(run_dir), as_path(hf_dir)
    if run_dir.holds_run():
        raise ConfigError(f"{run_dir} already holds a run; import into a new --run-dir "
                          "(nothing was changed)")
    values = model_overrides(read_config(hf_dir))  # refuse before reading any weights
    _, state = read_folder(hf_dir)
    imported = absolute(run_dir.path / "imported")
    # a folder's context (a maxgpt export's is its train.seq_len) bounds the default rows
    context = min(load_config(None).train.seq_len, values["max_seq_len"])
    cfg = load_config(None, [f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}"
                             for k, v in values.items()]
                      + [f"train.seq_len={context}", f"checkpoint.load_params_from={imported}",
                         *overrides])
    params = from_hf(cfg.model, state)
    check_architecture(params, nnx.to_pure_dict(abstract_model(cfg)[1]), f"{hf_dir}")
    manager = ocp.CheckpointManager(imported / "checkpoints", item_names=("state",),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"params": jax.tree.map(np.asarray, params)})))
    manager.wait_until_finished()
    manager.close()
    tokenizer = hf_dir / "tokenizer.model"
    run_dir.write(cfg, tokenizer.read_bytes() if tokenizer.is_file() else None)
    return run_dir
