"""Pipeline parallelism (maxgpt/pipeline.py): training through stages equals one device.

The reference is always the unsplit model on one device (the naive stack of layers, no
stages), 5 steps, losses within a relative 2e-5, as for every other mesh axis
(tests/test_train.py).
"""

import jax
import numpy as np
import pytest

from maxgpt import loop, pipeline, sharding, train
from maxgpt.config import ConfigError
from tests.conftest import make_config
from tests.test_train import BASE, run

ONE = jax.devices()[:1]
DEEP = ("model.num_layers=8", "optim.lr=3e-3")  # 8 layers: 4 stages x 2 repeats
# (lr 1e-2 makes the 8-layer model amplify float rounding: even gradient accumulation on one
# device then drifts 2e-5 from the plain step by step 5)


def losses(*overrides, devices=None, preset="tiny"):
    return run(*overrides, devices=devices, preset=preset)[0]


@pytest.fixture(scope="module")
def one_device():
    return losses("mesh.data=1", devices=ONE)


@pytest.fixture(scope="module")
def one_device_deep():
    return losses(*DEEP, "mesh.data=1", devices=ONE)


def test_schedule_bubble_and_check():
    gpipe = pipeline.Schedule(stages=4, repeats=1, microbatches=4)
    circular = pipeline.Schedule(stages=4, repeats=2, microbatches=4)
    assert gpipe.steps == 7 and gpipe.bubble == pytest.approx(3 / 7)
    assert circular.steps == 11 and circular.bubble == pytest.approx(3 / 11)
    assert "bubble 27.3%" in circular.describe() and "circular, 2 repeats" in circular.describe()
    cfg = make_config("tiny", "model.num_layers=6", "mesh.stage=4", "mesh.data=2")
    with pytest.raises(ConfigError, match="6 layers do not split into mesh.stage=4"):
        train.build_trainer(cfg, sharding.make_mesh(cfg.mesh))


def test_stored_layout_is_depth_order_once_flattened():
    """A circular schedule stores stacked layers as (repeats, L / repeats, ...): a reshape of
    (L, ...) whose second axis, split over S stages in contiguous runs, gives stage s the
    layer runs s, s + S, ... (the circular placement)."""
    names = {"blocks": {"w": ("layers", "embed")}, "embed": ("vocab", "embed")}
    params = {"blocks": {"w": np.arange(8 * 3).reshape(8, 3)}, "embed": np.ones((5, 3))}
    stored = pipeline.to_stored(params, names, repeats=2)
    assert stored["blocks"]["w"].shape == (2, 4, 3) and stored["embed"].shape == (5, 3)
    stage_1_of_2 = stored["blocks"]["w"][:, 2:4]  # stage 1's runs: layers 2-3 and 6-7
    np.testing.assert_array_equal(stage_1_of_2[:, :, 0] // 3, [[2, 3], [6, 7]])
    back = pipeline.to_natural(stored, names, repeats=2)
    np.testing.assert_array_equal(back["blocks"]["w"], params["blocks"]["w"])
    assert pipeline.stored_names(names, 2)["blocks"]["w"] == ("repeats", "layers", "embed")


@pytest.mark.parametrize("mesh", [
    ("mesh.stage=2", "mesh.fsdp=4", "mesh.data=1"),  # GPipe, parameters FSDP-split
    ("mesh.stage=2", "mesh.tensor=2", "mesh.data=2"),  # with Megatron tensor parallelism
])
def test_gpipe_equals_one_device(mesh, one_device):
    np.testing.assert_allclose(losses(*mesh), one_device, rtol=2e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_circular_schedule_equals_one_device(remat, one_device_deep):
    """stage=4 x data=2, 2 repeats: each stage holds layers s and s + 4, four microbatches
    go round twice; with and without remat (the checkpoint around each stage's step)."""
    got = losses(*DEEP, "mesh.stage=4", "mesh.data=2", "mesh.pipeline_repeats=2",
                 f"model.remat={remat}")
    np.testing.assert_allclose(got, one_device_deep, rtol=2e-5)


def test_mixture_of_experts_through_stages_equals_one_device():
    """stage=2 x expert=2 x data=2 on tiny-moe, and an alternating dense/MoE stack. The
    routing statistics (and so the balance loss) are per microbatch: the one-device
    reference accumulates the same two microbatches (train.microbatches=2)."""
    for extra in ((), ("model.num_layers=4", "model.moe_every=2")):
        expected = losses(*extra, "mesh.data=1", "train.microbatches=2", devices=ONE,
                          preset="tiny-moe")
        got = losses(*extra, "mesh.stage=2", "mesh.expert=2", "mesh.data=2", preset="tiny-moe")
        np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_checkpoints_move_between_stage_layouts(tmp_path):
    """6 steps on fsdp=8 straight == 2 on stage=2, then 2 on fsdp=8, then 2 on stage=2 x 2
    repeats (whose layers are stored (2, L / 2, ...)), each resuming the one before:
    checkpoints reshard across the stage axis and restore across layouts."""
    def go(steps, *mesh, run_dir=tmp_path / "moved"):
        # a constant lr: the schedule must not depend on where a run stops (train.steps)
        cfg = make_config("tiny", *BASE, "model.num_layers=4", "optim.lr=3e-3",
                          "optim.decay=constant", f"train.steps={steps}", "checkpoint.every=2",
                          "train.eval_every=0", *mesh)
        return [row["loss"] for row in loop.run(cfg, run_dir, echo=False)[1]]

    fsdp = ("mesh.data=1", "mesh.fsdp=8")
    straight = go(6, *fsdp, run_dir=tmp_path / "straight")
    moved = (go(2, "mesh.stage=2", "mesh.data=4") + go(4, *fsdp)
             + go(6, "mesh.stage=2", "mesh.data=4", "mesh.pipeline_repeats=2"))
    np.testing.assert_allclose(moved, straight, rtol=2e-5)


def test_parameters_leave_the_train_state_in_depth_order():
    """Generation, scoring and export get (L, ...) stacks from a circular pipeline's state."""
    cfg = make_config("tiny", *DEEP, "mesh.stage=4", "mesh.data=2", "mesh.pipeline_repeats=2")
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    state = train.init_state(trainer)
    assert state["params"]["blocks"]["attn"]["q_proj"].shape[:2] == (2, 4)
    with jax.set_mesh(trainer.mesh):
        natural = trainer.natural_params(state["params"])
    plain = make_config("tiny", *DEEP, "mesh.data=1")
    reference = train.init_state(train.build_trainer(plain, sharding.make_mesh(plain.mesh, ONE)))
    jax.tree.map(np.testing.assert_array_equal, natural, reference["params"])
