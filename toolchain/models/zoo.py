"""Model zoo: small CNNs/MLPs built from prunable ``nn.Conv2d``/``nn.Linear`` layers.

Every model is an ``nn.Module`` whose prunable tensors are the ``weight`` of its conv and linear
layers (biases and norm layers are never masked). ``build_model`` records how the model was made
in ``model.arch`` so a saved ``model.pt`` can be rebuilt. The graphs only use operations the int8
exporter maps to TFLite Micro builtins (conv, depthwise conv, dense, max/avg pool, global average
pool, add, relu, flatten).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.models.nsconv import convert_to_nsconv


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return layers


def _apply_norm(model: nn.Module, norm: str, nsconv_stats: str) -> None:
    """``norm="bn"``: keep BatchNorm (the default). ``norm="nsconv"``: BN-free, every conv+BN pair becomes a
    normalized sparse convolution (``toolchain/models/nsconv.py``; FedMef), with statistics over the unpruned
    entries (``nsconv_stats="active"``) or over all entries (``"all"``)."""
    if norm == "bn":
        return
    if norm != "nsconv":
        raise ValueError(f"norm must be 'bn' or 'nsconv', got {norm!r}")

    convert_to_nsconv(model, nsconv_stats)


class MLP(nn.Module):
    """Flatten -> hidden dense layers with ReLU -> classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        h, w, c = in_shape
        dims = [h * w * c, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MicroMLP(nn.Module):
    """Average-pool the image down (in the graph, so devices take raw-sized input), then a tiny MLP.

    Sized for the micro:bit v1 (16 KB RAM): 28x28 -> 7x7 -> 16 -> classes.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, pool: int = 4, hidden: int = 16) -> None:
        super().__init__()
        h, w, c = in_shape
        self.net = nn.Sequential(
            nn.AvgPool2d(pool),
            nn.Flatten(),
            nn.Linear((h // pool) * (w // pool) * c, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, classes); 'same' first conv on 28x28 inputs."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        h, w, c = in_shape
        c1, c2 = max(1, round(6 * width)), max(1, round(16 * width))
        f1, f2 = max(1, round(120 * width)), max(1, round(84 * width))
        pad = 2 if h == 28 else 0  # the classic network pads MNIST's 28x28 to 32x32
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((h + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with an identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), *_conv_bn(cout, cout, 3, relu=False))
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()
        self.residual = True  # body(x) is added to a shortcut (NSConv's SkipInit, toolchain/models/nsconv.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet from stages of basic blocks.

    ``ResNet8`` is the MLPerf Tiny image-classification reference (16/32/64 channels, one block per
    stage); ``ResNet18`` is the CIFAR variant of He et al. (64..512 channels, two blocks per stage).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, ...],
                 blocks: tuple[int, ...], stem: int, norm: str = "bn", nsconv_stats: str = "active") -> None:
        super().__init__()
        c = in_shape[2]
        self.stem = nn.Sequential(*_conv_bn(c, stem, 3))
        layers: list[nn.Module] = []
        cin = stem
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _apply_norm(self, norm, nsconv_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, relu=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images (CIFAR strides), with a width multiplier. ReLU instead of ReLU6
    so the int8 graph fuses activations into the convolutions."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, norm: str = "bn",
                 nsconv_stats: str = "active") -> None:
        super().__init__()

        def ch(v: int) -> int:
            return max(8, int(v * width + 4) // 8 * 8)

        cin = ch(32)
        layers: list[nn.Module] = [*_conv_bn(in_shape[2], cin, 3)]
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = ch(1280) if width > 1.0 else 1280
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _apply_norm(self, norm, nsconv_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGG11(nn.Module):
    """VGG-11 with BN (CIFAR variant: one 512->classes classifier)."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_shape[2]
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(8, int(int(v) * width))
                layers += _conv_bn(cin, cout, 3)
                cin = cout
        self.features = nn.Sequential(*layers)
        side = in_shape[0] // 32
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet8(in_shape: tuple[int, int, int], num_classes: int, norm: str = "bn",
             nsconv_stats: str = "active") -> nn.Module:
    return ResNet(in_shape, num_classes, (16, 32, 64), (1, 1, 1), 16, norm, nsconv_stats)


def _resnet18(in_shape: tuple[int, int, int], num_classes: int, norm: str = "bn",
              nsconv_stats: str = "active") -> nn.Module:
    return ResNet(in_shape, num_classes, (64, 128, 256, 512), (2, 2, 2, 2), 64, norm, nsconv_stats)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "micro-mlp": MicroMLP,
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet8": _resnet8,
    "mobilenetv2": MobileNetV2,
    "vgg11": VGG11,
    "resnet18": _resnet18,
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` for HWC ``in_shape``; ``model.arch`` records the arguments."""
    if name not in MODELS:

        raise ToolchainError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    model = MODELS[name](tuple(in_shape), num_classes, **kwargs)
    model.arch = {"name": name, "in_shape": list(in_shape), "num_classes": num_classes, "kwargs": kwargs}
    return model


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose ``weight`` carries a mask, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
