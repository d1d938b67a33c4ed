"""The embedded synthetic face benchmark: procedural identities written in the real insightface formats.

`synthesize(out_dir, ...)` writes
- ``train.rec/.idx/property``: training identities 0..C-1 (insightface header layout, images grouped by
  identity), ``images_per_identity`` each, or a long-tailed (log-normal, MS1M-like) count per identity;
- ``val.bin``: an LFW-style verification set over held-out identities: ``val_pairs`` pairs in 10 contiguous
  folds, each fold half positive then half negative pairs, a fold's pairs drawing only on its own
  identities; pair k is images 2k and 2k+1. ``val_pairs.csv`` records each pair's identities;
- ``contact_sheet.png``: the first images of the first training identities, one identity per row, to see
  what the faces and their nuisances look like;
- ``monitor.rec/.idx`` (when asked for): other held-out identities, which training evaluates after every
  epoch, so the per-epoch curves never look at ``test.rec``;
- ``test.rec/.idx``: other held-out identities (labels 0..T-1) for all-pairs 1:1 evaluation; the defaults
  (500 identities x 6 images) give 7,500 positive and 4,491,000 negative pairs, enough for TPR at FPR 1e-5;
- ``synthetic.json`` last: the arguments, counts and sha256 of every file. A folder without it is incomplete.
  A killed run resumes: the training images rendered so far are kept in ``train.segments/``
  (`pipeline.synthetic.segments`) and a rerun with the same arguments renders only the rest.

Every identity and every image has its own generator, seeded by ``np.random.SeedSequence(seed,
spawn_key=(role, identity, image))``: the output is bit-identical for the same arguments whatever the
number of workers, and train / val / test identities (roles 0 / 1 / 2) are drawn by the same process from
disjoint seed streams. Look-alike families (`pipeline.synthetic.identity.FAMILY_SIZE` consecutive
identities of one split) share part of their latents.

Difficulty (0..1) scales every nuisance (pose, illumination, blur, noise, occluders, expression, JPEG
quality) and pulls identities together (smaller spread, stronger family resemblance). At the default 0.5
a large network stays clearly short of perfect at FPR 1e-4..1e-5 on ``test.rec`` while a small one lags it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import MAX_SIDE, write_face_recordio
from pipeline.formats.verification_bin import write_verification_bin
from pipeline.progress import progress_bar
from pipeline.storage.io import disk_full_is_one_line, output_lock, refuse_symlink, temporary_name
from pipeline.machine.resources import processes_bound, require_memory
from pipeline.settings import check, setting
from pipeline.synthetic.identity import Identity, draw_nuisance
from pipeline.synthetic.ijb import TARGET as IJB_TARGET
from pipeline.synthetic.ijb import write_ijb_set
from pipeline.synthetic.render import render_face
from pipeline.synthetic.segments import SEGMENT_TASKS, Segments, segment_images
from pipeline.synthetic.streams import chunks, generator, ordered_map, split_identity

FORMAT = "ekd-synthetic"
VERSION = 1
ROLE_TRAIN, ROLE_VAL, ROLE_TEST, ROLE_MONITOR = 0, 1, 2, 3
_VAL_IMAGE_ROLE = 20  # val images: (_VAL_IMAGE_ROLE, pair, side)
_PLAN_ROLE = 30  # (_PLAN_ROLE, 0, 0): long-tail counts; (_PLAN_ROLE, 1, 0): val pairs
VAL_FOLDS = 10
LONG_TAIL_SIGMA = 1.0  # log-normal sigma of the per-identity image count
TASK_IMAGES = 64  # images per pool task
CONTACT_SHEET = (8, 10)  # training identities (rows) x images each in contact_sheet.png
# memory per pixel of --size (measured at 112-512 px: ~50-60 B while an image is drawn, JPEGs 0.12-0.23 B)
RENDER_BYTES_PER_PIXEL, JPEG_BYTES_PER_PIXEL = 64, 0.25
FILES = ("train.rec", "train.idx", "property", "val.bin", "val_pairs.csv", "test.rec", "test.idx",
         "contact_sheet.png")


def render_pixels(identity: Identity, seed: int, key: tuple[int, int, int], size: int,
                  difficulty: float) -> tuple[np.ndarray, int]:
    """One image of ``identity`` before JPEG, and its JPEG quality; ``key`` seeds nuisance and noise."""
    rng = generator(seed, key)
    nuisance = draw_nuisance(rng, difficulty)
    return render_face(identity, nuisance, size, rng), nuisance.jpeg_quality


def render_image(identity: Identity, seed: int, key: tuple[int, int, int], size: int, difficulty: float) -> bytes:
    """One JPEG of ``identity`` exactly as written to the files (see `render_pixels`)."""
    return encode_jpeg(*render_pixels(identity, seed, key, size, difficulty))


@dataclass(frozen=True)
class RenderTask:
    """A batch of images to render in one worker call: (identity index, image seed key) per image."""

    seed: int
    size: int
    difficulty: float
    role: int
    items: tuple[tuple[int, tuple[int, int, int]], ...]


def render_task(task: RenderTask) -> list[bytes]:
    """Render a task's images in order (module-level so process pools can pickle it)."""
    identities: dict[int, Identity] = {}
    out = []
    for index, key in task.items:
        if index not in identities:
            identities[index] = split_identity(task.seed, task.role, index, task.difficulty)
        out.append(render_image(identities[index], task.seed, key, task.size, task.difficulty))
    return out


def images_per_identity_counts(seed: int, identities: int, mean: int, long_tail: bool) -> np.ndarray:
    """Images per training identity: ``mean`` each, or log-normal (sigma LONG_TAIL_SIGMA, median below the
    mean as in MS1M) clipped to [max(2, mean // 5), 10 * mean]."""
    if not long_tail:
        return np.full(identities, mean, dtype=np.int64)
    z = generator(seed, (_PLAN_ROLE, 0, 0)).standard_normal(identities)
    counts = np.rint(mean * np.exp(LONG_TAIL_SIGMA * z - LONG_TAIL_SIGMA**2 / 2))
    return np.clip(counts, max(2, mean // 5), 10 * mean).astype(np.int64)


def plan_val_pairs(seed: int, val_identities: int, val_pairs: int) -> np.ndarray:
    """(val_pairs, 4) int64 rows (fold, first identity, second identity, issame), LFW layout: fold f holds
    pairs f*n..(f+1)*n-1, positives first; fold f uses only the identities i with i % 10 == f."""
    rng = generator(seed, (_PLAN_ROLE, 1, 0))
    per_fold = val_pairs // VAL_FOLDS
    rows = []
    for fold in range(VAL_FOLDS):
        members = np.arange(fold, val_identities, VAL_FOLDS)
        for _ in range(per_fold // 2):
            a = rng.choice(members)
            rows.append((fold, a, a, 1))
        for _ in range(per_fold // 2):
            a, b = rng.choice(members, 2, replace=False)
            rows.append((fold, a, b, 0))
    return np.array(rows, dtype=np.int64)


def contact_sheet(identities: int = 8, images: int = 10, size: int = 112, seed: int = 0,
                  difficulty: float = 0.5, role: int = ROLE_TRAIN) -> np.ndarray:
    """A grid (uint8 RGB) of the first ``images`` images (before JPEG) of the first ``identities`` identities
    of a split, one identity per row: for looking at what a difficulty means."""
    sheet = np.zeros((identities * size, images * size, 3), dtype=np.uint8)
    for i in range(identities):
        identity = split_identity(seed, role, i, difficulty)
        for j in range(images):
            tile, _ = render_pixels(identity, seed, (role, i, j + 1), size, difficulty)
            sheet[i * size:(i + 1) * size, j * size:(j + 1) * size] = tile
    return sheet


@dataclass
class SyntheticConfig:
    """The knobs of `pipeline synthesize` (the same arguments give bit-identical files)."""

    identities: int = setting(2000, "Training identities (labels 0..identities-1).", min=2, max=10**7)
    images_per_identity: int = setting(40, "Images per training identity (the mean when --long-tail is on).", min=1,
                                       max=10**4)
    size: int = setting(112, "Image side in pixels (112 as insightface; 32-48 for a quick CPU demo).", min=16,
                        max=MAX_SIDE)
    seed: int = setting(0, "Master seed: the same arguments give bit-identical files.", min=0)
    difficulty: float = setting(0.5, "0..1: nuisance strength (pose, light, blur, noise, occluders, JPEG) and "
                                     "identity similarity.", min=0.0, max=1.0)
    val_identities: int = setting(300, f"Held-out identities for val.bin (at least {2 * VAL_FOLDS}: two per fold "
                                       "for negative pairs).", min=2 * VAL_FOLDS)
    val_pairs: int = setting(6000, f"val.bin pairs: {VAL_FOLDS} folds, half positive (a multiple of "
                                   f"{2 * VAL_FOLDS}).", min=2 * VAL_FOLDS)
    test_identities: int = setting(500, "Held-out identities for test.rec (labels 0..T-1).", min=2)
    test_images_per_identity: int = setting(6, "Images per test identity (all-pairs 1:1 evaluation).", min=2)
    monitor_identities: int = setting(0, "Held-out identities for monitor.rec, what training evaluates after every "
                                         "epoch (0 = no monitor set).", min=0)
    monitor_images_per_identity: int = setting(5, "Images per monitor identity.", min=2)
    ijb_identities: int = setting(0, "Held-out identities for the embedded IJB-C set ijb/IJBC/ (the insightface "
                                     "layout: meta/, loose_crop/; what `pipeline evaluate-ijb` reads); 0 = none. "
                                     "Every template pair is scored: 100 x 5 templates give 1,000 genuine and "
                                     "123,750 impostor pairs, which resolve FPR 1e-4 (12 impostors above it).",
                                  min=0)
    ijb_templates: int = setting(5, "Templates per IJB identity, each of still images and/or a multi-frame video.",
                                 min=2)
    long_tail: bool = setting(False, "Log-normal images per identity, MS1M-like, clipped to [max(2, mean/5), "
                                     "10*mean].")
    workers: int = setting(1, "Rendering processes; the output does not depend on it.", min=1,
                           validate=processes_bound)

    def __post_init__(self):
        check(self)
        if self.ijb_identities == 1:
            raise PipelineError("--ijb-identities 1: an IJB set needs at least 2 identities (impostor pairs)")
        if self.val_pairs % (2 * VAL_FOLDS):
            raise PipelineError(f"--val-pairs {self.val_pairs}: must be a multiple of {2 * VAL_FOLDS} "
                                f"({VAL_FOLDS} folds, half positive)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ijb_digests(work: Path) -> dict[str, str]:
    """sha256 of each file of the IJB set's meta/, and one over every loose crop's name and sha256."""
    folder = Path("ijb") / IJB_TARGET
    out = {(folder / "meta" / path.name).as_posix(): _sha256(path) for path in sorted((work / folder / "meta").iterdir())}
    crops = hashlib.sha256()
    for path in sorted((work / folder / "loose_crop").iterdir()):
        crops.update(f"{path.name} {_sha256(path)}\n".encode())
    out[(folder / "loose_crop").as_posix() + "/"] = crops.hexdigest()
    return out


def _written_ijb(out_dir: Path) -> bool:
    """Whether `out_dir/ijb` holds exactly the IJB set the last complete run recorded in synthetic.json: only
    its folders and regular files, no link, the same digests."""
    try:
        recorded = json.loads((out_dir / "synthetic.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    root = out_dir / "ijb"
    folders = {root, root / IJB_TARGET, root / IJB_TARGET / "meta", root / IJB_TARGET / "loose_crop"}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink() or (name in dirs and path not in folders) or \
                    (name in files and Path(parent) not in folders - {root, root / IJB_TARGET}):
                return False
    expected = {name: digest for name, digest in recorded.items() if name.startswith("ijb/")}
    return bool(expected) and _ijb_digests(out_dir) == expected


def _remove_previous_ijb(out_dir: Path) -> None:
    """Clear the way for this run's IJB set: an empty folder, or the set a previous run wrote (unchanged).
    Anything else in `out_dir/ijb` is not this command's to delete: refused before any work is done."""
    folder = out_dir / "ijb"
    if not os.path.lexists(folder):
        return
    refuse_symlink(folder, "the IJB set")
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    elif folder.is_dir() and _written_ijb(out_dir):
        shutil.rmtree(folder)
    else:
        raise PipelineError(f"{folder}: holds files synthesize did not write (or changed since); move them away "
                            "or choose another output folder, then rerun")


def _labelled_images(tasks: list[RenderTask], workers: int, desc: str) -> Iterator[tuple[bytes, int]]:
    """Render tasks in order, yielding (jpeg, identity) with a progress bar."""
    with progress_bar(total=sum(len(t.items) for t in tasks), desc=desc, unit="img") as bar:
        for task, images in zip(tasks, ordered_map(render_task, tasks, workers)):
            for (index, _), image in zip(task.items, images):
                yield image, index
            bar.update(len(images))


def _split_tasks(seed, size, difficulty, role, counts: np.ndarray) -> list[RenderTask]:
    items = [(i, (role, i, j + 1)) for i, n in enumerate(counts.tolist()) for j in range(n)]
    return [RenderTask(seed, size, difficulty, role, chunk) for chunk in chunks(items, TASK_IMAGES)]


def _write_identity_set(work: Path, prefix: str, role: int, identities: int, per_identity: int,
                        cfg: SyntheticConfig) -> dict:
    """`<prefix>.rec/.idx`: `per_identity` images of each held-out identity of `role` (labels 0..identities-1)
    for all-pairs 1:1 evaluation; returns its counts."""
    counts = np.full(identities, per_identity, dtype=np.int64)
    tasks = _split_tasks(cfg.seed, cfg.size, cfg.difficulty, role, counts)
    images = write_face_recordio(work, _labelled_images(tasks, cfg.workers, prefix), prefix=prefix,
                                 num_classes=identities, image_size=(cfg.size, cfg.size), write_property=False)
    positives = identities * per_identity * (per_identity - 1) // 2
    return {"identities": identities, "images": images, "positive_pairs": positives,
            "negative_pairs": images * (images - 1) // 2 - positives}


def synthesize(out_dir: str | os.PathLike, config: SyntheticConfig | None = None, **settings) -> dict:
    """Write the synthetic benchmark into ``out_dir`` (see the module docstring); returns the summary dict
    (also written as ``synthetic.json``, plus ``seconds`` and ``images_per_second``). `config` or
    SyntheticConfig fields by name say what to write."""
    cfg = replace(config, **settings) if config is not None else SyntheticConfig(**settings)
    args = {key: value for key, value in asdict(cfg).items() if key != "workers"}  # the output's identity
    args["difficulty"] = float(cfg.difficulty)
    require_memory(f"--size {cfg.size} (with --workers {cfg.workers}, --val-pairs {cfg.val_pairs})",
                   memory_needed(cfg))  # before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir), disk_full_is_one_line(out_dir):
        return _synthesize(out_dir, cfg, args)


def memory_needed(cfg: SyntheticConfig) -> int:
    """Peak bytes `synthesize` holds, sized by --size: an image being drawn in each worker and here, a
    segment's JPEGs, val.bin's JPEGs (written at once), and the contact sheet with PNG's copy of it."""
    pixels = cfg.size ** 2
    jpegs = SEGMENT_TASKS * TASK_IMAGES + 2 * cfg.val_pairs
    sheet = 2 * CONTACT_SHEET[0] * CONTACT_SHEET[1] * 3 * pixels
    return int(pixels * (RENDER_BYTES_PER_PIXEL * (cfg.workers + 1) + JPEG_BYTES_PER_PIXEL * jpegs) + sheet)


def _synthesize(out_dir: Path, cfg: SyntheticConfig, args: dict) -> dict:
    identities, images_per_identity, size, seed = cfg.identities, cfg.images_per_identity, cfg.size, cfg.seed
    difficulty, val_identities, val_pairs = cfg.difficulty, cfg.val_identities, cfg.val_pairs
    test_identities, test_images_per_identity = cfg.test_identities, cfg.test_images_per_identity
    long_tail, workers = cfg.long_tail, cfg.workers
    _remove_previous_ijb(out_dir)
    (out_dir / "synthetic.json").unlink(missing_ok=True)  # the folder is incomplete until we finish
    work = temporary_name(out_dir / "synthetic")  # a folder; output_lock removed those of killed runs
    work.mkdir()
    started = time.perf_counter()
    try:
        counts = images_per_identity_counts(seed, identities, images_per_identity, long_tail)
        train_tasks = _split_tasks(seed, size, difficulty, ROLE_TRAIN, counts)
        segments = Segments(out_dir, {"format": FORMAT, "version": VERSION, **args})  # a killed run's are kept
        segments.open()
        n_train = write_face_recordio(work, segment_images(train_tasks, render_task, workers, segments),
                                      prefix="train", num_classes=identities, image_size=(size, size))

        plan = plan_val_pairs(seed, val_identities, val_pairs)
        val_items = [(int(row[1 + side]), (_VAL_IMAGE_ROLE, k, side)) for k, row in enumerate(plan)
                     for side in (0, 1)]
        val_tasks = [RenderTask(seed, size, difficulty, ROLE_VAL, c) for c in chunks(val_items, TASK_IMAGES)]
        val_images = [image for image, _ in _labelled_images(val_tasks, workers, "val")]
        write_verification_bin(work / "val.bin", val_images, plan[:, 3].astype(bool))
        with open(work / "val_pairs.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["pair", "fold", "first_identity", "second_identity", "issame"])
            writer.writerows([k, *row] for k, row in enumerate(plan.tolist()))

        held_out = {"test": _write_identity_set(work, "test", ROLE_TEST, test_identities, test_images_per_identity,
                                                cfg)}
        if cfg.monitor_identities:
            held_out["monitor"] = _write_identity_set(work, "monitor", ROLE_MONITOR, cfg.monitor_identities,
                                                      cfg.monitor_images_per_identity, cfg)
        ijb = {}
        if cfg.ijb_identities:
            ijb = write_ijb_set(work / "ijb", seed, size, difficulty, cfg.ijb_identities, cfg.ijb_templates, workers)
        summary = {
            "format": FORMAT,
            "version": VERSION,
            "args": args,
            "train": {"identities": identities, "images": n_train, "min_images": int(counts.min()),
                      "max_images": int(counts.max())},
            "val": {"identities": val_identities, "pairs": val_pairs, "folds": VAL_FOLDS,
                    "positive_pairs": int(plan[:, 3].sum())},
            **held_out,
            **({"ijb": ijb} if ijb else {}),
            "files": {},
        }
        sheet = contact_sheet(CONTACT_SHEET[0], CONTACT_SHEET[1], size=size, seed=seed, difficulty=difficulty)
        Image.fromarray(sheet).save(work / "contact_sheet.png", format="PNG")
        for name in FILES + (("monitor.rec", "monitor.idx") if cfg.monitor_identities else ()):
            summary["files"][name] = _sha256(work / name)
            os.replace(work / name, out_dir / name)
        if ijb:
            summary["files"].update(_ijb_digests(work))
            if os.path.lexists(out_dir / "ijb"):  # appeared while this run worked: not ours to replace
                raise PipelineError(f"{out_dir / 'ijb'}: created by something else during this run; move it away "
                                    "and rerun")
            os.replace(work / "ijb", out_dir / "ijb")
        temporary = work / "synthetic.json"
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temporary, out_dir / "synthetic.json")
        segments.remove()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    total = n_train + 2 * val_pairs + sum(split["images"] for split in held_out.values()) + ijb.get("images", 0)
    return {**summary, "seconds": round(seconds, 3), "images_per_second": round(total / seconds, 1)}
