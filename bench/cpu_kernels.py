"""Pin torch's CPU kernels to AVX2, so that a benchmark's numbers reproduce on any AVX2-or-better host.

Import before torch (``import cpu_kernels``). ATen and oneDNN choose kernels by the CPU's instruction set, and the
AVX-512 ones round differently; training amplifies that. Measured 2026-12-04: on an AVX-512 host
``bench/fl_pruning.py --reproduce`` moved by up to 1.0 point against the JSON committed from an earlier session,
and with both capped at AVX2 it matched every row to 0.00. Either cap alone left two rows off. A variable already
set by the caller wins.
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
