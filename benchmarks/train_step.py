"""Benchmark: what distilling from cached teacher targets costs per training step, relative to a plain
student step and to the same EKD step with the teacher run online (the official EKD setup).

Every variant runs train()'s per-step work (`pipeline.training.TrainStep.step`: forward with the margin head,
the teacher targets, the KD term, backward, SGD step; then the losses read back) on the same batches, in the same
process, interleaved round by round (the order rotating), `--warmup` rounds discarded; each ratio is the
median over `--repeats` rounds of the ratio measured within the round:
  plain                 - student + ArcFace head, no KD (train-teacher --arch mbf);
  ekd_cached_global     - + targets[index, flip] from an (N, 2, 512) float16 cache tensor + EKD global mode
                          (exact teacher thresholds, student queue prefilled to --queue rows: steady state);
  ekd_cached_reference  - + the same lookup + EKD reference mode (official per-batch EMA thresholds);
  ekd_online_global     - the teacher (--teacher, eval, no grad; fp16 autocast on CUDA, like the student)
                          run on every batch instead of the lookup.
  recipe_cached         - the shipped recipe (l2 + EKD global) on one cache;
  recipe_ensemble       - the same recipe on an ensemble of --teachers caches (training/targets.py's
                          EnsembleTargets: K lookups per step, each row normalised; l2 through the learned map to
                          the K*DIM-d ensemble);
  recipe_online_ensemble - the same recipe with the --teachers teachers run on every batch (online ensemble KD).
Parts, timed in the same rounds to explain the ratios: `teacher_forward` (the online extra) and
`ekd_loss_<mode>` (the loss and its backward on a leaf embedding tensor, i.e. EKD's own cost).
Batches come from BalancedBatchSampler (half general, half 4 images per identity), images are random tensors
(convolution cost does not depend on pixel values), targets are clustered per identity like real embeddings.

Issue targets: ekd_cached_over_plain <= 1.15 (the paper's online EKD costs 2.16x a plain step),
ekd_cached_over_online <= 0.25, and ensemble_over_single (recipe_ensemble / recipe_cached) <= 1.05.

    python benchmarks/train_step.py                       # mbf student, r50 teacher, 112x112, batch 128
    python benchmarks/train_step.py --batch 64 --threads 1 # steadier on a small, shared CPU
    python benchmarks/train_step.py --device cuda          # AMP + channels_last, as train() does on a GPU

Prints one JSON line (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from arguments import architecture, image_side, integer, non_negative_int, positive_int, run_main, threads, torch_device

from pipeline.machine.resources import require_memory

# torch and the pipeline's torch modules are imported where they are used: after the arguments are checked
if TYPE_CHECKING:
    import torch

    from pipeline.losses.ekd import EKDLoss
    from pipeline.models.loading import Embedder
    from pipeline.training.distill import Distillation
    from pipeline.training.step import TrainStep

DIM = 512
TARGETS = {"ekd_cached_over_plain": 1.15, "ekd_cached_over_online": 0.25, "ensemble_over_single": 1.05}
# bytes that building the (rows, 2, DIM) targets holds per row at its peak (float32 views, their stack and its
# scaled copy), and per margin-head row of each of the four students (weight, gradient, momentum)
TARGET_BYTES_PER_ROW, HEAD_BYTES_PER_CLASS = 28 * DIM, 4 * 3 * 4 * DIM


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    flips: torch.Tensor


@dataclass
class Variant:
    """One student with its own optimiser and KD state, stepped exactly as train() steps it."""

    name: str
    trainer: TrainStep

    def step(self, batch: Batch) -> None:
        losses = self.trainer.step(batch.images, batch.labels, batch.indices, batch.flips)
        losses.total.item(), losses.margin.item(), losses.kd.item()  # train() reads these back every step


class OnlineTeacher:
    """The official EKD setup: the teacher run on every batch's images (a target lookup for Distillation)."""

    def __init__(self, teacher: Embedder):
        self.teacher = teacher

    def __call__(self, images, indices, flips, device) -> torch.Tensor:
        import torch

        # TrainStep looks targets up outside its autocast block; an online teacher in an AMP run uses it too
        autocast = torch.autocast("cuda", dtype=torch.float16) if images.is_cuda else contextlib.nullcontext()
        with autocast:
            return self.teacher(images).float()


class OnlineEnsemble:
    """Several online teachers: each run on every batch, their rows read as one teacher like EnsembleTargets."""

    def __init__(self, teachers: list[OnlineTeacher]):
        self.teachers = teachers

    def __call__(self, images, indices, flips, device) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        scale = len(self.teachers) ** -0.5
        return torch.cat([F.normalize(t(images, indices, flips, device), dim=1) * scale for t in self.teachers], 1)


def clustered_targets(labels: np.ndarray, seed: int) -> torch.Tensor:
    """(N, 2, DIM) float16 raw 'teacher' embeddings: identity centre + per-image noise, flip = small change."""
    import torch

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((labels.max() + 1, DIM), dtype=np.float32)
    original = centres[labels] + rng.standard_normal((labels.size, DIM), dtype=np.float32)
    flipped = original + 0.3 * rng.standard_normal((labels.size, DIM), dtype=np.float32)
    return torch.from_numpy(np.stack([original, flipped], axis=1) * 3.0).half()  # raw norms ~ 60-90, like arcface


def teacher_thresholds(targets: torch.Tensor, labels: np.ndarray, sample: int = 4096) -> list[float]:
    """Exact thresholds over the negative pairs of a sample of the targets (stand-in for thresholds.json)."""
    import torch
    import torch.nn.functional as F

    from pipeline.losses.ekd import DEFAULT_ANCHORS
    from pipeline.losses.rank import order_statistic_thresholds

    rows = torch.arange(min(sample, targets.shape[0]))
    t = F.normalize(targets[rows, 0].float(), dim=1)
    i, j = torch.triu_indices(rows.numel(), rows.numel(), offset=1)
    lab = torch.from_numpy(labels[rows.numpy()])
    negatives = (t @ t.t())[i, j][lab[i] != lab[j]]
    return order_statistic_thresholds(negatives, DEFAULT_ANCHORS).tolist()


def make_variant(name: str, args, num_classes: int, device: torch.device, distill: Distillation | None) -> Variant:
    import torch

    from pipeline.training.config import TrainConfig
    from pipeline.training.step import TrainStep

    cfg = TrainConfig(arch=args.student, arch_kwargs={"input_size": args.size, "num_features": DIM}, lr=0.01,
                      epochs=1, seed=args.seed)
    torch.manual_seed(args.seed)  # every variant starts from the same student
    trainer = TrainStep(cfg, num_classes, steps_per_epoch=args.warmup + args.repeats, device=device,
                        distill=distill)
    trainer.model.train()
    return Variant(name, trainer)


def ekd_loss(mode: str, thresholds: list[float], queue: int, device: torch.device, seed: int,
             batch: int) -> EKDLoss:
    """EKD as train-student builds it; global mode's queue prefilled, as it is after the first steps."""
    import torch
    import torch.nn.functional as F

    from pipeline.losses.ekd import EKDLoss

    if mode == "reference":
        return EKDLoss(mode="reference").to(device)
    loss = EKDLoss(mode="global", teacher_thresholds=thresholds, queue_size=queue).to(device)
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(queue, DIM, generator=g), dim=1).to(device)
    labels = torch.randint(0, 10**6, (queue,), generator=g).to(device)
    for start in range(0, queue, batch):  # step-sized pushes, as training fills it (the first sizes its check)
        loss.queue.push(embeddings[start:start + batch], labels[start:start + batch])
    return loss


def make_batches(sampler, labels: np.ndarray, args, device: torch.device) -> list[Batch]:
    import torch

    g = torch.Generator().manual_seed(args.seed)
    out = []
    for indices in sampler:
        idx = torch.tensor(indices, dtype=torch.int64)
        images = torch.randn(len(indices), 3, args.size, args.size, generator=g).to(device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        flips = torch.rand(len(indices), generator=g) < 0.5
        out.append(Batch(images, torch.from_numpy(labels[idx.numpy()]).to(device), idx, flips))
    return out


def timed(function: Callable[[], None], device: torch.device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def loss_alone(loss: EKDLoss, batch: Batch, targets: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """EKD's own cost: the loss and its backward on a leaf (B, DIM) embedding tensor."""
    import torch

    def run():
        emb = torch.randn(batch.labels.shape[0], DIM, device=device, requires_grad=True)
        t = targets[batch.indices, batch.flips.long()].to(device).float()
        loss(emb, t, batch.labels).backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=architecture(), default="mbf")
    parser.add_argument("--teacher", type=architecture(), default="r50")
    parser.add_argument("--size", type=image_side, default=112)
    parser.add_argument("--batch", type=integer(8, multiple=8), default=128,
                        help="global batch: half general, half balanced (4 images per identity)")
    parser.add_argument("--classes", type=integer(2), default=2000, help="identities (margin head rows)")
    parser.add_argument("--rows", type=positive_int, default=100_000, help="training images (cache rows)")
    parser.add_argument("--teachers", type=integer(2, 8), default=3,
                        help="members of the ensemble variants (cached and online)")
    parser.add_argument("--queue", type=positive_int, default=65536,
                        help="EKD global mode queue (train-student default)")
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=threads(0), default=0, help="torch threads (0 = torch's default); 1 is "
                        "steadier on a machine shared with other jobs")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args()
    require_memory(f"--rows {args.rows} with --classes {args.classes}",
                   (1 + args.teachers) * args.rows * TARGET_BYTES_PER_ROW + args.classes * HEAD_BYTES_PER_CLASS)

    import torch

    from pipeline.models import get_model
    from pipeline.models.loading import Embedder
    from pipeline.losses.feature import FeatureL2Loss
    from pipeline.training.distill import Distillation, KDTerm
    from pipeline.training.sampling.balanced import BalancedBatchSampler
    from pipeline.training.targets import EnsembleTargets, StudentProjection

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device

    labels = np.sort(np.random.default_rng(args.seed).integers(0, args.classes, args.rows)).astype(np.int64)
    targets = clustered_targets(labels, args.seed)
    thresholds = teacher_thresholds(targets, labels)
    sampler = itertools.islice(BalancedBatchSampler(labels, args.batch // 2, args.batch - args.batch // 2,
                                                    per_identity=4, seed=args.seed), args.warmup + args.repeats)
    batches = make_batches(sampler, labels, args, device)
    def random_teacher(seed: int) -> Embedder:
        torch.manual_seed(seed)
        module = get_model(args.teacher, input_size=args.size, num_features=DIM).to(device).eval()
        if device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        return Embedder(module, kind="module", name=args.teacher, dim=DIM, input_size=args.size, device=device,
                        fingerprint="random-init", path=Path(f"<{args.teacher} in memory>"), module=module)

    teacher = random_teacher(args.seed)
    members = [targets] + [clustered_targets(labels, args.seed + k) for k in range(1, args.teachers)]

    def kd(mode, **source):
        return Distillation(loss=ekd_loss(mode, thresholds, args.queue, device, args.seed, args.batch), **source)

    def recipe(source, teacher_dim: int):
        """l2 + EKD global as train-student's default builds them; l2 through the map for an ensemble."""
        terms = [KDTerm("l2", FeatureL2Loss()), KDTerm("ekd", ekd_loss("global", thresholds, args.queue, device,
                                                                        args.seed, args.batch))]
        projection = StudentProjection(DIM, teacher_dim) if teacher_dim != DIM else None
        return Distillation(terms=terms, projection=projection, **source)

    online = OnlineEnsemble([OnlineTeacher(teacher)] + [OnlineTeacher(random_teacher(args.seed + k))
                                                         for k in range(1, args.teachers)])
    ensemble = EnsembleTargets(members, [1 / args.teachers] * args.teachers)
    variants = [
        make_variant("plain", args, args.classes, device, None),
        make_variant("ekd_cached_global", args, args.classes, device, kd("global", targets=targets)),
        make_variant("ekd_cached_reference", args, args.classes, device, kd("reference", targets=targets)),
        make_variant("ekd_online_global", args, args.classes, device, kd("global", targets=OnlineTeacher(teacher))),
        make_variant("recipe_cached", args, args.classes, device, recipe({"targets": targets}, DIM)),
        make_variant("recipe_ensemble", args, args.classes, device,
                     recipe({"targets": ensemble}, DIM * args.teachers)),
        make_variant("recipe_online_ensemble", args, args.classes, device,
                     recipe({"targets": online}, DIM * args.teachers)),
    ]
    parts_losses = {mode: ekd_loss(mode, thresholds, args.queue, device, args.seed, args.batch)
                    for mode in ("global", "reference")}
    seconds: dict[str, list[float]] = {}
    for r, batch in enumerate(batches):
        jobs = [(v.name, lambda v=v: v.step(batch)) for v in variants]
        jobs.append(("teacher_forward", lambda: teacher(batch.images)))
        jobs += [(f"ekd_loss_{mode}", loss_alone(loss, batch, targets, device)) for mode, loss in parts_losses.items()]
        for name, job in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:  # rotate: no variant always goes first
            spent = timed(job, device)
            if r >= args.warmup:
                seconds.setdefault(name, []).append(spent)
            print(f"round {r + 1}/{len(batches)} {name}: {spent:.3f}s", file=sys.stderr, flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a/b measured in the same round (robust to slow drifts of background load)."""
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    ratios = {
        "ekd_cached_over_plain": {m: ratio(f"ekd_cached_{m}", "plain") for m in ("global", "reference")},
        "ekd_cached_over_online": ratio("ekd_cached_global", "ekd_online_global"),
        "ekd_online_over_plain": ratio("ekd_online_global", "plain"),
        "teacher_forward_over_plain": ratio("teacher_forward", "plain"),
        "ensemble_over_single": ratio("recipe_ensemble", "recipe_cached"),
        "ensemble_cached_over_online": ratio("recipe_ensemble", "recipe_online_ensemble"),
    }
    met = {
        "ekd_cached_over_plain": {m: r <= TARGETS["ekd_cached_over_plain"]
                                  for m, r in ratios["ekd_cached_over_plain"].items()},
        "ekd_cached_over_online": ratios["ekd_cached_over_online"] <= TARGETS["ekd_cached_over_online"],
        "ensemble_over_single": ratios["ensemble_over_single"] <= TARGETS["ensemble_over_single"],
    }
    print(json.dumps({
        "benchmark": "train-step",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "student": f"{args.student} {args.size}x{args.size}",
        "teacher": f"{args.teacher} {args.size}x{args.size}",
        "batch": args.batch, "classes": args.classes, "rows": args.rows, "queue": args.queue,
        "teachers": args.teachers,
        "repeats": args.repeats, "warmup": args.warmup,
        "median_s": {k: round(v, 4) for k, v in median.items()},
        "min_s": {k: round(min(v), 4) for k, v in seconds.items()},
        **{k: (round(v, 3) if isinstance(v, float) else {m: round(x, 3) for m, x in v.items()})
           for k, v in ratios.items()},
        "targets": TARGETS, "met": met,
    }))


if __name__ == "__main__":
    run_main(main)
