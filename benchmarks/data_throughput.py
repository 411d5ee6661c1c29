"""Data pipeline throughput (read, tokenise, pack, batch) against what the trainer consumes.

Method: for each worker count, a fresh training iterator over the built-in corpus with the
benchmark shape's tokenizer and row length; the first batch (process start-up, first reads)
is timed separately, then `--batches` batches are timed and reported as tokens/s. The
trainer's consumption is measured in the same run: the benchmark shape's train step
(configs/experiments/bench-cpu.yaml, synthetic batches, one device), median of `--steps`
steps timed by train_throughput.py's `time_steps` (two warm-up steps first). The ratio
pipeline / trainer must stay above 10 so data never stalls a step. Results are recorded
in docs/benchmarks.md.

    python benchmarks/data_throughput.py [--batches 200] [--steps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from train_throughput import time_steps  # benchmarks/ is on sys.path when run as a script

from maxgpt.config import load_config
from maxgpt.data.pipeline import batches, resolve_corpus


def pipeline_tokens_per_sec(cfg, workers: int, n_batches: int) -> tuple[float, float]:
    """(seconds to the first batch, tokens/s over the next n_batches)."""
    corpus = resolve_corpus(cfg)
    start = time.perf_counter()
    it = batches(corpus, "train", seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                 seed=0, num_workers=workers, prefetch=cfg.data.prefetch)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        tokens += int((next(it)["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    it.close()
    return first, tokens / seconds


def trainer_tokens_per_sec(cfg, steps: int) -> float:
    step_seconds = [seconds for _, seconds in time_steps(cfg, steps)]
    return cfg.train.batch_size * cfg.train.seq_len / statistics.median(step_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/bench-cpu.yaml")
    parser.add_argument("--batches", type=int, default=200, help="timed pipeline batches")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.source=builtin"])

    results = {"seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
               "vocab_size": cfg.model.vocab_size}
    resolve_corpus(cfg)  # prepare the corpus and train the tokenizer outside the timings
    for workers in (0, 1, 2):
        first, rate = pipeline_tokens_per_sec(cfg, workers, args.batches)
        results[f"pipeline_{workers}_workers_tokens_per_sec"] = rate
        results[f"pipeline_{workers}_workers_first_batch_s"] = first
    results["trainer_tokens_per_sec"] = trainer_tokens_per_sec(cfg, args.steps)
    for workers in (0, 1, 2):
        results[f"ratio_{workers}_workers"] = (results[f"pipeline_{workers}_workers_tokens_per_sec"]
                                               / results["trainer_tokens_per_sec"])
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:40s} {value:,.2f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
