"""The logical -> mesh rules, and that initialisation lands directly in shards."""

import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from maxgpt import sharding, train
from maxgpt.config import ConfigError
from tests.conftest import REPO, make_config


def mesh_of(*overrides):
    return sharding.make_mesh(make_config("tiny", *overrides).mesh)


def test_rules_use_each_mesh_axis_once_and_only_where_it_divides():
    mesh = mesh_of("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    spec = sharding.logical_to_spec
    assert spec(("batch", "seq", "embed"), (8, 16, 64), mesh) == P(("data", "fsdp"), None, None)
    assert spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh) == \
        P(None, "fsdp", None, None)  # one kv head cannot be split: replicated
    assert spec(("batch", "seq"), (2, 16), mesh) == P("data", None)  # 2 rows: data only
    assert spec(("vocab", "embed"), (255, 64), mesh) == P(None, "fsdp")


def test_minus_one_takes_the_rest_and_bad_products_are_errors():
    ones = dict.fromkeys(("stage", "data", "fsdp", "context", "expert", "tensor"), 1)
    assert dict(mesh_of("mesh.data=-1", "mesh.tensor=2").shape) == {
        **ones, "data": 4, "tensor": 2}
    assert dict(mesh_of("mesh.data=2", "mesh.expert=-1").shape) == {
        **ones, "data": 2, "expert": 4}
    assert dict(mesh_of("mesh.data=1", "mesh.stage=2", "mesh.context=-1").shape) == {
        **ones, "stage": 2, "context": 4}
    with pytest.raises(ConfigError, match="has 4 devices but 8 are available"):
        mesh_of("mesh.data=2", "mesh.tensor=2")


@pytest.mark.parametrize("overrides, name, spec", [
    (("mesh.data=1", "mesh.fsdp=8"), "embed", P(None, "fsdp")),
    (("mesh.data=1", "mesh.fsdp=8"), "blocks/mlp/up_proj", P(None, "fsdp", None)),
    (("mesh.data=2", "mesh.tensor=4"), "blocks/attn/q_proj", P(None, None, "tensor", None)),
    (("mesh.data=2", "mesh.tensor=4"), "blocks/mlp/down_proj", P(None, "tensor", None)),
    (("mesh.data=2", "mesh.tensor=4"), "lm_head", P(None, "tensor")),
    # 2 kv heads do not split 4 ways: replicated
    (("mesh.data=2", "mesh.tensor=4"), "blocks/attn/k_proj", P(None, None, None, None)),
])
def test_initialised_params_live_in_their_shards(overrides, name, spec):
    cfg = make_config("tiny", *overrides)
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    state = train.init_state(trainer)
    leaf = state["params"]
    for part in name.split("/"):
        leaf = leaf[part]
    assert leaf.sharding.spec == spec
    # each device holds only its slice: no full copy anywhere
    expected = tuple(dim // (trainer.mesh.shape[axis] if axis else 1)
                     for dim, axis in zip(leaf.shape, spec))
    assert leaf.addressable_shards[0].data.shape == expected
    # the Adam moments live exactly where their parameter lives
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    for part in name.split("/"):
        mu = mu[part]
    assert mu.sharding == leaf.sharding


def test_no_involuntary_resharding_on_a_three_axis_mesh(tmp_path):
    """XLA warns when the layouts we ask for can only be met by replicating a tensor (an
    all-gather of activations on every step). The embedding lookups once caused that. The
    run reads the built-in corpus, so the evaluation step is checked as well."""
    proc = subprocess.run(
        [sys.executable, "-m", "maxgpt", "train", "--config", "configs/models/tiny-gpt2.yaml",
         "--run-dir", str(tmp_path / "run"), "train.steps=1", "mesh.data=2", "mesh.fsdp=2",
         "mesh.tensor=2", "model.vocab_size=512", "train.eval_steps=1"],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Involuntary full rematerialization" not in proc.stderr


def test_embedding_lookup_stays_in_the_table_shards():
    """Under FSDP every device looks its FSDP group's ids up in its own slice of the table's
    width; no device ever holds the whole (vocab, width) table or its gradient (for Llama 3
    that was a replicated 1.96 GiB fp32 copy and a 1.96 GiB gradient per chip). The rows
    equal a plain lookup."""
    from jax.sharding import NamedSharding

    from maxgpt.model.transformer import lookup

    mesh = mesh_of("mesh.data=2", "mesh.fsdp=4")
    table = jax.random.normal(jax.random.key(0), (512, 64))
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 512)

    def loss(table, ids):
        rows = sharding.constrain(lookup(table, ids, "vocab"), ("batch", "seq", "embed"))
        return (rows * rows).sum(), rows

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True), in_shardings=(
            NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P(("data", "fsdp")))))
        hlo = "\n".join(line for line in step.lower(table, ids).compile().as_text().split("\n")
                        if " = " in line)  # instructions only
        (_, rows), grad = step(table, ids)
    assert "f32[512,16]" in hlo  # the shard: 64 wide / 4 devices
    assert "f32[512,64]" not in hlo
    np.testing.assert_array_equal(rows, table[ids])
    np.testing.assert_allclose(grad, jax.ops.segment_sum(
        2 * table[ids].reshape(-1, 64), ids.reshape(-1), 512), rtol=1e-6)


def test_memory_hint_does_not_suggest_the_remat_already_in_use():
    sizes = {"data": 1, "fsdp": 8}
    GiB = 2**30
    for remat, suggested in (("none", True), ("dots", True), ("full", False)):
        hint = sharding.memory_hint(sizes, 10 * GiB, 90 * GiB, 95 * GiB, remat)
        assert ("model.remat=full" in hint) == suggested, (remat, hint)
        assert "train.microbatches" in hint
