# Model transfer for app.py on ports with hashlib (docs/protocol.md section 5, docs/fleet.md):
# MODEL_BEGIN / CHUNK / COMMIT -> a file, sha256 while receiving, HMAC-SHA256 tag over the bundle header
# with the provisioned key; the previous model stays until a commit verifies. Not for the micro:bit
# (no hashlib; the pure-Python SHA-256 does not fit its heap): flash its model instead.
import os

try:
    import uhashlib as hashlib
except ImportError:
    import hashlib
import hmac_sha256


def boot_ok(key, mid, path):
    # a provisioned model before it is loaded: False if model.tag is there and is not the HMAC of the model's
    # bundle header (flipped bits, a swapped file); True without model.tag (flashed by a tool that writes none)
    try:
        t = open(path[:-3] + 'tag', 'rb').read()
    except OSError:
        return True
    h = hashlib.sha256()
    n = 0
    f = open(path, 'rb')
    while 1:
        d = f.read(256)
        if not d:
            break
        h.update(d)
        n += len(d)
    f.close()
    return len(t) == 32 and hmac_sha256.model_ok(key, mid, 1, n, h.digest(), t, 0, hashlib.sha256)


class MT:
    def __init__(s, key, install, path='model.smf', maxsize=1 << 20):
        # install(path) -> the new FineTuner (or raises); key: the device's HMAC key (bytes)
        s.key = key
        s.install = install
        s.path = path
        s.max = maxsize
        s.file = None
        s.transfer = None

    def _drop(s):
        if s.file:
            s.file.close()
        s.file = None
        s.transfer = None

    def handle(s, a, t, v):
        # -> new FineTuner after a verified commit, else None (errors are sent here)
        p = a.codec
        if t == 2:
            mid, size, cs, fmt, auth = v
            if s.transfer and s.transfer[0] == mid and s.transfer[1] == size:
                return None  # a repeated MODEL_BEGIN (QoS 1): keep the transfer going
            s._drop()
            if fmt != 1:
                return a.err(3, 2, mid)
            if size > s.max:
                return a.err(5, 2, mid)
            s.file = open(s.path + '.tmp', 'wb')
            s.transfer = [mid, size, cs, fmt, 0, 0]  # ..., next chunk, bytes received
            s.sha = hashlib.sha256()
            return None
        b = s.transfer
        mid = v[0]
        if b is None or b[0] != mid:
            return a.err(6, t, mid)
        if t == 3:
            n = p.mlen - 8
            if v[1] < b[4]:
                return None  # repeat
            if v[1] != b[4] or n > b[2] or b[5] + n > b[1]:
                s._drop()
                return a.err(6, 3, mid)
            d = bytes(p.rx[11:3 + p.mlen])
            s.file.write(d)
            s.sha.update(d)
            b[4] += 1
            b[5] += n
            return None
        if b[5] != b[1]:
            s._drop()
            return a.err(6, 4, mid)
        dg = s.sha.digest()
        s.file.close()
        s.file = None
        s.transfer = None
        if dg != v[1]:
            return a.err(7, 4, mid)
        if v[2] != 1 or not hmac_sha256.model_ok(s.key, mid, b[3], b[1], dg, p.rx, 42, hashlib.sha256):
            return a.err(8, 4, mid)
        try:
            os.remove(s.path)
        except OSError:
            pass
        os.rename(s.path + '.tmp', s.path)
        f = open(s.path[:-3] + 'tag', 'wb')  # checked again at boot (boot_ok)
        f.write(bytes(p.rx[42:74]))
        f.close()
        try:
            return s.install(s.path)
        except MemoryError:
            return a.err(5, 4, mid)
        except Exception:  # not a model this fine-tuner can run
            return a.err(11, 4, mid)
