"""The user's genre vocabulary: a TOML file that maps a model's labels onto the genres a library uses.

A model answers in its own labels (a trained run's, or the pretrained tagger's 50 tags);
a library speaks its own words.  A vocabulary file says how one becomes the other::

    # labels no genre names: "keep" them as genres of their own (the default) or "drop" them
    unlisted = "drop"
    # labels never answered
    drop = ["female vocalists", "00s", "sexy"]

    [genres.Rock]                      # one table per genre of yours
    from = ["rock", "classic rock"]    # the model's labels it takes: one is a rename, several a merge
    aliases = ["rock and roll"]        # other names of it (a label spelled so joins it, a parent may use them)
    parents = ["Guitar music"]         # broader genres (several allowed: a graph, no cycles)
    threshold = 0.3                    # by hand: list the genre when its probability reaches this

    [genres."Electro Swing"]
    from = ["electro swing"]
    parents = ["Swing", "Electronic"]  # rolls up to both

Rules, checked when the file is read against a model's labels (:func:`load_vocabulary`):

* a label belongs to at most one genre: named in one ``from`` list, or else by matching a
  genre's name or one of its aliases (letters and digits compared, case ignored:
  ``hiphop``, ``Hip-Hop`` and ``hip hop`` match), or else kept or dropped as ``unlisted`` says;
* **merge**: a genre's probability is the **sum** of its labels' for a softmax model (they
  exclude each other) and the **maximum** for independent tags (:meth:`Vocabulary.apply`);
  a dropped label's probability is no genre's;
* **parents** name genres of the file (or their aliases); a genre that takes no label is a
  category, seen only as a parent; ``parent_genres`` of a track is every ancestor of its genres;
* a wrong file is refused with :class:`VocabularyError`, whose message names the file and the
  line: TOML syntax, an unknown key, a label the model does not have (with the nearest
  names), a label in two genres, a parent that is no genre, a cycle of parents.

Pure Python, no TensorFlow.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genrecls.audio.tags import TAG_SEPARATOR

__all__ = [
    "EXAMPLE_VOCABULARIES",
    "TagVocabulary",
    "load_tag_vocabulary",
    "spelling_labels",
    "TAG_SEPARATOR",
    "labels_from_tags",
    "Vocabulary",
    "VocabularyError",
    "example_vocabulary",
    "identity_vocabulary",
    "load_vocabulary",
    "normalise_name",
]

#: vocabulary files shipped with the package (genrecls/models/vocabularies/)
EXAMPLE_VOCABULARIES = {"msd-tags-to-genres": "msd-tags-to-genres.toml"}
_TOP_KEYS = {"unlisted", "drop", "genres"}
_GENRE_KEYS = {"from", "aliases", "parents", "threshold"}


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and the line."""


def normalise_name(name: str) -> str:
    """What two names must share to match: their letters and digits, case folded (``Hip-Hop`` = ``hip hop``)."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def example_vocabulary(name: str = "msd-tags-to-genres") -> str:
    """The path of a shipped example vocabulary (:data:`EXAMPLE_VOCABULARIES`)."""
    if name not in EXAMPLE_VOCABULARIES:
        raise VocabularyError(f"no shipped vocabulary {name!r}; shipped: {', '.join(EXAMPLE_VOCABULARIES)}")
    return os.path.join(os.path.dirname(__file__), "vocabularies", EXAMPLE_VOCABULARIES[name])


# -- where each key and value of a TOML file is (tomllib gives values, not lines) ------------
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key_parts(line: str, pos: int) -> tuple[tuple[str, ...], int] | None:
    """A dotted TOML key starting at ``pos``: its parts and where it ends; None if there is none."""
    parts: list[str] = []
    while True:
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos >= len(line):
            return None
        ch = line[pos]
        if ch == '"':
            m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(line, pos)
            if not m:
                return None
            try:
                parts.append(tomllib.loads(f"k = {m.group(0)}")["k"])
            except tomllib.TOMLDecodeError:
                return None
        elif ch == "'":
            m = re.compile(r"'([^']*)'").match(line, pos)
            if not m:
                return None
            parts.append(m.group(1))
        else:
            m = _BARE.match(line, pos)
            if not m:
                return None
            parts.append(m.group(0))
        pos = m.end()
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == ".":
            pos += 1
            continue
        return tuple(parts), pos


class _Lines:
    """Line numbers of the keys of a TOML text (tables and ``key =`` lines), and of values inside a key's span."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.keys: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for i, line in enumerate(self.lines, 1):
            s = line.lstrip()
            if s.startswith("[") and not s.startswith("[["):
                got = _key_parts(s, 1)
                if got and got[1] < len(s) and s[got[1]] == "]":
                    table = got[0]
                    self.keys.setdefault(table, i)
                continue
            got = _key_parts(line, 0)
            if got and got[1] < len(line) and line[got[1]] == "=":
                self.keys.setdefault(table + got[0], i)
        self._starts = sorted(self.keys.values())

    def of(self, *path: str) -> int | None:
        """The line of a key (or of the nearest enclosing key found)."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.keys:
                return self.keys[path[:n]]
        return None

    def of_value(self, value: str, *path: str) -> int | None:
        """The line, within the key ``path``'s value, holding the string ``value``."""
        start = self.of(*path)
        if start is None:
            return None
        later = [s for s in self._starts if s > start]
        end = later[0] if later else len(self.lines) + 1
        pattern = re.compile(r"""(["'])""" + re.escape(value) + r"\1")
        for i in range(start, end):
            if pattern.search(self.lines[i - 1]):
                return i
        return start


# -- the vocabulary -------------------------------------------------------------------------
@dataclass(frozen=True)
class Vocabulary:
    """A model's labels mapped onto the user's genres (built by :func:`load_vocabulary` or :func:`identity_vocabulary`).

    ``genres``: the genres that take at least one label, in the file's order, then the labels
    kept as they are (model order): the columns of :meth:`apply`.  ``label_genre``: for each
    model label, the index of its genre in ``genres`` or -1 (dropped).  ``parents``: each
    genre's (and category's) parents.  ``thresholds``: per-genre thresholds set by hand.
    """

    labels: tuple[str, ...]
    genres: tuple[str, ...]
    label_genre: tuple[int, ...]
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    digest: str | None = None
    text: str | None = None

    @property
    def is_identity(self) -> bool:
        return self.source is None

    def genre_of(self, label: str) -> str | None:
        """The genre a model label answers as (None: dropped)."""
        g = self.label_genre[self.labels.index(label)]
        return self.genres[g] if g >= 0 else None

    def members(self, genre: str) -> list[str]:
        g = self.genres.index(genre)
        return [lab for lab, i in zip(self.labels, self.label_genre) if i == g]

    def matrix(self) -> np.ndarray:
        """(labels, genres) membership: 1 where a label belongs to a genre."""
        m = np.zeros((len(self.labels), len(self.genres)))
        for j, g in enumerate(self.label_genre):
            if g >= 0:
                m[j, g] = 1.0
        return m

    def apply(self, probs: Any, kind: str = "softmax") -> np.ndarray:
        """Genre probabilities (tracks, genres) of label probabilities (tracks, labels).

        ``softmax``: a genre's probability is the sum of its labels' (the labels exclude each
        other, so the sum is the probability that one of them is right); ``sigmoid``
        (independent tags): the maximum of its labels'.
        """
        p = np.asarray(probs, np.float64).reshape(-1, len(self.labels))
        if self.is_identity:
            return p.copy()
        if kind == "sigmoid":
            out = np.zeros((len(p), len(self.genres)))
            for j, g in enumerate(self.label_genre):
                if g >= 0:
                    out[:, g] = np.maximum(out[:, g], p[:, j])
            return out
        return p @ self.matrix()

    def ancestors(self, genre: str) -> list[str]:
        """Every ancestor of ``genre``, nearest first (parents in the file's order, then theirs)."""
        out: list[str] = []
        queue = list(self.parents.get(genre, ()))
        while queue:
            g = queue.pop(0)
            if g not in out and g != genre:
                out.append(g)
                queue.extend(self.parents.get(g, ()))
        return out

    def parent_genres(self, genres: Sequence[str]) -> list[str]:
        """The ancestors of a track's genres, in order, none twice and none of the genres themselves."""
        out: list[str] = []
        for g in genres:
            for a in self.ancestors(g):
                if a not in out and a not in genres:
                    out.append(a)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The vocabulary as a ``run.json`` / ``classify.json`` record (JSON)."""
        return {"source": self.source, "sha256": self.digest, "genres": list(self.genres),
                "map": {lab: (self.genres[g] if g >= 0 else None) for lab, g in zip(self.labels, self.label_genre)},
                "parents": {g: list(p) for g, p in self.parents.items()}, "thresholds": dict(self.thresholds)}


def identity_vocabulary(labels: Sequence[str]) -> Vocabulary:
    """The model's own labels, unchanged (no file)."""
    labels = tuple(labels)
    return Vocabulary(labels, labels, tuple(range(len(labels))))


def load_vocabulary(source: str | os.PathLike, labels: Sequence[str], *, text: str | None = None,
                    reserved: Sequence[str] = (), tag_labels: bool = False) -> Vocabulary:
    """Read a vocabulary file and check it against a model's ``labels``.

    Parameters
    ----------
    source : the file (its name is used in messages; with ``text``, only its name)
    labels : the model's labels, in output order
    text : the file's content, when it is not read from ``source`` (a copy kept in a run)
    reserved : words no genre may be called (the ``uncertain`` answer)
    tag_labels : the model's labels came from genre tags through this same file (``ingest --labels-from tags``):
        its ``from`` and ``drop`` entries then name tag spellings, and those that are no label of the model
        are not errors (the labels are its genres' names, or tag texts it kept)

    Raises
    ------
    VocabularyError
        naming the file and the line of the first problem.
    """
    name, text, data = _read_toml(source, text)
    return _Builder(name, text, data, tuple(labels), tuple(reserved), tag_labels).build()


def _read_toml(source: str | os.PathLike, text: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """A vocabulary file's name, text and parsed TOML; :class:`VocabularyError` naming the file (and the line)."""
    name = str(source)
    if text is None:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file {name} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabularyError(f"cannot read vocabulary file {name}: {exc}") from None
    try:
        return name, text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        where = f" line {m.group(1)}:" if m else ""
        raise VocabularyError(f"{name}:{where} not valid TOML: {exc}") from None


class _Builder:
    def __init__(self, name: str, text: str, data: dict[str, Any], labels: tuple[str, ...], reserved: tuple[str, ...],
                 tag_labels: bool = False):
        self.name, self.text, self.data, self.labels, self.reserved = name, text, data, labels, reserved
        self.tag_labels = tag_labels
        self.lines = _Lines(text)
        self.by_fold: dict[str, list[str]] = {}
        for lab in labels:
            self.by_fold.setdefault(lab.casefold(), []).append(lab)

    def fail(self, line: int | None, msg: str) -> None:
        raise VocabularyError(f"{self.name}:{f' line {line}:' if line else ''} {msg}")

    def strings(self, value: Any, *path: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(self.lines.of(*path), f"{'.'.join(path)} must be a list of strings, got {value!r}")
        for v in value:
            if not v.strip():
                self.fail(self.lines.of(*path), f"{'.'.join(path)} holds an empty name")
        return list(value)

    def label(self, value: str, *path: str) -> str | None:
        """The model label ``value`` names (exact, else case-insensitive); refused when the model has none (None:
        a tag spelling, with ``tag_labels``)."""
        if value in self.labels:
            return value
        found = self.by_fold.get(value.casefold(), [])
        if len(found) == 1:
            return found[0]
        if self.tag_labels:
            return None
        near = difflib.get_close_matches(value, self.labels, n=3, cutoff=0.6)
        self.fail(self.lines.of_value(value, *path),
                  f"unknown label {value!r} in {'.'.join(path)}: the model has no such label"
                  + (f" (did you mean {', '.join(map(repr, near))}?)" if near else "")
                  + f"; its labels: {', '.join(self.labels[:60])}{' ...' if len(self.labels) > 60 else ''}")
        raise AssertionError  # unreachable

    def top_level(self) -> str:
        """The file's top-level keys checked; its ``unlisted`` setting."""
        for key in self.data:
            if key not in _TOP_KEYS:
                self.fail(self.lines.of(key), f"unknown key {key!r}; a vocabulary has {', '.join(sorted(_TOP_KEYS))}")
        unlisted = self.data.get("unlisted", "keep")
        if unlisted not in ("keep", "drop"):
            self.fail(self.lines.of("unlisted"), f"unlisted must be \"keep\" or \"drop\", got {unlisted!r}")
        return unlisted

    def build(self) -> Vocabulary:
        data, lines = self.data, self.lines
        unlisted = self.top_level()
        dropped: dict[str, int | None] = {}
        for v in self.strings(data.get("drop", []), "drop"):
            lab = self.label(v, "drop")
            if lab is not None:
                dropped[lab] = lines.of_value(v, "drop")
        table = data.get("genres", {})
        if not isinstance(table, dict):
            self.fail(lines.of("genres"), "genres must be tables: [genres.NAME] with from, aliases, parents, threshold")
        # the genres, their names and aliases
        names: list[str] = []
        spec: dict[str, dict[str, Any]] = {}
        folded: dict[str, str] = {}  # normalised name or alias -> genre
        for g, body in table.items():
            if not isinstance(body, dict):
                self.fail(lines.of("genres", g), f"genres.{g} must be a table (from, aliases, parents, threshold)")
            if not normalise_name(g):
                self.fail(lines.of("genres", g), f"genre name {g!r} has no letter or digit")
            if any(normalise_name(g) == normalise_name(r) for r in self.reserved):
                self.fail(lines.of("genres", g), f"{g!r} is the word of the uncertain answer (classify.uncertain_label); "
                          "call the genre something else")
            for key in body:
                if key not in _GENRE_KEYS:
                    self.fail(lines.of("genres", g, key), f"unknown key {key!r} in genres.{g}; a genre has "
                              f"{', '.join(sorted(_GENRE_KEYS))}")
            s = {"from": self.strings(body.get("from", []), "genres", g, "from"),
                 "aliases": self.strings(body.get("aliases", []), "genres", g, "aliases"),
                 "parents": self.strings(body.get("parents", []), "genres", g, "parents")}
            if "threshold" in body:
                t = body["threshold"]
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                    self.fail(lines.of("genres", g, "threshold"), f"genres.{g}.threshold must be a number in [0, 1], got {t!r}")
                s["threshold"] = float(t)
            for n in [g] + s["aliases"]:
                key = normalise_name(n)
                other = folded.get(key)
                if other is not None and other != g:
                    self.fail(lines.of_value(n, "genres", g, "aliases") if n != g else lines.of("genres", g),
                              f"{n!r} names two genres: {other!r} and {g!r}")
                folded[key] = g
            names.append(g)
            spec[g] = s
        # labels -> genres: from lists, then names and aliases, then `unlisted`
        owner: dict[str, str] = {}
        owner_line: dict[str, int | None] = {}
        for g in names:
            for v in spec[g]["from"]:
                lab = self.label(v, "genres", g, "from")
                if lab is None:
                    continue
                line = lines.of_value(v, "genres", g, "from")
                if lab in owner and owner[lab] != g:
                    self.fail(line, f"label {lab!r} is in two genres: {owner[lab]!r} (line {owner_line[lab]}) and {g!r}; "
                              "a label belongs to one genre (use parents to roll a genre up to several)")
                if lab in dropped:
                    self.fail(line, f"label {lab!r} is both dropped (line {dropped[lab]}) and taken by genre {g!r}")
                owner[lab], owner_line[lab] = g, line
        kept: list[str] = []
        for lab in self.labels:
            if lab in owner or lab in dropped:
                continue
            g = folded.get(normalise_name(lab))
            if g is not None:
                owner[lab] = g
            elif unlisted == "keep":
                kept.append(lab)
        # parents: names or aliases of genres of the file
        parents: dict[str, tuple[str, ...]] = {}
        for g in names:
            ps = []
            for p in spec[g]["parents"]:
                target = folded.get(normalise_name(p))
                if target is None:
                    near = difflib.get_close_matches(p, names, n=3, cutoff=0.6)
                    self.fail(lines.of_value(p, "genres", g, "parents"),
                              f"unknown parent {p!r} of {g!r}: a parent must be a genre of this file ([genres.NAME], "
                              "a table with no labels is a category)" + (f"; did you mean {', '.join(map(repr, near))}?" if near else ""))
                if target not in ps:
                    ps.append(target)
            if ps:
                parents[g] = tuple(ps)
        self.check_cycles(names, parents)
        with_labels = [g for g in names if g in set(owner.values())]
        is_parent = {p for ps in parents.values() for p in ps}
        for g in names:
            if g not in with_labels and g not in is_parent:
                self.fail(lines.of("genres", g), f"genre {g!r} takes no label of the model and is no genre's parent: "
                          "give it a `from` list or remove it")
        genres = tuple(with_labels + kept)
        index = {g: i for i, g in enumerate(genres)}
        label_genre = tuple(index[owner[lab]] if lab in owner else index.get(lab, -1) for lab in self.labels)
        thresholds = {g: spec[g]["threshold"] for g in names if "threshold" in spec[g] and g in index}
        digest = hashlib.sha256(self.text.encode()).hexdigest()
        return Vocabulary(self.labels, genres, label_genre, parents, thresholds, os.path.abspath(self.name)
                          if os.path.exists(self.name) else self.name, digest, self.text)

    def check_cycles(self, names: list[str], parents: dict[str, tuple[str, ...]]) -> None:
        state: dict[str, int] = {}
        path: list[str] = []

        def visit(g: str) -> None:
            state[g] = 1
            path.append(g)
            for p in parents.get(g, ()):
                if state.get(p) == 1:
                    cycle = path[path.index(p):] + [p]
                    self.fail(self.lines.of_value(p, "genres", g, "parents") if p != g else self.lines.of("genres", g, "parents"),
                              f"a cycle of parents: {' -> '.join(cycle)} (a genre cannot be its own ancestor)")
                if state.get(p) is None:
                    visit(p)
            path.pop()
            state[g] = 2

        for g in names:
            if state.get(g) is None:
                visit(g)


# -- the same file read for a library's genre tags (ingest --labels-from tags) ------------------
@dataclass(frozen=True)
class TagVocabulary:
    """The vocabulary file read for genre tags a person wrote: which tag text is which genre.

    A tag matches a genre by the genre's name, an alias or a ``from`` entry, letters and digits
    compared (``Hip Hop``, ``hip-hop`` and ``HIPHOP`` are one); a text in ``drop`` (compared the
    same way) leaves its file unlabelled, and so does any other text with ``unlisted = "drop"``
    (with ``keep``, the default, it is a genre of its own, spelled as most files spell it:
    :func:`spelling_labels`).  ``parents`` and ``threshold`` are the answers' (:func:`load_vocabulary`).
    """

    genres: tuple[str, ...]
    names: dict[str, str]
    dropped: frozenset[str]
    unlisted: str = "keep"
    source: str | None = None
    digest: str | None = None

    def label_of(self, text: str) -> tuple[str | None, str | None]:
        """``(genre, None)`` for a tag text, or ``(None, why)``: why it leaves its file unlabelled."""
        key = normalise_name(text)
        if not key:
            return None, "an empty genre tag"
        if key in self.names:
            return self.names[key], None
        if key in self.dropped:
            return None, f"dropped by the vocabulary: {text.strip()}"
        if self.unlisted == "drop":
            return None, f"not in the vocabulary (unlisted = \"drop\"): {text.strip()}"
        return text.strip(), None

    def first_label(self, texts: Sequence[str]) -> tuple[str | None, str | None]:
        """The label of a file's genre tags: the first value that names a genre (a file tagged ``Unknown; Jazz``
        is Jazz); else ``(None, why)`` of its first value, or ``"no genre tag"``."""
        why = None
        for t in texts:
            label, reason = self.label_of(t)
            if label is not None:
                return label, None
            why = why or reason
        return None, why or "no genre tag"


def load_tag_vocabulary(source: str | os.PathLike | None) -> TagVocabulary:
    """A vocabulary file (:func:`load_vocabulary`'s format) read for genre tags; None: no file (every tag text is
    a genre, spellings that normalise alike are one).  Raises :class:`VocabularyError` naming the file and line."""
    if source is None:
        return TagVocabulary((), {}, frozenset())
    name, text, data = _read_toml(source)
    return _TagBuilder(name, text, data, (), ()).build_tags()


class _TagBuilder(_Builder):
    """The file's checks, with tag texts where a model's labels would be."""

    def label(self, value: str, *path: str) -> str:
        return value

    def build_tags(self) -> TagVocabulary:
        data, lines = self.data, self.lines
        unlisted = self.top_level()
        dropped = {normalise_name(v): v for v in self.strings(data.get("drop", []), "drop")}
        table = data.get("genres", {})
        if not isinstance(table, dict):
            self.fail(lines.of("genres"), "genres must be tables: [genres.NAME] with from, aliases, parents, threshold")
        names: dict[str, str] = {}
        parents: dict[str, tuple[str, ...]] = {}
        for g, body in table.items():
            if not isinstance(body, dict):
                self.fail(lines.of("genres", g), f"genres.{g} must be a table (from, aliases, parents, threshold)")
            if not normalise_name(g):
                self.fail(lines.of("genres", g), f"genre name {g!r} has no letter or digit")
            for key in body:
                if key not in _GENRE_KEYS:
                    self.fail(lines.of("genres", g, key), f"unknown key {key!r} in genres.{g}; a genre has "
                              f"{', '.join(sorted(_GENRE_KEYS))}")
            spellings = [(g, None)] + [(v, k) for k in ("aliases", "from")
                                       for v in self.strings(body.get(k, []), "genres", g, k)]
            for text, k in spellings:
                key = normalise_name(text)
                line = lines.of_value(text, "genres", g, k) if k else lines.of("genres", g)
                if names.get(key, g) != g:
                    self.fail(line, f"{text!r} names two genres: {names[key]!r} and {g!r}")
                if key in dropped:
                    self.fail(line, f"{text!r} is both dropped (line {lines.of_value(dropped[key], 'drop')}) and a "
                              f"spelling of genre {g!r}")
                names[key] = g
            parents[g] = tuple(self.strings(body.get("parents", []), "genres", g, "parents"))
        for g, ps in parents.items():
            for p in ps:
                if normalise_name(p) not in names:
                    near = difflib.get_close_matches(p, list(table), n=3, cutoff=0.6)
                    self.fail(lines.of_value(p, "genres", g, "parents"), f"unknown parent {p!r} of {g!r}: a parent "
                              "must be a genre of this file" + (f"; did you mean {', '.join(map(repr, near))}?" if near else ""))
        self.check_cycles(list(table), {g: tuple(names[normalise_name(p)] for p in ps) for g, ps in parents.items()})
        digest = hashlib.sha256(self.text.encode()).hexdigest()
        return TagVocabulary(tuple(table), names, frozenset(dropped), unlisted,
                             os.path.abspath(self.name) if os.path.exists(self.name) else self.name, digest)


def spelling_labels(texts: Sequence[str]) -> dict[str, str]:
    """For genre tags of no vocabulary: each text -> the one spelling of its label, the spelling most of
    ``texts`` use among those that normalise alike (ties: the first in sorted order)."""
    counts: dict[str, dict[str, int]] = {}
    for t in texts:
        t = t.strip()
        counts.setdefault(normalise_name(t), {}).setdefault(t, 0)
        counts[normalise_name(t)][t] += 1
    best = {k: sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, v in counts.items()}
    return {t: best[normalise_name(t.strip())] for t in texts}


def labels_from_tags(genre_tags: dict[str, str | None], vocab: TagVocabulary) -> tuple[
        dict[str, str | None], dict[str, str], dict[str, list[str]]]:
    """The label of every track from the genres a person wrote (``genre_tags``: track -> its values joined by
    :data:`TAG_SEPARATOR`; ``""`` or None: none).

    A track's label is its first value that names a genre (:meth:`TagVocabulary.first_label`); a text no
    vocabulary genre names (``unlisted = "keep"``) is a genre of its own, spelled as most tracks spell it
    (:func:`spelling_labels` over the whole library, so ``Hip Hop``, ``hip-hop`` and ``HIPHOP`` are one).
    Returns ``(labels, why, merged)``: track -> label or None; track -> why it is unlabelled; label ->
    the other spellings merged into it.
    """
    first: dict[str, tuple[str | None, str | None]] = {}
    for tid, text in genre_tags.items():
        values = [v for v in (text or "").split(TAG_SEPARATOR) if v.strip()]
        first[tid] = vocab.first_label(values)
    named = set(vocab.genres)
    free = [label for label, _ in first.values() if label is not None and label not in named]
    spelled = spelling_labels(free)
    labels, why, merged = {}, {}, {}
    for tid, (label, reason) in first.items():
        if label is not None and label not in named:
            canonical = spelled[label.strip()]
            if canonical != label.strip():
                merged.setdefault(canonical, set()).add(label.strip())
            label = canonical
        labels[tid] = label
        if label is None:
            why[tid] = reason or "no genre tag"
    return labels, why, {k: sorted(v) for k, v in sorted(merged.items())}
