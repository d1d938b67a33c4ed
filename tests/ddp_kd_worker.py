"""Helper for tests/test_ddp_losses.py: a tiny linear student trained with a KD loss, in one process or as
one rank of a gloo DDP group (spawned by the test). Not a test module itself."""

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.losses.kd import build_kd_loss
from pipeline.training.ddp import gather_kd_inputs, scale_for_ddp

GLOBAL_BATCH, IN_DIM, EMB_DIM, STEPS = 16, 5, 4, 3
CASES = {
    "ekd-global": ("ekd", {"mode": "global", "teacher_thresholds": [0.1, 0.4, 0.7], "anchors": (2, 5, 50),
                           "queue_size": 24, "topk": 6, "temperature": 0.05}),
    "ekd-reference": ("ekd", {"mode": "reference", "anchors": (2, 5, 50), "topk": 6, "temperature": 0.05,
                              "momentum": 0.5}),
    "rkd": ("rkd", {}),
}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: inputs, teacher embeddings, labels (same on every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64)
    teacher = torch.randn(GLOBAL_BATCH, EMB_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return x, teacher, labels


def run_case(name: str, rank: int = 0, world: int = 1) -> dict:
    """Train STEPS SGD steps on this rank's slice; returns losses, gradients per step and the loss state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(IN_DIM, EMB_DIM).double()
    kd_name, kwargs = CASES[name]
    kd = build_kd_loss(kd_name, **kwargs).double()
    net = DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    losses, grads = [], []
    for step in range(STEPS):
        x, teacher, labels = _batch(step)
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


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: run every case and save the results for the test to compare."""
    torch.set_num_threads(1)  # two ranks share a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: run_case(name, rank, world) for name in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
