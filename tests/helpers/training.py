"""Training helpers: tiny configs, distillation against random teacher targets, trainee capture, the comparison of
two finished runs, and two small reference trainings (a linear backbone on mirrored faces; a linear student
under a KD loss) that the DDP tests also run as one rank of a process group."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from helpers.data import FACE_SIZE, MirroredFaces
from pipeline.evaluation.curves import read_history
from pipeline.losses.centres import AdaDistill
from pipeline.losses.margin import MarginHead
from pipeline.losses.registry import build_kd_loss
from pipeline.models.model_file import safe_torch_load
from pipeline.training.config import TrainConfig
from pipeline.training.distill import Distillation
from pipeline.training.loop import train
from pipeline.training import ddp
from pipeline.training import step as training_step
from pipeline.training.ddp import all_reduce_sum, gather_kd_inputs, scale_for_ddp
from pipeline.training.distill import KDTerm

EMBEDDING_DIM = 16
TINY_MBF = {"input_size": FACE_SIZE, "width": 0.125, "num_features": EMBEDDING_DIM}


def tiny_config(out_dir: Path, **overrides) -> TrainConfig:
    """A CPU config that trains the tiny MobileFaceNet in about a second per epoch."""
    knobs = dict(out_dir=out_dir, arch="mbf", arch_kwargs=dict(TINY_MBF), epochs=2, batch_size=8, lr=0.1,
                 warmup_epochs=0.5, margin_s=16.0, workers=0, device="cpu", amp=False)
    knobs.update(overrides)
    return TrainConfig(**knobs)


def ekd_distillation(num_images: int, views_differ: bool = True, seed: int = 0, l2_weight: float | None = None,
                     mode: str = "reference", adadistill: bool = False, **kwargs) -> Distillation:
    """EKD against random (N, 2, EMBEDDING_DIM) teacher targets: reference mode (EMA threshold buffers) or
    global mode (fixed teacher thresholds, a 24-row queue of recent student embeddings that wraps within an
    epoch); with `l2_weight`, feature L2 as a first term (the l2+ekd combination); with `adadistill`, AdaDistill
    moves the margin head's centres (adadistill+ekd)."""
    if adadistill:
        kwargs["head"] = AdaDistill()
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(num_images, 2, EMBEDDING_DIM, generator=g)
    if not views_differ:
        targets[:, 1] = targets[:, 0]
    options = {"momentum": 0.5} if mode == "reference" else {"teacher_thresholds": [0.1, 0.4, 0.7], "queue_size": 24}
    loss = build_kd_loss("ekd", mode=mode, anchors=(2, 5, 20), topk=8, temperature=0.05, **options)
    if l2_weight is None:
        return Distillation(loss=loss, targets=targets, **kwargs)
    terms = [KDTerm("l2", build_kd_loss("l2"), l2_weight), KDTerm("ekd", loss, 1.0)]
    return Distillation(targets=targets, terms=terms, **kwargs)


def assert_same_run(got: Path, want: Path) -> tuple[dict, dict]:
    """Two finished run folders hold the same result: model.pt weights and run identity bit for bit, the final
    checkpoint (head, KD buffers) and the DVCLive history (timings aside). Returns `want`'s checkpoint and
    history."""
    models = [safe_torch_load(run / "model.pt") for run in (got, want)]
    assert_same_tensors(models[0]["state_dict"], models[1]["state_dict"])
    assert models[0]["extra"]["run"] == models[1]["extra"]["run"]
    states = [safe_torch_load(run / "checkpoint.pt") for run in (got, want)]
    assert_same_tensors(states[0]["trainee"], states[1]["trainee"])  # the head too
    for got_state, want_state in zip(states[0]["extra_modules"], states[1]["extra_modules"], strict=True):
        assert_same_tensors(got_state, want_state)
    histories = [read_history(run / "dvclive") for run in (got, want)]
    untimed = [{k: v for k, v in h.items() if "images_per_s" not in k} for h in histories]
    assert untimed[0] == untimed[1] and "train/loss" in untimed[0] and "epoch/loss" in untimed[0]
    return states[1], untimed[1]


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def linear_backbone(name: str, **kwargs) -> nn.Module:
    """A BatchNorm-free backbone: per-sample outputs do not depend on the rest of the batch."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * FACE_SIZE * FACE_SIZE, kwargs["num_features"]))


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
    cfg = tiny_config(out_dir, batch_size=global_batch // ddp.world_size(), epochs=1, warmup_epochs=0.0,
                      head_parallel=False)  # the replicated head, whose replicas the DDP test compares
    distill = ekd_distillation(len(source), views_differ=False) if kd else None
    with capture_trainees(linear_backbone) as built:
        train(cfg, source, source.num_classes, distill)
    return {k: v.detach().clone() for k, v in built[0].named_parameters()}


# ------------------------------------------------- a linear student under a KD loss, whole batch or DDP slice
KD_GLOBAL_BATCH, KD_IN_DIM, KD_EMB_DIM, KD_STEPS = 16, 5, 4, 3
KD_LOSS_CASES = {
    "ekd-global": ("ekd", {"mode": "global", "teacher_thresholds": [0.1, 0.4, 0.7], "anchors": (2, 5, 50),
                           "queue_size": 24, "topk": 6, "temperature": 0.05}),
    "ekd-reference": ("ekd", {"mode": "reference", "anchors": (2, 5, 50), "topk": 6, "temperature": 0.05,
                              "momentum": 0.5}),
    "rkd": ("rkd", {}),
}


def _kd_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: inputs, teacher embeddings, labels (same on every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(KD_GLOBAL_BATCH, KD_IN_DIM, generator=g, dtype=torch.float64)
    teacher = torch.randn(KD_GLOBAL_BATCH, KD_EMB_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (KD_GLOBAL_BATCH,), generator=g)
    return x, teacher, labels


def run_kd_loss_case(name: str, rank: int = 0, world: int = 1) -> dict:
    """Train a linear student KD_STEPS SGD steps with the KD loss of KD_LOSS_CASES[name] on this rank's slice
    of each global batch; returns losses, gradients per step and the loss state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(KD_IN_DIM, KD_EMB_DIM).double()
    kd_name, kwargs = KD_LOSS_CASES[name]
    kd = build_kd_loss(kd_name, **kwargs).double()
    net = DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * KD_GLOBAL_BATCH // world, (rank + 1) * KD_GLOBAL_BATCH // world)
    losses, grads = [], []
    for step in range(KD_STEPS):
        x, teacher, labels = _kd_batch(step)
        student, teacher, labels = gather_kd_inputs(net(x[rows]), teacher[rows], labels[rows])
        loss = kd(student, teacher, labels)
        model.zero_grad()
        scale_for_ddp(loss).backward()
        losses.append(loss.item())
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        with torch.no_grad():  # plain SGD by hand: torch.optim's first use imports dynamo (seconds)
            for p in model.parameters():
                p -= 0.5 * p.grad
    return {"losses": losses, "grads": grads, "state": dict(kd.state_dict())}


def run_centre_case(rank: int = 0, world: int = 1) -> dict:
    """AdaDistill through `Distillation.update_centres` and a centre-less margin head, on a linear student: this
    rank's slice of each global batch; returns losses, gradients per step and the head's centres."""
    torch.manual_seed(0)
    model = torch.nn.Linear(KD_IN_DIM, KD_EMB_DIM).double()
    head = MarginHead(5, KD_EMB_DIM, s=8.0, learn_centres=False).double()
    distill = Distillation(targets=torch.zeros(1, 1, KD_EMB_DIM), head=AdaDistill())
    net = DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * KD_GLOBAL_BATCH // world, (rank + 1) * KD_GLOBAL_BATCH // world)
    losses, grads = [], []
    for step in range(KD_STEPS):
        x, teacher, labels = _kd_batch(step)
        student = net(x[rows])
        distill.update_centres(head.weight, student.detach(), teacher[rows], labels[rows])
        loss = head(student, labels[rows])  # DDP averages the ranks' gradients: the global batch's mean
        model.zero_grad()
        loss.backward()
        losses.append(float(all_reduce_sum(loss.detach()) / world))
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return {"losses": losses, "grads": grads, "state": {"centres": head.weight.clone()}}



def run_projection_case(rank: int = 0, world: int = 1) -> dict:
    """Feature L2 through `StudentProjection` to a teacher twice the student's size, plus RKD on the raw
    student, via `Distillation.term_losses` and `after_backward`, on a linear student: this rank's slice of
    each global batch; returns losses, the student's and the projection's gradients per step, and the map."""
    from pipeline.training.targets import StudentProjection

    torch.manual_seed(0)
    model = torch.nn.Linear(KD_IN_DIM, KD_EMB_DIM).double()
    projection = StudentProjection(KD_EMB_DIM, 2 * KD_EMB_DIM).double()
    terms = [KDTerm("l2", build_kd_loss("l2")), KDTerm("rkd", build_kd_loss("rkd"))]
    distill = Distillation(targets=torch.zeros(1, 1, 2 * KD_EMB_DIM), terms=terms, projection=projection)
    net = DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * KD_GLOBAL_BATCH // world, (rank + 1) * KD_GLOBAL_BATCH // world)
    losses, grads = [], []
    for step in range(KD_STEPS):
        x, _, labels = _kd_batch(step)
        teacher = torch.randn(KD_GLOBAL_BATCH, 2 * KD_EMB_DIM, generator=torch.Generator().manual_seed(step),
                              dtype=torch.float64)
        loss = sum(distill.term_losses(net(x[rows]), teacher[rows], labels[rows]))
        model.zero_grad()
        projection.zero_grad()
        loss.backward()
        distill.after_backward()
        parameters = [*model.parameters(), *projection.parameters()]
        losses.append(loss.item())
        grads.append([p.grad.detach().clone() for p in parameters])
        with torch.no_grad():
            for p in parameters:
                p -= 0.5 * p.grad
    return {"losses": losses, "grads": grads, "state": {"projection": projection.linear.weight.detach().clone()}}
