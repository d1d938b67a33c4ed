"""`pipeline ARGS` with every optimisation step slowed down, or held at a chosen point, so that tests can SIGKILL
a training run in the middle of an epoch or in the middle of writing a checkpoint.

Run as `python tests/workers/slow_train.py DELAY [--hold WHERE] ARGS...` (also as a torchrun script): the real
command line entry (`pipeline.cli.main`) with a sleep of DELAY seconds before each `TrainStep.step`. With
`--hold`, the process (rank 0 under torchrun) prints "holding" and sleeps until it is killed:
- `step:N`: before optimiser step N (0-based over the run: N steps are done, their logs and checkpoints too);
- `checkpoint:N`: in its N-th write of checkpoint.pt (1-based), after the first bytes reached the temporary file.
The sleeps only stretch time; what runs and what is written are the real training loop, checkpoints and
DVCLive history.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def hold() -> None:
    print("holding", flush=True)
    while True:
        time.sleep(60)


class HeldWriter:
    """A file handle that holds the process once its first bytes are written."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data) -> int:
        written = self.handle.write(data)
        self.handle.flush()
        hold()
        return written

    def flush(self) -> None:
        self.handle.flush()


def main(delay: float, where: str | None, args: list[str]) -> None:
    from pipeline import cli
    from pipeline.training import resume
    from pipeline.training import step as training_step

    kind, _, number = (where or ":").partition(":")
    if os.environ.get("RANK", "0") != "0":
        kind = ""  # the other ranks follow rank 0 into the wait at their next collective
    real_step, real_write = training_step.TrainStep.step, resume.write_with
    checkpoint_writes = []

    def slow_step(self, *step_args, **kwargs):
        if kind == "step" and self.scheduler.last_epoch == int(number):
            hold()
        time.sleep(delay)
        return real_step(self, *step_args, **kwargs)

    def held_write(path, dump):
        if Path(path).name == "checkpoint.pt":
            checkpoint_writes.append(path)
            if kind == "checkpoint" and len(checkpoint_writes) == int(number):
                return real_write(path, lambda handle: dump(HeldWriter(handle)))
        return real_write(path, dump)

    training_step.TrainStep.step, resume.write_with = slow_step, held_write
    cli.main(args)


if __name__ == "__main__":
    if sys.argv[2] == "--hold":
        main(float(sys.argv[1]), sys.argv[3], sys.argv[4:])
    else:
        main(float(sys.argv[1]), None, sys.argv[2:])
