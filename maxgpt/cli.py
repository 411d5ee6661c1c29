"""`maxgpt <command>`: a thin entry point over the library.

User errors (bad config, missing file, impossible mesh) print one line,
`maxgpt: error: ...`, and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from maxgpt.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the usage block too
        raise ConfigError(message)


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_train(args) -> int:
    from maxgpt.train import run  # imports jax: keep `maxgpt --help` fast

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run(cfg, run_dir)
    print(f"maxgpt: run written to {run_dir}", file=sys.stderr)
    return 0


def cmd_params(args) -> int:
    from maxgpt.train import count_params

    cfg = load_config(args.config, args.overrides)
    total = count_params(cfg)
    active = total  # dense models: every parameter is used by every token
    if args.json:
        print(json.dumps({"total": total, "active": active}))
    else:
        print(f"{cfg.model.name}: total {total:,} ({_human(total)}), "
              f"active per token {active:,} ({_human(active)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maxgpt", description="JAX pretraining for GPT-family models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (no arguments: the small default)")
    train.add_argument("--config", help="experiment or model YAML (default: configs/base.yaml)")
    train.add_argument("--run-dir", help="where config.yaml, metrics.jsonl and TensorBoard "
                                         "files go (default: runs/<model>-<time>)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.set_defaults(func=cmd_train)

    params = commands.add_parser("params", help="parameter counts of a config")
    params.add_argument("--config", help="experiment or model YAML")
    params.add_argument("--json", action="store_true", help='print {"total": N, "active": N}')
    params.add_argument("overrides", nargs="*", metavar="section.key=value")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ConfigError as e:
        print(f"maxgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maxgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
