"""`pipeline evaluate-ijb --model A --model B [--model-weights ...]` on test_ijb's small IJB-C folder: a pair's
score is the weighted mean of the members' scores, each computed by test_ijb's direct re-computation of the
protocol; the ensemble's feature file (its members' raw features) is re-scored under other weights and flags,
and is never taken for one member's, nor one member's for the ensemble's."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.ensemble import save_projection
from test_ijb import LEVELS, SIZE, direct_protocol, write_ijb_folder

from pipeline.evaluation.metrics import tpr_at_fpr


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    """(root with IJBC/, a.ts (dim 8) and b.ts (dim 5), their matrices, the pair labels)."""
    root = tmp_path_factory.mktemp("ijb-ensemble")
    write_ijb_folder(root / "IJBC")
    matrices = [save_projection(root / "a.ts", 8, 0), save_projection(root / "b.ts", 5, 3)]
    lines = (root / "IJBC" / "meta" / "ijbc_template_pair_label.txt").read_text().split("\n")
    labels = np.array([int(line.split()[2]) for line in lines if line.strip()])
    return root, matrices, labels


def run(cli, root, out, *models, weights=None, flags=()):
    args = [a for name in models for a in ("--model", root / name)]
    args += ["--model-weights", weights] if weights else []
    return cli("evaluate-ijb", *args, "--ijb", root / "IJBC", "--out", out, "--input-size", SIZE, "--device", "cpu",
               "--batch-size", 7, "--workers", 0, *flags)


def mean_scores(root, matrices, weights, **flags) -> np.ndarray:
    shares = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(s * direct_protocol(root / "IJBC", p, **flags)[0] for s, p in zip(shares, matrices))


@pytest.mark.parametrize("weights, flags, protocol", [
    ("1,2", (), {}), (None, ("--no-flip", "--no-norm-score", "--no-detector-score"),
                      {"flip": False, "norm": False, "detector": False})])
def test_ensemble_scores_are_the_weighted_mean_of_the_members(ijb, cli, tmp_path, weights, flags, protocol):
    root, matrices, labels = ijb
    result = run(cli, root, tmp_path, "a.ts", "b.ts", weights=weights, flags=flags)
    assert result.exit_code == 0, result.output
    expected = mean_scores(root, matrices, [1.0, 2.0] if weights else [1.0, 1.0], **protocol)
    np.testing.assert_allclose(np.load(tmp_path / "ijbc_scores.npy"), expected, rtol=1e-5, atol=1e-6)
    saved = json.loads((tmp_path / "ijbc.json").read_text())
    direct = tpr_at_fpr(expected, labels, LEVELS)
    assert [saved[f"tpr@fpr=1e-{round(-np.log10(f))}"] for f in LEVELS] == [direct[f] for f in LEVELS]
    assert saved["model"]["kind"] == "ensemble"
    assert [m["path"] for m in saved["model"]["members"]] == [str(root / "a.ts"), str(root / "b.ts")]


def test_the_ensemble_feature_file_is_reused_across_weights_but_never_for_one_member(ijb, cli, tmp_path):
    root, matrices, _ = ijb
    assert run(cli, root, tmp_path, "a.ts", "b.ts").exit_code == 0
    reweighted = run(cli, root, tmp_path, "a.ts", "b.ts", weights="3,1")
    assert reweighted.exit_code == 0 and "reused the image features" in reweighted.output
    np.testing.assert_allclose(np.load(tmp_path / "ijbc_scores.npy"), mean_scores(root, matrices, [3.0, 1.0]),
                               rtol=1e-5, atol=1e-6)

    member = run(cli, root, tmp_path, "a.ts")  # the same run folder: one member is not the ensemble
    assert member.exit_code == 0 and "reused" not in member.output
    np.testing.assert_allclose(np.load(tmp_path / "ijbc_scores.npy"), direct_protocol(root / "IJBC", matrices[0])[0],
                               rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ijbc.json").read_text())["model"]["kind"] == "torchscript"

    again = run(cli, root, tmp_path, "a.ts", "b.ts")  # nor the member's file the ensemble's
    assert again.exit_code == 0 and "reused" not in again.output
    swapped = run(cli, root, tmp_path, "b.ts", "a.ts")  # the members' order is the columns' order
    assert swapped.exit_code == 0 and "reused" not in swapped.output
    np.testing.assert_allclose(np.load(tmp_path / "ijbc_scores.npy"), mean_scores(root, matrices, [1.0, 1.0]),
                               rtol=1e-5, atol=1e-6)


def test_bad_weights_exit_2_before_anything_is_written(ijb, cli, tmp_path):
    root = ijb[0]
    result = run(cli, root, tmp_path / "run", "a.ts", "b.ts", weights="2")
    assert result.exit_code == 2 and "2 weight(s)" not in result.output
    assert "error: --model-weights 2: 1 weight(s) for 2 model(s); give one per --model" in result.output
    assert not (tmp_path / "run").exists()
