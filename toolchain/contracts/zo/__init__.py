"""Zeroth-order (forward-only) training maths shared by host and devices; the contract is docs/zo.md."""

from toolchain.contracts.zo.estimator import (
    ESTIMATORS,
    ActiveWeights,
    ClientReply,
    aggregate,
    apply_update,
    apply_update_torch,
    coefficients,
    estimate,
    estimate_torch,
    f32,
    learning_rate,
    perturb_,
)
from toolchain.contracts.zo.prng import derive, direction_keys, hash32, hash32_np, sign_bits, signs, words

__all__ = [
    "ESTIMATORS",
    "ActiveWeights",
    "ClientReply",
    "aggregate",
    "apply_update",
    "apply_update_torch",
    "coefficients",
    "derive",
    "direction_keys",
    "estimate",
    "estimate_torch",
    "f32",
    "hash32",
    "hash32_np",
    "learning_rate",
    "perturb_",
    "sign_bits",
    "signs",
    "words",
]
