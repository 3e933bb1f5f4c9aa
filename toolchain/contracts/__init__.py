"""Layer 0, contracts and formats: errors, output staging, the manifest, the `.smf` format, the ZO contract and the host<->device wire protocol. Imports nothing else from the toolchain."""
