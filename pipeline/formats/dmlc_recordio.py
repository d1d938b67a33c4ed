"""dmlc RecordIO framing, MXNet's image-record header (IRHeader) and the `.idx` text index, without MXNet.

A record on disk is `uint32 magic, uint32 lrecord, data, zero padding to 4 bytes`, with
`cflag = lrecord >> 29` and `length = lrecord & (2**29 - 1)`. dmlc's writer cuts a payload wherever the
magic word sits at a 4-byte aligned position and drops that word: the parts carry cflag 1 (start),
2 (middle), 3 (end), a whole record carries 0; a reader re-inserts the magic between the parts.
The MXNet image payload is `IRHeader('<IfQQ': flag, label, id, id2)`, then `flag` float32 labels when
flag > 0 (the scalar label field is then unused), then the encoded image.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
FRAME = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")  # 24 bytes, the same layout as MXNet's native 'IfQQ' on x86/ARM
FLOAT32_EXACT = 1 << 24  # integers above this are not all representable in a float32 label
_SCAN_WINDOW = 8 << 20  # bytes of .rec read per system call by the header scan


def _padded(length: int) -> int:
    return (length + 3) & ~3


def encode_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc::RecordIOWriter::WriteRecord does (split at aligned magic words)."""
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"RecordIO payload of {len(payload)} bytes exceeds the 2**29-1 byte limit")
    view = memoryview(payload)
    parts, start = [], 0
    position = payload.find(MAGIC_BYTES)
    while position != -1:
        if position % 4 == 0:  # dmlc only looks at aligned words; unaligned occurrences stay in the data
            parts.append(FRAME.pack(MAGIC, ((1 if start == 0 else 2) << LENGTH_BITS) | (position - start)))
            parts.append(view[start:position])
            start = position + 4
        position = payload.find(MAGIC_BYTES, position + 1)
    last_flag = 3 if start else 0
    parts.append(FRAME.pack(MAGIC, (last_flag << LENGTH_BITS) | (len(payload) - start)))
    parts.append(view[start:])
    parts.append(b"\0" * (_padded(len(payload)) - len(payload)))
    return b"".join(parts)


def read_record(fd: int, offset: int, file_size: int, where: str) -> bytes:
    """Read and reassemble the record starting at `offset` of an open file descriptor (os.pread)."""
    parts: list[bytes] = []
    position = offset
    while True:
        if position + FRAME.size > file_size:
            raise DataError(f"{where}: truncated record (frame header at byte {position} past end of file)")
        magic, lrecord = FRAME.unpack(os.pread(fd, FRAME.size, position))
        if magic != MAGIC:
            raise DataError(f"{where}: wrong RecordIO magic 0x{magic:08x} at byte {position}")
        cflag, length = lrecord >> LENGTH_BITS, lrecord & LENGTH_MASK
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            kind = "a record start" if not parts else "a continuation part"
            raise DataError(
                f"{where}: byte {position} carries cflag {cflag} where {kind} was expected "
                "(.idx offset does not point at a record of the .rec)"
            )
        data = os.pread(fd, length, position + FRAME.size)
        if len(data) != length or position + FRAME.size + _padded(length) > file_size:
            raise DataError(f"{where}: truncated record (needs {length} bytes at byte {position + FRAME.size})")
        parts.append(data)
        position += FRAME.size + _padded(length)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)


@dataclass(frozen=True)
class ImageRecord:
    """One unpacked MXNet image record."""

    flag: int
    label: float | np.ndarray  # scalar label when flag == 0, else `flag` float32 values
    id: int
    id2: int
    image: bytes

    @property
    def identity(self) -> float:
        """The identity: the scalar label, or the first element of an array label."""
        return float(self.label[0]) if self.flag > 0 else float(self.label)


def pack_image_record(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """MXNet `recordio.pack`: a scalar label goes in the header, a sequence follows it as float32 values."""
    if np.ndim(label) == 0:
        return IR_HEADER.pack(0, float(label), id, id2) + image
    values = np.asarray(label, dtype="<f4").ravel()
    return IR_HEADER.pack(values.size, 0.0, id, id2) + values.tobytes() + image


def unpack_image_record(payload: bytes, where: str) -> ImageRecord:
    """MXNet `recordio.unpack`, raising DataError when the payload is too short for its header."""
    if len(payload) < IR_HEADER.size:
        raise DataError(f"{where}: record of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    start = IR_HEADER.size + 4 * flag
    if len(payload) < start:
        raise DataError(f"{where}: IRHeader announces {flag} labels but the record has only {len(payload)} bytes")
    if flag > 0:
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER.size).copy()
    return ImageRecord(flag, label, id_, id2, payload[start:])


def read_idx(path: Path) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Parse an MXNet `.idx` ("key<TAB>offset" lines) into (keys, offsets) int64 arrays, plus its raw bytes."""
    raw = Path(path).read_bytes()
    tokens = raw.split()
    lines = raw.rstrip().count(b"\n") + 1 if raw.strip() else 0
    try:
        if len(tokens) != 2 * lines:
            raise ValueError
        pairs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        _raise_first_bad_idx_line(path, raw)
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    if len(keys) == 0:
        raise DataError(f"{path}: empty .idx file")
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise DataError(f"{path}: key {int(unique[counts > 1][0])} appears more than once")
    if offsets.min() < 0:
        raise DataError(f"{path}: key {int(keys[offsets.argmin()])} has a negative offset")
    return keys, offsets, raw


def _raise_first_bad_idx_line(path: Path, raw: bytes) -> None:
    for number, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if not fields and not line.strip():
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            int(fields[0]), int(fields[1])
        except ValueError:
            raise DataError(f"{path}: line {number} is not 'key<TAB>offset': {line[:60]!r}") from None
    raise DataError(f"{path}: cannot parse the .idx file")


def scan_identities(
    rec_path: Path, keys: np.ndarray, offsets: np.ndarray, label_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Read only the framing and IRHeader of each record: (labels (N, label_count) float64, ids (N,) uint64).

    Column 0 is the identity (the scalar label or the first array element); further columns are the next
    array elements (NaN where a record has fewer). The .rec is read once in offset order, in windows of a
    few MB (sequential I/O, no per-record system call), and the heads are gathered as 32-bit words (records
    start 4-byte aligned) and parsed with numpy, so millions of records take seconds. A record whose head
    looks wrong, or whose first part is too short (a split inside the header), is read whole: that raises
    DataError naming its key when the record is bad.
    """
    head_words = (FRAME.size + IR_HEADER.size) // 4 + label_count
    file_size = os.path.getsize(rec_path)
    labels = np.full((len(keys), label_count), np.nan)
    ids = np.zeros(len(keys), dtype=np.uint64)
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        first = 0
        while first < len(order):
            start = int(sorted_offsets[first]) & ~3
            last = max(first + 1, int(np.searchsorted(sorted_offsets, start + _SCAN_WINDOW, "right")))
            data = os.pread(fd, int(sorted_offsets[last - 1]) + 4 * head_words - start, start)
            data += b"\0" * (-len(data) % 4) if data else b"\0" * 4  # whole words, never empty
            words = np.frombuffer(data, dtype="<u4")
            relative = (sorted_offsets[first:last] - start) // 4
            heads = words[np.minimum(relative[:, None] + np.arange(head_words), len(words) - 1)]
            rows = order[first:last]
            labels[rows], ids[rows], slow = _parse_heads(heads, offsets[rows], file_size, label_count)
            for row in rows[slow]:
                labels[row], ids[row] = _read_identity_slowly(rec_path, keys[row], offsets[row], label_count)
            first = last
    finally:
        os.close(fd)
    return labels, ids


def _parse_heads(heads, offsets, file_size, label_count) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, ids, needs_whole_read) from record heads gathered as (N, words) little-endian uint32."""
    magic, lrecord, flag = heads[:, 0], heads[:, 1], heads[:, 2].astype(np.int64)
    cflag, length = lrecord >> LENGTH_BITS, (lrecord & LENGTH_MASK).astype(np.int64)
    bad = (magic != MAGIC) | (cflag > 1) | (offsets % 4 != 0)
    bad |= offsets + FRAME.size + ((length + 3) & ~3) > file_size
    needed = IR_HEADER.size + 4 * np.minimum(flag, label_count)
    short_whole = (cflag == 0) & (length < IR_HEADER.size + 4 * flag)
    slow = bad | short_whole | ((cflag == 1) & (length < needed))
    ids = heads[:, 4].astype(np.uint64) | (heads[:, 5].astype(np.uint64) << np.uint64(32))
    scalar = heads[:, 3].view("<f4").astype(np.float64)
    floats = np.ascontiguousarray(heads[:, 8:]).view("<f4").astype(np.float64)
    labels = np.where(np.arange(label_count) < flag[:, None], floats, np.nan)
    labels[flag == 0, 0] = scalar[flag == 0]
    return labels, ids, slow


def _read_identity_slowly(rec_path: Path, key: int, offset: int, label_count: int) -> tuple[np.ndarray, int]:
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        payload = read_record(fd, int(offset), os.fstat(fd).st_size, f"{rec_path} key {key}")
    finally:
        os.close(fd)
    record = unpack_image_record(payload, f"{rec_path} key {key}")
    values = np.full(label_count, np.nan)
    if record.flag == 0:
        values[0] = record.label
    else:
        count = min(label_count, record.flag)
        values[:count] = record.label[:count]
    return values, record.id
