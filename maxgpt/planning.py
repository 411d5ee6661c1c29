"""Compute-optimal planning: from a FLOP budget to parameters, tokens, a model shape and a loss.

Two answers side by side:

- the fitted Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022,
  approach 3). Its published fit is known to be off (it gives ~40B parameters at Gopher's
  budget, where the paper's other two approaches and Chinchilla itself say ~70B); we use the
  refit of the same data by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
  attempt"): E 1.8172, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658. Minimising L subject to
  C = 6 N D gives N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
  Losses are in nats per token of Chinchilla's data and tokenizer (MassiveText): the shape of
  the answer transfers, the absolute loss only roughly;
- the rule of thumb of 20 tokens per parameter: C = 6 N (20 N).

N counts all parameters, embeddings included, as Chinchilla does.
"""

from __future__ import annotations

import dataclasses
import math

from maxgpt.chips import parse_slice

TOKENS_PER_PARAM = 20
SECONDS_PER_DAY = 86400


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta, N parameters, D training tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    @property
    def _g(self) -> float:
        a, b = self.alpha, self.beta
        return (a * self.A / (b * self.B)) ** (1 / (a + b))

    def optimal(self, flops: float) -> tuple[float, float]:
        """(parameters, tokens) minimising the loss at `flops` = 6 N D."""
        n = self._g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (6 * n)

    def optimal_tokens(self, params: float) -> float:
        """The tokens for which `params` is the compute-optimal size (inverse of optimal)."""
        flops_6 = (params / self._g) ** ((self.alpha + self.beta) / self.beta)
        return flops_6 / params


CHINCHILLA = Law(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def rule_of_thumb(flops: float) -> tuple[float, float]:
    """(parameters, tokens) with tokens = 20 x parameters and flops = 6 N D."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def budget_flops(slice_name: str, days: float, mfu: float) -> float:
    """Training FLOPs a slice delivers in `days` at model FLOPs utilisation `mfu`."""
    chip, chips = parse_slice(slice_name)
    return chip.peak_bf16 * chips * days * SECONDS_PER_DAY * mfu


# Llama 3 style shapes: width / depth near 128 (Llama 3 8B: 4096 / 32 = 128, 70B: 102, 405B:
# 130; GPT-3 175B: 128), heads of 128 (64 below width 1024),
# kv heads: the largest divisor of heads up to heads / 8 (GQA), SwiGLU width 3.5 x embed
# rounded to 256 (14336 for 4096), untied embeddings.
ASPECT = 128


def llama_shape(layers: int, width: int, vocab: int) -> dict:
    head_dim = 128 if width >= 1024 else 64
    heads = max(1, width // head_dim)
    kv = max(k for k in range(1, max(1, heads // 8) + 1) if heads % k == 0)
    return {"num_layers": layers, "embed_dim": width, "num_heads": heads, "num_kv_heads": kv,
            "mlp_dim": max(256, round(3.5 * width / 256) * 256), "vocab_size": vocab}


def llama_params(shape: dict) -> int:
    L, D, V = shape["num_layers"], shape["embed_dim"], shape["vocab_size"]
    H = D // shape["num_heads"]
    attn = D * H * (2 * shape["num_heads"] + 2 * shape["num_kv_heads"])
    return L * (attn + 3 * D * shape["mlp_dim"] + 2 * D) + D + 2 * V * D


def model_shape(params: float, vocab: int = 32000) -> dict:
    """A Llama-style shape (model.* keys) within ~10% of `params` with width / depth nearest
    ASPECT; widths in multiples of 128 (64 below 1024)."""
    widths = [*range(64, 1024, 64), *range(1024, 128 * 1024 + 1, 128)]
    best = None
    for layers in range(1, 257):
        # counts grow with width: the first width at or above the target, or the one before
        i = next((i for i, d in enumerate(widths)
                  if llama_params(llama_shape(layers, d, vocab)) >= params), len(widths) - 1)
        for width in widths[max(0, i - 1):i + 1]:
            shape = llama_shape(layers, width, vocab)
            off = abs(math.log(llama_params(shape) / params))
            score = (off > 0.1, abs(math.log(width / layers / ASPECT)), off)
            if best is None or score < best[0]:
                best = (score, shape)
    return best[1]


def plan(flops: float, vocab: int = 32000, law: Law = CHINCHILLA) -> dict:
    """Everything `maxgpt plan` prints, as a dict."""
    n, d = law.optimal(flops)
    n20, d20 = rule_of_thumb(flops)
    shape = model_shape(n, vocab)
    return {"flops": flops, "params": n, "tokens": d, "loss": law.loss(n, d),
            "tokens_per_param": d / n,
            "rule_of_thumb": {"params": n20, "tokens": d20, "loss": law.loss(n20, d20)},
            "model": shape, "model_params": llama_params(shape)}
