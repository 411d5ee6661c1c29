#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with one NVIDIA GPU, from a fresh
# checkout: installs maxgpt and JAX's CUDA 12 build (the same JAX version) into .venv-gpu,
# then checks cuDNN attention against XLA's and measures bf16 MFU and the MoE step.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]     # default benchmarks/results
#
# Where there is no NVIDIA GPU it stops at once with exit code 2, before installing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none); run it on one" >&2
  exit 2
fi
nvidia-smi -L
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q -e .
pip install -q "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
python benchmarks/gpu_check.py --out "$out"
