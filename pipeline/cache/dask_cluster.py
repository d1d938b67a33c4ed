"""Dask cluster helpers: a machine-sized LocalCluster (or an existing scheduler), per-worker devices, and
running a list of independent jobs with retries and a live progress bar.

Workers are plain Dask workers; anything heavy they need (a teacher model, an open dataset) is cached per
process by the task code itself, so a restarted worker simply loads it again.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import dask
import psutil  # ships with dask.distributed
import torch
from distributed import Client, WorkerPlugin, as_completed, get_worker

from pipeline.progress import progress_bar


class TorchThreads(WorkerPlugin):
    """Give each worker process its share of the CPU cores, so that N workers do not oversubscribe."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))

    def setup(self, worker) -> None:
        torch.set_num_threads(self.threads)


def default_workers() -> int:
    """One worker per GPU; on CPU-only machines one worker per 4 cores (torch uses the cores inside)."""
    gpus = torch.cuda.device_count()
    return gpus if gpus > 0 else max(1, (os.cpu_count() or 1) // 4)


def make_client(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    torch_threads: int | None = None,
    **cluster_kwargs: Any,
) -> Client:
    """Connect to `scheduler` (e.g. tcp://host:8786) or start a LocalCluster that `client.close()` shuts down.

    The local cluster has `n_workers` workers (default: one per GPU, else CPU-sized), each running
    `threads_per_worker` tasks at a time with `torch_threads` intra-op threads (default: cores / workers).
    """
    if scheduler:
        try:
            return Client(scheduler, timeout="30s")
        except OSError as error:
            from pipeline.errors import PipelineError

            raise PipelineError(f"cannot reach Dask scheduler {scheduler}: {error}") from None
    n_workers = n_workers or default_workers()
    cluster_kwargs.setdefault("dashboard_address", None)  # no fixed port to collide with
    scratch = str(scratch_directory())
    cluster_kwargs.setdefault("local_directory", scratch)
    dask.config.set({"temporary-directory": scratch})  # the scheduler's and the locks' folder too
    client = Client(
        n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes, **cluster_kwargs
    )
    if processes:
        threads = torch_threads or max(1, (os.cpu_count() or 1) // n_workers)
        client.register_plugin(TorchThreads(threads), name="ekd-torch-threads")
    return client


SCRATCH_PREFIX = "ekd-dask-"


def scratch_directory() -> Path:
    """A folder of this process's own for the cluster's scratch (Dask's locks, spilled data, the scheduler's
    files), instead of `dask-scratch-space/` left in the system temporary folder: removed when this process
    exits, and those of killed runs (their process gone) removed here, at the next run."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{SCRATCH_PREFIX}*"):
        pid = old.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, True)  # after success and after a failure
    return folder


def worker_index() -> int | None:
    """This process's index among a LocalCluster's workers (their names are 0..n-1), else None."""
    try:
        name = get_worker().name
    except ValueError:  # not inside a Dask worker
        return None
    return name if isinstance(name, int) else (int(name) if str(name).isdigit() else None)


def pick_device(device: str) -> str:
    """Resolve "auto" and, on multi-GPU Dask workers, give worker i the GPU i % count."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        index = worker_index()
        count = torch.cuda.device_count()
        if index is not None and count > 1:
            device = f"cuda:{index % count}"
            torch.cuda.set_device(device)
    return device


def run_jobs(
    client: Client,
    function: Callable,
    jobs: Sequence,
    weight: Callable[[Any], int],
    desc: str,
    unit: str = "img",
    retries: int = 3,
    on_result: Callable[[Any, Any], None] | None = None,
) -> list:
    """Run `function(job)` for every job on the cluster, in any order; results come back in job order.

    A job whose worker dies or raises is retried (`retries` times, and the scheduler reschedules work lost
    with a worker); the progress bar counts `weight(job)` units per finished job (images/s and ETA).
    On a final failure the remaining jobs are cancelled and the exception propagates.
    """
    futures = [client.submit(function, job, retries=retries, pure=False) for job in jobs]
    position = {future.key: i for i, future in enumerate(futures)}
    results: list = [None] * len(jobs)
    total = sum(weight(job) for job in jobs)
    try:
        with progress_bar(total=total, desc=desc, unit=unit, unit_scale=True) as bar:
            for future in as_completed(futures):
                i = position[future.key]
                results[i] = future.result()
                if on_result is not None:
                    on_result(jobs[i], results[i])
                bar.update(weight(jobs[i]))
    finally:
        client.cancel([f for f in futures if not f.done()])
    return results
