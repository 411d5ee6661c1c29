"""What a person sees: a live bar on a terminal (checked under a pseudo-terminal), plain
greppable lines in a pipe, an end-of-run summary that agrees with metrics.jsonl, and quiet
read-only commands. Real `python -m maxgpt` processes on the smoke config."""

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SMOKE = ["--config", os.path.join(REPO, "configs/experiments/smoke.yaml"), "train.log_every=1",
         "train.eval_every=10", "train.eval_steps=2", "checkpoint.every=0",
         "data.num_workers=0"]
ESCAPES = re.compile(r"\r|\x1b\[")


def maxgpt(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxgpt", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A finished smoke run whose stdout and stderr were pipes (not terminals)."""
    run_dir = tmp_path_factory.mktemp("progress") / "run"
    proc = maxgpt("train", "--run-dir", str(run_dir), *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_plain_lines_and_a_summary_that_agrees_with_metrics_jsonl(piped_run):
    run_dir, proc = piped_run
    assert not ESCAPES.search(proc.stdout + proc.stderr)  # no bar, no cursor movement
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in step_lines] == [
        r["step"] for r in train] == list(range(1, 21))
    for line, row in zip(step_lines, train):  # today's fields, then elapsed and ETA
        assert line.startswith(f"step {row['step']}/20 | loss {row['loss']:.4f} | ")
        assert re.search(r" \| elapsed \d\d:\d\d \| eta \d\d:\d\d$", line), line
    assert step_lines[-1].endswith("eta 00:00")

    summary = proc.stderr[proc.stderr.index("maxgpt: done at step"):]
    assert f"done at step 20/20, {train[-1]['tokens_seen']:,} tokens seen, in " in summary
    best = min(train, key=lambda r: r["loss"])
    assert (f"train loss {train[-1]['loss']:.4f} final, {best['loss']:.4f} best "
            f"(step {best['step']})") in summary
    best = min(evals, key=lambda r: r["eval_loss"])
    assert [r["step"] for r in evals] == [10, 20]
    assert (f"eval loss {evals[-1]['eval_loss']:.4f} final, {best['eval_loss']:.4f} best "
            f"(step {best['step']})") in summary
    spent = re.search(r"in ([\d.]+) s\n  time: (.*)\n", summary)
    parts = dict((name, float(s)) for name, s in re.findall(r"([a-z ]+) ([\d.]+) s",
                                                              spent.group(2)))
    assert {"compile", "training", "eval", "first step"} <= {k.strip() for k in parts}
    # The phases add up to the wall time (each rounded to 0.1 s; those under 0.05 s left out)
    assert abs(sum(parts.values()) - float(spent.group(1))) < 0.1 * len(parts) + 0.5
    mfu = re.search(r"mfu ([\d.]+)% of ([\d,]+) GFLOP/s, .*; ([\d,.]+) GFLOP/s achieved",
                    summary)
    achieved, peak = float(mfu.group(3).replace(",", "")), float(mfu.group(2).replace(",", ""))
    assert abs(float(mfu.group(1)) - 100 * achieved / peak) < 0.2
    assert f"run directory: {run_dir}\n" in summary
    for command in (f"maxgpt eval --run-dir {run_dir}", f"maxgpt generate --run-dir {run_dir}",
                    f"maxgpt export --run-dir {run_dir} --out exports/run",
                    f"tensorboard --logdir {run_dir}/tensorboard"):
        assert command in summary


def test_eval_of_a_finished_run_prints_no_library_warnings(piped_run):
    """orbax's read-only manager logs `Given directory is read only` through absl on every
    read-only command; nothing but maxgpt's own output may reach stderr."""
    run_dir, _ = piped_run
    proc = maxgpt("eval", "--run-dir", str(run_dir), "train.eval_steps=1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["step"] == 20
    assert proc.stderr == ""


def test_a_bar_under_a_pseudo_terminal(tmp_path):
    """stdout and stderr a terminal (metrics.progress=auto): a bar that is redrawn in place,
    with step/total, loss, tokens/s, elapsed<ETA; the rows still scroll above it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "maxgpt", "train", "--run-dir",
                             str(tmp_path / "run"), *SMOKE, "train.eval_every=0"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, seen[-3000:]
    text = seen.decode(errors="replace")
    frames = re.split(r"[\r\n]", text)  # the bar is redrawn after a carriage return
    bars = [frame for frame in frames if frame.startswith("train ")]
    assert bars, text[-3000:]
    final = re.compile(r"train 100%\|.+\| 20/20 \[\d\d:\d\d<00:00, loss \d+\.\d{4} \| "
                       r"[\d,]+ tok/s\]")
    assert any(final.match(frame) for frame in bars), bars[-3:]
    assert any(re.match(r"train +\d+%\|.*\| \d+/20 \[", frame) for frame in bars[:-1])
    rows = [re.match(r"step (\d+)/20 \| loss ", frame) for frame in frames]
    assert [int(m.group(1)) for m in rows if m] == list(range(1, 21))  # above the bar
    assert "maxgpt: done at step 20/20" in text


def test_the_cpu_peak_is_the_highest_median_and_is_measured_again(monkeypatch):
    """A probe taken while other processes held the cores (2x slower) gives way to a quiet
    one; a busy probe later never lowers the peak; an MFU above 90% (the peak is too low)
    is probed again at the next row 10 s on; otherwise probes stay 50x their cost apart."""
    import jax

    from maxgpt import flops

    n3 = 2 * flops.PROBE_N**3
    durations = iter([[n3 / 50e9] * 7,  # busy: 50 GFLOP/s
                      [n3 / 100e9] * 6 + [n3 / 500e9],  # quiet: median 100 (one spike)
                      [n3 / 40e9] * 7])  # busy again
    now, probes = [0.0], []

    def probe(n, repeats):  # each probe takes 0.5 s: the next is due 25 s later
        probes.append(now[0])
        now[0] += 0.5
        return next(durations)

    monkeypatch.setattr(flops, "_matmul_times", probe)
    peak = flops.Peak(jax.devices("cpu")[:1], clock=lambda: now[0])
    assert peak.value == pytest.approx(50e9) and probes == [0.0]
    now[0] = 5.5
    assert peak.mfu(25e9) == pytest.approx(0.5) and len(probes) == 1  # not due
    now[0] = 9.0
    assert peak.mfu(48e9) == pytest.approx(0.96) and len(probes) == 1  # too soon again
    now[0] = 10.5
    assert peak.mfu(48e9) == pytest.approx(0.48) and probes == [0.0, 10.5]  # the median
    now[0] = 30.0
    assert peak.mfu(30e9) == pytest.approx(0.3) and len(probes) == 2  # not yet 25 s
    now[0] = 36.0
    assert peak.mfu(30e9) == pytest.approx(0.3) and probes == [0.0, 10.5, 36.0]
    assert peak.value == pytest.approx(100e9)  # the busy probe did not lower it
