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
    """FLOP/s of a large fp32 matmul on the default backend, the median of `repeats` timed
    runs after one warm-up: the reachable peak of this host for benchmarks/, measured once
    on a quiet host. Training runs use `Peak`, which keeps measuring."""
    return 2 * n**3 / statistics.median(_matmul_times(n, repeats))


def _matmul_times(n: int, repeats: int) -> list[float]:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return times


# The CPU probe: the median of 7 timed 1024^3 fp32 matmuls (2.1 GFLOP each, ~0.01-0.05 s on
# two cores) after a warm-up. On the 2-core hosts we measured, its median is that of 2048^3
# (210 vs 205 GFLOP/s) at a fifth of the cost, so the probe can be repeated during a run;
# the median, not the fastest matmul, because single matmuls spike (377 GFLOP/s once).
PROBE_N, PROBE_REPEATS = 1024, 7
# Probed again at a logged row once 50x the last probe's duration has passed (probes cost at
# most 2% of the run), but at least every MAX_GAP_S and at most every MIN_GAP_S; and at the
# next row after MIN_GAP_S when a rate above 90% of the peak says the peak is too low.
MIN_GAP_S, MAX_GAP_S, PROBE_SHARE, SUSPICIOUS_MFU = 10.0, 60.0, 50, 0.9


class Peak:
    """The MFU denominator of a mesh's devices: peak FLOP/s of all of them together.

    TPU/GPU: the chip's dense bf16 spec-sheet number times the devices, fixed.

    CPU: there is no spec-sheet number XLA reaches, so it is measured: fp32 matmul probes
    (simulated devices share the host's cores: the host's rate is the whole budget), the
    median of each probe, and the **highest median seen so far**, probing at the start,
    again during the run (`refresh`) and at its end. Other processes only ever slow a
    matmul down, so the running maximum approaches what the host can do: on a busy host MFU
    falls (the run really gets less of the host) instead of being inflated by a peak
    measured while the cores were taken (a peak measured once, as before, swung MFU from
    13% to 99.8% within one run).
    """

    def __init__(self, devices=None, clock=time.monotonic):
        devices = jax.devices() if devices is None else devices
        self.clock, self.measured = clock, devices[0].platform == "cpu"
        self.value: float | None = None
        self.last, self.cost, self.spent = None, 0.0, 0.0  # seconds: last probe, all
        if self.measured:
            self.source = ("this host's fp32 matmul peak (measured: the highest median of "
                           "probes repeated during the run)")
            self.refresh(force=True)
            return
        chip = chip_for_device_kind(devices[0].device_kind)
        if chip is None:
            self.source = f"no peak known for {devices[0].device_kind!r}; mfu is null"
        else:
            self.value = chip.peak_bf16 * len(devices)
            self.source = f"{chip.name} bf16 spec-sheet peak x {len(devices)}"

    def refresh(self, achieved: float | None = None, force: bool = False) -> float | None:
        """The peak as of now (for a rate of `achieved` FLOP/s just measured); on CPU probed
        again first when that is due (or forced)."""
        if not self.measured:
            return self.value
        now = self.clock()
        since = float("inf") if self.last is None else now - self.last
        gap = min(MAX_GAP_S, max(MIN_GAP_S, PROBE_SHARE * self.cost))
        too_low = achieved is not None and achieved > SUSPICIOUS_MFU * (self.value or 0.0)
        if force or since >= gap or (too_low and since >= MIN_GAP_S):
            times = _matmul_times(PROBE_N, PROBE_REPEATS)
            self.value = max(2 * PROBE_N**3 / statistics.median(times), self.value or 0.0)
            self.last = self.clock()
            self.cost = self.last - now
            self.spent += self.cost
        return self.value

    def mfu(self, achieved: float) -> float | None:
        """MFU of a rate of `achieved` FLOP/s just measured."""
        peak = self.refresh(achieved)
        return None if peak is None else achieved / peak
