"""gpu_check.py's split-head part: the split margin head under NCCL (one process) against the replicated head, in
strict fp32 and under AMP, and both heads' forward + backward timed."""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from gpu_common import measured, require, strict_fp32

import train_step as step_bench
from pipeline.losses.margin import MarginHead
from pipeline.training.split_head import SplitMarginHead

BOUNDS = {"split_head_max_relative_difference": 1e-5, "split_head_amp_loss_relative_difference": 2e-2}


@contextmanager
def one_process_group(device: torch.device, work: Path):
    """A process group of this process alone: NCCL on CUDA, gloo for the CPU dry run; its backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    require(not dist.is_initialized(), "split head: a process group is already initialised")
    if device.type == "cuda":
        torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
    dist.init_process_group(backend, init_method=f"file://{work / 'split-head-rendezvous'}", rank=0, world_size=1)
    try:
        yield dist.get_backend()
    finally:
        dist.destroy_process_group()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def head_pass(head, embeddings: torch.Tensor, labels: torch.Tensor, amp: bool = False):
    """Loss, embedding gradient and head gradient of one forward + backward (gradients reset first)."""
    head.weight.grad = None
    x = embeddings.clone().requires_grad_()
    with torch.autocast(embeddings.device.type, dtype=torch.float16, enabled=amp):
        loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


def split_head_check(sizes: dict, device: torch.device, work: Path) -> dict:
    classes, dim, batch = sizes["head_classes"], sizes["dim"], sizes["batch"]
    out: dict = {"classes": classes, "dim": dim, "batch": batch, "world_size": 1}
    with measured(device, out), one_process_group(device, work) as backend:
        require(backend == ("nccl" if device.type == "cuda" else "gloo"), f"split head: backend {backend}")
        out["backend"] = backend
        heads = {}
        for name, kind in (("replicated", MarginHead), ("split", SplitMarginHead)):
            torch.manual_seed(0)
            heads[name] = kind(classes, dim).to(device)
        require(torch.equal(heads["split"].weight, heads["replicated"].weight),
                "split head: its rows are not the replicated head's at world size 1")
        g = torch.Generator().manual_seed(0)
        embeddings = torch.randn(batch, dim, generator=g).to(device)
        labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        with strict_fp32():
            passes = {name: head_pass(head, embeddings, labels) for name, head in heads.items()}
        differences = {f"{part}_relative_difference": relative(passes["split"][i], passes["replicated"][i])
                       for i, part in enumerate(("loss", "embedding_gradient", "head_gradient"))}
        out["fp32_split_vs_replicated"] = differences
        for name, value in differences.items():
            require(value <= BOUNDS["split_head_max_relative_difference"],
                    f"split head: {name} {value:.3g} against the replicated head under {backend}")
        amp = device.type == "cuda"
        loss = head_pass(heads["split"], embeddings, labels, amp=amp)[0]
        out["amp_loss"] = {"amp": amp, "dtype": str(loss.dtype), "relative_to_fp32": relative(loss, passes["split"][0])}
        require(loss.dtype == torch.float32 and bool(torch.isfinite(loss)), f"split head: AMP loss {loss}")
        require(out["amp_loss"]["relative_to_fp32"] <= BOUNDS["split_head_amp_loss_relative_difference"],
                f"split head: AMP loss {float(loss):.6g} against fp32 {float(passes['split'][0]):.6g}")
        seconds: dict = {name: [] for name in heads}
        for _ in range(sizes["rounds"]):
            for name, head in heads.items():
                seconds[name].append(step_bench.timed(lambda: head_pass(head, embeddings, labels, amp=amp), device))
        out["median_forward_backward_s"] = {k: round(statistics.median(v[1:] or v), 4) for k, v in seconds.items()}
    return out
