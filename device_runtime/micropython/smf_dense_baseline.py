# Dense baseline (Model(..., dense=True)): decoded rows expanded to every weight, zeros included.
from array import array
from smf_reader import zeros


def load(ptr, cols, vals, rows, n):
    # dense baseline: every weight, zeros included, row-major
    full = zeros('b', rows * n)
    for r in range(rows):
        for j in range(ptr[r], ptr[r + 1]):
            full[r * n + cols[j]] = vals[j]
    return array('i', [r * n for r in range(rows + 1)]), None, full
