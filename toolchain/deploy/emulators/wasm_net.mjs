// The emulated WebAssembly board's network interface: synchronous TCP for MicroPython, registered as the JS
// module `_net` (mp.registerJsModule), used by the board's `socket`/`usocket` (toolchain/deploy/emulators/wasm_socket.py).
// MicroPython runs on this (main) thread and must not return to the event loop inside a call, so the sockets
// live in a worker thread (wasm_net_worker.mjs) and each call blocks in Atomics.wait for the worker's answer.
// Functions (ints in, ints or strings out; errors are negative errno values, as the board's lwIP would give):
//   lookup(host) -> "a.b.c.d" | -errno
//   connect(host, port, timeout_ms) -> socket id > 0 | -errno     (timeout_ms < 0: the 10 s default)
//   send(id, bytes) -> n | -errno
//   recv(id, n, timeout_ms) -> hex string of 1..n bytes, "" at EOF | -errno (-11 EAGAIN: none yet, -110 timeout)
//                              (timeout_ms: < 0 blocks until data, 0 does not wait)
//   close(id) -> 0
import { Worker } from "node:worker_threads";
import { once } from "node:events";

export async function netModule(mp) {
  const ctl = new Int32Array(new SharedArrayBuffer(8));
  const data = new Uint8Array(new SharedArrayBuffer(1 << 16));
  const worker = new Worker(new URL("./wasm_net_worker.mjs", import.meta.url),
    { workerData: { ctl: ctl.buffer, data: data.buffer } });
  worker.on("error", (e) => process.stderr.write("network worker failed: " + String(e) + "\n"));
  await once(worker, "online");
  worker.unref();
  let seq = 0;
  const call = (msg) => {
    seq = (seq % 0x3fffffff) + 1;
    msg.seq = seq;
    worker.postMessage(msg);
    for (;;) {
      const done = Atomics.load(ctl, 0);
      if (done === seq) return Atomics.load(ctl, 1);
      Atomics.wait(ctl, 0, done, 1000);
    }
  };
  const bytes = (b) => (typeof b === "string" ? Buffer.from(b, "utf8") : mp.PyProxy.toJs(b));
  return {
    lookup(host) {
      const r = call({ op: "lookup", host: String(host) });
      return r < 0 ? r : Buffer.from(data.subarray(0, r)).toString("utf8");
    },
    connect(host, port, t) { return call({ op: "connect", host: String(host), port: port | 0, t: t | 0 }); },
    send(id, b) { return call({ op: "send", id, bytes: bytes(b) }); },
    recv(id, n, t) {
      const r = call({ op: "recv", id, n: Math.max(1, n | 0), t: t | 0 });
      return r < 0 ? r : Buffer.from(data.subarray(0, r)).toString("hex");
    },
    close(id) { return call({ op: "close", id }); },
  };
}
