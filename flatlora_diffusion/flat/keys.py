"""The seed of one layer's noise at one micro-step: the same number in every process, run and resume.

Both paths draw from it: the reference path seeds a torch.Generator with it, the fused path keys its
Philox generator with it (and computes the same numbers on the device: fused_torch.device_noise_keys).
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, step: int, micro_step: int, layer_id: int, rank: int) -> int:
    """A 63-bit generator seed that changes with every argument (well mixed, so neighbours are unrelated)."""
    key = 0
    for part in (seed, step, micro_step, layer_id, rank):
        key = splitmix64(key ^ (int(part) & _MASK64))
    return key & ((1 << 63) - 1)


def stable_id(text: str) -> int:
    """A 64-bit id of a layer name that is the same in every process and Python run (hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
