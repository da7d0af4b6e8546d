"""Exact selection of the largest entries of a non-negative statistic (|task vector|, variance),
found in streamed passes with bounded memory, however large the tensor or the model.

The bit patterns of non-negative floats order exactly as their values do, so the k-th largest
value is found among integers. Where the job may hold one tensor's statistic (`Job.holds`), one
pass gathers it and the backend's k-th value finds the threshold at once. Otherwise passes narrow
it down 16 bits at a time: one counts the top 16 bits of every entry (65536 bins); then, once
the entries sharing the bits found so far may be held, the next pass gathers them and finds the
threshold among them, and where they may not, it counts their next 16 bits, and so on. Then
`ties="all"` keeps every entry >= that value (the TIES paper's rule), while `ties="index"` keeps
exactly k, the entries equal to it taken in flat index order: a gathering pass sees where the
cut falls among them; after counting alone, one more pass counts them per block. Every route
finds the same cut. Statistics are per *stream* (one per model for TIES, one for SCE's
variance), and each stream may ask for several k at once (breadcrumbs' band is two selections
on one histogram).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmerge import backend
from mmerge.methods.contract import Chunk, Job, Pass

Array = Any

WIDTH = 16  # bits resolved per pass
BINS = 1 << WIDTH
TIES = ("index", "all")


@dataclass
class Cut:
    """One selection of the k largest of a stream's n entries, as the passes narrow it down:
    the threshold's bits known so far (`prefix`), how many entries lie above them (`above`),
    and the rank (1-based) of the k-th largest among the `within` entries sharing them (`rank`).
    Once `found`, `equal` entries equal the threshold, `rank` of which are kept; with the index rule
    and `rank < equal`, those in blocks before `tie_block` are kept, the first `tie_keep` in
    `tie_block`, none after."""

    k: int
    n: int
    prefix: int = 0
    above: int = 0
    rank: int = 0
    within: int = 0  # entries sharing `prefix`
    equal: int = 0
    threshold: float = 0.0
    tie_block: int = -1
    tie_keep: int = 0
    found: bool = False

    @property
    def keep_all(self) -> bool:
        return self.k >= self.n

    @property
    def keep_none(self) -> bool:
        return self.k <= 0

    @property
    def active(self) -> bool:
        return not (self.keep_all or self.keep_none)

    @property
    def partial_ties(self) -> bool:
        return self.active and self.rank < self.equal


@dataclass(frozen=True)
class Selection:
    """A selection pipeline: `values(job, chunk)` gives each of the `streams(job)` statistics on
    a chunk (flat, non-negative, compute dtype); `counts(job, n, nonzero)` gives each stream's
    tuple of k from its total entries and non-zero entries (over the population, for the model
    scope; None unless `nonzero`: counting them is a pass over every entry that numpy makes
    holding the GIL)."""

    name: str
    values: Callable[[Job, Chunk], list[Array]]
    counts: Callable[[Job, list[int], list[int] | None], list[tuple[int, ...]]]
    ties: str = "index"
    population: Callable[[Job], Hashable | None] = field(default=lambda job: None)
    streams: Callable[[Job], int] = field(default=lambda job: job.n_models)
    nonzero: bool = False

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}")

    def passes(self, job: Job) -> Iterator[Pass]:
        """The passes that find the cuts (`cuts(job)` holds the result)."""
        population = self.population(job)
        if population is not None and self.ties != "all":
            raise ValueError("a selection over the whole model keeps all ties (ties='all')")
        bits = 64 if job.compute == "float64" else 32
        if population is None and job.holds(self.streams(job) * job.numel * bits // 8):
            gather = _Gather(self, None)
            yield Pass(f"{self.name}.gather", gather.measure, gather.finish, _concat)
            return
        per_entry = bits // 8 + (8 if self.ties == "index" else 0)  # the value, its position
        for level in range(bits // WIDTH):
            shift = bits - WIDTH * (level + 1)
            if level:
                active = [c for cuts in self.cuts(job) for c in cuts if c.active]
                if not active:
                    return
                if job.holds(per_entry * sum(c.within for c in active)):
                    gather = _Gather(self, shift + WIDTH)
                    name = f"{self.name}.gather"
                    yield Pass(name, gather.measure, gather.finish, _concat, population)
                    return
            count = _Level(self, level, shift)
            yield Pass(f"{self.name}.{level}", count.measure, count.finish, population=population)
        if self.ties == "index" and any(c.partial_ties for s in self.cuts(job) for c in s):
            yield Pass(f"{self.name}.ties", self._count_ties, self._place_ties, _concat)

    def cuts(self, job: Job) -> list[list[Cut]]:
        """Per stream, per k: the cuts as the latest of the passes left them."""
        keys = ("ties", "gather", "3", "2", "1", "0")
        for key in (f"{self.name}.{key}" for key in keys):
            if key in job.stats:
                return job.stats[key]
        raise KeyError(f"{self.name}: no pass has run yet")

    def mask(self, job: Job, chunk: Chunk, value: Array, stream: int, which: int = 0) -> Array:
        """Which entries of `value` (stream `stream`'s statistic on `chunk`) selection `which`
        of that stream keeps."""
        xp = chunk.xp
        cut = self.cuts(job)[stream][which]
        if cut.keep_all:
            return xp.greater_equal(value, 0)
        if cut.keep_none:
            return xp.less(value, 0)
        thr = cut.threshold
        # comparisons by the namespace's functions, not operators: see consensus.disjoint_merge
        if self.ties == "all" or not cut.partial_ties:
            return xp.greater_equal(value, thr)
        lo = cut.tie_block * job.block - chunk.start
        hi = lo + job.block
        if hi <= 0:
            return xp.greater(value, thr)
        if lo >= chunk.size:
            return xp.greater_equal(value, thr)
        lo, hi = max(lo, 0), min(hi, chunk.size)
        middle = value[lo:hi]
        equal = middle == thr
        order = xp.cumulative_sum(xp.astype(equal, xp.int64))
        kept = (middle > thr) | (equal & (order <= cut.tie_keep))
        return xp.concat([value[:lo] >= thr, kept, value[hi:] > thr])

    def _count_ties(self, job: Job, chunk: Chunk) -> list:
        """Per stream and k: (first block, count of entries equal to the threshold per block)."""
        values = self.values(job, chunk)
        out = []
        for stream, cuts in zip(values, self.cuts(job)):
            for cut in cuts:
                if not cut.partial_ties:
                    out.append(None)
                    continue
                counts = _block_counts(chunk.xp, stream == cut.threshold, job.block)
                out.append((chunk.start // job.block, counts))
        return [out]

    def _place_ties(self, job: Job, measured: list) -> list[list[Cut]]:
        flat = [c for cuts in self.cuts(job) for c in cuts]
        for position, cut in enumerate(flat):
            if not cut.partial_ties:
                continue
            pieces = sorted(m[position] for m in measured)
            counts = np.concatenate([c for _, c in pieces])
            before = np.cumsum(counts) - counts
            block = int(np.searchsorted(before + counts, cut.rank))  # first block reaching rank
            cut.tie_block, cut.tie_keep = block, int(cut.rank - before[block])
        return self.cuts(job)


def _concat(a: list, b: list) -> list:
    return a + b


def _block_counts(xp, mask: Array, block: int) -> np.ndarray:
    """The number of True entries of the flat `mask` per block (the last may be partial)."""
    n = mask.shape[0]
    whole = n - n % block
    ints = xp.astype(mask, xp.int64)
    parts = []
    if whole:
        parts.append(backend.to_host(xp.sum(xp.reshape(ints[:whole], (-1, block)), axis=1)))
    if whole < n:
        parts.append(np.asarray([int(xp.sum(ints[whole:]))]))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class _Level:
    """One histogram pass: the bins of bits shift .. shift+15 of every stream's statistic (among
    the entries sharing each cut's prefix, after the first level)."""

    selection: Selection
    level: int
    shift: int

    def measure(self, job: Job, chunk: Chunk) -> list:
        xp = chunk.xp
        values = self.selection.values(job, chunk)
        out = []
        for s, value in enumerate(values):
            on = backend.of(value)
            bits = on.float_bits(value)
            digit = on.digits(bits, self.shift)
            if self.level == 0:
                nonzero = int(xp.count_nonzero(value)) if self.selection.nonzero else 0
                out.append((on.bincount(digit, BINS), value.shape[0], nonzero))
                continue
            hists = []
            for cut in self.selection.cuts(job)[s]:
                if not cut.active:
                    hists.append(None)
                    continue
                inside = (bits >> (self.shift + WIDTH)) == cut.prefix
                hists.append(on.bincount(digit, BINS, where=inside))
            out.append(hists)
        return out

    def finish(self, job: Job, total: list) -> list[list[Cut]]:
        if self.level == 0:
            sizes = [int(n) for _, n, _ in total]
            nonzero = [int(z) for _, _, z in total] if self.selection.nonzero else None
            ks = self.selection.counts(job, sizes, nonzero)
            cuts = [_cuts(stream_ks, n) for stream_ks, n in zip(ks, sizes)]
            hists = [[h for _ in stream] for (h, _, _), stream in zip(total, cuts)]
        else:
            cuts = self.selection.cuts(job)
            hists = total
        last = self.shift == 0
        for stream_cuts, stream_hists in zip(cuts, hists):
            for cut, hist in zip(stream_cuts, stream_hists):
                if cut.active:
                    _narrow(cut, hist, last, job.compute)
        return cuts


def _narrow(cut: Cut, hist: np.ndarray, last: bool, compute: str) -> None:
    """Move `cut` one digit down: the bin holding its rank-th largest entry."""
    from_top = np.cumsum(hist[::-1])
    index = int(np.searchsorted(from_top, cut.rank))  # first position where the count reaches
    b = BINS - 1 - index
    higher = int(from_top[index] - hist[b])
    cut.prefix = (cut.prefix << WIDTH) | b
    cut.above += higher
    cut.rank -= higher
    cut.within = int(hist[b])
    if last:
        _found(cut, cut.within, compute)


def _cuts(ks: tuple[int, ...], n: int) -> list[Cut]:
    """A stream's cuts before any pass narrowed them: the k-th largest of all n entries."""
    return [Cut(k, n, rank=k, within=n) for k in ks]


def _found(cut: Cut, equal: int, compute: str) -> None:
    """`cut.prefix` is now the threshold's whole bit pattern, held by `equal` entries."""
    cut.equal, cut.found = equal, True
    bits = np.array([cut.prefix], np.int64 if compute == "float64" else np.int32)
    cut.threshold = float(bits.view(np.float64 if compute == "float64" else np.float32)[0])


@dataclass(frozen=True)
class _Gather:
    """The pass that finishes a selection from the entries it may hold: every entry of each
    stream (`shift` None, one tensor's selection), or those sharing each cut's prefix (the bits
    above `shift`) with their flat positions (for the index rule). It finds each cut's
    threshold with the backend's k-th value, and where the index rule cuts through the tied
    entries, the block where the cut falls."""

    selection: Selection
    shift: int | None

    def measure(self, job: Job, chunk: Chunk) -> list:
        xp = chunk.xp
        out = []
        for s, value in enumerate(self.selection.values(job, chunk)):
            on = backend.of(value)
            bits = on.float_bits(value)
            if self.shift is None:
                nonzero = int(xp.count_nonzero(value)) if self.selection.nonzero else 0
                out.append((bits, nonzero))
                continue
            gathered = []
            for cut in self.selection.cuts(job)[s]:
                if not cut.active:
                    gathered.append(None)
                    continue
                inside, index = on.compress(bits, (bits >> self.shift) == cut.prefix)
                where = index + chunk.start if self.selection.ties == "index" else None
                gathered.append((inside, where))
            out.append(gathered)
        return [(chunk.start, out)]

    def finish(self, job: Job, measured: list) -> list[list[Cut]]:
        measured = sorted(measured, key=lambda m: m[0])  # chunk order (a model's: tensor order)
        streams = list(zip(*(out for _, out in measured)))
        if self.shift is not None:
            cuts = self.selection.cuts(job)
            for stream_cuts, pieces in zip(cuts, streams):
                for c, cut in enumerate(stream_cuts):
                    if cut.active:
                        self._resolve(job, cut, [(p[c][1], p[c][0]) for p in pieces])
            return cuts
        sizes = [sum(int(bits.shape[0]) for bits, _ in pieces) for pieces in streams]
        nonzero = [sum(z for _, z in p) for p in streams] if self.selection.nonzero else None
        ks = self.selection.counts(job, sizes, nonzero)
        cuts = [_cuts(stream_ks, n) for stream_ks, n in zip(ks, sizes)]
        starts = [start for start, _ in measured]
        for stream_cuts, pieces in zip(cuts, streams):
            if any(cut.active for cut in stream_cuts):
                self._resolve(job, stream_cuts, list(zip(starts, (b for b, _ in pieces))))
        return cuts

    def _resolve(self, job: Job, cuts: Cut | list[Cut], pieces: list) -> None:
        """Find the active `cuts` among the entries that share their prefix, given as pieces
        (positions, bits) in flat order: positions an array, or the first one's (an int)."""
        arrays = [bits for _, bits in pieces]
        xp = backend.namespace(arrays[0])
        on = backend.of(arrays[0])
        scratch = xp.concat(arrays) if len(arrays) > 1 else xp.asarray(arrays[0], copy=True)
        for cut in cuts if isinstance(cuts, list) else [cuts]:
            if not cut.active:
                continue
            t, higher, equal = on.kth_largest(scratch, cut.rank)  # reorders scratch
            t = int(t)
            cut.prefix, cut.above, cut.rank = t, cut.above + higher, cut.rank - higher
            cut.within = equal
            _found(cut, equal, job.compute)
            if self.selection.ties == "index" and cut.partial_ties:
                _place(job, cut, _tied_positions(pieces, t, cut.rank))


def _tied_positions(pieces: list, t: int, rank: int) -> np.ndarray:
    """Sorted flat positions of (at least the first `rank`) entries equal to `t` among the
    pieces (positions, bits), which come in flat order."""
    found, seen = [], 0
    for where, bits in pieces:
        equal = backend.to_host(bits == t)  # positions have data-dependent shapes: on the host
        if isinstance(where, int):
            positions = np.flatnonzero(equal) + where
        else:
            positions = backend.to_host(where)[equal]
        found.append(positions)
        seen += positions.shape[0]
        if seen >= rank:
            break
    return np.sort(np.concatenate(found))


def _place(job: Job, cut: Cut, positions: np.ndarray) -> None:
    """With the sorted positions of the tied entries: the block holding the rank-th of them, and
    how many of its own it keeps."""
    last = int(positions[cut.rank - 1])
    cut.tie_block = last // job.block
    before = int(np.searchsorted(positions, cut.tie_block * job.block))
    cut.tie_keep = cut.rank - before
