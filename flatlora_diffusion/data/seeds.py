"""Every random draw of data loading (crops, flips, batch order, class-image noise) comes from a
``torch.Generator`` seeded from ``(seed, ...)``, never from the global RNGs: two runs with one seed see the same
data, a resumed run sees what the interrupted one would have seen, and the loop's own noise/timestep draws are
not shifted by data loading."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
