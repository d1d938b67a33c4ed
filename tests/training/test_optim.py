"""SGD parameter groups (no weight decay on BatchNorm) and the LR schedules against torch's own schedulers."""

import math

import pytest
import torch
from torch import nn

from pipeline.losses.margin import MarginHead
from pipeline.models import get_model
from pipeline.training.optim import lr_factor, sgd_without_bn_decay


def _decay_of(optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_batchnorm_gets_no_weight_decay_everything_else_does():
    backbone = get_model("mbf", input_size=16, width=0.125, num_features=8)
    head = MarginHead(5, 8)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    optimizer = sgd_without_bn_decay([backbone, head, backbone, frozen], lr=0.1, momentum=0.9, weight_decay=5e-4)
    decay = _decay_of(optimizer)
    expected = {}
    for module in (backbone, head):
        for name, sub in module.named_modules():
            for param in sub.parameters(recurse=False):
                expected[id(param)] = 0.0 if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)) else 5e-4
    assert decay == expected  # every trainable parameter once (shared modules too), frozen ones left out
    kinds = {type(sub) for sub in backbone.modules() if any(True for _ in sub.parameters(recurse=False))}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.PReLU, nn.Linear} <= kinds  # all kinds covered
    assert decay[id(head.weight)] == 5e-4
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in [*backbone.parameters(), *head.parameters()])


def test_decay_step_shrinks_only_decayed_parameters():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.PReLU(3), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sgd_without_bn_decay([model], lr=0.5, momentum=0.0, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for (name, p), old in zip(model.named_parameters(), before):
        factor = 1.0 if name.startswith("1.") else 1 - 0.5 * 0.1  # module "1" is the BatchNorm
        torch.testing.assert_close(p.detach(), old * factor, rtol=1e-6, atol=0, msg=name)


def _torch_factors(scheduler_cls, steps: int, **kwargs) -> list[float]:
    """The LR multipliers torch's scheduler gives at steps 0..steps-1 (base LR 1)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


SPE, EPOCHS = 10, 6  # steps per epoch, epochs: 60 steps


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.5])
@pytest.mark.parametrize("schedule", ["poly", "step", "cosine"])
def test_schedules_match_torch_schedulers(schedule, warmup_epochs):
    warmup, total = int(warmup_epochs * SPE), SPE * EPOCHS
    milestones = (2, 4.5)
    got = [lr_factor(s, SPE, EPOCHS, warmup_epochs, schedule, milestones) for s in range(total)]
    # warmup: linear from 1/W to 1 over the first W steps
    want = _torch_factors(torch.optim.lr_scheduler.LinearLR, warmup, start_factor=1 / warmup, end_factor=1.0,
                          total_iters=warmup - 1) if warmup else []
    rest = total - warmup
    if schedule == "poly":
        want += _torch_factors(torch.optim.lr_scheduler.PolynomialLR, rest, total_iters=rest, power=2.0)
    elif schedule == "cosine":
        want += _torch_factors(torch.optim.lr_scheduler.CosineAnnealingLR, rest, T_max=rest)
    else:  # milestones count in epochs from the start of training, warmup included
        want += _torch_factors(torch.optim.lr_scheduler.MultiStepLR, rest, gamma=0.1,
                               milestones=[round(m * SPE) - warmup for m in milestones])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)


def test_schedule_values_by_hand():
    # warmup 2 epochs of 10 steps, then poly over the remaining 80 of 100 steps
    assert lr_factor(0, 10, 10, 2.0, "poly") == pytest.approx(1 / 20)
    assert lr_factor(19, 10, 10, 2.0, "poly") == pytest.approx(1.0)
    assert lr_factor(60, 10, 10, 2.0, "poly") == pytest.approx(0.5 ** 2)
    assert lr_factor(100, 10, 10, 2.0, "poly") == 0.0
    assert lr_factor(60, 10, 10, 2.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(29, 10, 10, 0.0, "step", (3, 6)) == 1.0
    assert lr_factor(30, 10, 10, 0.0, "step", (3, 6)) == pytest.approx(0.1)
    assert lr_factor(65, 10, 10, 0.0, "step", (3, 6)) == pytest.approx(0.01)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_factor(5, 10, 10, 0.0, "linear")
