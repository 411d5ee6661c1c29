"""The `maxgpt` commands that plan rather than run: `params`, `plan`, `compile` and
`scaling` (parameter and FLOP counts, compute-optimal sizing, ahead-of-time compiles for a
TPU slice, scaling-law ladders). maxgpt/cli.py registers them with `add_commands`; errors
follow its rules (one line, exit code 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

from maxgpt.config import ConfigError, load_config


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_params(args) -> int:
    from maxgpt.compile import weight_bytes
    from maxgpt.flops import flops_per_token
    from maxgpt.train import active_params, count_params, vocab_padding_params

    if args.seq_len < 0:
        raise ConfigError(f"--seq-len must be at least 1 (or 0: model.max_seq_len), got "
                          f"{args.seq_len}")
    cfg = load_config(args.config, args.overrides)
    total, active = count_params(cfg), active_params(cfg)
    padding = vocab_padding_params(cfg)
    seq_len = args.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    flops = flops_per_token(cfg.model, seq_len)
    weights = weight_bytes(cfg)
    if args.json:
        print(json.dumps({"total": total, "active": active, "vocab_padding": padding,
                          "flops_per_token": flops, "seq_len": seq_len,
                          "weight_bytes": weights}))
    else:
        print(f"{cfg.model.name}: total {total:,} ({_human(total)}), "
              f"active per token {active:,} ({_human(active)}); vocabulary padded to "
              f"{cfg.model.padded_vocab_size:,} rows (+{padding:,} parameters); "
              f"training {flops:.3g} FLOPs per token at sequence length {seq_len:,}")
        print("weights: " + ", ".join(f"{kind} {n / 2**30:.3g} GiB" for kind, n in
                                      weights.items()) +
              " (--quantize of generate/eval: matmul weights only, scales per output "
              "channel, int4 packed)")
    return 0


def cmd_plan(args) -> int:
    from maxgpt.planning import budget_flops, plan

    if args.chips is not None:
        if args.days is None or not (math.isfinite(args.days) and args.days > 0):
            raise ConfigError("--chips needs --days, the length of the run (> 0)")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        flops = budget_flops(args.chips, args.days, args.mfu)
        source = f"{args.chips} for {args.days:g} days at {args.mfu:.0%} MFU"
    else:
        if not (math.isfinite(args.flops) and args.flops > 0):
            raise ConfigError(f"--flops must be a positive number, got {args.flops}")
        flops, source = args.flops, "given"
    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be at least 1, got {args.vocab_size}")
    result = plan(flops, args.vocab_size)
    if args.chips is not None and args.check_mesh:
        from maxgpt.compile import find_mesh

        mesh, report = find_mesh(result["model"], args.chips, echo=lambda text: print(
            text, file=sys.stderr, flush=True))
        result["mesh"] = mesh
        result["bytes_per_device"] = None if report is None else report.bytes_per_device
    if args.json:
        print(json.dumps(result))
        return 0
    rule = result["rule_of_thumb"]
    shape = result["model"]
    print(f"budget: {flops:.3g} training FLOPs ({source}), C = 6 N D")
    print(f"  {'':22s} {'parameters':>11s} {'tokens':>9s} {'tokens/param':>13s} "
          f"{'expected loss':>14s}")
    for name, n, d, loss in [("Chinchilla law (fit)", result["params"], result["tokens"],
                              result["loss"]),
                             ("20 tokens / parameter", rule["params"], rule["tokens"],
                              rule["loss"])]:
        print(f"  {name:22s} {_human(n):>11s} {_human(d):>9s} {d / n:13.1f} {loss:14.3f}")
    print(f"a Llama-style model near the fitted size: {result['model_params']:,} "
          f"({_human(result['model_params'])}) parameters")
    # ~20k steps of 4096-token sequences, 32 to 1024 sequences per batch
    batch = min(1024, max(32, 2 ** round(math.log2(result["tokens"] / 4096 / 20000))))
    steps = math.ceil(result["tokens"] / (batch * 4096))
    print("  maxgpt train " + " ".join(f"model.{k}={v}" for k, v in shape.items())
          + f" model.max_seq_len=4096 train.seq_len=4096 train.batch_size={batch} "
          f"train.steps={steps}")
    if "mesh" in result:
        print(f"on {args.chips} (one 4096-token sequence per chip, bf16, full remat): "
              + ("no fsdp x tensor x stage mesh fits" if result["mesh"] is None else
                 "fits with " + " ".join(f"mesh.{k}={v}" for k, v in result["mesh"].items())
                 + f" mesh.data=1, {result['bytes_per_device'] / 2**30:.1f} GiB per chip"))
    print("expected losses are nats per token on Chinchilla's data (docs/scaling.md)")
    return 0


def cmd_compile(args) -> int:
    from maxgpt.compile import compile_for

    cfg = load_config(args.config, args.overrides)
    report = compile_for(cfg, args.topology, args.num_slices)
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "fits": report.fits,
                          "bytes_per_device": report.bytes_per_device, "hint": report.hint}))
    else:
        gib = 2**30
        print(f"{cfg.model.name} on {report.topology} ({report.devices} devices, mesh "
              f"{report.mesh}): compiled in {report.compile_s:.1f} s")
        if report.pipeline:
            print(f"  {report.pipeline}")
        print(f"  per device: arguments {report.argument_bytes / gib:.2f} GiB, outputs not "
              f"aliased {(report.output_bytes - report.alias_bytes) / gib:.2f} GiB, "
              f"temporaries {report.temp_bytes / gib:.2f} GiB, code "
              f"{report.code_bytes / gib:.2f} GiB")
        print(f"  total {report.bytes_per_device / gib:.2f} GiB of {report.hbm_bytes / gib:.1f}"
              f" GiB HBM: {'fits' if report.fits else 'does NOT fit'}")
        if report.hint:
            print(f"  to fit: {report.hint}")
        print(f"  training FLOPs per step: {report.flops_per_step:.3g} (maxgpt/flops.py)")
        if cfg.model.quantize != "none":
            print(f"  model.quantize={cfg.model.quantize}: " + (
                "quantized dots not counted (the compiler stopped: out of HBM)"
                if report.quantized_dots is None else
                f"{report.quantized_dots} dots on quantized operands in the optimised program"))
        print("  weights for generate/eval per device: " + ", ".join(
            f"{kind} {n / gib:.3g} GiB" for kind, n in report.weight_bytes.items())
            + " (--quantize int8|int4)")
    return 0 if report.fits else 3


def cmd_scaling(args) -> int:
    from maxgpt.scaling import ladder, parse_count

    target = parse_count(args.target_params) if args.target_params else None
    if args.bootstrap < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    result = ladder(args.out, args.sizes.split(","), args.tokens.split(","), target,
                    args.bootstrap, tuple(args.overrides),
                    echo=lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({k: result[k] for k in ("law", "bootstrap", "target",
                                                  "rms_relative_error")}))
        return 0
    law, spread, target = result["law"], result["bootstrap"], result["target"]
    for run in result["runs"]:
        print(f"  {run['name']:22s} N {run['params']:>10,}  D {run['tokens']:>12,}  "
              f"loss {run['loss']:.4f}")
    print(f"fit: L(N, D) = {law['E']:.3f} + {law['A']:.4g} / N^{law['alpha']:.3f} + "
          f"{law['B']:.4g} / D^{law['beta']:.3f}  (rms relative error "
          f"{result['rms_relative_error']:.2%})")
    for name in ("alpha", "beta"):
        if name in spread:
            print(f"  {name}: {law[name]:.3f}, bootstrap 90% interval "
                  f"[{spread[name]['p05']:.3f}, {spread[name]['p95']:.3f}] over "
                  f"{spread['samples'] - spread['failed']} resamples")
    interval = target.get("interval")
    print(f"target: N = {target['params']:,.0f} at its compute-optimal D = "
          f"{target['tokens']:,.0f} tokens: loss {target['loss']:.4f}"
          + (f" (90% [{interval[0]:.4f}, {interval[1]:.4f}])" if interval else ""))
    if result["underdetermined"]:
        print("note: 5 or fewer runs for 5 parameters: the fit is underdetermined")
    print(f"wrote {args.out.rstrip('/')}/fit.json and {args.out.rstrip('/')}/ladder.png")
    return 0


def add_commands(commands) -> None:
    """Add these commands to the `maxgpt` subcommand parsers `commands`."""
    params = commands.add_parser("params", help="parameter counts of a config")
    params.add_argument("--config", help="experiment or model YAML")
    params.add_argument("--json", action="store_true", help='print {"total": N, "active": N}')
    params.add_argument("--seq-len", type=int, default=0,
                        help="sequence length for FLOPs per token (default: model.max_seq_len)")
    params.add_argument("overrides", nargs="*", metavar="section.key=value")
    params.set_defaults(func=cmd_params)

    plan = commands.add_parser("plan", help="compute-optimal parameters, tokens and model "
                                            "shape for a budget (docs/scaling.md)")
    budget = plan.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training FLOPs, e.g. 5.76e23")
    budget.add_argument("--chips", help="an accelerator slice, e.g. v5p-256 (with --days)")
    plan.add_argument("--days", type=float, help="with --chips: length of the run")
    plan.add_argument("--mfu", type=float, default=0.4, help="with --chips (default 0.4)")
    plan.add_argument("--vocab-size", type=int, default=32000, help="for the model shape")
    plan.add_argument("--check-mesh", action="store_true",
                      help="with --chips: find a mesh for which `maxgpt compile` says the "
                           "shape fits (needs the [tpu] extra; minutes)")
    plan.add_argument("--json", action="store_true",
                      help='print {"params": N, "tokens": D, "loss": L, ...}')
    plan.set_defaults(func=cmd_plan)

    comp = commands.add_parser("compile", help="compile the train step ahead of time for a "
                                                "TPU slice; exit 3 if it does not fit")
    comp.add_argument("--config", help="experiment or model YAML")
    comp.add_argument("--topology", required=True, help="a TPU slice, e.g. v5p-8, v6e-256")
    comp.add_argument("--num-slices", type=int, default=1)
    comp.add_argument("--json", action="store_true",
                      help='print the report as JSON: "fits", "bytes_per_device", "hbm_bytes", '
                           '"argument_bytes", "temp_bytes", ... (maxgpt.compile.CompileReport)')
    comp.add_argument("overrides", nargs="*", metavar="section.key=value")
    comp.set_defaults(func=cmd_compile)

    from maxgpt.scaling import DEFAULT_SIZES, DEFAULT_TOKENS

    scaling = commands.add_parser("scaling", help="train a ladder of small models and fit a "
                                                  "scaling law (docs/scaling.md)")
    scaling.add_argument("--out", required=True, help="folder for the runs, fit.json, plot")
    scaling.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                         help="WIDTHxLAYERS[:TOKENS],... each at every --tokens budget or "
                              "at its own (default %(default)s)")
    scaling.add_argument("--tokens", default=",".join(DEFAULT_TOKENS),
                         help="training tokens per run, for every size (default %(default)s)")
    scaling.add_argument("--target-params", default="",
                         help="non-embedding parameters to extrapolate to (default: 10x the "
                              "largest run)")
    scaling.add_argument("--bootstrap", type=int, default=200, help="resamples for intervals")
    scaling.add_argument("--json", action="store_true")
    scaling.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="applied to every run, e.g. data.source=/data/prepared")
    scaling.set_defaults(func=cmd_scaling)
