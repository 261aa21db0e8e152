"""The counter-based hash every projector shares: a 32-bit key per (seed, parameter name, purpose) and
MurmurHash3's finaliser over coordinate indices, so a coordinate's bucket and sign depend on nothing but
(seed, name, index) -- no table is stored, and any block of a parameter can be hashed on its own, on any device.
From it too, the factored projector's +-1 matrices (rademacher_signs, hadamard_signs)."""

import hashlib

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1


def name_key(seed, name, salt):
    """A 32-bit key for one parameter, independent of every other parameter."""
    digest = hashlib.blake2b(f"{seed}|{name}|{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def mix32(x):
    """MurmurHash3's 32-bit finaliser on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def hashed(index, key):
    """Independent-looking 32-bit values for coordinates `index` under `key`."""
    return mix32((index * GOLDEN + key) & MASK32)


def random_signs(index, key):
    """+1 / -1 (float32) for coordinates `index` under `key`."""
    return (hashed(index, key) & 1).to(torch.float32) * 2 - 1


# ------------------------------------------------------------------ sign matrices (the factored projector's P)
def rademacher_signs(rows, cols, key, device):
    """[rows, cols] float32 +1 / -1 from the counter hash of (key, i * cols + j): the same on every device."""
    index = torch.arange(rows * cols, dtype=torch.int64, device=device)
    return random_signs(index, key).view(rows, cols)


def hadamard_signs(rows, cols, key, device):
    """[rows, cols] float32 +1 / -1: `rows` distinct rows of the Sylvester-Hadamard matrix of order n (the power of
    two >= cols; H[i, j] = (-1)^popcount(i & j)), its first `cols` columns, times a random sign per column. Rows:
    the first in the counter hash's order of 0..n-1 (stable sort: ties by index); column signs: the hash of the
    column under a key derived from `key`; the same on every device. H's columns are orthogonal (H^T H = n I), so
    E[S^T S] = rows I as for independent signs, but the rows are sampled without replacement: a JL estimate's
    variance shrinks by (n - rows) / (n - 1), to ~0 as rows -> cols (a 63 x 64 Rademacher matrix errs like any
    r = 63 projection, std 0.15 on a unit inner product; these rows 0.018)."""
    n = 1 << max(cols - 1, 0).bit_length()
    order = torch.argsort(hashed(torch.arange(n, dtype=torch.int64, device=device), key), stable=True)[:rows]
    column = torch.arange(cols, dtype=torch.int64, device=device)
    x = order.unsqueeze(1) & column  # parity of popcount(i & j), folded 32 -> 1 bits
    for shift in (16, 8, 4, 2, 1):
        x = x ^ (x >> shift)
    return (1 - 2 * (x & 1)).to(torch.float32) * random_signs(column, mix32(key ^ GOLDEN))
