"""RecordIO reading and writing against bytes built by hand here (struct.pack), independently of the writer."""
from __future__ import annotations

import os
import struct

import pytest
import torch
from helpers.data import random_image_bytes

import pipeline.formats.recordio as recordio_module
from pipeline.formats.dmlc_recordio import encode_record
from pipeline.formats.recordio import FaceRecordIO, write_face_recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def jpeg(seed: int, comment: bytes = b"") -> bytes:
    """A real 8x8 JPEG; `comment` goes into a COM segment right after SOI (decoders skip it)."""
    data = random_image_bytes(seed, (8, 8), quality=90)
    if comment:
        data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    return data


def ir_payload(label, image: bytes, id_: int) -> bytes:
    """MXNet IRHeader 'IfQQ' + optional float32 label array + image, built by hand."""
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, float(label), id_, 0) + image


def frame(data: bytes, cflag: int) -> bytes:
    """One dmlc part: magic, lrecord = cflag << 29 | length, data, zero padding to 4 bytes."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def split_frames(payload: bytes, cuts: list[int]) -> bytes:
    """Frame `payload` split at the magic words starting at `cuts` (the words themselves are dropped)."""
    parts, start = [], 0
    for cut in cuts:
        assert payload[cut : cut + 4] == MAGIC
        parts.append(payload[start:cut])
        start = cut + 4
    parts.append(payload[start:])
    flags = [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(frame(part, flag) for part, flag in zip(parts, flags))


def write_set(folder, records: list[tuple[int, bytes]], idx_order=None, property_text="4,8,8\n"):
    """Write `records` ((key, framed bytes)) into train.rec in list order, train.idx in `idx_order`."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets, blob = {}, b""
    for key, framed in records:
        offsets[key] = len(blob)
        blob += framed
    (folder / "train.rec").write_bytes(blob)
    order = idx_order if idx_order is not None else [key for key, _ in records]
    (folder / "train.idx").write_text("".join(f"{key}\t{offsets[key]}\n" for key in order))
    if property_text is not None:
        (folder / "property").write_text(property_text)
    return offsets


# A JPEG whose COM segment puts the magic at payload bytes 32, 36 (adjacent: an empty middle part) and
# 44 (all 4-aligned: dmlc splits there) and at 49 (unaligned: dmlc leaves it in the data).
SPLIT_COMMENT = b"\0\0" + MAGIC + MAGIC + b"abcd" + MAGIC + b"x" + MAGIC + b"tail"
SPLIT_CUTS = [32, 36, 44]


BIG_KEY = 0xCED7230A  # as the record id, its low word is the magic: dmlc splits inside the IRHeader


def test_hand_built_headerless_set_with_split_records_and_array_labels(tmp_path):
    images = {0: jpeg(0), 1: jpeg(1), 2: jpeg(2, SPLIT_COMMENT), 7: jpeg(3), BIG_KEY: jpeg(4)}
    split_payload = ir_payload(3.0, images[2], 2)
    assert [split_payload.find(MAGIC, i) for i in (0, 33, 37, 45)] == [32, 36, 44, 49]
    header_split = ir_payload(1.0, images[BIG_KEY], BIG_KEY)
    assert header_split.find(MAGIC) == 8
    records = [
        (0, frame(ir_payload(2.0, images[0], 0), 0)),
        (1, frame(ir_payload([1.0, 0.25, 9.0], images[1], 1), 0)),
        (2, split_frames(split_payload, SPLIT_CUTS)),
        (7, frame(ir_payload([0.0], images[7], 7), 0)),
        (BIG_KEY, split_frames(header_split, [8])),
    ]
    order = [7, BIG_KEY, 0, 2, 1]
    write_set(tmp_path, records, idx_order=order)

    faces = FaceRecordIO(tmp_path)

    assert not faces.has_header
    assert faces.keys.tolist() == order  # .idx order, not key order
    assert faces.labels.tolist() == [0, 1, 2, 3, 1]
    assert faces.num_classes == 4 and faces.image_size == (8, 8)
    for row, key in enumerate(order):
        assert faces.read(row) == (images[key], faces.labels[row])
    assert faces.decode(3).shape == (8, 8, 3)  # the split JPEG reassembles into a decodable image


def test_writer_frames_payloads_exactly_like_dmlc():
    payload = ir_payload(3.0, jpeg(2, SPLIT_COMMENT), 2)
    assert encode_record(payload) == split_frames(payload, SPLIT_CUTS)
    header_split = ir_payload(1.0, jpeg(4), BIG_KEY)
    assert encode_record(header_split) == split_frames(header_split, [8])
    plain = ir_payload(1.0, jpeg(5), 5)
    assert encode_record(plain) == frame(plain, 0)
    ends_with_magic = b"\1" * 8 + MAGIC  # dmlc then writes an empty end part
    assert encode_record(ends_with_magic) == frame(b"\1" * 8, 1) + frame(b"", 3)


def hand_built_header_set(folder, corrupt_key=None, header=(13.0, 17.0), label_values=(0, 1, 2, 3)):
    """insightface layout, records in an order of our own: header, identity records, then images.

    Identities 0..3 own image keys [1,4), [4,7), [7,10), [10,13); identity records are keys 13..16.
    """
    images = {key: jpeg(key) for key in range(1, 13)}
    ranges = [(1, 4), (4, 7), (7, 10), (10, 13)]
    records = [(0, frame(ir_payload(list(header), b"", 0), 0))]
    records += [(13 + j, frame(ir_payload([float(s), float(e)], b"", 13 + j), 0)) for j, (s, e) in enumerate(ranges)]
    for identity, (start, end) in enumerate(ranges):
        for key in range(start, end):
            value = float(label_values[identity])
            label = [value, 0.5] if key % 2 else value
            records.append((key, frame(ir_payload(label, images[key], key), 0)))
    if corrupt_key is not None:  # a record whose header is garbage: a header scan would fail on it
        records = [(k, frame(b"\xff" * 12, 0) if k == corrupt_key else r) for k, r in records]
    write_set(folder, records, idx_order=sorted(k for k, _ in records))
    return images


def test_header_layout_labels_come_from_identity_records_only(tmp_path):
    images = hand_built_header_set(tmp_path, corrupt_key=5)

    faces = FaceRecordIO(tmp_path)

    assert faces.has_header and faces.header_range == (13, 17)
    assert faces.label_source == "identity records" and faces.labels_file is None
    assert faces.keys.tolist() == list(range(1, 13))
    assert faces.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not (tmp_path / "train.labels.npz").exists()
    assert faces.read(0) == (images[1], 0) and faces.read(5) == (images[6], 1)
    with pytest.raises(Exception, match=r"train\.rec key 5"):
        faces.read(4)  # the corrupt record itself is still caught when it is read


def test_header_values_beyond_float32_precision_are_located_and_labels_scanned(tmp_path, monkeypatch):
    """Glint360K-sized keys (> 2**24) lose precision in the float32 header: pretend the limit is 8, give a
    header [a, b] = [14, 18] one off from the true [13, 17], and expect the true layout back."""
    images = hand_built_header_set(tmp_path, header=(14.0, 18.0))
    monkeypatch.setattr(recordio_module, "FLOAT32_EXACT", 8)

    faces = FaceRecordIO(tmp_path)

    assert faces.header_range == (13, 17)
    assert faces.keys.tolist() == list(range(1, 13))
    assert faces.label_source == "record headers"  # float32 identity ranges are not trusted there
    assert faces.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert faces.read(11) == (images[12], 3)


def test_header_layout_with_skipped_label_values_reads_labels_from_images(tmp_path):
    """insightface's RecBuilder keeps identity order but may skip label values (identity != position)."""
    hand_built_header_set(tmp_path, label_values=(0, 2, 5, 7))
    (tmp_path / "property").write_text("8,8,8\n")

    faces = FaceRecordIO(tmp_path)

    assert faces.label_source == "record headers"
    assert faces.labels.tolist() == [0, 0, 0, 2, 2, 2, 5, 5, 5, 7, 7, 7]
    assert faces.read(6)[1] == 5


@pytest.mark.parametrize("with_header", [True, False])
@pytest.mark.parametrize("array_labels", [False, True])
def test_writer_reader_round_trip(tmp_path, with_header, array_labels):
    labels = [0, 0, 1, 3, 3, 3]  # class 2 has no image
    order = range(len(labels)) if with_header else [4, 0, 5, 2, 1, 3]
    items = [(jpeg(10 + i), [float(labels[i]), 1.5] if array_labels else labels[i]) for i in order]

    count = write_face_recordio(tmp_path, items, with_header=with_header, num_classes=5)
    faces = FaceRecordIO(tmp_path)

    assert count == len(items) == len(faces)
    assert faces.has_header == with_header
    assert (tmp_path / "property").read_text() == "5,8,8\n"
    assert faces.num_classes == 5 and faces.image_size == (8, 8)
    expected_labels = [labels[i] for i in order]
    assert faces.labels.tolist() == expected_labels
    expected = [(image, label) for (image, _), label in zip(items, expected_labels)]
    assert [faces.read(i) for i in range(len(faces))] == expected
    assert faces.label_source == ("identity records" if with_header else "record headers")
    assert not list(tmp_path.glob("*.tmp-*"))


def walk_records(blob: bytes) -> list[bytes]:
    """Sequential dmlc reader written for the test: every record's reassembled payload, in file order."""
    payloads, current, position = [], [], 0
    while position < len(blob):
        magic, lrecord = struct.unpack_from("<II", blob, position)
        assert magic == 0xCED7230A
        length = lrecord & ((1 << 29) - 1)
        current.append(blob[position + 8 : position + 8 + length])
        position += 8 + length + (-length % 4)
        if lrecord >> 29 in (0, 3):
            payloads.append(MAGIC.join(current))
            current = []
    return payloads


def test_writer_header_layout_matches_insightface_structure(tmp_path):
    items = [(jpeg(i), label) for i, label in enumerate([0, 0, 1, 1, 1, 3])]
    write_face_recordio(tmp_path, items, num_classes=4)

    idx = [tuple(map(int, line.split("\t"))) for line in (tmp_path / "train.idx").read_text().splitlines()]
    payloads = walk_records((tmp_path / "train.rec").read_bytes())
    by_key = dict(zip([key for key, _ in idx], payloads))

    assert [key for key, _ in idx] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]  # images, identities, header last
    assert struct.unpack_from("<IfQQ2f", by_key[0]) == (2, 0.0, 0, 1, 7.0, 11.0)  # [a, b]
    ranges = [struct.unpack_from("<I20x2f", by_key[k]) for k in range(7, 11)]
    assert ranges == [(2, 1.0, 3.0), (2, 3.0, 6.0), (2, 6.0, 6.0), (2, 6.0, 7.0)]
    assert struct.unpack_from("<IfQQ", by_key[4]) == (0, 1.0, 4, 0)
    assert by_key[4][24:] == items[3][0]


def test_headerless_labels_file_is_created_reused_and_refreshed(tmp_path, monkeypatch):
    items = [(jpeg(i), label) for i, label in enumerate([2, 0, 1, 1])]
    write_face_recordio(tmp_path, items, with_header=False)
    assert FaceRecordIO(tmp_path).labels.tolist() == [2, 0, 1, 1]
    assert (tmp_path / "train.labels.npz").is_file()

    real_scan = recordio_module.scan_identities

    def refuse(*args, **kwargs):
        raise AssertionError("header scan ran although a valid labels file exists")

    monkeypatch.setattr(recordio_module, "scan_identities", refuse)
    again = FaceRecordIO(tmp_path)
    assert again.labels.tolist() == [2, 0, 1, 1] and again.labels_file == tmp_path / "train.labels.npz"

    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("\n".join(lines[::-1]) + "\n")  # the index changed: rescan
    with pytest.raises(AssertionError, match="header scan ran"):
        FaceRecordIO(tmp_path)
    monkeypatch.setattr(recordio_module, "scan_identities", real_scan)
    assert FaceRecordIO(tmp_path).labels.tolist() == [1, 1, 0, 2]


def test_labels_file_goes_to_cache_folder_when_data_folder_refuses_it(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_face_recordio(data, [(jpeg(i), i % 2) for i in range(4)], with_header=False)
    (data / "train.labels.npz").mkdir()  # the labels file cannot be written there (works even as root)
    monkeypatch.setenv("EKD_CACHE_DIR", str(cache))

    first = FaceRecordIO(data)
    stored = list(cache.glob("labels-*.npz"))
    assert len(stored) == 1 and first.labels_file == stored[0]
    monkeypatch.setattr(recordio_module, "scan_identities", lambda *a, **k: pytest.fail("rescanned"))
    assert FaceRecordIO(data).labels.tolist() == [0, 1, 0, 1]


class RecordBytes(torch.utils.data.Dataset):
    def __init__(self, faces):
        self.faces = faces

    def __len__(self):
        return len(self.faces)

    def __getitem__(self, i):
        image, label = self.faces.read(i)
        return image, label, os.getpid(), self.faces._fd_pid


def test_reader_in_dataloader_workers_gives_identical_bytes(tmp_path):
    items = [(jpeg(i), i // 3) for i in range(12)]
    write_face_recordio(tmp_path, items)
    faces = FaceRecordIO(tmp_path)
    faces.read(0)  # the parent holds an open handle before the workers fork

    loader = torch.utils.data.DataLoader(RecordBytes(faces), batch_size=None, num_workers=2)
    seen = list(loader)

    assert [(image, label) for image, label, _, _ in seen] == items
    worker_pids = {pid for _, _, pid, _ in seen}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert all(fd_pid == pid for _, _, pid, fd_pid in seen)  # each worker opened its own handle


def test_test_set_beside_train_set_ignores_train_property(tmp_path):
    """`property` describes train.rec; a test.rec in the same folder has its own identities."""
    write_face_recordio(tmp_path, [(jpeg(i), i // 2) for i in range(8)], num_classes=4)
    write_face_recordio(tmp_path, [(jpeg(20 + i), i // 2) for i in range(4)], prefix="test")

    test = FaceRecordIO(tmp_path / "test", require_property=False)
    assert test.num_classes == 2 and test.labels.tolist() == [0, 0, 1, 1]
    assert test.fingerprint() != FaceRecordIO(tmp_path).fingerprint()
