"""benchmarks/scale.py's measuring harness: one pipeline command in a child process, timed, with its peak RSS,
its progress bar and an optional kill.

The child is forked from this process (which has imported torch and the CLI but run no torch op yet, so
no thread pool is copied): a stage starts in milliseconds instead of the 3-4 s of a fresh interpreter,
which keeps the --tiny test short and the timings free of import time. Its stdout/stderr go to a
pseudo-terminal, so tqdm draws its bar (rows/s, ETA) exactly as a user at a terminal sees it; the bar's
last state is parsed (`Progress`) and everything is appended to a log file.

Peak RSS: the child and all its descendants, summed, polled every `POLL_S` from /proc (psutil). RSS counts
resident pages of memory-mapped files too (the teacher cache under train-student), i.e. what the machine
must hold. Pages the child shares with this parent (the imported libraries, ~0.3-0.5 GB) are included, as
they would be in a fresh `pipeline` process.
"""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

POLL_S = 0.05
COLUMNS = 160
# tqdm's bar: "desc:  40%|####      | 400/1000 [00:10<00:15, 39.8batch/s]" (rate may be "s/batch")
BAR = re.compile(r"(?P<desc>[^\r\n|]*?):?\s+\d+%\|[^|]*\|\s*(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?)\s*"
                 r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+),\s*(?P<rate>[\d.?]+)\s*(?P<unit>[^\]]*)\]")


def _count(text: str) -> int:
    """tqdm's counts, unit-scaled ones included ("3.99k")."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1)
    return int(round(float(text.rstrip("kMG")) * scale))


@dataclass
class Progress:
    desc: str
    n: int
    total: int
    eta: str
    rate: str

    @classmethod
    def parse(cls, text: str) -> "Progress | None":
        match = BAR.search(text)
        if not match:
            return None
        return cls(match["desc"].strip(), _count(match["n"]), _count(match["total"]), match["eta"],
                   f"{match['rate']} {match['unit'].strip()}")


@dataclass
class Run:
    rc: int
    wall_s: float
    peak_rss: int
    killed: bool
    cpu_s: float = 0.0  # user + system CPU seconds of the child and its waited-for descendants
    bars: list[Progress] = field(default_factory=list)  # the last state of every distinct bar, in order
    first_bar: Progress | None = None
    first_bar_s: float | None = None  # seconds until the first bar appeared (the stage's set-up)
    firsts: dict = field(default_factory=dict)  # desc -> the first state seen of that bar (a resumed bar: n > 0)
    tail: str = ""


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _child(target: Callable[[], object], slave: int) -> None:
    os.setsid()
    os.dup2(slave, 1)
    os.dup2(slave, 2)
    code = 0
    try:
        target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit non-zero like an uncaught error would
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_child(target: Callable[[], object], log: Path, kill_after_s: float | None = None,
              kill_when: Callable[[Progress], bool] | None = None) -> Run:
    """Fork, run `target()` in the child with a terminal for output; SIGKILL it after `kill_after_s` or as
    soon as `kill_when(bar)` holds for a parsed progress bar."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))  # 0 columns: tqdm draws nothing
    log.parent.mkdir(parents=True, exist_ok=True)
    log_handle = open(log, "ab")
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(master)
        _child(target, slave)
    os.close(slave)
    state = {"buffer": "", "bars": {}, "first": None, "first_s": None, "order": [], "firsts": {}}
    lock = threading.Lock()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            log_handle.write(data)
            text = data.decode("utf-8", "replace")
            with lock:
                state["buffer"] = (state["buffer"] + text)[-20000:]
                for piece in re.split(r"[\r\n]", text):
                    bar = Progress.parse(piece)
                    if bar is None:
                        continue
                    if state["first"] is None:
                        state["first"], state["first_s"] = bar, time.perf_counter() - started
                    if bar.desc not in state["bars"]:
                        state["order"].append(bar.desc)
                        state["firsts"][bar.desc] = bar
                    state["bars"][bar.desc] = bar

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc = psutil.Process(pid)
    peak, killed, status, usage = 0, False, None, None
    while status is None:
        done, raw, usage = os.wait4(pid, os.WNOHANG)
        if done:
            status = raw
            break
        peak = max(peak, tree_rss(proc))
        elapsed = time.perf_counter() - started
        with lock:
            last = [state["bars"][d] for d in state["order"]]
        if not killed and ((kill_after_s is not None and elapsed > kill_after_s)
                           or (kill_when is not None and any(kill_when(b) for b in last))):
            os.killpg(pid, signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)
    wall = time.perf_counter() - started
    reader.join(timeout=5)
    os.close(master)
    log_handle.close()
    rc = os.waitstatus_to_exitcode(status)
    bars = [state["bars"][d] for d in state["order"]]
    return Run(rc, wall, peak, killed, usage.ru_utime + usage.ru_stime, bars, state["first"],
               state["first_s"], state["firsts"], state["buffer"][-3000:])


def pipeline_command(args: list[str]) -> Callable[[], object]:
    """A target that runs `pipeline ARGS` (the CLI's main) in the child."""
    def target() -> None:
        from pipeline.cli import main

        main([str(a) for a in args])
    return target


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
