"""Benchmark: memory of the teacher targets under DDP, one memory-mapped copy per machine vs a RAM copy per rank.

Writes a synthetic teacher cache of `--gib` GiB with the real writer (`pipeline.cache.shards.write_cache`:
contiguous float16 (N, 2, 512), as extract-teacher writes it), then for each mode runs
`torchrun --nproc_per_node RANKS` (gloo, CPU) training a tiny student with an L2 KD term on the targets
through the public `train()`:
  shared - `TeacherCache.to_torch()` (the default): the embeddings memory-mapped at their file offset;
  ram    - `TeacherCache.to_torch(shared=False)`: each rank reads the whole array into its own RAM (the
           behaviour before this change, and still that of chunked caches).
Each rank reads every row once after loading (what an epoch of lookups does), then trains `--steps` steps on
random rows. Memory is read from /proc/self/smaps_rollup of every rank at barriers (all ranks alive and at the
same point): PSS (shared pages divided among the processes mapping them) and USS (Private_Clean +
Private_Dirty), before the cache is opened, after the targets are loaded and read, and after training. The
figure: the sum over ranks of the PSS growth divided by the cache size (about 1 for shared, RANKS for ram).

    python benchmarks/shared_targets.py [--gib 2 --ranks 4 --steps 5 --modes shared,ram --dir /tmp]

Prints one JSON line. Measured in this project (2-core CPU, 23 GB RAM, other jobs running, `nice -n 15`,
defaults: 2.0 GiB cache, 4 ranks, 5 steps; 1 min 41 s), summed over the 4 ranks after every row was read:
  shared: PSS +2.072 GiB (1.036 caches), USS +0.065 GiB, RSS +8.086 GiB;
  ram:    PSS +8.067 GiB (4.033 caches), USS +8.065 GiB, RSS +8.083 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from arguments import existing_folder, names, positive_float, positive_int, processes, run_main

from pipeline.machine.resources import require_memory, size_text

DIM = 512
CLASSES = 1000
IMAGE = 32
GIB = 2**30
MODES = ("shared", "ram")


def smaps_rollup() -> dict[str, int]:
    """This process's Rss, Pss and USS (Private_Clean + Private_Dirty) in bytes."""
    fields = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


# ------------------------------------------------------------------------------------------------ launcher
def cache_rows(gib: float) -> int:
    """Rows of a float16 (rows, 2, DIM) cache of about `gib` GiB."""
    return int(gib * GIB) // (2 * DIM * 2)


def write_synthetic_cache(path: Path, gib: float, seed: int = 0) -> int:
    """A complete, contiguous float16 cache of about `gib` GiB written with the pipeline's writer; its rows."""
    from pipeline.cache.contract import READ_ROWS, contract_attrs
    from pipeline.cache.shards import write_cache

    rows = cache_rows(gib)
    attrs = contract_attrs(teacher_fingerprint="synthetic", teacher_name="synthetic",
                           dataset_fingerprint="synthetic", preprocessing={}, rows=rows, dim=DIM, dtype="float16")
    rng = np.random.default_rng(seed)

    def parts():
        for start in range(0, rows, READ_ROWS):
            n = min(READ_ROWS, rows - start)
            emb = (rng.standard_normal((n, 2, DIM), dtype=np.float32) * 3).astype(np.float16)
            index = np.arange(start, start + n, dtype=np.int64)
            yield start, emb, index % CLASSES, index

    write_cache(path, attrs, parts())
    return rows


def run_mode(mode: str, args, cache: Path, work: Path) -> dict:
    result = work / f"{mode}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               str(Path(__file__).resolve()), "--worker", mode, "--cache", str(cache), "--result", str(result),
               "--steps", str(args.steps), "--run-dir", str(work / f"run-{mode}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=sys.stderr)
    measured = json.loads(result.read_text())
    measured["seconds"] = round(time.perf_counter() - started, 1)
    return measured


def summarise(ranks: list[dict], cache_bytes: int) -> dict:
    def total(stage: str, kind: str) -> int:
        return sum(r[stage][kind] - r["before"][kind] for r in ranks)

    return {
        "pss_growth_sum_gib": {stage: round(total(stage, "pss") / GIB, 3) for stage in ("loaded", "trained")},
        "uss_growth_sum_gib": {stage: round(total(stage, "uss") / GIB, 3) for stage in ("loaded", "trained")},
        "rss_growth_sum_gib": {stage: round(total(stage, "rss") / GIB, 3) for stage in ("loaded", "trained")},
        "pss_growth_over_cache": round(total("loaded", "pss") / cache_bytes, 3),
        "uss_growth_over_cache": round(total("loaded", "uss") / cache_bytes, 3),
        "per_rank_pss_growth_gib": [round((r["loaded"]["pss"] - r["before"]["pss"]) / GIB, 3) for r in ranks],
        "to_torch": ranks[0]["to_torch"],
    }


def launch(args) -> None:
    modes = args.modes
    work = Path(tempfile.mkdtemp(prefix="ekd-bench-shared-", dir=args.dir))
    try:
        cache = work / "teacher.h5"
        rows = write_synthetic_cache(cache, args.gib)
        cache_bytes = rows * 2 * DIM * 2
        results = {mode: run_mode(mode, args, cache, work) for mode in modes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "shared-targets",
        "ranks": args.ranks,
        "backend": "gloo (CPU)",
        "cache": {"rows": rows, "views": 2, "dim": DIM, "dtype": "float16", "gib": round(cache_bytes / GIB, 3)},
        "student": f"mbf width 0.125, {IMAGE}x{IMAGE}, L2 KD, {args.steps} steps of 16 per rank",
        "measured": "sum over ranks of PSS/USS/RSS growth from /proc/self/smaps_rollup at barriers: `loaded` = "
                    "targets loaded and every row read once, `trained` = after the training steps",
        **{mode: {**summarise(r["ranks"], cache_bytes), "seconds": r["seconds"]} for mode, r in results.items()},
    }))


# ------------------------------------------------------------------------------------------------ one rank
class RepeatedFaces:
    """A face source with one row per cache row whose images cycle through a few random ones (the targets,
    not the images, are what this benchmark measures)."""

    def __init__(self, labels: np.ndarray, distinct: int = 16):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (distinct, IMAGE, IMAGE, 3), dtype=np.uint8)
        self.labels, self.num_classes = labels, int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, i: int) -> np.ndarray:
        return self.images[i % len(self.images)]


class RandomBatches:
    """`steps` batches of random rows over the whole cache."""

    def __init__(self, rows: int, batch: int, steps: int, seed: int):
        self.rows, self.batch, self.steps, self.seed, self.epoch = rows, batch, steps, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.steps):
            yield rng.integers(0, self.rows, self.batch).tolist()


def measure_together(stage: str, samples: dict) -> None:
    """Every rank at the same point, then each reads its own memory, then all go on."""
    from pipeline.training import ddp

    ddp.barrier()
    samples[stage] = smaps_rollup()
    ddp.barrier()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.cache.format import TeacherCache
    from pipeline.losses.registry import build_kd_loss
    from pipeline.training import ddp
    from pipeline.training.config import TrainConfig
    from pipeline.training.distill import Distillation
    from pipeline.training.loop import train

    torch.set_num_threads(1)
    ddp.init_from_env("gloo")
    samples: dict = {}
    measure_together("before", samples)
    cache = TeacherCache.open(args.cache)
    table = cache.to_torch(shared=args.worker == "shared")
    samples["to_torch"] = "memory-mapped" if args.worker == "shared" and cache.shareable else "RAM copy"
    for start in range(0, table.shape[0], 65536):  # every row once: an epoch's worth of lookups
        table[start : start + 65536].float().sum()
    measure_together("loaded", samples)
    source = RepeatedFaces(cache.labels)
    cfg = TrainConfig(out_dir=Path(args.run_dir), arch="mbf", arch_kwargs={"input_size": IMAGE, "width": 0.125,
                      "num_features": DIM}, epochs=1, batch_size=16, lr=0.01, workers=0, device="cpu",
                      resume=False, amp=False)
    distill = Distillation(loss=build_kd_loss("l2"), targets=table)
    train(cfg, source, source.num_classes, distill=distill,
          batch_sampler_factory=lambda world, rank: RandomBatches(len(source), 16, args.steps, seed=rank))
    measure_together("trained", samples)
    gathered = [None] * ddp.world_size()
    dist.all_gather_object(gathered, samples)
    if ddp.rank() == 0:
        Path(args.result).write_text(json.dumps({"ranks": gathered}))
    ddp.barrier()
    ddp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=positive_float, default=2.0, help="size of the synthetic cache")
    parser.add_argument("--ranks", type=processes(), default=4, help="torchrun --nproc_per_node")
    parser.add_argument("--steps", type=positive_int, default=5, help="training steps per rank")
    parser.add_argument("--modes", type=names(MODES), default=list(MODES), help="comma-separated: shared, ram")
    parser.add_argument("--dir", type=existing_folder, default=None,
                        help="where the cache is written (default: the temp folder)")
    parser.add_argument("--worker", choices=("shared", "ram"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cache_bytes = cache_rows(args.gib) * 2 * DIM * 2
    if cache_bytes == 0:
        parser.error(f"argument --gib: {args.gib}: less than one cache row ({2 * DIM * 2} bytes)")
    folder = args.dir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    if cache_bytes > free:
        parser.error(f"--gib {args.gib}: the cache takes {size_text(cache_bytes)}, {folder} has {size_text(free)} free")
    if "ram" in args.modes:  # every rank reads the whole cache into its own memory
        require_memory(f"--gib {args.gib} with --ranks {args.ranks} (mode ram)", args.ranks * cache_bytes)
    launch(args)


if __name__ == "__main__":
    run_main(main)
