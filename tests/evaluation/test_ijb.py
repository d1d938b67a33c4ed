"""IJB-B/C template evaluation (`pipeline evaluate-ijb`) against a direct re-computation of insightface's
eval_ijbc protocol written here: a small IJB-layout folder written by this file, alignment by the linear
least-squares similarity fit, loops over templates and media, the ROC read-out of the reference script; the
alignment on a crop whose landmarks are known exactly; and every bad input of the issue."""
from __future__ import annotations

import csv
import json
import re
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch
from helpers.teachers import Projection

from pipeline.evaluation.alignment import (
    align_face,
    reference_points,
    similarity_transforms,
    warp_face,
)
from pipeline.evaluation.ijb import pair_scores
from pipeline.formats.ijb import IjbMeta, read_ijb, write_ijb_meta
from pipeline.formats.jpeg import encode_jpeg

SIZE, DIM = 16, 8
# the ArcFace template as published (96 x 112 crop), moved 8 px right for the 112 x 112 crop
TEMPLATE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                         [62.7299, 92.2041]]) + [8.0, 0.0]
LEVELS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


# ------------------------------------------------------------------------------------- independent pieces
def least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[[a, -b, tx], [b, a, ty]] minimising the squared distances, as a linear least-squares problem."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float)):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def reference_readout(scores, labels, levels, exact=False):
    """TPR at each FPR as eval_ijbc.py reads it: sklearn's roc_curve (intermediate points dropped), the curve
    reversed, the first point of least |fpr - level|; `exact`: the best TPR at FPR <= level, all points."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], np.asarray(labels)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    if not exact:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fpr, tpr = np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]
    if exact:
        return {f: float(max(t for x, t in zip(fpr, tpr) if x <= f)) for f in levels}
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {f: float(tpr[min(zip(np.abs(fpr - f), range(len(fpr))))[1]]) for f in levels}


def direct_protocol(folder, p: np.ndarray, flip=True, norm=True, detector=True, exact=False):
    """(pair scores, {fpr: tpr}) computed line by line from the folder's files."""
    meta = folder / "meta"
    faces = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines() if line.strip()]
    points = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines() if line.strip()]
    pairs = [line.split() for line in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()]
    target = TEMPLATE_112 * SIZE / 112
    feats = []
    for fields in points:
        bgr = cv2.imread(str(folder / "loose_crop" / fields[0]))
        matrix = least_squares_similarity(np.array(fields[1:11], float).reshape(5, 2), target)
        rgb = cv2.warpAffine(bgr, matrix, (SIZE, SIZE), borderValue=0.0)[:, :, ::-1]

        def embed(image):
            return ((image.astype(np.float64) / 255 - 0.5) / 0.5).transpose(2, 0, 1).reshape(-1) @ p

        f = embed(rgb) + embed(np.fliplr(rgb)) if flip else embed(rgb)
        f = f if norm else f / np.linalg.norm(f)
        feats.append(f * float(fields[11]) if detector else f)
    templates = {}
    for (_, tid, mid), f in zip(faces, feats):
        templates.setdefault(int(tid), {}).setdefault(int(mid), []).append(f)
    pooled = {}
    for tid, medias in templates.items():
        total = sum(np.mean(images, axis=0) for images in medias.values())
        pooled[tid] = total / np.linalg.norm(total)
    scores = np.array([pooled[int(a)] @ pooled[int(b)] for a, b, _ in pairs])
    labels = np.array([int(label) for _, _, label in pairs])
    return scores, reference_readout(scores, labels, LEVELS, exact)


# ---------------------------------------------------------------------------------------- the test folder
def _crop(base: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """A loose crop (larger than SIZE, not square) showing `base` (an aligned SIZE x SIZE face) under a random
    similarity, plus noise; returns (uint8 RGB crop, its five landmarks with detector noise)."""
    height, width = rng.integers(36, 60, 2)
    angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(1.4, 2.2)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([width, height]) / 2 - rotation @ np.array([SIZE / 2, SIZE / 2]) + rng.uniform(-3, 3, 2)
    to_crop = np.c_[rotation, shift]
    crop = cv2.warpAffine(base, to_crop, (int(width), int(height)), borderMode=cv2.BORDER_REPLICATE)
    crop = np.clip(crop + rng.normal(0, 30, crop.shape), 0, 255).astype(np.uint8)
    landmarks = (TEMPLATE_112 * SIZE / 112) @ rotation.T + shift + rng.normal(0, 0.4, (5, 2))
    return crop, landmarks


def write_ijb_folder(folder, identities=6, templates_per_identity=3, seed=0) -> dict:
    """An IJB-C layout folder in this file's own formatting: images of a template interleaved with others',
    stills and 2-3 frame videos, non-contiguous template and media ids, all template pairs in random order."""
    rng = np.random.default_rng(seed)
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    rows, template_identity = [], {}
    media_id = 5000
    common = rng.integers(60, 196, (4, 4, 3))
    for identity in range(identities):  # look-alikes: one shared pattern, a small personal difference
        base = cv2.resize((common + rng.integers(-25, 26, (4, 4, 3))).astype(np.uint8), (SIZE, SIZE))
        for _ in range(templates_per_identity):
            tid = int(rng.integers(1, 10**6))
            template_identity[tid] = identity
            for frames in rng.choice([1, 1, 2, 3], size=rng.integers(1, 4)):
                media_id += int(rng.integers(1, 50))
                rows += [(tid, media_id, *_crop(base, rng)) for _ in range(frames)]
    rows[0] = (rows[0][0], rows[-1][1], *rows[0][2:])  # a media id shared by two templates: pooled per template
    order = rng.permutation(len(rows))
    faces, points = [], []
    for k, index in enumerate(order):
        tid, mid, crop, landmarks = rows[index]
        name = f"{k + 1}.jpg"
        (folder / "loose_crop" / name).write_bytes(encode_jpeg(crop, quality=95))
        faces.append(f"{name} {tid} {mid}\n")
        points.append(f"{name} {' '.join(f'{v:.2f}' for v in landmarks.ravel())} {rng.uniform(0.3, 1):.3f}\n")
    ids = list(template_identity)
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(faces))
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(points))
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {int(template_identity[a] == template_identity[b])}\n" for a, b in pairs))
    return {"images": len(rows), "templates": len(ids), "pairs": len(pairs),
            "genuine": sum(template_identity[a] == template_identity[b] for a, b in pairs)}


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    counts = write_ijb_folder(root / "IJBC")
    model = Projection(SIZE, DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 flags TorchScript as deprecated
        torch.jit.script(model).save(str(root / "model.ts"))
    return root, counts, model.p.numpy().astype(np.float64)


def _run(cli, root, out, *extra):
    return cli("evaluate-ijb", "--model", root / "model.ts", "--ijb", root / "IJBC", "--out", out,
               "--input-size", SIZE, "--device", "cpu", "--batch-size", 7, *extra)


# ------------------------------------------------------------------------------------------------ alignment
def test_similarity_fit_equals_the_linear_least_squares_solution():
    rng = np.random.default_rng(1)
    for _ in range(50):
        landmarks = rng.uniform(0, 200, (5, 2))
        if rng.random() < 0.3:
            landmarks[:, 0] *= -1  # a mirrored set: the best fit without reflection is still a rotation
        matrices, ok = similarity_transforms(landmarks[None], TEMPLATE_112)
        assert ok[0]
        np.testing.assert_allclose(matrices[0], least_squares_similarity(landmarks, TEMPLATE_112), atol=1e-9)
    np.testing.assert_allclose(reference_points(112), TEMPLATE_112, atol=1e-5)  # the published numbers
    np.testing.assert_allclose(reference_points(32), TEMPLATE_112 * 32 / 112, atol=1e-5)
    _, ok = similarity_transforms(np.full((1, 5, 2), 7.0), TEMPLATE_112)
    assert not ok[0]


@pytest.mark.parametrize("size", [112, 32])
def test_alignment_moves_exactly_known_landmarks_onto_the_template(size):
    """A crop drawn analytically from a known similarity: dots at the five template points, seen through
    crop -> template coordinates T. Aligning with the landmarks T^-1(template) must give back the drawing."""
    target = TEMPLATE_112 * size / 112
    sigma = 2.5 * size / 112 + 0.8

    def drawing(x, y):  # in template coordinates: a dot of 255 at each point
        return 255 * np.max([np.exp(-((x - u) ** 2 + (y - v) ** 2) / (2 * sigma**2)) for u, v in target], 0)

    angle, scale, shift = 0.4, 0.55, np.array([-3.0, 5.0]) * size / 112  # a crop pixel is 0.55 template px
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    height, width = int(2.2 * size / scale), int(2.6 * size / scale)
    v, u = np.mgrid[0:height, 0:width].astype(float)
    template_xy = np.stack([u, v], -1) @ linear.T + shift  # T: crop pixel -> template coordinates
    crop = np.repeat(np.rint(drawing(template_xy[..., 0], template_xy[..., 1]))[..., None], 3, 2).astype(np.uint8)
    landmarks = (target - shift) @ np.linalg.inv(linear).T  # T^-1 of the template points, exactly

    aligned = align_face(crop, landmarks, size).astype(float)[..., 0]
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    assert aligned.shape == (size, size)
    # only interpolation error: h^2/8 |f''| of a dot >= 2.7 crop px wide, rounding, 1/32 px coordinates
    assert np.abs(aligned - drawing(xx, yy)).max() <= 8
    for u0, v0 in target:  # each dot's centre of mass sits on its template point
        window = (np.abs(xx - u0) <= 2 * sigma) & (np.abs(yy - v0) <= 2 * sigma)
        weights = aligned * window
        centre = np.array([(weights * xx).sum(), (weights * yy).sum()]) / weights.sum()
        assert np.abs(centre - (u0, v0)).max() < 0.25


def test_warp_is_bilinear_with_a_black_border():
    """cv2's warp against bilinear sampling written here, on a smooth image (OpenCV rounds coordinates to
    1/32 px), and zeros outside the crop."""
    rng = np.random.default_rng(3)
    crop = cv2.resize(rng.integers(0, 256, (5, 6, 3)).astype(np.uint8), (60, 50), interpolation=cv2.INTER_CUBIC)
    matrix = least_squares_similarity(TEMPLATE_112 * 0.4 + [10, 8], TEMPLATE_112 * 32 / 112)
    warped = warp_face(crop, matrix, 32).astype(float)
    inverse = np.linalg.inv(np.r_[matrix, [[0, 0, 1]]])[:2]
    yy, xx = np.mgrid[0:32, 0:32].astype(float)
    sx = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
    sy = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
    inside = (sx >= 0) & (sy >= 0) & (sx <= 59) & (sy <= 49)
    x0, y0 = np.floor(sx).astype(int).clip(0, 58), np.floor(sy).astype(int).clip(0, 48)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    image = crop.astype(float)
    expected = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x0 + 1])
                + fy * ((1 - fx) * image[y0 + 1, x0] + fx * image[y0 + 1, x0 + 1]))
    assert np.abs(warped[inside] - expected[inside]).max() <= 2
    outside = (sx < -1) | (sy < -1) | (sx > 60) | (sy > 50)
    assert outside.any() and not warped[outside].any()


# ------------------------------------------------------------------------------------------------ protocol
def test_protocol_and_files_match_direct_recomputation(ijb, cli, tmp_path):
    root, counts, p = ijb
    result = _run(cli, root, tmp_path, "--workers", 1)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "ijbc.json").read_text())
    scores, tprs = direct_protocol(root / "IJBC", p)
    assert [k for k in saved if k.startswith("tpr@")] == [f"tpr@fpr=1e-{e}" for e in range(6, 0, -1)]
    for level in LEVELS:
        assert saved[f"tpr@fpr=1e-{round(-np.log10(level))}"] == tprs[level]
    assert len(set(tprs.values())) > 1  # the levels read different points of the curve
    assert (saved["images"], saved["templates"], saved["pairs"], saved["positive_pairs"]) == (
        counts["images"], counts["templates"], counts["pairs"], counts["genuine"])
    assert saved["mode"] == "F1 N1 D1" and saved["tpr_method"] == "nearest" and saved["target"] == "IJBC"
    stored = np.load(tmp_path / "ijbc_scores.npy")
    assert stored.dtype == np.float32 and stored.shape == (counts["pairs"],)
    np.testing.assert_allclose(stored, scores, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "ijbc_roc.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["fpr", "tpr", "threshold"] and (rows[-1]["fpr"], rows[-1]["tpr"]) == ("1.0", "1.0")
    assert "reused" not in result.output

    # other flags and the exact read-out re-score the cached image features without the model
    again = _run(cli, root, tmp_path, "--no-flip", "--no-norm-score", "--no-detector-score", "--tpr-method", "exact",
                 "--workers", 0)
    assert again.exit_code == 0, again.output
    assert "reused the image features" in again.output
    saved = json.loads((tmp_path / "ijbc.json").read_text())
    scores, tprs = direct_protocol(root / "IJBC", p, flip=False, norm=False, detector=False, exact=True)
    np.testing.assert_allclose(np.load(tmp_path / "ijbc_scores.npy"), scores, rtol=1e-5, atol=1e-6)
    assert [saved[f"tpr@fpr=1e-{round(-np.log10(f))}"] for f in LEVELS] == [tprs[f] for f in LEVELS]
    assert saved["mode"] == "F0 N0 D0" and saved["flags"] == {"flip": False, "norm_score": False,
                                                             "detector_score": False}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_feature_file_is_not_reused_for_another_model_or_other_images(ijb, cli, tmp_path):
    root, _, _ = ijb
    assert _run(cli, root, tmp_path, "--workers", 0).exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(root / "IJBC", other / "IJBC")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Projection(SIZE, DIM, seed=1)).save(str(other / "model.ts"))
    shutil.copy(root / "model.ts", other / "same.ts")
    different_model = _run(cli, other, tmp_path, "--workers", 0)
    assert different_model.exit_code == 0 and "reused" not in different_model.output
    first = json.loads((tmp_path / "ijbc.json").read_text())
    crop = other / "IJBC" / "loose_crop" / "1.jpg"
    crop.write_bytes(encode_jpeg(np.zeros((40, 40, 3), np.uint8)))
    changed_image = _run(cli, other, tmp_path, "--workers", 0)
    assert changed_image.exit_code == 0 and "reused" not in changed_image.output
    assert json.loads((tmp_path / "ijbc.json").read_text())["model"] == first["model"]
    assert "reused" in _run(cli, other, tmp_path, "--workers", 0).output


@pytest.mark.parametrize("templates, block_bytes", [(30, 8 * 64), (30, 1 << 20), (400, 1 << 20)])
def test_pair_scores_are_the_dot_products_of_each_pair(templates, block_bytes):
    """Dense tiles (matrix products) and sparse ones (a dot product per pair) give each pair its score."""
    rng = np.random.default_rng(2)
    features = rng.normal(size=(templates, 5))
    unique = np.sort(rng.choice(10**6, templates, replace=False))
    pairs = unique[rng.integers(0, templates, (300, 2))]
    expected = [features[np.searchsorted(unique, a)] @ features[np.searchsorted(unique, b)] for a, b in pairs]
    np.testing.assert_allclose(pair_scores(unique, features, pairs, block_bytes), expected, rtol=1e-12, atol=1e-12)


def test_meta_files_written_by_the_library_read_back(tmp_path):
    meta = IjbMeta(names=["1.jpg", "2.jpg", "3.jpg"], templates=np.array([4, 4, 9]), medias=np.array([7, 8, 7]),
                   landmarks=np.arange(30, dtype=np.float32).reshape(3, 5, 2) + 0.25,
                   faceness=np.array([0.5, 1.0, 0.125], np.float32), pairs=np.array([[4, 9], [9, 4]]),
                   labels=np.array([0, 1], np.int8))
    write_ijb_meta(tmp_path, "ijbc", meta)
    back = read_ijb(tmp_path, "IJBC")
    assert back.names == meta.names and back.image_lines is None
    for name in ("templates", "medias", "landmarks", "faceness", "pairs", "labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(meta, name))


# ------------------------------------------------------------------------------------------------ bad input
def _break_line(path, line, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    path.write_text("".join(lines))


def _first_name(folder):
    return (folder / "meta" / "ijbc_name_5pts_score.txt").read_text().split()[0]


BAD_INPUTS = {
    "missing template/media file": (lambda f: (f / "meta" / "ijbc_face_tid_mid.txt").unlink(),
                                    r"ijbc_face_tid_mid.txt: missing"),
    "missing landmarks file": (lambda f: (f / "meta" / "ijbc_name_5pts_score.txt").unlink(),
                               r"ijbc_name_5pts_score.txt: missing"),
    "missing pair file": (lambda f: (f / "meta" / "ijbc_template_pair_label.txt").unlink(),
                          r"ijbc_template_pair_label.txt: missing"),
    "unknown template": (lambda f: _break_line(f / "meta" / "ijbc_template_pair_label.txt", 5,
                                                             f"{_known_template(f)} 77777777 0\n"),
                         r"ijbc_template_pair_label.txt line 5: template 77777777 is not in .*ijbc_face_tid_mid"),
    "pair label": (lambda f: _break_line(f / "meta" / "ijbc_template_pair_label.txt", 2, "1 2 3\n"),
                   r"ijbc_template_pair_label.txt line 2: label 3 is not 0 or 1"),
    "pair not integers": (lambda f: _break_line(f / "meta" / "ijbc_template_pair_label.txt", 3, "1 2.5 1\n"),
                          r"ijbc_template_pair_label.txt line 3: template id '2.5' is not an integer"),
    "missing crop": (lambda f: (f / "loose_crop" / "4.jpg").unlink(),
                     r"ijbc_name_5pts_score.txt line \d+: image 4.jpg not found in .*loose_crop"),
    "nine landmark numbers": (lambda f: _break_line(f / "meta" / "ijbc_name_5pts_score.txt", 3,
                                                    f"{_name_on(f, 3)} 1 2 3 4 5 6 7 8 9 0.9\n"),
                              r"ijbc_name_5pts_score.txt line 3: expected an image name, 10 landmark coordinates "
                              r"and a faceness score \(12 fields\), got 11 fields"),
    "nan landmark": (lambda f: _break_line(f / "meta" / "ijbc_name_5pts_score.txt", 2,
                                           f"{_name_on(f, 2)} 1 2 3 4 nan 6 7 8 9 10 0.9\n"),
                     r"ijbc_name_5pts_score.txt line 2: landmark coordinate 5 'nan' is not a finite number"),
    "text landmark": (lambda f: _break_line(f / "meta" / "ijbc_name_5pts_score.txt", 6,
                                            f"{_name_on(f, 6)} 1 2 3 4 5 6 7 eight 9 10 0.9\n"),
                      r"ijbc_name_5pts_score.txt line 6: landmark coordinate 8 'eight' is not a finite number"),
    "landmarks coincide": (lambda f: _break_line(f / "meta" / "ijbc_name_5pts_score.txt", 5,
                                                 f"{_name_on(f, 5)} {' '.join(['7'] * 10)} 0.9\n"),
                           r"ijbc_name_5pts_score.txt line 5: the five landmarks of .* coincide"),
    "blank lines, then an unknown template": (
        lambda f: _break_line(f / "meta" / "ijbc_template_pair_label.txt", 2,
                              f"\n\n{_known_template(f)} 55555555 1\n"),
        r"ijbc_template_pair_label.txt line 4: template 55555555 is not in"),
    "files disagree": (lambda f: _break_line(f / "meta" / "ijbc_name_5pts_score.txt", 4,
                                             "x.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n"),
                       r"ijbc_name_5pts_score.txt line 4: image 'x.jpg', but .*ijbc_face_tid_mid.txt line 4 names"),
    "not a JPEG": (lambda f: (f / "loose_crop" / "7.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40)),
                   r"loose_crop/7.jpg \(.*ijbc_name_5pts_score.txt line \d+\): not a JPEG \(starts with 89504e47\)"),
    "truncated JPEG": (lambda f: (f / "loose_crop" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(10)),
                       r"loose_crop/2.jpg \(.*line \d+\): cannot decode the JPEG"),
}


def _known_template(folder):
    return (folder / "meta" / "ijbc_face_tid_mid.txt").read_text().split()[1]


def _name_on(folder, line):
    return (folder / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[line - 1].split()[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_line_and_leaves_no_result(case, ijb, cli, tmp_path):
    root, _, _ = ijb
    work = tmp_path / "work"
    shutil.copytree(root / "IJBC", work / "IJBC")
    shutil.copy(root / "model.ts", work / "model.ts")
    out = tmp_path / "run"
    out.mkdir()
    (out / "ijbc.json").write_text("{}")  # a result of an earlier run must not survive a failed one
    damage, message = BAD_INPUTS[case]
    damage(work / "IJBC")
    result = _run(cli, work, out, "--workers", 2 if case == "not a JPEG" else 0)
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, error), error
    assert not (out / "ijbc.json").exists() and not list(out.glob("*.tmp-*"))
