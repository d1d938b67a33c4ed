"""The insightface IJB-B / IJB-C folder layout (what arcface_torch's eval_ijbc.py reads), read with one-line
errors naming the file and line, and written for the embedded synthetic set.

    DIR/meta/<t>_face_tid_mid.txt         image_name template_id media_id         one line per face image
    DIR/meta/<t>_name_5pts_score.txt      image_name x1 y1 ... x5 y5 faceness     the same images, same order
    DIR/meta/<t>_template_pair_label.txt  template_1 template_2 label              1 genuine, 0 impostor
    DIR/loose_crop/<image_name>           the loose face crops (JPEG)

`<t>` is the target in lower case (`ijbc`, `ijbb`). Landmarks are pixel coordinates in the loose crop (pixel
centres at integers, as OpenCV has them), in the order: left eye, right eye, nose tip, left mouth corner,
right mouth corner, left and right as seen in the image. Blank lines are skipped; line numbers in errors are
those of the file.

Values are checked where they are read: ids are decimal integers 0 <= id < 2**63 (int64), labels 0 or 1,
landmarks and faceness finite with |value| <= 1e6 (no crop is a million pixels wide; larger values overflow
float32 features), image names unique (features are keyed by name).

The pair file of the real IJB-C has 15.7M lines: it is parsed by numpy's C reader, and only when that fails
(or the file has blank lines) line by line, to name the offending line.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.storage.io import write_text_atomic
from pipeline.settings import Choice

LANDMARKS = 5
LANDMARK_ORDER = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")
ID_LIMIT = 2**63  # ids are held as int64
VALUE_LIMIT = 1e6  # |landmark| and faceness: far beyond any crop or score, well inside float32
_DECIMAL = re.compile(r"[+-]?[0-9]+", re.ASCII)  # int() would also take "4_0" and non-ASCII digits


class IjbTarget(Choice):
    """The IJB releases insightface evaluates (their meta files start with the lower-case name)."""

    IJBC = "IJBC"
    IJBB = "IJBB"


def ijb_target(text: str) -> str:
    """The target named case-insensitively ("ijbc" -> "IJBC"); PipelineError for anything else."""
    upper = str(text).upper()
    if upper not in IjbTarget.values():
        raise PipelineError(f"--target {text!r}: choose one of {', '.join(IjbTarget.values())} (any case)")
    return upper


@dataclass(frozen=True)
class IjbPaths:
    """Where the files of one target live inside an IJB folder."""

    folder: Path
    target: str

    @property
    def prefix(self) -> str:
        return self.target.lower()

    @property
    def template_media(self) -> Path:
        return self.folder / "meta" / f"{self.prefix}_face_tid_mid.txt"

    @property
    def landmarks(self) -> Path:
        return self.folder / "meta" / f"{self.prefix}_name_5pts_score.txt"

    @property
    def pairs(self) -> Path:
        return self.folder / "meta" / f"{self.prefix}_template_pair_label.txt"

    @property
    def crops(self) -> Path:
        return self.folder / "loose_crop"


@dataclass
class IjbMeta:
    """The meta files of one IJB target, row i of the image arrays being line i of both image files."""

    names: list[str]
    templates: np.ndarray  # int64 (N,)
    medias: np.ndarray  # int64 (N,)
    landmarks: np.ndarray  # float32 (N, 5, 2)
    faceness: np.ndarray  # float32 (N,)
    pairs: np.ndarray  # int64 (P, 2) template ids
    labels: np.ndarray  # int8 (P,) 1 genuine, 0 impostor
    image_lines: np.ndarray | None = None  # line of image row i in the landmarks file (None: i + 1)

    def line_of_image(self, row: int) -> int:
        return int(self.image_lines[row]) if self.image_lines is not None else row + 1


def _records(path: Path, what: str):
    """(line number, fields) of every non-blank line; DataError when the file is missing or not text."""
    if not path.is_file():
        raise DataError(f"{path}: missing ({what}; the insightface IJB layout has meta/ and loose_crop/)")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise DataError(f"{path} line {number}: not UTF-8 text") from None
            if fields:
                yield number, fields


def _integer(text: str, path: Path, number: int, what: str, limit: int = ID_LIMIT) -> int:
    """A decimal integer 0 <= value < limit."""
    if not _DECIMAL.fullmatch(text):
        raise DataError(f"{path} line {number}: {what} {text!r} is not an integer")
    value = int(text)
    if not 0 <= value < limit:
        raise DataError(f"{path} line {number}: {what} {text} is out of range (0 to {limit - 1})")
    return value


def _label(text: str, path: Path, number: int) -> int:
    value = int(text) if _DECIMAL.fullmatch(text) else None
    if value not in (0, 1):
        raise DataError(f"{path} line {number}: label {text} is not 0 or 1")
    return value


def _check_name(name: str, path: Path, number: int) -> str:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
        raise DataError(f"{path} line {number}: image name {name!r} must be a relative path inside loose_crop/")
    return name


def _read_template_media(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    names, templates, medias, lines = [], [], [], []
    for number, fields in _records(path, "image -> template, media"):
        if len(fields) != 3:
            raise DataError(f"{path} line {number}: expected 'image_name template_id media_id', got "
                            f"{len(fields)} fields")
        names.append(_check_name(fields[0], path, number))
        templates.append(_integer(fields[1], path, number, "template id"))
        medias.append(_integer(fields[2], path, number, "media id"))
        lines.append(number)
    return names, np.array(templates, np.int64), np.array(medias, np.int64), lines


def _read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    names, values, lines = [], [], []
    expected = 2 * LANDMARKS + 2
    for number, fields in _records(path, "image -> 5 landmarks, faceness score"):
        if len(fields) != expected:
            raise DataError(f"{path} line {number}: expected an image name, {2 * LANDMARKS} landmark coordinates "
                            f"and a faceness score ({expected} fields), got {len(fields)} fields")
        row = []
        for column, text in enumerate(fields[1:], 1):
            what = "faceness score" if column == expected - 1 else f"landmark coordinate {column}"
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{path} line {number}: {what} {text!r} is not a finite number")
            if abs(value) > VALUE_LIMIT:
                raise DataError(f"{path} line {number}: {what} {text} is out of range (|value| <= {VALUE_LIMIT:g})")
            row.append(value)
        if row[-1] < 0:
            raise DataError(f"{path} line {number}: faceness score {fields[-1]} is negative")
        names.append(_check_name(fields[0], path, number))
        values.append(row)
        lines.append(number)
    table = np.array(values, np.float64).reshape(-1, expected - 1)
    return names, table[:, :-1].reshape(-1, LANDMARKS, 2).astype(np.float32), table[:, -1].astype(np.float32), lines


def _pairs_line_by_line(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows, lines = [], []
    for number, fields in _records(path, "template pairs"):
        if len(fields) != 3:
            raise DataError(f"{path} line {number}: expected 'template_1 template_2 label', got {len(fields)} fields")
        rows.append([_integer(fields[0], path, number, "template id"), _integer(fields[1], path, number,
                     "template id"), _label(fields[2], path, number)])
        lines.append(number)
    return np.array(rows, np.int64).reshape(-1, 3), np.array(lines, np.int64)


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(P, 3) int64 rows and their line numbers (None: row i is line i + 1, the usual case)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (template pairs; the insightface IJB layout has meta/ and loose_crop/)")
    size = path.stat().st_size
    if size == 0:
        return np.zeros((0, 3), np.int64), None
    with open(path, "rb") as handle:
        newlines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))
        handle.seek(size - 1)
        newlines += handle.read(1) != b"\n"  # a last line without its newline
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns about a file of blank lines
            rows = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None, encoding="utf-8")
    except (ValueError, OverflowError, UnicodeDecodeError):
        rows = None
    # the C reader takes negative ids and any label: values out of range are named by the line-by-line reader
    if (rows is not None and rows.shape == (newlines, 3) and rows[:, :2].min() >= 0
            and np.isin(rows[:, 2], (0, 1)).all()):
        return rows, None
    return _pairs_line_by_line(path)


def _check_same_images(paths: IjbPaths, names: list[str], lines: list[int], point_names: list[str],
                       point_lines: list[int]) -> None:
    """Both image files list the same images, each once, in the same order."""
    for file, listed in ((paths.template_media, names), (paths.landmarks, point_names)):
        if not listed:
            raise DataError(f"{file}: no images listed")
    first_line: dict[str, int] = {}
    for name, line in zip(names, lines):
        if first_line.setdefault(name, line) != line:
            raise DataError(f"{paths.template_media} line {line}: image {name!r} is listed again (first on line "
                            f"{first_line[name]}); each image is one line")
    for i, (name, other) in enumerate(zip(names, point_names)):
        if name != other:
            raise DataError(f"{paths.landmarks} line {point_lines[i]}: image {other!r}, but {paths.template_media} "
                            f"line {lines[i]} names {name!r} (both files list the same images in the same order)")
    if len(point_names) != len(names):  # name the first line the shorter file lacks
        (longer, longer_names, longer_lines), shorter = (
            ((paths.landmarks, point_names, point_lines), paths.template_media) if len(point_names) > len(names)
            else ((paths.template_media, names, lines), paths.landmarks))
        common = min(len(names), len(point_names))
        raise DataError(f"{longer} line {longer_lines[common]}: image {longer_names[common]!r} is not in {shorter}, "
                        f"which ends after {common} images (both list the same images)")


def read_ijb(folder: str | os.PathLike, target: str) -> IjbMeta:
    """The three meta files of `target` in `folder`, checked: the image files list the same images in the same
    order, landmarks are 10 finite numbers, every pair names known templates with a 0/1 label. The crops
    themselves are not opened here."""
    paths = IjbPaths(Path(folder), ijb_target(target))
    names, templates, medias, lines = _read_template_media(paths.template_media)
    point_names, landmarks, faceness, point_lines = _read_landmarks(paths.landmarks)
    _check_same_images(paths, names, lines, point_names, point_lines)
    rows, pair_lines = _read_pairs(paths.pairs)
    if rows.shape[0] == 0:
        raise DataError(f"{paths.pairs}: no template pairs listed")

    def pair_line(row: int) -> int:
        return int(pair_lines[row]) if pair_lines is not None else row + 1

    known = np.unique(templates)
    unknown = ~np.isin(rows[:, :2], known)
    if unknown.any():
        row, column = np.argwhere(unknown)[0]
        raise DataError(f"{paths.pairs} line {pair_line(row)}: template {rows[row, column]} is not in "
                        f"{paths.template_media}")
    same_lines = lines == point_lines and lines == list(range(1, len(lines) + 1))
    return IjbMeta(names, templates, medias, landmarks, faceness, np.ascontiguousarray(rows[:, :2]),
                   rows[:, 2].astype(np.int8), None if same_lines else np.array(point_lines, np.int64))


def write_ijb_meta(folder: str | os.PathLike, target: str, meta: IjbMeta, decimals: int = 3) -> list[Path]:
    """The three meta files of `meta` in `folder`/meta (crops are the caller's); returns their paths."""
    paths = IjbPaths(Path(folder), ijb_target(target))
    paths.template_media.parent.mkdir(parents=True, exist_ok=True)
    image_rows = zip(meta.names, meta.templates.tolist(), meta.medias.tolist())
    point_rows = zip(meta.names, meta.landmarks.reshape(-1, 2 * LANDMARKS).tolist(), meta.faceness.tolist())
    write_text_atomic(paths.template_media, "".join(f"{n} {t} {m}\n" for n, t, m in image_rows))
    write_text_atomic(paths.landmarks, "".join(
        f"{n} {' '.join(f'{v:.{decimals}f}' for v in points)} {score:.{decimals}f}\n" for n, points, score in point_rows))
    write_text_atomic(paths.pairs, "".join(f"{a} {b} {label}\n" for (a, b), label in
                                           zip(meta.pairs.tolist(), meta.labels.tolist())))
    return [paths.template_media, paths.landmarks, paths.pairs]
