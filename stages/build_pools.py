"""`pipeline build-pools`: identity neighbours, hardest negative pairs and the teacher's exact global FPR
thresholds from the teacher cache (or an ensemble of caches: `--cache` repeated), into `pools.h5` and
`thresholds.json`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cache.ensemble import TeacherEnsemble
from pipeline.weights import parse_weights
from pipeline.storage.io import output_lock
from pipeline.search.checkpoint import ScanCheckpoint
from pipeline.search.pools import PoolsConfig, build_pools, describe, write_pools
from pipeline.settings import identity
from stages import options

SCAN_STATE = "pools.scan.npz"  # the running pair scan's position and state (removed once the pools are written)


def build_pools_command(
    cache: Annotated[list[Path], typer.Option("--cache", help="Teacher cache (HDF5) written by extract-teacher; "
                                              "repeat it for an ensemble of caches of the same training set "
                                              "(similarity: the weighted mean of the members' cosines).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for pools.h5 and thresholds.json.")],
    cfg: PoolsConfig,
    cache_weights: Annotated[Optional[str], typer.Option(
        "--cache-weights", help="Ensemble member weights, one per --cache, e.g. 1,2 (finite, > 0; default "
                                "equal).")] = None,
) -> None:
    """Build identity-neighbour and hard-negative pools and the teacher's exact FPR thresholds."""
    started = time.perf_counter()
    with output_lock(out):  # one build per folder; stale temporaries of killed builds go first
        caches = [cache] if isinstance(cache, (str, Path)) else list(cache)  # a call from Python may give one path
        source = TeacherEnsemble.open(caches, parse_weights(cache_weights, len(caches)))  # one cache: that cache
        # the pair scans save their position every few minutes: a killed build continues where it stopped, if
        # every identity setting of PoolsConfig (declared there) and the cache are the same
        checkpoint = ScanCheckpoint(out / SCAN_STATE, {"cache": source.fingerprint, **identity(cfg)})
        try:
            results = build_pools(source, config=cfg, progress=True, checkpoint=checkpoint)
            results.attrs.update(source.pool_attrs())  # the members of an ensemble
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
