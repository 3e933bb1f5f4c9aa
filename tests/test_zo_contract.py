"""The ZO contract (docs/zo.md): host numpy/torch code vs the device reference, in CPython and MicroPython."""

from __future__ import annotations

import importlib.util
import json
import math
from array import array
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.repl_helpers import soft_reset

from toolchain.contracts.zo import (
    ActiveWeights,
    ClientReply,
    aggregate,
    apply_update,
    apply_update_torch,
    derive,
    estimate,
    estimate_torch,
    hash32,
    hash32_np,
    learning_rate,
    perturb_,
    signs,
    words,
)
from toolchain.contracts.zo import vectors as zo_vectors
from toolchain.deploy.emulators import microbit, wasm

ROOT = Path(__file__).resolve().parents[1]
REF_PATH = ROOT / "device_runtime" / "micropython" / "zo.py"
VECTORS_PATH = ROOT / "tests" / "data" / "zo_vectors.json"
# Scalars: weights live in float32, so in-place restore by subtraction and the port's float change
# the losses by ~ulp_f32; divided by mu that allows |dg| <= 64 * 2**-24 * max(1, |L|) / mu (docs/zo.md).
SCALAR_TOL = 64 * 2.0**-24 * 3 / 1e-3


@pytest.fixture(scope="module")
def vec() -> dict:
    return json.loads(VECTORS_PATH.read_text())


def load_ref() -> ModuleType:
    """A fresh import of the device reference module under CPython (its state is module-global)."""
    spec = importlib.util.spec_from_file_location("zo_ref", REF_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def ref() -> ModuleType:
    return load_ref()


def ref_word(ref: ModuleType, key: int, j: int) -> int:
    ref.h((key >> 16) ^ (j >> 16), (key & 0xFFFF) ^ (j & 0xFFFF))
    return ref._r[0] << 16 | ref._r[1]


def ref_signs(ref: ModuleType, key: int, n: int, off: int = 0) -> list[float]:
    w = array("f", [0.0] * n)
    ref.add(w, key >> 16, key & 0xFFFF, 1.0, off)
    return list(w)


# Device-side loss of the vector model, written as a board would (MicroPython-portable, no numpy).
DEVICE_LOSS = """
import math
import time
def make_loss(w, mask, b_n, x, y):
    def loss():
        total = 0.0
        for s in range(len(x)):
            z = []
            p = 0
            for c in range(len(mask)):
                acc = w[len(w) - b_n + c]
                for i in range(len(mask[c])):
                    if mask[c][i]:
                        acc += w[p] * x[s][i]
                        p += 1
                z.append(acc)
            m = max(z)
            e = 0.0
            for c in range(len(z)):
                e += math.exp(z[c] - m)
            total += m + math.log(e) - z[y[s]]
        return total / len(x)
    return loss
"""

# Runs the vectors on a device (CPython with the reference, or MicroPython); prints one JSON line.
DEVICE_CHECK = """
import json
from array import array
import zo
V = json.loads(open('/v.json').read())
out = {'hash': [], 'keys': [], 'words': [], 'signs': [], 'est': {}, 'est_copy': {}}
for e in V['prng']['hash32']:
    zo.h(e['x'] >> 16, e['x'] & 65535)
    out['hash'].append([zo._r[0], zo._r[1]])
for s in V['prng']['streams']:
    ks = []
    for k in range(4):
        zo.key(s['seed'] >> 16, s['seed'] & 65535, k)
        ks.append([zo._r[0], zo._r[1]])
    out['keys'].append(ks)
    kh, kl = ks[0]
    ws = []
    for j in range(4):
        zo.h(kh ^ (j >> 16), kl ^ (j & 65535))
        ws.append([zo._r[0], zo._r[1]])
    out['words'].append(ws)
    z = array('f', [0.0] * 32)
    zo.add(z, kh, kl, 1.0)
    z2 = array('f', [0.0] * 8)
    zo.add(z2, kh, kl, 1.0, 1000)
    out['signs'].append([int(v) for v in z] + [int(v) for v in z2])
M = V['model']
sd = M['round_seed']
for name, mode in (('forward', 0), ('central', 1), ('one_point', 2)):
    w = array('f', M['active'])
    g = array('f', [0.0] * M['K'])
    l = zo.probe(w, sd >> 16, sd & 65535, M['mu'], make_loss(w, M['W_mask'], 3, M['x'], M['y']), g, mode)
    out['est'][name] = [list(g), l, list(w)]
    w = array('f', M['active'])
    l = zo.probe(w, sd >> 16, sd & 65535, M['mu'], make_loss(w, M['W_mask'], 3, M['x'], M['y']), g, mode, 0, None,
                 array('f', w))
    out['est_copy'][name] = [list(g), l, list(w)]
w = array('f', M['active'])
zo.update(w, sd >> 16, sd & 65535, M['lr'], M['estimators']['forward']['scalars'])
out['updated'] = list(w)
# The same update on a dense buffer through an index map (masked slots must stay 0).
dense = array('f', [0.0] * 15)
idx = array('H', [0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14])
for i in range(12):
    dense[idx[i]] = M['active'][i]
zo.update(dense, sd >> 16, sd & 65535, M['lr'], M['estimators']['forward']['scalars'], 0, idx)
out['dense'] = list(dense)
print(json.dumps(out))
"""


def check_device_output(out: dict, vec: dict) -> None:
    """Integer parts exact, float32 updates bit-exact, scalars within SCALAR_TOL."""
    assert [h << 16 | lo for h, lo in out["hash"]] == [e["h"] for e in vec["prng"]["hash32"]]
    for got_k, got_w, got_s, s in zip(out["keys"], out["words"], out["signs"], vec["prng"]["streams"], strict=True):
        assert [h << 16 | lo for h, lo in got_k] == s["keys"]
        assert [h << 16 | lo for h, lo in got_w] == s["words"]
        assert got_s == s["signs32"] + s["signs_at_1000"]
    m = vec["model"]
    for name, (g, loss, w_after) in out["est"].items():
        want = m["estimators"][name]
        assert np.max(np.abs(np.array(g) - want["scalars"])) <= SCALAR_TOL, name
        assert loss == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)
        # in-place restore by subtraction: within a few float32 ulps of the start
        assert np.allclose(w_after, m["active"], rtol=4 * 2.0**-24, atol=1e-9)
    for name, (g, _loss, w_after) in out["est_copy"].items():
        # restore from a copy: weights bit-exact, and the perturbed weights equal the host's, so
        # the scalars differ only by the loss arithmetic (double here vs the host's float64)
        assert w_after == m["active"]
        assert np.allclose(g, m["estimators"][name]["scalars"], rtol=1e-6, atol=1e-6), name
    assert out["updated"] == m["updated_forward"]  # bit-exact float32 update
    dense = np.array(out["dense"])
    assert dense[[2, 7, 9]].tolist() == [0.0, 0.0, 0.0]
    assert np.delete(dense, [2, 7, 9]).tolist() == m["updated_forward"]


# --- vectors --------------------------------------------------------------------------------------


def test_stored_vectors_match_host(vec: dict) -> None:
    built = json.loads(zo_vectors.dumps(zo_vectors.build()))
    assert built["prng"] == vec["prng"]
    for key in ("active", "directions", "updated_forward", "W_mask", "round_seed", "K", "mu", "lr"):
        assert built["model"][key] == vec["model"][key], key
    for name, e in vec["model"]["estimators"].items():
        assert np.allclose(built["model"]["estimators"][name]["scalars"], e["scalars"], rtol=1e-6, atol=1e-6)


def test_vectors_in_cpython_reference(ref: ModuleType, vec: dict, capsys: pytest.CaptureFixture) -> None:
    # Same script as on the board, with open('/v.json') pointed at the vectors file.
    ns: dict = {"__name__": "device", "zo": ref}
    code = DEVICE_LOSS + DEVICE_CHECK.replace("import zo\n", "").replace("'/v.json'", repr(str(VECTORS_PATH)))
    exec(compile(code, "device_check", "exec"), ns)
    check_device_output(json.loads(capsys.readouterr().out), vec)


@pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")
def test_vectors_in_micropython_64k_heap(vec: dict) -> None:
    files = {"/zo.py": REF_PATH.read_bytes(), "/v.json": VECTORS_PATH.read_bytes()}
    text = wasm.run_micropython(DEVICE_LOSS + DEVICE_CHECK, heap_bytes=64 * 1024, files=files)
    check_device_output(json.loads(text.strip().splitlines()[-1]), vec)


@pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")
def test_micropython_prng_allocates_nothing() -> None:
    # A 32-bit PRNG boxes a heap int per call (MemoryError on the micro:bit); ours stays in small ints.
    code = """
import gc
from array import array
import zo
w = array('f', [0.0] * 256)
gc.collect()
gc.disable()
a = gc.mem_alloc()
for i in range(500):
    zo.h(65535 - i, i * 131)
    zo.key(65535, 65535, i)
b = gc.mem_alloc()
zo.add(w, 65535, 4660, 0.5)
c = gc.mem_alloc()
print(b - a, c - b)
"""
    text = wasm.run_micropython(code, heap_bytes=16 * 1024, files={"/zo.py": REF_PATH.read_bytes()})
    hashes, add = map(int, text.split())
    assert hashes <= 64  # the loop's range object, not 1000 hashes' worth of boxed ints
    # The WASM port boxes doubles (2 per weight: read + sum), so add() makes float garbage but no
    # per-word integer garbage; on the micro:bit floats are immediate (30-bit) and this is ~0.
    assert add <= 2 * 16 * 256 + 128


MICROBIT_IMPORT = (
    "import gc\ngc.collect()\na = gc.mem_free()\nimport zo\ngc.collect()\nprint(gc.mem_free(), a - gc.mem_free())"
)
MICROBIT_CHECK = """
from array import array
for s in SEEDS:
    zo.key(s[0], s[1], 0)
    kh = zo._r[0]
    kl = zo._r[1]
    z = array('f', [0.0] * 32)
    zo.add(z, kh, kl, 1.0)
    print(kh, kl, ' '.join([str(int(v)) for v in z]))
w = array('f', ACTIVE)
g = array('f', [0.0] * K)
l0 = zo.probe(w, SEED >> 16, SEED & 65535, MU, make_loss(w, MASK, 3, X, Y), g)
print(l0, ' '.join([repr(v) for v in g]))
w = array('f', ACTIVE)
zo.update(w, SEED >> 16, SEED & 65535, LR, GS)
print(' '.join([repr(v) for v in w]))
"""



@pytest.mark.skipif(not microbit.available(), reason="qemu-system-arm / micro:bit firmware not installed")
def test_vectors_on_microbit_qemu(vec: dict) -> None:
    # The real micro:bit v1 firmware (MicroPython 1.9.2, 30-bit floats, ~9.5 KB heap) under QEMU.
    m = vec["model"]
    streams = vec["prng"]["streams"][:3]
    consts = "".join(
        f"{name} = {value!r}\n"
        for name, value in {
            "SEEDS": [[s["seed"] >> 16, s["seed"] & 0xFFFF] for s in streams],
            "ACTIVE": m["active"],
            "K": m["K"],
            "SEED": m["round_seed"],
            "MU": m["mu"],
            "MASK": m["W_mask"],
            "X": m["x"],
            "Y": m["y"],
            "LR": m["lr"],
            "GS": m["estimators"]["forward"]["scalars"],
        }.items()
    )
    with microbit.microbit_session(timeout=60) as (_board, repl):
        repl.put_file("zo.py", REF_PATH.read_bytes())
        soft_reset(repl)  # import on a fresh heap, as an app does at boot: the copy left the heap fragmented
        lines = repl.exec(MICROBIT_IMPORT).strip().splitlines()
        lines += repl.exec(consts + DEVICE_LOSS + MICROBIT_CHECK, timeout=60).strip().splitlines()
    free, cost = map(int, lines[0].split())
    assert cost < 2500 and free > 6500  # the module fits the micro:bit's heap with room for a model
    for line, s in zip(lines[1:4], streams, strict=True):
        kh, kl, *z = map(int, line.split())
        assert (kh << 16 | kl, z) == (s["keys"][0], s["signs32"])  # integer parts bit-exact
    l0, *g = map(float, lines[4].split())
    assert l0 == pytest.approx(m["loss0"], rel=1e-5)
    # 30-bit floats (22-bit significand): eps 2**-22 in the scalar tolerance
    assert np.max(np.abs(np.array(g) - m["estimators"]["forward"]["scalars"])) <= SCALAR_TOL * 4
    w = np.array(list(map(float, lines[5].split())))
    assert np.allclose(w, m["updated_forward"], rtol=2.0**-18, atol=1e-6)


# --- integer discipline -----------------------------------------------------------------------------


class Small(int):
    """An int that records every result of arithmetic on it, to prove the device maths stays < 2**30."""

    seen: list[int] = []

    def _wrap(self, v: int) -> Small:
        Small.seen.append(int(v))
        return Small(v)


for _op in ("add", "sub", "mul", "and", "or", "xor", "lshift", "rshift"):
    for _name in (f"__{_op}__", f"__r{_op}__"):
        setattr(Small, _name, (lambda n: lambda self, o: self._wrap(getattr(int, n)(int(self), int(o))))(_name))


@settings(max_examples=300, deadline=None)
@given(hi=st.integers(0, 0xFFFF), lo=st.integers(0, 0xFFFF), i=st.integers(0, (1 << 30) - 1))
def test_device_intermediates_stay_below_2_pow_30(hi: int, lo: int, i: int) -> None:
    ref = load_ref()
    Small.seen = []
    ref.h(Small(hi), Small(lo))
    ref.key(Small(hi), Small(lo), Small(i))
    assert Small.seen and all(0 <= v < 1 << 30 for v in Small.seen)
    assert (ref._r[0] << 16 | ref._r[1]) == derive(hi << 16 | lo, i)


# --- host vectorised == reference -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(0, 2**16),
    off=st.integers(0, 5000),
    n=st.integers(1, 300),
)
def test_host_signs_equal_reference(seed: int, k: int, off: int, n: int) -> None:
    ref = load_ref()
    ref.key(seed >> 16, seed & 0xFFFF, k)
    key = ref._r[0] << 16 | ref._r[1]
    assert key == derive(seed, k)
    assert signs(key, n, off).tolist() == ref_signs(ref, key, n, off)
    assert [int(v) for v in words(key, off, 3)] == [ref_word(ref, key, off + j) for j in range(3)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), off=st.integers(0, 300), n=st.integers(1, 200), scale=st.floats(1e-6, 10.0))
def test_host_perturbation_bit_identical_to_reference(seed: int, off: int, n: int, scale: float) -> None:
    # CPython's double arithmetic stored into array('f') must equal numpy float32 (section 4 of the doc).
    ref = load_ref()
    w = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    key = derive(seed, 3)
    dev = array("f", w.tolist())
    ref.add(dev, key >> 16, key & 0xFFFF, scale, off)
    perturb_(w, key, scale, off)
    assert w.tobytes() == dev.tobytes()
    g = np.array([scale, -1.5, 0.25], np.float32)
    ref.update(dev, seed >> 16, seed & 0xFFFF, 0.3, g.tolist(), off)
    apply_update(w, seed, 0.3, g, offset=off)
    assert w.tobytes() == dev.tobytes()


def test_hash_vectorised_equals_scalar_and_limbs(ref: ModuleType) -> None:
    x = np.random.default_rng(7).integers(0, 2**32, size=5000, dtype=np.uint32)
    h = hash32_np(x)
    for xv, hv in zip(x[:1000].tolist(), h[:1000].tolist(), strict=True):
        ref.h(xv >> 16, xv & 0xFFFF)
        assert hash32(xv) == hv == (ref._r[0] << 16 | ref._r[1])
    assert h.tolist() == [hash32(v) for v in x.tolist()]


def test_signs_are_balanced_and_directions_uncorrelated() -> None:
    z = np.stack([signs(derive(99, k), 4096) for k in range(64)])
    assert abs(z.mean()) < 0.01
    c = (z @ z.T) / 4096
    assert np.allclose(np.diag(c), 1.0)
    assert np.abs(c[~np.eye(64, dtype=bool)]).max() < 0.08  # ~5 sigma for 4096 fair signs


# --- estimator maths ------------------------------------------------------------------------------


def quadratic(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    q = rng.normal(size=(d, d))
    a = q @ q.T / d + np.eye(d)
    return a, rng.normal(size=d), rng.normal(size=d).astype(np.float32)


def test_forward_estimator_unbiased_on_quadratic() -> None:
    # E[z z^T] = I and odd moments of Rademacher z vanish, so E[g_k z_k] = grad exactly.
    a, b, w = quadratic(16)

    def loss(v: np.ndarray) -> float:
        v = v.astype(np.float64)
        return 0.5 * v @ a @ v + b @ v

    grad = a @ w.astype(np.float64) + b
    errs = {}
    for k in (16, 256, 4096):
        r = estimate(loss, w, seed=11, k=k, mu=1e-3)
        z = np.stack([signs(derive(11, j), w.size) for j in range(k)])
        g_hat = (r.scalars.astype(np.float64) @ z) / k
        errs[k] = np.linalg.norm(g_hat - grad) / np.linalg.norm(grad)
    assert errs[16] > errs[256] > errs[4096]
    assert errs[4096] < 0.1  # ~sqrt(d/K) = 0.06
    assert errs[16] / errs[4096] > 4  # ~sqrt(256) = 16 in expectation


def test_central_is_exact_directional_derivative_on_quadratic() -> None:
    a, b, w = quadratic(8)

    def loss(v: np.ndarray) -> float:
        v = v.astype(np.float64)
        return 0.5 * v @ a @ v + b @ v

    r = estimate(loss, w, seed=5, k=8, mu=1e-2, estimator="central")
    grad = a @ w.astype(np.float64) + b
    for j in range(8):
        # the perturbation is f32(mu) * z, rounded to float32 weights: compare to those exact steps
        step = (w + np.float32(1e-2) * signs(derive(5, j), 8)).astype(np.float64) - w
        assert r.scalars[j] == pytest.approx(grad @ step / np.float32(1e-2), rel=1e-4, abs=1e-4)


def test_aggregate_is_n_weighted() -> None:
    r1 = ClientReply(np.array([1.0, -2.0], np.float32), 1.0, 10)
    r2 = ClientReply(np.array([4.0, 2.0], np.float32), 3.0, 30)
    agg = aggregate([r1, r2])
    assert agg.scalars.dtype == np.float32 and agg.scalars.tolist() == [3.25, 1.0]
    assert agg.loss == 2.5 and agg.n == 40
    with pytest.raises(ValueError):
        aggregate([r1, ClientReply(np.zeros(3, np.float32), 0.0, 1)])


def test_learning_rate_schedules() -> None:
    assert learning_rate(7, 0.1) == np.float32(0.1)
    assert learning_rate(0, 0.1, "cosine", total=10) == np.float32(0.1)
    assert learning_rate(5, 0.1, "cosine", total=10, final=0.02) == np.float32(0.06)
    assert learning_rate(10, 0.1, "cosine", total=10, final=0.02) == np.float32(0.02)
    assert learning_rate(12, 0.1, "cosine", total=10, final=0.02) == np.float32(0.02)
    assert learning_rate(3, 0.1, "exponential", gamma=0.5) == np.float32(0.0125)
    with pytest.raises(ValueError):
        learning_rate(0, 0.1, "step")


# --- rounds: every party reconstructs the same weights ----------------------------------------------


def make_model() -> tuple[torch.nn.Module, list[torch.Tensor | None]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    masks: list[torch.Tensor | None] = []
    for p in model.parameters():
        if p.dim() == 2:
            m = (torch.rand_like(p) < 0.4).float()  # ~60 % pruned
            with torch.no_grad():
                p.mul_(m)
            masks.append(m)
        else:
            masks.append(None)
    return model, masks


def client_data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8 + 4 * i, 6, generator=g), torch.randint(0, 3, (8 + 4 * i,), generator=g)


def test_round_protocol_torch_and_numpy_parties_stay_bit_identical() -> None:
    models = [make_model() for _ in range(2)]  # two clients, same initial model
    actives = [ActiveWeights(list(m.parameters()), masks) for m, masks in models]
    data = [client_data(i) for i in range(2)]
    server_w = actives[0].gather()  # the server keeps only the flat vector (numpy path)
    masked_before = [[p.detach().clone() for p in m.parameters()] for m, _ in models]
    k, mu, losses = 8, 1e-3, []
    for t in range(6):
        seed = derive(1234, t)  # round seeds from a master seed
        lr = learning_rate(t, 0.5, "cosine", total=6, final=0.1)
        replies = []
        for (model, _), active, (x, y) in zip(models, actives, data, strict=True):

            def loss_fn(model: torch.nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> float:
                with torch.no_grad():
                    return float(torch.nn.functional.cross_entropy(model(x), y))

            replies.append(estimate_torch(loss_fn, active, seed, k, mu, n=len(y)))
        agg = aggregate(replies)
        losses.append(agg.loss)
        for active in actives:
            apply_update_torch(active, seed, lr, agg.scalars)
        apply_update(server_w, seed, lr, agg.scalars)
        a, b = actives[0].gather(), actives[1].gather()
        assert a.tobytes() == b.tobytes() == server_w.tobytes()
    assert losses[-1] < losses[0]
    for (model, masks), before in zip(models, masked_before, strict=True):
        for p, m, p0 in zip(model.parameters(), masks, before, strict=True):
            if m is not None:
                assert torch.equal(p[m == 0], torch.zeros_like(p[m == 0]))  # masked weights exactly 0
                assert not torch.equal(p[m == 1], p0[m == 1])  # active weights did train


def test_perturbation_touches_only_active_weights_and_restores_exactly() -> None:
    model, masks = make_model()
    active = ActiveWeights(list(model.parameters()), masks)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = client_data(0)
    seen = []

    def loss_fn() -> float:
        for p, m, p0 in zip(model.parameters(), masks, before, strict=True):
            if m is not None:
                assert torch.equal(p[m == 0], torch.zeros_like(p[m == 0]))
            seen.append(float((p.detach() - p0).abs().max()))
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    for kind in ("forward", "central", "one_point"):
        estimate_torch(loss_fn, active, seed=3, k=4, mu=1e-2, estimator=kind)
        for p, p0 in zip(model.parameters(), before, strict=True):
            assert p.detach().numpy().tobytes() == p0.numpy().tobytes()  # restored bit-exactly
    assert max(seen) == pytest.approx(1e-2, rel=1e-3)  # the perturbation was really applied


def test_numpy_and_torch_canonical_order_agree() -> None:
    model, masks = make_model()
    active = ActiveWeights(list(model.parameters()), masks)
    flat = np.concatenate(
        [
            p.detach().numpy().reshape(-1)[(m.numpy().reshape(-1) != 0) if m is not None else slice(None)]
            for p, m in zip(model.parameters(), masks, strict=True)
        ]
    )
    assert active.size == flat.size and active.gather().tobytes() == flat.astype(np.float32).tobytes()
    # A layer-sliced update (offset = canonical position of the slice) equals the whole-vector update.
    g = np.array([0.5, -1.25, 2.0], np.float32)
    whole = flat.astype(np.float32)
    apply_update(whole, 77, 0.1, g)
    parts = np.split(flat.astype(np.float32), [5, 17])
    off = 0
    for part in parts:
        apply_update(part, 77, 0.1, g, offset=off)
        off += part.size
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert math.isfinite(float(whole.sum()))
