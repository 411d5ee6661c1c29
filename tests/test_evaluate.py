"""Held-out evaluation against an independent computation over the whole validation split."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from maxgpt import sharding, train
from maxgpt.data.pipeline import eval_batches, resolve_corpus
from maxgpt.data.prepare import document_source
from maxgpt.data.tokenizer import BOS_ID
from maxgpt.evaluate import evaluate
from tests.conftest import make_config


def test_eval_equals_an_independent_pass_over_the_validation_split():
    cfg = make_config("tiny", "data.source=builtin", "model.vocab_size=512",
                      "train.batch_size=32", "train.seq_len=256", "train.eval_steps=40",
                      "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    corpus = resolve_corpus(cfg)
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    state = train.init_state(trainer)
    with jax.set_mesh(trainer.mesh):
        got = evaluate(trainer, state["params"], corpus, corpus.tokenizer.byte_lengths())

    # Independent: every validation document, tokenised here, scored by the model directly.
    source = document_source(corpus.sources[0][0], "validation")
    docs = [source[i].decode() for i in range(len(source))]
    params = jax.device_get(state["params"])
    forward = jax.jit(lambda p, *batch: nnx.merge(trainer.graphdef, p)(*batch))
    tokens = sum(len(corpus.tokenizer.encode_document(d)) - 1 for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert got["eval_tokens"] == tokens  # 40 batches cover the split: all of it, once
    batches = list(eval_batches(corpus, cfg, range(cfg.train.batch_size), 1))
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    starts = np.flatnonzero(inputs == BOS_ID)
    assert [list(x) for x in np.split(inputs, starts[1:])] == [
        list(corpus.tokenizer.encode_document(d)[:-1]) for d in docs]  # in order, whole
    nll = 0.0
    for batch in batches:
        logits = np.asarray(forward(params, batch["inputs"], batch["positions"],
                                    batch["segment_ids"]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        nll -= picked[batch["segment_ids"] > 0].sum()
    assert got["eval_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["eval_ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["eval_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert 8.5 < got["eval_loss"] / math.log(2) < 9.5  # an untrained model: ~log2(512) bits
