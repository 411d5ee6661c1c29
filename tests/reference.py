"""Naive float64 numpy references, written from the papers, sharing no code with maxgpt.

Loops where a loop is the clearest statement of the definition; the model's params come in
as a pure dict (nnx.to_pure_dict) and are read by name.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np


def f64(x):
    return np.asarray(x, dtype=np.float64)


def layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def rmsnorm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
    """Rotary embedding as a complex rotation of (x_j, x_{j+H/2}) pairs by pos * theta^(-2j/H)."""
    B, T, N, H = x.shape
    half = H // 2
    out = np.empty_like(x)
    for b in range(B):
        for t in range(T):
            for j in range(half):
                angle = positions[b, t] * theta ** (-2.0 * j / H)
                z = (x[b, t, :, j] + 1j * x[b, t, :, j + half]) * np.exp(1j * angle)
                out[b, t, :, j], out[b, t, :, j + half] = z.real, z.imag
    return out


def visible(q, k, seg_q, seg_k, window):
    """May query index q see key index k? Causal, same document, inside the window."""
    return k <= q and seg_q == seg_k and (window == 0 or q - k < window)


def explicit_mask(segment_ids, window):
    B, T = segment_ids.shape
    return np.array([[[visible(q, k, segment_ids[b, q], segment_ids[b, k], window)
                       for k in range(T)] for q in range(T)] for b in range(B)])


def attention_core(q, k, v, mask):
    """q: (B,T,N,H), k/v: (B,T,K,H), mask: (B,T,T). Query head n uses kv head n // (N/K)."""
    B, T, N, H = q.shape
    group = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            kv = n // group
            scores = q[b, :, n] @ k[b, :, kv].T / math.sqrt(H)  # (T, T)
            scores = np.where(mask[b], scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, n] = p @ v[b, :, kv]
    return out


def attention(p, x, mask, positions, cfg):
    def proj(name):
        y = np.einsum("btd,dnh->btnh", x, f64(p[f"{name}_proj"]))
        return y + f64(p[f"{name}_bias"]) if cfg.use_bias else y

    q, k, v = proj("q"), proj("k"), proj("v")
    if cfg.position == "rope":
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    y = np.einsum("btnh,nhd->btd", attention_core(q, k, v, mask), f64(p["o_proj"]))
    return y + f64(p["o_bias"]) if cfg.use_bias else y


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def mlp(p, x, cfg):
    def lin(name, h):
        y = h @ f64(p[f"{name}_proj"])
        return y + f64(p[f"{name}_bias"]) if cfg.use_bias else y

    if cfg.mlp == "swiglu":
        gate = lin("gate", x)
        h = gate / (1 + np.exp(-gate)) * lin("up", x)
    else:
        h = gelu_tanh(lin("up", x))
    return lin("down", h)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def moe(p, x, cfg, valid=None, capacity=None):
    """Mixture of experts, one token at a time (Shazeer et al. 2017; Fedus et al. 2021).

    Each valid token's router logits pick k experts: Mixtral's top-k then softmax, or
    Switch's softmax then top-k. With a `capacity`, each expert serves at most that many
    assignments per row, all first choices of the row before any second choice, in token
    order; the rest are dropped. Returns (y, dropped assignments)."""
    B, T, D = x.shape
    E, k = cfg.num_experts, cfg.experts_per_token
    valid = np.ones((B, T), bool) if valid is None else valid
    y = np.zeros_like(x)
    dropped = 0
    for b in range(B):
        served = [0] * E
        chosen = {}
        for t in range(T):
            if valid[b, t]:
                logits = x[b, t] @ f64(p["router"])
                top = list(np.argsort(-logits, kind="stable")[:k])
                w = (softmax(logits[top]) if cfg.moe_routing == "topk_softmax"
                     else softmax(logits)[top])
                chosen[t] = list(zip(top, w))
        for slot in range(k):
            for t in range(T):
                if t not in chosen:
                    continue
                e, w = chosen[t][slot]
                served[e] += 1
                if capacity is not None and served[e] > capacity:
                    dropped += 1
                    continue
                expert = {f"{name}_proj": f64(p[f"{name}_proj"])[e]
                          for name in ("up", "gate", "down") if f"{name}_proj" in p}
                bias_free = SimpleNamespace(mlp=cfg.mlp, use_bias=False)  # experts have none
                y[b, t] += w * mlp(expert, x[b, t], bias_free)
    if "shared" in p:
        y = y + mlp(p["shared"], x, cfg)
    return y, dropped


def norm(p, x, cfg):
    if cfg.norm == "rmsnorm":
        return rmsnorm(x, f64(p["scale"]), cfg.norm_eps)
    return layernorm(x, f64(p["scale"]), f64(p["bias"]) if "bias" in p else None, cfg.norm_eps)


def block(p, x, mask, positions, cfg, valid=None):
    def ffn(h):
        return moe(p["mlp"], h, cfg, valid)[0] if "router" in p["mlp"] else mlp(p["mlp"], h, cfg)

    if cfg.norm_position == "post":
        x = norm(p["attn_norm"], x + attention(p["attn"], x, mask, positions, cfg), cfg)
        return norm(p["mlp_norm"], x + ffn(x), cfg)
    x = x + attention(p["attn"], norm(p["attn_norm"], x, cfg), mask, positions, cfg)
    return x + ffn(norm(p["mlp_norm"], x, cfg))


def forward(params, tokens, cfg, positions=None, segment_ids=None):
    """Logits (B, T, V) of the whole decoder, one layer after another."""
    B, T = tokens.shape
    positions = np.tile(np.arange(T), (B, 1)) if positions is None else positions
    segment_ids = np.ones((B, T), int) if segment_ids is None else segment_ids
    x = f64(params["embed"])[tokens]
    if cfg.position == "learned":
        x = x + f64(params["pos_embed"])[positions]
    windows = cfg.layer_windows()
    dense = moe_layers = 0
    for i in range(cfg.num_layers):
        # with moe_every = n > 1, layers n-1, 2n-1, ... are MoE and live in "moe_blocks"
        if "moe_blocks" in params and i % cfg.moe_every == cfg.moe_every - 1:
            layer, moe_layers = _index(params["moe_blocks"], moe_layers), moe_layers + 1
        else:
            layer, dense = _index(params["blocks"], dense), dense + 1
        x = block(layer, x, explicit_mask(segment_ids, windows[i]), positions, cfg,
                  segment_ids > 0)
    if cfg.norm_position == "pre":
        x = norm(params["final_norm"], x, cfg)
    head = f64(params["embed"]).T if cfg.tie_embeddings else f64(params["lm_head"])
    return x @ head


def _index(tree, i):
    return {k: _index(v, i) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()}


def cross_entropy(logits, targets, weights):
    """Mean over weighted tokens of -log softmax(logits)[target]."""
    logits = f64(logits)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((log_z - picked) * weights).sum() / weights.sum(), log_z
