"""A small evaluator for `mmerge evolve` on the bundled tiny models (examples/tiny).

    python examples/evolve_eval.py MERGED_MODEL   -> prints {"ft1": ..., "ft2": ...}

Each fine-tune stands for one skill: the score of skill i is how closely the merged model's
outputs follow fine-tune i's on that skill's own inputs (cosine of the logits of a forward pass
through the embeddings, the MLP blocks and the head; attention is left out to stay short).
A real search would run a benchmark here (lm-eval, a held-out loss); the contract is the same:
read the model at the path given, print a number or a JSON object of metrics on the last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mmerge.io import open_checkpoint

TINY = Path(__file__).resolve().parent / "tiny"
SKILLS = {"ft1": range(0, 64), "ft2": range(64, 128)}  # the token ids each skill is tested on


def logits(model: str | Path, tokens: np.ndarray) -> np.ndarray:
    """The tiny Llama's logits for `tokens`, through the MLP blocks only."""
    w = {name: ref.to_numpy().astype(np.float64) for name, ref in open_checkpoint(model).items()}
    h = w["model.embed_tokens.weight"][tokens]
    layer = 0
    while f"model.layers.{layer}.mlp.up_proj.weight" in w:
        p = f"model.layers.{layer}."
        x = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + 1e-6)
        x = x * w[p + "post_attention_layernorm.weight"]
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        h = (
            h
            + ((gate / (1 + np.exp(-gate))) * (x @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )
        layer += 1
    return h @ w["lm_head.weight"].T


def score(model: str | Path) -> dict[str, float]:
    """Per skill: the mean cosine between the merged model's logits and its fine-tune's."""
    out = {}
    for skill, ids in SKILLS.items():
        tokens = np.array(list(ids))
        a, b = logits(model, tokens), logits(TINY / skill, tokens)
        cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out[skill] = float(np.mean(cos))
    return out


if __name__ == "__main__":
    print(json.dumps(score(sys.argv[1])))
