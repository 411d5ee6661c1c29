"""Training throughput and MFU against this machine's own measured matmul peak.

    python benchmarks/train_throughput.py [--config FILE] [--steps N] [--json] [key=value ...]

Method (docs/benchmarks.md). The machine is shared and noisy, so the peak is measured right
next to every timed step, in the same process, and each step is compared with its own peak:
- the train step is compiled ahead of time and warmed up with 2 untimed steps;
- then `--steps` times: the peak (a 2048^3 fp32 matmul, median of 5 timed runs), then one
  train step timed to completion (block_until_ready);
- fraction of peak per step = flops_per_token (maxgpt/flops.py) * tokens / step time / that
  peak; reported: the median of those fractions, and the medians of step time and peak.
Runs on whatever single device JAX picks (here: the CPU, all cores as one device).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from maxgpt import sharding
from maxgpt.config import load_config
from maxgpt.data import SyntheticSource
from maxgpt.flops import flops_per_token, measured_matmul_peak
from maxgpt.train import build_trainer, count_params, init_state


def step_timer(cfg, devices=None):
    """Compile cfg's train step for `devices` (default: one), warm it up with 2 untimed
    steps, and return a function that runs one more step to completion and returns its
    seconds."""
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1] if devices is None else devices)
    trainer = build_trainer(cfg, mesh)
    source = SyntheticSource(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len, 0)
    with jax.set_mesh(mesh):
        state = init_state(trainer)
        batches = [trainer.global_batch(next(source)) for _ in range(3)]
        compiled = trainer.step_fn.lower(state, batches[0]).compile()
        for batch in batches[:2]:  # warm-up
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    def one_step() -> float:
        nonlocal state
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            state, metrics = compiled(state, batches[2])
            jax.block_until_ready((state, metrics))
            return time.perf_counter() - start

    return one_step


def time_steps(cfg, steps: int) -> list[tuple[float, float]]:
    """[(peak FLOP/s measured just before, step seconds) for each timed step]."""
    one_step = step_timer(cfg)
    pairs = []
    for _ in range(steps):
        peak = measured_matmul_peak.__wrapped__(repeats=5)  # uncached: measure anew
        pairs.append((peak, one_step()))
    return pairs


def measure(cfg, steps: int) -> dict:
    """The method above for `steps` timed steps of cfg on one device, as a dict."""
    pairs = time_steps(cfg, steps)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    fractions = [fpt * tokens / seconds / peak for peak, seconds in pairs]
    times = [seconds for _, seconds in pairs]
    step, peak = statistics.median(times), statistics.median(p for p, _ in pairs)
    return {
        "params": count_params(cfg), "tokens_per_step": tokens,
        "median_step_s": step, "min_step_s": min(times), "tokens_per_sec": tokens / step,
        "flops_per_token": fpt, "achieved_flops": fpt * tokens / step,
        "median_peak_flops": peak, "peaks": [p for p, _ in pairs], "step_times": times,
        "fraction_of_peak": statistics.median(fractions), "fractions": fractions,
        "device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])
    result = {"config": args.config, **measure(cfg, args.steps)}
    if args.json:
        print(json.dumps(result))
        return
    tokens, step, peak = (result[k] for k in ("tokens_per_step", "median_step_s",
                                              "median_peak_flops"))
    times, fractions, fpt = (result[k] for k in ("step_times", "fractions", "flops_per_token"))
    print(f"{cfg.model.name}: {result['params']:,} params, {tokens} tokens/step on "
          f"{result['device']} (jax {jax.__version__})")
    print(f"  step time  median {step:.3f}s  min {min(times):.3f}s  over {len(times)} steps")
    print(f"  throughput {tokens / step:,.0f} tokens/s, {fpt * tokens / step / 1e9:.1f} GFLOP/s")
    print(f"  peak       median {peak / 1e9:.1f} GFLOP/s (fp32 matmul), range "
          f"{min(result['peaks']) / 1e9:.0f}-{max(result['peaks']) / 1e9:.0f}")
    print(f"  MFU        {100 * result['fraction_of_peak']:.1f}% of the measured peak "
          f"(median over steps of step FLOP/s / adjacent peak; range "
          f"{100 * min(fractions):.1f}-{100 * max(fractions):.1f}%)")

if __name__ == "__main__":
    main()
