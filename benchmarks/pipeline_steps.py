"""Pipeline parallelism on 8 simulated CPU devices: the step time of mesh.stage=2 and 4
against no pipeline at the same global batch, beside each schedule's bubble.

    python benchmarks/pipeline_steps.py [--rounds N] [--json]

Method (docs/benchmarks.md): every mesh's train step is compiled ahead of time and warmed up
with 2 steps; then N rounds, each timing one step of every mesh in turn, so that the
machine's swings hit all meshes alike; reported: each mesh's median step and its ratio to
the median step without a pipeline (data=8). The schedule runs every stage in each of its
r M + S - 1 steps, the idle ones on placeholder work (maxgpt/pipeline.py), so the expected
ratio is 1 / (1 - bubble) when compute dominates. The 8 devices share this machine's cores:
the measurement is of work done and of the schedule's overheads, not of a real interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

SHAPE = ["model.num_layers=8", "model.embed_dim=128", "model.num_heads=4",
         "model.num_kv_heads=4", "model.mlp_dim=512", "model.vocab_size=2048",
         "train.batch_size=32", "train.seq_len=128", "data.source=synthetic", "mesh.data=-1"]
MESHES = {  # name: mesh keys
    "no pipeline (data=8)": [],
    "stage=2, 2 microbatches": ["mesh.stage=2"],
    "stage=2, 8 microbatches": ["mesh.stage=2", "mesh.pipeline_microbatches=8"],
    "stage=4, 4 microbatches": ["mesh.stage=4"],
    "stage=4, 16 microbatches": ["mesh.stage=4", "mesh.pipeline_microbatches=16"],
    "stage=4 x 2 repeats, 4 microbatches": ["mesh.stage=4", "mesh.pipeline_repeats=2"],
}


def measure(rounds: int) -> dict:
    """Run in a process of 8 CPU devices (main() sets that up before JAX starts)."""
    import jax

    from maxgpt import pipeline, sharding
    from maxgpt.config import load_config
    from train_throughput import step_timer

    assert jax.device_count() == 8, "8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
    timers, bubbles = {}, {}
    for name, keys in MESHES.items():
        cfg = load_config(None, [*SHAPE, *keys])
        plan = pipeline.schedule(cfg, sharding.make_mesh(cfg.mesh))
        bubbles[name] = 0.0 if plan is None else plan.bubble
        timers[name] = step_timer(cfg, jax.devices())
    times = {name: [] for name in MESHES}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    base = statistics.median(times["no pipeline (data=8)"])
    return {name: {"median_step_s": statistics.median(t), "step_times": t,
                   "bubble": bubbles[name], "ratio": statistics.median(t) / base,
                   "expected_ratio": 1 / (1 - bubbles[name])}
            for name, t in times.items()}


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    for name, r in result.items():
        print(f"{name:38s} step {r['median_step_s']:.3f} s  x{r['ratio']:.2f} "
              f"(bubble {r['bubble']:.1%}: expected x{r['expected_ratio']:.2f})")


if __name__ == "__main__":
    main()
