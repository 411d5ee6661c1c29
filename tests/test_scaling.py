"""Compute-optimal planning against Chinchilla, the law fitter against a known law, and a
3-run ladder end to end."""

import json
import math

import numpy as np
import pytest

from maxgpt import scaling
from maxgpt.chips import parse_slice
from maxgpt.cli import main
from maxgpt.config import ConfigError, load_config
from maxgpt.planning import CHINCHILLA, Law, llama_params, model_shape, rule_of_thumb
from maxgpt.train import count_params


def test_planner_reproduces_chinchillas_compute_optimal_point():
    # Hoffmann et al. 2022: Gopher's budget, 5.76e23 FLOPs -> Chinchilla, 70B and 1.4T tokens
    for n, d in (CHINCHILLA.optimal(5.76e23), rule_of_thumb(5.76e23)):
        assert n == pytest.approx(70e9, rel=0.2) and d == pytest.approx(1.4e12, rel=0.2)
        assert 6 * n * d == pytest.approx(5.76e23)
    # optimal_tokens inverts optimal
    n, d = CHINCHILLA.optimal(1e21)
    assert CHINCHILLA.optimal_tokens(n) == pytest.approx(d, rel=1e-9)
    # the optimum is a minimum along C = 6ND
    for f in (0.8, 1.25):
        assert CHINCHILLA.loss(n * f, d / f) > CHINCHILLA.loss(n, d)


@pytest.mark.parametrize("target", [1e8, 3e9, 7e10, 4e11])
def test_model_shape_is_near_the_size_and_a_valid_config(target):
    shape = model_shape(target)
    cfg = load_config(None, [f"model.{k}={v}" for k, v in shape.items()]
                      + ["model.tie_embeddings=false", "model.max_seq_len=4096"])
    assert count_params(cfg) == llama_params(shape)
    assert count_params(cfg) == pytest.approx(target, rel=0.1)
    if target >= 3e9:  # big models: width / depth between GPT-3's 128 and Llama 3 70B's 102
        assert 90 <= shape["embed_dim"] / shape["num_layers"] <= 140


def test_plan_cli_from_chips_and_from_flops(capsys):
    assert main(["plan", "--chips", "v5p-256", "--days", "30", "--mfu", "0.4", "--json"]) == 0
    chips = json.loads(capsys.readouterr().out)
    assert chips["flops"] == pytest.approx(128 * 459e12 * 30 * 86400 * 0.4)  # 128 chips
    assert main(["plan", "--flops", str(chips["flops"]), "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert flops["params"] == pytest.approx(chips["params"])
    assert flops["tokens"] == pytest.approx(chips["tokens"])
    assert main(["plan", "--chips", "v5p-256"]) == 2
    assert "--chips needs --days" in capsys.readouterr().err


@pytest.mark.parametrize("name, chip, count", [("v5p-256", "v5p", 128), ("v5e-16", "v5e", 16),
                                               ("v5litepod-8", "v5e", 8), ("v4-8", "v4", 4),
                                               ("v6e-256", "v6e", 256)])
def test_slice_names(name, chip, count):
    parsed, chips = parse_slice(name)
    assert (parsed.name, chips) == (chip, count)


def test_bad_slice_names():
    with pytest.raises(ConfigError, match="unknown accelerator slice"):
        parse_slice("v9-8")
    with pytest.raises(ConfigError, match="2 per chip"):
        parse_slice("v5p-7")


def test_fitter_recovers_a_known_law_from_noisy_runs():
    true = Law(E=1.7, A=400.0, B=1500.0, alpha=0.34, beta=0.28)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
    rng = np.random.default_rng(0)
    losses = np.array([true.loss(n, d) for n, d in zip(N, D)]) * np.exp(
        rng.normal(0, 0.005, N.size))  # 0.5% noise
    law, rms = scaling.fit_law(N, D, losses)
    assert law.alpha == pytest.approx(0.34, abs=0.02)
    assert law.beta == pytest.approx(0.28, abs=0.02)
    assert law.E == pytest.approx(1.7, abs=0.1)
    assert rms < 0.01
    spread = scaling.bootstrap(N, D, losses, 1e10, samples=40)
    assert spread["alpha"]["p05"] - 0.01 <= 0.34 <= spread["alpha"]["p95"] + 0.01
    assert spread["beta"]["p05"] - 0.01 <= 0.28 <= spread["beta"]["p95"] + 0.01
    # noise-free: exact
    exact, _ = scaling.fit_law(N, D, [true.loss(n, d) for n, d in zip(N, D)])
    assert exact.alpha == pytest.approx(0.34, abs=2e-3)
    assert exact.beta == pytest.approx(0.28, abs=2e-3)


def test_a_three_run_ladder_end_to_end_and_cached(tmp_path, monkeypatch, capsys):
    from maxgpt import loop

    out = tmp_path / "ladder"
    common = ["--target-params", "1M", "--bootstrap", "5", "model.vocab_size=512",
              "train.eval_steps=2"]
    assert main(["scaling", "--out", str(out), "--sizes", "32x1:8K,64x1:16K", *common]) == 0
    real_run, trained = loop.run, []

    def counting_run(cfg, *args, **kwargs):
        trained.append(cfg.model.name)
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "run", counting_run)
    sizes = "32x1:8K,64x1:16K,96x2:8K"
    assert main(["scaling", "--out", str(out), "--sizes", sizes, *common]) == 0
    assert trained == ["ladder-w96-l2-t8000"]  # the first two were cached
    fit = json.loads((out / "fit.json").read_text())
    assert [r["name"] for r in fit["runs"]] == ["w32-l1-t8000", "w64-l1-t16000", "w96-l2-t8000"]
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in fit["runs"]:  # steps of 16 x 128 tokens
        assert run["tokens"] == round(int(run["name"].split("-t")[1]) / 2048) * 2048
        assert math.isfinite(run["loss"]) and run["loss"] < math.log(512) + 1
    assert fit["target"]["params"] == 1_000_000 and fit["underdetermined"]
    assert "fit: L(N, D)" in capsys.readouterr().out
    assert main(["scaling", "--out", str(out), "--sizes", sizes, *common]) == 0
    assert len(trained) == 1  # nothing trained the third time
