"""The progress bar: silent off a terminal, drawn on one."""

import io

from polyak._progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_silent_when_not_a_tty():
    s = io.StringIO()
    p = Progress(100, "x", stream=s, delay=0)
    p.update(100)
    p.close()
    assert s.getvalue() == ""


def test_drawn_on_a_tty_after_delay():
    s = FakeTTY()
    p = Progress(1000, "averaging", stream=s, delay=0)
    p._last_draw = -1.0
    p.update(500)
    p.close()
    out = s.getvalue()
    assert "averaging" in out and "%" in out and out.endswith("\n")


def test_disabled_flag():
    s = FakeTTY()
    p = Progress(10, stream=s, enabled=False, delay=0)
    p.update(10)
    p.close()
    assert s.getvalue() == ""
