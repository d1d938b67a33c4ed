"""The training loop on CPU: exact resume, determinism, refused resumes, flips reaching model and targets,
margin_samples. (The DDP run is in test_training_ddp.py.)"""
import json
import signal
import time

import numpy as np
import pytest
import torch
from helpers.data import FACE_SIZE
from helpers.processes import start_worker
from helpers.training import (
    EMBEDDING_DIM,
    TINY_MBF,
    ekd_reference_distillation,
    tiny_config,
)

from pipeline import training
from pipeline.errors import PipelineError
from pipeline.evaluation.curves import read_history
from pipeline.formats.recordio import FaceRecordIO
from pipeline.formats.verification_bin import write_verification_bin
from pipeline.models import get_model
from pipeline.models.model_file import safe_torch_load
from pipeline.training import step as training_step
from pipeline.training.data import FaceDataset
from pipeline.training.distill import CachedTargets
from pipeline.training.live import truncate_history
from pipeline.training.samplers import ShuffledBatchSampler


@pytest.fixture(scope="module")
def faces(random_faces):
    """16 classes x 3 random 16 x 16 JPEGs: 48 images, 6 steps of 8 per epoch."""
    return FaceRecordIO(random_faces)


def _weights(run_dir):
    return safe_torch_load(run_dir / "model.pt")["state_dict"]


def _assert_same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


RESUME_CASES = {
    # partial FC draws classes from the global torch RNG; a DataLoader worker must not shift that stream
    "margin-partial-fc-worker": (dict(sample_rate=0.5, workers=1), None),
    # the EKD threshold EMA lives in loss buffers: a resume must restore them
    "margin-ekd-reference": (dict(), {}),
    # two terms with gradient-ratio weights (running norms in buffers), a KD warm-up, per-epoch evaluation
    "l2-ekd-grad-ratio-monitor": (dict(log_every=2), {"scale": "grad-ratio", "warmup_epochs": 1.5, "l2": 0.5}),
}


def monitor_folder(root):
    """A folder with a small verification .bin for the per-epoch evaluation."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8) for _ in range(40)]
    write_verification_bin(root / "check.bin", images, np.arange(20) % 2 == 0)
    return root


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_reproduces_the_uninterrupted_run_exactly(faces, tmp_path, case):
    overrides, kd = RESUME_CASES[case]
    if kd and "l2" in kd:
        overrides = {**overrides, "monitor": monitor_folder(tmp_path)}

    def run(out, **more):
        distill = None
        if kd is not None:  # a fresh loss, as in a new process
            distill = ekd_reference_distillation(len(faces), l2_weight=kd.get("l2"), scale=kd.get("scale", "weight"),
                                                 warmup_epochs=kd.get("warmup_epochs", 0.0))
        return training.train(tiny_config(out, **overrides, **more), faces, faces.num_classes, distill)

    straight = run(tmp_path / "straight")
    first = run(tmp_path / "resumed", stop_after_epochs=1)
    assert first["epochs_done"] == 1 and not first["finished"]
    assert not (tmp_path / "resumed" / "model.pt").exists()  # nothing that looks finished
    second = run(tmp_path / "resumed")
    assert second["epochs_done"] == 2 and second["finished"] and len(second["history"]) == 1
    assert second["history"][0]["loss"] == straight["history"][1]["loss"]
    _assert_same_tensors(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight"))
    states = [safe_torch_load(tmp_path / run_dir / "checkpoint.pt") for run_dir in ("resumed", "straight")]
    _assert_same_tensors(states[0]["trainee"], states[1]["trainee"])  # the head too
    for got, want in zip(states[0]["extra_modules"], states[1]["extra_modules"]):
        _assert_same_tensors(got, want)
    if kd is not None:
        ekd_state = next(s for s in states[1]["extra_modules"] if "ema_student_thresholds" in s)
        assert ekd_state["ema_student_thresholds"].abs().sum() > 0
    # the DVCLive history continues across the resume: equal to the uninterrupted run's (timings aside)
    histories = [read_history(tmp_path / run_dir / "dvclive") for run_dir in ("resumed", "straight")]
    untimed = [{k: v for k, v in h.items() if "images_per_s" not in k} for h in histories]
    assert untimed[0] == untimed[1] and "train/loss" in untimed[0] and "epoch/loss" in untimed[0]
    if kd and "l2" in kd:
        assert "eval/check/accuracy" in untimed[0] and "kd/grad_ratio_ekd" in untimed[0]
        assert states[1]["extra_modules"][-1]["updates"] == 12  # the balance updated every step


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


def test_dvclive_history_is_continuous_across_a_sigkill(random_faces, tmp_path, cli):
    """A run SIGKILLed in the middle of epoch 2 (after logging some of its steps) and rerun ends with the
    history of the uninterrupted run: epoch 1 kept, the killed epoch's rows replaced, nothing lost."""
    args = ["train-teacher", "--data", random_faces, "--arch", "mbf", "--width", 0.125, "--embedding-size", 16,
            "--epochs", 3, "--batch-size", 8, "--lr", 0.05, "--workers", 0, "--device", "cpu", "--log-every", 1]
    assert cli(*args, "--out", tmp_path / "straight").exit_code == 0
    out = tmp_path / "killed"
    losses = out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    process = start_worker("slow_train", 0.2, *args, "--out", out)
    deadline = time.monotonic() + 120
    while not ((out / "checkpoint.pt").exists() and max(_logged_steps(losses), default=0) >= 7):  # epoch 2: 6..11
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run never reached epoch 2"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.pt").exists() and max(_logged_steps(losses)) >= 7  # rows past the checkpoint
    result = cli(*args, "--out", out)
    assert result.exit_code == 0, result.output
    histories = [read_history(run / "dvclive") for run in (out, tmp_path / "straight")]
    untimed = [{k: v for k, v in h.items() if "images_per_s" not in k} for h in histories]
    assert untimed[0] == untimed[1]
    assert untimed[0]["epoch/loss"][0] == [5, 11, 17] and untimed[0]["train/loss"][0] == list(range(18))


def test_same_seed_same_weights_other_seed_other_weights(faces, tmp_path):
    def run(name, seed):
        training.train(tiny_config(tmp_path / name, epochs=1, seed=seed), faces, faces.num_classes)
        return _weights(tmp_path / name)

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    _assert_same_tensors(again, first)
    assert any(not torch.equal(other[k], first[k]) for k in first if other[k].is_floating_point())


def test_resume_with_changed_settings_is_refused(faces, tmp_path):
    training.train(tiny_config(tmp_path, stop_after_epochs=1), faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: lr 0.1 -> 0.2; "):
        training.train(tiny_config(tmp_path, lr=0.2), faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: arch_kwargs .* -> .*, margin 'arcface' -> "
                                            r"'cosface'; "):
        training.train(tiny_config(tmp_path, margin="cosface", arch_kwargs={**TINY_MBF, "width": 0.25}),
                       faces, faces.num_classes)
    with pytest.raises(PipelineError, match=r"different settings: kd \(unset\) -> 'l2'; "):
        training.train(tiny_config(tmp_path), faces, faces.num_classes, settings={"kd": "l2"})
    # run-length and machine knobs may change
    summary = training.train(tiny_config(tmp_path, workers=1, stop_after_epochs=5), faces, faces.num_classes)
    assert summary["epochs_done"] == 2 and summary["finished"]


def test_torn_checkpoint_is_refused(faces, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError, match="checkpoint.pt: cannot read training checkpoint"):
        training.train(tiny_config(tmp_path), faces, faces.num_classes)


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
    training.train(tiny_config(tmp_path, epochs=1), faces, faces.num_classes,
                   training.Distillation(loss=kd, targets=code.contiguous()))
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
    training.train(tiny_config(tmp_path, epochs=1), faces, faces.num_classes,
                   training.Distillation(loss=kd, targets=torch.zeros(len(faces), 2, EMBEDDING_DIM)), margin_samples=3)
    assert kd.batch_sizes == [8] * 6  # the KD loss sees whole batches
    batches = list(ShuffledBatchSampler(len(faces), 8, seed=0))  # the default sampler's epoch 0
    for (head_embeddings, head_labels), batch_embeddings, batch in zip(head_inputs, backbone_outputs, batches,
                                                                              strict=True):
        assert torch.equal(head_embeddings, batch_embeddings[:3])
        assert torch.equal(head_labels, torch.from_numpy(faces.labels[batch[:3]]))
