"""One set-up for every federated run: the engine's config, the initial model, the client split, the strategy.

``toolchain build``, ``toolchain train`` and the Flower ServerApp all start here, in this order (the seed is
set right before the model is built: the initial weights are part of the run), so the same options give the
same run on every engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from toolchain.data.datasets import Dataset
from toolchain.learning.fl import Federation, TrainConfig
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.fl.strategy import Strategy
from toolchain.learning.options import FederatedOptions
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model


@dataclass
class RunSetup:
    strategy: Strategy
    model: nn.Module
    fed: Federation
    cfg: TrainConfig


def set_up(opts: FederatedOptions, data: Dataset, model_name: str | None = None) -> RunSetup:
    """The run of ``opts`` on ``data``; ``model_name`` overrides ``opts.model`` (build picks it per board)."""
    name = model_name or opts.model
    if name is None:
        raise ValueError("set_up needs a model name (opts.model or model_name)")
    cfg = opts.train_config()
    seed_everything(opts.seed)
    model = build_model(name, data.input_shape, data.num_classes)
    fed = Federation.from_dataset(data, cfg)
    return RunSetup(make_strategy(opts.algo, cfg), model, fed, cfg)
