# Device app (docs/fleet.md): protocol messages (docs/protocol.md) <-> FineTuner (ft.py).
# MicroPython 1.9.2 .. 1.29 and CPython. Event driven, so one file serves every port:
#   a = App(out, ...); then feed(bytes) for serial bytes (framed) or msg(bytes) for one
#   MQTT payload, and tick() every few ms (retransmit, heartbeat). Import proto first.
import struct

import proto

try:
    import utime as time
except ImportError:
    import time

T_UPD = 18  # ROUND_UPDATE (protocol 1.1): round u32, seed u32, lr f32, g[k] f32
# ERROR text by code (docs/protocol.md section 2): every error on the wire says what it is, for people
# reading the topics or a log; the host acts on the code only.
ETXT = (b'', b'bad message', b'version', b'unsupported', b'out of range', b'no memory', b'sequence',
        b'sha256 mismatch', b'bad signature', b'no model', b'busy', b'internal')


class App:
    def __init__(s, out, ft, data, ids, caps=0, size=160, maxk=8, seq=0, session=0, heap=None,
                 hb=30000, rto=500, mid=0, mt=None, raw=0):
        # out(bytes): write to the link; ft: FineTuner (None: no model yet); data(rid, n) -> (xs, ys);
        # ids = (device id, board, firmware) as bytes; mt: model receiver (app_mt.MT) or None
        s.codec = proto.Proto(size, seq, maxk)
        s.out = out
        s.ft = ft
        s.data = data
        s.ids = ids
        s.caps = caps
        s.session = session
        s.heap = heap
        s.heartbeat_ms = hb
        s.retry_ms = rto
        s.mid = mid
        s.mt = mt
        s.raw = raw
        s.applied = 0  # last round whose update was applied (the model version)
        s.state = 1
        s.queue = []
        s.inflight = 0  # a DATA frame in flight: its seq is s.inflight_seq, length s.inflight_len
        s.inflight_seq = s.inflight_len = s.inflight_type = s.tries = 0
        s.boot_ms = s.sent_ms = s.status_ms = time.ticks_ms()
        s.hello()

    def feed(s, d):
        # serial bytes from the host
        p = s.codec
        i = 0
        while i < len(d):
            i = p.feed(d, i)
            k = p.kind
            if k == 1 or k == 2:
                s.out(p.at[:p.ack()])
            if k == 1:
                s.handle()
            elif k == 3 and s.inflight and p.fseq == s.inflight_seq:
                s.inflight = 0
                s.next()

    def msg(s, m):
        # one whole message (an MQTT payload)
        p = s.codec
        if 1 < len(m) <= p.size:
            p.rx[3:3 + len(m)] = m
            p.mlen = len(m)
            s.handle()

    def tick(s):
        n = time.ticks_ms()
        if s.inflight and time.ticks_diff(n, s.sent_ms) > s.retry_ms:
            s.tries += 1
            if s.tries > 30 and s.inflight_type != 1:  # give up (on HELLO never: a host may come later)
                s.inflight = 0
                s.next()
            else:
                s.out(b'\x00')
                s.out(s.codec.tx[:s.inflight_len])
                s.sent_ms = n
        if time.ticks_diff(n, s.status_ms) > s.heartbeat_ms and not s.inflight and not s.queue:
            s.status()

    # -- sending: one DATA frame in flight, the rest queued as message bytes
    def send(s, i):
        p = s.codec
        if s.raw:
            s.out(bytes(p.b[3:i]))
            return
        if s.inflight:
            s.queue.append(bytes(p.b[3:i]))
            return
        s.inflight_type = p.b[4]
        s.inflight_len = p.frame(i)
        s.inflight_seq = (p.seq - 1) & 65535
        s.inflight = 1
        s.tries = 0
        s.sent_ms = time.ticks_ms()
        s.out(p.tx[:s.inflight_len])

    def next(s):
        if s.queue:
            m = s.queue.pop(0)
            s.codec.b[3:3 + len(m)] = m
            s.send(3 + len(m))

    def hello(s):
        p = s.codec
        i = p.put(3, '<BBHBBBIHH', 1, 1, s.session, 0, 2, 0, s.free(), p.size, s.caps)
        for x in s.ids:
            i = p.put(i, '<B' + str(len(x)) + 's', len(x), x)
        s.send(i)

    def free(s):
        return s.heap() if s.heap else 0

    def status(s):
        s.status_ms = time.ticks_ms()
        up = time.ticks_diff(s.status_ms, s.boot_ms) // 1000
        s.send(s.codec.put(3, '<BBBIIII', 1, 32, s.state, up, s.free(), s.applied, s.mid))

    def ack(s, t, r):
        s.send(s.codec.put(3, '<BBBI', 1, 48, t, r))

    def err(s, c, t, r):
        x = ETXT[c] if c < len(ETXT) else b'error'
        s.send(s.codec.put(s.codec.put(3, '<BBBBI', 1, 63, c, t, r), str(len(x)) + 's', x))

    # -- receiving
    def handle(s):
        p = s.codec
        r = p.rx
        a = 0
        if r[3] == 1 and r[4] == 19:  # SIGNED: a ROUND_START / ROUND_UPDATE with the host's tag
            a = s.unseal()
            if a < 0:
                return s.err(8, 19, 0)
        if not a and s.mt and r[3] == 1 and r[4] in (16, T_UPD):
            return s.err(8, r[4], 0)  # a device with a key takes rounds only signed (a forged update: refused)
        t, v = p.msg()
        if t == 33:  # PING: HELLO (a new host learns who we are) + STATUS
            s.hello()
            s.status()
        elif t == 16:
            s.round(v)
        elif t == T_UPD:
            s.upd(v)
        elif t == -4:  # out of range (ROUND_START, ROUND_UPDATE)
            s.err(4, r[4], v[0])
        elif 1 < t < 5:
            if s.mt is None:
                s.err(3, t, v[0])  # this port cannot verify a model (micro:bit): flash it instead
            else:
                s.state = 2
                a = s.mt.handle(s, t, v)
                s.state = 1
                if a:
                    s.ft = a
                    s.mid = v[0]
                    s.applied = 0
                    s.ack(4, v[0])
        else:
            s.err(1, r[4] if r[3] == 1 else 0, 0)

    def unseal(s):
        # SIGNED (0x13) = tag[16] | inner message; tag = HMAC-SHA256(key, 'TMS1' | session u16 | len(id) u8 | id |
        # inner)[:16] with the device's own key (docs/protocol.md). Verified: the inner message replaces it in
        # p.rx (1); else -1. Holds only the inner message's copy and the HMAC's buffers.
        import hmac_sha256
        p = s.codec
        r = p.rx
        n = p.mlen - 18
        if n < 2 or r[22] == 19:
            return -1
        m = bytes(r[21:21 + n])
        d = s.ids[0]
        t = hmac_sha256.hmac(s.mt.key, b'TMS1' + struct.pack('<HB', s.session & 65535, len(d)) + d + m)
        x = 0
        for i in range(16):
            x |= t[i] ^ r[5 + i]  # no early exit
        if x:
            return -1
        r[3:3 + n] = m
        p.mlen = n
        return 1

    def round(s, v):
        rid = v[0]
        if s.ft is None:
            return s.err(9, 16, rid)
        if v[2] or v[3] != 1:
            return s.err(3, 16, rid)  # explicit seeds, several steps: not supported
        if rid != s.applied + 1:
            return s.err(6, 16, rid)  # not at the model version of round rid - 1: host replays updates
        s.state = 3
        seed = struct.unpack_from('<I', s.codec.rx, 24)[0]
        xs, ys = s.data(rid, v[4])
        g, loss, n = s.ft.probe(seed, v[1], v[5], xs, ys)
        xs = ys = None
        s.state = 1
        p = s.codec
        i = p.put(3, '<BBIIf', 1, 17, rid, n, loss)
        for j in range(v[1]):
            i = p.put(i, '<f', g[j])
        s.send(i)

    def upd(s, v):
        # v = (round, k, lr), checked by proto (malformed, k, lr, finite scalars)
        rid = v[0]
        if rid <= s.applied:
            return s.ack(T_UPD, rid)  # applied already (a repeat)
        if s.ft is None or rid != s.applied + 1:
            return s.err(6, T_UPD, rid)
        r = s.codec.rx
        s.ft.update(struct.unpack_from('<I', r, 9)[0], struct.unpack_from('<' + str(v[1]) + 'f', r, 17), v[2])
        s.applied = rid
        s.ack(T_UPD, rid)


def run(a, read):
    # serial main loop: read(n) -> at most n bytes, or None / b'' if none wait (non-blocking: uart.read, or
    # stdin_reader() where the link is the REPL's UART). Ctrl-C from mpremote or a terminal stops it: 0x03 is
    # a data byte of the protocol, so the C-level Ctrl-C is off while it runs (kbd_intr(-1)), and '\r' 0x03
    # between frames is taken as the interrupt instead (a host's frame starts with its COBS code byte, 1..8,
    # never '\r'). Between frames it reads one byte at a time, so it stops right after the 0x03 and leaves
    # what follows (mpremote's Ctrl-A) to the REPL: `mpremote connect PORT exec ...` works on a running app.
    try:
        import micropython
        micropython.kbd_intr(-1)
    except (ImportError, AttributeError):
        micropython = None
    p = a.codec
    t = time.ticks_ms()
    try:
        while 1:
            if p.rn or p.skip:  # inside a frame
                d = read(256)
                if not d and time.ticks_diff(time.ticks_ms(), t) > 200:
                    p.rn = p.skip = 0  # a frame nobody finishes (the host went away): between frames again
            else:
                d = read(1)
                if d == b'\r':
                    e = None
                    for _i in range(50):
                        e = read(1)
                        if e:
                            break
                        time.sleep_ms(1)
                    if e == b'\x03':
                        raise KeyboardInterrupt
                    d = d + (e or b'')
            if d:
                t = time.ticks_ms()
                a.feed(d)
            a.tick()
    finally:
        if micropython:
            micropython.kbd_intr(3)


def stdin_reader():
    # read(n) for run() on ports whose protocol UART is the REPL's stdin (select.poll on sys.stdin)
    import select
    import sys
    q = select.poll()
    q.register(sys.stdin, select.POLLIN)
    b = sys.stdin.buffer

    def read(n):
        r = b''
        while len(r) < n and q.poll(0):
            r += b.read(1)
        return r
    return read
