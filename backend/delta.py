"""Parity-delta math: update parity from a data change without the rest of the stripe.

Reed-Solomon parity is linear: parity_j = sum_i c[j][i] * data_i over the
code's field. So when data chunk i changes from ``old`` to ``new``::

    delta        = old XOR new
    new_parity_j = old_parity_j XOR c[j][i] * delta

Two ways to compute ``c[j][i] * delta`` are implemented; the codec picks one
per plugin at start-up (see docs/benchmarks.md for the measurements):

``encode``  ask the plugin itself to encode a stripe whose only non-zero
            chunk is the delta. Valid for every linear code (RS is linear over
            GF(2) whatever its word size), and ISA-L does it at GB/s. All M
            parity deltas come out of one call, and several changed data
            chunks of one stripe go in together.
``table``   GF(2^8) multiplication by table lookup in numpy, with the
            plugin's own coefficients probed by encoding unit vectors. Only
            valid when the plugin really is byte-wise GF(2^8) with the
            0x11d polynomial (ISA-L is; liberasurecode's rs_vand is not), which
            ``probe_coefficients`` verifies on random data before use.
"""
from __future__ import annotations

import numpy as np

GF_POLY = 0x11D


def _gf_tables() -> np.ndarray:
    exp = np.zeros(512, dtype=np.int32)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= GF_POLY
    exp[255:510] = exp[:255]
    mul = np.zeros((256, 256), dtype=np.uint8)
    a = np.arange(1, 256)
    for c in range(1, 256):
        mul[c, 1:] = exp[(log[c] + log[a]) % 255]
    return mul


GF_MUL = _gf_tables()  # GF_MUL[c] is the 256-entry row "multiply by c"


def as_u8(buf) -> np.ndarray:
    """A zero-copy uint8 view of any buffer."""
    if isinstance(buf, np.ndarray):
        return buf.view(np.uint8).reshape(-1)
    return np.frombuffer(buf, dtype=np.uint8)


def make_delta(old, new) -> np.ndarray:
    """old XOR new, the change to feed into parity."""
    return np.bitwise_xor(as_u8(old), as_u8(new))


def gf_mul(coef: int, buf) -> np.ndarray:
    """coef * buf in GF(2^8), byte-wise."""
    return GF_MUL[coef].take(as_u8(buf))


def xor_into(target: np.ndarray, other) -> np.ndarray:
    np.bitwise_xor(target, as_u8(other), out=target)
    return target
