// One-shot MicroPython (WebAssembly port) runner used by toolchain/deploy/emulators/wasm.py.
// Reads a JSON job on stdin: {"heap_bytes": N, "files": {"/path": "<base64>"}, "code": "..."}.
// Python stdout goes to our stdout; a Python exception goes to stderr and exits 1.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript/micropython.mjs";

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const job = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const mp = await loadMicroPython({
  heapsize: job.heap_bytes,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
  linebuffer: true,
});
for (const [path, b64] of Object.entries(job.files || {})) {
  const dir = path.substring(0, path.lastIndexOf("/"));
  if (dir) { try { mp.FS.mkdirTree(dir); } catch (e) { /* exists */ } }
  mp.FS.writeFile(path, Buffer.from(b64, "base64"));
}
try {
  mp.runPython(job.code);
} catch (e) {
  process.stderr.write(String(e && e.message ? e.message : e) + "\n");
  process.exitCode = 1;
}
