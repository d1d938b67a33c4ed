"""`pipeline build-pools`: identity neighbours, hardest negative pairs and the teacher's exact global FPR
thresholds from the teacher cache, into `pools.h5` and `thresholds.json`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.cache.format import TeacherCache
from pipeline.search.pools import VIEWS, build_pools, write_pools
from pipeline.search.statistics import BACKENDS
from pipeline.errors import PipelineError


def summary(results, seconds: float) -> str:
    """Thresholds table (FPR, threshold, rank, teacher TPR), pair counts and how they were computed."""
    t = results.thresholds
    lines = [f"  {'FPR':>6}  {'threshold':>10}  {'rank':>14}  {'TPR':>8}"]
    for key, value in t["thresholds"].items():
        lines.append(f"  {key:>6}  {value:>10.6f}  {t['ranks'][key]:>14,}  {t['tpr'][key]:>8.4f}")
    c = t["counts"]
    sampled = f" (uniform sample of {c['N']:,} of {c['N_total']:,} rows)" if c["sampled"] else ""
    lines.append(f"  images {c['N']:,}{sampled}, identities {c['identities']:,} "
                 f"({c['single_image_identities']:,} with one image), negative pairs {c['n_neg']:,}, "
                 f"positive pairs {c['n_pos']:,}")
    method = t["method"]
    misses = f", pilot missed {', '.join(method['pilot_misses'])}" if method["pilot_misses"] else ""
    lines.append(f"  exact over every negative pair: {method['scans']} scan(s), engine {method['engine']}, "
                 f"pilot {'used' if method['pilot'] else 'not used'}{misses}; {seconds:.1f} s in total")
    return "\n".join(lines)


def command(
    cache: Path = typer.Option(..., "--cache", help="Teacher cache (HDF5) written by extract-teacher."),
    out: Path = typer.Option(..., "--out", help="Folder for pools.h5 and thresholds.json."),
    k: int = typer.Option(16, "--k", help="Nearest identities kept per identity (by class-centre similarity)."),
    m: int = typer.Option(100_000, "--m", help="Most similar negative pairs kept (global, exact)."),
    centre_views: str = typer.Option("original", "--centre-views", help="Views averaged into class centres: "
                                     "original or both (original + flipped)."),
    backend: str = typer.Option("auto", "--backend", help=f"Search backend: {', '.join(BACKENDS)}."),
    block_rows: int = typer.Option(4096, "--block-rows", help="Rows per block: peak memory ~ 3 x block_rows^2 "
                                   "x 4 B, plus N x D x 4 B for the embeddings."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Use a uniform sample of this many rows for the "
                                         "thresholds and negative pairs (when all N^2/2 pairs are too many; 0 = all rows)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample and of the threshold pilot."),
) -> None:
    """Build identity-neighbour and hard-negative pools and the teacher's exact FPR thresholds."""
    if centre_views not in VIEWS or centre_views == "flipped":
        raise PipelineError(f"--centre-views {centre_views!r}: use original or both")
    if backend not in BACKENDS:
        raise PipelineError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    sample = sample or None  # 0 (what params.yaml can hold) means every row
    started = time.perf_counter()
    source = TeacherCache.open(cache)
    try:
        results = build_pools(source, k=k, m=m, centre_views=centre_views, backend=backend,
                              block_rows=block_rows, sample=sample, seed=seed, progress=True)
    finally:
        source.close()
    pools_path, thresholds_path = write_pools(out, results)
    seconds = time.perf_counter() - started
    print(f"wrote {pools_path} (centres {results.centres.shape[0]:,} x {results.centres.shape[1]}, "
          f"neighbours k={results.neighbours.shape[1]}, negative pairs m={results.neg_pairs.shape[0]:,})")
    print(f"wrote {thresholds_path}")
    print(summary(results, seconds))


COMMANDS = {"build-pools": command}
