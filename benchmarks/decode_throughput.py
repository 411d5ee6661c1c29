"""Decode speed: new tokens per second with the KV cache (maxgpt.generate) and without it
(every new token re-runs the model over the whole sequence so far, one compiled shape of
the final length), for batches of 1 and 8 prompts.

Method: random parameters of the shape (generation speed does not depend on their values),
prompts of 16 tokens, 64 new tokens, greedy, eos never chosen. Each measurement is run once
to compile and then timed `--repeats` times; the median is reported as (batch * new tokens) /
seconds, prefill included. One device. Results are recorded in docs/benchmarks.md.

    python benchmarks/decode_throughput.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxgpt.config import load_config
from maxgpt.data.tokenizer import EOS_ID
from maxgpt.generate import generate
from maxgpt.model import Transformer

PROMPT, NEW = 16, 64
SHAPES = {"tiny": "configs/models/tiny.yaml", "bench": "configs/experiments/bench-cpu.yaml"}


def without_cache(graphdef, params, prompts: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding by full forward passes over a fixed (B, PROMPT + new) buffer."""
    B, P = prompts.shape

    @jax.jit
    def next_tokens(params, buffer, index):
        logits = nnx.merge(graphdef, params)(buffer)  # (B, T, V)
        last = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
        return jnp.argmax(last.at[:, EOS_ID].set(-jnp.inf), axis=-1)

    buffer = jnp.zeros((B, P + new), jnp.int32).at[:, :P].set(prompts)
    for position in range(P, P + new):
        buffer = buffer.at[:, position].set(next_tokens(params, buffer, position - 1))
    return np.asarray(buffer[:, P:])


def timed(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int, no_cache: bool = True) -> dict:
    """New tokens/s of each SHAPES entry at batches 1 and 8, with the cache (and without it)."""
    results = {}
    for name, path in SHAPES.items():
        cfg = load_config(path, ["model.max_seq_len=512"]).model
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
        params = nnx.to_pure_dict(state)
        for batch in (1, 8):
            prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, PROMPT))
            cached = timed(lambda: generate(graphdef, params, cfg, prompts.tolist(),
                                            max_new_tokens=NEW, temperature=0,
                                            min_new_tokens=NEW), repeats)
            results[f"{name}_batch{batch}_cache_tokens_per_sec"] = batch * NEW / cached
            if no_cache:
                full = timed(lambda: without_cache(graphdef, params, prompts, NEW), repeats)
                results[f"{name}_batch{batch}_no_cache_tokens_per_sec"] = batch * NEW / full
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.repeats)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:40s} {value:,.1f}")


if __name__ == "__main__":
    main()
