"""Suite-wide settings, and the fixtures that several test files share.

One torch thread per test process: CI has two cores; torch's default thread pool plus DataLoader/Dask worker
processes would oversubscribe them and make the suite many times slower. Numerical results do not depend on it.

Helpers that are plain functions and classes live in tests/helpers (imported as `helpers`), code that runs in
processes of its own in tests/workers.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.data import write_random_faces
from typer.testing import CliRunner

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """EKD_CACHE_DIR (labels files, remembered cache verifications) in a folder of this session, never the
    user's ~/.cache; inherited by the CLI processes that tests start."""
    import os

    previous = os.environ.get("EKD_CACHE_DIR")
    os.environ["EKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("ekd-cache-dir"))
    yield Path(os.environ["EKD_CACHE_DIR"])
    if previous is None:
        os.environ.pop("EKD_CACHE_DIR", None)
    else:
        os.environ["EKD_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def cli():
    """The `pipeline` command run in-process: cli("export", "--model", path, ...) returns click's Result.

    Arguments are passed through str(), so paths and numbers can be given as they are."""
    from pipeline.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def random_faces(tmp_path_factory):
    """The folder of helpers.data.write_random_faces' RecordIO set (16 classes x 3 random 16 x 16 JPEGs, a
    header layout), written once for the session. Read it; do not write into it."""
    return write_random_faces(tmp_path_factory.mktemp("random-faces"))


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs (`remount(size)` makes room); skipped where this process may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer tests cover the same code")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, remount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
