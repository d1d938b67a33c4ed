"""pipeline.models.ensemble: several loaded models as one embedder whose pair scores are the (weighted) mean of
the members' cosine similarities, checked against each member's embeddings computed with numpy alone."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers.ensemble import mean_cosines, save_projection

from pipeline.errors import PipelineError
from pipeline.evaluation.verification import embed_images, fuse_flips
from pipeline.models.ensemble import EmbedderEnsemble, member_blocks
from pipeline.weights import parse_weights
from pipeline.models.loading import load_embedder, load_ensemble

SIZE = 16


def load(paths, weights=None) -> EmbedderEnsemble:
    return load_ensemble(paths, weights, input_size=SIZE)  # TorchScript: the input size is given


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three model files of different embedding sizes, with their projection matrices."""
    root = tmp_path_factory.mktemp("ensemble-models")
    paths = [root / f"m{dim}.ts" for dim in (12, 7, 20)]
    return paths, [save_projection(path, dim, seed) for seed, (path, dim) in enumerate(zip(paths, (12, 7, 20)))]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(15)]


@pytest.mark.parametrize("count, weights, flip", [(2, None, True), (2, [1.0, 3.0], True), (3, [0.5, 2.0, 1.0], False),
                                                  (3, None, True)])
def test_pair_scores_are_the_weighted_mean_of_the_members_cosines(models, images, count, weights, flip):
    paths, matrices = models
    ensemble = load(paths[:count], weights)
    emb, flipped = embed_images(ensemble, images, batch_size=4, flip=flip)  # what evaluate runs
    assert emb.shape == (len(images), sum(p.shape[1] for p in matrices[:count]))
    fused = fuse_flips(emb, flipped, member_blocks(ensemble)).astype(np.float64)
    expected = mean_cosines(matrices[:count], weights, images, flip)
    np.testing.assert_allclose(fused @ fused.T, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, rtol=1e-6)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    direct = ensemble.embed(x, flip=flip)  # the ensemble's embedding of a batch
    np.testing.assert_allclose(direct @ direct.T, expected, rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_one_is_that_model(models, images):
    paths, _ = models
    member = load_embedder(paths[0], input_size=SIZE)
    for ensemble in (EmbedderEnsemble([member]), EmbedderEnsemble([member], [3.0]), load(paths[:1])):
        assert member_blocks(ensemble) is None and len(ensemble) == 1
        assert (ensemble.kind, ensemble.name, ensemble.dim, ensemble.input_size, ensemble.fingerprint,
                ensemble.path) == (member.kind, member.name, member.dim, member.input_size, member.fingerprint,
                                   member.path)
        assert ensemble.describe() == member.describe()
        mine, theirs = embed_images(ensemble, images), embed_images(member, images)
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))


def test_description_and_fingerprint_name_every_member(models):
    paths, _ = models
    ensemble = load(paths[:2], [1.0, 2.0])
    info = ensemble.describe()
    assert info["kind"] == "ensemble" and "mean" in info["scoring"]
    assert info["name"] == f"ensemble of {paths[0]} + {paths[1]} (weights 1.0, 2.0)"
    assert [m["path"] for m in info["members"]] == [str(p) for p in paths[:2]]
    assert [m["weight"] for m in info["members"]] == [1.0, 2.0]
    assert [m["share"] for m in info["members"]] == pytest.approx([1 / 3, 2 / 3])
    assert load(paths[:2]).describe()["name"] == f"ensemble of {paths[0]} + {paths[1]}"
    members = [load_embedder(p, input_size=SIZE).fingerprint for p in paths[:2]]
    assert ensemble.fingerprint not in members  # never one member's (an IJB feature file's key)
    assert ensemble.fingerprint == load(paths[:2]).fingerprint  # raw features do not depend on weights
    assert ensemble.fingerprint != load(paths[1::-1]).fingerprint  # the columns' order does


def test_members_with_different_input_sizes_are_refused_in_one_line(models, tmp_path):
    paths, _ = models
    save_projection(tmp_path / "big.ts", 12, 0, size=32)
    big = load_embedder(tmp_path / "big.ts", input_size=32)
    with pytest.raises(PipelineError) as error:
        EmbedderEnsemble([load_embedder(paths[0], input_size=SIZE), big])
    message = str(error.value)
    assert "\n" not in message and str(paths[0]) in message and str(tmp_path / "big.ts") in message
    assert "(16x16)" in message and "(32x32)" in message and "input size" in message


@pytest.mark.parametrize("text, fragment", [("1", "1 weight(s) for 2 model(s); give one per --model"),
                                            ("1,2,3", "3 weight(s) for 2 model(s)"),
                                            ("1,0", "0 is not a finite number > 0"),
                                            ("1,-2", "-2 is not a finite number > 0"),
                                            ("1,nan", "nan is not a finite number > 0"),
                                            ("a,b", "not a comma-separated list of numbers")])
def test_bad_weights_are_one_line_naming_the_option(text, fragment):
    with pytest.raises(PipelineError, match=rf"^--model-weights {re.escape(text)}: .*{re.escape(fragment)}"):
        parse_weights(text, 2, "--model-weights", "--model")
    assert parse_weights(" ", 2, "--model-weights", "--model") is None
    assert parse_weights("1, 2.5", 2, "--model-weights", "--model") == [1.0, 2.5]


def test_weights_from_python_are_checked_before_any_model_is_read(models, tmp_path):
    paths, _ = models
    with pytest.raises(PipelineError, match=r"2 weight\(s\) for 3 model\(s\)"):
        load_ensemble([*paths[:2], tmp_path / "absent.ts"], [1.0, 2.0], input_size=SIZE)
    with pytest.raises(PipelineError, match="at least one model"):
        EmbedderEnsemble([])
