"""Scaling-law ladders: train a grid of small models, fit L(N, D), predict a bigger one.

`maxgpt scaling --out DIR` trains every (size, token budget) pair of a ladder, each run with
its own cosine schedule over its own budget, and records its final held-out loss. Then:

- fit L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022). N counts non-embedding
  parameters (Kaplan et al. 2020: with tiny models the embedding tables would dominate a
  total count), D training tokens. The fit is a variable projection: for fixed (alpha, beta)
  the law is linear in (E, A, B), solved by least squares on relative errors (close to a
  fit in log space); (alpha, beta) come from a grid search refined twice around the best.
  Coefficients must be non-negative.
- the compute frontier: C = 6 N D, and L*(C) = min over N of L(N, C / 6N) (planning.Law).
- uncertainty: the fit repeated on bootstrap resamples of the runs; the 5th-95th
  percentiles of alpha, beta and the predicted loss are reported.
- extrapolation: the loss of a `target` size at its compute-optimal token count.

Outputs in DIR: runs/<name>/ (ordinary maxgpt run directories, resumable), runs/<name>/
result.json once a run is done (a second call trains only what is missing), fit.json and
ladder.png (log-log: runs, the fitted frontier, the extrapolation).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time

from etils import epath

import numpy as np

from maxgpt.config import ConfigError, load_config
from maxgpt.planning import Law
from maxgpt.storage import PathLike, as_path, write_atomic

# The default ladder: 4 widths x 3 token budgets, ~25 minutes on a 2-core CPU on the
# built-in corpus (docs/scaling.md). A size is WIDTHxLAYERS (heads of 32), trained at every
# token budget, or WIDTHxLAYERS:TOKENS, trained at that budget only.
DEFAULT_SIZES = ("32x2", "64x2", "96x3", "128x4")
DEFAULT_TOKENS = ("500K", "1M", "2M")
RUN_DEFAULTS = ("model.vocab_size=1024", "train.seq_len=128", "train.batch_size=16",
                "model.max_seq_len=128", "train.eval_steps=16", "optim.lr=3e-3",
                "checkpoint.keep=1", "data.num_workers=0", "mesh.data=1")


def parse_count(text: str) -> int:
    """'500K' -> 500000, '2M' -> 2000000, '1.5e6' -> 1500000."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    t = text.strip().upper()
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise ConfigError(f"{text!r} is not a count (e.g. 500K, 2M, 1e6)") from None
    if value < 1:
        raise ConfigError(f"{text!r} must be at least 1")
    return int(value)


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, layers = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {text!r} must be WIDTHxLAYERS, e.g. 64x2") from None
    if width < 32 or width % 32 or layers < 1:
        raise ConfigError(f"size {text!r}: width must be a multiple of 32, layers >= 1")
    return width, layers


@dataclasses.dataclass(frozen=True)
class Rung:
    width: int
    layers: int
    tokens: int

    @property
    def name(self) -> str:
        return f"w{self.width}-l{self.layers}-t{self.tokens}"

    def overrides(self, base: tuple[str, ...]) -> list[str]:
        heads = self.width // 32
        mlp = max(16, round(8 * self.width / 3 / 16) * 16)  # SwiGLU at ~4x the MLP FLOPs
        cfg = load_config(None, [*RUN_DEFAULTS, *base])
        steps = max(1, round(self.tokens / (cfg.train.batch_size * cfg.train.seq_len)))
        return [*RUN_DEFAULTS, f"model.name=ladder-{self.name}", f"model.embed_dim={self.width}",
                f"model.num_layers={self.layers}", f"model.num_heads={heads}",
                f"model.num_kv_heads={heads}", f"model.mlp_dim={mlp}", f"train.steps={steps}",
                f"optim.warmup_steps={max(1, steps // 20)}", "train.eval_every=0",
                f"checkpoint.every={max(1, steps // 4)}", *base]


def non_embedding_params(cfg) -> int:
    from maxgpt.train import count_params

    m = cfg.model
    tables = m.vocab_size * m.embed_dim * (1 if m.tie_embeddings else 2)
    if m.position == "learned":
        tables += m.max_seq_len * m.embed_dim
    return count_params(cfg) - tables


def run_rung(rung: Rung, out: epath.Path, base: tuple[str, ...], echo) -> dict:
    """Train one rung on one device (or finish it, or read its cached result) and evaluate
    its final checkpoint on the held-out split."""
    import jax

    from maxgpt import loop
    from maxgpt.inference import evaluate_checkpoint

    run_dir = out / "runs" / rung.name
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cfg = load_config(None, rung.overrides(base))
    echo(f"scaling: training {rung.name} ({cfg.train.steps} steps)")
    devices = jax.devices()[:1]
    loop.run(cfg, run_dir, devices=devices, echo=False)  # resumes a run that was cut short
    final = evaluate_checkpoint(run_dir, devices=devices)
    if final["step"] != cfg.train.steps:
        raise RuntimeError(f"{rung.name}: stopped at step {final['step']} of {cfg.train.steps}")
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    n = non_embedding_params(cfg)
    result = {"name": rung.name, "width": rung.width, "layers": rung.layers,
              "params": n, "tokens": tokens, "flops": 6 * n * tokens,
              "loss": final["eval_loss"], "eval_tokens": final["eval_tokens"]}
    write_atomic(result_file, json.dumps(result).encode())
    return result


ALPHAS = np.linspace(0.02, 2.0, 100)


def fit_law(params, tokens, losses, grid=ALPHAS, refinements=2) -> tuple[Law, float]:
    """Least-squares fit of L = E + A N^-alpha + B D^-beta on relative errors; returns the
    law and its RMS relative error. Raises ValueError if no non-negative fit exists."""
    n, d, y = (np.asarray(v, np.float64) for v in (params, tokens, losses))
    a_grid, b_grid = grid, grid
    best = None
    for _ in range(refinements + 1):
        A, B = np.meshgrid(a_grid, b_grid, indexing="ij")  # (G, H)
        # design rows [1, N^-a, D^-b] / y, target 1: relative error
        X = np.stack(np.broadcast_arrays(np.ones_like(n)[None, None],
                                         n[None, None] ** -A[..., None],
                                         d[None, None] ** -B[..., None]), -1) / y[:, None]
        XtX = np.einsum("ghpi,ghpj->ghij", X, X) + 1e-12 * np.eye(3)
        Xty = X.sum(2)  # X^T 1
        coef = np.linalg.solve(XtX, Xty[..., None])[..., 0]  # (G, H, 3)
        resid = np.einsum("ghpi,ghi->ghp", X, coef) - 1.0
        sse = np.where((coef >= 0).all(-1), (resid**2).sum(-1), np.inf)
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        if not np.isfinite(sse[i, j]):
            raise ValueError("no fit with non-negative E, A, B")
        best = (coef[i, j], A[i, j], B[i, j], sse[i, j])
        step_a = a_grid[1] - a_grid[0] if len(a_grid) > 1 else 0.01
        step_b = b_grid[1] - b_grid[0] if len(b_grid) > 1 else 0.01
        a_grid = np.linspace(max(1e-3, A[i, j] - step_a), A[i, j] + step_a, 41)
        b_grid = np.linspace(max(1e-3, B[i, j] - step_b), B[i, j] + step_b, 41)
    (e, a, b), alpha, beta, sse = best
    return Law(E=float(e), A=float(a), B=float(b), alpha=float(alpha),
               beta=float(beta)), math.sqrt(sse / len(y))


def bootstrap(params, tokens, losses, target: float, samples: int, seed: int = 0) -> dict:
    """Percentiles of alpha, beta and the target's predicted loss over refits on resampled
    runs (resamples without a non-negative fit are skipped and counted)."""
    rng = np.random.default_rng(seed)
    n, d, y = (np.asarray(v, np.float64) for v in (params, tokens, losses))
    draws = {"alpha": [], "beta": [], "target_loss": []}
    failed = 0
    for _ in range(samples):
        idx = rng.integers(0, len(y), len(y))
        try:
            law, _ = fit_law(n[idx], d[idx], y[idx], refinements=1)
        except ValueError:
            failed += 1
            continue
        draws["alpha"].append(law.alpha)
        draws["beta"].append(law.beta)
        draws["target_loss"].append(law.loss(target, law.optimal_tokens(target)))
    out = {k: {"p05": float(np.percentile(v, 5)), "p50": float(np.percentile(v, 50)),
               "p95": float(np.percentile(v, 95)), "std": float(np.std(v))}
           for k, v in draws.items() if v}
    out["samples"], out["failed"] = samples, failed
    return out


def plot(runs: list[dict], law: Law, target: dict, path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    sizes = sorted({r["params"] for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for size, color in zip(sizes, colors):
        mine = sorted((r for r in runs if r["params"] == size), key=lambda r: r["flops"])
        ax.plot([r["flops"] for r in mine], [r["loss"] for r in mine], "o-", color=color,
                label=f"N = {size:,}")
    lo = min(r["flops"] for r in runs) / 2
    hi = max(target["flops"] * 2, max(r["flops"] for r in runs) * 2)
    c = np.geomspace(lo, hi, 200)
    frontier = [law.loss(*law.optimal(x)) for x in c]
    ax.plot(c, frontier, "k--", label="fitted frontier L*(C)")
    err = target.get("interval")  # bootstrap percentiles need not straddle the estimate
    yerr = None if err is None else [[max(0.0, target["loss"] - err[0])],
                                     [max(0.0, err[1] - target["loss"])]]
    ax.errorbar([target["flops"]], [target["loss"]], yerr=yerr, fmt="r*", markersize=12,
                capsize=4,
                label=f"target N = {target['params']:,.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, image.getvalue())


def train_rungs(rungs: list[Rung], out: epath.Path, base: tuple[str, ...], echo) -> list[dict]:
    """Each rung's result, trained (or read); after each, a line with the time so far and
    an ETA by training FLOPs (6 N D) of the rungs still to train."""
    from maxgpt.progress import duration

    flops = [6 * non_embedding_params(load_config(None, r.overrides(base))) * r.tokens
             for r in rungs]
    left = sum(f for r, f in zip(rungs, flops)
               if not (out / "runs" / r.name / "result.json").is_file())
    runs, started, trained = [], time.monotonic(), 0.0
    for i, (rung, cost) in enumerate(zip(rungs, flops)):
        cached = (out / "runs" / rung.name / "result.json").is_file()
        runs.append(run_rung(rung, out, base, echo))
        elapsed = time.monotonic() - started
        if not cached:
            trained += cost
        eta = "" if not trained else f", eta {duration(elapsed / trained * (left - trained))}"
        echo(f"scaling: {i + 1}/{len(rungs)} {rung.name}: loss {runs[-1]['loss']:.4f}"
             f"{' (done before)' if cached else ''}; elapsed {duration(elapsed)}{eta}")
    return runs


def ladder(out: PathLike, sizes=DEFAULT_SIZES, tokens=DEFAULT_TOKENS, target: float | None = None,
           samples: int = 200, base: tuple[str, ...] = (), echo=print) -> dict:
    """Train what is missing of the ladder, fit, extrapolate, write fit.json and ladder.png."""
    rungs = []
    for size in sizes:  # WIDTHxLAYERS runs at every budget, WIDTHxLAYERS:TOKENS at one
        shape, _, own = size.partition(":")
        rungs += [Rung(*parse_size(shape), parse_count(t)) for t in ([own] if own else tokens)]
    if len({r.name for r in rungs}) != len(rungs):
        raise ConfigError("the ladder lists the same size and token budget twice")
    load_config(None, [*RUN_DEFAULTS, *base])  # a bad override fails before any training
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = train_rungs(rungs, out, tuple(base), echo)
    n, d, y = ([r[k] for r in runs] for k in ("params", "tokens", "loss"))
    law, rms = fit_law(n, d, y)
    target = target or 10 * max(n)
    t_tokens = law.optimal_tokens(target)
    spread = bootstrap(n, d, y, target, samples)
    prediction = {"params": target, "tokens": t_tokens, "flops": 6 * target * t_tokens,
                  "loss": law.loss(target, t_tokens)}
    if "target_loss" in spread:
        prediction["interval"] = [spread["target_loss"]["p05"], spread["target_loss"]["p95"]]
    result = {"law": dataclasses.asdict(law), "rms_relative_error": rms,
              "underdetermined": len(runs) <= 5, "bootstrap": spread, "target": prediction,
              "frontier": [{"flops": c, "params": law.optimal(c)[0], "tokens": law.optimal(c)[1],
                            "loss": law.loss(*law.optimal(c))}
                           for c in np.geomspace(min(r["flops"] for r in runs),
                                                 prediction["flops"], 8).tolist()],
              "runs": runs}
    write_atomic(out / "fit.json", json.dumps(result, indent=1).encode())
    plot(runs, law, prediction, out / "ladder.png")
    return result
