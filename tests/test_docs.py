"""The docs check: every ``genrecls`` command line in the README and ``docs/*.md`` is one the CLI takes.

Each command of a fenced code block (``genrecls ...``, ``.venv/bin/genrecls ...``, ``python jobs/<name>.py ...``,
continued lines and ``&&`` chains included) is parsed by the real argument parser, and every
``--set SECTION.KEY=VALUE`` by the real configuration: a renamed flag, a removed command or a
configuration key that no longer exists fails here, not in a reader's terminal.  The examples
that run end to end are run by the tests of their command (named in each page).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: shell code blocks (other blocks hold layouts, TOML, Python)
FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
REDIRECT = re.compile(r"^(\d?>>?|<|\d>&\d)")


def commands(text: str) -> list[list[str]]:
    """The genrecls invocations of a page's code blocks, as argument lists (without the program)."""
    out = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|\||;", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                words = words[:next((i for i, w in enumerate(words) if REDIRECT.match(w) or w == "|"), len(words))]
                if "..." in words or any(w.startswith("[") for w in words):  # an abbreviation or a synopsis
                    continue
                for i, w in enumerate(words):
                    if w == "genrecls" or w.endswith("/genrecls"):
                        out.append(words[i + 1:])
                        break
                    if w.startswith("jobs/") and w.endswith(".py") and i > 0 and words[i - 1].endswith("python"):
                        out.append([Path(w).stem, *words[i + 1:]])
                        break
    return [c for c in out if c and not c[0].startswith("<")]


CASES = [(page.relative_to(REPO).as_posix(), argv) for page in PAGES for argv in commands(page.read_text())]


def test_the_pages_hold_commands():
    assert len(CASES) >= 10 and {p for p, _ in CASES} >= {"README.md"}


@pytest.mark.parametrize("page,argv", CASES, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in CASES])
def test_every_documented_command_parses(page, argv):
    from genrecls.cli import build_parser
    from genrecls.core.config import Config

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return
        raise AssertionError(f"{page}: 'genrecls {' '.join(argv)}' is not a command the CLI takes") from None
    sets = list(getattr(args, "overrides", []) or [])
    if sets:
        Config().override(sets)  # raises ConfigError naming an unknown key
