"""The margin head split across ranks against the replicated head and against one process.

On 2 and 3 gloo ranks with 23 classes (divisible by neither), the real TrainStep on a BatchNorm-free linear
backbone (tests/helpers/split_head.py):
- sample rate 1: the split head's initial rows are the replicated head's, and its losses, first-step gradients
  and weights after 50 steps (momentum, weight decay) are the replicated head's under DDP;
- Partial FC: the draws differ by design. The replicated head draws, on each rank, classes for that rank's
  own slice of the batch from all classes; the split head draws once per step for the global batch, each rank
  within its own rows: every positive of the global batch in the slice plus random others up to
  ceil(rate x own rows). Both are Partial FC (softmax over the positives and a random subset of negatives);
  what the split head does is checked exactly: its loss and gradients are those of the full softmax over
  the union of the slices' draws, computed directly on the concatenated batch;
- AdaDistill on the split head (each rank moves its own rows from the gathered batch) equals one process
  stepping the concatenated batches;
- a checkpoint written on 2 ranks loads on 3 with every row and its momentum bit for bit, and continues as one
  process continuing from it does.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import split_head as cases
from helpers.processes import spawn_gloo
from helpers.training import linear_backbone
from workers import split_head as worker

from pipeline.errors import PipelineError
from pipeline.losses.margin import MarginHead
from pipeline.training.split_head import SplitMarginHead, row_range


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _whole(runs: list[dict], part: str = "weight") -> torch.Tensor:
    """The head's rows (or their gradient, momentum) of every rank in rank order: every class in order."""
    return torch.cat([run[part] for run in runs])


def test_rows_split_contiguously_and_evenly():
    for classes in (3, 23, 360232):
        for world in (1, 2, 3, 4, 8):
            ranges = [row_range(classes, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and max(sizes) == math.ceil(classes / world)


@pytest.mark.parametrize("classes, dim", [(23, 16), (8192 + 37, 5)])
def test_initial_rows_are_the_replicated_heads_rows_and_the_rng_ends_where_it_does(classes, dim):
    torch.manual_seed(3)
    whole = MarginHead(classes, dim).weight.detach()
    after = torch.get_rng_state()
    for world in (2, 3):
        for rank in range(world):
            torch.manual_seed(3)
            head = SplitMarginHead(classes, dim, world=world, rank=rank)
            first, stop = row_range(classes, world, rank)
            assert torch.equal(head.weight.detach(), whole[first:stop])
            assert torch.equal(torch.get_rng_state(), after)


def test_a_head_with_fewer_classes_than_processes_is_refused():
    with pytest.raises(PipelineError, match="3 classes cannot be split over 4 processes"):
        SplitMarginHead(3, 4, world=4, rank=0)


def test_one_process_keeps_the_replicated_head_whatever_head_parallel_says(tmp_path):
    runs = [cases.run_parity(tmp_path, split, "arcface", steps=3) for split in (True, False)]
    assert runs[0]["losses"] == runs[1]["losses"]
    assert torch.equal(runs[0]["head"]["weight"], runs[1]["head"]["weight"])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, dict]:
    """Every case on 2 ranks, then on 3 (which also resumes the 2-rank checkpoint): each world's folder and
    its ranks' results."""
    results = {}
    for world in (2, 3):
        folder = tmp_path_factory.mktemp(f"world{world}")
        resume_from = str(results[2]["folder"] / "checkpoint.pt") if world == 3 else ""
        spawn_gloo(worker.worker, world, folder, str(folder), resume_from, preload="workers.split_head", timeout_s=240)
        results[world] = {"folder": folder,
                          "runs": [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_split_head_gives_the_replicated_heads_losses_gradients_and_weights(ranks, world, kind):
    runs = ranks[world]["runs"]
    replicated = runs[0][f"{kind}-replicated"]
    split = [r[f"{kind}-split"] for r in runs]
    assert torch.equal(torch.cat([s["initial_head"] for s in split]), replicated["initial_head"])
    assert all(torch.equal(s["rng_after_build"], replicated["rng_after_build"]) for s in split)
    for s in split:
        torch.testing.assert_close(torch.tensor(s["losses"]), torch.tensor(replicated["losses"]), rtol=1e-6, atol=0)
        for name, want in replicated["first"]["backbone"].items():
            assert want.norm() > 0 and _relative(s["first"]["backbone"][name], want) <= 1e-6, name
        for name, want in replicated["backbone"].items():
            assert _relative(s["backbone"][name], want) <= 1e-4, name
    first = [s["first"]["head"] for s in split]
    assert _relative(_whole(first, "grad"), replicated["first"]["head"]["grad"]) <= 1e-6
    heads = [s["head"] for s in split]
    assert _relative(_whole(heads), replicated["head"]["weight"]) <= 1e-4
    assert _relative(_whole(heads, "momentum"), replicated["head"]["momentum"]) <= 1e-4
    moved = _relative(replicated["head"]["weight"], replicated["initial_head"])
    assert moved > 1e-2  # the tolerance is far below what 50 steps change


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc_per_slice_keeps_the_positives_and_is_the_softmax_over_what_it_drew(ranks, world):
    runs = [r["sampled"] for r in ranks[world]["runs"]]
    images, labels, _ = cases.global_batch(0)
    drawn = torch.cat([r["drawn"] for r in runs])
    for rank, run in enumerate(runs):
        first, stop = row_range(cases.CLASSES, world, rank)
        positives = labels[(labels >= first) & (labels < stop)].unique()
        assert set(positives.tolist()) <= set(run["drawn"].tolist())
        assert all(first <= c < stop for c in run["drawn"].tolist())
        assert len(run["drawn"]) == max(math.ceil(0.3 * (stop - first)), len(positives))
    assert len(drawn) < cases.CLASSES  # it did sample
    # the reference: one process, the concatenated batch, the full softmax over the drawn classes
    net = linear_backbone("linear", num_features=cases.EMBEDDING_DIM)
    net.load_state_dict(runs[0]["initial"]["backbone"])
    weight = torch.cat([r["initial"]["head"] for r in runs]).requires_grad_()
    reference = MarginHead(len(drawn), cases.EMBEDDING_DIM, s=16.0)
    reference.weight = torch.nn.Parameter(weight[drawn])
    loss = reference(net(images), torch.searchsorted(drawn, labels))
    loss.backward()
    grad = torch.zeros_like(weight)
    grad[drawn] = reference.weight.grad
    for run in runs:
        assert run["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
        for name, param in net.named_parameters():
            assert _relative(run["backbone_grad"][name], param.grad) <= 1e-6, name
    assert _relative(_whole([r["head"] for r in runs], "grad"), grad) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_class_centre_distillation_on_the_split_head_matches_one_process(ranks, world, tmp_path):
    one = cases.run_centres(tmp_path)
    runs = [r["centres"] for r in ranks[world]["runs"]]
    assert _relative(_whole([r["head"] for r in runs]), one["head"]["weight"]) <= 1e-5
    for run in runs:
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
        for name, want in one["backbone"].items():
            assert _relative(run["backbone"][name], want) <= 1e-5, name


@pytest.mark.slow
def test_a_checkpoint_of_2_ranks_resumes_on_3_row_for_row_and_continues_as_one_process(ranks, tmp_path):
    saved = [r["saved"] for r in ranks[2]["runs"]]
    resumed = [r["resumed"] for r in ranks[3]["runs"]]
    loaded = [r["loaded"] for r in resumed]
    for part in ("weight", "momentum"):
        assert torch.equal(_whole(loaded, part), _whole(saved, part)), part
    assert [r["first"] for r in loaded] == [row_range(cases.CLASSES, 3, r)[0] for r in range(3)]
    one = cases.resume_and_continue(tmp_path, ranks[2]["folder"] / "checkpoint.pt")  # 2 ranks -> 1 process
    assert torch.equal(one["loaded"]["weight"], _whole(loaded))
    for run in resumed:
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    assert _relative(_whole([r["head"] for r in resumed]), one["head"]["weight"]) <= 1e-5


@pytest.mark.slow
def test_a_missing_head_rows_file_is_one_line(ranks, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(ranks[2]["folder"], folder, ignore=shutil.ignore_patterns("rank*.pt", "rendezvous"))
    rows = sorted((folder / "checkpoint.pt.head").iterdir())
    rows[-1].unlink()
    with pytest.raises(PipelineError, match=r"checkpoint.pt: cannot resume: head rows 1-0-rows12-23.pt: "):
        cases.resume_and_continue(tmp_path, folder / "checkpoint.pt")
