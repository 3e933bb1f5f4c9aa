"""The sparse model file: encoding round trips, size that follows the kept weights, rejection of bad files
on the host and in MicroPython (WebAssembly)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from support import sparse_models as sm

from toolchain.contracts import smf as sf
from toolchain.deploy.emulators import wasm
from toolchain.export import requant, smf_writer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "smf_models"


def _tflite_weights(tflite: bytes) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(op, int8 [rows, cols] weights, int32 bias) of every CONV/DEPTHWISE/FC op, read with the schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    g = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def const(i: int, dtype: type) -> np.ndarray:
        t = g.tensors[i]
        return np.frombuffer(bytes(bytearray(model.buffers[t.buffer].data)), dtype).reshape(list(t.shape))

    out = []
    for op in g.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            w = const(op.inputs[1], np.int8)
            w = w.reshape(w.shape[-1] if name == "DEPTHWISE_CONV_2D" else w.shape[0], -1) if name != "DEPTHWISE_CONV_2D" \
                else w.reshape(-1, w.shape[-1]).T
            out.append((name, w, const(op.inputs[2], np.int32)))
    return out


@pytest.mark.parametrize("kind", sm.KINDS)
def test_roundtrip_matches_tflite(kind: str, model_dir: Path) -> None:
    tflite = sm.cached_tflite(model_dir, kind).read_bytes()
    smf = smf_writer.tflite_to_smf(tflite)
    model = sf.read_smf(smf)
    weighted = [op for op in model.ops if op.weights is not None]
    expected = _tflite_weights(tflite)
    assert [op.name for op in weighted] == [name for name, _, _ in expected]
    for op, (_, w, bias) in zip(weighted, expected, strict=True):
        np.testing.assert_array_equal(op.weights, w)
        np.testing.assert_array_equal(op.params["bias"], bias)
        assert all(0 <= m < 2**31 for m in op.params["multiplier"])
    # the file is a fraction of the .tflite: 8 % of the weights are kept
    assert len(smf) < len(tflite) / 3
    print(f"{kind}: .tflite {len(tflite)} B -> .smf {len(smf)} B, {model.kept_weights()} kept weights, "
          f"encodings {[sf.ENCODING_NAMES[op.encoding] for op in weighted]}")


def test_quantize_multiplier_matches_tflite_definition() -> None:
    for real in (0.5, 0.999999999, 1.0, 1e-9, 3.7e-5, 0.0123, 2.5, 2**-31, 2**-40):
        m, s = requant.quantize_multiplier(real)
        if real < 2**-32:
            assert (m, s) == (0, 0)
            continue
        assert 2**30 <= m < 2**31
        assert abs(m * 2.0 ** (s - 31) - real) <= 2.0 ** (s - 32)


@pytest.mark.parametrize("rows,cols,density", [(16, 49, 0.08), (120, 400, 0.05), (6, 25, 0.3), (10, 84, 0.9),
                                               (3, 1000, 0.002), (1, 300, 0.0), (4, 256, 0.5)])
def test_every_encoding_roundtrips_and_smallest_wins(rows: int, cols: int, density: float) -> None:
    rng = np.random.default_rng(rows * cols)
    w = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
    w[rng.random((rows, cols)) >= density] = 0
    block = smf_writer.encode_weights(w)
    decoded, enc, end = sf.decode_weights(block, 0)
    assert end == len(block)
    np.testing.assert_array_equal(decoded, w)
    nnz = int(np.count_nonzero(w))
    sizes = {
        sf.DENSE: w.size,
        sf.BITMAP: (w.size + 7) // 8 + nnz,
        sf.CSR: 2 * rows + (1 if cols <= 256 else 2) * nnz + nnz,
        sf.RLE: 2 * len(smf_writer._rle_pairs(w.reshape(-1))),
    }
    assert len(block) - sf.WEIGHTS.size == min(sizes.values())
    assert sizes[enc] == min(sizes.values())


def test_size_follows_kept_weights() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(1, 128, (120, 400)).astype(np.int8)
    sizes = []
    for keep in (0.01, 0.02, 0.05, 0.1):
        pruned = np.where(rng.random(w.shape) < keep, w, 0).astype(np.int8)
        nnz = int(np.count_nonzero(pruned))
        size = len(smf_writer.encode_weights(pruned)) - sf.WEIGHTS.size
        assert size <= 2 * nnz + 2 * 120 + w.size // 256  # ~2 bytes per kept weight
        sizes.append(size / nnz)
    assert max(sizes) < 2.3


def _corruptions(smf: bytes) -> dict[str, bytes]:
    flipped = bytearray(smf)
    flipped[len(smf) // 2] ^= 0x10
    bad_magic = b"XXXX" + smf[4:]
    newer = bytearray(smf)
    newer[4] = 2
    newer[-4:] = struct.pack("<I", zlib.crc32(bytes(newer[:-4])))
    return {"flipped": bytes(flipped), "truncated": smf[:-7], "bad_magic": bad_magic,
            "version": bytes(newer), "empty": b"", "appended": smf + b"\0"}


EXPECTED = {"flipped": "CRC32", "truncated": "truncated", "bad_magic": "not a sparse model",
            "version": "version", "empty": "not a sparse model", "appended": "truncated or padded"}


def test_corrupt_files_rejected_on_host(model_dir: Path) -> None:
    smf = smf_writer.tflite_to_smf(sm.cached_tflite(model_dir, "microbit").read_bytes())
    for name, data in _corruptions(smf).items():
        with pytest.raises(sf.SmfError, match=EXPECTED[name].split()[0]):
            sf.read_smf(data)


@pytest.mark.skipif(not wasm.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
def test_corrupt_files_rejected_in_micropython(model_dir: Path) -> None:
    smf = smf_writer.tflite_to_smf(sm.cached_tflite(model_dir, "microbit").read_bytes())
    cases = _corruptions(smf)
    files = {**sm.engine_files(), **{f"/{name}.smf": data for name, data in cases.items()}, "/good.smf": smf}
    code = f"from smf import Model\nfor name in {['good', *cases]!r}:\n"
    code += ("    for src in (open('/' + name + '.smf', 'rb').read(), '/' + name + '.smf'):  # bytes, then streamed\n"
             "        try:\n            Model(src)\n            print(name, 'OK')\n"
             "        except ValueError as e:\n            print(name, 'ValueError', e)\n")
    out = wasm.run_micropython(code, files=files).strip().splitlines()
    assert len(out) == 2 * (len(cases) + 1)
    for line in out:
        name, msg = line.split(" ", 1)
        if name == "good":
            assert msg == "OK"
        else:
            assert msg.startswith("ValueError") and EXPECTED[name] in msg, (name, msg)


def test_unsupported_operator_is_a_clear_error() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="tanh")])
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.random.rand(1, 8).astype(np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    with pytest.raises(sf.SmfError, match="TANH is not supported"):
        smf_writer.tflite_to_smf(conv.convert())
    with pytest.raises(sf.SmfError, match="not a valid .tflite"):
        smf_writer.tflite_to_smf(b"garbage" * 10)
