"""One gloo DDP rank of tests/losses/test_ddp_losses.py (a torch.multiprocessing target, imported by the fork server):
the linear KD student of helpers.training.run_kd_loss_case trained on this rank's slice, for every case."""
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.training import KD_LOSS_CASES, run_centre_case, run_kd_loss_case, run_projection_case


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: run every case and save the results for the test to compare."""
    torch.set_num_threads(1)  # two ranks share a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: run_kd_loss_case(name, rank, world) for name in KD_LOSS_CASES}
        results["adadistill"] = run_centre_case(rank, world)
        results["projected-l2"] = run_projection_case(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
