"""The embedded synthetic IJB-C set: held-out synthetic identities written in exactly the insightface IJB
layout (`pipeline.formats.ijb`), so that `pipeline evaluate-ijb` runs on every machine.

- Templates: `templates` per identity, each mixing still images (one crop each) and at most one "video"
  media of several frames (one nuisance for the video, each frame a small change of pose and expression,
  its own noise and detector crop). Template and media ids are non-contiguous integers.
- Loose crops: larger than the face (CROP_RATIO times the face side; the face side is ZOOM times the
  training image side `size`, so 160-200 px at 112, ~40-80 px at the small default of 32). Each shows what
  a training image of that face and nuisance (pose, light, occluders, ...) shows, placed by a random
  similarity (scale, an extra in-plane rotation, a shift) into the larger crop and rendered there; the five
  landmarks written to the meta file are the ArcFace template points of the training image's frame moved by
  that similarity, plus Gaussian detector noise (LANDMARK_NOISE face sides). Aligning a crop with them gives
  back the training image's framing, so the models see the framing they were trained on. The drawn face
  follows the template's layout, so for a frontal face the points lie within a few pixels of its eyes, nose
  tip and mouth corners (`render.face_landmarks`); a turned head's features move away from them, exactly
  as in the training images.
- Faceness: near 1 for frontal, clear faces, lower with yaw, pitch, blur, a mask or sunglasses.
- Pairs: every pair of templates, in random order and orientation: genuine when both are of one identity.

Every image has its own generator keyed (IMAGE_ROLE, identity, image), every video (VIDEO_ROLE, identity,
video), the plan (PLAN_KEY): the files are the same for any number of workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.formats.ijb import IjbMeta, IjbPaths, write_ijb_meta
from pipeline.formats.jpeg import encode_jpeg
from pipeline.models.preprocess import reference_points
from pipeline.progress import progress_bar
from pipeline.synthetic.identity import Identity, Nuisance, draw_nuisance
from pipeline.synthetic.render import image_transform, render_face
from pipeline.synthetic.streams import chunks, generator, ordered_map, split_identity

ROLE_IJB = 4  # identities: (ROLE_IJB, identity, 0), disjoint from train / val / test / monitor
IMAGE_ROLE, VIDEO_ROLE = 40, 41
PLAN_KEY = (30, 2, 0)
TARGET = "IJBC"
ZOOM = (0.85, 1.3)  # face side in the crop / the training image side
CROP_RATIO = (1.5, 1.9)  # loose crop side / face side
EXTRA_ROLL = 20.0  # degrees, uniform +-, on top of the nuisance roll
LANDMARK_NOISE = 0.012  # detector noise, standard deviation in face sides
STILLS = 3  # 0..STILLS still images per template
VIDEO_SHARE = 0.6  # templates with a video
FRAMES = (2, 4)  # frames per video, inclusive
VIDEO_DIFFICULTY = 0.2  # videos are harder than stills by this much (blur, noise, pose)
TASK_IMAGES = 32
DEG = math.pi / 180.0


@dataclass(frozen=True)
class IjbTask:
    """Crops to render in one worker call: (identity, image key, video key or None) each."""

    seed: int
    size: int
    difficulty: float
    items: tuple[tuple[int, tuple[int, int, int], tuple[int, int, int] | None], ...]


def faceness(n: Nuisance, rng: np.random.Generator) -> float:
    """A detector-like confidence: lower for turned, blurred and occluded faces."""
    score = (0.98 - 0.3 * abs(n.yaw) / (50 * DEG) - 0.15 * abs(n.pitch) / (20 * DEG) - 0.04 * n.blur
             - 0.2 * n.mask - 0.15 * (n.glasses == "sun") + rng.normal(0, 0.02))
    return float(np.clip(score, 0.05, 1.0))


def _frame(base: Nuisance, rng: np.random.Generator) -> Nuisance:
    """One frame of a video: the video's nuisance with a little motion and expression change."""
    return replace(base, yaw=base.yaw + rng.normal(0, 3 * DEG), pitch=base.pitch + rng.normal(0, 2 * DEG),
                   roll=base.roll + rng.normal(0, 2 * DEG), smile=float(np.clip(base.smile + rng.normal(0, 0.1), -0.3, 1)),
                   shift=(base.shift[0] + rng.normal(0, 0.005), base.shift[1] + rng.normal(0, 0.005)))


def placed_template(identity: Identity, nuisance: Nuisance, size: int, placed: Nuisance, crop: int) -> np.ndarray:
    """(5, 2) ArcFace template points of the `size` render of (identity, nuisance), carried into the `crop` render
    of (identity, placed) by the similarity between the two images' frames."""
    train, loose = image_transform(identity, nuisance, size), image_transform(identity, placed, crop)
    linear = loose[:, :2] @ np.linalg.inv(train[:, :2])
    return reference_points(size) @ linear.T + (loose[:, 2] - linear @ train[:, 2])


def render_crop(seed: int, identity_index: int, image_key: tuple, video_key: tuple | None, size: int,
                difficulty: float) -> tuple[bytes, np.ndarray, float]:
    """One loose crop: (JPEG, (5, 2) noisy landmarks, faceness score)."""
    identity = split_identity(seed, ROLE_IJB, identity_index, difficulty)
    rng = generator(seed, image_key)
    if video_key is None:
        nuisance, zoom = draw_nuisance(rng, difficulty), rng.uniform(*ZOOM)
    else:
        video = generator(seed, video_key)
        base = draw_nuisance(video, min(1.0, difficulty + VIDEO_DIFFICULTY))
        nuisance, zoom = _frame(base, rng), video.uniform(*ZOOM) * np.exp(rng.normal(0, 0.03))
    face = float(size * zoom)
    crop = int(round(face * rng.uniform(*CROP_RATIO)))
    share = face / crop  # of the crop's side taken by the face
    room = max(0.0, (1.0 - 1.15 * share) / 2)  # the head (about 1.15 face sides wide) stays inside
    placed = replace(nuisance, scale=nuisance.scale * share, roll=float(nuisance.roll + rng.uniform(-1, 1) * EXTRA_ROLL * DEG),
                     shift=(float(nuisance.shift[0] * share + rng.uniform(-room, room)),
                            float(nuisance.shift[1] * share + rng.uniform(-room, room))),
                     blur=nuisance.blur * share)  # blur is given per output size: keep it per face size
    pixels = render_face(identity, placed, crop, rng)
    landmarks = placed_template(identity, nuisance, size, placed, crop) + rng.normal(0, LANDMARK_NOISE * face, (5, 2))
    return encode_jpeg(pixels, placed.jpeg_quality), landmarks, faceness(placed, rng)


def render_task(task: IjbTask) -> list[tuple[bytes, np.ndarray, float]]:
    """Render a task's crops in order (module-level so process pools can pickle it)."""
    return [render_crop(task.seed, identity, image_key, video_key, task.size, task.difficulty)
            for identity, image_key, video_key in task.items]


@dataclass
class IjbPlan:
    """What to render and how it is grouped: one row per crop, plus the template pairs."""

    identity: np.ndarray  # (N,) identity of each crop
    templates: np.ndarray  # (N,) template id
    medias: np.ndarray  # (N,) media id
    keys: list[tuple[tuple[int, int, int], tuple[int, int, int] | None]]  # (image key, video key) per crop
    template_identity: dict[int, int]
    pairs: np.ndarray  # (P, 2) template ids
    labels: np.ndarray  # (P,) 1 genuine


def plan_ijb(seed: int, identities: int, templates: int) -> IjbPlan:
    """The layout: media per template, ids, frames per video, the pair list."""
    rng = generator(seed, PLAN_KEY)
    total = identities * templates
    template_ids = rng.permutation(rng.choice(np.arange(1, 20 * total + 1), total, replace=False))
    rows, keys, template_identity = [], [], {}
    media = int(rng.integers(10_000, 90_000))
    for i in range(identities):
        images = videos = 0
        for t in range(templates):
            tid = int(template_ids[i * templates + t])
            template_identity[tid] = i
            stills, video = int(rng.integers(0, STILLS + 1)), bool(rng.random() < VIDEO_SHARE)
            stills = max(stills, int(not video))
            for _ in range(stills):
                media += int(rng.integers(1, 9))
                rows.append((i, tid, media))
                keys.append(((IMAGE_ROLE, i, images), None))
                images += 1
            if video:
                media += int(rng.integers(1, 9))
                for _ in range(int(rng.integers(FRAMES[0], FRAMES[1] + 1))):
                    rows.append((i, tid, media))
                    keys.append(((IMAGE_ROLE, i, images), (VIDEO_ROLE, i, videos)))
                    images += 1
                videos += 1
    ids = np.fromiter(template_identity, np.int64, len(template_identity))
    owner = np.fromiter(template_identity.values(), np.int64, len(template_identity))
    index = np.stack(np.triu_indices(len(ids), 1), 1)  # every pair of templates, in the order of `ids`
    index = index[rng.permutation(len(index))]
    swap = rng.random(len(index)) < 0.5
    index[swap] = index[swap][:, ::-1]
    pairs, labels = ids[index], (owner[index[:, 0]] == owner[index[:, 1]]).astype(np.int8)
    table = np.array(rows, np.int64)
    return IjbPlan(table[:, 0], table[:, 1], table[:, 2], keys, template_identity, pairs, labels)


def write_ijb_set(root: str | Path, seed: int, size: int, difficulty: float, identities: int, templates: int,
                  workers: int = 1) -> dict:
    """Write `root`/IJBC (meta/ and loose_crop/); returns its counts."""
    folder = IjbPaths(Path(root) / TARGET, TARGET)
    folder.crops.mkdir(parents=True, exist_ok=True)
    plan = plan_ijb(seed, identities, templates)
    items = [(int(i), image_key, video_key) for i, (image_key, video_key) in zip(plan.identity, plan.keys)]
    tasks = [IjbTask(seed, size, difficulty, chunk) for chunk in chunks(items, TASK_IMAGES)]
    names, landmarks, scores = [], [], []
    with progress_bar(total=len(items), desc="ijb", unit="img") as bar:
        for crops in ordered_map(render_task, tasks, workers):
            for jpeg, points, score in crops:
                names.append(f"{len(names) + 1}.jpg")
                (folder.crops / names[-1]).write_bytes(jpeg)
                landmarks.append(points)
                scores.append(score)
            bar.update(len(crops))
    meta = IjbMeta(names, plan.templates, plan.medias, np.array(landmarks, np.float32),
                   np.array(scores, np.float32), plan.pairs, plan.labels)
    write_ijb_meta(folder.folder, TARGET, meta)
    genuine = int(plan.labels.sum())
    return {"target": TARGET, "identities": identities, "templates": len(plan.template_identity),
            "images": len(names), "media": int(np.unique(np.c_[plan.templates, plan.medias], axis=0).shape[0]),
            "video_frames": sum(video is not None for _, video in plan.keys), "pairs": len(plan.pairs),
            "positive_pairs": genuine, "negative_pairs": len(plan.pairs) - genuine}
