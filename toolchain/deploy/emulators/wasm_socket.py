# MicroPython source, not imported by CPython: the emulated WebAssembly board's `socket` / `usocket` module
# (WasmBoard(net=True) installs it as /lib/socket.py and /lib/usocket.py). It is the board's network driver:
# the subset of MicroPython's usocket API that clients such as umqtt.simple use, on the JS module `_net`
# (toolchain/deploy/emulators/wasm_net.mjs: real TCP sockets in Node.js, synchronous calls). Semantics follow MicroPython
# on lwIP ports: read(n)/readinto() read until n bytes or EOF; with setblocking(False) they return None when
# nothing is there yet (or what has arrived), with settimeout(t) they raise OSError(ETIMEDOUT); recv() returns
# what is there (b'' at EOF); errors are OSError(errno).
import _net

try:
    import ubinascii as binascii
except ImportError:
    import binascii

AF_INET = 2
SOCK_STREAM = 1
IPPROTO_TCP = 6
SOL_SOCKET = 1
SO_REUSEADDR = 4
TCP_NODELAY = 1
EAGAIN = 11
ETIMEDOUT = 110


def getaddrinfo(host, port, af=0, kind=0, proto=0, flags=0):
    if isinstance(host, bytes):
        host = host.decode()
    ip = _net.lookup(host)
    if isinstance(ip, int):
        raise OSError(-ip)
    return [(AF_INET, SOCK_STREAM, IPPROTO_TCP, '', (ip, port))]


class socket:
    def __init__(self, af=AF_INET, kind=SOCK_STREAM, proto=0):
        if kind != SOCK_STREAM:
            raise OSError(95)  # EOPNOTSUPP: TCP only
        self._id = 0
        self._t = -1  # ms; -1 blocking, 0 non-blocking

    def connect(self, addr):
        r = _net.connect(addr[0], addr[1], self._t if self._t > 0 else -1)
        if r < 0:
            raise OSError(-r)
        self._id = r

    def settimeout(self, t):
        self._t = -1 if t is None else int(t * 1000)

    def setblocking(self, flag):
        self._t = -1 if flag else 0

    def setsockopt(self, level, opt, value):
        pass  # TCP_NODELAY is always on

    def _chunk(self, n):
        # up to n bytes as they come: bytes (b'' at EOF), or None when none came in time
        r = _net.recv(self._id, n, self._t)
        if isinstance(r, str):
            return binascii.unhexlify(r)
        if r == -EAGAIN or r == -ETIMEDOUT:
            return None
        raise OSError(-r)

    def recv(self, n):
        d = self._chunk(n)
        if d is None:
            raise OSError(EAGAIN if self._t == 0 else ETIMEDOUT)
        return d

    def read(self, n=-1):
        if n < 0:
            b = bytearray()
            while 1:
                d = self._chunk(4096)
                if not d:
                    return bytes(b)
                b.extend(d)
        b = bytearray(n)
        k = self.readinto(b)
        if k is None:
            return None
        return bytes(b) if k == n else bytes(b[:k])

    def readinto(self, buf, n=-1):
        if n < 0 or n > len(buf):
            n = len(buf)
        mv = memoryview(buf)
        k = 0
        while k < n:
            d = self._chunk(n - k)
            if d is None:
                if self._t == 0:
                    return k if k else None
                raise OSError(ETIMEDOUT)
            if not d:
                break
            mv[k:k + len(d)] = d
            k += len(d)
        return k

    def write(self, buf, n=-1):
        if 0 <= n < len(buf):
            buf = memoryview(buf)[:n]
        r = _net.send(self._id, buf)
        if r < 0:
            raise OSError(-r)
        return r

    send = write
    sendall = write

    def close(self):
        if self._id:
            _net.close(self._id)
            self._id = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
