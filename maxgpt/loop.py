"""The training loop: a run directory, data, restore or init, compile, step, log, save,
evaluate, stop. The pieces it drives (the trainer, the step) are in maxgpt/train.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Any

import jax

from maxgpt import distributed, sharding
from maxgpt.checkpoint import Checkpointer, SaveTimer, load_params
from maxgpt.config import Config, ConfigError
from maxgpt.data import SyntheticSource
from maxgpt.data.pipeline import (Corpus, StreamReader, batches, check_eval_split, describe,
                                  resolve_corpus)
from maxgpt.evaluate import evaluate
from maxgpt.flops import Peak, flops_per_token
from maxgpt.generate import print_sample
from maxgpt.harness import training_tasks
from maxgpt.metrics import MetricsWriter
from maxgpt.owner import Owner
from maxgpt.preemption import StopRequest
from maxgpt.profiling import Profile
from maxgpt.progress import Console, Phases, rows_of, summary
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike
from maxgpt.trackers import check_tracker, open_tracker
from maxgpt.train import (Trainer, _abstract_batch, abstract_state, all_finite, build_trainer,
                          count_params, init_state)

_all_finite = jax.jit(all_finite)  # for the check before a save, outside the step


def _describe_compile(compiled, seconds: float) -> str:
    text = f"compiled train step in {seconds:.1f}s"
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2**30
        text += (f"; per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, "
                 f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB")
    return text


def compile_step(trainer: Trainer):
    """The train step compiled for the trainer's shapes, and the seconds it took. XLA compiles
    in a worker thread while the main thread waits in Python, so a signal is heard (and a
    second one stops the process) during a compile of minutes, not after it."""
    result: dict[str, Any] = {}

    def work():
        try:
            with jax.set_mesh(trainer.mesh):
                start = time.perf_counter()
                result["compiled"] = trainer.step_fn.lower(
                    abstract_state(trainer), _abstract_batch(trainer)).compile()
                result["seconds"] = time.perf_counter() - start
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    thread = threading.Thread(target=work, daemon=True, name="maxgpt-compile")
    try:
        thread.start()  # inside: a Ctrl-C landing while it waits for the thread to start
        while thread.is_alive():
            thread.join(0.2)  # returns to Python often: signal handlers run
    except KeyboardInterrupt:
        # A second Ctrl-C: XLA cannot be stopped mid-compile, and the interpreter's exit
        # tears the backend down under it (exit -11 or "FATAL: exception not rethrown" and
        # -6, seen in full test runs when the signal landed in thread.start()). Nothing of
        # the run is written before the compile, so leave without the interpreter's exit.
        print("maxgpt: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    if "error" in result:
        raise result["error"]
    return result["compiled"], result["seconds"]


def device_memory(device) -> tuple[int, str]:
    """Bytes one device may use, and what they are: the accelerator's memory limit, or on
    CPU the host's RAM shared by this process's devices."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    local = max(1, jax.local_device_count())
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ram // local, (f"this host's RAM shared by {local} devices" if local > 1 else
                          "this host's RAM")


def check_memory(compiled, trainer: Trainer) -> None:
    """Refuse a step whose compiled memory (XLA's analysis: arguments, outputs not aliased to
    them, temporaries, code) exceeds what a device has."""
    memory = compiled.memory_analysis()
    if memory is None:
        return
    need = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)
    have, what = device_memory(trainer.mesh.local_devices[0])  # one of this process's
    if need > have:
        gib = 2**30
        raise ConfigError(
            f"the train step needs {need / gib:,.1f} GiB per device (temporaries "
            f"{memory.temp_size_in_bytes / gib:,.1f} GiB) but has {have / gib:,.1f} GiB "
            f"({what}); " + sharding.memory_hint(
                dict(trainer.mesh.shape),
                sharding.shard_bytes(abstract_state(trainer), trainer.state_shardings),
                memory.temp_size_in_bytes, have, trainer.cfg.model.remat)
            + " (docs/performance.md)")


def open_corpus(cfg: Config, run_dir: RunDir | None) -> Corpus | None:
    """The run's data; a run directory's own tokenizer.model wins (a resumed or evaluated
    run reads with the tokenizer it was trained with). All processes must read with the
    same tokenizer (each may have built the built-in corpus's on its own host)."""
    own = None if run_dir is None else run_dir.tokenizer_file
    corpus = resolve_corpus(cfg, own if own is not None and own.is_file() else None)
    if corpus is not None:
        prints = distributed.gather_text(corpus.tokenizer.fingerprint)
        if len(set(prints)) > 1:
            raise ConfigError(
                f"the processes of this job read with different tokenizers (fingerprints "
                f"{', '.join(prints)} for processes 0..{len(prints) - 1}, from "
                f"{corpus.tokenizer_path}); give them one data.tokenizer on shared storage")
    return corpus


def make_source(trainer: Trainer, corpus: Corpus | None):
    """This process's endless, checkpointable iterator of its rows of every training batch
    (numpy arrays)."""
    cfg, rows, streams = trainer.cfg, trainer.batch_rows, trainer.streams
    if corpus is None:
        return SyntheticSource(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len,
                               cfg.train.seed, rows)
    return StreamReader(
        lambda s: batches(corpus, "train", seq_len=cfg.train.seq_len,
                          batch_size=cfg.train.batch_size // streams, seed=cfg.train.seed,
                          stream=(s, streams), num_workers=cfg.data.num_workers,
                          prefetch=cfg.data.prefetch),
        rows, cfg.train.batch_size, streams)


def data_fingerprint(trainer: Trainer, corpus: Corpus | None) -> dict[str, Any]:
    """What a saved iterator state is only valid for: resuming with other data settings
    would read other batches (or fail inside grain), so a mismatch is reported instead."""
    cfg = trainer.cfg
    tokenizer = None if corpus is None else corpus.tokenizer.fingerprint
    return {"source": cfg.data.source, "sources": cfg.data.sources, "tokenizer": tokenizer,
            "seq_len": cfg.train.seq_len, "seed": cfg.train.seed,
            "streams": trainer.streams, "num_workers": cfg.data.num_workers,
            "prefetch": cfg.data.prefetch > 0}


def restore_or_init(trainer: Trainer, checkpointer: Checkpointer | None, source,
                    fingerprint: dict, writer: MetricsWriter) -> tuple[dict[str, Any], int]:
    """The newest readable checkpoint's state and data position; else a fresh state, with
    parameters from `checkpoint.load_params_from` if set."""
    abstract = abstract_state(trainer)
    newest = None if checkpointer is None else checkpointer.latest_step()
    if newest is not None:  # seconds to minutes for a large state
        writer.info(f"maxgpt: restoring checkpoint {newest} of {checkpointer.directory}")
    restored = None if checkpointer is None else checkpointer.restore_newest(
        abstract, trainer.state_shardings)
    if restored is None:
        state = init_state(trainer)
        if trainer.cfg.checkpoint.load_params_from:
            params, where = load_params(trainer.cfg.checkpoint.load_params_from,
                                        abstract["params"], trainer.state_shardings["params"])
            state = {**state, "params": params,  # a fresh optimizer state, step 0
                     "opt_state": jax.jit(trainer.optimizer.init, out_shardings=(
                         trainer.state_shardings["opt_state"]))(params)}
            writer.info(f"parameters from {where}; new optimizer state, step 0")
        return state, 0
    step, state, data = restored
    saved = data.get("pipeline", {})
    changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if changed:
        raise ConfigError(
            f"checkpoint {step}'s data position was saved for other data settings ("
            + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            + "); resume with the settings the run started with")
    source.set_state(data["iterator"])
    writer.info(f"resumed from {checkpointer.directory / str(step)}")
    return state, step


def _due(done: int, every: int, last: int) -> bool:
    return done == last or (every > 0 and done % every == 0)


def _check_bad_steps(metrics, cfg: Config, step: int) -> None:
    """Stop after train.max_bad_steps skipped (non-finite) steps in a row."""
    if metrics is not None and int(jax.device_get(metrics["bad_in_a_row"])) >= (
            cfg.train.max_bad_steps):
        raise ConfigError(
            f"{cfg.train.max_bad_steps} steps in a row up to step {step} had a non-finite loss "
            "or gradient (each was skipped, the parameters are unchanged and finite); lower "
            "optim.lr, lengthen optim.warmup_steps or check the data, then continue from the "
            "last checkpoint")


def _save(checkpointer: Checkpointer, step: int, state, source, fingerprint: dict,
          corpus: Corpus | None, cfg: Config) -> None:
    if not bool(_all_finite(state["params"])):  # the step's guard makes this impossible
        raise RuntimeError(f"non-finite parameters at step {step}: not saving them")
    checkpointer.save(step, state, {"pipeline": fingerprint, "iterator": source.get_state()},
                      cfg, None if corpus is None else corpus.tokenizer.model_proto)


def run(cfg: Config, run_dir: PathLike | RunDir | None = None, devices=None,
        echo: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train to `train.steps`, resuming from run_dir's newest checkpoint if it has one.

    An existing run continues only with a config that differs from its config.yaml in
    resumable keys (maxgpt/run_dir.py); its files are rewritten only once the resume is
    accepted. SIGTERM/SIGINT end the run early after the current step, with a checkpoint
    (if there is a run directory). Returns the final state and the logged metric rows.
    """
    owner, phases = None, Phases()
    if run_dir is not None:
        run_dir = RunDir(run_dir)
        run_dir.check_shared()  # before anything is read or written
        owner = Owner(run_dir.owner_file)
        owner.check()  # a second trainer on a live run is refused
        cfg = run_dir.continue_with(cfg)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    if not cfg.data.streams:  # fixed now, in config.yaml: a resume keeps the data order
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                streams=trainer.streams))
        trainer = dataclasses.replace(trainer, cfg=cfg)
    with phases("data"):  # the built-in corpus and its tokenizer are built on first use
        corpus = open_corpus(cfg, run_dir)
        if corpus is not None and cfg.train.eval_every > 0:  # fail now, not at the first eval
            check_eval_split(corpus, cfg.train.seq_len, trainer.streams)
    tasks = training_tasks(cfg, corpus, run_dir)  # eval.tasks (lm-eval): checked now
    check_tracker(cfg, run_dir)  # metrics.wandb_project: wandb importable
    with phases("peak probe"):
        peak = Peak(list(trainer.mesh.devices.flat))
    n_params = count_params(cfg)  # outside the mesh context: abstract, unsharded shapes
    with contextlib.ExitStack() as stack:
        if owner is not None:  # released last, after the final save is written
            stack.enter_context(contextlib.closing(owner))
        stop = stack.enter_context(contextlib.closing(StopRequest()))  # heard from now on
        console = Console(cfg.metrics.progress, echo and distributed.is_leader())
        stack.callback(console.close)
        console.note(f"maxgpt: {cfg.model.name}, {n_params:,} parameters, mesh "
                     f"{dict(trainer.mesh.shape)}, data {describe(corpus)}; mfu against "
                     f"{peak.source}; compiling the train step")
        if trainer.schedule is not None:
            console.note(f"maxgpt: {trainer.schedule.describe()}")
        # Compiled from shapes alone, before anything large exists or a file is opened: a
        # step that cannot fit is refused before the state is allocated or the data flows.
        with phases("compile"):
            compiled, seconds = compile_step(trainer)
        console.note(_describe_compile(compiled, seconds))
        check_memory(compiled, trainer)
        tracker = open_tracker(cfg, run_dir) if distributed.is_leader() else None
        writer = stack.enter_context(contextlib.closing(MetricsWriter(run_dir, cfg.train.steps,
                                                                      echo, tracker)))
        writer.console = console
        checkpointer = None if run_dir is None else stack.enter_context(
            contextlib.closing(Checkpointer(run_dir, cfg.checkpoint)))
        stack.enter_context(jax.set_mesh(trainer.mesh))
        source = stack.enter_context(contextlib.closing(make_source(trainer, corpus)))
        fingerprint = data_fingerprint(trainer, corpus)
        with phases("restore" if checkpointer and checkpointer.latest_step() else "init"):
            state, first = restore_or_init(trainer, checkpointer, source, fingerprint, writer)
        if run_dir is not None:  # the start or resume is accepted: now the run is written
            owner.claim()
            run_dir.write(cfg, None if corpus is None else corpus.tokenizer.model_proto)
        writer.drop_rows_after(first)  # steps after the checkpoint are trained (logged) again
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        flops_per_step = flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
        byte_lengths = None if corpus is None else corpus.tokenizer.byte_lengths()
        history, previous, stopped, done = [], None, False, first
        last_time, last_step = time.perf_counter(), first
        loop_start, probing = last_time, peak.spent
        for name in ("first step", "training"):  # in this order in the summary
            phases.add(name, 0.0)
        console.start(first, cfg.train.steps)
        profile = Profile(cfg.train.profile_range(), run_dir, writer)
        stack.callback(profile.stop)
        timer = SaveTimer(cfg.checkpoint.every_minutes if checkpointer else 0, trainer.mesh)
        for step in range(first, cfg.train.steps):
            profile.before(step + 1)
            state, metrics = compiled(state, trainer.global_batch(next(source)))
            done = step + 1
            console.advance(done)
            profile.after(done, metrics)
            # The previous step's verdict, read while this one runs: no stall per step.
            _check_bad_steps(previous, cfg, done - 1)
            if checkpointer is not None:
                checkpointer.check()  # a save that failed in the background stops the run
            previous = metrics
            stopped = stop(done)
            timed = timer.due()
            if stopped or done == first + 1 or _due(done, cfg.train.log_every, cfg.train.steps):
                metrics = jax.device_get(metrics)  # waits for the step: honest timing
                now = time.perf_counter()
                step_time = (now - last_time) / (done - last_step)
                if done == first + 1:  # the data workers start during the first step
                    phases.add("first step", now - loop_start)
                history.append(writer.write({
                    "step": done, "loss": metrics["loss"], "lr": metrics["lr"],
                    "grad_norm": metrics["grad_norm"],
                    "tokens_per_sec": tokens_per_step / step_time, "step_time_s": step_time,
                    "mfu": peak.mfu(flops_per_step / step_time),  # may probe again
                    "tokens_seen": done * tokens_per_step,  # training rows are never padded
                    "skipped_steps": metrics["skipped_steps"],
                    **{k: v for k, v in metrics.items() if k.startswith("moe_")}}))
                last_time, last_step = time.perf_counter(), done  # after a peak probe
            # Save before evaluating: a failing evaluation must not cost the checkpoint.
            saving = checkpointer is not None and (
                stopped or timed or _due(done, cfg.checkpoint.every, cfg.train.steps))
            if saving:
                with phases("saves"):
                    _save(checkpointer, done, state, source, fingerprint, corpus, cfg)
                timer.saved()
            if stopped:
                writer.info(f"maxgpt: {stop.signal_name or 'preemption'}: stopped after step "
                            f"{done}" + (f", checkpoint saved; continue with `maxgpt train "
                                         f"--run-dir {run_dir}`" if saving else ""))
                break
            evaluating = (corpus is not None and cfg.train.eval_every > 0
                          and _due(done, cfg.train.eval_every, cfg.train.steps))
            if evaluating:
                with phases("eval"):
                    history.append(writer.write({"step": done, **evaluate(
                        trainer, state["params"], corpus, byte_lengths)}))
            scoring = tasks is not None and _due(done, cfg.eval.tasks_every, cfg.train.steps)
            if scoring:  # lm-eval tasks, every eval.tasks_every steps (maxgpt/harness.py)
                with phases("eval"):
                    row = tasks.score(trainer, state["params"], corpus.tokenizer, done)
                if row is not None:  # process 0
                    history.append(writer.write(row))
            if saving or evaluating or scoring:  # not training time
                last_time, last_step = time.perf_counter(), done
        _check_bad_steps(previous, cfg, done)
        probing = peak.spent - probing  # peak probes during training, at the rows
        phases.add("training", time.perf_counter() - loop_start - probing - sum(
            phases.spent.get(k, 0.0) for k in ("first step", "saves", "eval")))
        phases.add("peak probe", probing)
        if console.enabled:
            with phases("peak probe"):
                peak.refresh(force=True)  # for the summary's MFU: the highest rate seen
        console.close()
        if corpus is not None and echo and not stopped:
            with phases("sample"):
                print_sample(trainer.graphdef, trainer.natural_params(state["params"]),
                             cfg.model, corpus.tokenizer, cfg.train.seed)
        closing = stack.pop_all()
    with phases("final save and close"):
        closing.close()
    console.note(summary(rows_of(writer.lines) if writer.lines else history, phases,
                         run_dir=run_dir, total_steps=cfg.train.steps,
                         trained_steps=done - first, flops_per_step=flops_per_step,
                         peak=peak.value, peak_source=peak.source,
                         has_text=corpus is not None, stopped=stopped))
    return state, history
