"""Quantization on this machine's CPU: what int8/fp8 training and int8/int4 weights cost in
loss, and what they do to speed and memory.

    python benchmarks/quantization.py [--steps 200] [--json OUT]

- train: the default model (configs/base.yaml) on the built-in corpus, `--steps` steps, one
  device, with model.dtype float32 (the CPU default) and bfloat16, and model.quantize int8
  and fp8 (bfloat16 compute): final held-out loss (train.eval_steps batches) and the median
  step time of the logged rows after the first.
- weights: the float32 run's checkpoint evaluated with --quantize int8 (per channel), int4
  (per channel) and int4 in groups of 64: held-out loss against full precision, weight bytes.
- decode: new tokens/s of greedy generation (prompt 16, 64 new tokens, KV cache) with the
  default model's shape in float32, bfloat16, int8 and int4 weights, batches 1 and 8; random
  weights (speed does not depend on their values). Median of 3 after a compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maxgpt import inference, loop, quantize, sharding  # noqa: E402
from maxgpt.config import load_config  # noqa: E402
from maxgpt.generate import generate  # noqa: E402
from maxgpt.model import Transformer  # noqa: E402

from decode_throughput import timed  # noqa: E402  (benchmarks/ is on sys.path as a script)

TRAIN = {"float32": [], "bfloat16": ["model.dtype=bfloat16"],
         "int8": ["model.dtype=bfloat16", "model.quantize=int8"],
         "fp8": ["model.dtype=bfloat16", "model.quantize=fp8"]}
WEIGHTS = {"int8": ("int8", 0), "int4": ("int4", 0), "int4-g64": ("int4", 64)}


def train(steps: int, workdir: Path) -> dict:
    out = {}
    for name, overrides in TRAIN.items():
        cfg = load_config(None, [f"train.steps={steps}", "train.log_every=10",
                                 "mesh.data=1", *overrides])
        start = time.perf_counter()
        _, history = loop.run(cfg, workdir / name, devices=jax.devices()[:1], echo=False)
        rows = [r for r in history if "step_time_s" in r][1:]
        evals = [r for r in history if "eval_loss" in r]
        out[name] = {"eval_loss": evals[-1]["eval_loss"],
                     "median_step_s": statistics.median(r["step_time_s"] for r in rows),
                     "skipped_steps": rows[-1]["skipped_steps"],
                     "wall_s": time.perf_counter() - start}
        print(name, out[name], flush=True)
    return out


def weights(run_dir: Path) -> dict:
    full = inference.evaluate_checkpoint(run_dir)
    out = {"float32": {"eval_loss": full["eval_loss"], "weight_bytes": None}}
    for name, q in WEIGHTS.items():
        m = inference.evaluate_checkpoint(run_dir, quantize=q)
        out[name] = {"eval_loss": m["eval_loss"], "weight_bytes": m["weight_bytes"],
                     "loss_change": m["eval_loss"] / full["eval_loss"] - 1}
        print(name, out[name], flush=True)
    return out


def decode(repeats: int = 3) -> dict:
    cfg = load_config(None, ["model.max_seq_len=512", "mesh.data=1"])
    variants = {}
    for dtype in ("float32", "bfloat16"):
        model_cfg = dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype)
        graphdef, state = nnx.split(Transformer(model_cfg, nnx.Rngs(0)))
        variants[dtype] = (graphdef, nnx.to_pure_dict(state), model_cfg)
    graphdef, params, model_cfg = variants["float32"]
    names = sharding.param_names(nnx.split(Transformer(model_cfg, nnx.Rngs(0)))[1])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        placed = sharding.param_shardings(names, params, mesh)
        for kind in ("int8", "int4"):
            q, _ = quantize.quantize_weights(jax.device_put(params, placed), names, placed,
                                             kind, 0)
            variants[kind] = (graphdef, q, model_cfg)
    out = {}
    for name, (graphdef, p, model_cfg) in variants.items():
        for batch in (1, 8):
            prompts = np.random.default_rng(0).integers(4, model_cfg.vocab_size, (batch, 16))

            def run():
                generate(graphdef, p, model_cfg, prompts.tolist(), max_new_tokens=64,
                         temperature=0, min_new_tokens=64)

            out[f"{name}_batch{batch}_tokens_per_sec"] = batch * 64 / timed(run, repeats)
        out[f"{name}_weight_bytes"] = quantize.weight_bytes(p)
        print(name, {k: v for k, v in out.items() if k.startswith(name)}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", default="train,weights,decode")
    args = parser.parse_args()
    only = args.only.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "train" in only or "weights" in only:
            results["train"] = train(args.steps, Path(tmp))
            results["weights"] = weights(Path(tmp) / "float32")
        if "decode" in only:
            results["decode"] = decode()
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
