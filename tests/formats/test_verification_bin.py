"""insightface verification .bin files: round trip, Python-2 pickles, numpy images, and refused pickles."""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest
from helpers.data import random_image_bytes
from PIL import Image

from pipeline.errors import DataError
from pipeline.formats.verification_bin import (
    load_verification_bin,
    write_verification_bin,
)


def jpeg(seed: int) -> bytes:
    return random_image_bytes(seed, (6, 5))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_round_trip_keeps_bytes_and_pairs(tmp_path):
    images = [jpeg(i) for i in range(6)]
    write_verification_bin(tmp_path / "lfw.bin", images, [True, False, True])

    loaded, issame = load_verification_bin(tmp_path / "lfw.bin")

    assert loaded == images
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    arrays, _ = load_verification_bin(tmp_path / "lfw.bin", decode=True)
    assert all(np.array_equal(a, decoded(b)) for a, b in zip(arrays, images))
    with open(tmp_path / "lfw.bin", "rb") as handle:  # what insightface's own loader does
        assert pickle.load(handle) == (images, [True, False, True])


def test_writer_encodes_rgb_arrays_as_jpeg(tmp_path):
    rgb = np.full((6, 5, 3), 200, np.uint8)
    write_verification_bin(tmp_path / "a.bin", [rgb, rgb], [True])
    loaded, _ = load_verification_bin(tmp_path / "a.bin")
    assert loaded[0][:2] == b"\xff\xd8"
    assert np.abs(decoded(loaded[0]).astype(int) - 200).max() <= 2


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol-2 opcodes as Python 2's cPickle writes (bins, issame_list) with `str` images."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for image in images:
        if len(image) < 256:
            out.append(b"U" + bytes([len(image)]) + image)  # SHORT_BINSTRING
        else:
            out.append(b"T" + struct.pack("<I", len(image)) + image)  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if same else b"\x89" for same in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_python2_pickle_of_str_images(tmp_path):
    images = [jpeg(i) for i in range(4)] + [b"\xff\xd8" + b"\x00" * 10, b"\xff\xd8" + bytes(range(200))]
    data = python2_pickle(images, [False, True, False])
    assert [op.name for op, _, _ in pickletools.genops(data)].count("BINSTRING") >= 4  # Python 2 str opcodes
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # the default ASCII decoding fails, as it does for insightface's py2 files
    (tmp_path / "py2.bin").write_bytes(data)

    loaded, issame = load_verification_bin(tmp_path / "py2.bin")

    assert loaded == images and issame.tolist() == [False, True, False]


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_uint8_images_and_bool_flags(tmp_path, protocol):
    images = [jpeg(i) for i in range(4)]
    bins = [np.frombuffer(images[0], np.uint8), np.frombuffer(images[1], np.uint8), images[2], decoded(images[3])]
    content = (bins, [np.bool_(True), np.bool_(False)])
    (tmp_path / "np.bin").write_bytes(pickle.dumps(content, protocol=protocol))

    loaded, issame = load_verification_bin(tmp_path / "np.bin")

    assert loaded[:3] == images[:3]
    assert np.array_equal(loaded[3], decoded(images[3]))  # an already-decoded image stays an array
    assert issame.tolist() == [True, False]


class Exploit:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("call, shown", [(os.system, r"(posix|os)\.system"), (eval, r"(__builtin__|builtins)\.eval")])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, call, shown, protocol):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = ([jpeg(0), Exploit(call, command)], [True])
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(payload, protocol=protocol))

    with pytest.raises(DataError, match=rf"evil\.bin: refusing pickle global {shown}"):
        load_verification_bin(tmp_path / "evil.bin")
    assert not marker.exists()


def test_structure_errors_name_the_file(tmp_path):
    cases = {
        "pairs.bin": ([jpeg(0)] * 3, [True]),
        "flags.bin": ([jpeg(0)] * 2, ["yes"]),
        "entry.bin": ([jpeg(0), 3.5], [True]),
        "shape.bin": {"bins": []},
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(DataError, match=rf"{name}: "):
            load_verification_bin(tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"junk\.bin: not a verification pickle"):
        load_verification_bin(tmp_path / "junk.bin")


def test_non_image_bytes_fail_decoding_with_index(tmp_path):
    write_verification_bin(tmp_path / "bad.bin", [jpeg(0), b"GIF89a..."], [True])
    with pytest.raises(DataError, match=r"bad\.bin image 1: not a JPEG"):
        load_verification_bin(tmp_path / "bad.bin", decode=True)
