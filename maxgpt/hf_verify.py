"""`maxgpt export --verify`: the folder loads as an evaluator would load it, and computes what
maxgpt computes.

The load runs in a child process in which sentencepiece and protobuf cannot be imported
(lm-evaluation-harness installs neither): `AutoTokenizer` and `AutoModelForCausalLM` on the
folder, as `lm_eval --model hf` does. The child tokenises each text with the tokenizer's
defaults (bos first, as maxgpt trains) and returns ids and logits; the parent compares them
with maxgpt's tokenizer and forward pass. This file runs as that child's script, so its
top level imports only the standard library.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

UNAVAILABLE = ("sentencepiece", "google.protobuf")  # what lm-eval's environment lacks


def require_torch() -> None:
    """A one-line error, before anything is restored or written, if --verify cannot run."""
    from maxgpt.config import ConfigError

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--verify needs {' and '.join(missing)} (pip install torch==2.13.0 "
                          "transformers, or maxgpt[eval]); nothing was written")


def verify(m, params: dict, folder: Path, tokenizer, texts: list[str], context: int
           ) -> tuple[float, float]:
    """(largest logit difference, largest relative perplexity difference) between the folder
    loaded without sentencepiece and maxgpt's forward on `bos text` (its first `context`
    tokens: the folder's length); a ConfigError if the folder does not load or splits a text
    differently."""
    import tempfile

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from maxgpt.config import ConfigError
    from maxgpt.data.tokenizer import BOS_ID
    from maxgpt.model import Transformer
    from maxgpt.storage import one_line

    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0)))),
                      params)
    with tempfile.TemporaryDirectory(prefix="maxgpt-verify-") as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps(texts))
        done = subprocess.run([sys.executable, "-I", __file__, str(folder), tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise ConfigError(f"the export does not load without sentencepiece: "
                              f"{one_line(lines[-1])}")
        theirs = np.load(Path(tmp) / "logits.npz")
        worst_logit = worst_ppl = 0.0
        for k, text in enumerate(texts):
            ids = [BOS_ID, *tokenizer.encode(text)][:context]
            if theirs[f"ids{k}"].tolist() != ids:
                raise ConfigError(f"the exported tokenizer splits {text[:40]!r} differently")
            ours = np.asarray(model(jnp.asarray([ids])))[0, :, :m.vocab_size]
            other = theirs[f"logits{k}"]
            worst_logit = max(worst_logit, float(np.abs(other - ours).max()))
            ppl = [np.exp(_mean_nll(x, ids)) for x in (ours, other)]
            worst_ppl = max(worst_ppl, abs(ppl[1] - ppl[0]) / ppl[0])
    return worst_logit, worst_ppl


def _mean_nll(logits, ids) -> float:
    import numpy as np

    logits = logits[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def _child(folder: str, tmp: str) -> None:
    """Load `folder` with sentencepiece and protobuf unimportable; write ids and logits."""
    for name in UNAVAILABLE:  # None in sys.modules: `import` fails, find_spec says absent
        sys.modules[name] = None
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = {}
    for k, text in enumerate(json.loads((Path(tmp) / "texts.json").read_text())):
        ids = tokenizer(text)["input_ids"][:tokenizer.model_max_length]
        with torch.no_grad():
            out[f"logits{k}"] = model.eval()(torch.tensor([ids])).logits[0].numpy()
        out[f"ids{k}"] = np.asarray(ids)
    np.savez(Path(tmp) / "logits.npz", **out)


if __name__ == "__main__":
    _child(*sys.argv[1:])
