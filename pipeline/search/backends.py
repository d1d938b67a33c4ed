"""Compute backends for the exact similarity searches in `pipeline.search`.

Two families:
  * kNN (`knn_kind`): "faiss-gpu", "torch-cuda", "faiss" (CPU), "torch" (CPU) or "numpy";
  * pair scans (`scan_engine`): an engine that multiplies blocks of rows and pulls the few entries a
    scan needs out of each block. numpy on CPU; torch tensors (CUDA when present, else CPU).

faiss has no dense block-product API worth using here, so a "faiss" request scans with the same engine
as "auto". PyPI faiss-gpu wheels built without sm_90 fail on H100 at run time: the GPU path is probed
once and, when it fails, CUDA work goes to torch matmul + topk instead.
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.settings import Choice

log = logging.getLogger("pipeline.search")



class Backend(Choice):
    """Similarity-search engines (auto: the fastest that runs here)."""

    auto = "auto"
    faiss = "faiss"
    torch = "torch"
    numpy = "numpy"


BACKENDS = Backend.values()
# Every real similarity is >= this; masked entries (positives, i >= j) are -inf and fall below it.
FLOOR_ALL = np.float32(-np.finfo(np.float32).max)
_CHECK_ROWS = 65536
_CHUNK_ENTRIES = 1 << 18


def check_rows(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """C-contiguous float32 (N, D); DataError naming the first row that holds NaN or inf."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise PipelineError(f"{what}: expected a 2-D (N, D) array, got shape {x.shape}")
    for start in range(0, x.shape[0], _CHECK_ROWS):
        finite = np.isfinite(x[start : start + _CHECK_ROWS]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise DataError(f"{what}: row {row} contains NaN or inf")
    return x


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise PipelineError(f"unknown search backend {name!r}; use one of {', '.join(BACKENDS)}")
    return name


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        return False
    return bool(torch.cuda.is_available())


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@functools.lru_cache(maxsize=1)
def faiss_gpu_usable() -> bool:
    """True when faiss sees a GPU and a tiny GPU search really runs (wheels lacking the GPU's arch fail)."""
    faiss = _faiss()
    if faiss is None or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return False
    try:
        probe = np.eye(4, dtype=np.float32)
        faiss.knn_gpu(faiss.StandardGpuResources(), probe, probe, 1, metric=faiss.METRIC_INNER_PRODUCT)
    except Exception as error:  # noqa: BLE001 - any failure means "do not use faiss-gpu"
        log.warning("faiss GPU search failed (%s); using torch on CUDA instead", error)
        return False
    return True


def knn_kind(backend: str) -> str:
    """The concrete kNN implementation for a backend name (see module docstring)."""
    check_backend(backend)
    if backend in ("auto", "faiss"):
        if faiss_gpu_usable():
            return "faiss-gpu"
        if _cuda_available():
            return "torch-cuda"
        if _faiss() is not None:
            return "faiss"
        if backend == "faiss":
            raise PipelineError("backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return "numpy"
    if backend == "torch":
        return "torch-cuda" if _cuda_available() else "torch"
    return "numpy"


class NumpyEngine:
    """Block products and entry selection with numpy (CPU).

    One output buffer is reused across blocks; selections run over row chunks of ~256k entries so the
    compare, mask and gather passes hit cache instead of memory.
    """

    name = "numpy"

    def __init__(self) -> None:
        self._out = np.empty(0, np.float32)
        self._masks = np.empty((3, _CHUNK_ENTRIES), bool)

    def put(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_numpy(self, x) -> np.ndarray:
        return x

    def sims(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b.T (float32) in the reused buffer: valid until the next call."""
        size = a.shape[0] * b.shape[0]
        if self._out.size < size:
            self._out = np.empty(size, np.float32)
        return np.matmul(a, b.T, out=self._out[:size].reshape(a.shape[0], b.shape[0]))

    def fill(self, s: np.ndarray, rows: slice, cols: slice) -> None:
        s[rows, cols] = -np.inf

    def fill_lower(self, s: np.ndarray) -> None:
        """-inf on and below the diagonal of a square diagonal block (keeps pairs i < j)."""
        for start in range(s.shape[0]):
            s[start, : start + 1] = -np.inf

    def _chunks(self, s: np.ndarray):
        """(flat part, mask a, mask b, mask c) per row chunk of s."""
        step = max(1, _CHUNK_ENTRIES // max(s.shape[1], 1))
        for start in range(0, s.shape[0], step):
            part = s[start : start + step].reshape(-1)
            yield (part, *(mask[: part.size] for mask in self._masks))

    def values_between(self, s: np.ndarray, lo, hi) -> tuple[int, np.ndarray]:
        """(count of entries >= lo, the entries in [lo, hi])."""
        count, parts = 0, []
        for part, ge, le, _ in self._chunks(s):
            np.greater_equal(part, lo, out=ge)
            count += int(np.count_nonzero(ge))
            np.less_equal(part, hi, out=le)
            np.logical_and(ge, le, out=ge)
            parts.append(np.compress(ge, part))
        return count, _concat(parts)

    def values_ge(self, s: np.ndarray, lo) -> np.ndarray:
        parts = []
        for part, ge, _, _ in self._chunks(s):
            np.greater_equal(part, lo, out=ge)
            parts.append(np.compress(ge, part))
        return _concat(parts)

    def values_outside_gap(self, s: np.ndarray, lo, hi, top) -> tuple[int, np.ndarray]:
        """(count of entries >= lo, the entries in [lo, hi] or >= top), for hi < top."""
        count, parts = 0, []
        for part, ge, keep, high in self._chunks(s):
            np.greater_equal(part, lo, out=ge)
            count += int(np.count_nonzero(ge))
            np.less_equal(part, hi, out=keep)
            np.greater_equal(part, top, out=high)
            np.logical_or(keep, high, out=keep)
            np.logical_and(ge, keep, out=ge)
            parts.append(np.compress(ge, part))
        return count, _concat(parts)

    def positions_ge(self, s: np.ndarray, lo) -> tuple[np.ndarray, np.ndarray]:
        """(flat row-major positions, values) of the entries >= lo."""
        flat = s.reshape(-1)
        positions = np.flatnonzero(flat >= lo)
        return positions, flat[positions]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


class TorchEngine:
    """The same operations on torch tensors (CUDA when available): only selected entries leave the device."""

    name = "torch"

    def __init__(self, device: str | None = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = f"torch-{self.device.type}"

    def put(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()

    def sims(self, a, b):
        # TF32 would change the float32 products the exactness contract is stated on.
        return _mm_fp32(self.torch, a, b)

    def fill(self, s, rows: slice, cols: slice) -> None:
        s[rows, cols] = float("-inf")

    def fill_lower(self, s) -> None:
        n = s.shape[0]
        lower = self.torch.ones(n, n, dtype=self.torch.bool, device=s.device).tril()
        s.masked_fill_(lower, float("-inf"))

    def values_between(self, s, lo, hi) -> tuple[int, np.ndarray]:
        ge = s >= float(lo)
        count = int(ge.sum())
        return count, self.to_numpy(s[ge & (s <= float(hi))])

    def values_ge(self, s, lo) -> np.ndarray:
        return self.to_numpy(s[s >= float(lo)])

    def values_outside_gap(self, s, lo, hi, top) -> tuple[int, np.ndarray]:
        ge = s >= float(lo)
        count = int(ge.sum())
        return count, self.to_numpy(s[ge & ((s <= float(hi)) | (s >= float(top)))])

    def positions_ge(self, s, lo) -> tuple[np.ndarray, np.ndarray]:
        flat = s.reshape(-1)
        positions = self.torch.nonzero(flat >= float(lo)).reshape(-1)
        return self.to_numpy(positions).astype(np.int64), self.to_numpy(flat[positions])


def _mm_fp32(torch, a, b):
    if a.device.type != "cuda":
        return torch.mm(a, b.T)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return torch.mm(a, b.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def scan_engine(backend: str):
    """Engine for the pair scans: torch on CUDA when present (or when asked for), numpy otherwise."""
    check_backend(backend)
    if backend == "torch" or (backend in ("auto", "faiss") and _cuda_available()):
        return TorchEngine()
    return NumpyEngine()
