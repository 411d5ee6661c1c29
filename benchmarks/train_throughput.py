"""Training throughput and MFU against this machine's own measured matmul peak.

    python benchmarks/train_throughput.py [--config FILE] [--steps N] [--repeats R] [key=value ...]

Method (docs/benchmarks.md):
- the peak is a 2048^3 fp32 matmul, median of 7 timed runs, measured in the same process
  before and after the training runs (both are printed; the higher is the denominator);
- the train step is compiled ahead of time; 2 untimed warm-up steps; then each of `--steps`
  steps is timed to completion (block_until_ready), `--repeats` times; the median step time
  gives tokens/s; MFU = flops_per_token (maxgpt/flops.py) * tokens/s / peak.
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


def time_steps(cfg, steps: int, repeats: int) -> list[float]:
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = build_trainer(cfg, mesh)
    source = SyntheticSource(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len, 0)
    with jax.set_mesh(mesh):
        state = init_state(trainer)
        batches = [source.global_batch(i, trainer.batch_sharding) for i in range(steps)]
        compiled = trainer.step_fn.lower(state, batches[0]).compile()
        for batch in batches[:2]:  # warm-up
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            for batch in batches:
                start = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["mesh.data=1", *args.overrides])

    peak_before = measured_matmul_peak.__wrapped__()
    times = time_steps(cfg, args.steps, args.repeats)
    peak_after = measured_matmul_peak.__wrapped__()
    peak = max(peak_before, peak_after)
    step = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    result = {
        "config": args.config, "params": count_params(cfg), "tokens_per_step": tokens,
        "median_step_s": step, "min_step_s": min(times), "tokens_per_sec": tokens / step,
        "flops_per_token": fpt, "achieved_flops": fpt * tokens / step,
        "peak_flops_before": peak_before, "peak_flops_after": peak_after,
        "mfu_of_measured_peak": fpt * tokens / step / peak,
        "device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{cfg.model.name}: {result['params']:,} params, {tokens} tokens/step on "
          f"{result['device']} (jax {jax.__version__})")
    print(f"  step time  median {step:.3f}s  min {min(times):.3f}s  over {len(times)} steps")
    print(f"  throughput {tokens / step:,.0f} tokens/s, {fpt * tokens / step / 1e9:.1f} GFLOP/s")
    print(f"  peak       {peak_before / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s "
          f"(fp32 matmul, before / after)")
    print(f"  MFU        {100 * result['mfu_of_measured_peak']:.1f}% of the measured peak")


if __name__ == "__main__":
    main()
