"""Segmentation: cut a stream of mono blocks into fixed-length, possibly overlapping segments.

Policies (see :class:`genrecls.core.config.FeatureConfig`):

* ``tail="drop"`` drops the last partial segment; ``tail="pad"`` keeps it, zero-padded,
  when it holds at least half a segment of audio.
* A track shorter than one segment yields one zero-padded segment with
  ``short_track="pad"`` (if it lasts at least ``min_track_seconds``) and is recorded as
  too short otherwise.
* ``max_segments_per_track`` caps the segments taken from the start of a track
  (0 = no cap); decoding stops as soon as the cap is reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from genrecls.core.config import FeatureConfig
from genrecls.core.errors import AudioError

__all__ = ["Segment", "Segmenter", "iter_segments", "segment_starts", "evenly_spaced"]


@dataclass(frozen=True)
class Segment:
    index: int
    start_sample: int
    samples: np.ndarray  # float32, length segment_samples


class Segmenter:
    """Accumulates blocks and emits segments as they fill; memory is one segment plus one block.

    The samples wait in one reused buffer (no re-allocation per block); each emitted
    segment is a copy, so it stays valid after later pushes.
    """

    def __init__(self, cfg: FeatureConfig):
        self.length = cfg.segment_samples
        self.hop = cfg.segment_hop
        self.tail = cfg.tail
        self.short_track = cfg.short_track
        self.min_samples = int(round(cfg.min_track_seconds * cfg.sample_rate))
        self.cap = cfg.max_segments_per_track or None
        self.sample_rate = cfg.sample_rate
        self._buf = np.zeros(self.length + (1 << 16), np.float32)
        self._n = 0  # valid samples in _buf
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._next_start = 0  # absolute start of the next segment
        self._emitted = 0
        self.total_samples = 0

    @property
    def full(self) -> bool:
        """True once the cap on segments is reached: the caller may stop decoding."""
        return self.cap is not None and self._emitted >= self.cap

    @property
    def buffered(self) -> int:
        """Samples held, waiting for the segments that still need them."""
        return self._n

    def push(self, block: np.ndarray) -> list[Segment]:
        self.total_samples += block.size
        if self.full:
            return []
        skip = max(0, self._next_start - (self._buf_start + self._n))  # hop > length: samples no segment uses
        if skip:
            take = min(skip, block.size)
            block = block[take:]
            self._buf_start += take
        need = self._n + block.size
        if need > self._buf.size:
            grown = np.empty(max(need, 2 * self._buf.size), np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: need] = block
        self._n = need
        out = []
        while not self.full:
            offset = self._next_start - self._buf_start
            if offset + self.length > self._n:
                break
            out.append(Segment(self._emitted, self._next_start, self._buf[offset: offset + self.length].copy()))
            self._emitted += 1
            self._next_start += self.hop
        # keep only what later segments still need
        drop = min(self._next_start - self._buf_start, self._n)
        if drop > 0:
            left = self._n - drop
            self._buf[:left] = self._buf[drop: self._n].copy() if left > drop else self._buf[drop: self._n]
            self._n = left
            self._buf_start += drop
        return out

    def finish(self) -> list[Segment]:
        """Apply the tail and short-track policies once the stream has ended."""
        if self.full:
            return []
        if self._emitted == 0:
            seconds = self.total_samples / self.sample_rate
            if self.total_samples < self.min_samples:
                raise AudioError(
                    "too_short",
                    f"the track lasts {seconds:.2f} s, below the minimum of {self.min_samples / self.sample_rate:.2f} s",
                )
            if self.short_track == "fail":
                raise AudioError(
                    "too_short",
                    f"the track lasts {seconds:.2f} s, shorter than one segment "
                    f"({self.length / self.sample_rate:.2f} s) and features.short_track is 'fail'",
                )
            return [self._padded_tail()]
        offset = self._next_start - self._buf_start
        remaining = self._n - max(offset, 0)
        if self.tail == "pad" and remaining >= self.length // 2 and offset >= 0:
            return [self._padded_tail()]
        return []

    def _padded_tail(self) -> Segment:
        offset = max(self._next_start - self._buf_start, 0)
        seg = np.zeros(self.length, np.float32)
        part = self._buf[offset: min(offset + self.length, self._n)]
        seg[: part.size] = part
        s = Segment(self._emitted, self._next_start, seg)
        self._emitted += 1
        return s


def iter_segments(blocks: Iterable[np.ndarray], cfg: FeatureConfig) -> Iterator[Segment]:
    """Segments of a stream of mono blocks at ``cfg.sample_rate``; stops decoding at the cap."""
    seg = Segmenter(cfg)
    it = iter(blocks)
    for block in it:
        yield from seg.push(block)
        if seg.full:
            close = getattr(it, "close", None)
            if close:
                close()
            return
    yield from seg.finish()


def segment_starts(n_source_frames: int, source_rate: int, cfg: FeatureConfig, k: int) -> list[int]:
    """Start frames (in the source rate) of at most ``k`` evenly spaced segments of a track.

    Used by classification to score long tracks at bounded cost.  Returns the starts of
    the segments the full segmentation would produce, subsampled evenly.
    """
    seg_src = int(np.ceil(cfg.segment_samples * source_rate / cfg.sample_rate))
    hop_src = cfg.segment_hop * source_rate / cfg.sample_rate
    if n_source_frames < seg_src:
        return [0]
    n = 1 + int((n_source_frames - seg_src) // hop_src)
    return [int(round(i * hop_src)) for i in evenly_spaced(n, k)]


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """Indices of at most ``k`` evenly spaced segments of a track's ``n`` (0 or ``n <= k``: all of them).

    The one rule for which segments classify scores: :func:`segment_starts` (decoding only
    those windows), a stored track's segments (scoring from the embedding store) and the
    choice of K on validation tracks all pick the same ones.
    """
    if k <= 0 or n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
