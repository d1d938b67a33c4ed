"""`pipeline ARGS` with every optimisation step slowed down, so that tests/test_training.py can SIGKILL a training
run in the middle of an epoch.

Run as `python tests/workers/slow_train.py DELAY ARGS...`: the real command line entry (`pipeline.cli.main`)
with a sleep of DELAY seconds before each `TrainStep.step`. The sleep only stretches time; what runs and what
is written are the real training loop, checkpoints and DVCLive history.
"""
from __future__ import annotations

import sys
import time


def main(delay: float, args: list[str]) -> None:
    from pipeline import cli
    from pipeline.training import step as training_step

    real_step = training_step.TrainStep.step

    def slow_step(self, *step_args, **kwargs):
        time.sleep(delay)
        return real_step(self, *step_args, **kwargs)

    training_step.TrainStep.step = slow_step
    cli.main(args)


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
