"""Benchmark: training throughput through the real data path relative to stepping on in-memory tensors.

Both are measured in the same run, on the same model, head, optimiser, batches and flips:
`in_memory`: `pipeline.training.loop.run_epoch` (the loop body `train` uses) over pre-decoded, pre-collated
batch tensors. `data_path`: `pipeline.training.train` itself on a synthetic RecordIO set (FaceRecordIO ->
FaceDataset -> DataLoader workers decoding JPEG -> collate -> the same loop). Runs are interleaved and the
best of `--repeats` is kept for each (the least disturbed by other load on a shared machine).

`ratio` compares steady-state loop throughput (images / seconds spent in the epochs, as `train` logs it)
over the epochs after the first. The first epoch is reported apart (`ratio_first_epoch`,
`first_epoch_extra_s`): it pays a one-off start-up, chiefly the parent's copy-on-write page faults after
forking the persistent DataLoader workers (it grows with the heap the process has already used, e.g.
earlier runs in this same process), a fixed cost that real epochs of thousands of steps amortise.
`ratio_wall` divides by the whole `train` call (model build, checkpoint writes, DVCLive included).
`loader_only_images_per_s` is the data path alone (no model): its headroom over the training step.
Target: ratio >= 0.85.

    python benchmarks/train_throughput.py [--arch mbf --width 0.5 --size 64 --images 384 --batch-size 32]
    python benchmarks/train_throughput.py --arch r50 --size 112 --images 8192 --batch-size 128 --workers 8  # GPU

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from arguments import (architecture, image_side, integer, positive_float, positive_int, processes, run_main,
                       torch_device)

from pipeline.machine.resources import require_memory

# torch and the pipeline's torch modules are imported where they are used: after the arguments are checked
if TYPE_CHECKING:
    from pipeline.training.config import TrainConfig

PER_IDENTITY = 8  # training images per identity
# bytes held per pixel of a training image: preloaded (uint8 RGB) and, in every epoch's premade batches, float32
PRELOADED_BYTES_PER_PIXEL, PREMADE_BYTES_PER_PIXEL = 3, 3 * 4


def premade_batches(source, cfg: TrainConfig, epoch: int) -> list[tuple]:
    """The exact batches `train` draws in `epoch`, decoded and collated up front."""
    from pipeline.training.data import FaceDataset, FlipAugment, collate
    from pipeline.training.sampling.shuffled import ShuffledBatchSampler

    dataset = FaceDataset(source, preload=True)
    sampler = FlipAugment(ShuffledBatchSampler(len(dataset), cfg.batch_size, cfg.seed), seed=cfg.seed)
    sampler.set_epoch(epoch)
    return [collate([dataset[item] for item in batch]) for batch in sampler]


def in_memory_rates(cfg: TrainConfig, num_classes: int, epochs: list[list[tuple]]) -> list[float]:
    """Images per second of each epoch of the training step alone, built as `train` builds it, over
    premade batches."""
    import torch

    from pipeline.machine.devices import resolve_device
    from pipeline.training.loop import run_epoch
    from pipeline.training.step import TrainStep

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    trainer = TrainStep(cfg, num_classes, len(epochs[0]), device)
    trainer.model.train()
    rates = []
    for epoch, batches in enumerate(epochs):
        started = time.perf_counter()
        run_epoch(trainer, batches, epoch, cfg.epochs, show_progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(sum(len(batch[0]) for batch in batches) / (time.perf_counter() - started))
    return rates


def data_path_rates(cfg: TrainConfig, source) -> tuple[list[float], float]:
    """(images/s of each epoch as `train` measures it, images/s over the whole `train` call)."""
    from pipeline.training.loop import train

    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = train(cfg, source, source.num_classes)
    wall = time.perf_counter() - started
    images = len(source) // cfg.batch_size * cfg.batch_size * len(summary["history"])
    return [epoch["images_per_s"] for epoch in summary["history"]], images / wall


def pooled_rate(rates: list[float], images_per_epoch: int) -> float:
    """Images per second over several epochs of equal size, from their per-epoch rates."""
    return len(rates) * images_per_epoch / sum(images_per_epoch / rate for rate in rates)


def loader_rate(cfg: TrainConfig, source) -> float:
    """Images per second of the data path alone (read + decode + flip + normalise + collate, no model):
    the headroom the loader has over the training step."""
    from torch.utils.data import DataLoader

    from pipeline.training.data import FaceDataset, FlipAugment, collate
    from pipeline.training.sampling.shuffled import ShuffledBatchSampler

    sampler = FlipAugment(ShuffledBatchSampler(len(source), cfg.batch_size, cfg.seed), seed=cfg.seed)
    loader = DataLoader(FaceDataset(source), batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate)
    started = time.perf_counter()
    images = sum(len(batch[0]) for batch in loader)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=architecture(), default="mbf")
    parser.add_argument("--width", type=positive_float, default=0.5)
    parser.add_argument("--size", type=image_side, default=64)
    parser.add_argument("--images", type=integer(2 * PER_IDENTITY), default=384,
                        help=f"training images ({PER_IDENTITY} per identity, at least 2 identities)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--epochs", type=integer(2), default=3, help="at least 2: the first is reported apart")
    parser.add_argument("--workers", type=processes(0), default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", type=torch_device, default="auto")
    args = parser.parse_args()
    identities = args.images // PER_IDENTITY
    if args.batch_size > identities * PER_IDENTITY:
        parser.error(f"--batch-size {args.batch_size}: more than the {identities * PER_IDENTITY} training images "
                     f"(--images {args.images}): no full batch to train on")
    require_memory(f"--images {args.images} at --size {args.size} over --epochs {args.epochs}", args.images
                   * args.size**2 * (PRELOADED_BYTES_PER_PIXEL + args.epochs * PREMADE_BYTES_PER_PIXEL))

    import torch

    from pipeline.formats.recordio import FaceRecordIO
    from pipeline.synthetic.writer import synthesize
    from pipeline.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(data, identities=identities, images_per_identity=PER_IDENTITY, size=args.size,
                   val_identities=20, val_pairs=20, test_identities=2, test_images_per_identity=2)
        source = FaceRecordIO(data)
        cfg = TrainConfig(out_dir=Path(tmp) / "run", arch=args.arch, batch_size=args.batch_size,
                          arch_kwargs={"input_size": args.size, "width": args.width, "num_features": 128},
                          epochs=args.epochs, workers=args.workers, device=str(args.device), resume=False)
        epochs = [premade_batches(source, cfg, epoch) for epoch in range(args.epochs)]
        in_memory_rates(cfg, source.num_classes, [epochs[0][:2]])  # warm-up: first-call kernel set-up
        runs = {"memory": [], "data": [], "wall": [], "loader": []}
        for _ in range(args.repeats):
            runs["loader"].append(loader_rate(cfg, source))
            runs["memory"].append(in_memory_rates(cfg, source.num_classes, epochs))
            data_rates, wall_rate = data_path_rates(cfg, source)
            runs["data"].append(data_rates)
            runs["wall"].append(wall_rate)
        per_epoch = len(epochs[0]) * cfg.batch_size
    # steady state: epochs after the first (which also pays the one-off worker start-up, reported apart)
    memory = max(pooled_rate(r[1:], per_epoch) for r in runs["memory"])
    data = max(pooled_rate(r[1:], per_epoch) for r in runs["data"])
    memory_first = max(r[0] for r in runs["memory"])
    data_first = max(r[0] for r in runs["data"])
    print(json.dumps({
        "benchmark": "train_throughput",
        "ratio": round(data / memory, 3),
        "ratio_first_epoch": round(data_first / memory_first, 3),
        "ratio_wall": round(max(runs["wall"]) / max(pooled_rate(r, per_epoch) for r in runs["memory"]), 3),
        "in_memory_images_per_s": round(memory, 1),
        "data_path_images_per_s": round(data, 1),
        "first_epoch_extra_s": round(per_epoch / data_first - per_epoch / data, 2),
        "loader_only_images_per_s": round(max(runs["loader"]), 1),
        "in_memory_epoch_rates": [[round(x, 1) for x in r] for r in runs["memory"]],
        "data_path_epoch_rates": [[round(x, 1) for x in r] for r in runs["data"]],
        "arch": args.arch, "width": args.width, "size": args.size, "images": len(source),
        "batch_size": args.batch_size, "epochs": args.epochs, "workers": args.workers, "repeats": args.repeats,
        "device": str(args.device), "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    run_main(main)
