"""The genre and provenance fields of an audio file, read and written through mutagen (no parser here).

Pure functions on one file, no Ray: :mod:`genrecls.jobs.tagging` (the ``genrecls tag`` job) calls
them on a copy of a library file.  What each format gets:

=========  ====================  ==================================  ============================
format     genre field           multi-valued as                     provenance field
=========  ====================  ==================================  ============================
mp3        ID3v2 ``TCON``        v2.4: one frame, NUL-separated      ``TXXX:GENRECLS_GENRE``
                                 values; v2.3: joined by a separator
aiff, wav  ``TCON`` in the ID3   as mp3                              ``TXXX:GENRECLS_GENRE``
           chunk
flac, ogg  Vorbis ``GENRE``      one ``GENRE=`` comment per value    ``GENRECLS_GENRE``
(Vorbis),
opus
mp4 / m4a  ``©gen``              one ``data`` atom per value         ``----:org.genrecls:GENRECLS_GENRE``
                                                                     (freeform, UTF-8)
asf (wma)  ``WM/Genre``          one attribute per value             ``GENRECLS_GENRE``
=========  ====================  ==================================  ============================

Genres are always text (never ID3v1 numeric codes; a numeric ``TCON`` such as ``(8)`` or
an MP4 ``gnre`` atom reads as its name, and ``gnre`` is removed when ``©gen`` is written).
An ID3 tag keeps its version: a new tag is v2.4, an existing v2.3 tag stays v2.3 (so that
none of its other frames are converted), unless v2.3 is asked for (``id3v23``).

Values are JSON-friendly: a file's fields are ``{key: [value, ...] or None}`` (None: the
field is absent), the form the journal stores and :func:`write_fields` takes, so undo writes
back exactly what :func:`read_fields` read.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, NamedTuple

__all__ = ["PROVENANCE", "FORMATS", "TagError", "open_tags", "genre_key", "provenance_key", "read_fields",
           "current_genres", "read_provenance", "field", "touched", "new_fields", "write_fields", "id3_version", "foreign_genre",
           "ffmpeg_genre", "album_tags", "TrackTags", "read_track_tags", "person_genres",
           "TAG_SEPARATOR"]

#: the name of the provenance field (a TXXX description, a Vorbis comment, an ASF attribute)
PROVENANCE = "GENRECLS_GENRE"
#: the MP4 freeform atom of the provenance: ``----:<mean>:<name>``
MP4_PROVENANCE = f"----:org.genrecls:{PROVENANCE}"
#: format name -> (genre field, provenance field)
FORMATS: dict[str, tuple[str, str]] = {
    "mp3": ("TCON", f"TXXX:{PROVENANCE}"),
    "aiff": ("TCON", f"TXXX:{PROVENANCE}"),
    "wav": ("TCON", f"TXXX:{PROVENANCE}"),
    "flac": ("GENRE", PROVENANCE),
    "ogg": ("GENRE", PROVENANCE),
    "opus": ("GENRE", PROVENANCE),
    "mp4": ("©gen", MP4_PROVENANCE),
    "asf": ("WM/Genre", PROVENANCE),
}
ID3_FORMATS = {"mp3", "aiff", "wav"}
VORBIS_FORMATS = {"flac", "ogg", "opus"}
#: MP4's ID3v1 genre index (1-based), read as a genre and removed when ``©gen`` is written
MP4_GNRE = "gnre"


class TagError(Exception):
    """A file whose tags cannot be read or written: ``kind`` (``unsupported``, ``unparseable``) and a reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _classes() -> dict[type, str]:
    from mutagen.aiff import AIFF
    from mutagen.asf import ASF
    from mutagen.flac import FLAC
    from mutagen.mp3 import MP3
    from mutagen.mp4 import MP4
    from mutagen.oggopus import OggOpus
    from mutagen.oggvorbis import OggVorbis
    from mutagen.wave import WAVE

    return {MP3: "mp3", FLAC: "flac", OggVorbis: "ogg", OggOpus: "opus", MP4: "mp4", AIFF: "aiff", WAVE: "wav", ASF: "asf"}


def open_tags(path: str) -> tuple[str, Any]:
    """``(format, mutagen file)`` of ``path``, recognised by content (and name) among :data:`FORMATS`.

    Raises :class:`TagError`: ``unsupported`` for a file of another kind (raw AAC, APE,
    anything mutagen cannot write genres into), ``unparseable`` when the file's tags or
    headers cannot be parsed.  ``OSError`` (missing, permission) passes through.
    """
    import mutagen

    classes = _classes()
    try:
        audio = mutagen.File(path, options=list(classes))
    except mutagen.MutagenError as exc:
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno is not None:  # missing, permission denied: not the tags' fault
            raise cause from None
        raise TagError("unparseable", f"mutagen cannot parse this file's tags: {exc}") from None
    except (ValueError, KeyError, IndexError, EOFError, TypeError, UnicodeError) as exc:  # mutagen bugs on odd input
        raise TagError("unparseable", f"mutagen cannot parse this file's tags: {type(exc).__name__}: {exc}") from None
    if audio is None:
        raise TagError("unsupported", "not a format genrecls tag writes (MP3, FLAC, Ogg Vorbis, Opus, MP4/M4A, AIFF, "
                       "WAV, WMA)")
    return classes[type(audio)], audio


def genre_key(fmt: str) -> str:
    return FORMATS[fmt][0]


def provenance_key(fmt: str) -> str:
    return FORMATS[fmt][1]


def id3_version(audio: Any) -> str | None:
    """``"2.3"``, ``"2.4"``... of an ID3 file's tag; None without one (or not ID3)."""
    tags = getattr(audio, "tags", None)
    version = getattr(tags, "version", None)
    return f"{version[0]}.{version[1]}" if tags is not None and version else None


def read_fields(fmt: str, audio: Any) -> dict[str, list | None]:
    """The raw values of every field genrecls may touch in this file (None: absent)."""
    tags = audio.tags
    keys = [genre_key(fmt), provenance_key(fmt)] + ([MP4_GNRE] if fmt == "mp4" else [])
    out: dict[str, list | None] = {k: None for k in keys}
    if tags is None:
        return out
    for key in keys:
        if fmt in ID3_FORMATS:
            frames = tags.getall(key)
            values = [str(t) for f in frames for t in f.text]
        elif fmt in VORBIS_FORMATS:  # keys are case-insensitive: keep the file's own spelling (undo writes it back)
            pairs = [(k, v) for k, v in tags if k.lower() == key.lower()]
            values = [v for _, v in pairs]
            if pairs:
                del out[key]
                key = pairs[0][0]
        elif fmt == "mp4":
            raw = tags.get(key, [])
            values = ([int(v) for v in raw] if key == MP4_GNRE else
                      [bytes(v).decode("utf-8", "replace") for v in raw] if key.startswith("----") else [str(v) for v in raw])
        else:  # asf
            values = [str(v.value) if hasattr(v, "value") else str(v) for v in (tags[key] if key in tags else [])]
        out[key] = values if values else None
    return out


def field(fields: dict[str, list | None], key: str) -> list | None:
    """A field's values by its canonical name (Vorbis comment names match whatever their case)."""
    if key in fields:
        return fields[key]
    low = key.lower()
    return next((v for k, v in fields.items() if k.lower() == low), None)


def touched(fields: dict[str, list | None], keys: Iterable[str]) -> dict[str, list | None]:
    """The current values of the fields ``keys`` names, under the names the file spells them with."""
    out = {}
    for key in keys:
        spelled = key if key in fields else next((k for k in fields if k.lower() == key.lower()), key)
        out[spelled] = fields.get(spelled)
    return out


def current_genres(fmt: str, fields: dict[str, list | None], separator: str | None = None) -> list[str]:
    """The genres a player shows, as text: numeric ID3v1 codes and MP4 ``gnre`` read as names.

    ``separator`` splits values of an ID3v2.3 tag (which has one string per frame).
    """
    from mutagen.id3 import TCON

    values = field(fields, genre_key(fmt)) or []
    if fmt in ID3_FORMATS and values:
        values = TCON(encoding=3, text=values).genres
    if fmt == "mp4" and not values and fields.get(MP4_GNRE):
        values = [TCON.GENRES[g - 1] for g in fields[MP4_GNRE] if 0 < g <= len(TCON.GENRES)]
    if separator:
        values = [part.strip() for v in values for part in v.split(separator)]
    return [v for v in (str(v).strip() for v in values) if v]


def read_provenance(fmt: str, fields: dict[str, list | None]) -> dict[str, Any] | None:
    """The provenance genrecls wrote into the file (a dict), or None (none, or not genrecls's)."""
    values = field(fields, provenance_key(fmt)) or []
    for v in values:
        try:
            prov = json.loads(v)
        except ValueError:
            continue
        if isinstance(prov, dict) and isinstance(prov.get("written"), list) and isinstance(prov.get("genres"), list):
            return prov
    return None


def new_fields(fmt: str, genres: list[str], provenance: dict[str, Any]) -> dict[str, list | None]:
    """The fields to write for ``genres`` with this provenance (MP4: the numeric ``gnre`` goes)."""
    out: dict[str, list | None] = {genre_key(fmt): list(genres) or None,
                                   provenance_key(fmt): [json.dumps(provenance, sort_keys=True, separators=(",", ":"))]}
    if fmt == "mp4":
        out[MP4_GNRE] = None
    return out


def write_fields(path: str, fmt: str, fields: dict[str, list | None], *, id3v23: bool = False,
                 separator: str = "/", id3_version: str | None = None) -> str | None:
    """Set ``fields`` (None: delete) in the file at ``path`` and save it; returns the ID3 version written.

    ID3 formats: ``id3_version`` (``"2.3"``, ``"2.4"``) forces the version; otherwise v2.3 with
    ``id3v23`` or when the file's tag is v2.3 already, else v2.4.  ``separator`` joins multiple
    values in a v2.3 tag.  The file is rewritten in place by mutagen: call it on a copy
    (:mod:`genrecls.jobs.tagging` does).
    """
    found, audio = open_tags(path)
    if found != fmt:
        raise TagError("unparseable", f"the file now reads as {found}, not {fmt}")
    if audio.tags is None:
        audio.add_tags()
    tags = audio.tags
    for key, values in fields.items():
        if fmt in ID3_FORMATS:
            _set_id3(tags, key, values)
        elif fmt == "mp4":
            _set_mp4(tags, key, values)
        elif values is None:  # Vorbis comments, ASF attributes
            if key in tags:
                del tags[key]
        else:
            tags[key] = [str(v) for v in values]
    if fmt not in ID3_FORMATS:
        audio.save()
        return None
    if id3_version in ("2.3", "2.4"):
        version = int(id3_version[-1])
    else:
        version = 3 if id3v23 or tags.version[:2] == (2, 3) else 4  # add_tags() makes a v2.4 tag
    if version == 3:
        tags.update_to_v23()
    audio.save(v2_version=version, v23_sep=separator)
    return f"2.{version}"


def _set_id3(tags: Any, key: str, values: list | None) -> None:
    from mutagen.id3 import TCON, TXXX

    tags.delall(key)
    if values is None:
        return
    if key == "TCON":
        tags.add(TCON(encoding=3, text=[str(v) for v in values]))
    elif key.startswith("TXXX:"):
        tags.add(TXXX(encoding=3, desc=key[5:], text=[str(v) for v in values]))
    else:
        raise ValueError(f"genrecls does not write the ID3 frame {key}")


def _set_mp4(tags: Any, key: str, values: list | None) -> None:
    from mutagen.mp4 import AtomDataType, MP4FreeForm

    if values is None:
        if key in tags:
            del tags[key]
    elif key == MP4_GNRE:
        tags[key] = [int(v) for v in values]
    elif key.startswith("----"):
        tags[key] = [MP4FreeForm(str(v).encode("utf-8"), dataformat=AtomDataType.UTF8) for v in values]
    else:
        tags[key] = [str(v) for v in values]


def ffmpeg_genre(path: str) -> str | None:
    """The genre FFmpeg's metadata reader (through PyAV) sees in a file, container or stream level."""
    import av

    with av.open(path, metadata_errors="ignore") as c:
        meta = {k.lower(): v for k, v in c.metadata.items()}
        for s in c.streams.audio:
            meta.update({k.lower(): v for k, v in s.metadata.items() if k.lower() not in meta})
    return meta.get("genre") or None


def foreign_genre(path: str, fmt: str, fields: dict[str, list | None]) -> str | None:
    """A genre the file holds where mutagen cannot write it (a WAV's RIFF INFO ``IGNR``); None if none.

    FFmpeg reads both a WAV's INFO chunk and its ID3 chunk; a genre it sees that the ID3
    chunk does not hold lives in INFO, which genrecls could not change: writing an ID3 genre
    beside it would leave two disagreeing genres.
    """
    if fmt != "wav":
        return None
    seen = ffmpeg_genre(path)
    if not seen:
        return None
    own = field(fields, genre_key(fmt)) or []
    return None if seen in own or seen == ";".join(own) else seen


#: format -> (album field, album-artist field)
_ALBUM_FIELDS = {"mp3": ("TALB", "TPE2"), "aiff": ("TALB", "TPE2"), "wav": ("TALB", "TPE2"),
                 "flac": ("album", "albumartist"), "ogg": ("album", "albumartist"), "opus": ("album", "albumartist"),
                 "mp4": ("©alb", "aART"), "asf": ("WM/AlbumTitle", "WM/AlbumArtist")}


def album_tags(path: str) -> tuple[str | None, str | None]:
    """``(album, album artist)`` of a file's tags; None where a field is absent, empty or unreadable.

    A cheap read (mutagen parses the headers, no audio): classify's decoding tasks call it
    for every track, so that ``--group-by album`` can group a library's tracks by album.
    Never raises.
    """
    try:
        fmt, audio = open_tags(path)
        tags = audio.tags
        if tags is None:
            return None, None
        out = []
        for key in _ALBUM_FIELDS[fmt]:
            value = None
            if fmt in ID3_FORMATS:
                frame = tags.get(key)
                value = str(frame.text[0]) if frame is not None and frame.text else None
            elif fmt in VORBIS_FORMATS:
                got = tags.get(key) or (tags.get("album artist") if key == "albumartist" else None)
                value = str(got[0]) if got else None
            else:
                got = tags.get(key)
                value = str(got[0]) if got else None
            out.append(value.strip() or None if value is not None else None)
        return out[0], out[1]
    except Exception:  # a tag read never fails a track: it is grouped by its folder instead
        return None, None


#: joins the values of a multi-valued genre tag where one text holds them (the dataset's and predictions' ``genre_tag``)
TAG_SEPARATOR = "; "


class TrackTags(NamedTuple):
    """What ingest and classify read of a file's tags: ``album``, ``album_artist``, ``genres`` (the genres a
    person wrote, in the file's order) and ``by_genrecls`` (the genres genrecls wrote there, not a person's)."""

    album: str | None = None
    album_artist: str | None = None
    genres: tuple[str, ...] = ()
    by_genrecls: tuple[str, ...] = ()


def person_genres(fmt: str, fields: dict[str, list | None]) -> tuple[list[str], list[str]]:
    """``(a person's genres, genrecls's genres)`` of a file's fields.

    A genre genrecls wrote (its provenance field says so, and the genre field still holds what it
    wrote) is not a person's: a library never learns from its own predictions.  What a person
    had before genrecls added to it (``genrecls tag --add``) stays theirs; a field a person edited
    after genrecls wrote it is theirs whole.
    """
    prov = read_provenance(fmt, fields)
    sep = (prov or {}).get("sep") if fmt in ID3_FORMATS else None
    current = current_genres(fmt, fields, sep)
    if prov is not None and [str(g).strip() for g in current] == [str(g).strip() for g in prov["written"]]:
        ours = {str(g) for g in prov["genres"]}
        return [g for g in current if g not in ours], [g for g in current if g in ours]
    return current, []


def read_track_tags(path: str) -> TrackTags:
    """The album, album artist and a person's genres of a file (:class:`TrackTags`), in one cheap header read.

    Never raises: a file whose tags cannot be read has none (its folder groups it, it is unlabelled).
    """
    album, album_artist = album_tags(path)
    try:
        fmt, audio = open_tags(path)
        genres, ours = person_genres(fmt, read_fields(fmt, audio))
    except Exception:  # noqa: BLE001 - no tags, unparseable, unsupported: nothing a person wrote
        genres, ours = [], []
    return TrackTags(album, album_artist, tuple(genres), tuple(ours))
