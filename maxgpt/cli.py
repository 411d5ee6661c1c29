"""`maxgpt <command>`: a thin entry point over the library.

User errors (bad config, missing file, impossible mesh) print one line,
`maxgpt: error: ...`, and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from maxgpt import cli_planning
from maxgpt.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the usage block too
        raise ConfigError(message)


def _starting(text: str) -> None:
    """A phase's start-up line, on a terminal only: in logs and pipes an error stays the one
    line on stderr (docs/configuration.md, Errors)."""
    if sys.stderr.isatty():
        print(f"maxgpt: {text}", file=sys.stderr, flush=True)


def _existing_run(path: str):
    from maxgpt.run_dir import RunDir

    return RunDir(path).require_run()


def _refuse_going_back(run_dir, steps: int) -> None:
    """A run cannot be trained back to an earlier step: `train.steps` below its newest
    checkpoint is refused, nothing changed (docs/configuration.md, Errors)."""
    import orbax.checkpoint as ocp  # finalized steps only; a manager would log warnings

    if not run_dir.checkpoints.is_dir():
        return
    newest = max(ocp.utils.checkpoint_steps(run_dir.checkpoints), default=None)
    if newest is not None and steps < newest:
        raise ConfigError(
            f"{run_dir} is at step {newest}, past train.steps={steps}: a run cannot go back; "
            f"continue it with train.steps above {newest}, or read an earlier checkpoint "
            "with --step (eval, generate, export) (nothing was changed)")


def cmd_train(args) -> int:
    from maxgpt.run_dir import RunDir
    from maxgpt.loop import run  # imports jax: keep `maxgpt --help` fast

    run_dir = None if args.run_dir is None else RunDir(args.run_dir)
    # Without --config a run continues with its own config.yaml. With one, it is the same
    # command run again (a restart): run() accepts it if only resumable keys differ.
    own = run_dir is not None and run_dir.holds_run() and not args.config
    cfg = load_config(run_dir.config_file if own else args.config, args.overrides)
    if run_dir is not None and run_dir.holds_run():
        _refuse_going_back(run_dir, cfg.train.steps)
    run_dir = run_dir or RunDir(f"runs/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run(cfg, run_dir)  # ends with a summary on stderr: losses, time, the next commands
    return 0


def _quantize(args) -> tuple[str, int] | None:
    """--quantize/--quantize-group of generate and eval: (kind, group), or None."""
    if args.quantize is None:
        if args.quantize_group:
            raise ConfigError("--quantize-group needs --quantize int8 or int4")
        return None
    return args.quantize, args.quantize_group


def _quantize_flags(parser) -> None:
    parser.add_argument("--quantize", metavar="int8|int4",
                        help="weight-only quantized attention/MLP/expert weights, saved next "
                             "to the run on first use (docs/quantization.md)")
    parser.add_argument("--quantize-group", type=int, default=0, metavar="G",
                        help="with --quantize: a scale per G inputs (0: per output channel)")


def _kv_cache_flag(parser, where: str = "") -> None:
    parser.add_argument("--kv-cache", choices=("model", "int8"), default="model",
                        help="keys and values cached in the compute dtype, or int8 with a "
                             "scale per token and head" + where)


def cmd_eval(args) -> int:
    from maxgpt.inference import evaluate_checkpoint

    run_dir = _existing_run(args.run_dir)
    if args.tasks is None and args.kv_cache != "model":
        raise ConfigError("--kv-cache is for generation: it needs --tasks (held-out loss "
                          "reads no cache)")
    if args.tasks is None:
        metrics = evaluate_checkpoint(run_dir, args.step, args.overrides,
                                      quantize=_quantize(args))
        print(json.dumps(metrics))
        return 0
    import jax

    from maxgpt.harness import Tasks
    from maxgpt.inference import load_for_inference
    from maxgpt.metrics import MetricsWriter

    overrides = [*args.overrides, f"eval.tasks={args.tasks}"]
    cfg = run_dir.load_config(overrides)
    tasks = Tasks(cfg.eval, run_dir, kv_cache=args.kv_cache)  # names checked first
    trainer, params, corpus, step = load_for_inference(run_dir, args.step, overrides,
                                                       quantize=_quantize(args))
    if corpus is None:
        raise ConfigError(f"{run_dir} trained on synthetic data: lm-eval tasks need a model "
                          "of text")
    with jax.set_mesh(trainer.mesh):
        row = tasks.score(trainer, params, corpus.tokenizer, step)
    if row is not None:  # process 0
        writer = MetricsWriter(run_dir, cfg.train.steps, echo=False)
        writer.write(row)
        writer.close()
        print(json.dumps(tasks.summary(row)))
    return 0


def cmd_generate(args) -> int:
    import jax

    from maxgpt.data.tokenizer import BOS_ID
    from maxgpt.generate import check_sampling, generate
    from maxgpt.inference import load_for_inference

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    check_sampling(**sampling)  # before a checkpoint is read
    run_dir = _existing_run(args.run_dir)
    trainer, params, corpus, _ = load_for_inference(run_dir, args.step,
                                                    quantize=_quantize(args))
    if corpus is None:
        raise ConfigError(f"{run_dir} trained on synthetic data: there is no tokenizer")
    prompts = [[BOS_ID, *corpus.tokenizer.encode(p)] for p in args.prompt]
    with jax.set_mesh(trainer.mesh):
        completions = generate(trainer.graphdef, trainer.natural_params(params),
                               trainer.cfg.model, prompts, kv_cache=args.kv_cache, **sampling)
    for prompt, ids in zip(args.prompt, completions):
        print(prompt + corpus.tokenizer.decode(ids))
    return 0


def cmd_export(args) -> int:
    import jax

    from maxgpt.export import family, write_folder
    from maxgpt.hf_verify import require_torch, verify
    from maxgpt.inference import load_for_inference

    run_dir = _existing_run(args.run_dir)
    family(run_dir.load_config().model)  # refuse before restoring anything
    if args.verify:
        require_torch()
    _starting(f"reading the {'newest' if args.step is None else f'step {args.step}'} "
              f"checkpoint of {run_dir}")
    trainer, params, corpus, step = load_for_inference(run_dir, args.step)
    with jax.set_mesh(trainer.mesh):
        params = jax.device_get(trainer.natural_params(params))
    checked = []
    _starting(f"writing {args.out}" + (" and verifying it with transformers (in a process "
                                       "without sentencepiece)" if args.verify else ""))

    def check(folder: Path) -> None:  # the local folder, before a remote one is uploaded
        texts = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog.",
                 "  tabs\tand  runs of   spaces,\n\nnewlines, café, 日本, 🤖, <s> as text"]
        worst, ppl = verify(trainer.cfg.model, params, folder, corpus.tokenizer, texts,
                            context)
        if worst > 1e-4:
            raise ConfigError(f"verification failed: logits differ by up to {worst:.2e}")
        checked.append((worst, ppl))

    context = trainer.cfg.train.seq_len
    files = write_folder(trainer.cfg.model, params, args.out,
                         None if corpus is None else corpus.tokenizer.model_proto,
                         context=context, overwrite=args.overwrite,
                         check=check if args.verify else None)
    print(f"{args.out}: step {step} as {family(trainer.cfg.model)}, context {context} "
          f"({', '.join(files)})")
    if checked:
        print(f"verified with transformers, without sentencepiece: same tokens (bos first), "
              f"logits within {checked[0][0]:.1e}, perplexity within {checked[0][1]:.1e} "
              "(relative)")
    return 0


def cmd_import(args) -> int:
    from maxgpt.export import import_folder

    run_dir = import_folder(args.hf, args.run_dir, args.overrides)
    note = "" if run_dir.tokenizer_file.is_file() else (
        " (the folder has no tokenizer.model: set data.tokenizer=PATH for text data)")
    print(f"{run_dir}: weights from {args.hf}{note}; train with `maxgpt train --run-dir "
          f"{args.run_dir}`")
    return 0


def cmd_prepare(args) -> int:
    from maxgpt.data.prepare import prepare

    if not (math.isfinite(args.shard_mb) and args.shard_mb > 0):
        raise ConfigError(f"--shard-mb must be a positive size in MiB, got {args.shard_mb}")
    started = time.perf_counter()  # a bar on a terminal (maxgpt/data/prepare.py)
    try:
        summary = prepare(args.inputs, args.out, text_field=args.text_field,
                          text_suffixes=args.text_suffix or (".txt",),
                          validation_fraction=args.validation_fraction,
                          shard_bytes=int(args.shard_mb * 2**20))
    except FileExistsError:
        raise ConfigError(f"{args.out} was created by another process while preparing; "
                          "nothing of it was changed") from None
    splits = summary["splits"]
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{args.out}: {summary['files']} files -> train {splits['train']['documents']:,} "
          f"documents ({splits['train']['bytes']:,} bytes), validation "
          f"{splits['validation']['documents']:,} documents "
          f"({splits['validation']['bytes']:,} bytes); skipped: {skipped}; "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def cmd_tokenizer_train(args) -> int:
    from maxgpt.data.pipeline import TOKENIZER_FILE
    from maxgpt.data.prepare import sample_documents
    from maxgpt.data.tokenizer import train_tokenizer
    from maxgpt.storage import as_path

    if not (math.isfinite(args.sample_mb) and args.sample_mb > 0):
        raise ConfigError(f"--sample-mb must be a positive size in MB, got {args.sample_mb}")
    out = as_path(args.out) if args.out else as_path(args.data) / TOKENIZER_FILE
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or pass --out (nothing was changed)")
    failed: list[ConfigError] = []
    started = time.perf_counter()
    # reading the sample draws a bar, then sentencepiece is silent
    _starting(f"training a {args.vocab_size}-piece {args.model_type} tokenizer on up to "
              f"{args.sample_mb:g} MB of {args.data} (a minute or more for 32 MB)")

    def documents():  # sentencepiece turns an error raised in its input into its own text
        try:
            yield from sample_documents(args.data, seed=args.seed)
        except ConfigError as e:  # e.g. a damaged shard: the error that names it wins
            failed.append(e)
            raise

    try:
        tokenizer = train_tokenizer(documents(), out, args.vocab_size, args.model_type,
                                    int(args.sample_mb * 1e6))
    except ConfigError:
        if failed:
            raise failed[0] from None
        raise
    print(f"{out}: {args.model_type} tokenizer, {tokenizer.vocab_size} pieces, trained in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maxgpt", description="JAX pretraining for GPT-family models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (no arguments: the small default)")
    train.add_argument("--config", help="experiment or model YAML (default: configs/base.yaml)")
    train.add_argument("--run-dir", help="where config.yaml, metrics.jsonl and TensorBoard "
                                         "files go (default: runs/<model>-<time>)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.set_defaults(func=cmd_train, distributed=True)

    evaluate = commands.add_parser("eval", help="held-out loss, perplexity, bits per byte; "
                                                "with --tasks, lm-eval-harness tasks")
    evaluate.add_argument("--run-dir", required=True, help="a run directory with checkpoints")
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    evaluate.add_argument("--tasks", metavar="NAME[,NAME...]",
                          help="lm-evaluation-harness tasks scored by maxgpt's own model "
                               "(sets eval.tasks; needs the [eval] extra; "
                               "docs/evaluation.md)")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="e.g. train.eval_steps=100, eval.limit=100, "
                               "eval.include_path=DIR")
    _quantize_flags(evaluate)
    _kv_cache_flag(evaluate, " (with --tasks: the generation tasks' decoder)")
    evaluate.set_defaults(func=cmd_eval, distributed=True)

    gen = commands.add_parser("generate", help="complete prompts with a trained model")
    gen.add_argument("--run-dir", required=True, help="a run directory with checkpoints")
    gen.add_argument("--prompt", action="append", required=True,
                     help="text to continue (repeatable: prompts are batched)")
    gen.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1: no cut")
    gen.add_argument("--seed", type=int, default=0)
    _quantize_flags(gen)
    _kv_cache_flag(gen)
    gen.set_defaults(func=cmd_generate, distributed=True)

    exp = commands.add_parser("export", help="a Hugging Face model folder from a checkpoint")
    exp.add_argument("--run-dir", required=True, help="a run directory with checkpoints")
    exp.add_argument("--out", required=True, help="the Hugging Face folder to write")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    exp.add_argument("--verify", action="store_true",
                     help="load the export with transformers, without sentencepiece, and "
                          "compare tokens, logits and perplexity with maxgpt's")
    exp.set_defaults(func=cmd_export)

    imp = commands.add_parser("import", help="start a run from Hugging Face weights")
    imp.add_argument("--hf", required=True, help="a Hugging Face model folder (safetensors)")
    imp.add_argument("--run-dir", required=True, help="the new run directory")
    imp.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="e.g. train.steps=1000 data.source=/data/prepared")
    imp.set_defaults(func=cmd_import)

    prep = commands.add_parser("prepare", help="text files -> ArrayRecord document shards")
    prep.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet files or directories")
    prep.add_argument("--out", required=True, help="new directory for the prepared dataset")
    prep.add_argument("--text-field", default="text", help="JSON key / parquet column")
    prep.add_argument("--text-suffix", action="append", metavar="SUFFIX",
                      help="read files with this suffix as one document each (repeatable; "
                           "default .txt), e.g. --text-suffix .py")
    prep.add_argument("--validation-fraction", type=float, default=0.01)
    prep.add_argument("--shard-mb", type=float, default=128.0, help="shard size (MiB)")
    prep.set_defaults(func=cmd_prepare)

    tok = commands.add_parser("tokenizer", help="tokenizer tools")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True,
                                      parser_class=_Parser)
    tok_train = tok_commands.add_parser("train", help="train a sentencepiece tokenizer")
    tok_train.add_argument("--data", required=True, help="a prepared dataset directory")
    tok_train.add_argument("--out", help="model file (default: DATA/tokenizer.model)")
    tok_train.add_argument("--vocab-size", type=int, default=8192)
    tok_train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tok_train.add_argument("--sample-mb", type=float, default=32.0,
                           help="MB of randomly chosen training documents to learn from")
    tok_train.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    cli_planning.add_commands(commands)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus `section.key=value` overrides wherever they stand: before the flags,
    after them or between (argparse's positionals stop at the first flag)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if hasattr(args, "overrides") and "=" in a
                 and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(build_parser(), argv)
        if getattr(args, "distributed", False):
            from maxgpt import distributed

            distributed.initialize()  # before any device is touched
        return args.func(args)
    except ConfigError as e:
        # one line, whatever a library put in the text (some messages span several)
        print(f"maxgpt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maxgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
