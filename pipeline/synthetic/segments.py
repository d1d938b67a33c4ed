"""The training images of `synthesize`, rendered in segments that survive a kill.

Rendering train.rec is the one long part of `synthesize` (100k images of 112 px: minutes). Its images are
rendered task by task and kept, every SEGMENT_IMAGES images, as a finished segment file in
``OUT/train.segments/`` (written under a temporary name and renamed). A rerun with the same arguments reads the
finished segments back instead of rendering them again, so a killed run loses at most one segment's work; the
images are a function of (seed, role, identity, image) only, so the resumed train.rec is byte-identical to an
uninterrupted one. The folder records the arguments it belongs to (``segments.json``): other arguments start
it over. It is removed once synthetic.json is written.

A segment is ``segment-NNNNN.npz`` (numpy, no pickle): ``data`` (the JPEG bytes, concatenated), ``offsets``
(n + 1 positions in ``data``) and ``labels`` (n identities). A segment is used only if its labels are the ones
its images must have and its bytes pass zip's CRC check when read back; any other (damaged) segment, and every
one after it, is rendered again (with a one-line note).
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.errors import note
from pipeline.progress import progress_bar
from pipeline.storage.io import TEMPORARY_MARK, atomic_path, refuse_symlink, write_text_atomic
from pipeline.synthetic.streams import chunks, ordered_map

SEGMENT_TASKS = 64  # render tasks per segment: 4,096 images of 64-image tasks
FOLDER = "train.segments"
MANIFEST = "segments.json"
# a segment, the manifest, or either's temporary (a killed writer's)
OURS = re.compile(rf"^(segment-\d{{5}}\.npz|{re.escape(MANIFEST)})({re.escape(TEMPORARY_MARK)}.*)?$")


class Segments:
    """``out_dir/train.segments`` for one set of synthesize arguments (`identity`)."""

    def __init__(self, out_dir: Path, identity: dict):
        self.folder = Path(out_dir) / FOLDER
        self.identity = identity

    def path(self, index: int) -> Path:
        return self.folder / f"segment-{index:05d}.npz"

    def open(self) -> None:
        """Keep the folder if it belongs to these arguments; start it over otherwise."""
        refuse_symlink(self.folder, "the segments folder")
        if self.folder.is_dir():
            try:
                recorded = json.loads((self.folder / MANIFEST).read_text())
            except (OSError, ValueError):
                recorded = None
            if recorded == self.identity:
                return
            self.remove()
        self.folder.mkdir(parents=True)
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")

    def remove(self) -> None:
        """Delete the folder: only the files synthesize writes there; anything else is refused, untouched."""
        if not self.folder.is_dir():
            return
        refuse_symlink(self.folder, "the segments folder")
        ours = [p for p in self.folder.iterdir() if OURS.match(p.name) and not p.is_symlink() and p.is_file()]
        others = sorted(p.name for p in self.folder.iterdir() if p not in ours)
        if others:
            raise PipelineError(f"{self.folder}: holds files synthesize did not write ({', '.join(others[:3])}); "
                                "move them away and rerun")
        for path in ours:
            path.unlink()
        self.folder.rmdir()

    def finished(self, index: int, labels: Sequence[int]) -> bool:
        """Whether segment `index` is finished and holds `labels` (its images are not read)."""
        return self._load(index, labels, images=False) is not None

    def read(self, index: int, labels: Sequence[int]) -> list[bytes] | None:
        """Segment `index`'s images if it is finished and holds `labels`; None otherwise."""
        return self._load(index, labels, images=True)

    def _load(self, index: int, labels: Sequence[int], images: bool) -> list[bytes] | None:
        path = self.path(index)
        if path.is_symlink() or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:  # members are read only when asked for
                offsets, stored_labels = stored["offsets"], stored["labels"]
                if (offsets.shape != (len(labels) + 1,) or not np.array_equal(stored_labels, labels)
                        or offsets[0] != 0 or np.any(np.diff(offsets) <= 0)):
                    return None
                data = stored["data"] if images else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None
        if data is None:
            return []
        if data.dtype != np.uint8 or offsets[-1] != data.size:
            return None
        raw = data.tobytes()
        return [raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    def write(self, index: int, images: list[bytes], labels: Sequence[int]) -> None:
        offsets = np.concatenate([[0], np.cumsum([len(image) for image in images])]).astype(np.int64)
        data = np.frombuffer(b"".join(images), dtype=np.uint8)
        with atomic_path(self.path(index)) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, data=data, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))


def segment_images(tasks: Sequence, render: Callable, workers: int, segments: Segments,
                   desc: str = "train") -> Iterator[tuple[bytes, int]]:
    """(jpeg, identity) of every task's images in order: finished segments read back, the rest rendered (a
    progress bar over all of them) and kept as segments. `tasks` have `.items` = ((identity, key), ...)."""
    groups = list(chunks(tasks, SEGMENT_TASKS))
    labels = [[index for task in group for index, _ in task.items] for group in groups]
    finished = 0  # the finished prefix, checked without holding its images
    while finished < len(groups) and segments.finished(finished, labels[finished]):
        finished += 1
    if finished < len(groups) and segments.path(finished).is_file():
        note(f"{segments.path(finished)}: damaged or unfinished, discarded; its images are rendered again")
    with progress_bar(total=sum(map(len, labels)), initial=sum(map(len, labels[:finished])), desc=desc,
                      unit="img") as bar:
        for k in range(finished):  # read back one segment at a time (its bytes checked: zip's CRC)
            images = segments.read(k, labels[k])
            if images is None:  # damaged: rendered again, with every one after it
                note(f"{segments.path(k)}: damaged or unfinished, discarded; its images are rendered again")
                finished = k
                break
            yield from zip(images, labels[k])
        remaining = [task for group in groups[finished:] for task in group]
        rendered = ordered_map(render, remaining, workers)
        for k in range(finished, len(groups)):
            images: list[bytes] = []
            for _ in groups[k]:
                task_images = next(rendered)
                images.extend(task_images)
                bar.update(len(task_images))
            segments.write(k, images, labels[k])
            yield from zip(images, labels[k])
