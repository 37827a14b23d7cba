"""Progress output off a terminal: whole lines at the start, periodically, and at the end."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from irm_lens import _progress
from irm_lens._progress import LineProgress, progress_bar


def test_off_a_terminal_a_stage_is_two_lines(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(_progress.sys, "stderr", err)
    assert list(progress_bar(range(5), "counting", unit="n")) == [0, 1, 2, 3, 4]
    lines = err.getvalue().splitlines()
    assert lines[0] == "counting: started (0/5 n)"
    assert lines[1].startswith("counting: done, 5/5 n in ") and len(lines) == 2


def test_long_stages_report_every_interval(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", err)
    clock = iter(range(0, 1000, 25))  # 25 s per step
    monkeypatch.setattr(_progress.time, "monotonic", lambda: float(next(clock)))
    with LineProgress(desc="training", total=6, unit="step") as bar:
        for _ in range(6):
            bar.update()
            bar.set_postfix(loss="1.5")
    lines = err.getvalue().splitlines()
    # started at 0 s; steps end at 25..150 s: a line at 75 s and 150 s (60 s apart at least)
    assert lines[1:3] == ["training: 3/6 step, 75 s; loss=1.5", "training: 6/6 step, 150 s; loss=1.5"]
    assert lines[-1] == "training: done, 6/6 step in 175 s; loss=1.5" and len(lines) == 4


def test_a_stage_an_exception_stops_says_where_and_why(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", err)
    clock = iter([0.0, 0.0, 3.0])  # started at 0 s; one update; stopped at 3 s
    monkeypatch.setattr(_progress.time, "monotonic", lambda: next(clock))
    try:
        with LineProgress(desc="norm-scale split", total=32, unit="pass") as bar:
            bar.update(4)
            raise ValueError("diverged")
    except ValueError:
        pass
    lines = err.getvalue().splitlines()
    assert lines[-1] == "norm-scale split: stopped at 4/32 pass after 3 s (ValueError)"
    assert len(lines) == 2 and not any("done" in line for line in lines)


def test_on_a_terminal_it_is_tqdm(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(_progress.sys, "stderr", Tty())
    assert isinstance(progress_bar(range(2), "x"), tqdm)
    assert isinstance(progress_bar(range(2), "x", disable=True), tqdm)  # silent either way
