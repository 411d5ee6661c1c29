"""The decoder: one Block, stacked along a `layers` axis and scanned.

Every dense member of the GPT lineage is this module with a different ModelConfig:

- GPT-1: post-norm LayerNorm, learned positions, GELU, biases, tied embeddings;
- GPT-2: the same with pre-norm and a final LayerNorm;
- GPT-3: GPT-2 with dense and locally banded attention on alternating layers;
- Llama 3 / Mistral: pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases,
  untied embeddings; Mistral adds a sliding window;
- mixture of experts (Mixtral, Switch/GShard, a GPT-4-style model): an MoE block (model/moe.py)
  in place of the MLP, in every layer or in the last of every `moe_every` layers.

Blocks are created with `nnx.vmap` (parameters get a leading `layers` axis) and applied with
`jax.lax.scan`, so compile time does not grow with depth. Layers alternating between dense
and MoE are two stacks, `blocks` (the dense ones) and `moe_blocks`, scanned together in
groups of `moe_every` layers; a model with one kind of layer keeps them all in `blocks`.
Dropout keys are passed in explicitly and derived from (seed, step) by the caller, so a step
is a pure function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from maxgpt.config import ModelConfig
from maxgpt.model.attention import Attention, Mask
from maxgpt.model.layers import MLP, Norm, dropout, matmul, normal
from maxgpt.model.moe import MoE
from maxgpt.sharding import constrain, param, platform

# Each layer group's input is named, so that a remat policy applied around several groups at
# once (a pipeline stage, maxgpt/pipeline.py) can keep them as a per-group policy would.
LAYER_INPUT = "layer_input"

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    # keep them in host memory (TPU, GPU): the backward pass copies them back
    "dots_offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
}


def lookup(table: jax.Array, ids: jax.Array, row_axis: str) -> jax.Array:
    """Rows of an embedding table (R, D) for ids (B, T) -> (B, T, D), width split like the
    table's (FSDP), rows over the batch axes that do not split the width.

    The table stays in its shards: every device looks up the ids of all the sequences its
    FSDP group holds (B·T integers) in its own slice of the width, and the caller's
    ("batch", "seq", "embed") constraint moves the rows to the devices that own their
    sequences (one all-to-all of activation size). The gradient is scattered into the
    device's slice too. Gathering the whole table instead costs a replicated fp32 copy and
    gradient of it on every device (2 x 1.96 GiB for Llama 3's 128,256 x 4,096 table,
    docs/performance.md).
    """
    table = constrain(table, (row_axis, "embed"))
    ids = constrain(ids, ("lookup_batch", None))
    rows = constrain(jnp.take(table, ids, axis=0), ("lookup_batch", None, "embed"))
    # Towards the activations' layout one mesh axis at a time, each move an all-to-all that
    # XLA knows: fsdp from the width to the batch here, then (under context parallelism)
    # context from the width to the sequence in the caller's constraint. In one move XLA
    # replicates the rows first ("involuntary full rematerialization").
    return constrain(rows, ("batch", None, "embed"))


@jax.custom_vjp
def gathered_output_weights(w: jax.Array) -> jax.Array:
    """The (D, V) output matrix made whole along D, whose gradient is put back in the
    weights' FSDP layout right away: without that, XLA kept the whole-size gradient of
    the gathered matrix alive through the layers' backward pass (+0.5 GiB per chip for
    llama3-8b on v5p-8, docs/performance.md)."""
    return constrain(w, (None, "vocab"))


def _gathered_fwd(w):
    return gathered_output_weights(w), None


def _gathered_bwd(_, g):
    return (constrain(g, ("embed", "vocab")),)


gathered_output_weights.defvjp(_gathered_fwd, _gathered_bwd)


def output_logits(logits: jax.Array, vocab_size: int) -> jax.Array:
    """The output projection's result (..., V) as the model's logits: fp32, the padding
    columns from `vocab_size` on masked (a finite mask: exp() gives exactly 0, no NaN),
    laid out (batch, seq, vocab)."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] > vocab_size:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -1e9)
    return constrain(logits, ("batch", "seq", "vocab"))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)
        self.post_norm = cfg.norm_position == "post"
        self.dropout = cfg.dropout

    def __call__(self, x, mask, positions, dropout_key=None, cache=None, valid=None):
        """x: (B, T, D); mask: this layer's (attention.Mask, or a (B, T, S) array with a
        kv cache); positions: (B, T); valid: (B, T),
        False for padding tokens (MoE routing skips them; default all valid).

        Returns (x, stats, cache): the MoE layer's routing statistics ({} for a dense layer)
        and, when decoding with a kv `cache` (see Attention), the updated cache, else None.
        """
        k_attn, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        stats = {}

        def attend(h):
            nonlocal cache
            out = self.attn(h, mask, positions, cache)
            if cache is not None:
                out, cache = out
            return dropout(out, self.dropout, k_attn)

        def feed_forward(h):
            nonlocal stats
            if isinstance(self.mlp, MoE):
                ok = jnp.ones(h.shape[:2], bool) if valid is None else valid
                out, stats = self.mlp(h, ok)
            else:
                out = self.mlp(h)
            return dropout(out, self.dropout, k_mlp)

        if self.post_norm:  # GPT-1: x = LN(x + f(x))
            x = self.attn_norm(x + attend(x))
            x = self.mlp_norm(x + feed_forward(x))
        else:  # GPT-2 onwards: x = x + f(LN(x))
            x = x + attend(self.attn_norm(x))
            x = x + feed_forward(self.mlp_norm(x))
        x = constrain(x, ("batch", "seq", "embed"))
        return x, stats, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        V, D, pdt = cfg.padded_vocab_size, cfg.embed_dim, jnp.dtype(cfg.param_dtype)
        self.vocab_size = cfg.vocab_size  # rows from here to V are padding, never predicted
        self.dtype = jnp.dtype(cfg.dtype)
        # the output layer's matmul quantized too only when asked (maxgpt/quantize.py)
        self.output_quant = cfg.quantize if cfg.quantize_output else "none"
        self.dropout = cfg.dropout
        self.remat = cfg.remat
        self.unroll = cfg.unroll_layers
        self.windows = tuple(cfg.layer_windows())  # static: one attention window per layer
        self.embed = param(rngs, normal(cfg.init_std), (V, D), ("vocab", "embed"), pdt)
        self.pos_embed = (param(rngs, normal(cfg.init_std), (cfg.max_seq_len, D),
                                ("position", "embed"), pdt)
                          if cfg.position == "learned" else None)

        def stack(count, moe):
            @nnx.vmap(in_axes=0, out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(rngs):
                return Block(cfg, rngs, moe)

            return make(rngs.split(count))

        moe_layers = cfg.moe_layers()
        if any(moe_layers) and not all(moe_layers):
            # Groups of moe_every layers: moe_every - 1 dense ones, then an MoE one.
            self.group = cfg.moe_every
            self.blocks = stack(moe_layers.count(False), False)
            self.moe_blocks = stack(moe_layers.count(True), True)
        else:
            self.group = 1
            self.blocks = stack(cfg.num_layers, cfg.moe)
            self.moe_blocks = None
        # Post-norm stacks already end in a norm; pre-norm stacks need a final one.
        self.final_norm = Norm(cfg, rngs) if cfg.norm_position == "pre" else None
        self.lm_head = (None if cfg.tie_embeddings else
                        param(rngs, normal(cfg.init_std), (D, V), ("embed", "vocab"), pdt))

    def __call__(self, tokens, positions=None, segment_ids=None, dropout_key=None):
        """tokens, positions, segment_ids: (B, T) int. Returns logits (B, T, V) in fp32,
        V the padded vocabulary, with the padding ids' logits at -1e9 (probability 0).

        positions default to 0..T-1 and segment ids to one document per row; packed rows give
        per-document positions and ids (0 marks padding), and no token attends across ids.
        """
        return self.forward(tokens, positions, segment_ids, dropout_key)[0]

    def forward(self, tokens, positions=None, segment_ids=None, dropout_key=None):
        """As __call__, returning (logits, moe_stats): the MoE layers' routing statistics
        (model/moe.py) averaged over those layers, {} for a dense model."""
        x, stats = self.hidden(tokens, positions, segment_ids, dropout_key)
        return self.logits(x), stats

    def hidden(self, tokens, positions=None, segment_ids=None, dropout_key=None, order=None):
        """The last block's output (B, T, D), before the final norm, and the MoE statistics:
        `logits(hidden)` is `forward`, and a loss can apply `logits` a piece at a time
        (maxgpt/loss.py) so that the (B, T, V) logits never exist whole. `order`: the
        tokens' indices when the sequence is laid out in another order (attention.Mask)."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        k_embed, k_layers = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = self.embed_tokens(tokens, positions, k_embed)
        keys = None if k_layers is None else jax.random.split(k_layers, len(self.windows))
        return self.run_layers(x, segment_ids, positions, order, keys)

    def decode(self, tokens, positions, cache):
        """The forward pass with a kv cache (generation): tokens, positions (B, T), written at
        cache slots start..start+T-1. `cache`: {"k", "v": (L, B, S, K, H) (int8 with "k_scale",
        "v_scale" (L, B, S, K, 1) in an int8 cache), "positions": (B, S)
        position held by each slot, -1 for empty or padding, "start": int}. A query sees the
        filled slots at or before its own position (within the layer's window). Positions -1
        mark left padding. Returns (logits (B, T, V) fp32, the updated cache)."""
        T = tokens.shape[1]
        key_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions,
                                                            cache["start"], axis=1)  # (B, S)
        distance = positions[:, :, None] - key_positions[:, None, :]  # (B, T, S)
        visible = (key_positions[:, None, :] >= 0) & (distance >= 0)
        x = self.embed_tokens(tokens, jnp.maximum(positions, 0))

        # per layer: keys and values, and their scales in an int8 cache (generate.init_cache)
        per_layer = {name: cache[name] for name in ("k", "v", "k_scale", "v_scale")
                     if name in cache}

        def layer(block, x, inputs):
            window, entries = inputs
            mask = visible & ((window <= 0) | (distance < window))
            x, _, new = block(x, mask, positions, None, {**entries, "start": cache["start"]},
                              positions >= 0)
            return x, {name: new[name] for name in entries}

        x, outputs = self._scan_layers(
            layer, x, (jnp.asarray(self.windows, jnp.int32), per_layer))
        # n positions of (G, ...) -> (G, n, ...) -> layers in order (L, ...)
        updated = {name: jnp.stack([o[name] for o in outputs], axis=1).reshape(
            cache[name].shape) for name in per_layer}
        return self.logits(x), {**updated, "positions": key_positions,
                                 "start": cache["start"] + T}

    def embed_tokens(self, tokens, positions, dropout_key=None):
        """Token (and learned position) embeddings of tokens, positions (B, T) -> (B, T, D)."""
        x = lookup(self.embed[...], tokens, "vocab").astype(self.dtype)  # (B, T, D)
        if self.pos_embed is not None:
            x = x + lookup(self.pos_embed[...], positions, "position").astype(self.dtype)
        return constrain(dropout(x, self.dropout, dropout_key), ("batch", "seq", "embed"))

    def output_weights(self) -> jax.Array:
        """The output layer's (D, V) matrix in the compute dtype, whole along D: FSDP gathers
        it here, once, so that a loss applying `logits` a piece at a time (maxgpt/loss.py)
        reuses one gathered copy for every piece instead of gathering it again per piece,
        in the forward pass and again in the recomputing backward pass."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]  # tied: embed.T
        return gathered_output_weights(w.astype(self.dtype))

    def final_hidden(self, x):
        """The output layer's input: the final norm of hidden states (..., D), if any."""
        return x if self.final_norm is None else self.final_norm(x)

    def logits(self, x, weights: jax.Array | None = None):
        """Final norm and output projection of hidden states (..., D) -> fp32 (..., V);
        `weights`: `output_weights()`, if already at hand."""
        x = self.final_hidden(x)
        weights = self.output_weights() if weights is None else weights
        return output_logits(matmul(x, weights, quant=self.output_quant), self.vocab_size)

    @property
    def stacks(self) -> tuple[str, ...]:
        """The names of the stacked layer parameters (`blocks`, then `moe_blocks` if the
        stack alternates dense and MoE layers), in the order `run_layers` takes them."""
        return ("blocks",) if self.moe_blocks is None else ("blocks", "moe_blocks")

    def run_layers(self, x, segment_ids, positions, order=None, keys=None, windows=None,
                   stacks=None, remat=None):
        """Layers applied to x (B, T, D): all of them, or the consecutive run whose windows
        (L',) and parameters `stacks` (one pure dict per `self.stacks` name, each (L'_s, ...)
        of whole groups) are given, as a pipeline stage does (maxgpt/pipeline.py).
        keys: (L',) dropout keys or None. Returns x and the MoE layers' statistics
        averaged over those layers ({} for dense layers)."""
        windows = jnp.asarray(self.windows if windows is None else windows, jnp.int32)

        def layer(block, x, per_layer):
            window, key = per_layer
            x, stats, _ = block(x, Mask(segment_ids, window, order), positions, key,
                                valid=segment_ids > 0)
            return x, stats

        x, outputs = self._scan_layers(layer, x, (windows, keys),
                                       self.remat if remat is None else remat, stacks)
        moe = [stats for stats in outputs if stats]  # the MoE positions of a group
        return x, jax.tree.map(lambda *v: jnp.concatenate(v).mean(), *moe) if moe else {}

    def _scan_layers(self, layer, x, per_layer, remat="none", stacks=None):
        """Apply layers in order, one `jax.lax.scan` step per group of `self.group`.

        `layer(block, x, inputs) -> (x, outputs)`; `per_layer`: a pytree of (L, ...) inputs
        (its first leaf says how many layers); `stacks`: their parameters (run_layers),
        default all of the model's. Returns x and, for each position i in a group, the
        outputs of layers i, n + i, ... stacked: a list of n pytrees of (L / n, ...) arrays.
        """
        L, n = jax.tree.leaves(per_layer)[0].shape[0], self.group
        G = L // n
        modules = [self.blocks] if self.moe_blocks is None else [self.blocks, self.moe_blocks]
        splits = [nnx.split(m) for m in modules]
        stacks = [state for _, state in splits] if stacks is None else stacks
        plan = [(0, j) for j in range(n if self.moe_blocks is None else n - 1)]
        if self.moe_blocks is not None:
            plan.append((1, 0))

        def grouped(tree, m):  # (G * m, ...) -> (G, m, ...)
            return jax.tree.map(lambda a: a.reshape(G, m, *a.shape[1:]), tree)

        states = [grouped(state, sum(1 for p in plan if p[0] == s))
                  for s, state in enumerate(stacks)]

        def group(x, xs):
            group_states, inputs = xs
            x = checkpoint_name(x, LAYER_INPUT)
            outputs = []
            for i, (s, j) in enumerate(plan):
                block = nnx.merge(splits[s][0], jax.tree.map(lambda a: a[j], group_states[s]))
                x, out = layer(block, x, jax.tree.map(lambda a: a[i], inputs))
                outputs.append(out)
            return x, outputs

        if remat != "none":
            group = jax.checkpoint(group, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.lax.scan(group, x, (states, grouped(per_layer, n)), unroll=self._unroll(G))

    def _unroll(self, groups: int) -> int:
        """Layer groups per step of the scan (`model.unroll_layers`). Auto unrolls the whole
        stack on CPU: XLA:CPU then keeps each layer's activations in buffers of their own
        instead of copying them in and out of (L, ...) stacks, and the CPU benchmark step is
        1.24x faster (docs/benchmarks.md); TPU and GPU keep a loop of one layer per step, so
        that compile time does not grow with depth."""
        if self.unroll == -1 or (self.unroll == 0 and platform() == "cpu"):
            return groups
        return max(1, min(self.unroll, groups))
