"""Running the pipeline and test workers in processes of their own: `python -m pipeline ...` exactly as a user
runs it (this checkout's code first on the path), and checks of what a failed command printed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "tests" / "workers"


def environment() -> dict[str, str]:
    """This process's environment with this checkout (and tests/, for the workers' helpers) first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def dead_pid() -> int:
    """The PID of a process that has ended (what a killed writer leaves in its temporaries' names)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_pipeline(*args, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a new process; text output captured."""
    command = [sys.executable, "-m", "pipeline", *map(str, args)]
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start_worker(name: str, *args) -> subprocess.Popen:
    """tests/workers/NAME.py ARGS in the background (stdout/stderr piped)."""
    command = [sys.executable, str(WORKERS / f"{name}.py"), *map(str, args)]
    return subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, expected: str, timeout: float = 60.0) -> None:
    """Block until the worker prints `expected` on a line of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip() == expected:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"worker ended before printing {expected!r}: {process.stderr.read()[-2000:]}")
    raise AssertionError(f"worker never printed {expected!r}")


def error_line(output: str) -> str:
    """The one `error: ...` line a refused command printed (asserting it is one line and no traceback)."""
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]
