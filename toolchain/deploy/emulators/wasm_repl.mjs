// A MicroPython 1.29 (WebAssembly) board whose REPL is a byte stream on fd 0 (in) / fd 1 (out).
// Started by toolchain/deploy/emulators/wasm_repl.py with both fds on the master side of a pseudo-terminal, so the slave
// (/dev/pts/N) behaves like a board's serial port: MicroPython's own event-driven REPL (friendly REPL, raw REPL
// with Ctrl-A/Ctrl-D, Ctrl-C, Ctrl-B) answers there. A soft reset (Ctrl-D in the friendly REPL or on an empty
// raw-REPL line) starts a fresh interpreter and keeps the file system, as a board keeps its flash.
// argv[2]: heap size in bytes.
import fs from "node:fs";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript/micropython.mjs";

const heap = parseInt(process.argv[2] || "262144", 10);
const out = (bytes) => { try { fs.writeSync(1, bytes); } catch (e) { /* nobody listens */ } };

// Emscripten's errno numbers differ from a board's (ENOENT is 44, not 2); tools such as `mpremote fs cp`
// test `errno == 2`, so the file-system calls re-raise with the board numbers.
const SHIM = [
  "import os",
  "def _wrap(f):",
  "    def g(*a):",
  "        try:",
  "            return f(*a)",
  "        except OSError as e:",
  "            n = e.args[0] if e.args else 0",
  "            raise OSError({44: 2, 20: 17, 54: 20, 31: 21, 55: 39}.get(n, n))",
  "    return g",
  "for _n in ('stat', 'remove', 'mkdir', 'rmdir', 'listdir', 'ilistdir', 'rename', 'chdir', 'statvfs'):",
  "    if hasattr(os, _n):",
  "        setattr(os, _n, _wrap(getattr(os, _n)))",
  "import builtins",
  "builtins.open = _wrap(builtins.open)",
  "del _n, _wrap, builtins",
].join("\n");

function copyTree(src, dst, dir) {
  for (const name of src.FS.readdir(dir)) {
    if (name === "." || name === "..") continue;
    const p = dir === "/" ? "/" + name : dir + "/" + name;
    if (["/dev", "/proc", "/tmp", "/home"].includes(p)) continue;
    const st = src.FS.stat(p);
    if (src.FS.isDir(st.mode)) {
      try { dst.FS.mkdirTree(p); } catch (e) { /* exists */ }
      copyTree(src, dst, p);
    } else if (src.FS.isFile(st.mode)) {
      dst.FS.writeFile(p, src.FS.readFile(p));
    }
  }
}

let mp = null;
let rawMode = false;
async function boot(previous) {
  const fresh = await loadMicroPython({ heapsize: heap, stdout: out, stderr: out, linebuffer: false });
  if (previous) copyTree(previous, fresh, "/");
  fresh.runPython(SHIM);
  mp = fresh;
  mp.replInit();
}

await boot(null);
let queue = Promise.resolve();
const pending = [];
let busy = false;
let esc = [];
async function pump() {
  if (busy) return;
  busy = true;
  while (pending.length) {
    const c = pending.shift();
    // Raw-paste mode (Ctrl-E 'A' Ctrl-A) aborts at once in this build's event-driven REPL: answer "R\x00"
    // (understood, not supported), so clients (mpremote) fall back to the plain raw REPL.
    if (rawMode && (esc.length || c === 5)) {
      esc.push(c);
      const want = [5, 65, 1];
      if (esc.every((v, i) => v === want[i])) {
        if (esc.length === 3) { out(Buffer.from("R\x00", "latin1")); esc = []; }
        continue;
      }
      const held = esc; esc = [];
      pending.unshift(...held.slice(1));
      try { mp.replProcessChar(held[0]); } catch (e) { /* ignore */ }
      continue;
    }
    // remember whether we are in the raw REPL so that a soft reset returns to it, as firmware does
    if (c === 1) rawMode = true; else if (c === 2) rawMode = false;
    let r = 0;
    try { r = mp.replProcessChar(c); } catch (e) { out(Buffer.from(String(e) + "\r\n")); }
    if (r) {  // soft reset requested
      out(Buffer.from("MPY: soft reboot\r\n"));
      await boot(mp);
      if (rawMode) { mp.replProcessChar(1); }
    }
  }
  busy = false;
}
const buf = Buffer.alloc(4096);
function readLoop() {
  fs.read(0, buf, 0, buf.length, null, (err, n) => {
    if (err) {
      if (err.code === "EAGAIN" || err.code === "EIO") { setTimeout(readLoop, 10); return; }  // no client now
      process.exit(0);
    }
    if (n === 0) { setTimeout(readLoop, 20); return; }
    for (let i = 0; i < n; i++) pending.push(buf[i]);
    queue = queue.then(pump);
    readLoop();
  });
}
readLoop();
