// The emulated board's TCP stack (toolchain/deploy/emulators/wasm_net.mjs): a worker thread owning real Node.js sockets.
// The MicroPython thread posts one request at a time {seq, op, ...} and blocks in Atomics.wait until this
// worker stores the answer: ctl[1] = result (>= 0, or -errno), data = bytes, then ctl[0] = seq (+ notify).
// Reads with a timeout wait here (in the worker), so every request gets exactly one answer.
import { parentPort, workerData } from "node:worker_threads";
import net from "node:net";
import dns from "node:dns";
import os from "node:os";

const ctl = new Int32Array(workerData.ctl);
const data = new Uint8Array(workerData.data);
const ERR = os.constants.errno;
const EBADF = 9, EAGAIN = 11, EPIPE = 32, ETIMEDOUT = 110;
const HIGH = 1 << 20; // pause a socket whose unread bytes exceed this (TCP flow control does the rest)
const socks = new Map();
let nextId = 1;

function answer(seq, result, bytes) {
  if (bytes && bytes.length) data.set(bytes);
  Atomics.store(ctl, 1, result);
  Atomics.store(ctl, 0, seq);
  Atomics.notify(ctl, 0);
}

const errno = (e) => (e && e.code && ERR[e.code]) || (e && -e.errno) || 5; // EIO when unknown

function take(s, n) {
  const k = Math.min(n, s.buf.length, data.length);
  const chunk = s.buf.subarray(0, k);
  s.buf = s.buf.subarray(k);
  if (s.paused && s.buf.length < HIGH) { s.paused = false; s.sock.resume(); }
  return chunk;
}

// serve a pending read if it can be served now
function serve(s) {
  const w = s.wait;
  if (!w || !(s.buf.length || s.err || s.eof)) return;
  s.wait = null;
  if (w.timer) clearTimeout(w.timer);
  if (s.buf.length) { const c = take(s, w.n); answer(w.seq, c.length, c); }
  else if (s.err) answer(w.seq, -s.err);
  else answer(w.seq, 0);
}

const ops = {
  lookup(m) {
    dns.lookup(m.host, { family: 4 }, (e, addr) => {
      if (e) return answer(m.seq, -(errno(e)));
      const b = Buffer.from(addr, "utf8");
      answer(m.seq, b.length, b);
    });
  },
  connect(m) {
    const sock = net.connect({ host: m.host, port: m.port });
    const id = nextId++;
    const s = { sock, buf: Buffer.alloc(0), eof: false, err: 0, wait: null, paused: false };
    let pending = true;
    const timer = setTimeout(() => {
      if (pending) { pending = false; sock.destroy(); answer(m.seq, -ETIMEDOUT); }
    }, m.t > 0 ? m.t : 10000);
    sock.setNoDelay(true);
    sock.on("connect", () => {
      if (!pending) return;
      pending = false;
      clearTimeout(timer);
      socks.set(id, s);
      answer(m.seq, id);
    });
    sock.on("data", (d) => {
      s.buf = s.buf.length ? Buffer.concat([s.buf, d]) : d;
      if (s.buf.length >= HIGH) { s.paused = true; sock.pause(); }
      serve(s);
    });
    sock.on("end", () => { s.eof = true; serve(s); });
    sock.on("close", () => { s.eof = true; serve(s); });
    sock.on("error", (e) => {
      if (pending) { pending = false; clearTimeout(timer); answer(m.seq, -errno(e)); return; }
      s.err = errno(e);
      serve(s);
    });
  },
  send(m) {
    const s = socks.get(m.id);
    if (!s) return answer(m.seq, -EBADF);
    if (s.err) return answer(m.seq, -s.err);
    if (s.eof || s.sock.destroyed) return answer(m.seq, -EPIPE);
    s.sock.write(m.bytes);
    answer(m.seq, m.bytes.length);
  },
  recv(m) {
    const s = socks.get(m.id);
    if (!s) return answer(m.seq, -EBADF);
    if (s.buf.length) { const c = take(s, m.n); return answer(m.seq, c.length, c); }
    if (s.err) return answer(m.seq, -s.err);
    if (s.eof) return answer(m.seq, 0);
    if (m.t === 0) return answer(m.seq, -EAGAIN);
    s.wait = { seq: m.seq, n: m.n, timer: null };
    if (m.t > 0) {
      s.wait.timer = setTimeout(() => { s.wait = null; answer(m.seq, -ETIMEDOUT); }, m.t);
    }
  },
  close(m) {
    const s = socks.get(m.id);
    if (s) { socks.delete(m.id); s.sock.destroy(); }
    answer(m.seq, 0);
  },
};

parentPort.on("message", (m) => {
  try { ops[m.op](m); } catch (e) { answer(m.seq, -errno(e)); }
});
