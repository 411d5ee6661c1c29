"""What only an NVIDIA GPU can show: cuDNN attention against XLA's, bf16 MFU of a ~1B dense
model, and the MoE step against dense. Run through benchmarks/gpu_check.sh, which installs
JAX's CUDA build first.

    python benchmarks/gpu_check.py [--out DIR] [--steps N]

Writes DIR/gpu_check.json (default benchmarks/results/) and prints a summary; exits 1 if
cuDNN and XLA disagree, 2 where there is no GPU (at once, before any work).

1. cuDNN attention (`model.attention=cudnn`, bf16) against XLA's attention in the same
   model and weights: loss and every gradient, relative to the largest XLA value (bf16
   rounding: bound 2e-2), for GQA with packed documents and padding, and for a sliding
   window.
2. bf16 MFU of a Llama-style 1.2B model (width 2048, 16 layers, 16 heads / 8 kv heads, MLP
   8192, vocabulary 32,000, sequence 2048, batch 8, cuDNN attention, no remat): training
   FLOPs per token (maxgpt/flops.py) x tokens / median step time / the chip's bf16 dense
   peak (maxgpt/chips.py; H100/H200: 989 TFLOP/s). Target on an H200: >= 50%.
3. The moe_throughput.py models (equal active parameters) in bf16 at batch 32: dropless and
   capacity dispatch against dense, alternating rounds, medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
DENSE_1B = ["model.vocab_size=32000", "model.embed_dim=2048", "model.num_layers=16",
            "model.num_heads=16", "model.num_kv_heads=8", "model.mlp_dim=8192",
            "model.max_seq_len=2048", "model.dtype=bfloat16", "model.remat=none",
            "model.attention=cudnn", "train.batch_size=8", "train.seq_len=2048",
            "mesh.data=1", "mesh.fsdp=1"]


def cudnn_against_xla() -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from maxgpt.config import load_config
    from maxgpt.model.transformer import Transformer

    cases = {"gqa, packed documents, padding": [],
             "sliding window 256": ["model.attention_window=256"]}
    T, results = 1024, {}
    for name, extra in cases.items():
        cfg = load_config(ROOT / "configs/models/tiny.yaml", [
            "model.dtype=bfloat16", f"model.max_seq_len={T}", "model.embed_dim=512",
            "model.num_heads=8", "model.num_kv_heads=2", *extra])
        xla = Transformer(dataclasses.replace(cfg.model, attention="xla"), nnx.Rngs(0))
        cudnn = Transformer(dataclasses.replace(cfg.model, attention="cudnn"), nnx.Rngs(1))
        nnx.update(cudnn, nnx.state(xla))
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, T)), jnp.int32)
        segments = np.ones((2, T), np.int32)
        segments[1] = [1] * 400 + [2] * 500 + [0] * 124
        positions = np.stack([np.arange(T), [*range(400), *range(500), *range(124)]])

        def value_and_grad(model):
            graphdef, params = nnx.split(model)

            def loss(p):
                m = nnx.merge(graphdef, p)
                hidden, _ = m.hidden(tokens, jnp.asarray(positions), jnp.asarray(segments))
                logp = jax.nn.log_softmax(m.logits(hidden).astype(jnp.float32))
                targets = jnp.roll(tokens, -1, axis=1)[..., None]  # next-token cross-entropy
                return -(jnp.take_along_axis(logp, targets, -1)[..., 0] * (segments > 0)).mean()

            return jax.jit(jax.value_and_grad(loss))(params)

        want, want_grads = value_and_grad(xla)
        got, got_grads = value_and_grad(cudnn)
        worst = max(float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                          / max(float(jnp.abs(b.astype(jnp.float32)).max()), 1e-30))
                    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)))
        results[name] = {"loss_xla": float(want), "loss_cudnn": float(got),
                         "loss_rel_err": abs(float(got) - float(want)) / abs(float(want)),
                         "worst_grad_rel_err": worst}
        results[name]["ok"] = (results[name]["loss_rel_err"] < 2e-2 and worst < 2e-2)
    return results


def dense_mfu(steps: int) -> dict:
    from maxgpt.chips import chip_for_device_kind
    from maxgpt.config import load_config
    from maxgpt.flops import flops_per_token
    from maxgpt.train import count_params
    from train_throughput import step_timer

    cfg = load_config(None, DENSE_1B)
    one_step = step_timer(cfg)
    times = [one_step() for _ in range(steps)]
    step = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    flops = flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    chip = chip_for_device_kind(jax.devices()[0].device_kind)
    peak = chip.peak_bf16 if chip else float("nan")  # an unknown GPU: MFU unknown
    return {"params": count_params(cfg), "median_step_s": step, "step_times": times,
            "tokens_per_sec": tokens / step, "flops_per_step": flops, "peak_flops": peak,
            "mfu": flops / step / peak}


def moe_against_dense(rounds: int) -> dict:
    from maxgpt.config import load_config
    from moe_throughput import MODELS, SHAPE
    from train_throughput import step_timer

    keys = ["model.dtype=bfloat16", "train.batch_size=32"]
    timers = {name: step_timer(load_config(None, [*SHAPE, *extra, *keys]))
              for name, extra in MODELS.items()}
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, one_step in timers.items():
            times[name].append(one_step())
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"median_step_s": med, "step_times": times,
            "dropless_over_dense": med["moe_dropless"] / med["dense"],
            "capacity_over_dense": med["moe_capacity"] / med["dense"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    devices = jax.devices()
    if devices[0].platform != "gpu":
        print(f"gpu_check: no GPU for JAX (its devices: {devices[0].platform}); run "
              "benchmarks/gpu_check.sh on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    start = time.perf_counter()
    result = {"device": devices[0].device_kind, "jax": jax.__version__,
              "cudnn_vs_xla": cudnn_against_xla()}
    print(json.dumps(result["cudnn_vs_xla"], indent=1), flush=True)
    result["dense_1b_bf16"] = dense_mfu(args.steps)
    print(f"dense 1.2B bf16: {result['dense_1b_bf16']['median_step_s']:.3f} s/step, MFU "
          f"{result['dense_1b_bf16']['mfu']:.1%}", flush=True)
    result["moe_bf16"] = moe_against_dense(args.steps)
    print(f"MoE step / dense step: dropless {result['moe_bf16']['dropless_over_dense']:.2f}, "
          f"capacity {result['moe_bf16']['capacity_over_dense']:.2f}", flush=True)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if all(c["ok"] for c in result["cudnn_vs_xla"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
