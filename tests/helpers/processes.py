"""Running the pipeline and test workers in processes of their own: `python -m pipeline ...` exactly as a user
runs it (this checkout's code first on the path), workers under torchrun on CPU ranks, killing what a test
started, and checks of what a failed command printed."""
from __future__ import annotations

import os
import signal
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


def torchrun_environment() -> dict[str, str]:
    """`environment()` for a torchrun launch from a test: no variables of an enclosing torchrun, CPU only."""
    env = {k: v for k, v in environment().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def torchrun_command(*program, processes: int = 2) -> list[str]:
    """`torchrun --standalone` of `program` (a script and its arguments, or "-m", a module, ...) on CPU ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *map(str, program)]


def run_torchrun(*program, timeout: float = 240) -> None:
    """Run `program` under torchrun on 2 CPU ranks (gloo) to the end; asserts that it succeeded."""
    done = subprocess.run(torchrun_command(*program), env=torchrun_environment(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def start_torchrun(*program) -> subprocess.Popen:
    """`program` under torchrun on 2 CPU ranks in the background (stdout/stderr piped)."""
    return subprocess.Popen(torchrun_command(*program), env=torchrun_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process a test started and every process below it (torchrun starts its ranks in sessions of
    their own, so a process group would miss them), the deepest first; then reap it."""
    import psutil  # ships with dask.distributed

    for child in reversed(psutil.Process(process.pid).children(recursive=True)):
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()


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


def spawn_gloo(target, world: int, folder: Path, *args, preload: str, timeout_s: float = 120.0) -> None:
    """Run `target(rank, world, rendezvous file, *args)` on `world` gloo ranks to the end (a rendezvous file,
    so no port to pick); fails the test if they do not finish in time or one fails.

    A fork server (a fresh, single-threaded process) imports torch, DDP's dependencies and the module
    `preload` once and forks the ranks from there: safe like spawn, without paying the imports once per rank.
    """
    import pytest
    import torch.multiprocessing as mp

    mp.get_context("forkserver").set_forkserver_preload(["torch._dynamo", preload])
    context = mp.start_processes(target, args=(world, str(folder / "rendezvous"), *args), nprocs=world, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in time")
