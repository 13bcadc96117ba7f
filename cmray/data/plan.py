"""Which sample goes where: an epoch's global batches, independent of the number of ranks.

An epoch is read as ``V`` streams (``data.streams``), each a seeded sequence of shards, read in
order through its own shuffle buffer. Global batch ``b`` takes, from every stream ``v``, that
stream's samples ``a_v(b) .. a_v(b + 1) - 1``, laid out stream after stream: its positions
``0 .. size(b) - 1``. Each rank then takes one contiguous range of positions. The sequence of
training examples is a function of (seed, epoch, V, batch size) alone, so a run that loses or
gains workers sees the same examples (MosaicML Streaming's "canonical nodes" idea); a rank
reads only the streams that feed its positions, so with V a multiple of the world size no
stream is read twice.

Every batch holds exactly B samples. Resampled streams are endless and share every batch
equally (to one sample). Non-resampled streams are interleaved in proportion to their lengths
(stream v's k-th sample stands at (k + 1/2) / n_v of the epoch), and the last batch takes what
is left over, so an epoch covers every sample exactly once whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Take:
    """What one rank takes from one stream in one batch: stream samples ``first ..
    first + count - 1`` in all, of which it keeps ``keep_from .. keep_to - 1`` (stream
    indices), at batch positions starting at ``position``."""

    stream: int
    first: int
    count: int
    keep_from: int
    keep_to: int
    position: int


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch. ``lengths`` are the streams' sample counts (None:
    resampled, endless); ``batch`` is the global batch B; ``batches`` the batches per epoch."""

    streams: int
    batch: int
    batches: int
    lengths: tuple[int, ...] | None = None

    @classmethod
    def resampled(cls, streams: int, batch: int, samples_per_epoch: int) -> EpochPlan:
        return cls(streams, batch, samples_per_epoch // batch)

    @classmethod
    def exact(cls, lengths: list[int], batch: int) -> EpochPlan:
        """Non-resampled: every sample once; ``max(1, total // B)`` batches, the last larger."""
        return cls(len(lengths), batch, max(1, sum(lengths) // batch), tuple(lengths))

    @cached_property
    def _taken(self) -> np.ndarray:
        """a_v(b) for every batch boundary b (rows) and stream v (columns), exact epochs."""
        lengths = self.lengths or ()
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in lengths])
        owner = np.repeat(np.arange(self.streams), lengths)
        order = owner[np.argsort(keys, kind="stable")]  # ties: the lower stream first
        ends = [b * self.batch for b in range(self.batches)] + [len(order)]
        return np.stack(
            [np.searchsorted(np.flatnonzero(order == v), ends) for v in range(self.streams)], axis=1
        )

    def taken(self, v: int, b: int) -> int:
        """a_v(b): samples of stream v consumed by the batches before b."""
        if self.lengths is None:  # sum over v of (bB + v) // V is exactly bB (Hermite)
            return (b * self.batch + v) // self.streams
        return int(self._taken[min(b, self.batches), v])

    def counts(self, b: int) -> list[int]:
        """How many samples each stream gives batch b."""
        return [self.taken(v, b + 1) - self.taken(v, b) for v in range(self.streams)]

    def size(self, b: int) -> int:
        """The global batch b's sample count (B, or a little more for an exact epoch's last)."""
        return sum(self.counts(b))

    def rank_range(self, b: int, rank: int, world: int) -> tuple[int, int]:
        """The positions of batch b that rank takes: as equal as integers allow."""
        size = self.size(b)
        return rank * size // world, (rank + 1) * size // world

    def takes(self, b: int, rank: int, world: int) -> list[Take]:
        """Per stream, what rank takes from batch b (every stream, kept or not)."""
        lo, hi = self.rank_range(b, rank, world)
        out, position = [], 0
        for v, count in enumerate(self.counts(b)):
            first = self.taken(v, b)
            keep_from = first + min(max(lo - position, 0), count)
            keep_to = first + min(max(hi - position, 0), count)
            out.append(Take(v, first, count, keep_from, keep_to, position + keep_from - first))
            position += count
        return out

    def rank_streams(self, rank: int, world: int, start: int = 0) -> list[int]:
        """The streams rank reads from batch ``start`` to the epoch's end."""
        # Resampled layouts repeat with a period dividing V; exact ones are checked batch by batch.
        end = self.batches if self.lengths is not None else min(self.batches, start + self.streams)
        needed: set[int] = set()
        for b in range(start, end):
            needed.update(t.stream for t in self.takes(b, rank, world) if t.keep_to > t.keep_from)
        return sorted(needed)
