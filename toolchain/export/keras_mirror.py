"""Build an NHWC Keras model equal to a (BN-folded) torch ``GraphModule`` and copy its weights.

The mirror is the input of TensorFlow Lite's converter, which is the most TFLite-Micro-compatible
producer of full-int8 models. Supported nodes: Conv2d (incl. depthwise), Linear, ReLU, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, and tensor addition.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class UnsupportedLayer(ValueError):
    pass


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def build_keras_mirror(gm: fx.GraphModule, in_shape_hwc: tuple[int, int, int], dense_as_conv: bool = True):
    """``dense_as_conv``: emit each Linear as a 1x1 CONV_2D on a 1x1xN map. LiteRT 2.3's int8
    FULLY_CONNECTED requantizes with single rounding while TFLite Micro uses double rounding, so the
    two disagree by 1 LSB on ~0.1 % of outputs; their CONV_2D kernels agree bit for bit."""
    import keras
    from keras import layers

    h, w, c = in_shape_hwc
    ShapeProp(gm).propagate(torch.zeros(1, c, h, w))
    modules = dict(gm.named_modules())
    env: dict[str, object] = {}
    flat_from: dict[int, tuple[int, ...]] = {}  # id(keras tensor) -> torch (C, H, W) it was flattened from
    inp = keras.Input(shape=(h, w, c), batch_size=1, name="input")
    out = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = inp
            continue
        if node.op == "output":
            out = env[node.args[0].name]
            if len(out.shape) == 4 and len(node.args[0].meta["tensor_meta"].shape) == 2:
                out = layers.Reshape((out.shape[-1],))(out)
            continue
        src = node.args[0] if node.args else None
        x = env[src.name] if isinstance(src, fx.Node) else None
        src_shape = tuple(src.meta["tensor_meta"].shape) if isinstance(src, fx.Node) else None
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Flatten):
                env[node.name] = _flatten(x, src_shape, flat_from, layers)
            elif isinstance(mod, nn.Linear):
                env[node.name] = _dense(mod, x, flat_from.get(id(x)), layers, dense_as_conv)
            else:
                env[node.name] = _module_layer(mod, x, src_shape, layers)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = (env[n.name] for n in node.args[:2])
            env[node.name] = layers.Add()([a, b])
        elif node.op == "call_function" and node.target is torch.flatten:
            env[node.name] = _flatten(x, src_shape, flat_from, layers)
        elif node.op == "call_function" and node.target is torch.nn.functional.relu:
            env[node.name] = layers.ReLU()(x)
        else:
            raise UnsupportedLayer(f"cannot export node {node.op} {node.target}")
    return keras.Model(inp, out)


def _module_layer(mod: nn.Module, x, src_shape, layers):
    if isinstance(mod, nn.Identity):
        return x
    if isinstance(mod, nn.ReLU):
        return layers.ReLU()(x)
    if isinstance(mod, nn.Conv2d):
        return _conv(mod, x, layers)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
        s = mod.stride if isinstance(mod.stride, int) else mod.stride[0]
        if (mod.padding if isinstance(mod.padding, int) else max(mod.padding)) != 0:
            raise UnsupportedLayer("padded pooling is not supported")
        cls = layers.MaxPooling2D if isinstance(mod, nn.MaxPool2d) else layers.AveragePooling2D
        return cls(pool_size=k, strides=s, padding="valid")(x)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = mod.output_size if isinstance(mod.output_size, int) else mod.output_size[0]
        if size != 1:
            raise UnsupportedLayer("only AdaptiveAvgPool2d(1) is supported")
        return layers.GlobalAveragePooling2D(keepdims=True)(x)
    raise UnsupportedLayer(f"cannot export layer {type(mod).__name__}")


def _flatten(x, src_shape, flat_from: dict[int, tuple[int, ...]], layers):
    if len(src_shape) != 4:
        return x
    y = layers.Flatten()(x)
    flat_from[id(y)] = tuple(src_shape[1:])
    return y


def _conv(mod: nn.Conv2d, x, layers):
    k = mod.kernel_size[0]
    s = mod.stride[0]
    p = mod.padding[0] if isinstance(mod.padding, tuple) else mod.padding
    if mod.kernel_size[0] != mod.kernel_size[1] or mod.stride[0] != mod.stride[1] or mod.dilation != (1, 1):
        raise UnsupportedLayer("only square kernels/strides without dilation are supported")
    # TF 'same' pads asymmetrically for stride 2; torch pads symmetrically: pad explicitly then.
    if p == 0:
        padding = "valid"
    elif s == 1 and k % 2 == 1 and p == k // 2:
        padding = "same"
    else:
        x = layers.ZeroPadding2D(p)(x)
        padding = "valid"
    bias = mod.bias is not None
    w = _np(mod.weight)
    if mod.groups == 1:
        layer = layers.Conv2D(mod.out_channels, k, strides=s, padding=padding, use_bias=bias)
        y = layer(x)
        weights = [w.transpose(2, 3, 1, 0)]
    elif mod.groups == mod.in_channels == mod.out_channels:
        layer = layers.DepthwiseConv2D(k, strides=s, padding=padding, use_bias=bias)
        y = layer(x)
        weights = [w.transpose(2, 3, 0, 1)]
    else:
        raise UnsupportedLayer("grouped convolutions other than depthwise are not supported")
    if bias:
        weights.append(_np(mod.bias))
    layer.set_weights(weights)
    return y


def _dense(mod: nn.Linear, x, chw: tuple[int, ...] | None, layers, as_conv: bool):
    w = _np(mod.weight)  # (out, in) in torch's CHW flatten order
    if chw is not None and (chw[1] > 1 or chw[2] > 1):
        c, h, wd = chw
        w = w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)  # -> HWC order
    bias = [_np(mod.bias)] if mod.bias is not None else []
    if as_conv:
        if len(x.shape) == 2:
            x = layers.Reshape((1, 1, x.shape[-1]))(x)
        layer = layers.Conv2D(mod.out_features, 1, use_bias=mod.bias is not None)
        y = layer(x)
        layer.set_weights([w.T.reshape(1, 1, w.shape[1], w.shape[0]).copy(), *bias])
        return y
    if len(x.shape) == 4:
        x = layers.Reshape((x.shape[-1],))(x)
    layer = layers.Dense(mod.out_features, use_bias=mod.bias is not None)
    y = layer(x)
    layer.set_weights([w.T.copy(), *bias])
    return y
