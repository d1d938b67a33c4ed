"""Code that runs in processes of its own, started by the tests:

- ddp_train: one torchrun rank of the DDP training test (tests/training/test_training_ddp.py), run by path;
- ddp_kd_losses: one gloo rank of the DDP KD-loss test (tests/losses/test_ddp_losses.py), torch.multiprocessing target;
- slow_extract: the teacher-cache extraction slowed down to be SIGKILLed (tests/cache/test_extract.py), run by path;
- slow_train: a training command slowed down or held at a chosen step or checkpoint write to be SIGKILLed
  (tests/training/test_training.py; under torchrun in tests/training/test_training_ddp.py), run by path;
- dask_tasks: a shard task that kills its Dask worker once (tests/cache/test_extract.py).

Their helpers come from tests/helpers. Imported ones (ddp_kd_losses, dask_tasks) are found as `workers.*`
because the child processes inherit the test process's sys.path, which has tests/ on it (spawn, forkserver
and Dask's nannies all pass it on). The scripts run by path put tests/ on sys.path themselves.
"""
