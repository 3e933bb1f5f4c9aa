"""Block partitions of the zoo models for FedTiny's progressive (block-wise) pruning.

``model_blocks(model)`` returns the prunable tensor names grouped into blocks, ordered input ->
output. FedTiny adjusts one block per adjustment round, cycling output -> input (algorithms.md §1.2):

- ResNet-8 / ResNet-18: one block per stage (conv2_x, conv3_x, ... in He et al.'s naming); the stem
  conv is folded into the first block and the classifier into the last (as [AUTH] does for
  ResNet-18: {conv2_x, conv3_x, conv4_x, conv5_x + fc}). ResNet-8: B = 3, ResNet-18: B = 4.
- VGG-11: consecutive pairs of conv layers, the classifier its own last block: B = 5.
- MobileNetV2: one block per bottleneck stage of ``MobileNetV2.CFG`` (stem folded into the first,
  the last 1x1 conv and fc into the last): B = 7.
- LeNet-5: {conv1, conv2}, {fc1}, {fc2, fc3}: B = 3.
- anything else (MLPs): one block per prunable layer.
"""

from __future__ import annotations

from torch import nn

from toolchain.learning.fl.masks import prunable_names
from toolchain.models.zoo import VGG11, LeNet5, MobileNetV2, ResNet


def _stage_of_resnet(model: ResNet) -> dict[int, int]:
    """Index in ``model.stages`` -> stage number (a stage starts where the stride/width changes)."""
    out, stage = {}, -1
    for i, blk in enumerate(model.stages):
        first_conv = blk.body[0]
        if i == 0 or first_conv.stride[0] != 1 or first_conv.in_channels != first_conv.out_channels:
            stage += 1
        out[i] = stage
    return out


def _group(names: list[str], key) -> list[list[str]]:
    blocks: dict[int, list[str]] = {}
    for n in names:
        blocks.setdefault(key(n), []).append(n)
    return [blocks[k] for k in sorted(blocks)]


def model_blocks(model: nn.Module) -> list[list[str]]:
    names = prunable_names(model)
    if isinstance(model, ResNet):
        stage = _stage_of_resnet(model)
        last = max(stage.values())

        def key(n: str) -> int:
            if n.startswith("stem."):
                return 0
            if n.startswith("stages."):
                return stage[int(n.split(".")[1])]
            return last  # fc

        return _group(names, key)
    if isinstance(model, MobileNetV2):
        bounds, acc = [], 1  # features.0 is the stem; inverted residuals start at features.1
        for _t, _c, n, _s in MobileNetV2.CFG:
            bounds.append((acc, acc + n))
            acc += n

        def key_m(n: str) -> int:
            if n.startswith("features."):
                i = int(n.split(".")[1])
                for s, (lo, hi) in enumerate(bounds):
                    if lo <= i < hi:
                        return s
                return 0 if i == 0 else len(bounds) - 1
            return len(bounds) - 1  # fc

        return _group(names, key_m)
    if isinstance(model, VGG11):
        convs = [n for n in names if n.startswith("features.")]
        rest = [n for n in names if not n.startswith("features.")]
        return [convs[i:i + 2] for i in range(0, len(convs), 2)] + ([rest] if rest else [])
    if isinstance(model, LeNet5):
        return [names[:2], names[2:3], names[3:]]
    return [[n] for n in names]


def block_for_adjustment(j: int, num_blocks: int) -> int:
    """FedTiny's explicit cyclic counter: the j-th adjustment (j = 0, 1, ...) touches block B-1-(j mod B)."""
    return num_blocks - 1 - (j % num_blocks)
