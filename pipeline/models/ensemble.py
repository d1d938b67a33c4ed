"""Several loaded models scored as one (`pipeline evaluate --model A --model B`): the ensemble's similarity of
two images is the weighted mean of its members' cosine similarities.

With member weights w_k (default equal) and shares s_k = w_k / sum(w), the ensemble's embedding of an image
is the concatenation of each member's L2-normalised embedding, after that member's own flip handling (its
embedding of the image plus that of the mirror image), times sqrt(s_k): a unit vector of dimension
D_1 + ... + D_K whose inner products are

    <e(a), e(b)> = sum_k s_k cos_k(a, b).

Called as an Embedder (`ensemble(x)`), it returns the members' *raw* embeddings side by side, (B, D_1 + ... +
D_K), and `member_blocks(embedder)` says where each member's block lies and its share: whatever an evaluation
does to one model's raw output before it takes the cosine (sum the flips; for IJB keep the norm as a quality
weight and pool media and templates) it does to every block, and `unit_blocks` is then the normalisation that
gives the concatenation above (`embed(x, flip)` is that embedding of a batch). So an IJB feature file of an
ensemble holds its members' raw features and does not depend on the weights, which are applied when scoring.

Members take one input: the Embedder interface is a batch normalised as (x/255 - 0.5) / 0.5 at the model's
input size (a member's own preprocessing, e.g. an ONNX graph that rescales to raw pixels, stays inside it),
so members may differ in architecture, file kind and embedding size but not in input size (refused in one
line naming the models). An ensemble of one model is that model: the same raw embeddings, fingerprint and
description, so the same metrics bytes.

`models.loading.load_ensemble(paths, weights, ...)` loads every member (each refused on NaN/inf weights) and
wraps them. Weights are parsed and checked by pipeline/weights.py, like the teacher-cache ensemble's.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.weights import checked_weights


Blocks = list[tuple[int, int, float]]  # (first column, end column, share) of each member


def member_blocks(embedder) -> Blocks | None:
    """Each member's columns and share in an ensemble's raw embeddings; None for one model (any embedder that
    is not an ensemble of several)."""
    blocks = getattr(embedder, "blocks", None)
    return blocks if blocks is not None and len(blocks) > 1 else None


def unit_blocks(rows: np.ndarray, blocks: Blocks) -> np.ndarray:
    """float64 rows (..., D_1 + ... + D_K): each member's block L2-normalised (an all-zero block stays zero)
    and times sqrt(its share); inner products of such rows are the weighted mean of the blocks' cosines."""
    rows = np.asarray(rows, np.float64)
    parts = []
    for start, stop, share in blocks:
        block = rows[..., start:stop]
        norms = np.linalg.norm(block, axis=-1, keepdims=True)
        parts.append(block * (math.sqrt(share) / np.where(norms > 0, norms, 1.0)))
    return np.concatenate(parts, axis=-1)


def _member_name(embedder) -> str:
    return str(embedder.path)


class EmbedderEnsemble:
    """K loaded Embedders (`models.loading.load_embedder`) with optional weights, as one Embedder: `len`,
    `.kind`, `.name`, `.dim`, `.input_size`, `.device`, `.fingerprint`, `.path`, `.module`, `describe()`,
    `ensemble(x)` (raw blocks side by side), `.blocks`, `embed(x, flip)` (the mean-cosine embedding)."""

    def __init__(self, members: Sequence, weights: Sequence[float] | None = None, per: str = "--model"):
        if not members:
            raise PipelineError("an ensemble needs at least one model")
        self.members = list(members)
        self.weights = checked_weights(weights, len(self.members), per=per)
        total = sum(self.weights)
        self.shares = [w / total for w in self.weights]
        sizes = {int(m.input_size) for m in self.members}
        if len(sizes) > 1:
            listed = ", ".join(f"{_member_name(m)} ({m.input_size}x{m.input_size})" for m in self.members)
            raise PipelineError(f"models {listed} take different input sizes; an ensemble feeds every member the "
                                "same images, so its members must share one input size")
        first = self.members[0]
        self.input_size, self.device = first.input_size, first.device
        ends = np.cumsum([0] + [int(m.dim) for m in self.members])
        self.blocks: Blocks = [(int(a), int(b), s) for a, b, s in zip(ends[:-1], ends[1:], self.shares)]
        self.dim = int(ends[-1])
        if self.single:
            self.kind, self.name, self.fingerprint, self.path = first.kind, first.name, first.fingerprint, first.path
            self.arch, self.arch_kwargs, self.module = first.arch, first.arch_kwargs, first.module
        else:
            self.kind, self.arch, self.arch_kwargs, self.module = "ensemble", None, None, None
            self.path = Path(" + ".join(_member_name(m) for m in self.members))
            weighted = "" if len(set(self.weights)) == 1 else f" (weights {', '.join(map(repr, self.weights))})"
            self.name = f"ensemble of {self.path}{weighted}"
            self.fingerprint = self._digest()

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    def __len__(self) -> int:
        return len(self.members)

    def _digest(self) -> str:
        """sha256 of the members' fingerprints in member order (the raw output's columns): what the raw
        embeddings depend on (not the weights, applied when scoring)."""
        document = {"ensemble": "models", "members": [m.fingerprint for m in self.members]}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_1 + ... + D_K) float32: each member's raw embedding of the batch, side by side (one member:
        its embedding)."""
        if self.single:
            return self.members[0](x)
        return torch.cat([m(x).to(self.device) for m in self.members], dim=1)

    def embed(self, x: torch.Tensor, flip: bool = True) -> np.ndarray:
        """The ensemble's embedding of a batch, float64 (B, D_1 + ... + D_K) unit rows: each member's
        embedding (plus that of the mirror images with `flip`) L2-normalised, times sqrt(share)."""
        raw = self(x).double()
        if flip:
            raw = raw + self(torch.flip(x, dims=[3])).double()
        return unit_blocks(raw.cpu().numpy(), self.blocks)

    def describe(self) -> dict:
        """What evaluation records: one model's own description; for several, kind "ensemble", the name, the
        scoring, each member's description with its file, weight and share, and the total parameter count
        when every member's is known."""
        if self.single:
            return self.members[0].describe()
        members = [{**m.describe(), "path": str(m.path), "weight": w, "share": s}
                   for m, w, s in zip(self.members, self.weights, self.shares)]
        info = {"kind": "ensemble", "name": self.name, "scoring": "weighted mean of the members' cosine similarities",
                "members": members}
        if all("params" in m for m in members):
            info["params"] = sum(m["params"] for m in members)
        return info

    def __repr__(self) -> str:
        return f"EmbedderEnsemble({', '.join(repr(m) for m in self.members)}, weights={self.weights})"

