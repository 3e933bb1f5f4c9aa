# microbit_engine loader, part 1 (run once by microbit_convert.convert, then dropped): magic, version, flags, size and CRC32
# of a sparse model file, ValueError naming the failed check (docs/sparse-model-format.md); returns the
# activation buffer sizes.


def u16(d, p):
    return d[p] | d[p + 1] << 8


def load(path):
    f = open(path, 'rb')
    h = f.read(24)
    if len(h) < 24 or h[:4] != b'SPMF':
        raise ValueError('not a sparse model file')
    if h[4] != 1:
        raise ValueError('sparse model version %d unsupported' % h[4])  # noqa: UP031 (1.9.2)
    if u16(h, 6):
        raise ValueError('sparse model has unknown flags')
    N = u16(h, 8) | u16(h, 10) << 16
    t = bytearray(4)  # the stored CRC: the last 4 bytes
    q = 0
    hi = lo = 0xFFFF  # CRC32 (reflected 0xEDB88320) in 16-bit halves: small ints only
    while h:
        for v in h:
            if q < N - 4:
                lo ^= v
                for _ in range(8):
                    c = lo & 1
                    lo = lo >> 1 | (hi & 1) << 15
                    hi >>= 1
                    if c:
                        hi ^= 0xEDB8
                        lo ^= 0x8320
            elif q < N:
                t[q - N + 4] = v
            q += 1
        h = f.read(64)
    f.close()
    if q != N:
        raise ValueError('sparse model truncated or padded: %d bytes, header says %d' % (q, N))  # noqa: UP031
    if lo ^ 0xFFFF != u16(t, 0) or hi ^ 0xFFFF != u16(t, 2):
        raise ValueError('sparse model corrupt: CRC32 mismatch')
    f = open(path, 'rb')  # the activation buffer sizes
    h = f.read(24)
    h = f.read(4 * u16(h, 16))
    f.close()
    return [u16(h, i) | u16(h, i + 2) << 16 for i in range(0, len(h), 4)]
