"""Seeds derived from a run's one seed, so every rank and purpose draws its own stream."""

from __future__ import annotations

import hashlib


def rank_seed(seed: int, rank: int, purpose: str) -> int:
    """A 63-bit seed for (seed, rank, purpose), so ranks draw independent noise."""
    digest = hashlib.sha256(f"{seed}/{rank}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
