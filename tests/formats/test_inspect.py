"""`pipeline inspect` on a small set whose numbers are known by construction."""
from __future__ import annotations

import io
import re

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from pipeline.formats.recordio import write_face_recordio
from pipeline.formats.summary import count_histogram, summarize
from pipeline.formats.verification_bin import write_verification_bin
from stages.inspect_data import COMMANDS

COUNTS = [1, 3, 3, 6, 25, 0]  # images per identity 0..5; identity 5 has none


def small_set(folder, with_header=True):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(buffer, format="JPEG")
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    write_face_recordio(folder, [(buffer.getvalue(), int(l)) for l in labels], with_header=with_header,
                        num_classes=len(COUNTS), image_size=(12, 10))
    write_face_recordio(folder, [(buffer.getvalue(), 0)], prefix="test", with_header=False)
    write_verification_bin(folder / "lfw.bin", [buffer.getvalue()] * 6, [True, False, True])
    write_verification_bin(folder / "agedb_30.bin", [buffer.getvalue()] * 2, [False])


def test_histogram_ranges():
    counts = np.array([0, 1, 2, 4, 5, 9, 10, 1000, 5000])
    assert count_histogram(counts) == [
        ("0", 1), ("1", 1), ("2-4", 2), ("5-9", 2), ("10-19", 1), ("20-49", 0), ("50-99", 0),
        ("100-199", 0), ("200-499", 0), ("500-999", 0), ("1000+", 2),
    ]
    assert count_histogram(np.array([3, 3, 7])) == [("2-4", 2), ("5-9", 1)]


def test_summary_numbers(tmp_path):
    small_set(tmp_path)
    summary = summarize(tmp_path)
    assert summary["images"] == sum(COUNTS) == 38
    assert summary["classes"] == 6 and summary["identities_with_images"] == 5
    assert summary["per_identity"] == {"min": 0, "median": 3.0, "mean": 38 / 6, "max": 25}
    assert summary["histogram"] == [("0", 1), ("1", 1), ("2-4", 2), ("5-9", 1), ("10-19", 0), ("20-49", 1)]
    assert summary["image_size"] == [12, 10] and summary["first_image_shape"] == [12, 10, 3]
    assert summary["layout"] == "insightface header: image keys 1..38, identity records 39..44"
    assert summary["verification"] == [
        {"file": "agedb_30.bin", "pairs": 1, "same": 0},
        {"file": "lfw.bin", "pairs": 3, "same": 2},
    ]
    assert summary["other_recordio"] == ["test"]


def test_command_prints_summary(tmp_path):
    small_set(tmp_path, with_header=False)
    app = typer.Typer()
    app.command("inspect")(COMMANDS["inspect"])
    app.command("unused")(lambda: None)  # two commands keep `inspect` a sub-command

    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])

    assert result.exit_code == 0, result.output
    out = result.output
    assert "header-less: every .idx key is an image" in out
    assert re.search(r"images:\s+38\n", out) and "6 classes, 5 with images" in out
    assert "min 0  median 3  mean 6.3  max 25" in out
    assert re.search(r" 2-4 \| #{40} 2\n", out) and re.search(r" 20-49 \| #{20} {21}1\n", out)  # bars: 2 vs 1
    assert re.search(r"lfw\.bin\s+3 pairs \(2 same\)", out)
    assert f"kept in {tmp_path / 'train.labels.npz'}" in out
