"""Five-point face alignment as insightface's IJB evaluation does it.

The five detected landmarks of a loose crop are mapped onto the ArcFace 112 x 112 template (the standard
reference points of the 96 x 112 crop shifted 8 px right) by the least-squares similarity transform
(rotation, uniform scale, translation; Umeyama's closed form, which scikit-image's SimilarityTransform
computes), and the crop is warped with OpenCV's `warpAffine`: bilinear, constant border 0. For a model whose
input side is not 112 the template is scaled by size / 112.
"""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.models.preprocess import (  # noqa: F401  (part of this module's interface)
    ARCFACE_SIZE,
    ARCFACE_TEMPLATE,
    reference_points,
)

ALIGNMENT = "arcface-5pt-similarity-umeyama/+8px/scaled-size-over-112/bilinear/border-0"  # recorded in caches


def similarity_transforms(landmarks: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity transforms mapping each landmark set onto `target`, in closed form (Umeyama
    1991: SVD of the cross-covariance, reflection excluded), for all images at once.

    `landmarks` (N, K, 2), `target` (K, 2). Returns `(matrices, ok)`: (N, 2, 3) float64 affine matrices
    `[s R | t]` (as cv2.warpAffine takes them) and a boolean mask, False where the landmarks all coincide
    (no transform exists; those matrices are zero)."""
    src = np.asarray(landmarks, np.float64)
    dst = np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(1, keepdims=True), dst.mean(0)
    centred_src, centred_dst = src - src_mean, dst - dst_mean
    variance = np.einsum("nkd,nkd->n", centred_src, centred_src) / src.shape[1]
    covariance = np.einsum("kd,nke->nde", centred_dst, centred_src) / src.shape[1]  # (N, 2, 2) dst x src
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)
    d = np.stack([np.ones_like(sign), sign], 1)
    rotation = u @ (d[:, :, None] * vt)
    ok = variance > 0
    scale = np.where(ok, (singular * d).sum(1) / np.where(ok, variance, 1.0), 0.0)
    linear = scale[:, None, None] * rotation
    shift = dst_mean - np.einsum("nde,ne->nd", linear, src_mean[:, 0])
    matrices = np.concatenate([linear, shift[:, :, None]], 2)
    matrices[~ok] = 0.0
    return matrices, ok


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """`image` (H, W, C) uint8 warped by the 2 x 3 `matrix` into a `size` x `size` crop: bilinear, border 0."""
    return cv2.warpAffine(image, np.asarray(matrix, np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """One loose crop aligned onto the (scaled) ArcFace template; ValueError for coinciding landmarks."""
    matrices, ok = similarity_transforms(np.asarray(landmarks)[None], reference_points(size))
    if not ok[0]:
        raise ValueError("the five landmarks coincide: no similarity transform maps them onto the template")
    return warp_face(image, matrices[0], size)
