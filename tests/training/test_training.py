"""The training loop on CPU: exact resume, determinism, refused resumes, flips reaching model and targets,
margin_samples. (The DDP run is in test_training_ddp.py.)"""
import json

import numpy as np
import pytest
import torch
from helpers.data import FACE_SIZE
from helpers.processes import kill_tree, start_worker, wait_for_line
from helpers.training import (
    EMBEDDING_DIM,
    TINY_MBF,
    assert_same_run,
    assert_same_tensors,
    ekd_distillation,
    tiny_config,
)

from pipeline.errors import PipelineError
from pipeline.evaluation.curves import read_history
from pipeline.formats.recordio import FaceRecordIO
from pipeline.formats.verification_bin import write_verification_bin
from pipeline.models import get_model
from pipeline.models.model_file import safe_torch_load
from pipeline.training.distill import Distillation
from pipeline.training.loop import train
from pipeline.training import step as training_step
from pipeline.training.data import FaceDataset
from pipeline.training.distill import CachedTargets
from pipeline.training.live import truncate_history
from pipeline.training.sampling.shuffled import ShuffledBatchSampler
from pipeline.training.sampling.config import SamplerConfig


@pytest.fixture(scope="module")
def faces(random_faces):
    """16 classes x 3 random 16 x 16 JPEGs: 48 images, 6 steps of 8 per epoch."""
    return FaceRecordIO(random_faces)


def _weights(run_dir):
    return safe_torch_load(run_dir / "model.pt")["state_dict"]


RESUME_CASES = {
    # partial FC draws classes from the global torch RNG; a DataLoader worker must not shift that stream
    "margin-partial-fc-worker": (dict(sample_rate=0.5, workers=1), None),
    # the EKD threshold EMA lives in loss buffers: a resume must restore them
    "margin-ekd-reference": (dict(), {}),
    # two terms with gradient-ratio weights (running norms in buffers), a KD warm-up, per-epoch evaluation
    "l2-ekd-grad-ratio-monitor": (dict(log_every=2), {"scale": "grad-ratio", "warmup_epochs": 1.5, "l2": 0.5}),
    # global EKD: the student queue (a ring buffer that wraps within an epoch); the official balanced sampler
    # (a mid-epoch resume draws its first batches again and drops them) with the margin on the general part
    "ekd-global-queue-balanced-sampler": (dict(log_every=3), {"mode": "global", "balanced": True}),
    # AdaDistill: the margin head's centres are a buffer moved every step (in checkpoint.pt with the head)
    "adadistill-ekd": (dict(log_every=2), {"mode": "global", "adadistill": True}),
}


def monitor_folder(root):
    """A folder with a small verification .bin for the per-epoch evaluation."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8) for _ in range(40)]
    write_verification_bin(root / "check.bin", images, np.arange(20) % 2 == 0)
    return root


class Crash(Exception):
    """Stands for the death of the process at the start of an optimiser step."""


REAL_STEP = training_step.TrainStep.step


def _record_steps(monkeypatch, crash_before: int | None = None) -> list:
    """Record (step, indices, flips) of every optimiser step `train` runs; with `crash_before`, raise Crash
    instead of running that step (0-based, counted over the whole run)."""
    seen = []

    def step(self, images, labels, indices, flips, **kwargs):
        done = self.scheduler.last_epoch
        if done == crash_before:
            raise Crash()
        seen.append((done, indices.tolist(), flips.tolist()))
        return REAL_STEP(self, images, labels, indices, flips, **kwargs)

    monkeypatch.setattr(training_step.TrainStep, "step", step)
    return seen


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_reproduces_the_uninterrupted_run_exactly(faces, tmp_path, case, monkeypatch):
    """Resumed at an epoch boundary, or from a checkpoint in the middle of an epoch by a run that died
    later in that epoch, training ends with the uninterrupted run's weights, KD state and history."""
    overrides, kd = RESUME_CASES[case]
    if kd and "l2" in kd:
        overrides = {**overrides, "monitor": monitor_folder(tmp_path)}
    sampling = {}
    if kd and kd.get("balanced"):
        sampler = SamplerConfig(sampler="balanced", balanced_batch_size=8, per_identity=4, margin_on="general")
        sampling = dict(batch_sampler_factory=sampler.factory(faces.labels, 8, seed=0), margin_samples=8)

    def run(out, **more):
        distill = None
        if kd is not None:  # a fresh loss, as in a new process
            distill = ekd_distillation(len(faces), l2_weight=kd.get("l2"), scale=kd.get("scale", "weight"),
                                       warmup_epochs=kd.get("warmup_epochs", 0.0), mode=kd.get("mode", "reference"),
                                       adadistill=kd.get("adadistill", False))
        return train(tiny_config(out, **overrides, **more), faces, faces.num_classes, distill, **sampling)

    steps = _record_steps(monkeypatch)
    straight = run(tmp_path / "straight")  # no checkpoint inside an epoch
    straight_steps = list(steps)
    assert [s[0] for s in straight_steps] == list(range(12))  # 2 epochs of 6 steps

    first = run(tmp_path / "resumed", stop_after_epochs=1)
    assert first["epochs_done"] == 1 and not first["finished"]
    assert not (tmp_path / "resumed" / "model.pt").exists()  # nothing that looks finished
    second = run(tmp_path / "resumed")
    assert second["epochs_done"] == 2 and second["finished"] and len(second["history"]) == 1
    assert second["history"][0]["loss"] == straight["history"][1]["loss"]
    final_state, history = assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    if kd is not None:
        ekd_state = next(s for s in final_state["extra_modules"] if "ema_student_thresholds" in s or "queue.ptr" in s)
        assert ekd_state.get("ema_student_thresholds", ekd_state.get("queue.embeddings")).abs().sum() > 0
    if kd and kd.get("adadistill"):  # the centres moved: a buffer of the head, not a parameter
        assert "head.weight" in final_state["trainee"] and "kd/adadistill/alpha_mean" in history
    if kd and "l2" in kd:
        assert "eval/check/accuracy" in history and "kd/grad_ratio_ekd" in history
        assert final_state["extra_modules"][-1]["updates"] == 12  # the balance updated every step

    # checkpoints every 4 steps; the process dies before step 5, in epoch 1 (checkpoint after step 4)
    mid = tmp_path / "mid-epoch"
    steps = _record_steps(monkeypatch, crash_before=5)
    with pytest.raises(Crash):
        run(mid, checkpoint_every=4)
    state = safe_torch_load(mid / "checkpoint.pt")
    assert (state["epochs_done"], state["epoch_steps"], state["world_size"]) == (0, 4, 1)
    steps = _record_steps(monkeypatch)
    third = run(mid, checkpoint_every=4)
    assert third["finished"] and [s[0] for s in steps] == list(range(4, 12))
    assert steps == straight_steps[4:]  # the same batches and flips from the resume point on
    # the resumed epoch's means cover all its steps, the 4 of the dead run too
    assert [h["loss"] for h in third["history"]] == [h["loss"] for h in straight["history"]]
    assert [h["kd_loss"] for h in third["history"]] == [h["kd_loss"] for h in straight["history"]]
    assert_same_run(mid, tmp_path / "straight")


def test_a_killed_run_leaves_no_stray_history_on_resume(tmp_path):
    """Rows logged after the last checkpoint by a run that then died are dropped when it resumes, a row and a
    summary torn by the kill too; the summary is what it was at the checkpoint."""
    live = tmp_path / "dvclive" / "plots" / "metrics"
    (live / "train").mkdir(parents=True)
    (live / "kd" / "ekd").mkdir(parents=True)
    (live / "train" / "loss.tsv").write_text("step\tloss\n0\t3.0\n5\t2.0\n6\t1.5\n11\t1.0\n")
    (live / "kd" / "ekd" / "pairs.tsv").write_text("step\tpairs\n0\t8.0\n5\t9.0\n1")  # torn while writing "11..."
    (tmp_path / "dvclive" / "metrics.json").write_text('{"train": {"lo')  # torn as well
    truncate_history(tmp_path / "dvclive", 6)
    assert (live / "train" / "loss.tsv").read_text() == "step\tloss\n0\t3.0\n5\t2.0\n"
    assert (live / "kd" / "ekd" / "pairs.tsv").read_text() == "step\tpairs\n0\t8.0\n5\t9.0\n"
    assert read_history(tmp_path / "dvclive") == {"train/loss": ([0, 5], [3.0, 2.0]),
                                                  "kd/ekd/pairs": ([0, 5], [8.0, 9.0])}
    assert json.loads((tmp_path / "dvclive" / "metrics.json").read_text()) == {
        "kd": {"ekd": {"pairs": 9.0}}, "train": {"loss": 2.0}, "step": 5}


def _logged_steps(tsv) -> list[int]:
    """Steps of a DVCLive metric file being written (an unfinished last line is skipped)."""
    try:
        lines = tsv.read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    return [int(line.split("\t")[0]) for line in lines if "\t" in line]


def teacher_args(data) -> list:
    """train-teacher of the tiny MobileFaceNet with partial FC: 3 epochs of 6 steps, every step logged."""
    return ["train-teacher", "--data", data, "--arch", "mbf", "--width", 0.125, "--embedding-size", 16, "--epochs", 3,
            "--batch-size", 8, "--lr", 0.05, "--sample-rate", 0.5, "--workers", 0, "--device", "cpu", "--log-every", 1]


@pytest.fixture(scope="module")
def straight_teacher(random_faces, tmp_path_factory, cli):
    """The uninterrupted run of `teacher_args` (checkpoints at epoch ends only)."""
    out = tmp_path_factory.mktemp("straight-teacher")
    result = cli(*teacher_args(random_faces), "--out", out)
    assert result.exit_code == 0, result.output
    return out


KILLS = {  # extra options, where the run is held and SIGKILLed, the resume point (epochs done, steps into the next)
    # checkpoints at epoch ends only; killed before step 8 (steps 6 and 7 of epoch 2 logged): resumes at step 6
    "epoch-end": ([], "step:8", (1, 0)),
    # a checkpoint every 4 steps, a DataLoader worker; killed before step 10: resumes at step 8, inside epoch 2
    "mid-epoch": (["--checkpoint-every", 4, "--workers", 1], "step:10", (1, 2)),
    # a checkpoint every 2 steps; killed while writing step 10's: resumes from step 8's, the torn file removed
    "mid-checkpoint-write": (["--checkpoint-every", 2], "checkpoint:5", (1, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kill", KILLS)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(random_faces, straight_teacher, tmp_path, cli, kill):
    """A run SIGKILLed in the middle of epoch 2, or while writing a checkpoint, and rerun ends with the
    uninterrupted run's model.pt (bit for bit), final checkpoint and DVCLive history (timings aside): the rows
    logged after the last checkpoint replaced, nothing lost or repeated."""
    options, where, resume_point = KILLS[kill]
    out = tmp_path / "killed"
    args = [*teacher_args(random_faces), *options, "--out", out]
    process = start_worker("slow_train", 0, "--hold", where, *args)
    try:
        wait_for_line(process, "holding", timeout=120)
    finally:
        kill_tree(process)
    assert not (out / "model.pt").exists()
    state = safe_torch_load(out / "checkpoint.pt")
    assert (state["epochs_done"], state["epoch_steps"]) == resume_point
    logged = _logged_steps(out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv")
    assert max(logged) >= resume_point[0] * 6 + resume_point[1]  # rows past the checkpoint, to be replaced
    assert len(list(out.glob("checkpoint.pt.tmp-*"))) == (kill == "mid-checkpoint-write")  # the torn write
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert not list(out.rglob("*.tmp-*"))
    _, history = assert_same_run(out, straight_teacher)
    assert history["epoch/loss"][0] == [5, 11, 17] and history["train/loss"][0] == list(range(18))


def test_same_seed_same_weights_other_seed_other_weights(faces, tmp_path):
    def run(name, seed):
        train(tiny_config(tmp_path / name, epochs=1, seed=seed), faces, faces.num_classes)
        return _weights(tmp_path / name)

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert_same_tensors(again, first)
    assert any(not torch.equal(other[k], first[k]) for k in first if other[k].is_floating_point())


def test_resume_with_changed_settings_is_refused(faces, tmp_path):
    train(tiny_config(tmp_path, stop_after_epochs=1), faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: lr 0.1 -> 0.2; "):
        train(tiny_config(tmp_path, lr=0.2), faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: arch_kwargs .* -> .*, margin 'arcface' -> "
                                            r"'cosface'; "):
        train(tiny_config(tmp_path, margin="cosface", arch_kwargs={**TINY_MBF, "width": 0.25}),
              faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: kd \(unset\) -> 'l2'; "):
        train(tiny_config(tmp_path), faces, faces.num_classes, settings={"kd": "l2"})
    # run-length and machine knobs may change
    summary = train(tiny_config(tmp_path, workers=1, stop_after_epochs=5), faces, faces.num_classes)
    assert summary["epochs_done"] == 2 and summary["finished"]


def test_a_mid_epoch_checkpoint_resumes_only_with_its_settings_and_process_count(faces, tmp_path, monkeypatch):
    _record_steps(monkeypatch, crash_before=5)
    with pytest.raises(Crash):
        train(tiny_config(tmp_path, checkpoint_every=4), faces, faces.num_classes)
    monkeypatch.undo()
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(PipelineError, match=r"different settings: lr 0.1 -> 0.2; "):
        train(tiny_config(tmp_path, lr=0.2), faces, faces.num_classes)
    state = torch.load(path, weights_only=True)
    assert (state["epochs_done"], state["epoch_steps"]) == (0, 4)
    torch.save({**state, "world_size": 2, "steps_per_epoch": 3}, path)  # as a 2-rank run would have written it
    with pytest.raises(PipelineError, match=r"different settings: steps_per_epoch 3 -> 6, world_size 2 -> 1 \(it "
                                            r"stopped after step 4 of epoch 1\); rerun with its settings"):
        train(tiny_config(tmp_path), faces, faces.num_classes)
    torch.save(state, path)
    # --checkpoint-every, like the run-length and machine knobs, may change
    summary = train(tiny_config(tmp_path, checkpoint_every=5, workers=1), faces, faces.num_classes)
    assert summary["finished"] and len(summary["history"]) == 2


def test_torn_checkpoint_is_refused(faces, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError, match="checkpoint.pt: cannot read training checkpoint"):
        train(tiny_config(tmp_path), faces, faces.num_classes)


def test_flipped_item_is_the_mirrored_image(faces):
    dataset = FaceDataset(faces)
    for i in (0, 17, 47):
        image, label, index, flip = dataset[(i, True)]
        reference = (np.ascontiguousarray(faces.decode(i)[:, ::-1]).astype(np.float32) / 255 - 0.5) / 0.5
        torch.testing.assert_close(image, torch.from_numpy(reference).permute(2, 0, 1), rtol=0, atol=1e-6)
        assert torch.equal(image, torch.flip(dataset[(i, False)][0], dims=[2]))
        assert (label, index, flip) == (int(faces.labels[i]), i, True)
        assert not torch.equal(image, dataset[(i, False)][0])


def test_teacher_targets_follow_the_flip_view():
    targets = torch.arange(5 * 2 * 3, dtype=torch.float16).reshape(5, 2, 3)
    indices, flips = torch.tensor([4, 0, 2, 2]), torch.tensor([True, False, False, True])
    got = CachedTargets(targets)(None, indices, flips, "cpu")
    want = torch.stack([targets[4, 1], targets[0, 0], targets[2, 0], targets[2, 1]]).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    single_view = CachedTargets(targets[:, :1])
    assert torch.equal(single_view(None, indices, flips, "cpu"), targets[indices, 0].float())


class _RecordingKD(torch.nn.Module):
    """A KD loss that records the teacher rows it is given; contributes nothing to the gradient."""

    def __init__(self):
        super().__init__()
        self.teacher_rows, self.batch_sizes = [], []

    def forward(self, student, teacher, labels):
        self.teacher_rows.append(teacher.clone())
        self.batch_sizes.append(student.shape[0])
        return student.sum() * 0.0


def _recording_backbone(inputs: list, outputs: list):
    """A get_model replacement whose backbones record every input batch and embedding batch."""
    def record(module, args, out):
        inputs.append(args[0].clone())
        outputs.append(out.detach().clone())

    def build(name, **kwargs):
        backbone = get_model(name, **kwargs)
        backbone.register_forward_hook(record)
        return backbone
    return build


def test_each_sample_meets_the_teacher_view_of_its_own_flip(faces, tmp_path, monkeypatch):
    """End to end: the image the backbone sees and the target the KD loss sees agree on every flip."""
    n, dim = len(faces), EMBEDDING_DIM
    code = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2, 1).expand(n, 2, dim)  # row = 2 * index + view
    seen = []
    monkeypatch.setattr(training_step, "get_model", _recording_backbone(seen, []))
    kd = _RecordingKD()
    train(tiny_config(tmp_path, epochs=1), faces, faces.num_classes,
          Distillation(loss=kd, targets=code.contiguous()))
    dataset = FaceDataset(faces)
    views = []
    for images, rows in zip(seen, kd.teacher_rows, strict=True):
        for image, row in zip(images, rows, strict=True):
            index, view = divmod(int(row[0]), 2)
            assert torch.equal(image, dataset[(index, bool(view))][0])
            views.append(view)
    assert len(views) == n and 0 < sum(views) < n  # one epoch, both views used


def test_margin_loss_sees_only_the_first_margin_samples(faces, tmp_path, monkeypatch):
    head_inputs, backbone_outputs = [], []

    class RecordingHead(training_step.MarginHead):
        def forward(self, embeddings, labels):
            head_inputs.append((embeddings.detach().clone(), labels.clone()))
            return super().forward(embeddings, labels)

    monkeypatch.setattr(training_step, "MarginHead", RecordingHead)
    monkeypatch.setattr(training_step, "get_model", _recording_backbone([], backbone_outputs))
    kd = _RecordingKD()
    train(tiny_config(tmp_path, epochs=1), faces, faces.num_classes,
          Distillation(loss=kd, targets=torch.zeros(len(faces), 2, EMBEDDING_DIM)), margin_samples=3)
    assert kd.batch_sizes == [8] * 6  # the KD loss sees whole batches
    batches = list(ShuffledBatchSampler(len(faces), 8, seed=0))  # the default sampler's epoch 0
    for (head_embeddings, head_labels), batch_embeddings, batch in zip(head_inputs, backbone_outputs, batches,
                                                                              strict=True):
        assert torch.equal(head_embeddings, batch_embeddings[:3])
        assert torch.equal(head_labels, torch.from_numpy(faces.labels[batch[:3]]))
