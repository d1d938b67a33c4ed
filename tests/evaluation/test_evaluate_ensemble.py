"""`pipeline evaluate --model A --model B [--model-weights ...]`: the metrics of an ensemble scored by the mean
of its members' cosines, against the project's metric functions on scores computed directly with numpy; one
--model writes what a single model writes; bad weights are one line; `report` names the ensemble's members."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.ensemble import mean_cosines, save_projection, unit_embeddings
from helpers.processes import error_line

from pipeline.evaluation.metrics import tpr_at_fpr, verification_accuracy
from pipeline.evaluation.verification import evaluate_folder, write_metrics
from pipeline.formats.jpeg import decode_jpeg, encode_jpeg
from pipeline.formats.recordio import write_face_recordio
from pipeline.formats.verification_bin import write_verification_bin
from pipeline.models import get_model
from pipeline.models.loading import load_embedder

SIZE = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data folder (val.bin: 20 pairs; test.rec: 8 identities x 4 images) and three model files of
    embedding sizes 12, 7 and 9; returns (data folder, paths, matrices, decoded val images, issame, decoded
    test images, test labels)."""
    root = tmp_path_factory.mktemp("ensemble-eval")
    rng = np.random.default_rng(5)

    def faces(identities, per):
        out = []
        for _ in range(identities):
            base = rng.integers(40, 216, (SIZE, SIZE, 3))
            out += [np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8) for _ in range(per)]
        return out

    pairs, issame = faces(10, 2), []
    others = faces(10, 1)
    val = []
    for k in range(10):
        val += [pairs[2 * k], pairs[2 * k + 1], pairs[2 * k], others[(k + 1) % 10]]
        issame += [True, False]
    data = root / "data"
    data.mkdir()
    val_jpeg = [encode_jpeg(im) for im in val]
    write_verification_bin(data / "val.bin", val_jpeg, issame)
    test_jpeg = [encode_jpeg(im) for im in faces(8, 4)]
    labels = np.repeat(np.arange(8), 4)
    write_face_recordio(data, zip(test_jpeg, labels.tolist()), prefix="test", write_property=False)
    paths = [root / f"m{dim}.ts" for dim in (12, 7, 9)]
    matrices = [save_projection(path, dim, seed) for seed, (path, dim) in enumerate(zip(paths, (12, 7, 9)))]
    return (data, paths, matrices, [decode_jpeg(b) for b in val_jpeg], np.array(issame),
            [decode_jpeg(b) for b in test_jpeg], labels)


def evaluate(cli, data, out, *models, weights=None):
    args = [a for path in models for a in ("--model", path)] + (["--model-weights", weights] if weights else [])
    return cli("evaluate", *args, "--data", data, "--out", out, "--input-size", SIZE, "--device", "cpu",
               "--batch-size", 5)


@pytest.mark.parametrize("count, weights", [(2, None), (2, "1,3"), (3, "2,1,0.5")])
def test_ensemble_metrics_equal_those_of_the_mean_cosine_scores(setup, cli, tmp_path, count, weights):
    data, paths, matrices, val_images, issame, test_images, labels = setup
    result = evaluate(cli, data, tmp_path / "run", *paths[:count], weights=weights)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    w = None if weights is None else [float(x) for x in weights.split(",")]

    sims = mean_cosines(matrices[:count], w, test_images)  # the mean of the members' cosines, numpy alone
    i, j = np.triu_indices(len(test_images), k=1)
    scores, same = sims[i, j], labels[i] == labels[j]
    keys = [k for k in saved["test"] if k.startswith("tpr@fpr=")]
    assert len(keys) == 5
    direct = tpr_at_fpr(scores, same, [float(k.split("=")[1]) for k in keys])
    assert [saved["test"][k] for k in keys] == list(direct.values())
    assert len(set(direct.values())) > 1  # the levels read different points of the curve
    assert (saved["test"]["positive_pairs"], saved["test"]["negative_pairs"]) == (48, 448)

    # val.bin: 10-fold accuracy of the pairs' squared distances 2 - 2 x (mean cosine)
    w_all = np.ones(count) if w is None else np.asarray(w)
    concat = np.concatenate([np.sqrt(s) * unit_embeddings(p, val_images) for s, p in
                             zip(w_all / w_all.sum(), matrices[:count])], axis=1)
    assert saved["val"]["accuracy"] == pytest.approx(verification_accuracy(concat, issame)["accuracy"])

    model = saved["model"]
    assert model["kind"] == "ensemble" and [m["path"] for m in model["members"]] == [str(p) for p in paths[:count]]
    assert model["name"].startswith(f"ensemble of {paths[0]} + {paths[1]}")
    assert [m["weight"] for m in model["members"]] == (w or [1.0] * count)


def test_one_model_writes_what_a_single_model_writes(setup, cli, tmp_path):
    data, paths = setup[:2]
    plain = tmp_path / "plain"
    member = load_embedder(paths[0], input_size=SIZE)
    metrics = evaluate_folder(member, data, batch_size=5)
    metrics["model"] = member.describe()
    write_metrics(metrics, plain)
    outputs = []
    for name, weights in (("one", None), ("weighted", "3")):
        result = evaluate(cli, data, tmp_path / name, paths[0], weights=weights)
        assert result.exit_code == 0, result.output
        for file in ("metrics.json", "roc.csv"):
            assert (tmp_path / name / file).read_bytes() == (plain / file).read_bytes()
        outputs.append(result.output.replace(str(tmp_path / name), "RUN"))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("weights, message", [
    ("1", "--model-weights 1: 1 weight(s) for 2 model(s); give one per --model"),
    ("1,2,3", "--model-weights 1,2,3: 3 weight(s) for 2 model(s); give one per --model"),
    ("1,0", "--model-weights 1,0: 0 is not a finite number > 0"),
    ("-1,1", "--model-weights -1,1: -1 is not a finite number > 0"),
    ("one,two", "--model-weights one,two: not a comma-separated list of numbers")])
def test_bad_weights_exit_2_with_one_line(setup, cli, tmp_path, weights, message):
    data, paths = setup[:2]
    result = evaluate(cli, data, tmp_path / "run", *paths[:2], weights=weights)
    assert result.exit_code == 2
    assert error_line(result.output) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_members_of_different_input_sizes_exit_2_naming_both(setup, cli, tmp_path):
    data = setup[0]
    save_projection(tmp_path / "big.ts", 12, 0, size=112)  # TorchScript: 112 x 112 (no --input-size)
    torch.save(get_model("mbf", input_size=16, num_features=8, width=0.25).state_dict(), tmp_path / "small.pt")
    result = cli("evaluate", "--model", tmp_path / "big.ts", "--model", tmp_path / "small.pt", "--data", data,
                 "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert f"{tmp_path / 'big.ts'} (112x112)" in line and f"{tmp_path / 'small.pt'} (16x16)" in line
    assert not (tmp_path / "run").exists()


def test_report_shows_the_ensemble_beside_its_members_and_students(setup, cli, tmp_path):
    data, paths = setup[:2]
    students = tmp_path / "students"
    for name, models, weights in (("m12", paths[:1], None), ("m7", paths[1:2], None),
                                  ("ens", paths[:2], "1,2")):
        assert evaluate(cli, data, students / name, *models, weights=weights).exit_code == 0
    assert evaluate(cli, data, tmp_path / "reference", *paths[:2]).exit_code == 0
    result = cli("report", "--teacher", tmp_path / "reference", "--students", students, "--out", tmp_path / "report",
                 "--baseline", "")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "report.md").read_text()
    folder = paths[0].parent.name
    rows = [cell for cell in (line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| "))
            if "(" in cell]
    assert rows[:4] == [f"teacher (ensemble of {folder}/m12.ts + {folder}/m7.ts)",
                        f"ens (ensemble of {folder}/m12.ts x1 + {folder}/m7.ts x2)", "m12 (student)", "m7 (student)"]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["ens"]["role"] == "ensemble" and summary["m12"]["role"] == "student"
