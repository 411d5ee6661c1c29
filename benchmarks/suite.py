"""The benchmark suite: every benchmark of this directory in one run, printed as a table.

    python benchmarks/suite.py [--quick] [--only train,memory,...] [--no-write]

Sections: train, memory, compile, data, checkpoint, decode, moe (this machine, one device),
maxtext and maxtext_moe (MaxText at the dense and MoE shapes, when MAXTEXT_PYTHON names a
python with maxtext: maxtext_side.py), aot, aot_70b and aot_moe (llama3-8b for v5p-8,
llama3-70b for v5p-64 and mixtral-8x7b for v5p-32, both stacks), pipeline (mesh.stage on 8
simulated CPU devices) and context (llama3-8b at 32k-128k tokens on v5p-16 with mesh.context=8). Each
reuses its script's measuring function; a failing section reads "not run: <reason>". The
rows go to benchmarks/results/ as JSON and, from a run of all sections, into
docs/benchmarks.md between the suite markers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax

import checkpoint_io  # benchmarks/ is on sys.path when run as a script
import context_memory
import decode_throughput
import moe_throughput
import pipeline_steps
import train_throughput
from data_throughput import pipeline_tokens_per_sec
from maxgpt import sharding
from maxgpt.config import load_config
from maxgpt.data.pipeline import resolve_corpus
from maxgpt.train import _abstract_batch, abstract_state, build_trainer

ROOT = Path(__file__).resolve().parent.parent
DOC, RESULTS = ROOT / "docs" / "benchmarks.md", ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
BENCH = "configs/experiments/bench-cpu.yaml"
MEMORY = {"bench-cpu": (BENCH, []),  # configs whose compiled train step's memory is reported
          "tiny": ("configs/models/tiny.yaml", ["train.batch_size=8", "train.seq_len=256"]),
          "gpt2-small": ("configs/models/gpt2-small.yaml",
                         ["train.batch_size=2", "train.seq_len=1024"])}
# 1 x 8192 per chip of v5p-8 (MaxText's per_device_batch=1); the aot section adds the attention
LLAMA_CONFIG = "configs/models/llama3-8b.yaml"
LLAMA = ["mesh.data=1", "mesh.fsdp=-1", "train.batch_size=4", "train.seq_len=8192",
         "model.remat=full"]
MIXTRAL_CONFIG = "configs/models/mixtral-8x7b.yaml"


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = dict(re.findall(r"^(model name|cpu family|model)\s*:\s*(.*)$", info, re.M))
    name = field.get("model name", platform.processor() or platform.machine())
    if "model" in field:
        name += f" (family {field.get('cpu family')} model {field['model']})"
    return f"{name}, {os.cpu_count()} cores, JAX device {jax.devices()[0].device_kind}"


def versions() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    found = {"python": platform.python_version()}
    found |= {name: importlib.metadata.version(name)
              for name in ("jax", "jaxlib", "flax", "orbax-checkpoint", "grain")}
    dirty = "-dirty" if git("status", "--porcelain") else ""
    found["maxgpt"] = git("rev-parse", "--short", "HEAD") + dirty
    return found


def shape(m, rows: str) -> str:
    return (f"{m.name}: {m.num_layers} layers, width {m.embed_dim}, heads {m.num_heads}/"
            f"{m.num_kv_heads}, MLP {m.mlp_dim}, vocab {m.vocab_size}, {m.dtype}; {rows}")


def train_shape(cfg) -> str:
    return shape(cfg.model, f"batch {cfg.train.batch_size} x {cfg.train.seq_len}, "
                            f"remat {cfg.model.remat}")


def row(case: str, shape: str, result: str, **data) -> dict:
    return {"case": case, "shape": shape, "result": result, "data": data}


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def memory_row(case: str, shape: str, arguments: int, outputs: int, aliased: int,
               temporaries: int, extra: str = "", **data) -> dict:
    """arguments + outputs - aliased + temporaries: MaxText's "total estimated memory"."""
    total = arguments + outputs - aliased + temporaries
    return row(case, shape, f"{size(total)}: arguments {size(arguments)}, outputs "
               f"{size(outputs)} ({size(aliased)} aliased), temporaries {size(temporaries)}"
               + extra, total_bytes=total, argument_bytes=arguments, output_bytes=outputs,
               alias_bytes=aliased, temp_bytes=temporaries, **data)


def compile_step(cfg):
    """(lowering s, compile s, memory analysis) of cfg's train step for one device, from
    abstract state and batch: nothing is allocated."""
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state, batch = abstract_state(trainer), _abstract_batch(trainer)
    with jax.set_mesh(trainer.mesh):
        start = time.perf_counter()
        lowered = trainer.step_fn.lower(state, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at, compiled.memory_analysis()


def trainer_step_s(ctx: dict, steps: int) -> float:
    """The train section's median step of the benchmark shape, or `steps` steps timed now."""
    if "step_s" not in ctx:
        cfg = load_config(BENCH, ["mesh.data=1"])
        ctx["step_s"] = statistics.median(s for _, s in train_throughput.time_steps(cfg, steps))
    return ctx["step_s"]


def train(quick: bool, ctx: dict):
    cfg = load_config(BENCH, ["mesh.data=1"])
    r = train_throughput.measure(cfg, 3 if quick else 12)
    ctx["step_s"] = r["median_step_s"]
    return [row("bench-cpu", train_shape(cfg),
                f"{r['tokens_per_sec']:,.0f} tokens/s, step {r['median_step_s']:.2f} s, "
                f"{r['fraction_of_peak']:.1%} of a {r['median_peak_flops'] / 1e9:.0f} GFLOP/s "
                f"peak (per step {min(r['fractions']):.0%}-{max(r['fractions']):.0%})", **r)], (
        f"train_throughput.py: train step compiled ahead of time, 2 warm-up steps, then "
        f"{len(r['step_times'])} times the fp32 2048^3 matmul peak (median of 5) followed by "
        f"one timed step; tokens/s from the median step; fraction of peak = median over steps "
        f"of maxgpt/flops.py's FLOPs per step / step time / the adjacent peak. Synthetic data.")


def memory(quick: bool, ctx: dict):
    rows = []
    for name, (path, overrides) in MEMORY.items():
        cfg = load_config(path, ["mesh.data=1", *overrides])
        _, _, m = compile_step(cfg)
        rows.append(memory_row(name, train_shape(cfg), m.argument_size_in_bytes,
                               m.output_size_in_bytes, m.alias_size_in_bytes,
                               m.temp_size_in_bytes))
    return rows, ("XLA's memory analysis of the train step compiled for one CPU device from "
                  "abstract state (`step_fn.lower(...).compile().memory_analysis()`); total = "
                  "arguments + outputs - outputs aliased to the donated state + temporaries.")


def compile_time(quick: bool, ctx: dict):
    rows = []
    for unroll, loop in ((1, "a loop of one layer per step"), (-1, "unrolled")):
        for depth in (2, 4, 8, 16):
            cfg = load_config(BENCH, ["mesh.data=1", f"model.num_layers={depth}",
                                      f"model.unroll_layers={unroll}"])
            lower_s, compile_s, m = compile_step(cfg)
            rows.append(row(f"{depth} layers, {loop}", train_shape(cfg),
                            f"lower {lower_s:.1f} s + compile {compile_s:.1f} s, temporaries "
                            f"{size(m.temp_size_in_bytes)}", lower_s=lower_s,
                            compile_s=compile_s, temp_bytes=m.temp_size_in_bytes))
    return rows, ("Wall time of `step_fn.lower` (trace + StableHLO) and of `.compile()` (XLA:CPU) "
                  "from abstract state, once per depth in one process, with the layers as a "
                  "`lax.scan` of one layer per step (`model.unroll_layers=1`, the default off "
                  "CPU: the program does not grow with depth) and unrolled "
                  "(`model.unroll_layers=-1`, the CPU default).")


def data(quick: bool, ctx: dict):
    cfg = load_config(BENCH, ["data.source=builtin"])
    resolve_corpus(cfg)  # corpus and tokenizer prepared outside the timings
    n_batches, tokens = 200, cfg.train.batch_size * cfg.train.seq_len  # as data_throughput
    trainer_rate = tokens / trainer_step_s(ctx, 1 if quick else 3)
    rows = []
    for workers in (0, 1) if quick else (0, 1, 2):
        first, rate = pipeline_tokens_per_sec(cfg, workers, n_batches)
        rows.append(row(f"data.num_workers={workers}", shape(cfg.model, f"rows of "
                        f"{cfg.train.seq_len}, batch {cfg.train.batch_size}"),
                        f"{rate:,.0f} tokens/s ({rate / trainer_rate:,.0f}x the trainer's "
                        f"{trainer_rate:,.0f}), first batch {first:.1f} s",
                        tokens_per_sec=rate, first_batch_s=first,
                        trainer_tokens_per_sec=trainer_rate))
    return rows, (f"data_throughput.py: a fresh training iterator over the built-in corpus "
                  f"(shuffle, tokenise with the shape's 32k BPE, pack, batch, prefetch); the "
                  f"first batch timed alone, then {n_batches} batches as real tokens/s; the "
                  f"trainer's tokens/s is the train section's median step.")


def checkpoint(quick: bool, ctx: dict):
    cfg = load_config(BENCH, ["data.source=synthetic"])
    r = checkpoint_io.measure(cfg, 1 if quick else 3, trainer_step_s(ctx, 1 if quick else 3))
    where = shape(cfg.model, f"AdamW state, {r['state_mb']:,.0f} MB")
    return [row("save", where, f"blocks {r['save_blocking_s']:.3f} s "
                f"({r['save_blocking_fraction_of_step']:.1%} of a step), "
                f"{r['save_mb_per_s']:,.0f} MB/s = {r['save_fraction_of_disk']:.0%} of raw "
                f"write {r['disk_write_mb_per_s']:,.0f} MB/s", **r),
            row("restore", where, f"{r['restore_mb_per_s']:,.0f} MB/s = "
                f"{r['restore_fraction_of_disk']:.0%} of raw read "
                f"{r['disk_read_mb_per_s']:,.0f} MB/s", **r)], (
        "checkpoint_io.py: the state saved with maxgpt's Checkpointer into a temp dir (medians "
        "of repeats): time until save returns, bytes / time until committed, bytes / restore "
        "time; raw disk = the same bytes with 64 MiB writes (no fsync, as orbax) and read back.")


def decode(quick: bool, ctx: dict):
    r = decode_throughput.measure(1 if quick else 3, no_cache=False)
    rows = []
    for name, path in decode_throughput.SHAPES.items():
        m = load_config(path).model
        for batch in (1, 8):
            rate = r[f"{name}_batch{batch}_cache_tokens_per_sec"]
            rows.append(row(f"{name}, batch {batch}", shape(m, f"batch {batch}, prompt "
                            f"{decode_throughput.PROMPT} + {decode_throughput.NEW} new"),
                            f"{rate:,.0f} new tokens/s", tokens_per_sec=rate))
    return rows, ("decode_throughput.py: maxgpt.generate with the KV cache (prefill + a "
                  "lax.while_loop of decode steps in one jitted call), random weights, greedy, "
                  "timed after a compiling run, prefill included; median of repeats.")


def maxtext_side():
    """(the maxtext_side module, MaxText's python, its version); RuntimeError if unusable."""
    try:
        import maxtext_side as side
    except ImportError as e:
        raise RuntimeError(f"benchmarks/maxtext_side.py: {e}") from e
    python = side.maxtext_python()
    if python is None:
        raise RuntimeError("MAXTEXT_PYTHON is unset or its python cannot import maxtext")
    version = subprocess.run([python, "-c", "import importlib.metadata as m; "
                              "print(m.version('maxtext'))"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return side, python, version


def side_by_side_steps(quick: bool, cfg, where: str) -> tuple[list[dict], int, int]:
    """Rows of maxgpt's and MaxText's CPU train steps at cfg's shape (fp32, no remat; an MoE
    model runs Mixtral's decoder on MaxText's side), rounds alternating; (rows, rounds,
    steps per round)."""
    side, python, version = maxtext_side()
    m, tokens = cfg.model, cfg.train.batch_size * cfg.train.seq_len
    spec = {"vocab_size": m.vocab_size, "embed_dim": m.embed_dim, "num_layers": m.num_layers,
            "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "mlp_dim": m.mlp_dim,
            "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
            "dtype": "float32", "remat": "none", "num_experts": m.num_experts,
            "experts_per_token": m.experts_per_token}
    rounds, steps = (1, 2) if quick else (2, 3)
    one_step, ours, theirs = train_throughput.step_timer(cfg), [], []
    for _ in range(rounds):
        ours += [one_step() for _ in range(steps)]
        info = side.train_step_times(python, spec, steps)
        theirs += info["step_seconds"]
    mine, other = statistics.median(ours), statistics.median(theirs)
    return [row("maxgpt", where, f"step {mine:.2f} s, {tokens / mine:,.0f} tokens/s = "
                f"{other / mine:.2f}x MaxText's", step_seconds=ours),
            row(f"MaxText {version}", where, f"step {other:.2f} s, {tokens / other:,.0f} "
                f"tokens/s", step_seconds=theirs, command=info["command"],
                versions={"maxtext": version})], rounds, steps


def maxtext(quick: bool, ctx: dict):
    cfg = load_config(BENCH, ["mesh.data=1"])
    rows, rounds, steps = side_by_side_steps(quick, cfg, train_shape(cfg))
    return rows, (
        f"Rounds ({rounds}) of {steps} timed steps of maxgpt's compiled, warmed-up step "
        f"(train_throughput.step_timer), then MaxText's own training loop at the same shape "
        f"(maxtext_side.train_step_times: llama2 decoder, fp32, AdamW, synthetic data, layers "
        f"unrolled, its first steps dropped) for {steps} logged steps; medians of all steps.")


def moe(quick: bool, ctx: dict):
    r = moe_throughput.measure(3 if quick else 8)
    cfg = load_config(BENCH, [*moe_throughput.SHAPE, *moe_throughput.MODELS["dense"]])
    where = train_shape(cfg) + "; MoE: 8 experts x 1024, top-2 (equal active parameters)"
    names = {"dense": "dense, MLP 2048", "moe_dropless": "MoE dropless",
             "moe_capacity": "MoE capacity 1.25"}
    dense = r["models"]["dense"]["median_step_s"]
    return [row(names[name], where, f"step {m['median_step_s']:.2f} s, "
                f"{m['tokens_per_sec']:,.0f} tokens/s, x{m['median_step_s'] / dense:.2f} the "
                f"dense step", **m) for name, m in r["models"].items()], (
        f"moe_throughput.py: the three train steps compiled and warmed up, then "
        f"{r['rounds']} rounds of one timed step each, in turns; medians; routing statistics "
        f"and the balance loss included.")


def maxtext_moe(quick: bool, ctx: dict):
    cfg = load_config(BENCH, [*moe_throughput.SHAPE, *moe_throughput.MODELS["moe_dropless"]])
    rows, rounds, steps = side_by_side_steps(
        quick, cfg, train_shape(cfg) + "; 8 experts x 1024, top-2, dropless")
    return rows, (
        f"As for maxtext, with Mixtral's decoder on MaxText's side (maxtext_side."
        f"train_step_times with num_experts: sparse_matmul, megablox off on CPU, i.e. jax's "
        f"ragged_dot; capacity_factor -1, dropless; load-balance loss weight 0.01 as "
        f"maxgpt's default); {rounds} rounds of {steps} steps each; medians.")


def side_by_side_aot(config: str, preset: str, topology: str, chips: int, seq_len: int,
                     ours: str, theirs: str, **maxtext: str) -> list[dict]:
    """Rows of `maxgpt compile` of `config` and MaxText's train_compile of `preset` for
    `topology` with MaxText's libtpu: FSDP over the `chips`, one sequence of `seq_len` per
    chip, full remat; `ours`/`theirs` name each stack's kernels; `maxtext`: its settings."""
    side, python, version = maxtext_side()
    libtpu_version, libtpu = side.libtpu_of(python)
    overrides = ["mesh.data=1", "mesh.fsdp=-1", f"train.batch_size={chips}",
                 f"train.seq_len={seq_len}", "model.remat=full"]
    where = train_shape(load_config(config, overrides)) + f", {topology} ({chips} chips), " \
        f"FSDP {chips}"
    r = maxgpt_compile(overrides, libtpu, config, topology)
    rows = [memory_row(
        f"maxgpt, {ours}", where, r["argument_bytes"], r["output_bytes"], r["alias_bytes"],
        r["temp_bytes"], f"; libtpu {libtpu_version}; compile {r['compile_s']:.0f} s",
        versions={"libtpu": libtpu_version}, compile_s=r["compile_s"], command=r["command"])]
    t = side.aot_memory(python, preset, topology, per_device_batch=1, seq_len=seq_len,
                        remat="full", attention="flash", **maxtext)
    ratio = rows[-1]["data"]["total_bytes"] / t["bytes_per_device"]
    rows.append(memory_row(
        f"MaxText {version}, {theirs}", where, t["arguments"], t["outputs"], t["aliased"],
        t["temporaries"], f"; libtpu {libtpu_version}; process {t['compile_seconds']:.0f} s; "
        f"maxgpt / MaxText {ratio:.3f}", versions={"maxtext": version,
                                                   "libtpu": libtpu_version},
        compile_s=t["compile_seconds"], command=t["command"]))
    return rows


def aot_70b(quick: bool, ctx: dict):
    rows = side_by_side_aot("configs/models/llama3-70b.yaml", "llama3-70b", "v5p-64", 32,
                            8192, "splash attention", "flash attention")
    return rows, ("As for aot, for llama3-70b on v5p-64: full remat, bf16 compute, fp32 "
                  "weights and AdamW, FSDP over the 32 chips, 1 x 8192 tokens per chip, "
                  "each stack's TPU attention kernel, the same libtpu.")


def aot_moe(quick: bool, ctx: dict):
    rows = side_by_side_aot(MIXTRAL_CONFIG, "mixtral-8x7b", "v5p-32", 16, 4096, "ragged_dot",
                            "megablox", megablox="true", sparse_matmul="true",
                            capacity_factor="-1")
    return rows, ("As for aot, for mixtral-8x7b on v5p-32: `maxgpt compile` (dropless "
                  "experts through jax.lax.ragged_dot, splash attention) and MaxText's "
                  "train_compile of its mixtral-8x7b preset (megablox grouped matmul, "
                  "sparse_matmul, dropless, flash attention); full remat, bf16 compute, fp32 "
                  "weights and AdamW, FSDP over the 16 chips, 1 x 4096 tokens per chip, the "
                  "same libtpu.")


def maxgpt_compile(overrides: list[str], libtpu: str | None, config: str = LLAMA_CONFIG,
                   topology: str = "v5p-8") -> dict:
    """`maxgpt compile --json` of `config` (llama3-8b) for `topology` (v5p-8) in a fresh
    process, with the libtpu.so at `libtpu` (TPU_LIBRARY_PATH) or this environment's when
    None."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if libtpu:
        env["TPU_LIBRARY_PATH"] = libtpu
    command = [sys.executable, "-m", "maxgpt", "compile", "--config", config,
               "--topology", topology, "--json", *overrides]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):  # 3: compiled, does not fit
        raise RuntimeError(f"maxgpt compile exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command": command}


def aot(quick: bool, ctx: dict):
    cfg = load_config(LLAMA_CONFIG, LLAMA)
    where = train_shape(cfg) + ", v5p-8 (4 chips), FSDP 4"
    try:
        side, python, version = maxtext_side()
        libtpu_version, libtpu = side.libtpu_of(python)
    except Exception as e:  # MaxText is optional: maxgpt alone, with its own libtpu
        side, missing, libtpu = None, e, None
        libtpu_version = importlib.metadata.version("libtpu")
    rows = []
    # each stack's default TPU kernel (splash / flash), then XLA's attention on both
    for ours, theirs in (("splash", "flash"), ("xla", "dot_product")):
        r = maxgpt_compile(LLAMA + [f"model.attention={ours}"], libtpu)
        rows.append(memory_row(
            f"maxgpt, attention={ours}", where, r["argument_bytes"], r["output_bytes"],
            r["alias_bytes"], r["temp_bytes"], f"; libtpu {libtpu_version}; compile "
            f"{r['compile_s']:.0f} s", versions={"libtpu": libtpu_version},
            compile_s=r["compile_s"], command=r["command"]))
        if side is None:
            rows.append(not_run(f"MaxText, attention={theirs}", missing))
            continue
        try:
            t = side.aot_memory(python, "llama3-8b", "v5p-8", per_device_batch=1,
                                seq_len=8192, remat="full", attention=theirs)
        except Exception as e:
            rows.append(not_run(f"MaxText, attention={theirs}", e))
            continue
        ratio = rows[-1]["data"]["total_bytes"] / t["bytes_per_device"]
        rows.append(memory_row(
            f"MaxText {version}, attention={theirs}", where, t["arguments"], t["outputs"],
            t["aliased"], t["temporaries"], f"; libtpu {libtpu_version}; process "
            f"{t['compile_seconds']:.0f} s; maxgpt / MaxText {ratio:.3f}",
            versions={"maxtext": version, "libtpu": libtpu_version},
            compile_s=t["compile_seconds"], command=t["command"]))
    return rows, ("Per-device memory of the train step compiled ahead of time for a v5p-8 "
                  "slice through libtpu (no TPU), both stacks with the SAME libtpu (MaxText's: "
                  "maxgpt's compile runs in a fresh process with TPU_LIBRARY_PATH pointing at "
                  "it; libtpu releases report different temporaries for one program): "
                  "`maxgpt compile --json` and MaxText's train_compile "
                  "(maxtext_side.aot_memory: llama3-8b preset; full remat, bf16 compute, fp32 "
                  "weights and AdamW state, FSDP over the 4 chips, 1 x 8192 tokens per chip). "
                  "Attention: each stack's TPU kernel (maxgpt splash, MaxText flash), then "
                  "XLA's (maxgpt xla, MaxText dot_product). Total = arguments + outputs - "
                  "aliased + temporaries for both (generated code not counted). maxgpt's "
                  "compile time is XLA's alone; MaxText's is its whole process.")


def pipeline_section(quick: bool, ctx: dict):
    # 8 simulated devices need their own process (this one has one CPU device)
    command = [sys.executable, str(ROOT / "benchmarks" / "pipeline_steps.py"), "--json",
               "--rounds", "3" if quick else "7"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = load_config(None, pipeline_steps.SHAPE)
    where = shape(cfg.model, f"batch {cfg.train.batch_size} x {cfg.train.seq_len}, "
                             "8 simulated CPU devices")
    rows = [row(name, where, f"step {r['median_step_s']:.3f} s, x{r['ratio']:.2f} the step "
                f"without a pipeline; bubble {r['bubble']:.1%}, expected x"
                f"{r['expected_ratio']:.2f}", **r) for name, r in result.items()]
    return rows, ("pipeline_steps.py: the train step on 8 simulated CPU devices (sharing this "
                  "machine's cores) for each mesh at the same global batch, compiled ahead of "
                  "time, 2 warm-up steps, then rounds timing one step of every mesh in turn; "
                  "medians; ratio to data=8; expected = 1 / (1 - bubble), since every stage "
                  "computes in every step of the schedule.")


def context_section(quick: bool, ctx: dict):
    lengths = [32768] if quick else [32768, 65536, 131072]
    rows = []
    for r in context_memory.measure(lengths):
        cfg = load_config(LLAMA_CONFIG, [f"train.seq_len={r['length']}"])
        rows.append(memory_row(
            f"{r['length']:,} tokens, {r['setup']}", train_shape(cfg).split(";")[0]
            + "; v5p-16 (8 chips)", r["argument_bytes"], r["output_bytes"],
            r["alias_bytes"], r["temp_bytes"], f"; {'fits' if r['fits'] else 'does NOT fit'} "
            f"in 95 GiB; compile {r['compile_s']:.0f} s", compile_s=r["compile_s"]))
    return rows, ("context_memory.py: `maxgpt compile --json` of llama3-8b for v5p-16 (libtpu, "
                  "no TPU) per sequence length: one sequence split over mesh.context=8 "
                  "against FSDP over 8 chips with a sequence per chip; bf16 compute, fp32 "
                  "weights and AdamW, full remat, splash attention.")


def not_run(case: str, error: Exception) -> dict:
    """A row saying why: the error's first and last lines (the full text goes to stderr)."""
    print(f"[suite] {case} failed: {type(error).__name__}: {error}", file=sys.stderr)
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
    return row(case, "", f"not run: {reason[:300]}", error=f"{type(error).__name__}: {error}")


SECTIONS = {"train": train, "memory": memory, "compile": compile_time, "data": data,
            "checkpoint": checkpoint, "decode": decode, "moe": moe, "maxtext": maxtext,
            "maxtext_moe": maxtext_moe, "aot": aot, "aot_70b": aot_70b, "aot_moe": aot_moe,
            "pipeline": pipeline_section, "context": context_section}


def markdown(rows: list[dict], methods: dict, header: str) -> str:
    lines = [header, "", "| section | case | shape | result |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r[k].replace("|", "/") for k in ("section", "case", "shape",
                                                                 "result")) + " |"
              for r in rows]
    lines += ["", "Methods:", ""] + [f"- **{name}**: {text}" for name, text in methods.items()]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text, block = DOC.read_text(), f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:  # a new section before the first hand-written one
        at = text.index("\n## ") + 1
        text = text[:at] + "## Suite\n\n" + block + "\n\n" + text[at:]
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a few minutes")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--no-write", action="store_true",
                        help="write neither docs/benchmarks.md nor benchmarks/results/")
    args = parser.parse_args()
    names = args.only.split(",")
    if unknown := set(names) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    os.chdir(ROOT)  # config paths are relative to the repository
    # With libtpu installed, JAX's start-up and the aot section load it in this process, and
    # MaxText's compile loads it again: libtpu's lockfile would refuse the second (and any
    # other process's, e.g. tests, while the suite runs). Nothing here uses a real TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    where, found, start = machine(), versions(), time.perf_counter()
    rows, methods, ctx = [], {}, {}
    for name in (n for n in SECTIONS if n in names):  # in suite order
        print(f"[suite] {name} ...", flush=True)
        try:
            section_rows, methods[name] = SECTIONS[name](args.quick, ctx)
        except Exception as e:  # one failing section must not lose the others
            section_rows, methods[name] = [not_run(name, e)], "not run"
        for r in section_rows:
            rows.append({"section": name, **r, "method": methods[name], "machine": where,
                         "versions": found | r["data"].pop("versions", {})})
    minutes, today = (time.perf_counter() - start) / 60, datetime.date.today().isoformat()
    header = (f"`python benchmarks/suite.py{' --quick' if args.quick else ''}`, {today}, "
              f"{minutes:.1f} min. Machine: {where}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in found.items()) + ".")
    block = markdown(rows, methods, header)
    print(block)
    if args.no_write:
        return
    partial = set(names) != set(SECTIONS)  # the docs hold whole runs only
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"suite-{today}{'-' + '-'.join(names) if partial else ''}.json"
    out.write_text(json.dumps({"minutes": minutes, "quick": args.quick, "rows": rows},
                              indent=1, default=str))
    if not partial:
        write_doc(block)
    print(f"[suite] wrote {out.relative_to(ROOT)}" + ("" if partial else f" and {DOC.name}"))


if __name__ == "__main__":
    main()
