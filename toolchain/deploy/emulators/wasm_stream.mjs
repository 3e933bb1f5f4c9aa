// A MicroPython (WebAssembly) board whose UART is this process's stdin/stdout (toolchain/deploy/emulators/wasm_stream.py).
// argv[2]: a JSON job file {"heap_bytes": N, "files": {"/path": "<base64>"}, "boot": "<python>", "tick_ms": 10,
// "net": false}; with "net" the board also has a TCP network (JS module `_net`, see wasm_net.mjs).
// The boot code defines _feed(hex_str) and _tick(); it writes link bytes by printing "@<hex>" lines, which
// become raw bytes on stdout; any other printed line goes to stderr (the board's log).
import { readFileSync } from "fs";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript/micropython.mjs";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const line = (s) => {
  if (s.startsWith("@")) process.stdout.write(Buffer.from(s.slice(1), "hex"));
  else process.stderr.write(s + "\n");
};
const mp = await loadMicroPython({ heapsize: job.heap_bytes, stdout: line, stderr: (s) => process.stderr.write(s + "\n"), linebuffer: true });
for (const [path, b64] of Object.entries(job.files || {})) {
  const dir = path.substring(0, path.lastIndexOf("/"));
  if (dir) { try { mp.FS.mkdirTree(dir); } catch (e) { /* exists */ } }
  mp.FS.writeFile(path, Buffer.from(b64, "base64"));
}
if (job.net) {  // a network interface: real TCP from Node.js (wasm_net.mjs), the board's socket module on top
  const { netModule } = await import("./wasm_net.mjs");
  mp.registerJsModule("_net", await netModule(mp));
}
const run = (code) => {
  try { mp.runPython(code); } catch (e) {
    process.stderr.write("device exception: " + String(e && e.message ? e.message : e) + "\n");
  }
};
try { mp.runPython(job.boot); } catch (e) {
  process.stderr.write("boot failed: " + String(e && e.message ? e.message : e) + "\n");
  process.exit(1);
}
// Input arrives in chunks; run them in order, between ticks (MicroPython is single threaded here).
process.stdin.on("data", (buf) => run("_feed('" + buf.toString("hex") + "')"));
process.stdin.on("end", () => process.exit(0));
setInterval(() => run("_tick()"), job.tick_ms || 10);
