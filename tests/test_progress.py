"""Progress where stderr is not a terminal (DVC, CI, a log file): whole timestamped lines at the configured
interval with count, rate and ETA; nothing for short loops; tqdm's bar at a terminal; checked on a fake clock
and on a real command whose stderr is a pipe."""
from __future__ import annotations

import io
import re

import pytest

from pipeline.errors import PipelineError
from pipeline.progress import SECONDS_VARIABLE, ProgressLines, progress_bar
from tests.helpers.processes import run_pipeline

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[\d.]+)\w+/s, (?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:?]+)(?P<postfix>.*)$")


NO_TOTAL = re.compile(r"^\[\d\d:\d\d:\d\d\] scan: \d+ row, [\d.]+\w*row/s, [\d:]+ elapsed$")  # the line format


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Captured:
    """stderr as pytest captures it: a stream that is not a terminal, as a log file."""

    def __init__(self, capsys):
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def log(monkeypatch, capsys):
    """stderr not a terminal, and tqdm on a clock the test moves."""
    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)
    monkeypatch.setenv(SECONDS_VARIABLE, "10")
    return Captured(capsys), clock


def test_a_long_loop_writes_one_line_per_interval_and_a_last_one(log):
    stream, clock = log
    bar = progress_bar(range(100), desc="extract-teacher", unit="img")
    assert isinstance(bar, ProgressLines)
    for step in bar:
        clock.now += 1.0  # one item per second: 100 s in all, a line every 10 s
        bar.set_postfix(loss=f"{step:.1f}")  # refreshes on every call in tqdm: must not print each time
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 9 <= len(lines) <= 11, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    counts = [int(m["n"]) for m in parsed]
    assert counts == sorted(counts) and counts[-1] == 100 and counts[0] <= 12
    assert {m["desc"] for m in parsed} == {"extract-teacher"} and {m["total"] for m in parsed} == {"100"}
    first = parsed[0]
    assert float(first["rate"]) == pytest.approx(1.0, rel=0.1)  # items per second on the fake clock
    remaining = 100 - int(first["n"])  # items left at exactly 1 item per fake second, as mm:ss
    assert first["eta"] == f"{remaining // 60:02d}:{remaining % 60:02d}"
    assert parsed[-1]["pct"] == "100" and "loss=" in parsed[-1]["postfix"]


def test_a_loop_shorter_than_the_interval_writes_nothing(log):
    stream, clock = log
    with progress_bar(total=50, desc="embed test.rec", unit="batch") as bar:
        for _ in range(50):
            clock.now += 0.1  # 5 s in all
            bar.update(1)
    assert stream.getvalue() == ""


def test_unknown_total_and_manual_updates(log):
    stream, clock = log
    with progress_bar(desc="scan", unit="row") as bar:
        for _ in range(30):
            clock.now += 1.0
            bar.update(1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(NO_TOTAL.match(line) for line in lines), lines
    assert lines[-1].split("scan: ")[1].startswith("30000 row")


def test_hidden_and_switched_off(log, monkeypatch):
    stream, clock = log
    for bar in (progress_bar(range(20), desc="other rank", show=False),):
        for _ in bar:
            clock.now += 5
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    for _ in progress_bar(range(20), desc="off"):
        clock.now += 5
    assert stream.getvalue() == ""


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_interval_is_one_line(log, monkeypatch, value):
    monkeypatch.setenv(SECONDS_VARIABLE, value)
    with pytest.raises(PipelineError, match=f"{SECONDS_VARIABLE}='{value}': must be a number >= 0 \\(seconds between"):
        progress_bar(range(3), desc="x")


def test_a_terminal_gets_the_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)  # set inside the test: pytest's capture re-sets it between phases
    for _ in progress_bar(range(5), desc="bar", unit="batch"):
        pass
    assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()


def test_a_command_logging_to_a_pipe_prints_lines(tmp_path, monkeypatch):
    """synthesize with stderr captured (as under dvc repro): its loops write plain progress lines."""
    monkeypatch.setenv(SECONDS_VARIABLE, "0.001")
    done = run_pipeline("synthesize", "--out", tmp_path / "s", "--identities", 12, "--images-per-identity", 5,
                        "--size", 32, "--val-identities", 20, "--val-pairs", 20, "--test-identities", 4,
                        "--test-images-per-identity", 3, "--monitor-identities", 0, "--ijb-identities", 0,
                        "--workers", 1)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert "\r" not in done.stderr
    train = [LINE.match(line) for line in lines if "] train: " in line]
    assert train and all(train), lines
    assert train[-1]["n"] == train[-1]["total"] == "60"
