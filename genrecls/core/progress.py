"""Progress: one live line (tracks done/total, audio hours, rate, ETA) and a final summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_duration", "format_table"]


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """A progress line redrawn in place on a terminal, printed every ``interval`` seconds otherwise."""

    def __init__(self, total: int, what: str = "tracks", stream: TextIO | None = None,
                 enabled: bool = True, interval: float | None = None):
        self.total = total
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.start = time.monotonic()
        self.done = 0
        self.failed = 0
        self.audio_seconds = 0.0
        self._last: float | None = None  # when the last line was drawn; None: the first update draws
        self._drawn: tuple | None = None  # (done, failed) last printed: close() does not repeat it

    def update(self, done: int = 0, failed: int = 0, audio_seconds: float = 0.0) -> None:
        self.done += done
        self.failed += failed
        self.audio_seconds += audio_seconds
        now = time.monotonic()
        if self.enabled and (self._last is None or now - self._last >= self.interval):
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.done}/{self.total} {self.what} ({pct:.0f}%), {self.failed} failed, "
                f"{self.audio_seconds / 3600:.2f} h audio, {rate:.1f} {self.what}/s, "
                f"{self.audio_seconds / elapsed:.0f}x real time, elapsed {format_duration(elapsed)}, "
                f"ETA {format_duration(eta) if self.done < self.total else '0s'}")

    def _draw(self, final: bool) -> None:
        if final and not self.tty and self._drawn == (self.done, self.failed):
            return  # the last line printed already shows the final counts
        self._drawn = (self.done, self.failed)
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def format_table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    """A plain aligned text table."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j and c.replace(".", "", 1).replace("%", "").isdigit() else c.ljust(w)
                               for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
