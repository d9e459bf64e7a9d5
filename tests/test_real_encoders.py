"""Files made by real encoders decode to FFmpeg's length (issue 10).

The fixtures in ``tests/data/encoders`` were made by ``python bench/encoder_corpus.py
--fixtures`` with lame, ffmpeg, sox, flac, oggenc and opusenc from the project's synthetic
music (3 s each; MP3 with and without Xing/Info frames, MPEG-2/2.5, ID3v2.4 with a cover,
APEv2, junk before the first frame, MP2, WAV streamed to a pipe, WAVE_FORMAT_EXTENSIBLE,
RF64, BWF, LIST after the data, AIFF, AIFF-C, FLAC with/without a seek table and with ID3,
chained Ogg Vorbis, Opus, 5.1, and truncated copies).  ``manifest.json`` beside them holds
FFmpeg's reference for each: the samples ``ffmpeg -i f -f f32le -ac 1 -`` decodes, at the
stream's native rate.  CI has no encoders: these tests only read the committed files.

The rule: an intact file decodes to within 1% of FFmpeg's length, and ingest keeps it with
that length; a damaged (truncated) one either decodes what FFmpeg decodes, within 1% (or
50 ms: the last, incomplete frame), or is refused with an AudioError; no file crashes the
decoder or hangs it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from genrecls.audio.decode import AudioError, read_mono

DATA = os.path.join(os.path.dirname(__file__), "data", "encoders")
with open(os.path.join(DATA, "manifest.json")) as _f:
    MANIFEST = json.load(_f)
FILES = {e["path"]: e for e in MANIFEST["files"]}
INTACT = sorted(p for p, e in FILES.items() if e["state"] == "intact")
DAMAGED = sorted(p for p, e in FILES.items() if e["state"] == "damaged")
RATE = 22050
TOLERANCE = 0.01
#: a damaged file may lose its last, incomplete frame where FFmpeg decodes part of it
DAMAGED_SLACK = 0.05


def damaged_tolerance(ref: float) -> float:
    return max(TOLERANCE * ref, DAMAGED_SLACK)


def reference(rel: str) -> float:
    return FILES[rel]["ffmpeg"]["seconds"]


def describe(rel: str) -> str:
    e = FILES[rel]
    return f"{rel} ({e['note'] or e['category']}; made by: {' && '.join(e['made_by'])})"


def test_the_fixture_set_covers_the_issue():
    """The committed subset holds every case the issue names (guards against a thinner regeneration)."""
    names = " ".join(FILES)
    for needle in ("cbr128_info", "cbr128_noxing", "vbr_v2_xing", "vbr_v2_noxing", "mpeg2_", "mpeg25_",
                   "id3v24_cover", "apev2", "junk_before", ".mp2", "pipe_ffffffff", "extensible", "rf64", "bwf_bext",
                   "list_after_data", ".aiff", ".aifc", "flac_seektable", "flac_no_seektable", "flac_id3", "flac_pipe",
                   "chained", "opusenc_8k", "opusenc_48k", "_51."):
        assert needle in names, needle
    assert {FILES[p]["category"] for p in DAMAGED} == {"truncated"} and len(DAMAGED) >= 5
    assert {os.path.splitext(p)[1] for p in DAMAGED} >= {".mp3", ".flac", ".ogg", ".wav", ".opus"}
    for rel in FILES:
        assert os.path.isfile(os.path.join(DATA, rel)), rel
        assert FILES[rel]["ffmpeg"]["decodes"] or FILES[rel]["state"] == "damaged", rel
    total = sum(os.path.getsize(os.path.join(DATA, rel)) for rel in FILES)
    assert total < 5e6, f"fixtures grew to {total / 1e6:.1f} MB"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rel", INTACT)
def test_intact_file_decodes_to_ffmpegs_length(rel):
    ref = reference(rel)
    try:
        audio = read_mono(os.path.join(DATA, rel), sample_rate=RATE)
    except AudioError as exc:
        pytest.fail(f"{describe(rel)} refused as {exc.kind}: {exc} (FFmpeg decodes {ref:.3f} s)")
    got = len(audio) / RATE
    assert abs(got - ref) <= TOLERANCE * ref, \
        f"{describe(rel)}: decoded {got:.3f} s, FFmpeg decodes {ref:.3f} s ({(got - ref) / ref:+.1%})"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rel", DAMAGED)
def test_truncated_file_decodes_what_is_there_or_is_refused(rel):
    ref = reference(rel)
    try:
        audio = read_mono(os.path.join(DATA, rel), sample_rate=RATE)
    except AudioError as exc:
        assert exc.kind and str(exc), rel  # refused with a kind and a reason: allowed
        return
    got = len(audio) / RATE
    assert abs(got - ref) <= damaged_tolerance(ref), \
        f"{describe(rel)}: decoded {got:.3f} s without an error, FFmpeg decodes {ref:.3f} s ({(got - ref) / ref:+.1%})"


@pytest.mark.timeout(120)
def test_ingest_keeps_every_intact_file_at_ffmpegs_length(tmp_path, small_cfg, ray_local):
    """The real ingest over the fixture folder: intact files land with FFmpeg's length, none is a failure."""
    from genrecls.jobs.ingest import ingest
    from genrecls.storage.dataset import Dataset

    src = tmp_path / "library"
    shutil.copytree(DATA, src)
    out = tmp_path / "ds"
    summary = ingest(str(src), str(out), small_cfg, workers=1, progress=False)
    ds = Dataset(str(out))
    tracks = {t.path: t for t in ds.track_entries()}
    failures = {r["path"]: r for r in ds.failures().to_pylist()}
    warned = {r["path"]: r for r in ds.warnings().to_pylist()}

    problems = []
    for rel in INTACT:
        ref = reference(rel)
        if rel in failures:
            f = failures[rel]
            problems.append(f"{rel}: failed as {f['kind']}: {f['reason']} (FFmpeg decodes {ref:.3f} s)")
        elif rel not in tracks:
            problems.append(f"{rel}: neither kept nor recorded")
        elif abs(tracks[rel].duration_seconds - ref) > TOLERANCE * ref:
            got = tracks[rel].duration_seconds
            problems.append(f"{rel}: stored {got:.3f} s, FFmpeg decodes {ref:.3f} s ({(got - ref) / ref:+.1%})")
    for rel in DAMAGED:
        ref = reference(rel)
        if rel in tracks and abs(tracks[rel].duration_seconds - ref) > damaged_tolerance(ref):
            problems.append(f"{rel} (damaged): kept with {tracks[rel].duration_seconds:.3f} s, "
                            f"FFmpeg decodes {ref:.3f} s")
        elif rel not in tracks and rel not in failures:
            problems.append(f"{rel} (damaged): neither kept nor recorded")
        elif rel in tracks and has_length_evidence(rel) and warned.get(rel, {}).get("kind") != "truncated":
            problems.append(f"{rel} (damaged): kept without a truncated warning ({warned.get(rel)})")
    for rel in INTACT:
        if rel in warned and warned[rel]["kind"] == "truncated":
            problems.append(f"{rel}: intact but warned as {warned[rel]['kind']}: {warned[rel]['reason']}")
    assert not problems, "\n".join(problems)
    assert summary.discovered == len(FILES)
    assert set(warned) <= set(FILES)


def has_length_evidence(rel: str) -> bool:
    """A damaged copy whose container says how long it was: all but an MP3 without a Xing/LAME/VBRI header."""
    return "noxing" not in rel


@pytest.mark.parametrize("rel", [r for r in DAMAGED if has_length_evidence(r)])
def test_truncated_file_fails_under_the_strict_policy(rel):
    with pytest.raises(AudioError) as err:
        read_mono(os.path.join(DATA, rel), sample_rate=RATE, on_truncated="fail")
    assert err.value.kind == "truncated" and "on_truncated" in str(err.value)
