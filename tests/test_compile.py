"""`maxgpt compile`: the real train step compiled ahead of time for TPU slices, on this CPU
machine, through libtpu (the [tpu] extra; CI installs it)."""

import json

import numpy as np
import pytest

from maxgpt import sharding
from maxgpt.chips import parse_slice
from maxgpt.cli import main
from maxgpt.compile import topology_devices
from maxgpt.config import load_config

pytest.importorskip("libtpu", reason="maxgpt compile needs libtpu: pip install -e '.[tpu]'")


def compile_json(capsys, *argv):
    code = main(["compile", "--json", *argv])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow  # about 55 s of XLA:TPU compilation on 2 cores
def test_llama3_8b_fits_on_v5p_8(capsys):
    """With no mesh keys: the default mesh is FSDP over the slice (a replicated 8B model with
    AdamW state needs 218.9 GiB per chip)."""
    code, out = compile_json(capsys, "--config", "configs/models/llama3-8b.yaml", "--topology",
                             "v5p-8", "train.batch_size=8", "train.seq_len=8192")
    assert code == 0 and out["fits"] and out["mesh"]["fsdp"] == 4 and out["hint"] == ""
    assert out["hbm_bytes"] == 95 * 2**30
    # at least the fsdp shard of params + 2 Adam moments (fp32): 8.03B * 12 bytes / 4 chips
    assert 8.03e9 * 12 / 4 < out["bytes_per_device"] < out["hbm_bytes"]
    assert out["flops_per_step"] == pytest.approx(5.15e10 * 8 * 8192, rel=0.01)


def test_llama3_70b_does_not_fit_on_v5e_8(capsys):
    code, out = compile_json(capsys, "--config", "configs/models/llama3-70b.yaml", "--topology",
                             "v5e-8", "mesh.data=1", "mesh.fsdp=-1", "train.batch_size=8",
                             "train.seq_len=2048")
    assert code == 3 and not out["fits"]
    assert out["bytes_per_device"] > 70.5e9 * 12 / 8 > out["hbm_bytes"]
    assert "pipeline stages (mesh.stage)" in out["hint"]  # the weights alone do not fit
    assert out["quantized_dots"] is None  # the compiler stopped: no program to count dots in
    # each chip's weights for generate/eval, float32, int8 and int4 (packed), against the
    # whole model's as `maxgpt params` counts them (tested against arithmetic in test_params):
    # an eighth, but the 161 RMSNorm scales (8192 float32 each) are whole on every chip, and
    # quantized, so are the scales of the matmuls whose embed (contracted) axis fsdp splits:
    # q/k/v/up/gate, 80 layers x (8192 + 2 x 1024 + 2 x 28672) float32
    code = main(["params", "--json", "--config", "configs/models/llama3-70b.yaml"])
    whole = json.loads(capsys.readouterr().out)["weight_bytes"]
    assert set(out["weight_bytes"]) == set(whole) == {"float32", "int8", "int4"}
    norms = 161 * 8192 * 4 * 7 / 8
    assert out["weight_bytes"]["float32"] == whole["float32"] / 8 + norms
    scales = 80 * (8192 + 2 * 1024 + 2 * 28672) * 4 * 7 / 8
    for kind in ("int8", "int4"):
        assert out["weight_bytes"][kind] == whole[kind] / 8 + norms + scales, kind


@pytest.mark.slow  # about 70 s of XLA:TPU compilation on 2 cores
def test_gpt3_175b_fits_on_a_v5p_256_slice_fully_sharded(capsys):
    code, out = compile_json(capsys, "--config", "configs/models/gpt3-175b.yaml", "--topology",
                             "v5p-256", "mesh.data=1", "mesh.fsdp=-1", "train.batch_size=128",
                             "train.seq_len=2048")
    assert code == 0 and out["fits"]


def test_two_slices_compile_with_data_parallelism_across_them(capsys):
    code, out = compile_json(capsys, "--config", "configs/models/tiny.yaml", "--topology",
                             "v5e-16", "--num-slices", "2", "mesh.data=2", "mesh.fsdp=16",
                             "train.batch_size=32")
    assert code == 0 and out["fits"] and out["devices"] == 32
    assert out["bytes_per_device"] == (out["argument_bytes"] + out["output_bytes"]
                                       - out["alias_bytes"] + out["temp_bytes"]
                                       + out["code_bytes"])
    devices = topology_devices(*parse_slice("v5e-16"), num_slices=2)
    mesh = sharding.make_mesh(load_config(None, ["mesh.data=4", "mesh.fsdp=8"]).mesh, devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(4, 8)  # data, fsdp
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()  # data spans the slices
    for row in slices:  # fsdp stays within one slice
        assert len(np.unique(row)) == 1


@pytest.mark.parametrize("keys, slices, want", [
    ((), 1, {"data": 1, "fsdp": 8}),  # FSDP over the slice
    ((), 2, {"data": 2, "fsdp": 8}),  # and data across slices
    (("mesh.data=2",), 1, {"data": 2, "fsdp": 4}),  # fsdp takes what data leaves
    (("mesh.stage=2",), 2, {"stage": 2, "data": 1, "fsdp": 8}),  # stages take the slices
    (("mesh.data=1", "mesh.tensor=-1"), 1, {"fsdp": 1, "tensor": 8}),  # another axis fills
])
def test_default_mesh_is_fsdp_within_slices(keys, slices, want):
    """mesh.fsdp=0 (auto, the default) on TPU devices; on CPU it stays data parallelism."""
    devices = topology_devices(*parse_slice("v5e-8"), num_slices=slices)
    mesh = sharding.make_mesh(load_config(None, list(keys)).mesh, devices)
    assert {a: n for a, n in mesh.shape.items() if a in want} == want
    if not keys:  # the 8 CPU devices of the tests: data parallelism
        assert dict(sharding.make_mesh(load_config(None, []).mesh).shape)["data"] == 8


def test_pipeline_stages_run_across_slices(capsys):
    """With mesh.stage, the stage axis takes the slices (only activations cross the data-
    center network), data and fsdp stay within one; the report names the schedule."""
    code, out = compile_json(capsys, "--config", "configs/models/tiny.yaml", "--topology",
                             "v5e-16", "--num-slices", "2", "mesh.stage=2", "mesh.data=2",
                             "mesh.fsdp=8", "train.batch_size=32")
    assert code == 0 and out["fits"] and out["mesh"]["stage"] == 2
    assert out["pipeline"] == "pipeline 2 stages (GPipe), 2 microbatches, bubble 33.3%"
    devices = topology_devices(*parse_slice("v5e-16"), num_slices=2)
    mesh = sharding.make_mesh(load_config(None, ["mesh.stage=2", "mesh.data=2",
                                                 "mesh.fsdp=8"]).mesh, devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(2, 16)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()


def test_context_parallel_splash_compiles_for_tpu(capsys):
    """One 8192-token sequence split over mesh.context=4 of v5p-8: the splash kernel with
    queries in the load-balanced order compiles, and a device holds a quarter of the
    sequence's activations: less memory than four sequences on fsdp=4 (a sequence each).
    Not a quarter of it: every device also holds the whole sequence's gathered keys and
    values and their gradients (measured: 0.54 of fsdp=4's temporaries)."""
    shape = ("--config", "configs/models/tiny.yaml", "--topology", "v5p-8", "mesh.data=1",
             "train.seq_len=8192", "model.max_seq_len=8192", "model.num_layers=4")
    code, context = compile_json(capsys, *shape, "mesh.context=4", "train.batch_size=1")
    assert code == 0 and context["fits"] and context["mesh"]["context"] == 4
    code, fsdp = compile_json(capsys, *shape, "mesh.fsdp=4", "train.batch_size=4")
    assert code == 0 and context["temp_bytes"] < 0.7 * fsdp["temp_bytes"], (context, fsdp)


@pytest.mark.slow  # about 95 s of XLA:TPU compilation on 2 cores
def test_gpt3_175b_fits_with_pipeline_stages_across_two_slices(capsys):
    """GPT-3 175B on 2 x v5p-128 (128 chips): 2 stages, one per slice, FSDP within each
    (measured: 64.0 of 95 GiB per chip)."""
    code, out = compile_json(capsys, "--config", "configs/models/gpt3-175b.yaml", "--topology",
                             "v5p-128", "--num-slices", "2", "mesh.stage=2", "mesh.data=1",
                             "mesh.fsdp=64", "mesh.pipeline_microbatches=4",
                             "train.batch_size=256", "train.seq_len=2048")
    assert code == 0 and out["fits"] and out["devices"] == 128
    assert "bubble 20.0%" in out["pipeline"]


@pytest.mark.slow  # two compiles of about 3 minutes each on 2 cores
def test_llama3_8b_at_131k_tokens_fits_only_with_context_parallelism(capsys):
    """One 131,072-token sequence of Llama 3 8B on v5p-16 (8 chips): mesh.context=8 and no
    other axis fits (measured: 32.0 GiB per chip); FSDP over the 8 chips, a sequence per chip,
    does not (116.1 GiB)."""
    shape = ("--config", "configs/models/llama3-8b.yaml", "--topology", "v5p-16",
             "mesh.data=1", "train.seq_len=131072", "model.max_seq_len=131072")
    code, context = compile_json(capsys, *shape, "mesh.context=8", "train.batch_size=1")
    assert code == 0 and context["fits"]
    code, fsdp = compile_json(capsys, *shape, "mesh.fsdp=8", "train.batch_size=8")
    assert code == 3 and not fsdp["fits"]


def test_plan_finds_a_mesh_that_fits(capsys):
    assert main(["plan", "--chips", "v5e-8", "--days", "0.01", "--check-mesh", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"fsdp": 8, "tensor": 1}  # the first candidate fits: a ~60M model
    assert 0 < out["bytes_per_device"] < 16 * 2**30
    assert out["model_params"] == pytest.approx(out["params"], rel=0.1)


def test_splash_attention_compiles_for_tpu_without_the_score_matrix(capsys):
    """model.attention=auto is the Pallas splash kernel on TPU: the train step compiles
    for v5e-8, also with alternating full and banded layers (one kernel per window), and
    needs a fraction of the XLA attention's memory, which holds (B, N, T, T) scores."""
    shape = ("--config", "configs/models/tiny.yaml", "--topology", "v5e-8", "mesh.data=1",
             "mesh.fsdp=-1", "train.batch_size=8", "train.seq_len=2048",
             "model.max_seq_len=2048")
    code, splash = compile_json(capsys, *shape)
    assert code == 0
    code, xla = compile_json(capsys, *shape, "model.attention=xla")
    assert code == 0
    scores = 8 * 4 * 2048 * 2048 * 4 / 8  # one layer's fp32 scores, per device
    assert xla["bytes_per_device"] - splash["bytes_per_device"] > scores, (xla, splash)
    code, banded = compile_json(capsys, *shape, "model.attention_window=512",
                                "model.window_pattern=alternate", "model.num_layers=4")
    assert code == 0 and banded["fits"]


@pytest.mark.slow  # two compiles of about 45 s on 2 cores
def test_offloaded_matmul_outputs_leave_device_memory(capsys):
    """model.remat=dots_offload keeps what `dots` keeps, in pinned host memory: the TPU
    train step compiles and needs less device memory than `dots` (measured: temporaries
    0.56 -> 0.25 GiB per chip)."""
    shape = ("--config", "configs/models/tiny.yaml", "--topology", "v5e-8", "mesh.data=1",
             "mesh.fsdp=-1", "train.batch_size=16", "train.seq_len=1024",
             "model.max_seq_len=1024", "model.num_layers=8", "model.embed_dim=512",
             "model.mlp_dim=2048", "model.num_heads=8", "model.num_kv_heads=8")
    code, dots = compile_json(capsys, *shape, "model.remat=dots")
    assert code == 0
    code, offload = compile_json(capsys, *shape, "model.remat=dots_offload")
    assert code == 0 and offload["bytes_per_device"] < dots["bytes_per_device"], (dots, offload)


@pytest.mark.parametrize("topology", ["v5e-8", "v6e-8"])
def test_int8_training_compiles_to_int8_dots_on_tpu(capsys, topology):
    """model.quantize=int8: the optimised TPU program multiplies int8 operands, the seven
    weight matmuls of a layer (q, k, v, o, up, gate, down) in the forward pass; without it,
    none. (On CPU the quantized values are multiplied as floats: maxgpt/quantize.py.)"""
    shape = ("--config", "configs/models/tiny.yaml", "--topology", topology, "mesh.data=1",
             "train.batch_size=8", "train.seq_len=256")
    code, int8 = compile_json(capsys, *shape, "model.quantize=int8")
    assert code == 0 and int8["quantized_dots"] >= 7, int8
    code, plain = compile_json(capsys, *shape)
    assert code == 0 and plain["quantized_dots"] == 0
