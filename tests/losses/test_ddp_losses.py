"""Under 2-process gloo DDP, gathered KD losses (and AdaDistill's centre update, and the learned projection of
feature terms to a teacher of another size) give the single-process loss, gradients and state exactly."""

import pytest
import torch
from helpers.processes import spawn_gloo
from helpers.training import KD_LOSS_CASES, run_centre_case, run_kd_loss_case, run_projection_case
from workers import ddp_kd_losses

from pipeline.training import ddp

pytestmark = pytest.mark.slow  # processes of their own: skip locally with -m "not slow"; CI runs them


def _spawn(world: int, tmp_path) -> list[dict]:
    """Run `world` gloo ranks and load their results."""
    spawn_gloo(ddp_kd_losses.worker, world, tmp_path, str(tmp_path), preload="workers.ddp_kd_losses")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def test_ddp_kd_losses_equal_single_process_on_concatenated_batch(tmp_path):
    ranks = _spawn(2, tmp_path)
    # adadistill: every rank's centres follow the global batch; projected-l2: the learned map to a teacher of
    # another size gets the gradient of the global batch on every rank (DDP does not own it)
    special = {"adadistill": run_centre_case, "projected-l2": run_projection_case}
    for name in [*KD_LOSS_CASES, *special]:
        single = special[name]() if name in special else run_kd_loss_case(name)
        assert any(g.abs().max() > 1e-3 for step in single["grads"] for g in step), name  # non-trivial
        for result in ranks:
            ddp = result[name]
            torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]),
                                       rtol=0, atol=1e-6)
            for step, (got, want) in enumerate(zip(ddp["grads"], single["grads"])):
                for g_ddp, g_single in zip(got, want):
                    torch.testing.assert_close(g_ddp, g_single, rtol=0, atol=1e-6, msg=f"{name} step {step}")
            assert ddp["state"].keys() == single["state"].keys()
            for key, value in single["state"].items():
                torch.testing.assert_close(ddp["state"][key], value, rtol=0, atol=1e-9, msg=f"{name} {key}")


def test_helpers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.init_from_env() is False and not ddp.is_distributed()
    assert ddp.rank() == 0 and ddp.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert ddp.all_gather_with_grad(x) is x and torch.equal(ddp.all_gather_no_grad(x), x)
    # scale_for_ddp keeps the value and multiplies the gradient by the world size
    monkeypatch.setattr(ddp, "world_size", lambda: 3)
    loss = (x ** 2).sum()
    scaled = ddp.scale_for_ddp(loss)
    assert scaled.item() == loss.item()
    scaled.backward()
    torch.testing.assert_close(x.grad, 3 * 2 * x.detach(), rtol=0, atol=0)
