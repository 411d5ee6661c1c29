"""Mixture of experts on CPU: step throughput against a dense model with the same active
parameters, and dropless against capacity dispatch.

    python benchmarks/moe_throughput.py [--rounds N] [--json] [--layer] [key=value ...]

Method (docs/benchmarks.md): width 512, 4 layers, 8 heads, vocabulary 8192, sequence 512,
batch 8, fp32, one device (all cores). The dense model's SwiGLU MLP is 2048 wide; the MoE
models have 8 experts of width 1024 with 2 per token, so a token meets the same MLP weights
(plus a 512 x 8 router). Each train step is compiled and warmed up first; then the three
models take turns, one timed step each per round, so that noise on this shared machine hits
all three alike. Reported: median step time per model and the ratios of medians.
`--layer` times one feed-forward layer's forward and backward (the dense MLP, or the MoE
layer with its routing statistics) on the same tokens instead: where the step's MoE
overhead is.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import jax

from train_throughput import step_timer  # benchmarks/ is on sys.path when run as a script
from maxgpt.config import load_config
from maxgpt.flops import flops_per_token
from maxgpt.train import active_params, count_params

SHAPE = ["model.vocab_size=8192", "model.num_layers=4", "model.embed_dim=512",
         "model.num_heads=8", "model.num_kv_heads=8", "model.max_seq_len=512",
         "train.batch_size=8", "train.seq_len=512", "mesh.data=1"]
MODELS = {
    "dense": ["model.mlp_dim=2048"],
    "moe_dropless": ["model.mlp_dim=1024", "model.num_experts=8", "model.experts_per_token=2",
                     "model.moe_dispatch=dropless"],
    "moe_capacity": ["model.mlp_dim=1024", "model.num_experts=8", "model.experts_per_token=2",
                     "model.moe_dispatch=capacity", "model.capacity_factor=1.25"],
}


def layer_timers(configs: dict) -> dict:
    """For `--layer`: one feed-forward layer's forward and backward on the benchmark's
    tokens (batch x seq_len), the dense model's MLP or an MoE model's experts (routing
    statistics included, their balance and z losses added to the loss), each jitted and
    warmed up; functions that time one more call."""
    import time

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from maxgpt.model.layers import MLP
    from maxgpt.model.moe import MoE

    timers = {}
    for name, cfg in configs.items():
        m = cfg.model
        layer = (MoE if m.num_experts else MLP)(m, nnx.Rngs(0))
        graphdef, params = nnx.split(layer)
        x = jnp.asarray(np.random.default_rng(0).normal(
            size=(cfg.train.batch_size, cfg.train.seq_len, m.embed_dim)), jnp.float32)
        valid = jnp.ones(x.shape[:2], bool)

        def loss(params, x, graphdef=graphdef, moe=bool(m.num_experts)):
            layer = nnx.merge(graphdef, params)
            if not moe:
                return layer(x).sum()
            y, stats = layer(x, valid)
            return y.sum() + stats["balance_loss"] + stats["z_loss"]

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(params, x))

        def one(step=step, params=params, x=x):
            start = time.perf_counter()
            jax.block_until_ready(step(params, x))
            return time.perf_counter() - start
        timers[name] = one
    return timers


def measure(rounds: int, overrides=(), layer: bool = False) -> dict:
    """The three models' median step (or, `layer`, feed-forward layer) times, in turns."""
    configs = {name: load_config("configs/experiments/bench-cpu.yaml",
                                 [*SHAPE, *extra, *overrides])
               for name, extra in MODELS.items()}
    timers = (layer_timers(configs) if layer else
              {name: step_timer(cfg) for name, cfg in configs.items()})
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, one_step in timers.items():
            times[name].append(one_step())
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "cpu": platform.processor() or platform.machine(), "rounds": rounds,
              "timed": "layer" if layer else "step", "models": {}}
    for name, cfg in configs.items():
        tokens = cfg.train.batch_size * cfg.train.seq_len
        step = statistics.median(times[name])
        result["models"][name] = {
            "params": count_params(cfg), "active_params": active_params(cfg),
            "median_step_s": step, "tokens_per_sec": tokens / step, "step_times": times[name],
            "active_gflops_per_sec": flops_per_token(cfg.model, cfg.train.seq_len) * tokens
            / step / 1e9}
    med = {name: r["median_step_s"] for name, r in result["models"].items()}
    result["moe_dropless_over_dense_time"] = med["moe_dropless"] / med["dense"]
    result["moe_capacity_over_dense_time"] = med["moe_capacity"] / med["dense"]
    result["dropless_over_capacity_time"] = med["moe_dropless"] / med["moe_capacity"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per model")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--layer", action="store_true",
                        help="time one feed-forward layer's forward and backward instead of "
                             "the train step")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = measure(args.rounds, args.overrides, args.layer)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']} ({result['cpu']}), jax {result['jax']}, {args.rounds} rounds, "
          f"timing the {result['timed']}")
    for name, r in result["models"].items():
        print(f"  {name:13s} {r['params']:>11,} params ({r['active_params']:,} active)  "
              f"median {r['median_step_s']:.3f} s  {r['tokens_per_sec']:,.0f} tok/s  "
              f"{r['active_gflops_per_sec']:.1f} active GFLOP/s")
    print(f"  time ratios: dropless/dense {result['moe_dropless_over_dense_time']:.2f}, "
          f"capacity/dense {result['moe_capacity_over_dense_time']:.2f}, "
          f"dropless/capacity {result['dropless_over_capacity_time']:.2f}")


if __name__ == "__main__":
    main()
