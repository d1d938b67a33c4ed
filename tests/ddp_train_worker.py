"""Helpers for the training tests (tiny data sets, tiny configs, spies), and one torchrun rank of the DDP test.

Run as a script under `python -m torch.distributed.run --nproc_per_node 2 ... ddp_train_worker.py DATA OUT`:
each rank trains (1) a tiny MobileFaceNet on the RecordIO set DATA with a margin + EKD loss and (2) a
BatchNorm-free linear backbone on mirror-symmetric images, and saves what it ended with under OUT.
Not a test module itself.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import training
from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import FaceRecordIO, write_face_recordio
from pipeline.losses.kd import build_kd_loss
from pipeline.training import ddp
from pipeline.training import step as training_step

SIZE, DIM = 16, 16
TINY_MBF = {"input_size": SIZE, "width": 0.125, "num_features": DIM}


def write_random_faces(out_dir: Path, classes: int = 16, per_class: int = 3, seed: int = 0) -> Path:
    """A RecordIO training folder of random (not mirror-symmetric) SIZE x SIZE JPEGs, `per_class` per class."""
    rng = np.random.default_rng(seed)
    items = [(encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)), c)
             for c in range(classes) for _ in range(per_class)]
    write_face_recordio(out_dir, items)
    return out_dir


def tiny_config(out_dir: Path, **overrides) -> training.TrainConfig:
    """A CPU config that trains the tiny MobileFaceNet in about a second per epoch."""
    knobs = dict(out_dir=out_dir, arch="mbf", arch_kwargs=dict(TINY_MBF), epochs=2, batch_size=8, lr=0.1,
                 warmup_epochs=0.5, margin_s=16.0, workers=0, device="cpu", amp=False)
    knobs.update(overrides)
    return training.TrainConfig(**knobs)


def ekd_reference_distillation(num_images: int, views_differ: bool = True, seed: int = 0,
                               **kwargs) -> training.Distillation:
    """Reference-mode EKD (EMA threshold buffers) against random (N, 2, DIM) teacher targets."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(num_images, 2, DIM, generator=g)
    if not views_differ:
        targets[:, 1] = targets[:, 0]
    loss = build_kd_loss("ekd", mode="reference", anchors=(2, 5, 20), topk=8, temperature=0.05, momentum=0.5)
    return training.Distillation(loss=loss, targets=targets, **kwargs)


class MirroredFaces:
    """An in-memory face source of mirror-symmetric images: a flip leaves every image unchanged."""

    def __init__(self, classes: int = 8, per_class: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        left = rng.integers(0, 256, (classes * per_class, SIZE, SIZE // 2, 3), dtype=np.uint8)
        self.images = np.concatenate([left, left[:, :, ::-1]], axis=2)
        self.labels = np.repeat(np.arange(classes), per_class)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, i: int) -> np.ndarray:
        return self.images[i]


def linear_backbone(name: str, **kwargs) -> nn.Module:
    """A BatchNorm-free backbone: per-sample outputs do not depend on the rest of the batch."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, kwargs["num_features"]))


@contextlib.contextmanager
def capture_trainees(backbone_factory=None):
    """Record every FaceTrainee that `train` builds (optionally with another backbone factory)."""
    built = []
    original_trainee, original_factory = training_step.FaceTrainee, training_step.get_model

    class RecordedTrainee(original_trainee):
        def __init__(self, *args):
            super().__init__(*args)
            self.initial = {k: v.detach().clone() for k, v in self.named_parameters()}
            built.append(self)

    training_step.FaceTrainee = RecordedTrainee
    if backbone_factory is not None:
        training_step.get_model = backbone_factory
    try:
        yield built
    finally:
        training_step.FaceTrainee, training_step.get_model = original_trainee, original_factory


def train_linear_on_mirrored(out_dir: Path, global_batch: int = 8, kd: bool = True) -> dict[str, torch.Tensor]:
    """Margin (+ EKD) training of the linear backbone on MirroredFaces with `global_batch` images per step
    over all ranks; returns the trained parameters."""
    source = MirroredFaces()
    cfg = tiny_config(out_dir, batch_size=global_batch // ddp.world_size(), epochs=1, warmup_epochs=0.0)
    distill = ekd_reference_distillation(len(source), views_differ=False) if kd else None
    with capture_trainees(linear_backbone) as built:
        training.train(cfg, source, source.num_classes, distill)
    return {k: v.detach().clone() for k, v in built[0].named_parameters()}


def main(data: Path, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    rank = int(os.environ["RANK"])
    source = FaceRecordIO(data)
    with capture_trainees() as built:
        training.train(tiny_config(out / "mbf", epochs=1, batch_size=4), source, source.num_classes,
                       ekd_reference_distillation(len(source)))
    trainee = built[0]
    torch.save({"parameters": {k: v.detach() for k, v in trainee.named_parameters()},
                "initial": trainee.initial, "buffers": dict(trainee.named_buffers())},
               out / f"mbf_rank{rank}.pt")
    torch.save(train_linear_on_mirrored(out / "linear"), out / f"linear_rank{rank}.pt")
    ddp.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
