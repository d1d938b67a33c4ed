"""`pipeline build-pools`: identity neighbours, hardest negative pairs and the teacher's exact global FPR
thresholds from the teacher cache, into `pools.h5` and `thresholds.json`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cache.format import TeacherCache
from pipeline.storage.io import output_lock
from pipeline.search.checkpoint import ScanCheckpoint
from pipeline.search.pools import PoolsConfig, build_pools, describe, write_pools
from pipeline.settings import identity
from stages import options

SCAN_STATE = "pools.scan.npz"  # the running pair scan's position and state (removed once the pools are written)


def build_pools_command(
    cache: Annotated[Path, typer.Option("--cache", help="Teacher cache (HDF5) written by extract-teacher.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for pools.h5 and thresholds.json.")],
    cfg: PoolsConfig,
) -> None:
    """Build identity-neighbour and hard-negative pools and the teacher's exact FPR thresholds."""
    started = time.perf_counter()
    with output_lock(out):  # one build per folder; stale temporaries of killed builds go first
        source = TeacherCache.open(cache)
        # the pair scans save their position every few minutes: a killed build continues where it stopped, if
        # every identity setting of PoolsConfig (declared there) and the cache are the same
        checkpoint = ScanCheckpoint(out / SCAN_STATE, {"cache": source.fingerprint, **identity(cfg)})
        try:
            results = build_pools(source, config=cfg, progress=True, checkpoint=checkpoint)
        finally:
            source.close()
        pools_path, thresholds_path = write_pools(out, results)
        checkpoint.clear()
    for scan, block in checkpoint.resumed_at.items():
        print(f"resumed the {scan} scan at block {block:,} from {out / SCAN_STATE}")
    print(f"wrote {pools_path} (centres {results.centres.shape[0]:,} x {results.centres.shape[1]}, "
          f"neighbours k={results.neighbours.shape[1]}, negative pairs m={results.neg_pairs.shape[0]:,})")
    print(f"wrote {thresholds_path}")
    print(describe(results, time.perf_counter() - started))


COMMANDS = {"build-pools": options.command(build_pools_command, cfg=PoolsConfig)}
