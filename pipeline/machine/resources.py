"""What this machine can run: its CPU cores and free memory, the bound of every worker and thread option, and
the check that an allocation sized by the input fits before it is made.

A typo such as `--workers 100000` must not start processes until the kernel's OOM killer picks a victim (it
may pick someone else's job), and a `property` claiming 2e9 classes must not start allocating a 512 GB margin
head: both are refused with one line naming the option (or file) and what the machine has.
"""
from __future__ import annotations

import os
import resource
from typing import Any, Callable

from pipeline.errors import PipelineError

# Worker processes (DataLoader, Dask, rendering pools) per CPU core, and at least PROCESSES_FLOOR: more only
# queue for the cores, and each holds its own copy of the model or dataset handles (~250 MB).
PROCESSES_PER_CORE, PROCESSES_FLOOR = 4, 8
# Threads (torch intra-op, JPEG decoding) per CPU core, and at least THREADS_FLOOR (a thread count that changes
# a result, extract-teacher's --threads, must stay reproducible on a smaller machine).
THREADS_PER_CORE, THREADS_FLOOR = 2, 16


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def available_memory() -> int:
    """Bytes this process could still allocate: the system's available memory, and no more than what its
    address-space limit (ulimit -v, RLIMIT_AS) leaves."""
    try:
        import psutil  # ships with dask.distributed

        free = int(psutil.virtual_memory().available)
    except ImportError:
        free = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, max(0, limit - _address_space()))
    return free


def _address_space() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def size_text(nbytes: float) -> str:
    """1.5 GiB, 512 MiB, ... (binary units, as `free -h`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def require_memory(what: str, nbytes: int) -> None:
    """Refuse (one line naming `what`: the option or file that sized it) an allocation of `nbytes` that does
    not fit in the memory this process has left; called before the allocation is made."""
    free = available_memory()
    if nbytes > free:
        raise PipelineError(f"{what}: needs {size_text(nbytes)} of memory, more than the {size_text(free)} "
                            "available on this machine")


def core_cap(per_core: int, floor: int) -> int:
    """The most workers (or threads) allowed here: `per_core` per CPU core, and at least `floor`."""
    return max(floor, per_core * cpu_cores())


def within_cores(per_core: int, floor: int, kind: str) -> Callable[[str, Any], None]:
    """A setting's `validate`: at most `core_cap(per_core, floor)` (`kind`: 'processes', 'threads')."""

    def validate(option: str, value: Any) -> None:
        cap = core_cap(per_core, floor)
        if isinstance(value, int) and value > cap:
            raise PipelineError(f"{option} {value}: more {kind} than this machine can run (at most {cap}: "
                                f"{per_core} per CPU core of {cpu_cores()}, at least {floor})")

    return validate


# The `validate` of every option that starts processes or threads.
processes_bound = within_cores(PROCESSES_PER_CORE, PROCESSES_FLOOR, "processes")
threads_bound = within_cores(THREADS_PER_CORE, THREADS_FLOOR, "threads")
