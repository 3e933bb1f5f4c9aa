# MQTT link of the device app (docs/fleet.md) on ports with networking, with umqtt.simple (micropython-lib:
# `mpremote mip install umqtt.simple`). MicroPython 1.9.2 .. 1.29. Topics (docs/protocol.md section 4):
#   <prefix>/<fleet>/<device>/down   subscribed, QoS 1: each payload -> App.msg()
#   <prefix>/<fleet>/<device>/up     every message of the app, QoS 1 (STATUS also retained on .../status)
#   <prefix>/<fleet>/<device>/status last will: STATUS(OFFLINE), retained, QoS 1
# Persistent session (clean_session False, client id dev-<fleet>-<device>): down messages sent while the
# device is away arrive when it is back. Any link error (broker restart, lost network) closes the socket and
# the link connects again after 0.5, 1, 2, 4, 4 ... s; on every connect it publishes its STATUS.
#   l = Link(device, server, port, fleet)      # bring the network up first (network.WLAN on ESP32/Pico W)
#   l.app = app_boot.start(l.out, ..., raw=1)  # or app.App(l.out, ..., raw=1)
#   l.run()                                    # or l.poll() every few ms from your own loop
# The app's messages are queued (at most `qmax`, oldest dropped) and published from poll(), never from
# inside umqtt's callback: umqtt.simple's publish(qos=1) reads the socket until its PUBACK, and a publish
# nested in a callback there would swallow the outer PUBACK.
from umqtt.simple import MQTTClient

try:
    import utime as time
except ImportError:
    import time

OFF = b'\x01\x20' + bytes(17)  # STATUS(state 0 OFFLINE), the last will


class Link:
    def __init__(s, dev, server, port=1883, fleet='default', prefix='tinyml', user=None, password=None,
                 keepalive=60, qmax=16):
        b = prefix + '/' + fleet + '/' + dev + '/'
        s.topic_up = (b + 'up').encode()
        s.topic_down = (b + 'down').encode()
        s.topic_status = (b + 'status').encode()
        c = MQTTClient(('dev-' + fleet + '-' + dev).encode(), server, port, user, password, keepalive)
        c.set_callback(s.cb)
        c.set_last_will(s.topic_status, OFF, True, 1)
        s.client = c
        s.ping_ms = keepalive * 500  # ms: ping at half the keep-alive
        s.qmax = qmax
        s.app = None
        s.inbox = []  # received payloads, for app.msg
        s.outbox = []  # app messages to publish
        s.connected = 0
        s.connects = 0  # connections made
        s.backoff_ms = 0
        s.lost_at = s.sent_at = time.ticks_ms()

    def out(s, m):
        # the app's output (App(..., raw=1)): one whole message per call
        if len(s.outbox) >= s.qmax:
            s.outbox.pop(0)
        s.outbox.append(m)

    def cb(s, t, m):
        s.inbox.append(m)

    def connect(s):
        s.client.connect(False)
        s.client.subscribe(s.topic_down, 1)
        s.connected = 1
        s.backoff_ms = 0
        s.connects += 1
        s.sent_at = time.ticks_ms()
        print('mqtt connected', s.connects)
        if s.app:
            s.app.status()  # retained on .../status: online again

    def drop(s, e):
        print('mqtt link lost:', repr(e))
        s.connected = 0
        try:
            s.client.sock.close()
        except Exception:
            pass
        s.backoff_ms = min(4000, s.backoff_ms * 2) if s.backoff_ms else 500
        s.lost_at = time.ticks_ms()

    def poll(s):
        # one step: connect if due, take in what arrived, run the app, publish its output; never raises
        c = s.client
        try:
            if not s.connected:
                if time.ticks_diff(time.ticks_ms(), s.lost_at) < s.backoff_ms:
                    return
                s.connect()
            for i in range(8):
                k = len(s.inbox)
                c.check_msg()
                if len(s.inbox) == k:
                    break
            a = s.app
            while s.inbox:
                m = s.inbox.pop(0)
                if a:
                    a.msg(m)
                m = None
            if a:
                a.tick()
            while s.outbox:
                m = s.outbox[0]
                c.publish(s.topic_up, m, False, 1)
                if m[1] == 32:
                    c.publish(s.topic_status, m, True, 1)
                s.outbox.pop(0)  # only once the broker has it: after a failure it goes again (QoS 1)
                s.sent_at = time.ticks_ms()
            if time.ticks_diff(time.ticks_ms(), s.sent_at) > s.ping_ms:
                c.ping()
                s.sent_at = time.ticks_ms()
        except Exception as e:  # OSError, or a short read ending in IndexError/AssertionError inside umqtt
            s.drop(e)

    def stop(s):
        # going offline on purpose: a clean disconnect suppresses the will, so say OFFLINE first
        if s.connected:
            try:
                s.client.publish(s.topic_status, OFF, True, 1)
                s.client.disconnect()
            except Exception:
                pass
        s.connected = 0

    def run(s, idle=10):
        while 1:
            s.poll()
            time.sleep_ms(idle)


def start(board, fw, root='', heap=None, session=0, hb=30000):
    # app_boot.start on MQTT, from the provisioned files: local.json (the device id) and mqtt.json
    #   {"server": "192.168.1.2", "port": 1883, "fleet": "lab", "prefix": "tinyml", "user": .., "password": ..}
    import json
    import app_boot
    c = json.loads(open(root + 'mqtt.json').read())
    d = json.loads(open(root + 'local.json').read())['device']
    l = Link(d, c['server'], c.get('port', 1883), c.get('fleet', 'default'), c.get('prefix', 'tinyml'),
             c.get('user'), c.get('password'), c.get('keepalive', 60))
    c = None
    l.app = app_boot.start(l.out, board, fw, root, heap, session, 0, 1, hb)
    return l
