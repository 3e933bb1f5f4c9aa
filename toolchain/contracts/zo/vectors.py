"""Conformance vectors of the ZO contract (docs/zo.md), stored in ``tests/data/zo_vectors.json``.

Regenerate with ``python -m toolchain.contracts.zo.vectors tests/data/zo_vectors.json``. Part (a) is pure
integer maths (exact on every port); part (b) runs the estimators on a 4-input 3-class linear
softmax classifier, with the loss in float64 in a fixed order that device code can repeat.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import numpy as np

from toolchain.contracts.zo.estimator import ESTIMATORS, apply_update, estimate, f32
from toolchain.contracts.zo.prng import derive, hash32, signs, words

SEEDS = [0, 1, 42, 2024, 0xDEADBEEF, 0xFFFFFFFF]
HASH_INPUTS = [0, 1, 2, 0x9E3779B9, 0xFFFFFFFF]

# Tiny model: logits = W x + b, W 3x4 with 3 pruned entries, cross-entropy averaged over 2 samples.
W = [[0.5, -0.25, 0.0, 0.125], [-0.75, 0.375, 0.0625, 0.0], [0.25, 0.0, -0.5, 1.0]]
W_MASK = [[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1]]
B = [0.1, -0.2, 0.05]
X = [[1.0, 0.5, -1.5, 2.0], [-0.3, 1.2, 0.7, -0.8]]
Y = [0, 2]
ROUND_SEED, K, MU, LR = 2024, 4, 1e-3, 0.5


def canonical(w: list[list[float]], mask: list[list[int]], b: list[float]) -> np.ndarray:
    """Active weights in canonical order: W row-major where mask==1, then b."""
    flat = [v for row, mrow in zip(w, mask, strict=True) for v, m in zip(row, mrow, strict=True) if m] + list(b)
    return np.array(flat, dtype=np.float32)


def linear_ce_loss(v: np.ndarray, mask: list[list[int]], x: list[list[float]], y: list[int]) -> float:
    """Mean cross-entropy of the linear classifier, float64, summation order as in docs/zo.md."""
    rows, cols = len(mask), len(mask[0])
    wd = [[0.0] * cols for _ in range(rows)]
    p = 0
    for c in range(rows):
        for i in range(cols):
            if mask[c][i]:
                wd[c][i] = float(v[p])
                p += 1
    total = 0.0
    for s in range(len(x)):
        z = []
        for c in range(rows):
            acc = float(v[p + c])
            for i in range(cols):
                acc += wd[c][i] * x[s][i]
            z.append(acc)
        m = max(z)
        e = 0.0
        for c in range(rows):
            e += math.exp(z[c] - m)
        total += m + math.log(e) - z[y[s]]
    return total / len(x)


def build() -> dict[str, Any]:
    """All vectors as a JSON-ready dict."""
    prng = {
        "hash32": [{"x": x, "h": hash32(x)} for x in HASH_INPUTS],
        "streams": [],
    }
    for s in SEEDS:
        key = derive(s, 0)
        prng["streams"].append(
            {
                "seed": s,
                "keys": [derive(s, k) for k in range(4)],
                "words": [int(v) for v in words(key, 0, 4)],
                "signs32": [int(v) for v in signs(key, 32, 0, np.int8)],
                "signs_at_1000": [int(v) for v in signs(key, 8, 1000, np.int8)],
            }
        )
    w = canonical(W, W_MASK, B)

    def loss(v: np.ndarray) -> float:
        return linear_ce_loss(v, W_MASK, X, Y)

    est = {}
    for kind in ESTIMATORS:
        r = estimate(loss, w, ROUND_SEED, K, MU, kind)
        est[kind] = {"scalars": [float(v) for v in r.scalars], "loss": r.loss}
    updated = w.copy()
    apply_update(updated, ROUND_SEED, LR, np.array(est["forward"]["scalars"], dtype=np.float32))
    model = {
        "W": W,
        "W_mask": W_MASK,
        "b": B,
        "x": X,
        "y": Y,
        "round_seed": ROUND_SEED,
        "K": K,
        "mu": MU,
        "mu_f32": f32(MU),
        "lr": LR,
        "active": [float(v) for v in w],
        "directions": [[int(v) for v in signs(derive(ROUND_SEED, k), w.size, 0, np.int8)] for k in range(K)],
        "loss0": loss(w),
        "estimators": est,
        "updated_forward": [float(v) for v in updated],
    }
    return {"prng": prng, "model": model}


def dumps(vectors: dict[str, Any]) -> str:
    """JSON with each list of numbers on one line (readable diffs)."""
    text = json.dumps(vectors, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def main(argv: list[str]) -> int:
    text = dumps(build())
    if argv:
        with open(argv[0], "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
