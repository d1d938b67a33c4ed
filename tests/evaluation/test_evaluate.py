"""pipeline.evaluation and the `evaluate` stage on tiny folders, against direct computations with a model
whose embeddings are known (a fixed random linear projection of the normalised pixels)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers.teachers import Projection
from typer.testing import CliRunner

from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.metrics import roc_curve, tpr_at_fpr, verification_accuracy
from pipeline.evaluation.verification import (
    all_pairs_scores,
    embed_images,
    evaluate_folder,
    write_metrics,
)
from pipeline.formats.jpeg import decode_jpeg, encode_jpeg
from pipeline.formats.recordio import write_face_recordio
from pipeline.formats.verification_bin import write_verification_bin

SIZE, DIM = 16, 12


def _direct_embedding(model: Projection, rgb: np.ndarray) -> np.ndarray:
    """The projection applied with numpy to one HWC image (no torch batching, no flip helpers)."""
    chw = ((rgb.astype(np.float64) / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return chw.reshape(-1) @ model.p.numpy().astype(np.float64)


def _faces(rng, identities: int, per_identity: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Images around one random pattern per identity, labels in non-decreasing order."""
    images, labels = [], []
    for identity in range(identities):
        base = rng.integers(40, 216, (SIZE, SIZE, 3))
        for _ in range(per_identity):
            images.append(np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8))
            labels.append(identity)
    return images, np.array(labels)


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -------------------------------------------------------------------------------------------------- pieces
def test_all_pairs_scores_equals_full_matrix():
    rng = np.random.default_rng(0)
    emb = _normalised(rng.normal(size=(37, 6))).astype(np.float32)
    labels = rng.integers(0, 6, 37)
    positive, negative = all_pairs_scores(emb, labels, block=5)
    full = emb.astype(np.float64) @ emb.astype(np.float64).T
    i, j = np.triu_indices(37, k=1)
    same = labels[i] == labels[j]
    np.testing.assert_allclose(positive, full[i[same], j[same]], atol=1e-6)
    np.testing.assert_allclose(negative, full[i[~same], j[~same]], atol=1e-6)
    assert positive.dtype == negative.dtype == np.float32


def test_embed_images_arrays_and_jpeg_bytes():
    rng = np.random.default_rng(1)
    images, _ = _faces(rng, 3, 3)
    model = Projection()
    emb, flipped = embed_images(model, images, batch_size=4)
    np.testing.assert_allclose(emb, [_direct_embedding(model, im) for im in images], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flipped, [_direct_embedding(model, im[:, ::-1]) for im in images], rtol=1e-4, atol=1e-4)
    encoded = [encode_jpeg(im) for im in images]
    from_bytes, none = embed_images(model, encoded, batch_size=4, flip=False)
    assert none is None
    np.testing.assert_allclose(from_bytes, [_direct_embedding(model, decode_jpeg(b)) for b in encoded], rtol=1e-4, atol=1e-4)


def test_embed_images_rejects_bad_images():
    good = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(DataError, match="image 1"):
        embed_images(Projection(), [good, np.zeros((SIZE, SIZE + 1, 3), np.uint8)], source="set")
    with pytest.raises(DataError, match="set: image 0"):
        embed_images(Projection(), [b"GIF89a...."], source="set")


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def folder(tmp_path):
    """val.bin (24 pairs) and test.rec (8 identities x 4 images), written with the project's writers."""
    rng = np.random.default_rng(2)
    faces, labels = _faces(rng, 12, 2)
    others, _ = _faces(rng, 12, 1)
    pairs, issame = [], []
    for k in range(12):  # a same pair (identity k's two images) and a different pair per identity
        pairs += [faces[2 * k], faces[2 * k + 1], faces[2 * k], others[(k + 1) % 12]]
        issame += [True, False]
    write_verification_bin(tmp_path / "val.bin", [encode_jpeg(im) for im in pairs], issame)
    test_images, test_labels = _faces(rng, 8, 4)
    encoded = [encode_jpeg(im) for im in test_images]
    write_face_recordio(tmp_path, zip(encoded, test_labels.tolist()), prefix="test", write_property=False)
    return tmp_path, [encode_jpeg(im) for im in pairs], np.array(issame), encoded, test_labels


def _direct_metrics(model, bin_images, issame, test_images, test_labels, fprs):
    decoded = [decode_jpeg(b) for b in bin_images]
    emb = np.array([_direct_embedding(model, im) for im in decoded])
    flipped = np.array([_direct_embedding(model, im[:, ::-1]) for im in decoded])
    val = verification_accuracy(emb, issame, flipped=flipped)
    decoded = [decode_jpeg(b) for b in test_images]
    fused = _normalised(np.array([_direct_embedding(model, im) + _direct_embedding(model, im[:, ::-1]) for im in decoded]))
    i, j = np.triu_indices(len(decoded), k=1)
    scores, same = np.sum(fused[i] * fused[j], axis=1), test_labels[i] == test_labels[j]
    return val, scores, same, tpr_at_fpr(scores, same, fprs)


def test_evaluate_folder_and_written_files_match_direct_computation(folder, tmp_path_factory):
    data, bin_images, issame, test_images, test_labels = folder
    model = Projection()
    fprs = (1e-1, 1e-2)
    metrics = evaluate_folder(model, data, fprs=fprs, batch_size=7)
    val, scores, same, tprs = _direct_metrics(model, bin_images, issame, test_images, test_labels, fprs)

    assert metrics["val"]["accuracy"] == val["accuracy"] and metrics["val"]["std"] == val["std"]
    assert metrics["val"]["pairs"] == 24
    assert metrics["val"]["threshold"] == pytest.approx(np.mean(val["thresholds"]))
    assert 0.6 < val["accuracy"] < 1.0  # the pairs carry identity signal, not perfectly
    test = metrics["test"]
    assert test["tpr@fpr=1e-1"] == tprs[1e-1] and test["tpr@fpr=1e-2"] == tprs[1e-2]
    assert (test["images"], test["identities"], test["positive_pairs"], test["negative_pairs"]) == (32, 8, 48, 448)

    out = tmp_path_factory.mktemp("run")
    written = write_metrics(metrics, out)
    assert [p.name for p in written] == ["metrics.json", "roc.csv"]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"val", "test"} and saved["test"] == test
    with open(out / "roc.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["fpr", "tpr", "threshold"]
    fpr, tpr, thr = roc_curve(scores, same)
    for row in rows:  # every written point lies on the directly computed curve
        k = int(np.argmin(np.abs(thr[1:] - float(row["threshold"])))) + 1
        assert float(row["fpr"]) == pytest.approx(fpr[k]) and float(row["tpr"]) == pytest.approx(tpr[k])
    assert (float(rows[-1]["fpr"]), float(rows[-1]["tpr"])) == (1.0, 1.0)
    assert float(rows[0]["fpr"]) == 0.0 or float(rows[0]["fpr"]) == fpr[fpr > 0].min()
    assert not list(out.glob("*.tmp-*"))

    del metrics["roc"], metrics["test"]  # a rerun without a test set must not leave the old curve behind
    assert [p.name for p in write_metrics(metrics, out)] == ["metrics.json", "roc.csv"]
    assert (out / "roc.csv").read_text() == "fpr,tpr,threshold\n"


def test_evaluate_folder_without_inputs_raises(tmp_path):
    with pytest.raises(PipelineError, match="nothing to evaluate"):
        evaluate_folder(Projection(), tmp_path)


# ---------------------------------------------------------------------------------------------- the stage
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_evaluate_stage_with_a_torchscript_model(folder, tmp_path_factory):
    import typer

    from stages.evaluate import COMMANDS

    data = folder[0]
    work = tmp_path_factory.mktemp("stage")
    model = Projection()
    torch.jit.script(model).save(str(work / "model.ts"))
    app = typer.Typer()
    app.command()(COMMANDS["evaluate"])
    args = ["--model", str(work / "model.ts"), "--data", str(data), "--out", str(work / "run"),
            "--device", "cpu", "--input-size", str(SIZE), "--batch-size", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "metrics.json" in result.output
    saved = json.loads((work / "run" / "metrics.json").read_text())
    expected = evaluate_folder(model, data)
    assert saved["val"] == expected["val"]
    assert saved["test"].keys() == expected["test"].keys()
    for key, value in expected["test"].items():  # flat numbers, and the per-FPR tpr_se / resolved / impostor_pairs
        assert saved["test"][key] == (value if key == "resolved" else pytest.approx(value))
    assert math.isclose(saved["test"]["tpr@fpr=1e-1"], expected["test"]["tpr@fpr=1e-1"])
    bad = CliRunner().invoke(app, [*args[:-2], "--tpr-method", "mean"])
    assert isinstance(bad.exception, PipelineError)
