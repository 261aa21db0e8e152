"""The counter-based hash every projector shares: a 32-bit key per (seed, parameter name, purpose) and
MurmurHash3's finaliser over coordinate indices, so a coordinate's bucket and sign depend on nothing but
(seed, name, index) -- no table is stored, and any block of a parameter can be hashed on its own, on any device."""

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
