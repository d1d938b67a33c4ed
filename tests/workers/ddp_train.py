"""One torchrun rank of tests/training/test_training_ddp.py.

Run as `python -m torch.distributed.run --nproc_per_node 2 ... tests/workers/ddp_train.py DATA OUT`: each rank
trains (1) a tiny MobileFaceNet on the RecordIO set DATA with a margin + EKD loss and (2) a BatchNorm-free
linear backbone on mirror-symmetric images, and saves what it ended with under OUT.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run by path: sys.path[0] is tests/workers, and `helpers` lives in tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from helpers.training import (
    capture_trainees,
    ekd_distillation,
    tiny_config,
    train_linear_on_mirrored,
)

from pipeline.formats.recordio import FaceRecordIO
from pipeline.training.loop import train
from pipeline.training import ddp


def main(data: Path, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    rank = int(os.environ["RANK"])
    source = FaceRecordIO(data)
    with capture_trainees() as built:
        # the replicated head, whose replicas this test compares (the split head: tests/training/test_split_head.py)
        train(tiny_config(out / "mbf", epochs=1, batch_size=4, head_parallel=False), source, source.num_classes,
              ekd_distillation(len(source)))
    trainee = built[0]
    torch.save({"parameters": {k: v.detach() for k, v in trainee.named_parameters()},
                "initial": trainee.initial, "buffers": dict(trainee.named_buffers())},
               out / f"mbf_rank{rank}.pt")
    torch.save(train_linear_on_mirrored(out / "linear"), out / f"linear_rank{rank}.pt")
    ddp.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
