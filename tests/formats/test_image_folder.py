"""Folder-per-identity face sets, and open_face_source picking the right reader by contents."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from helpers.data import random_image_bytes
from PIL import Image

from pipeline.errors import DataError
from pipeline.formats.source import open_face_source
from pipeline.formats.image_folder import ImageFolderFaces
from pipeline.formats.recordio import FaceRecordIO, write_face_recordio


def encoded(seed: int, fmt: str) -> bytes:
    return random_image_bytes(seed, (7, 9), fmt)


@pytest.fixture
def folder(tmp_path):
    layout = {  # deliberately created out of order: labels follow sorted names
        "zed": ["b.jpg", "a.png"],
        "amy": ["2.jpeg", "1.jpg", "notes.txt"],
        "bob": ["x.JPG"],
    }
    written = {}
    for seed, (identity, names) in enumerate(layout.items()):
        (tmp_path / identity).mkdir()
        for index, name in enumerate(names):
            fmt = "PNG" if name.endswith("png") else "JPEG"
            data = b"text" if name.endswith(".txt") else encoded(10 * seed + index, fmt)
            (tmp_path / identity / name).write_bytes(data)
            written[f"{identity}/{name}"] = data
    return tmp_path, written


def test_labels_follow_sorted_folders_and_files(folder):
    root, written = folder
    faces = ImageFolderFaces(root)

    assert faces.paths == ["amy/1.jpg", "amy/2.jpeg", "bob/x.JPG", "zed/a.png", "zed/b.jpg"]
    assert faces.labels.tolist() == [0, 0, 1, 2, 2] and faces.labels.dtype == np.int64
    assert faces.keys.tolist() == [0, 1, 2, 3, 4]
    assert faces.num_classes == 3 and len(faces) == 5 and faces.image_size == (7, 9)
    assert [faces.read(i) for i in range(5)] == [(written[p], label) for p, label in zip(faces.paths, [0, 0, 1, 2, 2])]
    png = np.asarray(Image.open(io.BytesIO(written["zed/a.png"])).convert("RGB"))
    assert np.array_equal(faces.decode(3), png)  # PNG decodes losslessly


def test_fingerprint_is_paths_and_sizes(folder):
    root, written = folder
    faces = ImageFolderFaces(root)
    expected = hashlib.sha256("".join(f"{p}\t{len(written[p])}\n" for p in faces.paths).encode()).hexdigest()
    assert faces.fingerprint() == expected
    (root / "bob" / "x.JPG").write_bytes(written["bob/x.JPG"] + b"\0")
    assert faces.fingerprint() != expected


def test_bad_image_and_empty_folder(folder, tmp_path_factory):
    root, _ = folder
    (root / "bob" / "x.JPG").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"bob/x\.JPG: not a JPEG or PNG"):
        ImageFolderFaces(root).decode(2)
    empty = tmp_path_factory.mktemp("empty")
    (empty / "someone").mkdir()
    with pytest.raises(DataError, match=r"no \.jpg/\.jpeg/\.png images"):
        ImageFolderFaces(empty)


def test_open_face_source_picks_by_contents(folder, tmp_path_factory):
    root, _ = folder
    assert isinstance(open_face_source(root), ImageFolderFaces)

    rec_dir = tmp_path_factory.mktemp("rec")
    write_face_recordio(rec_dir, [(encoded(1, "JPEG"), 0), (encoded(2, "JPEG"), 1)])
    write_face_recordio(rec_dir, [(encoded(3, "JPEG"), 0)], prefix="test", with_header=False)
    for path in (rec_dir, rec_dir / "train.rec", rec_dir / "test", rec_dir / "test.idx"):
        source = open_face_source(path)
        assert isinstance(source, FaceRecordIO)
        assert source.rec_path.name == ("test.rec" if "test" in path.name else "train.rec")

    nothing = tmp_path_factory.mktemp("nothing")
    (nothing / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="neither train.rec"):
        open_face_source(nothing)
    with pytest.raises(DataError, match="no face set here"):
        open_face_source(nothing / "missing")
