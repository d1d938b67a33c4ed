"""Model files whose embeddings are known (TorchScript Projections) and a member's cosine similarities computed
with numpy alone: what the ensemble tests (`evaluate --model A --model B`) compare the pipeline with."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from helpers.teachers import Projection


def save_projection(path, dim: int, seed: int, size: int = 16) -> np.ndarray:
    """A TorchScript Projection model file; returns its (3 size^2, dim) float64 matrix."""
    model = Projection(size, dim, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 flags TorchScript as deprecated
        torch.jit.script(model).save(str(path))
    return model.p.numpy().astype(np.float64)


def unit_embeddings(p: np.ndarray, images, flip: bool = True) -> np.ndarray:
    """(N, D) L2-normalised embeddings of uint8 HWC RGB images (plus their mirror images' with `flip`)."""
    def embed(rgb):
        return ((rgb.astype(np.float64) / 255 - 0.5) / 0.5).transpose(2, 0, 1).reshape(-1) @ p

    e = np.array([embed(im) + embed(im[:, ::-1]) if flip else embed(im) for im in images])
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def mean_cosines(matrices, weights, images, flip: bool = True) -> np.ndarray:
    """(N, N) weighted mean over the members (projection matrices) of their cosine similarities."""
    w = np.ones(len(matrices)) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for share, p in zip(w / w.sum(), matrices):
        e = unit_embeddings(p, images, flip)
        total = total + share * (e @ e.T)
    return total
