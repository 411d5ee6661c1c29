"""FLOP accounting and MFU: the one place that says how much work a training token costs.

Convention (the one MFU is reported in, everywhere in maxgpt):

- a multiply-add is 2 FLOPs; training is 3x the forward pass (backward = 2x forward);
- matmul FLOPs: every weight matrix a token passes through, the output projection to the
  vocabulary included and the embedding lookup (a gather) excluded: 6 * matmul params / token;
- attention: QK^T and AV, 4 * N * H FLOPs per visible key per layer in the forward pass.
  **Causal masking is counted**: a query at position i sees min(i + 1, window) keys, so full
  causal attention costs about half of the unmasked T^2 (what a flash kernel actually computes);
- norms, softmax, activations and the optimizer are not counted (as in PaLM's MFU, Chowdhery
  et al. 2022, appendix B).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from maxgpt.chips import chip_for_device_kind
from maxgpt.config import ModelConfig

def mean_visible_keys(seq_len: int, window: int) -> float:
    """Average number of keys a causal query attends to (window 0: unlimited)."""
    w = seq_len if window <= 0 else min(window, seq_len)
    # positions 0..w-1 see i + 1 keys; the remaining seq_len - w positions see w keys.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params_per_token(m: ModelConfig) -> int:
    """Weights a token is multiplied by in one forward pass (biases and norms excluded).

    An MoE layer counts its router, the k experts a token is routed to and the shared
    experts: the active parameters, not the total.
    """
    attn = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp = m.mlp_weights
    moe = sum(m.moe_layers())
    moe_mlp = (m.experts_per_token + m.num_shared_experts) * mlp + m.embed_dim * m.num_experts
    return (m.num_layers * attn + (m.num_layers - moe) * mlp + moe * moe_mlp
            + m.embed_dim * m.padded_vocab_size)  # + logits


def flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward) under the convention above.

    causal=False counts every query against all seq_len keys, masked or not: what a dense
    masked attention (XLA's, on CPU) actually computes; used to check against XLA's count.
    """
    attention = sum(4 * m.num_heads * m.head_dim
                    * (mean_visible_keys(seq_len, w) if causal else seq_len)
                    for w in m.layer_windows())
    return 3 * (2 * matmul_params_per_token(m) + attention)


@functools.cache
def measured_matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a large fp32 matmul on the default backend: the reachable peak of this host.

    Used as the MFU denominator on CPUs, which have no spec-sheet number that XLA reaches.
    Median of `repeats` timed runs after one warm-up.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def peak_flops(devices=None) -> tuple[float | None, str]:
    """(peak FLOP/s of all `devices` together, where the number comes from)."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Simulated CPU devices share the host's cores: the host's peak is the whole budget.
        return measured_matmul_peak(), "measured fp32 matmul peak of this host"
    chip = chip_for_device_kind(kind)
    if chip is None:
        return None, f"no peak known for {kind!r}; mfu is null"
    return chip.peak_bf16 * len(devices), f"{chip.name} bf16 spec-sheet peak x {len(devices)}"
