"""Run configuration: frozen, sectioned dataclasses loaded from YAML plus `section.key=value`.

Resolution order (later wins):

1. `configs/base.yaml`, which holds a value for every key (the one place defaults live);
2. the model preset named by a file's top-level `preset:` key (`configs/models/NAME.yaml`);
3. the `--config` file itself;
4. command-line overrides, `section.key=value`, each type-checked against its field.

Everything a user can get wrong raises `ConfigError` with a one-line message that says what
to change; the CLI prints it as `maxgpt: error: ...` and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
PRESET_DIR = CONFIG_DIR / "models"


VOCAB_MULTIPLE = 128


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    max_seq_len: int  # rows of the learned position table; an upper bound for RoPE models
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int  # == num_heads: multi-head; 1: multi-query; in between: grouped-query
    mlp_dim: int
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float
    norm_position: Literal["pre", "post"]  # post: GPT-1; pre: GPT-2 onwards
    position: Literal["learned", "rope"]
    rope_theta: float
    mlp: Literal["gelu", "swiglu"]
    use_bias: bool
    tie_embeddings: bool
    dropout: float
    attention_window: int  # 0: full causal attention; W: each query sees its last W keys
    window_pattern: Literal["all", "alternate"]  # alternate: GPT-3, odd layers banded
    dtype: Literal["float32", "bfloat16"]  # compute dtype
    param_dtype: Literal["float32", "bfloat16"]  # master weights
    remat: Literal["none", "dots", "dots_offload", "full"]
    attention: Literal["auto", "xla", "splash", "cudnn"]  # kernel (model/attention.py)
    unroll_layers: int  # layer groups per scan step; 0: auto (all on CPU, else 1); -1: all
    init_std: float
    # Mixture of experts (docs/models.md): 0 experts is a dense model.
    num_experts: int  # routed experts per MoE layer, each an MLP of width mlp_dim
    experts_per_token: int  # k of top-k routing
    moe_every: int  # 1: every layer is MoE; n: layers n-1, 2n-1, ... (GShard/Switch: 2)
    moe_routing: Literal["topk_softmax", "softmax_topk"]  # Mixtral | Switch/GShard
    moe_dispatch: Literal["dropless", "capacity"]
    capacity_factor: float  # capacity: each expert takes factor * T * k / E tokens per row
    num_shared_experts: int  # experts every token passes through (one MLP of n * mlp_dim)
    # Quantized training (maxgpt/quantize.py): the weight matmuls of attention, MLP, experts
    quantize: Literal["none", "int8", "fp8"]
    quantize_output: bool  # the output layer's matmul too (embeddings never)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output tables: vocab_size rounded up to a multiple of
        128, so the vocabulary dimension tiles evenly on TPU/GPU matrix units and divides
        over tensor-parallel shards. The extra rows are never predicted (masked logits)."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def mlp_weights(self) -> int:
        """Weights of one MLP (a dense layer's, or one expert's), biases excluded."""
        return (3 if self.mlp == "swiglu" else 2) * self.embed_dim * self.mlp_dim

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    def moe_layers(self) -> list[bool]:
        """Which layers have a mixture-of-experts feed-forward block: with moe_every=n the
        last of every n layers (all of them for n=1), as in GShard and Switch for n=2."""
        n = self.moe_every
        return [self.moe and i % n == n - 1 for i in range(self.num_layers)]

    def layer_windows(self) -> list[int]:
        """Attention window per layer; 0 means full causal attention."""
        if self.attention_window == 0:
            return [0] * self.num_layers
        if self.window_pattern == "all":
            return [self.attention_window] * self.num_layers
        # GPT-3 (Brown et al. 2020, sec. 2.1): dense and locally banded layers alternate.
        return [self.attention_window if i % 2 else 0 for i in range(self.num_layers)]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    stage: int  # pipeline parallelism: the layer stack split into this many stages
    data: int  # -1: whatever the other axes leave of the device count
    fsdp: int  # 0 (auto): the devices of a slice the other axes leave; 1 on CPU
    context: int  # context parallelism: every sequence split along its length
    expert: int  # expert parallelism: MoE experts split over it, a data axis elsewhere
    tensor: int
    pipeline_repeats: int  # layer groups per stage, visited in turn (circular); 1: GPipe
    pipeline_microbatches: int  # pieces of a batch in flight through the stages; 0: mesh.stage

    AXES = ("stage", "data", "fsdp", "context", "expert", "tensor")

    def axes(self) -> dict[str, int]:
        """The mesh axes and their sizes as given (-1: the rest of the devices)."""
        return {axis: getattr(self, axis) for axis in self.AXES}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int  # global, in sequences
    seq_len: int
    seed: int
    log_every: int
    microbatches: int  # gradient accumulation: the global batch is split into this many
    z_loss: float  # weight of the PaLM z-loss, mean(log(Z)^2); 0 turns it off
    loss_chunk: int  # positions per piece of the cross-entropy; 0: auto (maxgpt/loss.py)
    moe_balance_loss: float  # weight of the Switch load-balancing loss (MoE models)
    moe_z_loss: float  # weight of the ST-MoE router z-loss (MoE models)
    eval_every: int  # held-out evaluation every this many steps (and at the end); 0: never
    eval_steps: int  # batches per evaluation, always the same ones
    max_bad_steps: int  # non-finite loss/gradient steps in a row (each skipped) before stopping
    profile_steps: str  # "A:B": a jax.profiler trace of steps A..B into RUN_DIR/profile; "": none

    def profile_range(self) -> tuple[int, int] | None:
        """(A, B) of `profile_steps`, 1-based and inclusive; None when off."""
        if not self.profile_steps:
            return None
        a, b = (int(x) for x in self.profile_steps.split(":"))
        return a, b


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    min_lr_ratio: float  # final lr = lr * min_lr_ratio
    warmup_steps: int
    decay: Literal["cosine", "linear", "constant"]
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float  # global-norm clipping; 0 turns it off


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str  # builtin | synthetic | mixture | PATH of a prepared dataset
    sources: dict  # source=mixture: {PATH or builtin: weight}
    tokenizer: str  # a sentencepiece .model; "": the dataset's own (see docs/data.md)
    num_workers: int  # tokenising processes per stream; 0 tokenises in the training process
    prefetch: int  # batches made ahead of the training step
    streams: int  # independent data streams a global batch is cut from; 0: one per row share


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int  # save every this many steps (and at the end); 0: only at the end
    every_minutes: float  # also save once this many minutes passed since the last save; 0: off
    keep: int  # newest checkpoints kept
    keep_every: int  # also keep every checkpoint whose step is a multiple of this; 0: none
    load_params_from: str  # a run dir (newest checkpoint) or a step dir: start from its params


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """lm-evaluation-harness tasks (docs/evaluation.md), scored by maxgpt's own model."""
    tasks: str  # comma-separated task names scored during training; "": none
    tasks_every: int  # score them every this many steps and at the end; 0: only at the end
    include_path: str  # a folder of task YAMLs of one's own (offline tasks); "": none
    limit: int  # examples per task; 0: all
    batch_size: int  # sequences per forward pass when scoring


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    progress: Literal["auto", "bar", "lines"]  # auto: a bar on a terminal, else lines
    wandb_project: str  # a Weights & Biases project to log to as well; "": off
    wandb_name: str  # the W&B run name; "": the run dir's name
    wandb_mode: Literal["online", "offline"]  # offline: files under RUN_DIR/wandb only


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    mesh: MeshConfig
    train: TrainConfig
    optim: OptimConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    metrics: MetricsConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "metrics": MetricsConfig,
}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> ConfigError:
    """The error for a key no section has, pointing at the key the user most likely meant:
    the same name in another section first (train.lr -> optim.lr), then a close spelling."""
    section, _, name = key.partition(".")
    keys = valid_keys()
    if not name:  # a section (or `section.` with nothing after it)
        close = [] if section in SECTIONS else difflib.get_close_matches(
            section, list(SECTIONS), n=1, cutoff=0.6)
    else:
        close = ([k for k in keys if k.split(".", 1)[1] == name]
                 or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    if close:
        hint = "; did you mean " + " or ".join(f"'{k}'" for k in close) + "?"
    else:
        hint = "; see configs/base.yaml for all keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _shown(value: Any) -> str:
    """A value as the user wrote it (YAML-like), never a Python repr such as
    datetime.date(2024, 1, 1) or None."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple, set, dict)):
        return json.dumps(list(value) if isinstance(value, (tuple, set)) else value,
                          default=str)
    return f"'{value}'"


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check `value` (from YAML or a command line string) against a field's type."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, "
                              f"got {_shown(value)}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan and inf make every later check pass or fail
                raise ConfigError(f"{key} must be a finite number, got {_shown(value)}")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is dict:
        if isinstance(value, str):  # from the command line: a YAML mapping, {a: 1, b: 2}
            try:
                value = yaml.safe_load(value) or {}
            except yaml.YAMLError:
                pass
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key} must be {kind.__name__}, got {_shown(value)}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a complete {section: {key: value}} mapping."""
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if f.name not in values:
                raise ConfigError(
                    f"config key '{key}' has no value (configs/base.yaml sets them all)")
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], key)
        for name in values:
            if name not in kwargs:
                raise _unknown_key(f"{section}.{name}")
        sections[section] = cls(**kwargs)
    for section in raw:
        if section not in SECTIONS:
            raise _unknown_key(str(section))
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def _read_yaml(path) -> dict[str, Any]:  # a pathlib or an etils.epath Path
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, e.g. 'train: {{steps: 10}}'")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], origin: str) -> dict[str, Any]:
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in update.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping of keys to values")
        if section not in merged:
            raise _unknown_key(f"{section}.{next(iter(values), '')}")
        for key, value in values.items():
            if key not in merged[section]:
                raise _unknown_key(f"{section}.{key}")
            merged[section][key] = value
    return merged


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}"
        raise ConfigError(f"unknown model preset '{name}'{hint}")
    return path


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override '{text}' must look like section.key=value, e.g. train.steps=100")
    key, value = text.split("=", 1)
    section, name = key.split(".", 1)
    return section, name, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve base.yaml <- preset <- file <- overrides into a validated Config."""
    raw = _read_yaml(BASE_CONFIG)
    if path is not None:
        from maxgpt.storage import as_path  # a run's config.yaml may be on gs://

        path = as_path(path)
        file_values = _read_yaml(path)
        preset = file_values.pop("preset", None)
        if preset is not None:
            raw = _merge(raw, _read_yaml(preset_path(str(preset))), str(preset))
        raw = _merge(raw, file_values, str(path))
    for text in overrides:
        section, name, value = parse_override(text)
        raw = _merge(raw, {section: {name: value}}, "command line")
    return from_dict(raw)


def validate(cfg: Config) -> None:
    """Checks that need several keys at once; single-key types are checked in _coerce."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {
        "model.vocab_size": m.vocab_size, "model.num_layers": m.num_layers,
        "model.embed_dim": m.embed_dim, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.mlp_dim": m.mlp_dim,
        "model.max_seq_len": m.max_seq_len, "train.steps": t.steps,
        "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
        "train.log_every": t.log_every, "train.microbatches": t.microbatches,
        "train.eval_steps": t.eval_steps, "checkpoint.keep": cfg.checkpoint.keep,
        "train.max_bad_steps": t.max_bad_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if m.embed_dim % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must divide model.embed_dim={m.embed_dim}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dim, got {m.head_dim}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.unroll_layers < -1:
        raise ConfigError(f"model.unroll_layers must be -1 for all layers, 0 for auto, or a "
                          f"count of layers, got {m.unroll_layers}")
    if m.attention_window < 0:
        raise ConfigError(f"model.attention_window must be >= 0, got {m.attention_window}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    try:
        profiled = t.profile_range()
    except ValueError:  # not two integers
        profiled = (0, 0)
    if profiled is not None and not 1 <= profiled[0] <= profiled[1]:
        raise ConfigError(f"train.profile_steps={t.profile_steps!r} must be A:B with "
                          "1 <= A <= B (steps A to B, inclusive), or empty")
    if m.attention == "splash" and t.seq_len % 128:
        raise ConfigError(f"model.attention=splash needs train.seq_len to be a multiple of 128 "
                          f"(the kernel's block), got {t.seq_len}; use auto or xla")
    if t.loss_chunk < 0 or (t.loss_chunk and t.seq_len % t.loss_chunk):
        raise ConfigError(f"train.loss_chunk={t.loss_chunk} must divide train.seq_len="
                          f"{t.seq_len} (or be 0: automatic)")
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.microbatches={t.microbatches} must divide train.batch_size={t.batch_size}")
    nonnegative = {"optim.warmup_steps": o.warmup_steps, "train.eval_every": t.eval_every,
                   "checkpoint.every": cfg.checkpoint.every,
                   "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
                   "checkpoint.keep_every": cfg.checkpoint.keep_every,
                   "data.num_workers": cfg.data.num_workers, "data.prefetch": cfg.data.prefetch,
                   "data.streams": cfg.data.streams}
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.data.streams and t.batch_size % cfg.data.streams:
        raise ConfigError(f"data.streams={cfg.data.streams} must divide "
                          f"train.batch_size={t.batch_size} (each stream gives an equal part "
                          "of every batch)")
    _validate_data(cfg.data)
    _validate_moe(cfg)
    _validate_numbers(cfg)
    _validate_mesh(cfg)


def _validate_mesh(cfg: Config) -> None:
    """What the mesh keys alone decide; what needs the device count (an axis of -1) is
    checked once the mesh exists (train.build_trainer)."""
    m, mesh = cfg.model, cfg.mesh
    for axis, value in mesh.axes().items():
        if (value == 0 and axis != "fsdp") or value < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1 (the rest)"
                              f"{' or 0 (auto)' if axis == 'fsdp' else ''}, got {value}")
    if list(mesh.axes().values()).count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    if m.num_experts and mesh.expert > 0 and m.num_experts % mesh.expert:
        raise ConfigError(f"mesh.expert={mesh.expert} must divide "
                          f"model.num_experts={m.num_experts}")
    if mesh.pipeline_repeats < 1:
        raise ConfigError(f"mesh.pipeline_repeats must be at least 1, got "
                          f"{mesh.pipeline_repeats}")
    if mesh.pipeline_microbatches < 0:
        raise ConfigError(f"mesh.pipeline_microbatches must be >= 0 (0: mesh.stage), got "
                          f"{mesh.pipeline_microbatches}")


def _validate_numbers(cfg: Config) -> None:
    """Values that the code would take without complaint and train nonsense with: a negative
    learning rate climbs the loss, b2 = 1 or eps = 0 divide by zero, a negative std or eps
    is no distribution or norm at all."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    above_zero = {"optim.lr": o.lr, "optim.eps": o.eps, "model.init_std": m.init_std,
                  "model.norm_eps": m.norm_eps, "model.rope_theta": m.rope_theta}
    for key, value in above_zero.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    at_least_zero = {"optim.weight_decay": o.weight_decay, "optim.clip_norm": o.clip_norm,
                     "train.z_loss": t.z_loss}
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {value}")
    for key, value in {"optim.b1": o.b1, "optim.b2": o.b2}.items():
        if not 0 <= value < 1:  # Adam's moment decay rates (Kingma & Ba 2015)
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio (final lr / peak lr) must be in [0, 1], got "
                          f"{o.min_lr_ratio}")
    if not 0 <= t.seed < 2**32:  # numpy's SeedSequence refuses negatives
        raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")
    if not m.name.strip():
        raise ConfigError("model.name must not be empty (it names the run directory and "
                          "exports)")


def _validate_moe(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if m.num_experts < 0 or m.num_shared_experts < 0:
        raise ConfigError("model.num_experts and model.num_shared_experts must be >= 0")
    if m.moe and not 1 <= m.experts_per_token <= m.num_experts:
        raise ConfigError(f"model.experts_per_token must be between 1 and model.num_experts="
                          f"{m.num_experts}, got {m.experts_per_token}")
    if m.moe_every < 1 or m.num_layers % m.moe_every:
        raise ConfigError(f"model.moe_every={m.moe_every} must be >= 1 and divide "
                          f"model.num_layers={m.num_layers}")
    if m.capacity_factor <= 0:
        raise ConfigError(f"model.capacity_factor must be > 0, got {m.capacity_factor}")
    if t.moe_balance_loss < 0 or t.moe_z_loss < 0:
        raise ConfigError("train.moe_balance_loss and train.moe_z_loss must be >= 0")


def _validate_data(d: DataConfig) -> None:
    if not d.source:
        raise ConfigError("data.source must be builtin, synthetic, mixture or a dataset path")
    if (d.source == "mixture") != bool(d.sources):
        raise ConfigError("data.sources (a mapping {path or builtin: weight}) goes with "
                          "data.source=mixture, and only with it")
    for name, weight in d.sources.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"data.sources weight of {_shown(name)} must be a positive "
                              f"number, got {_shown(weight)}")
        if name in ("synthetic", "mixture"):
            raise ConfigError(f"data.sources cannot hold {_shown(name)}: list dataset paths or "
                              "builtin")
