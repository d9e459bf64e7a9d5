#!/usr/bin/env python
"""The committed fixtures of ``tests/test_tag.py``: one second of the project's own synthetic music
(:func:`genrecls.audio.sample_data.synthesize`), encoded by the real encoders of every format
``genrecls tag`` writes, untagged (``plain.*``) and tagged with a genre by a person (``tagged.*``).

Needs ``apt-get install lame ffmpeg sox flac vorbis-tools opus-tools`` (CI does not: the outputs
are committed).  Run from anywhere::

    python tests/data/tags/make_fixtures.py

``manifest.json`` lists how each file was made.  The pre-tagged files carry the genre ``Jazz``
(and a title and artist, so tests can check that other fields survive), written by the encoder
itself where it can; the one WAV tagger step (no encoder writes an ID3 chunk into a WAV) is done
with mutagen, as a tagger would.  ``info.wav`` holds its genre in a RIFF INFO chunk (``IGNR``,
what ``ffmpeg -metadata genre=`` writes), which mutagen cannot read or write.  ``plain.aac`` is a
raw ADTS stream, which has no place for tags at all.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile

import soundfile as sf

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from genrecls.audio.sample_data import synthesize  # noqa: E402

RATE, SECONDS = 22050, 1.0
GENRE, TITLE, ARTIST = "Jazz", "Fixture", "genrecls tests"
#: ffmpeg without its version stamp, so that re-running gives the same bytes
FF = ["ffmpeg", "-v", "error", "-y", "-i", "{src}", "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact"]
PERSON = ["-metadata", f"genre={GENRE}", "-metadata", f"title={TITLE}", "-metadata", f"artist={ARTIST}"]

JOBS: dict[str, list[list[str]]] = {
    "plain.mp3": [["lame", "--quiet", "-b", "32", "{src}", "{out}"]],
    "tagged.mp3": [["lame", "--quiet", "-b", "32", "--tt", TITLE, "--ta", ARTIST, "--ty", "2020", "--tg", GENRE,
                    "{src}", "{out}"]],
    "plain.m4a": [FF + ["-c:a", "aac", "-b:a", "32k", "{out}"]],
    "tagged.m4a": [FF + ["-c:a", "aac", "-b:a", "32k"] + PERSON + ["{out}"]],
    "plain.aiff": [FF + ["-c:a", "pcm_s16be", "{out}"]],
    "tagged.aiff": [FF + ["-c:a", "pcm_s16be", "-write_id3v2", "1"] + PERSON + ["{out}"]],
    "plain.wav": [["sox", "{src}", "-b", "16", "{out}"]],
    "tagged.wav": [["sox", "{src}", "-b", "16", "{out}"], ["python", "mutagen: add an ID3 chunk with TCON, TIT2, TPE1"]],
    "info.wav": [FF + ["-c:a", "pcm_s16le", "-metadata", f"genre={GENRE}", "{out}"]],
    "plain.wma": [FF + ["-c:a", "wmav2", "-b:a", "32k", "{out}"]],
    "tagged.wma": [FF + ["-c:a", "wmav2", "-b:a", "32k"] + PERSON + ["{out}"]],
    "plain.flac": [["flac", "--silent", "--force", "-o", "{out}", "{src}"]],
    "tagged.flac": [["flac", "--silent", "--force", "-T", f"GENRE={GENRE}", "-T", f"TITLE={TITLE}", "-T", f"ARTIST={ARTIST}",
                     "-o", "{out}", "{src}"]],
    "plain.ogg": [["oggenc", "--quiet", "-q", "0", "--serial", "1", "-o", "{out}", "{src}"]],
    "tagged.ogg": [["oggenc", "--quiet", "-q", "0", "--serial", "1", "-G", GENRE, "-t", TITLE, "-a", ARTIST, "-o", "{out}",
                    "{src}"]],
    "plain.opus": [["opusenc", "--quiet", "--bitrate", "16", "--serial", "1", "{src}", "{out}"]],
    "tagged.opus": [["opusenc", "--quiet", "--bitrate", "16", "--serial", "1", "--genre", GENRE, "--title", TITLE,
                     "--artist", ARTIST, "{src}", "{out}"]],
    "plain.aac": [FF + ["-c:a", "aac", "-b:a", "32k", "-f", "adts", "{out}"]],
}


def tag_wav(path: str) -> None:
    from mutagen.id3 import TCON, TIT2, TPE1
    from mutagen.wave import WAVE

    f = WAVE(path)
    f.add_tags()
    f.tags.add(TCON(encoding=3, text=[GENRE]))
    f.tags.add(TIT2(encoding=3, text=[TITLE]))
    f.tags.add(TPE1(encoding=3, text=[ARTIST]))
    f.save()


def main() -> None:
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "source.wav")
        audio = synthesize("jazz", SECONDS, sr=RATE, seed=7).mean(axis=1)  # mono: small files
        sf.write(src, audio, RATE, subtype="PCM_16")
        for name, steps in JOBS.items():
            out = os.path.join(HERE, name)
            shown = []
            for step in steps:
                if step[0] == "python":
                    tag_wav(out)
                    shown.append(f"python: {step[1]}")
                    continue
                args = [a.format(src=src, out=out) for a in step]
                subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
                shown.append(shlex.join(a.replace(src, "source.wav").replace(out, name) for a in args))
            manifest[name] = {"made_by": shown, "bytes": os.path.getsize(out),
                              "genre": GENRE if name.startswith(("tagged", "info")) else None}
    manifest = {"source": f"genrecls.sample_data.synthesize('jazz', {SECONDS}, sr={RATE}, seed=7), mono, 16-bit WAV",
                "files": manifest}
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(f"wrote {len(JOBS)} fixtures to {HERE} ({sum(v['bytes'] for v in manifest['files'].values()) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
