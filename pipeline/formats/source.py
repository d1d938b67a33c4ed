"""Open a face set by what a path holds: a RecordIO folder or prefix, or a folder of identity folders."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import DataError


def open_face_source(path: str | os.PathLike, **kwargs):
    """Open a face set by what `path` holds: a folder with `train.rec`/`train.idx`, a RecordIO prefix
    (`dir/test`) or `.rec`/`.idx` file, or a folder with one sub-folder of images per identity.

    Keyword arguments go to the chosen class (e.g. `require_property=False` for FaceRecordIO).
    """
    from pipeline.formats.image_folder import ImageFolderFaces
    from pipeline.formats.recordio import FaceRecordIO

    path = Path(path)
    if path.is_dir():
        if (path / "train.rec").is_file() or (path / "train.idx").is_file():
            return FaceRecordIO(path, **kwargs)
        if any(entry.is_dir() for entry in os.scandir(path)):
            return ImageFolderFaces(path, **kwargs)
        raise DataError(f"{path}: neither train.rec/train.idx nor identity sub-folders of images")
    if path.suffix in (".rec", ".idx") or path.with_name(path.name + ".rec").is_file():
        return FaceRecordIO(path, **kwargs)
    raise DataError(f"{path}: no face set here (expected a folder, a RecordIO prefix or a .rec file)")
