"""One gloo rank of tests/training/test_split_head.py (a torch.multiprocessing target, imported by the fork
server): every case of helpers.split_head on this rank, saved for the test to compare. `resume_from`: a
checkpoint another world size wrote, to load and continue."""
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import split_head as cases


def worker(rank: int, world: int, init_file: str, out_dir: str, resume_from: str) -> None:
    torch.set_num_threads(1)  # the ranks share a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out_dir)
    try:
        results = {f"{kind}-{'split' if split else 'replicated'}": cases.run_parity(out, split, kind)
                   for kind in ("arcface", "cosface") for split in (False, True)}
        results["sampled"] = cases.run_sampled(out)
        results["centres"] = cases.run_centres(out)
        results["saved"] = cases.run_until_checkpoint(out, out / "checkpoint.pt")
        if resume_from:
            results["resumed"] = cases.resume_and_continue(out, Path(resume_from))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
