"""Every kind of bad RecordIO input raises DataError with a message naming the file and the record key."""
from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from helpers.data import random_image_bytes
from PIL import Image

from pipeline.errors import DataError
from pipeline.formats.recordio import FaceRecordIO, write_face_recordio


def jpeg(seed: int) -> bytes:
    return random_image_bytes(seed, (8, 8))


def offsets(folder) -> dict[int, int]:
    lines = (folder / "train.idx").read_text().splitlines()
    return {int(key): int(offset) for key, offset in (line.split("\t") for line in lines)}


def patch(path, position: int, data: bytes) -> None:
    blob = bytearray(path.read_bytes())
    blob[position : position + len(data)] = data
    path.write_bytes(bytes(blob))


def write_idx(folder, entries: dict[int, int]) -> None:
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries.items()))


@pytest.fixture
def header_set(tmp_path):
    """insightface layout: 4 identities x 3 images (keys 1..12)."""
    write_face_recordio(tmp_path, [(jpeg(i), i // 3) for i in range(12)])
    return tmp_path


@pytest.fixture
def plain_set(tmp_path):
    """Header-less: keys 0..7, labels 0..3."""
    write_face_recordio(tmp_path, [(jpeg(i), i % 4) for i in range(8)], with_header=False)
    return tmp_path


def names(error, *parts) -> bool:
    message = str(error.value)
    return "\n" not in message and all(re.search(part, message) for part in parts)


def test_wrong_magic_on_read(header_set):
    patch(header_set / "train.rec", offsets(header_set)[5], b"\0\0\0\0")
    faces = FaceRecordIO(header_set)  # key 5 is not needed to find the labels
    with pytest.raises(DataError) as error:
        faces.read(4)
    assert names(error, r"train\.rec key 5\b", "magic")


def test_wrong_magic_found_by_header_scan(plain_set):
    patch(plain_set / "train.rec", offsets(plain_set)[3], b"\x12\x34\x56\x78")
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.rec key 3\b", "magic")


def test_truncated_last_record(plain_set):
    rec = plain_set / "train.rec"
    rec.write_bytes(rec.read_bytes()[: offsets(plain_set)[7] + 40])
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.rec key 7\b", "truncated")


def test_truncated_record_on_read(header_set):
    entries = offsets(header_set)
    rec = header_set / "train.rec"
    size = rec.stat().st_size
    entries[8] = size - 16  # a frame header that announces more bytes than the file has left
    write_idx(header_set, entries)
    patch(rec, size - 16, struct.pack("<II", 0xCED7230A, 400))
    faces = FaceRecordIO(header_set)
    with pytest.raises(DataError) as error:
        faces.read(7)
    assert names(error, r"train\.rec key 8\b", "truncated")


def test_idx_offset_past_end_of_rec(plain_set):
    entries = offsets(plain_set)
    entries[6] = (plain_set / "train.rec").stat().st_size + 100
    write_idx(plain_set, entries)
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.idx: key 6\b", "past the end", r"train\.rec")


def test_idx_offset_inside_a_record(plain_set):
    entries = offsets(plain_set)
    entries[2] += 8  # points into the payload, not at a record start
    write_idx(plain_set, entries)
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.rec key 2\b")


def test_idx_keys_swapped_in_headerless_set(plain_set):
    entries = offsets(plain_set)
    entries[1], entries[5] = entries[5], entries[1]  # same labels (1), different ids
    write_idx(plain_set, entries)
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.rec key 1\b", "id 5", "mismatch")


def test_idx_keys_swapped_across_identities_on_read(header_set):
    entries = offsets(header_set)
    entries[4], entries[8] = entries[8], entries[4]
    write_idx(header_set, entries)
    faces = FaceRecordIO(header_set)
    with pytest.raises(DataError) as error:
        faces.read(3)
    assert names(error, r"train\.rec key 4\b", "mismatch")


def test_non_jpeg_payload_when_decoding(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    write_face_recordio(tmp_path, [(jpeg(0), 0), (png.getvalue(), 0)], image_size=(8, 8))
    faces = FaceRecordIO(tmp_path)
    assert faces.decode(0).shape == (8, 8, 3)
    with pytest.raises(DataError) as error:
        faces.decode(1)
    assert names(error, r"train\.rec key 2\b", "not a JPEG")


def test_missing_property_for_train_set(header_set):
    (header_set / "property").unlink()
    with pytest.raises(DataError) as error:
        FaceRecordIO(header_set)
    assert names(error, "property", "missing")
    assert FaceRecordIO(header_set, require_property=False).num_classes == 4


def test_property_is_optional_for_other_prefixes(tmp_path):
    write_face_recordio(tmp_path, [(jpeg(i), i) for i in range(3)], prefix="test", with_header=False)
    assert not (tmp_path / "property").exists()
    faces = FaceRecordIO(tmp_path / "test")
    assert faces.num_classes == 3 and faces.image_size is None


def test_label_out_of_range_of_property(header_set):
    (header_set / "property").write_text("3,8,8\n")
    with pytest.raises(DataError) as error:
        FaceRecordIO(header_set)
    assert names(error, r"train\.rec key 10\b", "label 3", "3 classes", "property")


def test_malformed_property(header_set):
    (header_set / "property").write_text("85742;112;112\n")
    with pytest.raises(DataError) as error:
        FaceRecordIO(header_set)
    assert names(error, "property", "num_classes,H,W")


def test_malformed_idx_line(plain_set):
    with open(plain_set / "train.idx", "a") as handle:
        handle.write("8 oops\n")
    with pytest.raises(DataError) as error:
        FaceRecordIO(plain_set)
    assert names(error, r"train\.idx: line 9\b")


def test_header_key_missing_from_idx(header_set):
    entries = offsets(header_set)
    del entries[7]
    write_idx(header_set, entries)
    with pytest.raises(DataError) as error:
        FaceRecordIO(header_set)
    assert names(error, r"train\.idx: key 7\b", "missing")


def test_broken_identity_record(header_set):
    entries = offsets(header_set)
    # identity record key 14 (identity 1) claims keys [5, 7) instead of [4, 7)
    patch(header_set / "train.rec", entries[14] + 8 + 24, struct.pack("<f", 5.0))
    with pytest.raises(DataError) as error:
        FaceRecordIO(header_set)
    assert names(error, r"train\.rec key 14\b", "identity record")
