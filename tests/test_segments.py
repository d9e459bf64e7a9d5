"""Segmentation: counts and positions for every policy (hop/overlap, cap, tail, short tracks)."""

from __future__ import annotations

import numpy as np
import pytest

from genrecls.audio.decode import AudioError
from genrecls.audio.segments import Segmenter, iter_segments, segment_starts
from genrecls.core.config import ConfigError, FeatureConfig


def cfg(**kw) -> FeatureConfig:
    base = dict(sample_rate=1000, segment_samples=100, segment_hop=100, n_fft=64, hop_length=16, n_mels=8,
                min_track_seconds=0.02)
    return FeatureConfig(**{**base, **kw}).validate()


def ramp_blocks(total: int, seed: int = 0):
    """A ramp (sample i has value i) cut into blocks of random sizes, as a decoder yields it."""
    rng = np.random.default_rng(seed)
    ramp = np.arange(total, dtype=np.float32)
    i = 0
    while i < total:
        n = int(rng.integers(1, 80))
        yield ramp[i:i + n]
        i += n


def expected_count(total: int, length: int, hop: int, tail: str) -> int:
    if total < length:
        return 1  # padded short track
    n = 1 + (total - length) // hop
    if tail == "pad" and total - n * hop >= length // 2:
        n += 1
    return n


@pytest.mark.parametrize("total", [100, 101, 149, 150, 250, 999, 1000, 1049, 1050])
@pytest.mark.parametrize("hop", [100, 50, 30, 130])
@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_counts_and_positions(total, hop, tail):
    c = cfg(segment_hop=hop, tail=tail)
    segs = list(iter_segments(ramp_blocks(total, seed=total + hop), c))
    assert len(segs) == expected_count(total, 100, hop, tail)
    for k, s in enumerate(segs):
        assert s.index == k
        assert s.start_sample == k * hop
        assert s.samples.dtype == np.float32 and s.samples.shape == (100,)
        real = np.arange(s.start_sample, min(s.start_sample + 100, total), dtype=np.float32)
        np.testing.assert_array_equal(s.samples[: real.size], real)  # the right samples, in order
        assert not s.samples[real.size:].any()  # a padded tail is zeros


def test_default_policy_is_the_tutorials_cuts():
    c = FeatureConfig()
    assert (c.segment_samples, c.segment_hop, c.tail, c.short_track) == (100_000, 100_000, "drop", "pad")
    # a 30 s track at 22050 Hz: 661500 samples -> 6 whole cuts of 100000, the 61500-sample tail dropped
    assert expected_count(661_500, 100_000, 100_000, "drop") == 6
    segs = list(iter_segments(iter([np.zeros(661_500, np.float32) + 0.1]), c))
    assert [s.start_sample for s in segs] == [0, 100_000, 200_000, 300_000, 400_000, 500_000]
    padded = list(iter_segments(iter([np.zeros(661_500, np.float32) + 0.1]), FeatureConfig(tail="pad")))
    assert len(padded) == 7 and padded[-1].samples[61_500:].max() == 0


def test_a_short_tail_below_half_a_segment_is_dropped_even_with_pad():
    segs = list(iter_segments(ramp_blocks(240), cfg(tail="pad")))
    assert [s.start_sample for s in segs] == [0, 100]  # 40 samples left: under half a segment


def test_cap_limits_segments_and_stops_decoding():
    pulled, closed = [0], [False]

    def blocks():
        try:
            for b in ramp_blocks(100_000):
                pulled[0] += b.size
                yield b
        finally:
            closed[0] = True

    segs = list(iter_segments(blocks(), cfg(max_segments_per_track=3, segment_hop=50)))
    assert [s.start_sample for s in segs] == [0, 50, 100]
    assert pulled[0] < 300  # decoding stopped right after the third segment filled
    assert closed[0]  # and the decoder was closed (its file released)


def test_short_track_is_padded_by_default():
    segs = list(iter_segments(ramp_blocks(60), cfg()))
    assert len(segs) == 1 and segs[0].start_sample == 0
    np.testing.assert_array_equal(segs[0].samples[:60], np.arange(60, dtype=np.float32))
    assert not segs[0].samples[60:].any()


def test_short_track_fails_when_asked():
    with pytest.raises(AudioError) as err:
        list(iter_segments(ramp_blocks(60), cfg(short_track="fail")))
    assert err.value.kind == "too_short" and "short_track is 'fail'" in str(err.value)


def test_track_below_the_minimum_length_is_too_short_whatever_the_policy():
    with pytest.raises(AudioError) as err:
        list(iter_segments(ramp_blocks(10), cfg(min_track_seconds=0.05)))
    assert err.value.kind == "too_short" and "below the minimum" in str(err.value)


def test_memory_is_one_segment_plus_one_block():
    seg = Segmenter(cfg(segment_hop=100))
    for b in ramp_blocks(50_000):
        seg.push(b)
        assert seg.buffered < 100 + 80  # never the whole stream


def test_overlap_is_allowed_but_hop_must_be_positive():
    assert len(list(iter_segments(ramp_blocks(300), cfg(segment_hop=10)))) == 21
    with pytest.raises(ConfigError, match="segment_hop"):
        cfg(segment_hop=0)
    with pytest.raises(ConfigError, match="segment_samples"):
        cfg(segment_samples=32)  # shorter than n_fft


@pytest.mark.parametrize("frames,k,expect", [
    (44100 * 30, 3, 3),   # 30 s at 44.1 kHz, 6 segments, 3 sampled
    (44100 * 30, 0, 6),   # all
    (44100 * 30, 10, 6),  # fewer segments than asked
    (44100 * 2, 3, 1),    # shorter than a segment: one, at 0
])
def test_segment_starts_for_sampled_classification(frames, k, expect):
    c = FeatureConfig()
    starts = segment_starts(frames, 44100, c, k)
    assert len(starts) == expect and starts[0] == 0
    assert starts == sorted(set(starts))
    seg_src = int(np.ceil(c.segment_samples * 44100 / c.sample_rate))
    assert all(s + seg_src <= max(frames, seg_src) for s in starts)
