"""Damaged IJB meta files (`pipeline evaluate-ijb`): odd bytes, values out of range, wrong column counts,
duplicate images, unknown templates, empty files. Each is one line naming the file and line, exit 2, and no
result left. The meta files are read before any crop, so the folder here has no crops."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from helpers.teachers import Projection

from pipeline.formats.ijb import IjbMeta, write_ijb_meta

SIZE = 16
TM, LM, PR = "ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt"


def _meta() -> IjbMeta:
    return IjbMeta(names=["1.jpg", "2.jpg", "3.jpg", "4.jpg"], templates=np.array([4, 4, 9, 12]),
                   medias=np.array([7, 8, 7, 3]), landmarks=np.arange(40, dtype=np.float32).reshape(4, 5, 2),
                   faceness=np.array([0.5, 1.0, 0.125, 0.75], np.float32),
                   pairs=np.array([[4, 9], [9, 12], [4, 12]]), labels=np.array([0, 1, 0], np.int8))


def _put(line: int, text: bytes):
    """Replace line `line` (1-based; one past the end appends) of a meta file by `text`."""
    def damage(path):
        lines = path.read_bytes().splitlines(keepends=True)
        lines[line - 1:line] = [text]
        path.write_bytes(b"".join(lines))
    return damage


def _truncate(keep: int):
    def damage(path):
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:keep]))
    return damage


POINTS = b"1 2 3 4 5 6 7 8 9 10"
CASES = {  # damaged file, damage, line N of the error "<file> line N: <message>" (None: an empty file has no line;
    # (file, N): the error names another file), message
    "tm not utf-8": (TM, _put(2, b"2.jpg 4 \xff\xfe\n"), 2, "not UTF-8 text"),
    "lm not utf-8": (LM, _put(3, b"3.jpg 1 2 \xe9 4 5 6 7 8 9 10 0.5\n"), 3, "not UTF-8 text"),
    "pr not utf-8": (PR, _put(2, b"9 12 \x80\n"), 2, "not UTF-8 text"),
    "negative template id": (TM, _put(2, b"2.jpg -4 8\n"), 2, "template id -4 is out of range"),
    "template id beyond int64": (TM, _put(3, b"3.jpg 99999999999999999999 7\n"), 3, "template id 9+ is out of range"),
    "media id beyond int64": (TM, _put(4, b"4.jpg 12 18446744073709551616\n"), 4, "media id 1844.* is out of range"),
    "template id with underscore": (TM, _put(1, b"1.jpg 4_0 7\n"), 1, "template id '4_0' is not an integer"),
    "pair id beyond int64": (PR, _put(3, b"4 99999999999999999999 0\n"), 3, "template id 9+ is out of range"),
    "negative pair id": (PR, _put(1, b"-4 9 0\n"), 1, "template id -4 is out of range"),
    "label 2": (PR, _put(2, b"9 12 2\n"), 2, "label 2 is not 0 or 1"),
    "label beyond int64": (PR, _put(2, b"9 12 99999999999999999999\n"), 2, "label 9+ is not 0 or 1"),
    "label -1": (PR, _put(3, b"4 12 -1\n"), 3, "label -1 is not 0 or 1"),
    "unknown template": (PR, _put(2, b"9 13 1\n"), 2, "template 13 is not in .*ijbc_face_tid_mid"),
    "nan landmark": (LM, _put(2, b"2.jpg 1 2 nan 4 5 6 7 8 9 10 0.5\n"), 2, "landmark coordinate 3 'nan' is not"),
    "inf landmark": (LM, _put(2, b"2.jpg 1 2 3 -inf 5 6 7 8 9 10 0.5\n"), 2, "landmark coordinate 4 '-inf' is not"),
    "huge landmark": (LM, _put(4, b"4.jpg 1 2 3 4 5 1e300 7 8 9 10 0.5\n"), 4, "landmark coordinate 6 1e300 is out"),
    "float32-overflowing landmark": (LM, _put(1, b"1.jpg 1e39 2 3 4 5 6 7 8 9 10 0.5\n"), 1,
                                     "landmark coordinate 1 1e39 is out of range"),
    "nan faceness": (LM, _put(3, b"3.jpg " + POINTS + b" NaN\n"), 3, "faceness score 'NaN' is not a finite"),
    "huge faceness": (LM, _put(3, b"3.jpg " + POINTS + b" 1e30\n"), 3, "faceness score 1e30 is out of range"),
    "lm 11 fields": (LM, _put(2, b"2.jpg 1 2 3 4 5 6 7 8 9 0.5\n"), 2, r"expected an image name, .* got 11 fields"),
    "lm 13 fields": (LM, _put(2, b"2.jpg " + POINTS + b" 0.5 0.5\n"), 2, r"expected an image name, .* got 13 fields"),
    "tm 2 fields": (TM, _put(3, b"3.jpg 9\n"), 3, "expected 'image_name template_id media_id', got 2"),
    "pr 4 fields": (PR, _put(1, b"4 9 0 0\n"), 1, "expected 'template_1 template_2 label', got 4"),
    "duplicate image": (TM, _put(3, b"1.jpg 9 7\n"), 3, "image '1.jpg' is listed again \\(first on line 1\\)"),
    # the line named is the first of the other file that the shortened one lacks
    "tm ends early": (TM, _truncate(2), (LM, 3), "image '3.jpg' is not in .*ijbc_face_tid_mid.txt, which ends after 2"),
    "lm ends early": (LM, _truncate(3), (TM, 4), "image '4.jpg' is not in .*ijbc_name_5pts_score.txt, which ends"),
    "empty tm": (TM, _truncate(0), None, "no images listed"),
    "empty lm": (LM, _truncate(0), None, "no images listed"),
    "empty pr": (PR, _truncate(0), None, "no template pairs listed"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ijb-meta") / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 flags TorchScript as deprecated
        torch.jit.script(Projection(SIZE, 8)).save(str(path))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_meta_file_is_one_line_naming_file_and_line(case, model, cli, tmp_path):
    folder, out = tmp_path / "IJBC", tmp_path / "run"
    write_ijb_meta(folder, "IJBC", _meta())
    out.mkdir()
    (out / "ijbc.json").write_text("{}")  # an earlier result must not survive a failed run
    name, damage, line, message = CASES[case]
    damage(folder / "meta" / name)
    result = cli("evaluate-ijb", "--model", model, "--ijb", folder, "--out", out, "--input-size", SIZE,
                 "--device", "cpu", "--workers", 0)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    name, line = line if isinstance(line, tuple) else (name, line)
    where = re.escape(f"{folder / 'meta' / name}") + ("" if line is None else f" line {line}")
    assert len(lines) == 1 and re.match(f"error: {where}: {message}", lines[0]), result.output
    assert not (out / "ijbc.json").exists()


def test_undamaged_meta_folder_gets_past_the_meta_files(model, cli, tmp_path):
    """The cases above fail for their damage: the same folder undamaged fails only at its (absent) crops."""
    folder = tmp_path / "IJBC"
    write_ijb_meta(folder, "IJBC", _meta())
    result = cli("evaluate-ijb", "--model", model, "--ijb", folder, "--out", tmp_path / "run", "--input-size", SIZE,
                 "--device", "cpu", "--workers", 0)
    assert result.exit_code == 2 and "loose_crop" in result.output and "meta" in result.output, result.output
