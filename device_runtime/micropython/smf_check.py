# Loader, part 1: checks magic, version, flags, length and CRC32 of a sparse model file (ValueError with
# a clear message). Imported by smf.load, dropped afterwards.
from smf_reader import _u16, _u32, src, rd


def _crc(d, hi, lo):
    # CRC32 (reflected polynomial 0xEDB88320) in 16-bit halves, so that all integers stay small
    for i in range(len(d)):
        lo ^= d[i]
        for _ in range(8):
            c = lo & 1
            lo = (lo >> 1) | ((hi & 1) << 15)
            hi >>= 1
            if c:
                hi ^= 0xEDB8
                lo ^= 0x8320
    return hi, lo


def load(s):
    r = src(s)
    h = rd(r, 24)
    if len(h) < 24 or bytes(h[0:4]) != b'SPMF':
        raise ValueError('not a sparse model file')
    if h[4] != 1:
        raise ValueError('sparse model version %d unsupported (engine reads 1)' % h[4])
    if _u16(h, 6):
        raise ValueError('sparse model has unknown flags')
    size = _u32(h, 8)
    try:
        from ubinascii import crc32
    except ImportError:
        crc32 = None
    hi = lo = 0xFFFF
    c = crc32(h) if crc32 else 0
    if not crc32:
        hi, lo = _crc(h, hi, lo)
    n = 24
    tail = b''
    while True:  # the last 4 bytes read are the stored CRC, the rest is checked
        b = rd(r, 64)
        if not b:
            break
        b = tail + b
        tail = b[-4:]
        b = b[:-4]
        n += len(b)
        if crc32:
            c = crc32(b, c)
        else:
            hi, lo = _crc(b, hi, lo)
    if r[0]:
        r[0].close()
    if n + len(tail) != size or len(tail) < 4:
        raise ValueError('sparse model truncated or padded: %d bytes, header says %d' % (n + len(tail), size))
    if crc32:
        hi = (c >> 16) & 0xFFFF
        lo = c & 0xFFFF
    else:
        hi ^= 0xFFFF
        lo ^= 0xFFFF
    if lo != _u16(tail, 0) or hi != _u16(tail, 2):
        raise ValueError('sparse model corrupt: CRC32 mismatch')
