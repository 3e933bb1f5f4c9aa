"""How a server's instructions reach simulated clients: the messages (``Dispatch`` / ``Reply``), the
``Exchange`` contract every engine implements, and the in-process transport.

``play_round`` (toolchain/learning/fl/simulator.py) hands an exchange the round's dispatches; the in-process
exchange below runs each client's strategy code here, one by one; ``vectorised.VectorisedExchange`` trains them
together on a device; the Flower driver (toolchain/learning/flower/driver.py) sends Flower messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolchain.learning.fl.strategy import ClientData, Strategy


@dataclass
class Dispatch:
    """One instruction for one sampled client, as the server made it: the message object, its encoded
    bytes (what the byte accounting counts) and the client's torch generator seed."""

    cid: int
    kind: str  # TRAIN or SETUP
    rnd: int
    step: int
    ins: Any  # TrainIns or a strategy's own instruction class
    blob: bytes  # ins.to_bytes()
    seed: int


@dataclass
class Reply:
    """A client's encoded result (``res.to_bytes(masks the client held)``) and the class to decode it with."""

    blob: bytes
    cls: type
    resent_bytes: int = 0  # instruction bytes a transport had to send twice (a node that lost its masks)


# exchange(dispatches in sampled order) -> replies by cid; clients must run in that order (in-process RNG)
Exchange = Callable[[list[Dispatch]], dict[int, Reply]]
TRAIN, SETUP = "train", "setup"


class InProcessExchange:
    """The in-process transport: decode each instruction as its client would, run the strategy's client
    side on the shared client model, encode the result. ``client_masks`` is what each client last received
    (part of a checkpoint)."""

    def __init__(self, strategy: Strategy, clients: list[ClientData], client_model: nn.Module,
                 client_masks: dict[int, dict[str, torch.Tensor]]) -> None:
        self.strategy, self.clients, self.client_model, self.client_masks = strategy, clients, client_model, client_masks

    def __call__(self, out: list[Dispatch]) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for d in out:
            ins, data, gen = self.decode(d)
            if d.kind == SETUP:
                res = self.strategy.client_setup(ins, data, self.client_model, gen)
                replies[d.cid] = Reply(res.to_bytes({}), type(res))
                continue
            res = self.strategy.client_train(ins, data, self.client_model, gen)
            replies[d.cid] = Reply(res.to_bytes(ins.masks), type(res))
        return replies

    def decode(self, d: Dispatch) -> tuple[Any, ClientData, torch.Generator]:
        """What client ``d.cid`` starts from: the decoded instruction (a train instruction with the masks it
        now holds), its data and its generator."""
        gen = torch.Generator().manual_seed(d.seed)
        if d.kind == SETUP:
            return type(d.ins).from_bytes(d.blob, {}), self.clients[d.cid], gen
        # A strategy may use its own message kinds (e.g. ZO rounds): decode with the sender's class.
        ins = type(d.ins).from_bytes(d.blob, self.client_masks.get(d.cid, {}))
        self.client_masks[d.cid] = ins.masks
        return ins, self.clients[d.cid], gen
