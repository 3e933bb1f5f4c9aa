"""Federated engine: partitioners, masks, wire codec, memory accounting, strategies, simulator."""

from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.masks import Masks, apply_masks, dense_masks, density, global_topk, prunable_names
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.simulator import Federation, RoundRecord, simulate
from toolchain.learning.fl.strategy import ClientData, ServerContext, Strategy, float_state

__all__ = [
    "TrainConfig", "Masks", "apply_masks", "dense_masks", "density", "global_topk", "prunable_names",
    "TrainIns", "TrainRes", "Federation", "RoundRecord", "simulate", "ClientData", "ServerContext", "Strategy",
    "float_state",
]
