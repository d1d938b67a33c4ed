"""End to end: the real `dvc repro` in a temporary git repository made from this working tree.

Two runs: the embedded synthetic default (shrunk by a params override to a minute's work) and the
real-data mode (an insightface-format folder and an arcface_torch-layout teacher checkpoint written here,
`synthetic` and `teacher_training` emptied so those stages disappear).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from helpers import stage_deps

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _project_copy(tmp_path: Path) -> Path:
    """Tracked and untracked-but-not-ignored files of the working tree, as a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    work = tmp_path / "project"
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=work, check=True)
    return work


def _tiny_params(work: Path, **changes) -> dict:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["synthetic"]["demo"].update(identities=16, images_per_identity=6, size=16, val_identities=20,
                                       val_pairs=40, test_identities=12, test_images_per_identity=4, workers=1,
                                       ijb_identities=3, ijb_templates=2)
    params["teacher_training"]["demo"].update(arch="r18", width=0.125, embedding_size=32, epochs=1, batch_size=16,
                                              workers=0)
    params["student"].update(width=0.125, embedding_size=32, epochs=1, batch_size=16, balanced_batch_size=16,
                             workers=0)
    params["extract"].update(batch_size=32, shard_size=40)
    params["pools"].update(neighbours=4, hard_pairs=200, block_rows=32)
    params.update(changes)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _dvc(work: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["dvc", *args], cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _check_metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    for name in ("val", "test"):
        assert name in metrics, f"{path}: no {name!r} entry"
    assert 0.4 <= metrics["val"]["accuracy"] <= 1.0
    tprs = [metrics["test"][f"tpr@fpr={f}"] for f in ("1e-1", "1e-2", "1e-3")]
    assert all(0.0 <= t <= 1.0 for t in tprs) and tprs == sorted(tprs, reverse=True)
    return metrics


def test_dvc_repro_embedded_default(tmp_path):
    work = _project_copy(tmp_path)
    params = _tiny_params(work)
    log = _dvc(work, "repro")
    for stage in ("synthesize@demo", "train-teacher@demo", "extract-teacher", "build-pools",
                  "evaluate-ijb-teacher@set0", "report"):
        assert f"Running stage '{stage}'" in log

    students = list(params["students"])
    assert (work / "data/synthetic/train.rec").is_file() and (work / "data/teacher/model.pt").is_file()
    thresholds = json.loads((work / "data/pools/thresholds.json").read_text())
    values = [thresholds[k] for k in ("1e-1", "1e-2", "1e-3")]
    assert values == sorted(values) and all(-1 <= v <= 1 for v in values)  # lower FPR, higher threshold
    _check_metrics(work / "results/teacher/metrics.json")
    for name in students:
        assert (work / f"data/students/{name}/model.pt").is_file()
        _check_metrics(work / f"results/students/{name}/metrics.json")
        assert (work / f"results/students/{name}/roc.csv").read_text().startswith("fpr,tpr,threshold")
        _check_ijb(work / f"results/students/{name}")
    _check_ijb(work / "results/teacher")
    report = (work / "results/report/report.md").read_text()
    assert all(name in report for name in students) and "gap closed" in report
    assert "## IJBC: 1:1 template verification" in report
    assert (work / "results/report/roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _dvc(work, "repro")
    assert "Running stage" not in again, again
    shown = _dvc(work, "metrics", "show", "--json")
    assert all(f"results/students/{name}/metrics.json" in shown for name in students)
    _check_code_dependencies(work, students)
    _check_experiments(work, students)


def _check_ijb(run: Path) -> None:
    """evaluate-ijb's files for the tiny synthetic IJB-C set (6 templates of 3 identities: 15 pairs)."""
    ijb = json.loads((run / "ijbc.json").read_text())
    assert (ijb["templates"], ijb["pairs"], ijb["positive_pairs"], ijb["mode"]) == (6, 15, 3, "F1 N1 D1")
    assert all(0.0 <= ijb[f"tpr@fpr=1e-{k}"] <= 1.0 for k in range(1, 7))
    assert np.load(run / "ijbc_scores.npy").shape == (15,) and (run / "ijbc_features.h5").is_file()
    assert (run / "ijbc_roc.csv").read_text().startswith("fpr,tpr,threshold")


def _stale_stages(work: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    status = json.loads(_dvc(work, "status", "--json").strip() or "{}")
    return set(status)


def _stale_after_editing(work: Path, path: str) -> set[str]:
    """The stages `dvc status` reports after a comment is appended to `path` (restored afterwards)."""
    original = (work / path).read_text()
    (work / path).write_text(original + "\n# edited\n")
    try:
        return _stale_stages(work)
    finally:
        (work / path).write_text(original)


def _check_code_dependencies(work: Path, students: list[str]) -> None:
    """Editing a module reruns exactly the stages whose code it is (a comment is enough: DVC hashes files)."""
    cases = {
        "pipeline/losses/ekd.py": {f"train-student@{s}" for s in students},
        "pipeline/search/knn.py": {"build-pools"},
        "pipeline/evaluation/report.py": {"report"},
        "pipeline/synthetic/render.py": {"synthesize@demo"},
        "pipeline/training/sampling/hard_pairs.py": {f"train-student@{s}" for s in students},  # not the teacher
    }
    for path, expected in cases.items():
        assert _stale_after_editing(work, path) == expected, path
    # pipeline/fpr.py: build-pools and every other stage that imports it, which the generated deps name
    importers = {stage for stage, files in stage_deps.expected_deps(work).items() if "pipeline/fpr.py" in files}
    assert {"build-pools", "train-student", "evaluate"} <= importers and "synthesize" not in importers
    assert {name.split("@")[0] for name in _stale_after_editing(work, "pipeline/fpr.py")} == importers
    assert _stale_stages(work) == set()


def _check_experiments(work: Path, students: list[str]) -> None:
    """`dvc exp run -S` reruns the students; `dvc exp show` then has numbers for main and the experiment."""
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], cwd=work,
                   check=True)
    _dvc(work, "exp", "run", "-S", "student.warmup_epochs=0.25")
    table = json.loads(_dvc(work, "exp", "show", "--json", "--no-fetch"))
    main = next(row for row in table if row["rev"] != "workspace")
    rows = [main] + [exp for entry in main.get("experiments") or [] for exp in entry["revs"]]
    assert len(rows) == 2, table
    for row in rows:
        metrics = row["data"]["metrics"]
        for name in students:
            value = metrics[f"results/students/{name}/metrics.json"]["data"]["test"]["tpr@fpr=1e-2"]
            assert 0.0 <= value <= 1.0
    diff = json.loads(_dvc(work, "metrics", "diff", "--json", "HEAD", rows[1]["rev"]))
    assert any(path.startswith("results/students/") for path in diff)


def _write_real_folder(folder: Path, size: int = 16) -> None:
    """A small MS1M-like folder: train.rec/.idx/property with the insightface header, lfw.bin."""
    from pipeline.formats.jpeg import encode_jpeg
    from pipeline.formats.recordio import write_face_recordio
    from pipeline.formats.verification_bin import write_verification_bin

    rng = np.random.default_rng(0)
    bases = rng.integers(0, 255, size=(10, size, size, 3))

    def image(identity: int) -> bytes:
        noise = rng.integers(-20, 20, size=(size, size, 3))
        return encode_jpeg(np.clip(bases[identity] + noise, 0, 255).astype(np.uint8), quality=95)

    items = [(image(i), i) for i in range(10) for _ in range(5)]
    write_face_recordio(folder, items, with_header=True, num_classes=10, image_size=(size, size))
    pairs = [(a, a) for a in range(10)] + [(a, (a + 1) % 10) for a in range(10)]
    write_verification_bin(folder / "lfw.bin", [image(i) for pair in pairs for i in pair],
                           np.array([a == b for a, b in pairs]))


def test_dvc_repro_real_data_mode(tmp_path):
    from pipeline.models import get_model

    work = _project_copy(tmp_path)
    real = tmp_path / "ms1m"
    _write_real_folder(real)
    teacher = get_model("r18", input_size=16, width=0.125, num_features=32)
    state = {f"module.{k}": v for k, v in teacher.state_dict().items()}  # as DDP-trained arcface_torch saves
    torch.save(state, tmp_path / "backbone.pth")
    params = _tiny_params(work, synthetic={}, teacher_training={}, ijb=[])  # no IJB release: no evaluate-ijb
    params["data"]["dir"] = str(real)
    params["teacher"]["checkpoint"] = str(tmp_path / "backbone.pth")
    params["students"] = {k: params["students"][k] for k in ("baseline", "ekd")}
    # an ensemble: a second teacher of another size, extracted by its own stage, listed with the first
    second = get_model("r18", input_size=16, width=0.125, num_features=16)
    torch.save(second.state_dict(), tmp_path / "second.pth")
    params["extra_teachers"] = {"second": {"checkpoint": str(tmp_path / "second.pth")}}
    params["teachers"]["cache"] = [params["extract"]["out"], "data/cache/second.h5"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = _dvc(work, "repro")
    assert "synthesize" not in log and "train-teacher" not in log and "evaluate-ijb" not in log
    for stage in ("extract-teacher", "extract-extra-teacher@second", "build-pools", "train-student@ekd",
                  "evaluate-teacher", "report"):
        assert f"Running stage '{stage}'" in log
    with h5py.File(work / "data/pools/pools.h5", "r") as pools:
        assert json.loads(pools.attrs["caches"]) == ["data/cache/teacher.h5", "data/cache/second.h5"]
    metrics = json.loads((work / "results/teacher/metrics.json").read_text())
    assert 0.0 <= metrics["lfw"]["accuracy"] <= 1.0 and "test" not in metrics
    assert metrics["model"] == {"kind": "state_dict", "name": "r18", "params": sum(
        v.numel() for v in teacher.parameters())}
    assert (work / "data/students/ekd/model.pt").is_file()
    assert "lfw acc" in (work / "results/report/report.md").read_text()
