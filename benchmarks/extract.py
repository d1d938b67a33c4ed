"""Benchmark: end-to-end teacher-cache extraction speed relative to the teacher's pure forward speed.

Both are measured in the same run on the same model and the same images (a synthetic RecordIO of random
JPEGs). `forward`: the teacher on pre-decoded, pre-normalised in-memory tensors ([images; flips], exactly
the batches extraction runs). `end_to_end`: `build_teacher_cache` in-process (read + JPEG decode +
preprocess + forward + shard writes + final merge), teacher already loaded.

Each repeat times both, interleaved (the order alternating between repeats), after `--warmup` discarded
repeats; the ratio end-to-end / forward is taken within each repeat (both saw the same background load) and
reported as the median with its min and max over the repeats. The default size (1,024 images, shards of
256) keeps the fixed costs of a run (opening the data, the first decode threads, shard files, the merge) a
small part of it: with 128 images they made the ratio 0.58 on a busy machine while 1,024 gave 0.98.
Target: median ratio >= 0.85 (decode and I/O hidden behind the forward pass).

    python benchmarks/extract.py [--arch r18 --width 0.5 --size 112 --images 1024 --batch-size 32 --device auto]
    python benchmarks/extract.py --arch r100 --width 1 --images 8192 --batch-size 256   # on a GPU

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arguments import architecture, image_side, non_negative_int, positive_float, positive_int, run_main, torch_device

from pipeline.machine.resources import require_memory

# torch and the pipeline's torch modules are imported where they are used: after the arguments are checked
if TYPE_CHECKING:
    import torch

    from pipeline.cache.build import ExtractionConfig

# bytes per pixel that the run holds for every image: the decoded uint8 image and its two float32 views
HELD_BYTES_PER_PIXEL = 3 + 2 * 3 * 4


def synthetic_rec(folder: Path, images: int, size: int, seed: int = 0) -> None:
    """Random face-sized JPEGs (smooth colour field + noise, so they compress like photos, not like noise)."""
    from pipeline.formats.jpeg import encode_jpeg
    from pipeline.formats.recordio import write_face_recordio

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    items = []
    for i in range(images):
        a, b, c = rng.uniform(0, 255, size=(3, 3))
        field = a * xx[..., None] + b * yy[..., None] + c * (xx * yy)[..., None]
        image = np.clip(field / 2 + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        items.append((encode_jpeg(image, quality=90), i * 10 // images))
    write_face_recordio(folder, items, num_classes=10, image_size=(size, size))


def forward_rate(teacher, batches: list[torch.Tensor]) -> float:
    """Images per second of the bare teacher forward over pre-normalised [images; flips] batches."""
    import torch

    device = torch.device(teacher.device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    started = time.perf_counter()
    with autocast:
        outputs = [teacher(batch) for batch in batches]
    for out in outputs:
        out.cpu()  # the extraction also brings every result back to the host
    return sum(len(b) // 2 for b in batches) / (time.perf_counter() - started)


def end_to_end_rate(cfg: ExtractionConfig, teacher, images: int) -> float:
    from pipeline.cache.build import build_teacher_cache

    cfg.out.unlink(missing_ok=True)
    started = time.perf_counter()
    build_teacher_cache(cfg, teacher=teacher, log=lambda message: None)
    return images / (time.perf_counter() - started)


def interleaved_rates(forward, end_to_end, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """(forward rates, end-to-end rates) of `repeats` repeats after `warmup` discarded ones; within a repeat
    the two run back to back, the first of them alternating from one repeat to the next."""
    forward_rates, e2e_rates = [], []
    for r in range(warmup + repeats):
        if r % 2 == 0:
            f = forward()
            e = end_to_end()
        else:
            e = end_to_end()
            f = forward()
        if r >= warmup:
            forward_rates.append(f)
            e2e_rates.append(e)
    return forward_rates, e2e_rates


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=architecture(), default="r18")
    parser.add_argument("--width", type=positive_float, default=0.5)
    parser.add_argument("--size", type=image_side, default=112)
    parser.add_argument("--images", type=positive_int, default=1024)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--shard-size", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="discarded repeats before the timed ones")
    parser.add_argument("--device", type=torch_device, default="auto")
    args = parser.parse_args()
    require_memory(f"--images {args.images} at --size {args.size}", args.images * args.size**2 * HELD_BYTES_PER_PIXEL)
    device = str(args.device)

    import torch

    from pipeline.cache.build import ExtractionConfig
    from pipeline.cache.worker import prepare_teacher, preprocess_views
    from pipeline.formats.source import open_face_source
    from pipeline.models import get_model
    from pipeline.models.loading import load_embedder
    from pipeline.models.model_file import save_model

    work = Path(tempfile.mkdtemp(prefix="ekd-bench-extract-"))
    try:
        synthetic_rec(work / "data", args.images, args.size)
        torch.manual_seed(0)
        model = get_model(args.arch, input_size=args.size, width=args.width)
        save_model(work / "teacher.pt", model, args.arch, {"input_size": args.size, "width": args.width})
        teacher = prepare_teacher(load_embedder(work / "teacher.pt", device=device))

        source = open_face_source(work / "data")
        decoded = np.stack([source.decode(i) for i in range(len(source))])
        batches = [preprocess_views(decoded[s : s + args.batch_size], torch.device(device))
                   for s in range(0, len(decoded), args.batch_size)]
        cfg = ExtractionConfig(data=work / "data", teacher=work / "teacher.pt", out=work / "cache.h5",
                               batch_size=args.batch_size, shard_size=args.shard_size, device=device,
                               dtype="float32",  # an untrained teacher's raw outputs can exceed float16
                               threads=torch.get_num_threads())  # the bare forward's threads: like for like
        forward_rate(teacher, batches[:2])  # warm-up (allocator, kernel selection)
        forward, e2e = interleaved_rates(lambda: forward_rate(teacher, batches),
                                         lambda: end_to_end_rate(cfg, teacher, args.images),
                                         args.repeats, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [e / f for e, f in zip(e2e, forward)]
    print(json.dumps({
        "benchmark": "extract-teacher",
        "device": device,
        "teacher": f"{args.arch} width {args.width} input {args.size}",
        "images": args.images,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "forward_images_per_s": spread(forward),
        "end_to_end_images_per_s": spread(e2e),
        "ratio": spread(ratios),
        "ratios": [round(r, 3) for r in ratios],
        "target": 0.85,
    }))


if __name__ == "__main__":
    run_main(main)
