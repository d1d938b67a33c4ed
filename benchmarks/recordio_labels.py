"""How long finding the labels of a RecordIO set takes, side by side in one run.

Compares, on one synthetic set of N tiny records written by `write_face_recordio`:
- `per_record`: reading every record whole and unpacking its header (what an MXNet loop does),
- `scan`: the vectorised header scan FaceRecordIO uses for header-less sets (first open),
- `cached`: re-opening a header-less set whose labels file exists,
- `identity_records`: opening the insightface-header layout (labels from the identity records).
Prints one JSON line: seconds per method and speed-up ratios against `per_record`.

    python benchmarks/recordio_labels.py --images 200000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from arguments import positive_int, run_main

from pipeline.formats.dmlc_recordio import read_record, unpack_image_record
from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import FaceRecordIO, write_face_recordio


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def per_record_labels(folder: Path) -> np.ndarray:
    lines = (folder / "train.idx").read_text().split()
    offsets = [int(offset) for offset in lines[1::2]]
    rec = folder / "train.rec"
    fd = os.open(rec, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return np.array([unpack_image_record(read_record(fd, o, size, str(rec)), str(rec)).identity for o in offsets])
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive_int, default=200_000)
    parser.add_argument("--per-identity", type=positive_int, default=50)
    args = parser.parse_args()
    image = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    labels = np.arange(args.images) // args.per_identity
    with tempfile.TemporaryDirectory() as tmp:
        plain, header = Path(tmp) / "plain", Path(tmp) / "header"
        write_face_recordio(plain, ((image, int(l)) for l in labels), with_header=False)
        write_face_recordio(header, ((image, int(l)) for l in labels), with_header=True)
        per_record, expected = timed(lambda: per_record_labels(plain))
        scan, first = timed(lambda: FaceRecordIO(plain))
        cached, again = timed(lambda: FaceRecordIO(plain))
        identity, with_header = timed(lambda: FaceRecordIO(header))
    for source in (first, again, with_header):
        assert np.array_equal(source.labels, expected) and np.array_equal(expected, labels)
    assert first.label_source == "record headers" and with_header.label_source == "identity records"
    print(json.dumps({
        "images": args.images,
        "seconds": {"per_record": round(per_record, 3), "scan": round(scan, 3), "cached": round(cached, 3),
                    "identity_records": round(identity, 3)},
        "speedup_vs_per_record": {"scan": round(per_record / scan, 1), "cached": round(per_record / cached, 1),
                                  "identity_records": round(per_record / identity, 1)},
    }))


if __name__ == "__main__":
    run_main(main)
