"""Small pruned full-int8 .tflite models for the sparse-format and device-engine tests.

Built the way the toolchain exports: a Keras model, magnitude pruning (kernel weights set to exactly 0),
``tf.lite.TFLiteConverter`` with ``optimizations=[DEFAULT]``, an MNIST representative dataset,
``TFLITE_BUILTINS_INT8`` and int8 input/output (per-channel int8 weights).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MNIST_DIRS = [REPO / "models" / "data" / "mnist", Path("/work/shared/data/mnist")]
KINDS = ("lenet", "microbit", "resnet")


def mnist(split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of the MNIST ``train`` or ``t10k`` split."""
    for d in MNIST_DIRS:
        p = d / f"{split}-images-idx3-ubyte.gz"
        if p.is_file():
            images = np.frombuffer(gzip.open(p).read(), np.uint8, offset=16).reshape(-1, 28, 28)
            labels = np.frombuffer(gzip.open(d / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
            return images, labels
    raise FileNotFoundError(f"MNIST not found in {MNIST_DIRS}")


def _keras_model(kind: str):  # noqa: ANN202 - keras types
    import keras
    from keras import layers

    inp = keras.Input((28, 28, 1))
    if kind == "lenet":
        x = layers.Conv2D(6, 5, activation="relu")(inp)
        x = layers.MaxPool2D(2)(x)
        x = layers.Conv2D(16, 5, activation="relu")(x)
        x = layers.MaxPool2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(120, activation="relu")(x)
        x = layers.Dense(84, activation="relu")(x)
        out = layers.Dense(10)(x)
    elif kind == "microbit":
        x = layers.AveragePooling2D(4)(inp)
        x = layers.Flatten()(x)
        x = layers.Dense(16, activation="relu")(x)
        out = layers.Dense(10)(x)
    elif kind == "resnet":
        x = layers.ZeroPadding2D(1)(inp)
        x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)  # torch-style stride-2 padding
        y = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        y = layers.Conv2D(8, 1)(y)
        x = layers.ReLU()(layers.Add()([x, y]))
        x = layers.ZeroPadding2D(1)(x)
        x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
        x = layers.GlobalAveragePooling2D()(x)
        out = layers.Dense(10)(x)
    else:
        raise ValueError(kind)
    return keras.Model(inp, out)


def _prune(model, density: float) -> None:  # noqa: ANN001
    """Keep the ``density`` fraction of largest-magnitude weights of every kernel; zero the rest exactly."""
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights or weights[0].ndim < 2:
            continue
        k = weights[0]
        keep = max(1, int(round(density * k.size)))
        thresh = np.sort(np.abs(k).ravel())[-keep]
        weights[0] = np.where(np.abs(k) >= thresh, k, 0.0).astype(k.dtype)
        layer.set_weights(weights)


def build_tflite(kind: str, density: float = 0.08, steps: int = 300, seed: int = 0) -> bytes:
    """Train ``kind`` briefly on MNIST, prune it to ``density`` and convert it to a full-int8 .tflite."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    images, labels = mnist("train")
    x = images[:, :, :, None].astype(np.float32) / 255.0
    model = _keras_model(kind)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    n = steps * 64
    model.fit(x[:n], labels[:n], batch_size=64, epochs=1, verbose=0)
    _prune(model, density)

    def representative():
        for i in range(0, 200):
            yield [x[50000 + i : 50001 + i]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def cached_tflite(cache: Path, kind: str, density: float = 0.08) -> Path:
    """Path of the model ``kind`` under ``cache``, building it on first use."""
    path = Path(cache) / f"{kind}_{int(round(density * 1000))}.tflite"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(build_tflite(kind, density))
        tmp.replace(path)
    return path


def quantized_inputs(tflite_path: Path, n: int, start: int = 0) -> np.ndarray:
    """The first ``n`` MNIST test images quantized to the model's int8 input, shape [n, 28, 28, 1]."""
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(tflite_path)).get_input_details()[0]
    scale, zp = detail["quantization"]
    images, _ = mnist("t10k")
    x = images[start : start + n, :, :, None].astype(np.float64) / 255.0
    return np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)


def tflm_outputs(tflite_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Outputs of TFLite Micro's reference kernels for each input, int8 [n, classes]."""
    from tflite_micro.python.tflite_micro import runtime

    interp = runtime.Interpreter.from_file(str(tflite_path))
    outs = []
    for x in inputs:
        interp.set_input(x[None], 0)
        interp.invoke()
        outs.append(interp.get_output(0).reshape(-1).copy())
    return np.stack(outs)


ENGINE_DIR = REPO / "device_runtime" / "micropython"


def engine_files(root: str = "/lib") -> dict[str, bytes]:
    """The sparse engine's modules as files for the MicroPython WebAssembly runner."""
    return {f"{root}/{p.name}": p.read_bytes() for p in sorted(ENGINE_DIR.glob("smf*.py"))}


_WASM_ENGINE = """
import gc, ubinascii
gc.collect()
a0 = gc.mem_alloc()
from smf import Model
m = Model(open('/model.smf', 'rb').read(), dense=%(dense)s)
gc.collect()
a1 = gc.mem_alloc()
buf = memoryview(m.input_buffer())[:m.input_size]  # the buffer may be longer (shared)
f = open('/inputs.bin', 'rb')
used = 0
for k in range(%(n)d):
    f.readinto(buf)
    gc.disable()  # so that mem_alloc also counts garbage: inference should allocate (almost) nothing
    a2 = gc.mem_alloc()
    out = m.infer()
    used += gc.mem_alloc() - a2
    gc.enable()
    print(ubinascii.hexlify(out).decode())
print('heap', a1 - a0, used)
"""


def run_engine_wasm(smf: bytes, inputs: np.ndarray, heap_bytes: int = 160 * 1024,
                    dense: bool = False) -> tuple[np.ndarray, dict[str, int]]:
    """Run the MicroPython engine on ``inputs`` ([n, ...] int8) in one WebAssembly MicroPython process.

    Returns the int8 outputs [n, classes] and heap figures: ``model`` (bytes held by the loaded model,
    code included) and ``inference`` (bytes allocated by all inferences together, garbage included).
    """
    from toolchain.deploy.emulators.wasm import run_micropython

    n = len(inputs)
    files = {**engine_files(), "/model.smf": smf, "/inputs.bin": np.ascontiguousarray(inputs, np.int8).tobytes()}
    out = run_micropython(_WASM_ENGINE % {"n": n, "dense": dense}, heap_bytes=heap_bytes, files=files)
    lines = out.strip().splitlines()
    if len(lines) != n + 1 or not lines[-1].startswith("heap"):
        raise AssertionError(f"unexpected MicroPython output: {out[-500:]!r}")
    outputs = np.stack([np.frombuffer(bytes.fromhex(line), np.int8) for line in lines[:-1]])
    _, model_bytes, infer_bytes = lines[-1].split()
    return outputs, {"model": int(model_bytes), "inference": int(infer_bytes)}


CIFAR_DIR = Path("/work/shared/data/cifar10")
# toolchain.data.datasets.load_cifar10's preprocessing (it reads all six files, ~50 s on a loaded machine; the
# test models need only the test batch)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10_test(root: Path = CIFAR_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [10000, 32, 32, 3] NHWC, labels) of the CIFAR-10 test batch, or FileNotFoundError."""
    import lzma

    for p in (root / "test_batch.bin", root / "test_batch.bin.xz"):
        if p.is_file():
            raw = (lzma.open(p) if p.suffix == ".xz" else open(p, "rb")).read()
            rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
            return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), rec[:, 0].copy()
    raise FileNotFoundError(f"CIFAR-10 not found in {root}")


def cifar_float(images: np.ndarray) -> np.ndarray:
    from toolchain.data.datasets import Preprocessing

    return Preprocessing(CIFAR_MEAN, CIFAR_STD).apply(images)


def build_resnet8_tflite(density: float = 0.01, steps: int = 40, seed: int = 0) -> bytes:
    """The toolchain's ResNet-8 (toolchain.models.zoo) for CIFAR-10, every conv and linear layer pruned to
    ``density`` by magnitude, trained ``steps`` masked Adam steps (so that its outputs depend on the input),
    BatchNorm folded, exported by the toolchain's int8 exporter (toolchain.export.artifacts.int8_tflite): the
    same path as ``toolchain build``, in seconds instead of the 21 minutes of a federated build."""
    import torch

    from toolchain.export.artifacts import int8_tflite
    from toolchain.models.fold_bn import fold_batchnorm
    from toolchain.models.zoo import build_model, prunable_layers

    torch.manual_seed(seed)
    images, labels = cifar10_test()
    # trained on test images 2000.. (the bit-exactness checks use the first 1000; accuracy is not the point)
    x = torch.from_numpy(cifar_float(images[2000:2000 + steps * 64])).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels[2000:2000 + steps * 64].astype(np.int64))
    model = build_model("resnet8", (32, 32, 3), 10)
    masks = []
    for _, layer in prunable_layers(model):
        w = layer.weight.detach()
        keep = max(1, int(round(density * w.numel())))
        thresh = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
        masks.append((layer, (w.abs() >= thresh).to(w.dtype)))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for k in range(steps):
        with torch.no_grad():
            for layer, mask in masks:
                layer.weight.mul_(mask)
        loss = torch.nn.functional.cross_entropy(model(x[k * 64:(k + 1) * 64]), y[k * 64:(k + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for layer, mask in masks:
            layer.weight.mul_(mask)
    folded = fold_batchnorm(model.eval())
    return int8_tflite(folded, (32, 32, 3), cifar_float(images[-200:])).data


def cached_resnet8(cache: Path, density: float = 0.01) -> Path:
    """Path of :func:`build_resnet8_tflite`'s model under ``cache``, built on first use."""
    path = Path(cache) / f"resnet8_cifar_{int(round(density * 1000))}.tflite"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(build_resnet8_tflite(density))
        tmp.replace(path)
    return path


def cifar_inputs(tflite_path: Path, n: int, start: int = 0) -> np.ndarray:
    """The first ``n`` CIFAR-10 test images, preprocessed as the toolchain does and quantized to the model's
    int8 input, shape [n, 32, 32, 3]."""
    from ai_edge_litert.interpreter import Interpreter

    scale, zp = Interpreter(model_path=str(tflite_path)).get_input_details()[0]["quantization"]
    x = cifar_float(cifar10_test()[0][start:start + n]).astype(np.float64)
    return np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
