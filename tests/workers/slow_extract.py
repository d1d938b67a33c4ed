"""The teacher-cache extraction of tests/cache/test_extract.py, slowed down so that the test can SIGKILL it at a
chosen point.

Run as `python tests/workers/slow_extract.py DATA TEACHER OUT SHARD_SIZE BATCH_SIZE DELAY`: an in-process
extraction with a sleep of DELAY seconds per teacher batch and per assembled shard. The sleeps only stretch
time; the code that runs is the real extraction and assembly. OUT.assembling appears once the merge starts.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run by path: sys.path[0] is tests/workers, and `helpers` lives in tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.teachers import quiet


def main(data: str, teacher: str, out: str, shard_size: int, batch_size: int, delay: float) -> None:
    import pipeline.cache.build as build
    import pipeline.cache.shards as shards
    import pipeline.cache.worker as extraction

    forward, assemble, real_open = extraction.forward_views, build.assemble, shards.open_hdf5
    assembling = []

    def slow_forward(*args, **kwargs):
        time.sleep(delay)
        return forward(*args, **kwargs)

    def flagged_assemble(*args, **kwargs):
        assembling.append(True)
        return assemble(*args, **kwargs)

    def slow_open(path):
        if assembling:  # the merge opening a shard
            Path(out + ".assembling").touch()  # tells the test that the merge is under way
            time.sleep(delay)
        return real_open(path)

    extraction.forward_views, build.assemble = slow_forward, flagged_assemble
    shards.open_hdf5 = slow_open
    cfg = build.ExtractionConfig(data=Path(data), teacher=Path(teacher), out=Path(out), shard_size=shard_size,
                                 batch_size=batch_size, device="cpu", threads=1)  # as tests/cache/test_extract.py's
    build.build_teacher_cache(cfg, log=quiet)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
