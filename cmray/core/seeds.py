"""Seeds derived from a run's one seed, so every rank (or sample) and purpose draws its own
stream."""

from __future__ import annotations

import hashlib


def rank_seed(seed: int, rank: int, purpose: str) -> int:
    """A 63-bit seed for (seed, rank, purpose), so ranks draw independent noise; ``rank`` may
    be any index that must draw its own stream (a sample's place in the global batch)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
