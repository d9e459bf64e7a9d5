"""A synthetic but musically distinct labelled collection, so demos and tests need no download.

Each genre is a recipe: tempo, drum pattern, bass and chord instruments (timbre), scale
and chord progression (harmony).  Every track draws its own key, tempo (within the
genre's range), mix levels and noise, so tracks of one genre differ while genres stay
separable.  Files are written as 44.1 kHz stereo in a rotating mix of MP3, WAV, FLAC
and OGG (blocks through ``soundfile.SoundFile``: one large OGG write crashed libsndfile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

__all__ = ["GENRES", "FORMATS", "SPELLINGS", "synthesize", "write_audio", "make_sample_collection", "write_person_tags",
           "make_tagged_library", "TAGGED_VOCABULARY"]

FORMATS = {  # extension -> (soundfile format, subtype)
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
}

MAJOR = [0, 2, 4, 5, 7, 9, 11]
MINOR = [0, 2, 3, 5, 7, 8, 10]


@dataclass(frozen=True)
class Recipe:
    tempo: tuple[float, float]
    kick: str  # 16-step pattern: x = hit
    snare: str
    hat: str
    swing: float
    scale: tuple[int, ...]
    progression: tuple[int, ...]  # scale degrees of chord roots, one per bar
    chord_voice: str  # pad | organ | pluck | saw | piano | skank | none
    bass_voice: str  # sine | saw | walk | sub | none
    distortion: float
    brightness: float  # 0..1, lowpass-ish tilt of noise and harmonics
    octave: int  # base octave of the chords


GENRES: dict[str, Recipe] = {
    "rock": Recipe((112, 128), "x.......x.x.....", "....x.......x...", "x.x.x.x.x.x.x.x.", 0.0, tuple(MAJOR), (0, 4, 5, 3), "saw", "saw", 0.6, 0.7, 3),
    "electronic": Recipe((124, 132), "x...x...x...x...", "....x.......x...", "..x...x...x...x.", 0.0, tuple(MINOR), (0, 0, 5, 6), "pad", "saw", 0.1, 0.9, 4),
    "jazz": Recipe((140, 170), "x.........x.....", "......x.......x.", "x..xx..xx..xx..x", 0.33, tuple(MAJOR), (1, 4, 0, 5), "piano", "walk", 0.0, 0.5, 4),
    "classical": Recipe((66, 84), "................", "................", "................", 0.0, tuple(MAJOR), (0, 3, 4, 0), "organ", "sine", 0.0, 0.3, 4),
    "hiphop": Recipe((84, 96), "x......x..x.....", "....x.......x...", "x.x.x.x.x.x.x.x.", 0.2, tuple(MINOR), (0, 5, 3, 4), "pluck", "sub", 0.0, 0.4, 4),
    "reggae": Recipe((70, 80), "........x.......", "........x.......", "..x...x...x...x.", 0.1, tuple(MAJOR), (0, 3, 4, 3), "skank", "sine", 0.0, 0.6, 4),
    "metal": Recipe((170, 200), "xxxxxxxxxxxxxxxx", "....x.......x...", "x.x.x.x.x.x.x.x.", 0.0, tuple(MINOR), (0, 1, 0, 6), "saw", "saw", 0.95, 0.95, 2),
    "ambient": Recipe((56, 68), "................", "................", "................", 0.0, tuple(MINOR), (0, 5, 3, 6), "pad", "none", 0.0, 0.2, 3),
    "country": Recipe((96, 110), "x...x...x...x...", "..x...x...x...x.", "................", 0.0, tuple(MAJOR), (0, 3, 4, 4), "pluck", "walk", 0.05, 0.6, 4),
    "blues": Recipe((64, 80), "x.....x.x.......", "....x.......x...", "x..x..x..x..x..x", 0.33, (0, 3, 5, 6, 7, 10), (0, 0, 2, 0), "piano", "walk", 0.25, 0.5, 3),
}


def _midi_hz(n: float) -> float:
    return 440.0 * 2 ** ((n - 69) / 12)


def _env(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    a = np.clip(t / max(attack, 1e-4), 0, 1)
    return a * np.exp(-t / max(decay, 1e-4))


def _tone(freq: float, n: int, sr: int, voice: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    if voice in ("sine", "sub"):
        return np.sin(2 * np.pi * freq * t) + (0.3 * np.sin(4 * np.pi * freq * t) if voice == "sine" else 0)
    if voice in ("saw", "walk"):
        k = np.arange(1, 12 if voice == "saw" else 5)[:, None]
        return (np.sin(2 * np.pi * freq * k * t) / k).sum(0)
    if voice == "organ":
        vib = 1 + 0.004 * np.sin(2 * np.pi * 5.5 * t)
        return sum(np.sin(2 * np.pi * freq * h * vib * t) / h ** 1.5 for h in (1, 2, 3, 4, 6))
    if voice == "pad":
        return sum(np.sin(2 * np.pi * freq * (1 + d) * t + rng.uniform(0, 6)) for d in (-0.006, 0, 0.007))
    if voice in ("pluck", "skank", "piano"):
        k = np.arange(1, 8)[:, None]
        decay = np.exp(-t[None, :] * k * (6 if voice == "pluck" else 3))
        return (np.sin(2 * np.pi * freq * k * t) / k * decay).sum(0)
    raise ValueError(f"unknown voice {voice!r}")


def synthesize(genre: str, seconds: float, *, sr: int = 44100, seed: int = 0) -> np.ndarray:
    """One stereo track (frames, 2) float32 of a genre recipe, deterministic for a seed."""
    if genre not in GENRES:
        raise ValueError(f"unknown genre {genre!r}; known: {sorted(GENRES)}")
    r = GENRES[genre]
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    tempo = rng.uniform(*r.tempo)
    step = 60.0 / tempo / 4  # sixteenth note
    key = 48 + int(rng.integers(0, 12))
    bar = 16 * step
    n_steps = int(seconds / step) + 1
    kick_len, snare_len, hat_len = int(0.25 * sr), int(0.18 * sr), int(0.05 * sr)
    tk = np.arange(kick_len) / sr
    kick = np.sin(2 * np.pi * (50 + 90 * np.exp(-tk * 30)) * tk) * np.exp(-tk * 12)
    snare = rng.standard_normal(snare_len) * _env(snare_len, sr, 0.001, 0.05) + 0.4 * np.sin(2 * np.pi * 190 * np.arange(snare_len) / sr) * _env(snare_len, sr, 0.001, 0.04)
    hat = np.diff(rng.standard_normal(hat_len + 1)) * _env(hat_len, sr, 0.0005, 0.012) * (0.4 + r.brightness)
    levels = rng.uniform(0.7, 1.0, 5)

    def place(sample, pos, gain):
        i = int(pos * sr)
        if i >= n:
            return
        j = min(n, i + sample.size)
        out[i:j] += gain * sample[: j - i]

    for s in range(n_steps):
        pos = s * step + (r.swing * step if s % 2 else 0.0)
        p = s % 16
        if r.kick[p] == "x":
            place(kick, pos, 0.9 * levels[0])
        if r.snare[p] == "x":
            place(snare, pos, 0.5 * levels[1])
        if r.hat[p] == "x":
            place(hat, pos, 0.35 * levels[2])
    scale = r.scale
    for b in range(int(seconds / bar) + 1):
        deg = r.progression[b % len(r.progression)]
        root = key + scale[deg % len(scale)] + 12 * (deg // len(scale))
        triad = [root + scale[(deg + k) % len(scale)] - scale[deg % len(scale)] + 12 * ((deg + k) // len(scale) - deg // len(scale)) for k in (0, 2, 4)]
        start = b * bar
        if r.chord_voice != "none":
            if r.chord_voice == "skank":
                hits = [start + (2 * i + 1) * 4 * step / 2 for i in range(4)]
                dur = step * 1.5
            elif r.chord_voice in ("pluck", "piano"):
                hits = [start + i * 4 * step for i in range(4)]
                dur = 4 * step
            else:
                hits, dur = [start], bar
            for h in hits:
                m = int(dur * sr)
                chord = sum(_tone(_midi_hz(note + 12 * (r.octave - 4)), m, sr, r.chord_voice, rng) for note in triad)
                envl = _env(m, sr, 0.3 if r.chord_voice in ("pad", "organ") else 0.005, dur * (2 if r.chord_voice in ("pad", "organ") else 0.6))
                place(0.12 * chord * envl, h, levels[3])
        if r.bass_voice != "none":
            notes = [root - 12 + (scale[(i * 2) % len(scale)] if r.bass_voice == "walk" else 0) for i in range(4)]
            for i, note in enumerate(notes):
                m = int(4 * step * sr)
                place(0.3 * _tone(_midi_hz(note), m, sr, r.bass_voice, rng) * _env(m, sr, 0.005, 4 * step), start + i * 4 * step, levels[4])
    if r.distortion > 0:
        out = np.tanh(out * (1 + 8 * r.distortion)) / np.tanh(1 + 8 * r.distortion)
    out += rng.standard_normal(n) * 0.003
    peak = np.max(np.abs(out)) or 1.0
    out *= rng.uniform(0.5, 0.9) / peak
    pan = rng.uniform(0.85, 1.0)
    return np.stack([out * pan, out * (2 - pan) / 1.15], axis=1).astype(np.float32)


def write_audio(path: str, audio: np.ndarray, sr: int, *, block: int = 32768, fmt: str | None = None, subtype: str | None = None) -> None:
    """Write audio in blocks (atomically: temporary name, then rename)."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt is None:
        if ext not in FORMATS:
            raise ValueError(f"unknown audio extension {ext!r}; known: {sorted(FORMATS)}")
        fmt, subtype = FORMATS[ext]
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}")
    with sf.SoundFile(tmp, "w", sr, audio.shape[1], format=fmt, subtype=subtype) as f:
        for i in range(0, audio.shape[0], block):
            f.write(audio[i:i + block])
    os.replace(tmp, path)


def make_sample_collection(out: str, *, genres: int = 4, tracks_per_genre: int = 8, seconds: float = 30.0,
                           sr: int = 44100, formats: tuple[str, ...] = ("mp3", "wav", "flac", "ogg"),
                           seed: int = 0) -> list[str]:
    """Write ``OUT/<genre>/<genre>_NNN.<ext>`` files; returns their paths."""
    if not 1 <= genres <= len(GENRES):
        raise ValueError(f"genres must be between 1 and {len(GENRES)}, got {genres}")
    if tracks_per_genre < 1:
        raise ValueError(f"tracks_per_genre must be >= 1, got {tracks_per_genre}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; known: {sorted(FORMATS)}")
    paths = []
    for g, name in enumerate(list(GENRES)[:genres]):
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(tracks_per_genre):
            ext = formats[(g + i) % len(formats)]
            path = os.path.join(folder, f"{name}_{i:03d}.{ext}")
            if not os.path.exists(path):
                audio = synthesize(name, seconds, sr=sr, seed=seed * 100003 + g * 1009 + i)
                write_audio(path, audio, sr)
            paths.append(path)
    return paths


#: how people spell each genre in their tags (the first is the vocabulary's name; the others merge through
#: its aliases, or normalise alike)
SPELLINGS: dict[str, tuple[str, ...]] = {
    "rock": ("Rock", "rock", "Rock & Roll", "ROCK"),
    "electronic": ("Electronic", "electronic", "Electronica", "Electro"),
    "jazz": ("Jazz", "jazz", "JAZZ", "Jazz "),
    "classical": ("Classical", "classical", "Klassik", "Classical Music"),
    "hiphop": ("Hip-Hop", "Hip Hop", "hiphop", "Rap"),
    "reggae": ("Reggae", "reggae", "Roots Reggae", "REGGAE"),
    "metal": ("Metal", "metal", "Heavy Metal", "METAL"),
    "ambient": ("Ambient", "ambient", "Chillout", "AMBIENT"),
    "country": ("Country", "country", "Country & Western", "COUNTRY"),
    "blues": ("Blues", "blues", "Delta Blues", "BLUES"),
}
#: the tag a few tagged albums carry that says nothing (the vocabulary drops it)
UNKNOWN_TAG = "Unknown"


def TAGGED_VOCABULARY(genres: list[str]) -> str:  # noqa: N802 - a constant's text, made for the genres used
    """A vocabulary file (TOML) merging every spelling of :data:`SPELLINGS` of ``genres`` and dropping ``Unknown``."""
    lines = ["# genrecls vocabulary: the genres of this library and how its tags spell them", f'drop = ["{UNKNOWN_TAG}"]', ""]
    for g in genres:
        name, *others = SPELLINGS[g]
        lines += [f'[genres."{name}"]', "aliases = [" + ", ".join(f'"{o.strip()}"' for o in others) + "]", ""]
    return "\n".join(lines)


def write_person_tags(path: str, *, genre: list[str] | None = None, album: str | None = None, artist: str | None = None,
                      title: str | None = None) -> None:
    """Write tags as a person's tagger would (no genrecls provenance): genre(s), album, artist and album artist,
    title; MP3 and WAV get ID3v2.4, FLAC and Ogg Vorbis comments."""
    import mutagen
    from mutagen.id3 import ID3, TALB, TCON, TIT2, TPE1, TPE2

    ext = os.path.splitext(path)[1].lower()
    if ext in (".mp3", ".wav"):
        f = mutagen.File(path)
        if f.tags is None:
            f.add_tags()
        tags: ID3 = f.tags
        for frame, value in ((TCON, genre), (TALB, album), (TPE1, artist), (TPE2, artist), (TIT2, title)):
            if value:
                tags.add(frame(encoding=3, text=list(value) if isinstance(value, list) else [value]))
        f.save()
    else:
        f = mutagen.File(path)
        for key, value in (("genre", genre), ("album", album), ("artist", artist), ("albumartist", artist),
                           ("title", title)):
            if value:
                f[key] = list(value) if isinstance(value, list) else [value]
        f.save()


def make_tagged_library(out: str, *, genres: int = 4, artists_per_genre: int = 3, albums_per_artist: int = 1,
                        tracks_per_album: int = 4, seconds: float = 20.0, tagged: float = 0.7, unknown: float = 0.1,
                        mistagged: int = 0, sr: int = 44100, formats: tuple[str, ...] = ("mp3", "flac", "ogg", "wav"),
                        seed: int = 0) -> dict[str, dict]:
    """A library as people keep one: ``OUT/<Artist>/<Album>/<NN> <Title>.<ext>``, every file with its album, artist
    and title tags, ``tagged`` of each genre's albums (rounded, at least one) with a genre tag in one of the genre's
    :data:`SPELLINGS` (every ``1/unknown``-th tagged album ``Unknown`` instead, never a genre's only labelled one),
    the rest with no genre; ``mistagged`` tracks (the first track of as many tagged albums, from the last genre back)
    carry another genre's tag instead, as a person's slip would.  Each artist plays one genre.

    Returns path (relative) -> ``{"genre": the true genre, "tag": the genre tag written or None, "album": ...,
    "artist": ...}``: the answer key of demos, tests and benches.
    """
    rng = np.random.default_rng(seed)
    names = list(GENRES)[:genres]
    per_genre = artists_per_genre * albums_per_artist
    n_tagged = min(per_genre, max(1, round(tagged * per_genre))) if tagged > 0 else 0
    every = max(1, round(1 / unknown)) if unknown > 0 else 0
    truth: dict[str, dict] = {}
    n = seen_tagged = 0
    for g, genre in enumerate(names):
        chosen = set(rng.permutation(per_genre)[:n_tagged].tolist())  # which of the genre's albums carry a tag
        labelled = 0
        for a in range(artists_per_genre):
            artist = f"Artist {g * artists_per_genre + a + 1:02d}"
            for b in range(albums_per_artist):
                album = f"Album {chr(65 + b)} of {artist}"
                tag = None
                if a * albums_per_artist + b in chosen:
                    seen_tagged += 1
                    last = labelled == 0 and a * albums_per_artist + b == max(chosen)  # keep one labelled album
                    if every and seen_tagged % every == 0 and not last:
                        tag = UNKNOWN_TAG
                    else:
                        tag = SPELLINGS[genre][int(rng.integers(len(SPELLINGS[genre])))]
                        labelled += 1
                for t in range(tracks_per_album):
                    ext = formats[n % len(formats)]
                    n += 1
                    rel = f"{artist}/{album}/{t + 1:02d} Track {t + 1}.{ext}"
                    path = os.path.join(out, rel)
                    if not os.path.exists(path):
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        audio = synthesize(genre, seconds, sr=sr, seed=seed * 100003 + n * 7919 + g)
                        write_audio(path, audio, sr)
                        write_person_tags(path, genre=[tag] if tag else None, album=album, artist=artist,
                                          title=f"Track {t + 1}")
                    truth[rel] = {"genre": genre, "tag": tag, "album": album, "artist": artist}
    if mistagged:  # a person's slips: the first track of tagged albums of the last genres, tagged as the first genre
        slips = [r for r, v in sorted(truth.items(), key=lambda kv: (-names.index(kv[1]["genre"]), kv[0]))
                 if v["tag"] not in (None, UNKNOWN_TAG) and v["genre"] != names[0] and r.split("/")[2].startswith("01 ")]
        for rel in slips[:mistagged]:
            wrong = SPELLINGS[names[0]][0]
            write_person_tags(os.path.join(out, rel), genre=[wrong])
            truth[rel] = {**truth[rel], "tag": wrong, "mistagged": True}
    return truth
