"""The synthetic benchmark: determinism, file layouts, split disjointness and a basic identity signal."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import PipelineError
from pipeline.formats.jpeg import decode_jpeg
from pipeline.formats.recordio import FaceRecordIO
from pipeline.formats.verification_bin import load_verification_bin
from pipeline.synthetic import writer as synthetic
from pipeline.synthetic.writer import (
    ROLE_MONITOR,
    ROLE_TEST,
    ROLE_TRAIN,
    ROLE_VAL,
    SyntheticConfig,
    contact_sheet,
    images_per_identity_counts,
    render_image,
    render_pixels,
    split_identity,
    synthesize,
)
from stages.synthesize import COMMANDS

TINY = dict(identities=5, images_per_identity=3, size=24, seed=7, difficulty=0.5, val_identities=20,
            val_pairs=40, test_identities=4, test_images_per_identity=2)
FILES = ("train.rec", "train.idx", "property", "val.bin", "val_pairs.csv", "test.rec", "test.idx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, synthesize(out, **TINY)


def _bytes(folder):
    return {name: (folder / name).read_bytes() for name in FILES}


@pytest.mark.slow
def test_same_arguments_give_identical_files_with_any_worker_count(tiny, tmp_path):
    folder, _ = tiny
    synthesize(tmp_path, **TINY, workers=2)
    assert _bytes(tmp_path) == _bytes(folder)
    assert (tmp_path / "synthetic.json").read_bytes() == (folder / "synthetic.json").read_bytes()


def test_different_seed_gives_different_files(tiny, tmp_path):
    folder, _ = tiny
    synthesize(tmp_path, **{**TINY, "seed": 8})
    for name in ("train.rec", "val.bin", "test.rec"):
        assert (tmp_path / name).read_bytes() != (folder / name).read_bytes(), name


def test_train_labels_property_and_image_size(tiny):
    folder, summary = tiny
    train = FaceRecordIO(folder)
    classes, per = TINY["identities"], TINY["images_per_identity"]
    assert train.has_header
    np.testing.assert_array_equal(train.labels, np.repeat(np.arange(classes), per))
    assert (folder / "property").read_text() == f"{classes},24,24\n"
    assert train.num_classes == classes and train.image_size == (24, 24)
    assert all(train.decode(i).shape == (24, 24, 3) for i in range(len(train)))
    assert summary["train"] == {"identities": classes, "images": classes * per, "min_images": per,
                                "max_images": per}


def test_train_and_test_images_are_renders_of_their_split_identities(tiny):
    folder, _ = tiny
    train, test = FaceRecordIO(folder), FaceRecordIO(folder / "test")
    seed, size, difficulty = TINY["seed"], TINY["size"], TINY["difficulty"]
    identity = split_identity(seed, ROLE_TRAIN, 3, difficulty)
    row = 3 * TINY["images_per_identity"] + 1  # identity 3, image 1
    assert train.read(row) == (render_image(identity, seed, (ROLE_TRAIN, 3, 2), size, difficulty), 3)
    identity = split_identity(seed, ROLE_TEST, 2, difficulty)
    assert test.read(5) == (render_image(identity, seed, (ROLE_TEST, 2, 2), size, difficulty), 2)


def test_test_split_labels_and_pair_counts(tiny):
    folder, summary = tiny
    test = FaceRecordIO(folder / "test")
    t, m = TINY["test_identities"], TINY["test_images_per_identity"]
    np.testing.assert_array_equal(test.labels, np.repeat(np.arange(t), m))
    assert all(test.decode(i).shape == (24, 24, 3) for i in range(len(test)))
    n = t * m
    labels = test.labels
    positives = sum(labels[i] == labels[j] for i in range(n) for j in range(i + 1, n))
    assert summary["test"]["positive_pairs"] == positives
    assert summary["test"]["negative_pairs"] == n * (n - 1) // 2 - positives


def test_default_test_split_has_a_million_negative_pairs():
    defaults = SyntheticConfig()
    t, m = defaults.test_identities, defaults.test_images_per_identity
    n = t * m
    assert n * (n - 1) // 2 - t * m * (m - 1) // 2 >= 1_000_000


def test_held_out_identities_are_disjoint_from_training(tiny):
    folder, _ = tiny
    seed, d = TINY["seed"], TINY["difficulty"]
    vectors = {role: np.array([split_identity(seed, role, i, d).vector() for i in range(count)])
               for role, count in ((ROLE_TRAIN, 5), (ROLE_VAL, 20), (ROLE_TEST, 4))}
    for a, b in ((ROLE_TRAIN, ROLE_VAL), (ROLE_TRAIN, ROLE_TEST), (ROLE_VAL, ROLE_TEST)):
        distances = np.linalg.norm(vectors[a][:, None] - vectors[b][None], axis=-1)
        assert distances.min() > 0.1, (a, b)
    train, test = FaceRecordIO(folder), FaceRecordIO(folder / "test")
    train_images = {train.read(i)[0] for i in range(len(train))}
    assert not train_images & {test.read(i)[0] for i in range(len(test))}


def test_val_bin_has_ten_folds_of_positive_then_negative_pairs(tiny):
    folder, summary = tiny
    images, issame = load_verification_bin(folder / "val.bin")
    n = TINY["val_pairs"]
    assert len(images) == 2 * n and issame.shape == (n,)
    per_fold = n // 10
    expected = np.tile(np.r_[np.ones(per_fold // 2, bool), np.zeros(per_fold // 2, bool)], 10)
    np.testing.assert_array_equal(issame, expected)
    with open(folder / "val_pairs.csv") as handle:
        rows = [[int(v) for v in row.values()] for row in csv.DictReader(handle)]
    assert [r[0] for r in rows] == list(range(n))
    for pair, fold, first, second, same in rows:
        assert fold == pair // per_fold and same == issame[pair]
        assert (first == second) == bool(same)
        assert first % 10 == fold and second % 10 == fold  # folds do not share identities
    assert summary["val"]["positive_pairs"] == n // 2
    # the images are renders of the recorded identities (re-rendered independently of the writer)
    seed, size, d = TINY["seed"], TINY["size"], TINY["difficulty"]
    for pair in (0, per_fold // 2, n - 1):
        for side in (0, 1):
            identity = split_identity(seed, ROLE_VAL, rows[pair][2 + side], d)
            assert images[2 * pair + side] == render_image(identity, seed, (20, pair, side), size, d)
            assert decode_jpeg(images[2 * pair + side]).shape == (24, 24, 3)


def test_summary_json_lists_the_arguments_and_file_hashes(tiny):
    folder, summary = tiny
    written = json.loads((folder / "synthetic.json").read_text())
    assert written["args"] == {**TINY, "long_tail": False, "monitor_identities": 0, "monitor_images_per_identity": 5,
                               "ijb_identities": 0, "ijb_templates": 5}
    for name in FILES:
        assert written["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


def test_long_tail_counts_are_log_normal_with_a_floor():
    counts = images_per_identity_counts(3, 4000, 40, long_tail=True)
    assert counts.min() >= 8 and counts.max() <= 400
    assert 0.9 * 40 < counts.mean() < 1.2 * 40
    assert np.median(counts) < counts.mean()  # right-skewed, as MS1M
    # quartiles (untouched by the clipping) of a log-normal with mean 40 and sigma 1: 40 exp(+-0.6745 - 1/2)
    expected = 40 * np.exp(np.array([-0.6745, 0.0, 0.6745]) - 0.5)
    np.testing.assert_allclose(np.quantile(counts, [0.25, 0.5, 0.75]), expected, rtol=0.08)
    np.testing.assert_array_equal(images_per_identity_counts(3, 10, 40, long_tail=False), np.full(10, 40))


def test_long_tail_training_set_uses_those_counts(tmp_path):
    args = {**TINY, "identities": 6, "images_per_identity": 10, "long_tail": True, "val_pairs": 20,
            "test_identities": 2}
    summary = synthesize(tmp_path, **args)
    counts = images_per_identity_counts(args["seed"], 6, 10, long_tail=True)
    assert len(set(counts.tolist())) > 1
    np.testing.assert_array_equal(np.bincount(FaceRecordIO(tmp_path).labels), counts)
    assert (summary["train"]["min_images"], summary["train"]["max_images"]) == (counts.min(), counts.max())


def _within_between(difficulty: float, identities: int = 8, images: int = 4) -> tuple[float, float]:
    """Mean squared pixel distance between images of the same identity and of different identities."""
    x = np.array([[render_pixels(split_identity(0, ROLE_TRAIN, i, difficulty), 0, (ROLE_TRAIN, i, j + 1), 32,
                                 difficulty)[0].ravel() for j in range(images)] for i in range(identities)],
                 dtype=np.float32).reshape(identities * images, -1)
    labels = np.repeat(np.arange(identities), images)
    distances = ((x[:, None] - x[None]) ** 2).mean(-1)
    same = labels[:, None] == labels[None]
    return distances[same & ~np.eye(len(x), dtype=bool)].mean(), distances[~same].mean()


def test_identity_signal_in_raw_pixels_and_difficulty_knob():
    within_easy, between_easy = _within_between(0.0)
    assert within_easy < 0.7 * between_easy
    within_hard, between_hard = _within_between(1.0)
    assert within_hard / between_hard > within_easy / between_easy


def test_contact_sheet_tiles_are_the_split_renders():
    sheet = contact_sheet(identities=2, images=3, size=20, seed=1, difficulty=0.3)
    assert sheet.shape == (40, 60, 3) and sheet.dtype == np.uint8
    identity = split_identity(1, ROLE_TRAIN, 1, 0.3)
    np.testing.assert_array_equal(sheet[20:40, 40:60], render_pixels(identity, 1, (ROLE_TRAIN, 1, 3), 20, 0.3)[0])


@pytest.mark.parametrize("change", [{"val_pairs": 30}, {"val_identities": 19}, {"difficulty": 1.5},
                                    {"size": 8}, {"test_images_per_identity": 1}, {"workers": 0}])
def test_bad_arguments_raise_a_one_line_error(tmp_path, change):
    with pytest.raises(PipelineError) as error:
        synthesize(tmp_path, **{**TINY, **change})
    option = "--" + next(iter(change)).replace("_", "-")
    assert "\n" not in str(error.value) and option in str(error.value)
    assert not list(tmp_path.iterdir())


def test_a_failed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    synthesize(tmp_path, **TINY)  # a previous complete run in the same folder

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_verification_bin", fail)
    with pytest.raises(OSError):
        synthesize(tmp_path, **{**TINY, "seed": 99})
    assert not (tmp_path / "synthetic.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_stage_command_writes_and_reports(tmp_path):
    app = typer.Typer()
    app.command()(COMMANDS["synthesize"])
    args = ["--out", str(tmp_path), "--identities", "3", "--images-per-identity", "2", "--size", "20",
            "--val-identities", "20", "--val-pairs", "20", "--test-identities", "2",
            "--test-images-per-identity", "2", "--long-tail"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train.rec" in result.output and "val.bin" in result.output and "test.rec" in result.output
    written = json.loads((tmp_path / "synthetic.json").read_text())
    assert written["args"]["long_tail"] is True and written["args"]["identities"] == 3


def test_monitor_split_is_disjoint_held_out_identities(tmp_path):
    args = {**TINY, "monitor_identities": 4, "monitor_images_per_identity": 3}
    summary = synthesize(tmp_path, **args)
    monitor = FaceRecordIO(tmp_path / "monitor", require_property=False)
    assert len(monitor) == 12 and sorted(set(monitor.labels.tolist())) == [0, 1, 2, 3]
    assert summary["monitor"] == {"identities": 4, "images": 12, "positive_pairs": 12, "negative_pairs": 54}
    seed, d = TINY["seed"], TINY["difficulty"]
    monitor_ids = np.array([split_identity(seed, ROLE_MONITOR, i, d).vector() for i in range(4)])
    others = np.array([split_identity(seed, role, i, d).vector() for role in (ROLE_TRAIN, ROLE_VAL, ROLE_TEST)
                       for i in range(4)])
    assert not any(np.allclose(m, o) for m in monitor_ids for o in others)
    # the other files do not change when a monitor set is added
    plain = tmp_path / "plain"
    synthesize(plain, **TINY)
    for name in FILES:
        assert (plain / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert json.loads((tmp_path / "synthetic.json").read_text())["files"]["monitor.rec"]


def test_contact_sheet_png_is_the_rendered_grid(tiny):
    folder, _ = tiny
    sheet = np.asarray(Image.open(folder / "contact_sheet.png"))
    expected = contact_sheet(8, 10, size=TINY["size"], seed=TINY["seed"], difficulty=TINY["difficulty"])
    np.testing.assert_array_equal(sheet, expected)
