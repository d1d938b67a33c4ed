"""`train` under a 2-process gloo DDP group launched by torchrun.

What is and is not equal, and why:
- every parameter is bit-identical on both ranks after training (DDP all-reduces the gradients, the
  optimiser steps are then the same); BatchNorm running statistics are NOT: DDP copies rank 0's buffers
  to the other ranks before each forward, and each rank then updates them from its own half batch, so
  after the last step they differ. model.pt holds rank 0's.
- against one process stepping the same global batches: a BatchNorm backbone normalises with half-batch
  statistics on each rank, so its weights legitimately differ. With a BatchNorm-free backbone, the margin
  loss (per-rank mean, averaged by DDP) and the gathered EKD loss give the single-process gradient, so the
  trained weights agree up to float32 summation order.
- a run killed and resumed (at an epoch end or inside an epoch) ends bit-identical to the uninterrupted run
  on as many ranks: every rank gets back its own RNG states and epoch sums from the checkpoint.
"""
import torch
from helpers.processes import (
    WORKERS,
    kill_tree,
    run_torchrun,
    start_torchrun,
    wait_for_line,
)
from helpers.training import assert_same_run, train_linear_on_mirrored

from pipeline.evaluation.curves import read_history
from pipeline.models.model_file import load_model, safe_torch_load
import pytest

pytestmark = pytest.mark.slow  # processes of their own: skip locally with -m "not slow"; CI runs them


def test_ddp_training_keeps_replicas_in_sync_and_matches_one_process(random_faces, tmp_path):
    run_torchrun(WORKERS / "ddp_train.py", random_faces, tmp_path)

    ranks = [torch.load(tmp_path / f"mbf_rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][name]), name
        assert not torch.equal(value, ranks[0]["initial"][name]), name  # and they did train
    rank0 = {**ranks[0]["parameters"], **ranks[0]["buffers"]}
    model, _ = load_model(tmp_path / "mbf" / "model.pt")
    for name, value in model.state_dict().items():  # model.pt is rank 0's backbone, buffers included
        assert torch.equal(value, rank0[f"backbone.{name}"]), name
    assert (tmp_path / "mbf" / "checkpoint.pt").is_file()

    linear = [torch.load(tmp_path / f"linear_rank{r}.pt", weights_only=True) for r in range(2)]
    single = train_linear_on_mirrored(tmp_path / "single")
    without_kd = train_linear_on_mirrored(tmp_path / "margin-only", kd=False)
    for name, want in single.items():
        assert torch.equal(linear[0][name], linear[1][name]), name
        torch.testing.assert_close(linear[0][name], want, rtol=0, atol=1e-5, msg=name)  # measured: <= 1e-6
        assert (want - without_kd[name]).abs().max() > 1e-4, name  # the KD gradient is far above tolerance


def test_a_ddp_run_killed_while_writing_a_checkpoint_resumes_exactly_from_the_middle_of_an_epoch(random_faces,
                                                                                               tmp_path):
    """2 ranks with partial FC: a rank draws classes only when its half batch has fewer classes than the
    sample, so the ranks' RNG streams part ways (rank 1 draws at steps 3, 4 and 6, rank 0 at step 11).
    With a checkpoint every 2 steps, rank 0 is SIGKILLed while writing epoch 1's checkpoint (after logging
    the epoch), every process of the run with it; the rerun resumes at step 4 from the checkpoint inside
    epoch 1 and ends with the uninterrupted run's model.pt (bit for bit), checkpoint and history."""
    args = ["train-teacher", "--data", random_faces, "--arch", "mbf", "--width", 0.125, "--embedding-size", 16,
            "--epochs", 2, "--batch-size", 4, "--lr", 0.05, "--sample-rate", 0.25, "--workers", 0, "--device", "cpu",
            "--log-every", 1, "--no-head-parallel"]  # the replicated head: the split one has its own resume tests
    run_torchrun("-m", "pipeline", *args, "--out", tmp_path / "straight")  # checkpoints at epoch ends only
    out = tmp_path / "killed"
    args += ["--checkpoint-every", 2, "--out", out]
    process = start_torchrun(WORKERS / "slow_train.py", 0, "--hold", "checkpoint:3", *args)  # writes: 2, 4, 6
    try:
        wait_for_line(process, "holding", timeout=180)
    finally:
        kill_tree(process)
    state = safe_torch_load(out / "checkpoint.pt")
    assert (state["epochs_done"], state["epoch_steps"], state["world_size"]) == (0, 4, 2)
    assert not torch.equal(state["torch_rng"][0], state["torch_rng"][1])  # the ranks' streams parted
    assert len(list(out.glob("checkpoint.pt.tmp-*"))) == 1 and not (out / "model.pt").exists()
    assert read_history(out / "dvclive")["epoch/loss"][0] == [5]  # logged after the checkpoint: to be replaced
    run_torchrun("-m", "pipeline", *args)
    assert not list(out.rglob("*.tmp-*"))
    _, history = assert_same_run(out, tmp_path / "straight")
    assert history["train/loss"][0] == list(range(12)) and history["epoch/loss"][0] == [5, 11]
