"""Opening this pipeline's HDF5 artifacts with one-line errors that say which file and what made it."""
from __future__ import annotations

import os
from pathlib import Path

import h5py

from pipeline.errors import DataError, PipelineError


def open_artifact(path: str | os.PathLike, what: str, command: str) -> h5py.File:
    """`path` opened read-only; a missing file names the `command` that writes it, a broken one says so."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: {what} not found (run `pipeline {command}` first)")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 {what} ({error})") from None
