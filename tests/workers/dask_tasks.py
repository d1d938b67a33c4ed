"""Shard tasks for the Dask tests of tests/cache/test_extract.py. They run inside Dask worker processes, which import
them from here by name (`workers.dask_tasks`), so they cannot live in a test module."""
from __future__ import annotations

import os
from pathlib import Path


def exit_once_then_run(marker: str, job):
    """Dask shard task that kills its worker process (os._exit) the first time it runs shard 1."""
    from pipeline.cache.worker import run_shard

    if job.shard.index == 1 and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        # leave a half-written shard behind, as a worker dying in the middle of the write would
        job.shard.path.with_name(job.shard.path.name + ".tmp-deadbeef").write_bytes(b"\x89HDF\r\n")
        os._exit(17)
    return run_shard(job)
