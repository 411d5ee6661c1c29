"""maxgpt's model as an lm-evaluation-harness `LM`: text requests -> token requests for
maxgpt/scoring.py. Imports lm_eval (the `[eval]` extra): only maxgpt/harness.py imports it,
on process 0, once lm_eval is known to be installed.

Inputs are what training fed the model (maxgpt/data/pipeline.py packs documents as
`bos text eos`, a long document continuing in the next row without a bos):

- loglikelihood: `bos context continuation`, the continuation's tokens split off by
  tokenising context and context + continuation (the harness's `TemplateLM` rule, spaces
  at the end of a context moved into the continuation); an empty context is bos alone.
  Longer than `train.seq_len` + 1 tokens, the sequence is cut from the left (the bos goes,
  as at a row boundary in training);
- loglikelihood_rolling: the text's tokens in windows of `train.seq_len` predictions, the
  first conditioned on bos, each later one on the `seq_len` tokens before it (the
  harness's `get_rolling_token_windows` with context 1, made disjoint), log-probabilities
  summed over the windows: every token predicted once;
- generate_until: `bos context`, cut from the left to leave room for `max_gen_toks` new
  tokens (default 256) within `seq_len`; greedy unless the task samples (`do_sample`);
  the text is cut at the first of the task's `until` strings (eos always ends it).

This is what lm-eval's `hf` backend computes on a `maxgpt export` folder with
`add_bos_token=True` (loglikelihood, generation) and `max_length=seq_len`.
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval import utils
from lm_eval.api.model import TemplateLM

from maxgpt.data.tokenizer import BOS_ID, EOS_ID

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for models that do not say


class MaxgptLM(TemplateLM):
    """Requests scored by a `maxgpt.scoring.Scorer` (process 0's side of it)."""

    def __init__(self, scorer, tokenizer):
        super().__init__()
        self.scorer, self.sp = scorer, tokenizer
        self.max_length = scorer.seq_len

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID  # what an empty context and the first rolling window condition on

    @property
    def tokenizer_name(self) -> str:
        return f"maxgpt-sentencepiece-{self.sp.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        ids = self.sp.encode(string)
        return ids if add_special_tokens is False else [BOS_ID, *ids]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        sequences, counts = [], []
        for _, context, continuation in requests:
            seq = (context + continuation)[-(self.max_length + 1):]
            sequences.append(seq)
            counts.append(min(len(continuation), len(seq) - 1))
        return self.scorer.loglikelihood(sequences, counts)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences, counts, owner = [], [], []
        for index, (text,) in enumerate(r.args for r in requests):
            windows = utils.get_rolling_token_windows(
                token_list=self.sp.encode(text), prefix_token=BOS_ID,
                max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(utils.make_disjoint_window, windows):
                sequences.append(context + predicted)
                counts.append(len(predicted))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, self.scorer.loglikelihood(sequences, counts)):
            totals[index] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # requests with equal settings
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = {}
            if kwargs.get("do_sample"):
                sampling = {"temperature": float(kwargs.get("temperature", 1.0)),
                            "top_k": int(kwargs.get("top_k") or 0),
                            "top_p": float(kwargs.get("top_p") or 1.0)}
            prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
            new = self.scorer.generate(
                prompts, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), **sampling)
            for i, ids in zip(indices, new):
                text = self.sp.decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out[i] = text
        return out
