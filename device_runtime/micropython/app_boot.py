# Start app.py on a port with json + hashlib (WebAssembly, ESP32, RP2040), from provisioned files:
#   config.json (bundle spec), head.bin, local.json {"device": id, "n": samples, "size": bytes per sample,
#   "labels": [...], "key": HMAC key hex, "model_id": id of a provisioned model.smf or 0}, data.bin
#   (n x size int8 inputs), optionally model.smf (+ model.tag: HMAC-SHA256 of its bundle header with the key,
#   checked before it is loaded). The model can also arrive over the protocol (app_mt, which writes model.tag).
import gc
import json

import proto  # noqa: F401 - early, before the engine fragments the heap

try:
    import ubinascii as binascii
except ImportError:
    import binascii
import app
import app_mt
import ft


def start(out, board, fw, root='', heap=None, session=0, seq=0, raw=0, hb=30000):
    spec = json.loads(open(root + 'config.json').read())
    spec['head']['file'] = root + 'head.bin'
    loc = json.loads(open(root + 'local.json').read())
    f = open(root + 'data.bin', 'rb')
    xs = [f.read(loc['size']) for i in range(loc['n'])]
    f.close()
    ys = loc['labels']

    def data(rid, n):
        # the round's mini-batch: n samples from (rid - 1) * n, wrapping (all of them if n >= N)
        m = len(xs)
        if n >= m:
            return xs, ys
        b = ((rid - 1) * n) % m
        ix = [(b + i) % m for i in range(n)]
        return [xs[i] for i in ix], [ys[i] for i in ix]

    def install(path):
        from smf import Model
        gc.collect()
        return ft.FineTuner(Model(path), spec)

    tuner = None
    key = binascii.unhexlify(loc['key'])
    mid = loc.get('model_id', 0)
    if mid and app_mt.boot_ok(key, mid, root + 'model.smf'):
        tuner = install(root + 'model.smf')
    elif mid:
        print('model.smf does not match model.tag: not loaded (the host sends it again)')
        mid = 0
    caps = 0x01 | 0x02 | 0x08 | 0x40  # native sha256, verifies HMAC, runs .smf, takes rounds only signed (key)
    mt = app_mt.MT(key, install, root + 'model.smf')
    ids = (loc['device'].encode(), board.encode(), fw.encode())
    gc.collect()
    return app.App(out, tuner, data, ids, caps, loc.get('max_message', 600), spec.get('k_max', 64), seq, session,
                   heap, hb, 500, mid, mt, raw)
