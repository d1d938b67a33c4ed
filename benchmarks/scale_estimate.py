"""What a real run costs (MS1MV2, Glint360K), from the rates benchmarks/scale.py measured on this machine.

Reads scale.py's `--json` file and measures, in CPU seconds of this process on one thread, the training rate of the
real student (mbf x1.0, 512-d, 112 px, forward + backward + SGD step, with the full-softmax head's FLOPs
added per class). CPU figures are per-core rates x cores (linear scaling assumed: extraction shards and
Dask workers are independent, the pair scan is BLAS blocks; training on many cores scales worse: an
optimistic bound). GPU figures are FLOP-based estimates (no GPU here), with the assumptions in GPU below.

    python benchmarks/scale_estimate.py /tmp/scale/full.json [--markdown]

Prints one JSON line (and with --markdown the README table).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from arguments import existing_file, load_json, run_main

DATASETS = {"MS1MV2": (5_822_653, 85_742), "Glint360K": (17_091_657, 360_232)}
DIM, M_PAIRS, K = 512, 1_000_000, 16
CORES, GPUS = (2, 16, 64), (1, 8)
SAMPLE = 500_000  # build-pools --threshold-rows suggested at MS1M scale on CPU
# GPU assumptions (A100-class, no GPU measured here):
GPU = {
    "r100_forwards_per_s": 3200,   # fp16 autocast, channels-last, batch 512 (~24.2 GFLOP each: ~25% of 312 TFLOP/s)
    "fp32_tflops": 15.0,           # exact pair scan: fp32 matmul (~77% of 19.5 TFLOP/s), selection hidden behind it
    "scan_passes": 1.5,            # thresholds / one pass (benchmarks/pools.py's target, pilot windows)
    "train_tflops": 20.0,          # mbf under AMP: depthwise convs keep it far below peak (~6% of 312)
}
MBF_GFLOP = 2 * 0.45               # mbf x1.0 forward at 112 px (0.45 GMAC); training ~3x forward


def student_train_rate(batch: int = 16) -> float:
    """Images/s of one mbf x1.0 training step (forward, backward, SGD) at 112 px on one thread."""
    import torch

    from pipeline.models import get_model

    torch.set_num_threads(1)
    model = get_model("mbf", input_size=112, width=1.0, num_features=DIM).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 112, 112)
    for timed in (False, True):  # CPU seconds of this process: the rate of one core, however busy the machine
        started = time.process_time()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return batch / (time.process_time() - started)


def sampler_step_ms(identities: int, setdiff: bool, steps: int = 10) -> float:
    """Milliseconds per batch of the hard-pair sampler (train-student's `--sampler pairs`, the main process)
    at `identities` x 30 images, batch 64 + 64; `setdiff`: the former O(identities)-per-batch draw."""
    import numpy as np

    from pipeline.training.pair_sampler import HardPairBatchSampler

    class Setdiff(HardPairBatchSampler):
        def _free_identities(self, picks, taken):
            return np.setdiff1d(self._identities, np.fromiter(taken, dtype=np.int64, count=len(taken)))[picks]

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(identities), 30)
    pairs = rng.integers(0, labels.size, (100_000, 2))
    sampler = (Setdiff if setdiff else HardPairBatchSampler)(labels, 64, 64, pairs, pair_share=0.5)
    batches = iter(sampler)
    started = time.process_time()
    for _ in range(steps):
        next(batches)
    return (time.process_time() - started) / steps * 1e3


def hours(seconds: float) -> float:
    return round(seconds / 3600, 2)


def estimate(scale: dict, train_rate: float) -> dict:
    lines = {line["stage"]: line for line in scale["lines"]}
    rates = scale["rates"]["images_per_s"]
    pools = lines["build-pools"]
    # per-pair cost of the whole build-pools stage at the largest size (CPU seconds: the machine is shared)
    ns_per_pair = pools["cpu_s"][-1] / pools["negative_pairs"][-1] * 1e9
    out = {"measured": {"r100_images_per_s_1core": rates.get("r100"), "student_train_images_per_s_1core":
                        round(train_rate, 2), "build_pools_ns_per_pair_1core": round(ns_per_pair, 3)}}
    for name, (n, c) in DATASETS.items():
        pairs = n * (n - 1) / 2
        fc_gflop = 3 * 2 * DIM * c / 1e9  # full-softmax head, forward + backward, per image
        train_image_s = 1 / train_rate * (1 + fc_gflop / (3 * MBF_GFLOP))
        epoch_images = 2 * n  # the EKD general + balanced batch: N / B steps of 2B images
        cpu = {}
        for cores in CORES:
            cpu[cores] = {
                "extract_h": hours(n / rates["r100"] / cores),
                "thresholds_exact_h": hours(pairs * ns_per_pair / 1e9 / cores),
                "thresholds_sample_h": hours(SAMPLE ** 2 / 2 * ns_per_pair / 1e9 / cores),
                "train_epoch_h": hours(epoch_images * train_image_s / cores),
                "online_epoch_h": hours(epoch_images * (train_image_s + 1 / (2 * rates["r100"])) / cores),
            }
        gpu = {}
        for g in GPUS:
            train_flop = 3 * MBF_GFLOP * 1e9 + fc_gflop * 1e9
            gpu[g] = {
                "extract_h": hours(2 * n / GPU["r100_forwards_per_s"] / g),
                "thresholds_exact_h": hours(pairs * 2 * DIM * GPU["scan_passes"] / (GPU["fp32_tflops"] * 1e12) / g),
                "train_epoch_h": hours(epoch_images * train_flop / (GPU["train_tflops"] * 1e12) / g),
                "online_epoch_h": hours(epoch_images * (train_flop / (GPU["train_tflops"] * 1e12)
                                                        + 1 / GPU["r100_forwards_per_s"]) / g),
            }
        out[name] = {"images": n, "identities": c, "negative_pairs": pairs,
                     "cache_gb": round(n * 2 * DIM * 2 / 1e9, 1),
                     "pools_gb": round((c * (DIM * 4 + 8 + K * 12) + M_PAIRS * 20) / 1e9, 2),
                     "cpu": cpu, "gpu": gpu}
    out["gpu_assumptions"] = GPU
    return out


def markdown(result: dict) -> str:
    rows = ["| | images | identities | cache | pools (m=1e6) | extract (r100) | exact thresholds | "
            f"thresholds --threshold-rows {SAMPLE:,} | train-student, 1 epoch (mbf) | online-teacher epoch |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in DATASETS:
        d = result[name]
        first = f"| **{name}** | {d['images']:,} | {d['identities']:,} | {d['cache_gb']} GB | {d['pools_gb']} GB"
        rows.append(first + " | | | | | |")
        for cores, c in d["cpu"].items():
            rows.append(f"| {cores} CPU cores | | | | | {c['extract_h']} h | {c['thresholds_exact_h']} h | "
                        f"{c['thresholds_sample_h']} h | {c['train_epoch_h']} h | {c['online_epoch_h']} h |")
        for g, c in d["gpu"].items():
            rows.append(f"| {g} GPU (estimate) | | | | | {c['extract_h']} h | {c['thresholds_exact_h']} h | "
                        f"(not needed) | {c['train_epoch_h']} h | {c['online_epoch_h']} h |")
    return "\n".join(rows)


def read_scale(parser: argparse.ArgumentParser, path: Path) -> dict:
    """scale.py's `--json` file, with what `estimate` reads from it; `parser.error` naming what it lacks."""
    scale = load_json(parser, "scale_json", path)
    lines = scale.get("lines") if isinstance(scale, dict) else None
    if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
        parser.error(f"scale_json {path}: not the --json file of benchmarks/scale.py (no 'lines')")
    pools = next((line for line in lines if line.get("stage") == "build-pools"), {})
    cpu_s, pairs = pools.get("cpu_s") or [None], pools.get("negative_pairs") or [None]
    if not all(isinstance(v, (int, float)) and v > 0 for v in (cpu_s[-1], pairs[-1])):
        parser.error(f"scale_json {path}: no build-pools stage with its CPU seconds and negative pairs")
    rates = scale.get("rates")
    rates = rates.get("images_per_s") if isinstance(rates, dict) else None
    rate = rates.get("r100") if isinstance(rates, dict) else None
    if not isinstance(rate, (int, float)) or rate <= 0:
        parser.error(f"scale_json {path}: no r100 forward rate (scale.py ran with --reference-arch r100, not --tiny)")
    return scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scale_json", type=existing_file)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = estimate(read_scale(parser, args.scale_json), student_train_rate())
    result["sampler_ms_per_step"] = {
        f"{c}": {"before_setdiff": round(sampler_step_ms(c, True), 3), "after": round(sampler_step_ms(c, False), 3)}
        for c in (208, 833, 3333, 85_742, 360_232)}
    print(json.dumps(result))
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    run_main(main)
