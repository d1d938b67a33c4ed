"""One-shot GPU check: the CUDA paths of extraction, build-pools and training measured on one GPU in a few
minutes. Prints one JSON line; exits 1 with a one-line message on stderr when a CUDA path is broken or
falls back to another path (never a silent CPU fallback), 2 when there is no CUDA device.

1. extraction (`build_teacher_cache`, an r50 teacher at 112x112, float16 cache): checks that the teacher's
   convolutions run in fp16 autocast on channels-last tensors, compares the cache with a plain fp32 forward
   (no autocast, no TF32) of the same images (max abs difference, max difference relative to the embedding
   norm, min cosine), and times end-to-end extraction against the bare forward (`benchmarks/extract.py`'s
   pieces, interleaved; median, min and max of the ratio).
2. build-pools (`build_pools`, the stage's entry point) on the GPU (faiss GPU when its wheel runs on this
   device, else torch; which one is reported) against the CPU exact path (numpy): on +-1 embeddings every
   similarity is exact in float32, so thresholds and top negative pairs must be identical; on real-valued
   embeddings the differences (float32 rounding of single products) are reported and bounded.
3. training (`TrainStep`, `benchmarks/train_step.py`'s pieces): an mbf student at 112x112, batch 256, under
   AMP: plain step, EKD on cached targets, EKD with an r50 teacher run online (also in fp16 autocast); ratios
   cached/plain and cached/online (median over rounds of the within-round ratio), checking that the student's
   and the teacher's convolutions run in fp16 on channels-last tensors.
4. split head (`SplitMarginHead`, pipeline/training/split_head.py) under NCCL: a one-process NCCL group on the
   GPU (gloo in the CPU dry run), Glint360K's 360,232 classes x 512, batch 256: its loss, embedding gradient
   and head gradient against the replicated `MarginHead` in strict fp32 (relative differences, bounded), its
   loss under AMP (fp32, finite, near the fp32 loss), and forward + backward times of both (median). At world
   size 1 the all-gathers are skipped (ddp.py); the cross-rank all-reduces run on NCCL.
Peak GPU memory (torch's allocator; faiss allocates outside it) of every part; for the training steps, the
peak during each variant's steps (the other variants' resident weights included).

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --tiny   # the same code paths on CPU at toy sizes:
                                                         # a correctness dry run, NOT a GPU measurement
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run by path

import extract as extract_bench  # noqa: E402
from gpu_common import CheckFailed, measured, require, strict_fp32  # noqa: E402
from gpu_split_head import split_head_check  # noqa: E402
import train_step as step_bench  # noqa: E402

from pipeline.cache.build import ExtractionConfig, build_teacher_cache  # noqa: E402
from pipeline.cache.format import TeacherCache  # noqa: E402
from pipeline.cache.worker import prepare_teacher, preprocess_views  # noqa: E402
from pipeline.formats.source import open_face_source  # noqa: E402
from pipeline.models import get_model  # noqa: E402
from pipeline.models.loading import Embedder, load_embedder  # noqa: E402
from pipeline.models.model_file import save_model  # noqa: E402
from pipeline.search.backends import knn_kind  # noqa: E402
from pipeline.search.pools import build_pools  # noqa: E402
from pipeline.training.distill import Distillation  # noqa: E402
from pipeline.training.sampling.balanced import BalancedBatchSampler  # noqa: E402

# Sizes: the GPU check, and the CPU dry run (--tiny), which runs the same code at toy sizes.
SIZES = {
    "full": {"teacher": "r50", "teacher_width": 1.0, "size": 112, "images": 4096,
             "extract_batch": 256, "repeats": 3, "rows": 20000, "classes": 2000, "dim": 512, "batch": 256,
             "train_rows": 100_000, "train_classes": 2000, "queue": 65536, "rounds": 6, "head_classes": 360_232},
    "tiny": {"teacher": "r18", "teacher_width": 0.125, "size": 32, "images": 64,
             "extract_batch": 16, "repeats": 1, "rows": 600, "classes": 60, "dim": 64, "batch": 16,
             "train_rows": 2000, "train_classes": 100, "queue": 256, "rounds": 2, "head_classes": 1001},
}
BOUNDS = {"extraction_max_relative_difference": 2e-2, "thresholds_max_abs_difference": 1e-6,
          "neighbour_sims_max_abs_difference": 1e-5}


@contextmanager
def first_conv_watch(module: torch.nn.Module, seen: list):
    """Records (dtype, channels-last?) of the first convolution's output at every call."""
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda m, i, out: seen.append(
        (out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
    try:
        yield
    finally:
        handle.remove()


def require_gpu_kernels(seen: list, device: torch.device, what: str) -> None:
    """On CUDA the watched convolution must have run in fp16 on channels-last tensors, every time."""
    require(bool(seen), f"{what}: the teacher's convolutions never ran")
    if device.type == "cuda":
        bad = {s for s in seen if s != (torch.float16, True)}
        require(not bad, f"{what}: convolutions ran as {sorted(map(str, bad))}, expected fp16 autocast on "
                         "channels-last tensors")


# ------------------------------------------------------------------------------------------------ extraction
def calibrated_teacher(path: Path, sizes: dict, source, device: torch.device) -> None:
    """A random teacher whose BatchNorm statistics are those of the data (a freshly initialised net's raw
    outputs can exceed the float16 range), saved as a model.pt."""
    torch.manual_seed(0)
    kwargs = {"input_size": sizes["size"], "width": sizes["teacher_width"], "num_features": sizes["dim"]}
    model = get_model(sizes["teacher"], **kwargs).to(device)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    images = np.stack([source.decode(i) for i in range(min(len(source), 128))])
    with torch.no_grad(), strict_fp32():
        model.train()(preprocess_views(images, device))
    save_model(path, model.eval().cpu(), sizes["teacher"], kwargs)


def extraction_check(sizes: dict, device: torch.device, work: Path) -> dict:
    out: dict = {"teacher": f"{sizes['teacher']} width {sizes['teacher_width']} {sizes['size']}x{sizes['size']}",
                 "images": sizes["images"]}
    with measured(device, out):
        extract_bench.synthetic_rec(work / "data", sizes["images"], sizes["size"])
        source = open_face_source(work / "data")
        calibrated_teacher(work / "teacher.pt", sizes, source, device)
        teacher = prepare_teacher(load_embedder(work / "teacher.pt", device=str(device)))
        require(torch.device(teacher.device).type == device.type, f"teacher loaded on {teacher.device}")
        cfg = ExtractionConfig(data=work / "data", teacher=work / "teacher.pt", out=work / "cache.h5",
                               batch_size=sizes["extract_batch"], shard_size=sizes["images"] // 2,
                               device=str(device), dtype="float16")
        seen: list = []
        with first_conv_watch(teacher.module, seen):
            build_teacher_cache(cfg, teacher=teacher, log=lambda message: None)
        require_gpu_kernels(seen, device, "extraction")
        cached = TeacherCache.open(cfg.out).embeddings()
        decoded = np.stack([source.decode(i) for i in range(len(source))])
        batches = [preprocess_views(decoded[s : s + sizes["extract_batch"]], device)
                   for s in range(0, len(decoded), sizes["extract_batch"])]
        reference = []
        with strict_fp32(), torch.autocast(device.type, enabled=False):
            for batch in batches:
                both = teacher(batch).cpu().numpy()
                reference.append(np.stack([both[: len(both) // 2], both[len(both) // 2 :]], axis=1))
        reference = np.concatenate(reference)
        difference = np.abs(cached - reference)
        norms = np.linalg.norm(reference, axis=-1)
        cosines = (cached * reference).sum(-1) / (np.linalg.norm(cached, axis=-1) * norms)
        out.update(fp16_cache_vs_fp32_forward={
            "max_abs_difference": float(difference.max()),
            "max_difference_over_norm": float((np.linalg.norm(cached - reference, axis=-1) / norms).max()),
            "min_cosine": float(cosines.min()), "mean_norm": float(norms.mean())})
        require(out["fp16_cache_vs_fp32_forward"]["max_difference_over_norm"]
                <= BOUNDS["extraction_max_relative_difference"],
                f"extraction: fp16 cache differs from the fp32 forward by "
                f"{out['fp16_cache_vs_fp32_forward']['max_difference_over_norm']:.3g} of the norm")
        extract_bench.forward_rate(teacher, batches[:2])  # warm-up: allocator, kernel selection
        forward, e2e = extract_bench.interleaved_rates(
            lambda: extract_bench.forward_rate(teacher, batches),
            lambda: extract_bench.end_to_end_rate(cfg, teacher, sizes["images"]), sizes["repeats"], warmup=1)
        out["forward_images_per_s"] = extract_bench.spread(forward)
        out["end_to_end_images_per_s"] = extract_bench.spread(e2e)
        out["end_to_end_over_forward"] = extract_bench.spread([e / f for e, f in zip(e2e, forward)])
    return out


# ------------------------------------------------------------------------------------------------ build-pools
def pools_pair(emb: np.ndarray, labels: np.ndarray, backend: str) -> tuple:
    """build_pools on the device path (`backend`) and on the CPU exact path (numpy)."""
    settings = {"neighbours": 8, "hard_pairs": 2000, "block_rows": 4096}
    return (build_pools(emb, labels, backend=backend, **settings),
            build_pools(emb, labels, backend="numpy", **settings))


def pools_check(sizes: dict, device: torch.device) -> dict:
    backend = "auto" if device.type == "cuda" else "torch"  # CPU dry run: the torch engine on CPU
    out: dict = {"rows": sizes["rows"], "identities": sizes["classes"]}
    with measured(device, out):
        if device.type == "cuda":
            kind = knn_kind(backend)
            require(kind in ("faiss-gpu", "torch-cuda"), f"build-pools: kNN would run on {kind}, not the GPU")
            out["knn"] = kind
        rng = np.random.default_rng(0)
        labels = np.sort(rng.integers(0, sizes["classes"], sizes["rows"]))
        signs = np.where(rng.random((sizes["rows"], 1, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
        on_device, on_cpu = pools_pair(signs, labels, backend)
        engine = on_device.thresholds["method"]["engine"]
        require(engine == f"torch-{device.type}", f"build-pools: pair scans ran on {engine}")
        out["scan_engine"] = engine
        require(on_device.thresholds["thresholds"] == on_cpu.thresholds["thresholds"],
                "build-pools: thresholds on exactly representable similarities differ from the CPU exact ones")
        require(np.array_equal(on_device.neg_pairs, on_cpu.neg_pairs) and
                np.array_equal(on_device.neg_sims, on_cpu.neg_sims),
                "build-pools: top negative pairs on exactly representable similarities differ from the CPU ones")
        out["exact_data"] = {"thresholds_equal": True, "negative_pairs_equal": True}
        targets = step_bench.clustered_targets(labels, 0).float().numpy()[:, :, : sizes["dim"]]
        on_device, on_cpu = pools_pair(targets, labels, backend)
        keys = on_cpu.thresholds["thresholds"]
        float_data = {
            "thresholds_max_abs_difference": max(abs(on_device.thresholds["thresholds"][k] -
                                                     on_cpu.thresholds["thresholds"][k]) for k in keys),
            "negative_pairs_same_fraction": float((on_device.neg_pairs == on_cpu.neg_pairs).all(1).mean()),
            "neighbour_sims_max_abs_difference": float(np.abs(on_device.neighbour_sims - on_cpu.neighbour_sims).max()),
        }
        out["float_data"] = float_data
        for name in ("thresholds_max_abs_difference", "neighbour_sims_max_abs_difference"):
            require(float_data[name] <= BOUNDS[name], f"build-pools: {name} {float_data[name]:.3g} on float data")
    return out


# ------------------------------------------------------------------------------------------------ training
def train_step_check(sizes: dict, device: torch.device) -> dict:
    args = Namespace(student="mbf", size=sizes["size"], seed=0, warmup=1, repeats=sizes["rounds"] - 1,
                     batch=sizes["batch"])
    out: dict = {"student": f"mbf {sizes['size']}x{sizes['size']}",
                 "teacher": f"{sizes['teacher']} width {sizes['teacher_width']}", "batch": sizes["batch"]}
    labels = np.sort(np.random.default_rng(0).integers(0, sizes["train_classes"], sizes["train_rows"]))
    targets = step_bench.clustered_targets(labels, 0)
    thresholds = step_bench.teacher_thresholds(targets, labels)
    sampler = BalancedBatchSampler(labels, sizes["batch"] // 2, sizes["batch"] - sizes["batch"] // 2,
                                   per_identity=4, seed=0)
    batches = step_bench.make_batches((b for _, b in zip(range(sizes["rounds"]), sampler)), labels, args, device)
    teacher_module = get_model(sizes["teacher"], input_size=sizes["size"], width=sizes["teacher_width"],
                               num_features=step_bench.DIM).to(device).eval()
    if device.type == "cuda":
        teacher_module = teacher_module.to(memory_format=torch.channels_last)
    teacher = Embedder(teacher_module, kind="module", name=sizes["teacher"], dim=step_bench.DIM,
                                  input_size=sizes["size"], device=device, fingerprint="random-init",
                                  path=Path("<teacher in memory>"), module=teacher_module)
    online = step_bench.OnlineTeacher(teacher)

    def kd(source):
        return Distillation(loss=step_bench.ekd_loss("global", thresholds, sizes["queue"], device, 0, args.batch),
                            targets=source)

    variants = [step_bench.make_variant("plain", args, sizes["train_classes"], device, None),
                step_bench.make_variant("ekd_cached", args, sizes["train_classes"], device, kd(targets)),
                step_bench.make_variant("ekd_online", args, sizes["train_classes"], device, kd(online))]
    for variant in variants:
        require(variant.trainer.use_amp == (device.type == "cuda"), f"training: AMP is {variant.trainer.use_amp}")
    seconds: dict = {v.name: [] for v in variants}
    peaks: dict = {v.name: 0.0 for v in variants}
    seen: list = []
    with first_conv_watch(variants[0].trainer.trainee.backbone, seen), \
            first_conv_watch(teacher_module, seen):
        for r, batch in enumerate(batches):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for variant in order:
                spent: dict = {}
                with measured(device, spent):
                    spent["t"] = step_bench.timed(lambda: variant.step(batch), device)
                if r >= args.warmup:
                    seconds[variant.name].append(spent["t"])
                    peaks[variant.name] = max(peaks[variant.name], spent["peak_gpu_memory_gib"] or 0.0)
    require_gpu_kernels(seen, device, "training")

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(seconds[a], seconds[b])), 3)

    out.update(amp=device.type == "cuda", rounds=len(seconds["plain"]),
               median_step_s={k: round(statistics.median(v), 4) for k, v in seconds.items()},
               ekd_cached_over_plain=ratio("ekd_cached", "plain"),
               ekd_cached_over_online=ratio("ekd_cached", "ekd_online"),
               peak_gpu_memory_gib=peaks if device.type == "cuda" else None)
    return out


# ------------------------------------------------------------------------------------------------ main
def parse(argv=None) -> Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: a dry run)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths, measures nothing")
    parser.add_argument("--parts", default="extraction,pools,train_step,split_head",
                        help="comma-separated parts to run")
    return parser.parse_args(argv)


def refusal(args) -> str | None:
    """Why this machine or these options cannot run the check (None: they can)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return ("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch "
                f"{torch.__version__}); run it on a CUDA machine, or `--device cpu --tiny` for a dry run of the "
                "code paths (not a GPU measurement)")
    if not args.device.startswith("cuda") and not args.tiny:
        return f"gpu_check: --device {args.device} measures nothing about a GPU; add --tiny for a dry run"
    return None


def main(argv=None) -> int:
    args = parse(argv)
    problem = refusal(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sizes = SIZES["tiny" if args.tiny else "full"]
    parts = {"extraction": extraction_check, "pools": pools_check, "train_step": train_step_check,
             "split_head": split_head_check}
    chosen = [p for p in args.parts.split(",") if p]
    unknown = set(chosen) - set(parts)
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(sorted(unknown))}; use {', '.join(parts)}", file=sys.stderr)
        return 2
    report = {"benchmark": "gpu-check", "gpu_measurement": device.type == "cuda" and not args.tiny,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "sizes": "tiny (dry run of the code paths)" if args.tiny else "full",
              "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type != "cuda":
        report["note"] = "CPU dry run: checks that the code paths run and agree; NOT a GPU measurement"
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ekd-gpu-check-"))
    try:
        for name in chosen:
            try:
                report[name] = (parts[name](sizes, device, work) if name in ("extraction", "split_head")
                                else parts[name](sizes, device))
            except CheckFailed as error:
                print(f"gpu_check: FAILED: {error}", file=sys.stderr)
                return 1
            except Exception as error:  # noqa: BLE001 - a crash in a CUDA path is a failed check, said in one line
                message = " ".join(str(error).split())
                print(f"gpu_check: FAILED: {name} crashed: {type(error).__name__}: {message}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = True
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
