"""The progress line: counts, rate and ETA; a log (not a terminal) gets each state once."""

import io

from genrecls.core.progress import Progress, format_duration


def test_progress_lines_in_a_log():
    out = io.StringIO()
    bar = Progress(4, "tracks", stream=out, interval=0.0)
    bar.update(done=1, audio_seconds=3600)
    bar.update(done=3, failed=1)
    bar.close()  # the last update already printed 4/4: not printed again
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("1/4 tracks (25%), 0 failed, 1.00 h audio")
    assert lines[1].startswith("4/4 tracks (100%), 1 failed")
    assert lines[1].endswith("ETA 0s")


def test_progress_close_prints_the_final_state_once():
    out = io.StringIO()
    bar = Progress(10, "tracks", stream=out, interval=3600.0)
    bar.update(done=1)   # printed (first update)
    bar.update(done=9)   # within the interval: not printed
    bar.close()          # the final state, printed once
    lines = out.getvalue().splitlines()
    assert [ln.split(" ")[0] for ln in lines] == ["1/10", "10/10"], lines


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = Progress(2, stream=out, enabled=False, interval=0.0)
    bar.update(done=2)
    bar.close()
    assert out.getvalue() == ""


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(float("inf")) == "?"
