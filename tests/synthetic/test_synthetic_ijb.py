"""The embedded synthetic IJB set: exactly the insightface IJB layout, landmarks where the rendered face's
features are, templates of stills and multi-frame videos, genuine and impostor pairs, determinism."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.evaluation.alignment import (
    align_face,
    reference_points,
    similarity_transforms,
)
from pipeline.formats.ijb import read_ijb
from pipeline.formats.jpeg import decode_jpeg
from pipeline.synthetic.writer import synthesize
from pipeline.synthetic.identity import draw_nuisance
from pipeline.synthetic.ijb import placed_template
from pipeline.synthetic.render import face_landmarks, render_face
from pipeline.synthetic.streams import generator, split_identity

TINY = dict(identities=3, images_per_identity=2, size=24, seed=5, val_identities=20, val_pairs=20,
            test_identities=2, test_images_per_identity=2, ijb_identities=4, ijb_templates=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ijb")
    return out, synthesize(out, **TINY)


def test_layout_is_the_insightface_ijb_release(tiny):
    folder, summary = tiny
    root = folder / "ijb" / "IJBC"
    assert sorted(p.name for p in (root / "meta").iterdir()) == [
        "ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt"]
    meta = read_ijb(root, "IJBC")
    assert sorted(p.name for p in (root / "loose_crop").iterdir()) == sorted(meta.names)
    assert meta.names == [f"{k + 1}.jpg" for k in range(len(meta.names))]
    ijb = summary["ijb"]
    assert (ijb["images"], ijb["templates"], ijb["pairs"]) == (len(meta.names), 12, 66)
    assert json.loads((folder / "synthetic.json").read_text())["ijb"] == ijb
    assert "ijb/IJBC/meta/ijbc_template_pair_label.txt" in summary["files"]

    # every template pair once, genuine exactly when both templates are of one identity
    templates = np.unique(meta.templates)
    assert {tuple(sorted(p)) for p in meta.pairs.tolist()} == {
        (int(a), int(b)) for i, a in enumerate(templates) for b in templates[i + 1:]}
    assert 0 < meta.labels.sum() == ijb["positive_pairs"] == 4 * 3 < len(meta.labels)

    # templates mix stills (media of one crop) and videos (one media id for several frames)
    groups = {}
    for t, m in zip(meta.templates.tolist(), meta.medias.tolist()):
        groups[(t, m)] = groups.get((t, m), 0) + 1
    sizes = np.array(list(groups.values()))
    assert (sizes == 1).any() and (sizes >= 2).any() and sizes.max() <= 4
    assert ijb["video_frames"] == sizes[sizes >= 2].sum() and ijb["media"] == len(groups)

    for k, name in enumerate(meta.names):  # loose crops larger than the face, landmarks on it
        crop = decode_jpeg((root / "loose_crop" / name).read_bytes())
        assert crop.shape[0] == crop.shape[1] and crop.shape[0] >= 1.2 * TINY["size"]
        points = meta.landmarks[k]
        assert (points > 0).all() and (points < crop.shape[0]).all()
        eye_distance = np.linalg.norm(points[1] - points[0])
        assert 0.08 * crop.shape[0] < eye_distance < 0.3 * crop.shape[0]  # a face well inside a loose crop
    assert ((meta.faceness > 0) & (meta.faceness <= 1)).all() and meta.faceness.std() > 0


@pytest.mark.slow
def test_same_files_with_any_worker_count(tiny, tmp_path):
    folder, _ = tiny
    synthesize(tmp_path, **TINY, workers=2)
    for path in sorted((folder / "ijb").rglob("*")):
        if path.is_file():
            assert (tmp_path / path.relative_to(folder)).read_bytes() == path.read_bytes(), path


def test_landmarks_are_the_rendered_eyes_nose_and_mouth():
    """A large clean render: the eye landmarks fall on the dark pupils, the nose tip between the eyes and the
    mouth, and the five points fit the ArcFace template up to a few pixels."""
    identity = split_identity(0, 4, 7, 0.5)
    rng = generator(0, (99, 0, 0))
    nuisance = replace(draw_nuisance(rng, 0.5), glasses="", mask=False, hat=False, blur=0.0, noise=0.0,
                       eye_open=1.1, gaze=(0.0, 0.0), brightness=1.0, gradient=(0.0, 1.0, 0.0), scale=0.55,
                       shift=(0.04, -0.03), roll=0.3)
    image = render_face(identity, nuisance, 224, rng)
    points = face_landmarks(identity, nuisance, 224)
    luminance = image.astype(float).mean(2)
    skin = np.median(luminance[int(points[2, 1]) - 2:int(points[2, 1]) + 3, int(points[2, 0]) + 6])
    for x, y in points[:2]:
        assert luminance[int(round(y)), int(round(x))] < 0.4 * skin
    eyes, mouth = points[:2].mean(0), points[3:].mean(0)
    along = np.dot(points[2] - eyes, mouth - eyes) / np.dot(mouth - eyes, mouth - eyes)
    assert 0.3 < along < 0.8  # the nose tip lies between eyes and mouth
    # the drawn face is laid out like the ArcFace crop: aligned, each point is a few pixels from the template's
    matrices, _ = similarity_transforms(points[None], reference_points(112))
    moved = points @ matrices[0, :, :2].T + matrices[0, :, 2]
    assert np.abs(moved - reference_points(112)).max() < 6


def test_aligning_a_loose_crop_with_its_landmarks_gives_back_the_training_framing():
    """The same face and nuisance rendered at the training size and, placed by another scale, rotation and
    shift, in a larger crop: aligned with the carried template points (no detector noise) it is the training
    render again up to resampling, better registered than with the points moved by half a pixel, and far
    closer than a render of another identity. (No lighting gradient: it is laid over the image, not the face.)"""
    identity = split_identity(0, 4, 3, 0.5)
    nuisance = replace(draw_nuisance(generator(0, (98, 0, 0)), 0.5), noise=0.0, blur=0.0, gradient=(0.0, 1.0, 0.0))
    placed = replace(nuisance, scale=nuisance.scale * 0.55, roll=nuisance.roll - 0.35, shift=(0.06, -0.04))
    training = render_face(identity, nuisance, 32, generator(0, (98, 1, 0))).astype(float)
    crop = render_face(identity, placed, 64, generator(0, (98, 2, 0)))
    points = placed_template(identity, nuisance, 32, placed, 64)
    other = render_face(split_identity(0, 4, 9, 0.5), nuisance, 32, generator(0, (98, 1, 0))).astype(float)
    inner = (slice(4, 28), slice(4, 28))  # away from the crop's border

    def difference(offset):
        return np.abs(align_face(crop, points + offset, 32).astype(float) - training)[inner].mean()

    assert difference((0, 0)) < 6 and difference((0, 0)) < 0.3 * np.abs(other - training)[inner].mean()
    assert all(difference((0, 0)) < difference(offset) for offset in ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)))
