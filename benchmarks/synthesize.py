"""Throughput of `pipeline.synthetic.synthesize` end to end (render + JPEG + RecordIO/.bin writing).

Prints one JSON line: images/s with one worker at 112x112 and at 32x32 (per wall second, and per CPU second
of the process: the single-core rate even on a shared machine), images/s with ``--workers`` at 112x112,
its ratio to one worker, and whether the multi-worker files are byte-identical to one worker's.
All runs happen side by side in this process on the same machine.

    python benchmarks/synthesize.py [--identities 100] [--images-per-identity 10] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from arguments import integer, positive_int, processes, run_main

FILES = ("train.rec", "train.idx", "val.bin", "test.rec", "test.idx")


def timed_run(out: Path, size: int, workers: int, identities: int, per_identity: int) -> tuple[float, float, int]:
    """(images per wall second, images per CPU second of this process, images) for one synthesize call.

    With one worker everything runs in this process, so the CPU-second rate is the single-core throughput
    even on a machine busy with other work."""
    from pipeline.synthetic.writer import synthesize  # torch: after the arguments

    started, cpu_started = time.perf_counter(), time.process_time()
    summary = synthesize(out, identities=identities, images_per_identity=per_identity, size=size, seed=0,
                         difficulty=0.5, val_identities=20, val_pairs=200, test_identities=20,
                         test_images_per_identity=5, workers=workers)
    images = summary["train"]["images"] + 2 * summary["val"]["pairs"] + summary["test"]["images"]
    return images / (time.perf_counter() - started), images / (time.process_time() - cpu_started), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=integer(2), default=100)
    parser.add_argument("--images-per-identity", type=positive_int, default=10)
    parser.add_argument("--workers", type=processes(), default=max(2, os.cpu_count() or 2))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_112, cpu_112, images = timed_run(root / "w1", 112, 1, args.identities, args.images_per_identity)
        one_32, cpu_32, _ = timed_run(root / "w1_32", 32, 1, args.identities, args.images_per_identity)
        many_112, _, _ = timed_run(root / "wn", 112, args.workers, args.identities, args.images_per_identity)
        identical = all((root / "w1" / f).read_bytes() == (root / "wn" / f).read_bytes() for f in FILES)
    print(json.dumps({
        "benchmark": "synthesize",
        "images": images,
        "images_per_s_112": round(one_112, 1),
        "images_per_s_32": round(one_32, 1),
        "images_per_cpu_s_112": round(cpu_112, 1),
        "images_per_cpu_s_32": round(cpu_32, 1),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "images_per_s_112_workers": round(many_112, 1),
        "speedup_workers_vs_1": round(many_112 / one_112, 2),
        "outputs_identical": identical,
    }))


if __name__ == "__main__":
    run_main(main)
