"""insightface face datasets in MXNet RecordIO (`train.rec`, `train.idx`, `property`), without MXNet.

Two layouts are read:
- insightface header (MS1MV2, MS1MV3, Glint360K as shipped): key 0 holds no image and the label array
  [a, b]; image keys are 1..a-1, and keys a..b-1 are identity records whose labels [start, end) are the
  image keys of identity 0, 1, ... in turn. Labels then come from those few records, not the images.
- header-less (im2rec, shuffled recs): every key of the `.idx`, in `.idx` order, is an image; labels come
  from one vectorised pass over the record headers, kept in a labels file (see labels_cache.py).
`property` is "num_classes,H,W" (a second line, if any, is ignored).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import DataError
from pipeline.formats import labels_cache
from pipeline.formats.dmlc_recordio import (
    FLOAT32_EXACT,
    ImageRecord,
    encode_record,
    pack_image_record,
    read_idx,
    read_record,
    scan_identities,
    unpack_image_record,
)
from pipeline.formats.jpeg import decode_jpeg
from pipeline.formats.jpeg import image_size as encoded_image_size
from pipeline.storage.io import (
    disk_full_is_one_line,
    fsync_path,
    remove_stale_temporaries,
    temporary_name,
)


def resolve_paths(path: str | os.PathLike) -> tuple[Path, Path, Path, bool]:
    """(rec, idx, property, is_train) for a folder (its `train.*`), a prefix `dir/test`, or a `.rec`/`.idx`."""
    path = Path(path)
    if path.is_dir():
        prefix = path / "train"
    elif path.suffix in (".rec", ".idx"):
        prefix = path.with_suffix("")
    else:
        prefix = path
    rec, idx = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    for required in (rec, idx):
        if not required.is_file():
            raise DataError(f"{required}: missing (a RecordIO set needs both .rec and .idx)")
    return rec, idx, prefix.parent / "property", prefix.name == "train"


MAX_CLASSES = 2**31 - 1  # more identities than any face set has; beyond it counts overflow int64 arithmetic
MAX_SIDE = 65535  # the largest JPEG side


def read_property(path: Path) -> tuple[int, tuple[int, int]]:
    """Parse `property` ("num_classes,H,W") into (num_classes, (H, W)); DataError when malformed or absurd."""
    text = path.read_text(errors="replace").strip()
    first = text.splitlines()[0] if text else ""
    try:
        classes, height, width = (int(field) for field in first.split(","))
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,H,W', got {first[:60]!r}") from None
    if min(classes, height, width) <= 0:
        raise DataError(f"{path}: expected positive 'num_classes,H,W', got {first!r}")
    if classes > MAX_CLASSES or max(height, width) > MAX_SIDE:
        raise DataError(f"{path}: 'num_classes,H,W' = {first[:60]!r} is out of range (at most {MAX_CLASSES} classes "
                        f"and {MAX_SIDE} pixels a side)")
    return classes, (height, width)


class FaceRecordIO:
    """Random access to an insightface RecordIO face set: `read(i) -> (jpeg_bytes, label)`, `decode(i)`.

    The `.rec` is opened lazily once per process (re-opened after a fork), so the object can be handed to
    DataLoader workers. Every read checks the record against the index (its label, and its id where the
    file stores keys as ids) and raises DataError naming the file and key on any disagreement.
    """

    def __init__(self, path: str | os.PathLike, require_property: bool = True):
        self.rec_path, self.idx_path, property_path, is_train = resolve_paths(path)
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._ids_match_keys = False  # decided below from a sample; until then ids are not checked
        self._rec_size = self.rec_path.stat().st_size
        property_bytes = b""
        self.image_size: tuple[int, int] | None = None
        property_classes: int | None = None
        if is_train and property_path.is_file():  # `property` describes train.rec only, never test.rec
            property_bytes = property_path.read_bytes()
            property_classes, self.image_size = read_property(property_path)
        elif is_train and require_property:
            raise DataError(f"{property_path}: missing (the train set needs 'num_classes,H,W')")

        all_keys, all_offsets, idx_bytes = read_idx(self.idx_path)
        self._check_offsets(all_keys, all_offsets)
        order = np.argsort(all_keys)
        self._sorted_keys, self._sorted_offsets = all_keys[order], all_offsets[order]  # key lookups, init only
        idx_hash = hashlib.sha256(idx_bytes)
        self._idx_sha256 = idx_hash.hexdigest()
        idx_hash.update(property_bytes)
        self._fingerprint = idx_hash.hexdigest()

        self.labels_file: Path | None = None
        header = self._header_range()
        self.has_header = header is not None
        self.header_range = header
        if header is None:
            self.keys, self._offsets = all_keys, all_offsets
        else:
            self.keys = np.arange(1, header[0], dtype=np.int64)
            self._offsets = self._offsets_of(self.keys)
        self._ids_match_keys = all(self._peek(row).id == self.keys[row] for row in self._sample_rows())
        self.labels, self.label_source = self._find_labels()
        self.num_classes = property_classes if property_classes is not None else int(self.labels.max()) + 1
        self._check_label_range(property_path if property_classes is not None else None)
        del self._sorted_keys, self._sorted_offsets  # 2 x 8 bytes per record that reads never need

    # ----------------------------------------------------------------------------------------- public API
    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> tuple[bytes, int]:
        """The encoded image and label of image `i` (in dataset order)."""
        key = int(self.keys[i])
        where = f"{self.rec_path} key {key}"
        record = self._read_key(key, int(self._offsets[i]))
        if record.identity != self.labels[i]:
            raise DataError(
                f"{where}: record carries label {record.identity:g} but {self.label_source} give "
                f"{int(self.labels[i])} (.idx/.rec mismatch)"
            )
        return record.image, int(self.labels[i])

    def decode(self, i: int) -> np.ndarray:
        """Image `i` decoded to uint8 RGB (H, W, 3)."""
        image, _ = self.read(i)
        return decode_jpeg(image, where=self.where(i))

    def where(self, i: int) -> str:
        """Image `i` as error messages name it: the .rec file and the record key."""
        return f"{self.rec_path} key {int(self.keys[i])}"

    def fingerprint(self) -> str:
        """sha256 hex over the .idx bytes then the property bytes."""
        return self._fingerprint

    def close(self) -> None:
        """Close this process's handle on the .rec (it re-opens on the next read)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = self._fd_pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_fd_pid"] = None  # a file descriptor means nothing in another process
        return state

    def __repr__(self) -> str:
        layout = "insightface header" if self.has_header else "header-less"
        return f"FaceRecordIO({self.rec_path}, {len(self)} images, {self.num_classes} classes, {layout})"

    # ------------------------------------------------------------------------------------------ reading
    def _handle(self) -> int:
        if self._fd_pid != os.getpid():
            if self._fd is not None:  # inherited across a fork: drop our copy, never share the parent's
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def _read_key(self, key: int, offset: int) -> ImageRecord:
        where = f"{self.rec_path} key {key}"
        record = unpack_image_record(read_record(self._handle(), offset, self._rec_size, where), where)
        if self._ids_match_keys and record.id != key:
            raise DataError(f"{where}: record carries id {record.id} (.idx/.rec mismatch)")
        return record

    def _peek(self, row: int) -> ImageRecord:
        return self._read_key(int(self.keys[row]), int(self._offsets[row]))

    def _peek_key(self, key: int) -> ImageRecord:
        return self._read_key(key, int(self._offsets_of(np.array([key]))[0]))

    def _has_key(self, key: int) -> bool:
        position = np.searchsorted(self._sorted_keys, key)
        return bool(position < len(self._sorted_keys) and self._sorted_keys[position] == key)

    def _offsets_of(self, keys: np.ndarray) -> np.ndarray:
        positions = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        missing = self._sorted_keys[positions] != keys
        if missing.any():
            raise DataError(f"{self.idx_path}: key {int(keys[missing][0])} is missing from the index")
        return self._sorted_offsets[positions]

    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        past = offsets + 8 > self._rec_size
        if past.any():
            row = int(np.flatnonzero(past)[0])
            raise DataError(
                f"{self.idx_path}: key {int(keys[row])} points at byte {int(offsets[row])}, past the end of "
                f"{self.rec_path} ({self._rec_size} bytes)"
            )

    def _sample_rows(self) -> list[int]:
        return sorted({0, len(self.keys) // 2, len(self.keys) - 1})

    # ----------------------------------------------------------------------------------- layout, labels
    def _header_range(self) -> tuple[int, int] | None:
        """(a, b) of the insightface header record, or None for a header-less set."""
        if not self._has_key(0):
            return None
        record = self._peek_key(0)
        if record.flag == 0 or record.image:
            return None  # key 0 is an image (shuffled/im2rec sets start their keys at 0)
        where = f"{self.rec_path} key 0"
        values = record.label[:2]
        if record.flag < 2 or not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise DataError(f"{where}: header record label {record.label.tolist()} is not [a, b]")
        a, b = (self._exact_float_key(int(v), bound) for v, bound in zip(values, ("images", "identities")))
        if not 1 < a <= b:
            raise DataError(f"{where}: header record [a, b] = [{a}, {b}] leaves no image keys 1..a-1")
        return a, b

    def _exact_float_key(self, approx: int, kind: str) -> int:
        """A key stored as float32 may be rounded above 2**24: find the true end of the image/identity run."""
        if approx <= FLOAT32_EXACT:
            return approx
        step = max(1, int(np.spacing(np.float32(approx))))
        for key in range(approx - step, approx + step + 1):
            if kind == "images" and self._has_key(key) and not self._peek_key(key).image:
                if self._has_key(key - 1) and self._peek_key(key - 1).image:
                    return key
            if kind == "identities" and not self._has_key(key) and self._has_key(key - 1):
                return key
        raise DataError(f"{self.rec_path} key 0: cannot locate the end of the {kind} near key {approx}")

    def _find_labels(self) -> tuple[np.ndarray, str]:
        if self.has_header:
            labels = self._labels_from_identity_records()
            if labels is not None:
                return labels, "identity records"
        labels, self.labels_file = labels_cache.cached_labels(
            self.idx_path, self.rec_path, self._idx_sha256, self.keys, self._scan_labels
        )
        return labels, "record headers"

    def _labels_from_identity_records(self) -> np.ndarray | None:
        """Labels by identity position from the identity records, or None when they cannot be trusted."""
        a, b = self.header_range
        if b == a or b > FLOAT32_EXACT:
            return None  # no identity records, or float32 ranges that may be rounded
        identity_keys = np.arange(a, b, dtype=np.int64)
        ranges, _ = scan_identities(self.rec_path, identity_keys, self._offsets_of(identity_keys), 2)
        starts, ends = ranges[:, 0], ranges[:, 1]
        expected_start = np.concatenate([[1.0], ends[:-1]])
        broken = ~np.isfinite(ranges).all(axis=1) | (starts != expected_start) | (ends < starts)
        if broken.any() or ends[-1] != a:
            row = int(np.flatnonzero(broken)[0]) if broken.any() else len(ends) - 1
            raise DataError(
                f"{self.rec_path} key {a + row}: identity record range {ranges[row].tolist()} does not continue "
                f"the image keys 1..{a - 1} in order"
            )
        labels = np.repeat(np.arange(b - a, dtype=np.int64), (ends - starts).astype(np.int64))
        # Builders that skip label values keep identity order but not identity == position: check first,
        # middle and last non-empty identity against its first image's own header.
        filled = np.flatnonzero(ends > starts)
        for identity in filled[[0, len(filled) // 2, -1]]:
            if self._peek(int(starts[identity]) - 1).identity != identity:
                return None
        return labels

    def _scan_labels(self) -> np.ndarray:
        labels, ids = scan_identities(self.rec_path, self.keys, self._offsets)
        identities = labels[:, 0]
        bad = ~np.isfinite(identities) | (identities < 0) | (identities != np.round(identities))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.rec_path} key {int(self.keys[row])}: label {identities[row]} is not an identity")
        if self._ids_match_keys and np.any(ids != self.keys.astype(np.uint64)):
            row = int(np.flatnonzero(ids != self.keys.astype(np.uint64))[0])
            raise DataError(f"{self.rec_path} key {int(self.keys[row])}: record carries id {int(ids[row])} "
                            "(.idx/.rec mismatch)")
        return identities.astype(np.int64)

    def _check_label_range(self, property_path: Path | None) -> None:
        out = (self.labels < 0) | (self.labels >= self.num_classes)
        if out.any():
            row = int(np.flatnonzero(out)[0])
            raise DataError(
                f"{self.rec_path} key {int(self.keys[row])}: label {int(self.labels[row])} is out of range for "
                f"{self.num_classes} classes in {property_path or 'the labels'}"
            )


def _identity_of(label: int | float | Sequence[float]) -> int:
    value = float(label) if np.ndim(label) == 0 else float(np.asarray(label, dtype=np.float32).ravel()[0])
    if not value >= 0 or value != int(value):
        raise ValueError(f"label {label!r} does not start with a non-negative integer identity")
    return int(value)


def write_face_recordio(
    out_dir: str | os.PathLike,
    items: Iterable[tuple[bytes, int | Sequence[float]]],
    with_header: bool = True,
    prefix: str = "train",
    num_classes: int | None = None,
    image_size: tuple[int, int] | None = None,
    write_property: bool | None = None,
) -> int:
    """Write `<prefix>.rec/.idx` (and `property`) as insightface does; returns the number of images.

    With the header, images take keys 1..n in the order given (labels must not decrease: each identity's
    images are one run), then identity records n+1.. (one per class, empty runs included) and last the
    header record at key 0 — the same record order as insightface's builder. Without it, keys are 0..n-1.
    `image_size` defaults to the first image's (H, W).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_property = prefix == "train" if write_property is None else write_property
    finals = [out_dir / f"{prefix}.rec", out_dir / f"{prefix}.idx", out_dir / "property"]
    for path in finals:
        remove_stale_temporaries(path)
    temporaries = [temporary_name(path) for path in finals]
    counts: dict[int, int] = {}
    with disk_full_is_one_line(finals[0]):
        _write_temporaries(temporaries, finals, items, with_header, num_classes, image_size, write_property, counts)
    return sum(counts.values())


def _write_temporaries(temporaries, finals, items, with_header, num_classes, image_size, write_property, counts):
    """The body of write_face_recordio: the three files under temporary names, renamed when all are written."""
    last_identity = -1
    try:
        with open(temporaries[0], "wb") as rec, open(temporaries[1], "w") as idx:

            def put(key: int, payload: bytes) -> None:
                idx.write(f"{key}\t{rec.tell()}\n")
                rec.write(encode_record(payload))

            key = 1 if with_header else 0
            for image, label in items:
                identity = _identity_of(label)
                if with_header and identity < last_identity:
                    raise ValueError(f"label {identity} after {last_identity}: the header layout needs labels "
                                     "in non-decreasing order")
                if image_size is None and write_property:
                    image_size = encoded_image_size(image, where=f"image with key {key}")
                put(key, pack_image_record(label if np.ndim(label) else float(identity), bytes(image), id=key))
                counts[identity] = counts.get(identity, 0) + 1
                last_identity, key = identity, key + 1
            if not counts:
                raise ValueError("write_face_recordio needs at least one image")
            classes = num_classes if num_classes is not None else max(counts) + 1
            if max(counts) >= classes:
                raise ValueError(f"label {max(counts)} is out of range for num_classes={classes}")
            if with_header:
                first_identity_key = key
                ends = np.cumsum([counts.get(identity, 0) for identity in range(classes)]) + 1
                starts = np.concatenate([[1], ends[:-1]])
                for identity in range(classes):
                    identity_key = first_identity_key + identity
                    put(identity_key, pack_image_record([starts[identity], ends[identity]], b"", id=identity_key))
                put(0, pack_image_record([first_identity_key, first_identity_key + classes], b"", id=0, id2=1))
        if write_property:
            height, width = image_size
            temporaries[2].write_text(f"{classes},{height},{width}\n")
        for temporary, final in zip(temporaries, finals):
            if temporary.exists():
                fsync_path(temporary)
                os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
