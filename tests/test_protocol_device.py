"""The device codec (device_runtime/micropython/proto.py) on real MicroPython: 1.29 WebAssembly, and the
micro:bit's 1.9.2 on QEMU when it is installed. Host and device must agree byte for byte."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from toolchain.contracts.wire import messages as M
from toolchain.deploy.emulators.wasm import available, run_micropython
from toolchain.fleet import (
    Ack,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    Ping,
    ProtocolError,
    RoundLimits,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Signer,
    Status,
    check_round,
    check_update,
    decode,
    encode,
    encode_frame,
    model_transfer,
)

pytestmark = pytest.mark.timeout(120)  # a hung link or emulator fails the test instead of CI

DEV = Path(__file__).resolve().parents[1] / "device_runtime" / "micropython"
FILES = {f"/d/{n}": (DEV / n).read_bytes() for n in ("proto.py", "hmac_sha256.py")}
PRE = "import sys\nsys.path.append('/d')\nimport proto, struct, gc\n"
MAXK = 64
needs_wasm = pytest.mark.skipif(not available(), reason="MicroPython WebAssembly not installed (npm ci)")


def run(code: str, heap: int = 256 * 1024) -> list[str]:
    return run_micropython(PRE + code, heap_bytes=heap, files=FILES).splitlines()


def device_verdict(frames: list[bytes], maxk: int = MAXK) -> list[str]:
    """Feed frames to the device; one line per frame: kind, message type and fields."""
    stream = b"".join(frames)
    out = run(
        f"p = proto.Proto(600, 0, {maxk})\n"
        f"d = {stream!r}\n"
        "i = 0\n"
        "while i < len(d):\n"
        "    i = p.feed(d, i)\n"
        "    if p.kind == 1:\n"
        "        t, v = p.msg()\n"
        "        print(1, t, repr(v))\n"
        "        p.last = -1\n"  # no dedupe here: the same seq is reused
        "    elif p.kind:\n"
        "        print(p.kind)\n"
    )
    return out


def host_verdict(raw: bytes, maxk: int = MAXK) -> int:
    """What the device must say about message bytes: its type, -1 (malformed/not downlink) or -4 (range)."""
    try:
        msg = decode(raw)
    except ProtocolError:
        return -1
    if msg.TYPE not in (M.T_MODEL_BEGIN, M.T_MODEL_CHUNK, M.T_MODEL_COMMIT, M.T_ROUND_START, M.T_ROUND_UPDATE, M.T_PING):
        return -1
    if isinstance(msg, RoundStart) and check_round(msg, RoundLimits(maxk, max_steps=65535, max_batch=65535)):
        return -4
    if isinstance(msg, RoundUpdate) and check_update(msg, RoundLimits(maxk)):
        return -4
    return msg.TYPE


DOWNLINK = [
    ModelBegin(5, 1000, 128, M.FMT_SMF, M.AUTH_HMAC_SHA256),
    ModelChunk(5, 3, bytes(range(256)) * 2),
    ModelCommit(5, bytes(range(32)), M.AUTH_HMAC_SHA256, bytes(range(100, 132))),
    ModelCommit(6, bytes(32), M.AUTH_NONE),
    RoundStart(3, 4, 1e-3, 0.01, 2, 8, round_seed=0xDEADBEEF),
    RoundStart(9, 3, 0.5, 0.25, 1, 1, seeds=(1, 0xFFFFFFFF, 0x12345678)),
    Ping(),
    RoundUpdate(7, 0xDEADBEEF, 0.5, (1.5, -2.25, 0.0)),
]


@needs_wasm
def test_host_frames_decode_on_device_through_garbage() -> None:
    frames = []
    for i, m in enumerate(DOWNLINK):
        frames += [b"\x13\x37\x00\xff\x00", encode_frame(Frame(1000 + i, encode(m)))]
    out = device_verdict(frames)
    data = [line for line in out if line.startswith("1 ")]
    assert [line for line in out if not line.startswith("1 ")] == ["-1"] * (2 * len(DOWNLINK))  # the garbage
    assert data[0] == "1 2 (5, 1000, 128, 1, 1)"
    assert data[1] == "1 3 (5, 3)"
    assert data[2] == "1 4 (5, " + repr(bytes(range(32))).replace("'", "'") + ", 1)"
    assert data[4].startswith("1 16 (3, 4, 0, 2, 8, 0.0010000000474974") and data[4].endswith(", 0.009999999776482582)")
    assert data[6] == "1 33 ()"
    assert data[7] == "1 18 (7, 3, 0.5)"
    # seeds as 16-bit halves, and chunk data location
    seeds = run(
        f"p = proto.Proto(600)\nd = {encode_frame(Frame(1, encode(DOWNLINK[5])))!r}\np.feed(d)\n"
        "print(p.msg()[0], [struct.unpack_from('<HH', p.rx, 24 + 4 * i) for i in range(3)])\n"
        f"p.feed({encode_frame(Frame(2, encode(DOWNLINK[1])))!r})\n"
        "print(p.msg()[0], bytes(p.rx[11:3 + p.mlen]) == bytes(range(256)) * 2)\n"
    )
    assert seeds == ["16 [(1, 0), (65535, 65535), (22136, 4660)]", "3 True"]
    # ROUND_UPDATE: seed halves at rx[9:13], the k scalars from rx[17]
    upd = run(
        f"p = proto.Proto(600)\np.feed({encode_frame(Frame(3, encode(DOWNLINK[7])))!r})\nt, v = p.msg()\n"
        "print(t, struct.unpack_from('<HH', p.rx, 9), struct.unpack_from('<' + str(v[1]) + 'f', p.rx, 17))\n"
    )
    assert upd == ["18 (48879, 57005) (1.5, -2.25, 0.0)"]


@needs_wasm
def test_device_frames_equal_host_frames_byte_for_byte() -> None:
    ks = (1, 4, 16, 64)
    code = (
        "p = proto.Proto(600, 65534)\n"
        "def show(n): print(bytes(p.tx[:n]).hex())\n"
        "i = p.put(3, '<BBHBBBIHH', 1, 1, 777, 0, 1, 0, 9500, 600, 3)\n"
        "for s in (b'mb-1', b'microbit', b'micropython 1.9.2'):\n"
        "    i = p.put(i, '<B' + str(len(s)) + 's', len(s), s)\n"
        "show(p.frame(i))\n"
        f"for k in {ks!r}:\n"
        "    i = p.put(3, '<BBIIf', 1, 17, 9, 32, 2.5)\n"
        "    for j in range(k):\n"
        "        i = p.put(i, '<f', j * 0.5 - 3.0)\n"
        "    show(p.frame(i))\n"
        "show(p.frame(p.put(3, '<BBBIIII', 1, 32, 3, 120, 9000, 9, 5)))\n"
        "show(p.frame(p.put(3, '<BBBI', 1, 48, 4, 5)))\n"
        "i = p.put(3, '<BBBBI', 1, 63, 4, 16, 9)\n"
        "show(p.frame(p.put(i, '<12s', b'k above maxk')))\n"
        "p.fseq = 4660\n"
        "n = p.ack()\n"
        "print(bytes(p.at[:n]).hex())\n"
    )
    out = run(code)
    msgs = [Hello("mb-1", "microbit", "micropython 1.9.2", (0, 1, 0), 9500, 600, 3, 777)]
    msgs += [RoundResult(9, tuple(j * 0.5 - 3.0 for j in range(k)), 2.5, 32) for k in ks]
    msgs += [Status(3, 120, 9000, 9, 5), Ack(4, 5), Error(4, 16, 9, "k above maxk")]
    want = [encode_frame(Frame((65534 + i) % 65536, encode(m))).hex() for i, m in enumerate(msgs)]
    want.append(encode_frame(Frame(4660, ack=True)).hex())
    assert out == want
    # and the host's streaming decoder reads the device's frames back as the same messages
    frames = FrameDecoder().feed(bytes.fromhex("".join(out)))
    assert [decode(f.message) for f in frames[:-1]] == msgs and frames[-1] == Frame(4660, ack=True)


def _mutants(seed: int, n: int) -> list[bytes]:
    """Message bytes near the valid ones: field-level and byte-level mutations of downlink messages."""
    rng = random.Random(seed)
    base = [encode(m) for m in DOWNLINK] + [
        encode(RoundStart(1, MAXK + 1, 1e-3, 0.1, round_seed=1)),
        encode(RoundStart(1, 2, float("nan"), 0.1, round_seed=1)),
        encode(RoundStart(1, 2, 1e-3, 11.0, round_seed=1)),
        encode(RoundStart(1, 2, 1e-3, 0.1, 0, 1, round_seed=1)),
        encode(RoundUpdate(2, 9, 0.5, (1.0,) * (MAXK + 1))), encode(RoundUpdate(2, 9, float("nan"), (1.0, 2.0))),
        encode(RoundUpdate(2, 9, 10.5, (1.0,))), encode(RoundUpdate(2, 9, 0.5, (1.0, float("-inf"), 3.0))),
        encode(RoundUpdate(2, 9, 0.5, (float("nan"),))), encode(RoundUpdate(2, 9, 0.0, (-3.4e38, 0.0))),
        encode(Hello("x", "y", "z", (0, 0, 0), 1, 1)), encode(Status(1)), encode(Ack(1, 1)),
    ]
    out = list(base)
    while len(out) < n:
        b = bytearray(rng.choice(base))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(5)
            if op == 0 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1 and len(b) > 1:
                del b[rng.randrange(len(b)) :]
            elif op == 2:
                b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            elif op == 3 and len(b) > 2:
                b[rng.randrange(2, len(b))] ^= 0x40  # high bits of ids / counts
            elif op == 4 and len(b) > 8:
                b[rng.randrange(2, len(b))] = rng.choice([0, 1, 2, 3, 4, 0x3F, 0x40, 0x80, 0xFF])
        if b:
            out.append(bytes(b))
    return out


@needs_wasm
def test_device_accepts_and_rejects_exactly_what_the_host_does() -> None:
    raws = _mutants(5, 600)
    out = device_verdict([encode_frame(Frame(1, r)) for r in raws])
    got = [int(line.split()[1]) for line in out]
    want = [host_verdict(r) for r in raws]
    assert len(got) == len(raws)
    mismatch = [(r.hex(), g, w) for r, g, w in zip(raws, got, want, strict=True) if g != w]
    assert not mismatch, mismatch[:5]
    assert {-1, -4, 2, 3, 4, 16, 18, 33} <= set(want)  # the sample covers every verdict
    upd = [(r, w) for r, w in zip(raws, want, strict=True) if len(r) > 1 and r[1] == M.T_ROUND_UPDATE]
    assert {w for _, w in upd} == {-1, -4, 18} and len(upd) > 60  # ROUND_UPDATE: malformed, out of range, good


@needs_wasm
def test_malformed_frames_are_rejected_and_leak_nothing() -> None:
    rng = random.Random(6)
    good = encode_frame(Frame(7, encode(DOWNLINK[4])))
    bad = []
    while len(bad) < 300:
        f = bytearray(good)
        f[rng.randrange(len(f) - 1)] ^= 1 << rng.randrange(8)
        f = bytearray(bytes(f[:-1]).replace(b"\x00", b"\x01") + b"\x00")  # a flip to 0x00 would split the frame
        if f != good:
            bad.append(bytes(f))
    bad += [b"\x01\x00", b"\x05\x01\x00", bytes(range(1, 200)) * 5 + b"\x00", b"\xff" * 800 + b"\x00"]
    stream = b"".join(bad)
    # This WebAssembly build never frees during a run (gc.collect() reclaims nothing), so mem_alloc()
    # counts every byte allocated: rejecting frames must allocate nothing at all. The micro:bit test
    # below checks the same with a working collector, good frames included.
    out = run(
        "p = proto.Proto(160)\n"
        f"d = {stream!r}\n"
        f"g = {good!r}\n"
        "k = 0\n"
        "j = 0\n"
        "i = 0\n"
        "gc.collect()\n"
        "a = gc.mem_alloc()\n"
        "while j < 20:\n"
        "    i = 0\n"
        "    while i < len(d):\n"
        "        i = p.feed(d, i)\n"
        "        k += p.kind == 1\n"
        "    j += 1\n"
        "gc.collect()\n"
        "b = gc.mem_alloc()\n"
        "p.feed(g)\n"
        "print(k, p.bad, p.kind, p.msg()[0], a, b)\n"
    )
    accepted, bad_count, kind, mtype, before, after = map(int, out[-1].split())
    assert accepted == 0 and bad_count == 20 * len(bad)
    assert (kind, mtype) == (1, M.T_ROUND_START)  # the decoder is still in sync afterwards
    assert after == before, f"rejecting {20 * len(bad)} frames allocated {after - before} bytes"


def _device_install_script(frames: list[bytes], key: bytes, pure: bool) -> str:
    # A minimal device receive loop: ack frames, hash chunks as they arrive, verify the HMAC at commit.
    return (
        "import hmac_sha256 as H\n"
        f"sha = H.PureSha256 if {pure} else H.sha256\n"
        "p = proto.Proto(160)\n"
        f"key = {key!r}\n"
        "h = None\n"
        "ok = None\n"
        f"for d in {frames!r}:\n"
        "    p.feed(d)\n"
        "    if p.kind != 1:\n"
        "        continue\n"
        "    t, v = p.msg()\n"
        "    if t == 2:\n"
        "        b = v\n"
        "        h = sha()\n"
        "        got = 0\n"
        "    elif t == 3:\n"
        "        h.update(bytes(p.rx[11:3 + p.mlen]))\n"
        "        got += p.mlen - 8\n"
        "    elif t == 4:\n"
        "        dg = h.digest()\n"
        "        ok = got == b[1] and v[1] == dg and v[2] == 1 and H.model_ok(key, b[0], b[3], b[1], dg, p.rx, 42, sha)\n"
        "print(ok)\n"
    )


@needs_wasm
@pytest.mark.parametrize("pure", [False, True], ids=["hashlib", "pure-sha256"])
def test_device_installs_signed_model_and_rejects_tampered_or_unsigned(pure: bool) -> None:
    key = b"k" * 32
    model = bytes(random.Random(7).randrange(256) for _ in range(700))
    msgs = model_transfer(model, 11, Signer(hmac_key=key), chunk_size=120)
    frames = [encode_frame(Frame(i, encode(m))) for i, m in enumerate(msgs)]
    evil = list(msgs)
    c = evil[3]
    evil[3] = ModelChunk(c.model_id, c.index, b"\x00" + c.data[1:])
    unsigned = model_transfer(model, 11, Signer(), chunk_size=120)
    wrong_key = model_transfer(model, 11, Signer(hmac_key=b"x" * 32), chunk_size=120)
    outs = []
    for seq in (msgs, evil, unsigned, wrong_key):
        fr = [encode_frame(Frame(i, encode(m))) for i, m in enumerate(seq)]
        outs.append(run(_device_install_script(fr, key, pure))[-1])
    assert frames and outs == ["True", "False", "False", "False"]


QEMU = shutil.which("qemu-system-arm")
MICROBIT_HEX = Path("/usr/share/firmware-microbit-micropython/firmware.hex")


@pytest.mark.skipif(QEMU is None or not MICROBIT_HEX.exists(), reason="qemu-system-arm / micro:bit firmware missing")
def test_codec_fits_and_matches_on_microbit_micropython_1_9_2(tmp_path: Path) -> None:
    import microfs
    import serial

    proc = subprocess.Popen(
        [QEMU, "-M", "microbit", "-device", f"loader,file={MICROBIT_HEX}", "-nographic", "-serial", "pty",
         "-monitor", "none"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = b""
        while b"/dev/pts" not in line:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "qemu exited"
        port = serial.Serial(re.search(rb"/dev/pts/\d+", line).group().decode(), 115200, timeout=0.5)  # type: ignore[union-attr]
        time.sleep(1.0)
        port.write(b"\x03\x03")
        time.sleep(0.5)
        port.read(4000)
        microfs.put(str(DEV / "proto.py"), "proto.py", serial=port)
        hello = encode_frame(Frame(7, encode(Hello("mb-1", "microbit", "mpy", (0, 1, 0), 9000, 160, 0, 5))))
        rs = encode_frame(Frame(3, encode(RoundStart(4, 8, 1e-3, 0.01, 1, 8, round_seed=0xDEADBEEF))))
        ru = encode_frame(Frame(4, encode(RoundUpdate(4, 0xDEADBEEF, 0.01, (0.5, -1.25, 3.0, 0.0)))))
        junk = b"\x05\x01\x00" + rs[:4] + bytes([rs[4] ^ 1]) + rs[5:] + bytes(range(1, 250)) + b"\x00"
        script = tmp_path / "t.py"
        script.write_text(
            "import gc\nimport proto\np=proto.Proto(160,7,8)\n"
            "i=p.put(3,'<BBHBBBIHH',1,1,5,0,1,0,9000,160,0)\n"
            "for s in (b'mb-1',b'microbit',b'mpy'):\n i=p.put(i,'<B'+str(len(s))+'s',len(s),s)\n"
            f"n=p.frame(i)\nprint(bytes(p.tx[:n])=={hello!r})\ng={rs!r}\nu={ru!r}\nd={junk!r}\np.feed(g)\n"
            "print(p.kind,p.msg()[0])\np.feed(u)\nprint(p.kind,p.msg()[0])\n"
            "def spin(n):\n for _ in range(n):\n  i=0\n  while i<len(d):\n   i=p.feed(d,i)\n  p.last=-1\n  p.feed(g)\n  p.msg()\n"
            "  p.feed(u)\n  p.msg()\n"
            "spin(2)\ngc.collect()\nc=gc.mem_free()\nspin(30)\ngc.collect()\nprint(c,gc.mem_free(),p.bad)\n"
        )
        microfs.put(str(script), "t.py", serial=port)
        # import proto first, as a device's main.py would: compiling it needs the most contiguous heap
        code = b"import gc\ngc.collect()\nprint(gc.mem_free())\nimport proto\ngc.collect()\nprint(gc.mem_free())\nimport t\n"
        port.write(b"\x01")
        time.sleep(0.3)
        port.read(4000)
        for i in range(0, len(code), 64):  # the emulated UART drops bytes if fed too fast
            port.write(code[i : i + 64])
            time.sleep(0.03)
        port.write(b"\x04")
        out, deadline = b"", time.monotonic() + 30
        while out.count(b"\x04") < 2 and time.monotonic() < deadline:
            out += port.read(4000)
        text = out.decode(errors="replace")
        assert "Error" not in text, text
        lines = text.split("OK", 1)[1].split("\x04")[0].split()
        assert lines[2:7] == ["True", "1", "16", "1", "18"], text
        free_before, free_after_import = map(int, lines[:2])
        free_warm, free_end, bad = map(int, lines[7:10])
        print(f"micro:bit heap: {free_before} free, {free_after_import} after import, {free_warm} running the test")
        host = FrameDecoder(max_message=160)
        assert not host.feed(junk) and bad == 32 * host.frames_bad  # every junk frame rejected, as on the host
        # A leak of even one 16-byte block per round would show as >= 480 bytes; allow a couple of blocks
        # that the conservative collector may still see referenced from the stack.
        assert free_end >= free_warm - 48, "decoding good (ROUND_START, ROUND_UPDATE) and malformed frames leaked heap"
        assert free_after_import > 6000  # room left for the model and the ZO step
    finally:
        proc.kill()
        proc.wait()
