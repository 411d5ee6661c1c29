"""Drive MaxText (Google's JAX LLM stack) as an external program, for side-by-side benchmarks.

MaxText needs Python >= 3.12, so it lives in its own environment and is only ever run as a
subprocess; this module is stdlib-only and imports without MaxText. Install it with

    python3.12 -m venv ENV && ENV/bin/pip install 'maxtext[tpu]'

(the tpu extra brings libtpu, which `aot_memory` needs to compile for a TPU topology on a CPU
host) and point MAXTEXT_PYTHON at ENV/bin/python. Written against maxtext 0.2.5.

- `train_step_times`: MaxText's pre-training loop (maxtext.trainers.pre_train.train) on the CPU
  with synthetic data, at a given model shape; per-step seconds from its log lines.
- `aot_memory`: MaxText's ahead-of-time compile (maxtext.trainers.pre_train.train_compile) of
  one of its model presets for a TPU topology; per-device memory from its memory_analysis.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

TIMEOUT_S = 3600
# MaxText logs "completed step: N, seconds: S" where S runs from the previous step's dispatch to
# this one's, and it waits for step N-1's metrics only after dispatching step N. So logged steps
# 0 and 1 time only the dispatch, and step 2 holds the first execution; later ones are steady.
WARMUP_STEPS = 3
_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
_MEMORY = re.compile(r"Memory analysis: CompiledMemoryStats\((.*)\)")
_FIELD = re.compile(r"(\w+)_size_in_bytes=(\d+)")
_PROBE = ("import importlib.metadata as m, os, maxtext; print(m.version('maxtext')); "
          "print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))")
_LIBTPU = ("import importlib.metadata as m, os, libtpu; print(m.version('libtpu')); "
           "print(os.path.join(os.path.dirname(libtpu.__file__), 'libtpu.so'))")
# maxgpt's remat names -> MaxText settings. MaxText's remat_policy=none skips jax.checkpoint only
# for unscanned layers; with scan_layers=true it wraps the scan body in jax.checkpoint with no
# policy, i.e. full remat (same compiled memory as remat_policy=full). So "none" unrolls.
_REMAT = {
    "none": {"scan_layers": "false", "remat_policy": "none"},
    "full": {"scan_layers": "true", "remat_policy": "full"},
}
# No checkpoints, no tensorboard, no persistent compilation cache (MaxText's default: ~/jax_cache).
_QUIET = {"dataset_type": "synthetic", "enable_checkpointing": "false",
          "enable_tensorboard": "false", "jax_cache_dir": ""}


def _probe(python: str) -> tuple[str, str]:
    """(maxtext version, path of its configs/base.yml); raises if python cannot import maxtext."""
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0], out[1]


def libtpu_of(python: str) -> tuple[str, str]:
    """(version, path of libtpu.so) of the TPU compiler installed in `python`'s environment.
    Memory figures of one program differ between libtpu releases (docs/benchmarks.md), so a
    side-by-side compile points the other stack at this one with TPU_LIBRARY_PATH."""
    out = subprocess.run([python, "-c", _LIBTPU], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0], out[1]


def maxtext_python() -> str | None:
    """The MaxText environment's python from $MAXTEXT_PYTHON, or None if unset or unusable."""
    python = os.environ.get("MAXTEXT_PYTHON")
    if not python:
        return None
    try:
        _probe(python)
    except (OSError, subprocess.SubprocessError):
        return None
    return python


def _run(python: str, base_yml: str, module: str,
         settings: dict[str, str]) -> tuple[list[str], str, float]:
    """Run `python -m module base.yml key=value...` on the CPU in a temporary output directory;
    returns (command, combined output, wall seconds); RuntimeError with its tail on failure."""
    with tempfile.TemporaryDirectory(prefix="maxtext-") as out_dir:
        command = [python, "-m", module, base_yml, f"base_output_directory={out_dir}",
                   *(f"{key}={value}" for key, value in settings.items())]
        # its own libtpu: a libtpu imported by the calling process exports TPU_LIBRARY_PATH
        # (maxgpt's environment may hold an older release, which reads other memory figures
        # and rejects newer Pallas kernels' configs)
        env = {key: value for key, value in os.environ.items() if key != "TPU_LIBRARY_PATH"}
        env["JAX_PLATFORMS"] = "cpu"
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=out_dir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{module} exited {proc.returncode}:\n{tail}")
    return command, proc.stdout, seconds


def train_step_times(python: str, shape: dict, steps: int) -> dict:
    """Train MaxText for WARMUP_STEPS + steps steps at `shape` (keys vocab_size, embed_dim,
    num_layers, num_heads, num_kv_heads, mlp_dim, seq_len, batch_size, dtype, remat) on one CPU
    device: a llama2-style decoder (RMSNorm, RoPE, SwiGLU, no biases, untied embeddings), fp32
    master weights, dot-product attention, AdamW, no dropout, synthetic data."""
    settings = {
        "run_name": "maxgpt_side", "hardware": "cpu", "skip_jax_distributed_system": "true",
        **_QUIET, "steps": str(WARMUP_STEPS + steps),
        "decoder_block": "llama2", "vocab_size": str(shape["vocab_size"]),
        "base_emb_dim": str(shape["embed_dim"]),
        "base_num_decoder_layers": str(shape["num_layers"]),
        "base_num_query_heads": str(shape["num_heads"]),
        "base_num_kv_heads": str(shape["num_kv_heads"]),
        "head_dim": str(shape["embed_dim"] // shape["num_heads"]),
        "base_mlp_dim": str(shape["mlp_dim"]), "mlp_activations": "[silu,linear]",
        "logits_via_embedding": "false", "enable_dropout": "false",
        "max_target_length": str(shape["seq_len"]),
        "per_device_batch_size": str(shape["batch_size"]),
        "dtype": shape["dtype"], "weight_dtype": "float32", "matmul_precision": "default",
        "attention": "dot_product", "opt_type": "adamw", **_REMAT[shape["remat"]],
    }
    if shape.get("num_experts", 0) > 1:  # Mixtral's decoder: every MLP a mixture of experts
        settings.update({
            "decoder_block": "mixtral", "num_experts": str(shape["num_experts"]),
            "num_experts_per_tok": str(shape["experts_per_token"]),
            "base_moe_mlp_dim": str(shape["mlp_dim"]),
            # dropless: tokens sorted by expert and a grouped matmul (on CPU jax's ragged_dot,
            # megablox being a TPU kernel); the load-balancing loss of maxgpt's default
            "sparse_matmul": "true", "megablox": "false", "capacity_factor": "-1",
            "load_balance_loss_weight": "0.01"})
    version, base_yml = _probe(python)
    command, output, _ = _run(python, base_yml, "maxtext.trainers.pre_train.train", settings)
    logged = {int(step): float(sec) for step, sec in _STEP.findall(output)}
    if len(logged) != WARMUP_STEPS + steps:
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(
            f"expected {WARMUP_STEPS + steps} step lines, got {len(logged)}:\n{tail}")
    return {
        "step_seconds": [logged[step] for step in sorted(logged) if step >= WARMUP_STEPS],
        "version": version, "command": command, "settings": settings,
    }


def aot_memory(python: str, model_name: str, topology: str, per_device_batch: int,
               seq_len: int, remat: str, attention: str, **extra: str) -> dict:
    """Compile MaxText's train step for `model_name` (one of its presets, e.g. llama3-8b) on one
    slice of `topology` (e.g. v5p-8) with bf16 compute, fp32 weights and optimizer state, FSDP
    over every chip, and return the compiled per-device memory. `attention` is MaxText's name:
    dot_product, flash, or autoselected (flash on TPU). `extra`: further MaxText settings."""
    settings = {
        "run_name": "maxgpt_side_aot", **_QUIET, "compile_topology": topology,
        "compile_topology_num_slices": "1", "model_name": model_name,
        "per_device_batch_size": str(per_device_batch), "max_target_length": str(seq_len),
        "dtype": "bfloat16", "weight_dtype": "float32", "ici_fsdp_parallelism": "-1",
        "attention": attention, **_REMAT[remat], **extra,
    }
    _, base_yml = _probe(python)
    command, output, seconds = _run(python, base_yml, "maxtext.trainers.pre_train.train_compile",
                                    settings)
    found = _MEMORY.search(output)
    if not found:
        raise RuntimeError("no 'Memory analysis' line in train_compile's output:\n"
                           + "\n".join(output.splitlines()[-30:]))
    sizes = {name: int(value) for name, value in _FIELD.findall(found.group(1))}
    return {
        # MaxText's own "Total estimated memory size": arguments + outputs + temporaries minus
        # the outputs aliased to (donated) arguments; generated code is not counted.
        "bytes_per_device": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"],
        "arguments": sizes["argument"], "temporaries": sizes["temp"], "outputs": sizes["output"],
        "aliased": sizes["alias"], "command": command, "settings": settings,
        # wall time of the whole train_compile process: start-up, tracing, lowering, compiling
        "compile_seconds": seconds,
    }
