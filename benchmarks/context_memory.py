"""Context parallelism ahead of time: per-chip memory of Llama 3 8B's train step on v5p-16
(8 chips) against sequence length, one sequence split over mesh.context=8, beside FSDP over
the same chips holding a whole sequence each.

    python benchmarks/context_memory.py [--lengths 32768,65536,131072] [--json]

Method (docs/benchmarks.md): `maxgpt compile --json` (libtpu, no TPU) in a fresh process per
point; total = arguments + outputs - aliased + temporaries + code, against the chip's 95 GiB.
The llama3-8b preset (bf16 compute, fp32 weights and AdamW state, full remat, splash
attention), model.max_seq_len raised to the length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESHES = {"context=8, 1 sequence": ["mesh.context=8", "train.batch_size=1"],
          "fsdp=8, 8 sequences (one per chip)": ["mesh.fsdp=8", "train.batch_size=8"]}


def compile_json(length: int, keys: list[str]) -> dict:
    command = [sys.executable, "-m", "maxgpt", "compile", "--config",
               "configs/models/llama3-8b.yaml", "--topology", "v5p-16", "--json",
               "mesh.data=1", f"train.seq_len={length}", f"model.max_seq_len={length}", *keys]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode not in (0, 3):  # 3: compiled, does not fit
        raise RuntimeError(f"maxgpt compile exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(lengths: list[int], meshes=MESHES) -> list[dict]:
    return [{**compile_json(length, keys), "length": length, "setup": name}
            for length in lengths for name, keys in meshes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure([int(n) for n in args.lengths.split(",")])
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['length']:>7,} tokens, {r['setup']:36s} {r['bytes_per_device'] / 2**30:6.1f} "
              f"GiB per chip ({'fits' if r['fits'] else 'does NOT fit'}; temporaries "
              f"{r['temp_bytes'] / 2**30:.1f} GiB), compile {r['compile_s']:.0f} s")


if __name__ == "__main__":
    main()
