"""Load any face-recognition model (a teacher, or a trained student to evaluate) from whatever file the user
has, behind one `Embedder` interface.

Supported files: an arcface_torch state dict (.pt/.pth, optionally with a DDP `module.` prefix; the
architecture is inferred from the keys and shapes), this project's own model.pt (model_file.py), a
TorchScript archive, and an ONNX model (insightface model-zoo convention, run with onnxruntime). Every
Embedder maps a float32 NCHW batch normalised as (x/255 - 0.5) / 0.5 to (B, D) float32 raw embeddings.
`load_ensemble` loads several files as one `models.ensemble.EmbedderEnsemble` (scored by the mean cosine).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import DataError, PipelineError
from pipeline.storage.io import atomic_path
from pipeline.models import MODEL_NAMES, count_parameters, get_model
from pipeline.models.ensemble import EmbedderEnsemble
from pipeline.weights import checked_weights
from pipeline.models.finite import check_finite_embedder
from pipeline.models.iresnet import IRESNET_LAYERS
from pipeline.models.onnx_metadata import write_metadata
from pipeline.models.model_file import (
    is_pipeline_checkpoint,
    load_state_dict_strict,
    model_from_checkpoint,
    safe_torch_load,
)

DEFAULT_INPUT_SIZE = 112
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Embedder:
    """A frozen embedding model: `embedder(x)` -> (B, dim) float32 on `device`, without gradients."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, kind: str, name: str, dim: int,
                 input_size: int, device: torch.device, fingerprint: str, path: Path,
                 arch: str | None = None, arch_kwargs: dict | None = None, module: nn.Module | None = None):
        self._forward = forward
        self.kind, self.name, self.dim, self.input_size = kind, name, dim, input_size
        self.device, self.fingerprint, self.path = device, fingerprint, path
        self.arch, self.arch_kwargs, self.module = arch, arch_kwargs, module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        expected = (3, self.input_size, self.input_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PipelineError(f"{self.path}: model {self.name} expects (B, {', '.join(map(str, expected))})"
                                f" input, got {shape}")
        if x.shape[0] == 0:
            return torch.zeros(0, self.dim, device=self.device)
        with torch.no_grad():
            out = self._forward(x.to(self.device, torch.float32))
        if out.dim() != 2 or tuple(out.shape) != (x.shape[0], self.dim):
            raise DataError(f"{self.path}: model returned shape {tuple(out.shape)} for a batch of {x.shape[0]} "
                            f"images; an embedder returns ({x.shape[0]}, {self.dim})")
        return out.float()

    def describe(self) -> dict:
        """What evaluation records about the model: file kind, name and (for torch models) parameter count."""
        info = {"kind": self.kind, "name": str(self.arch or self.name)}
        if self.module is not None:
            info["params"] = count_parameters(self.module)
        return info

    def __repr__(self) -> str:
        return (f"Embedder(kind={self.kind!r}, name={self.name!r}, dim={self.dim}, input_size={self.input_size},"
                f" device={str(self.device)!r}, fingerprint={self.fingerprint[:12]!r}...)")


# ---------------------------------------------------------------------------------------------------------
# Architecture inference from arcface_torch state-dict keys and shapes


def _indices(keys: list[str], pattern: str) -> int:
    """How many distinct integer indices `pattern` (a regex with one group) captures across keys."""
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return len(found)


def _size_from_side(side: float, source: str) -> int:
    if side < 1 or side != int(side):
        raise DataError(f"{source}: cannot infer input size (final feature map side {side} is not an integer)")
    return 16 * int(side)


def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    """Shape of tensor `key`, which must exist with `ndim` dimensions for the inference to make sense."""
    if key not in sd or sd[key].dim() != ndim:
        got = tuple(sd[key].shape) if key in sd else "absent"
        raise DataError(f"{source}: key {key} is {got}, expected a {ndim}-d tensor")
    return tuple(sd[key].shape)


def _infer_iresnet(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict]:
    keys = list(sd)
    layers = tuple(_indices(keys, rf"layer{i}\.(\d+)\.bn1\.weight") for i in range(1, 5))
    names = {v: k for k, v in IRESNET_LAYERS.items()}
    if layers not in names:
        raise DataError(f"{source}: iresnet with blocks per stage {layers} is none of "
                        f"{', '.join(f'{n}={b}' for n, b in IRESNET_LAYERS.items())}")
    base = _shape(sd, "conv1.weight", 4, source)[0]
    num_features, fc_in = _shape(sd, "fc.weight", 2, source)
    side = (fc_in / (8 * base)) ** 0.5
    return names[layers], {"num_features": num_features, "input_size": _size_from_side(side, source),
                           "width": base / 64}


def _infer_mbf(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict]:
    keys = list(sd)
    sep_out, wide = _shape(sd, "conv_sep.layers.0.weight", 4, source)[:2]
    unit = sep_out // 8
    if unit < 1 or sep_out % 8 or wide % (2 * unit):
        raise DataError(f"{source}: conv_sep.layers.0.weight has {sep_out} outputs and {wide} inputs,"
                        " which fit no MobileFaceNet (outputs = 8 units, inputs = 2 * scale units)")

    def stack(j: int) -> int:
        return _indices(keys, rf"layers\.{j}\.layers\.(\d+)\.layers\.0\.layers\.0\.weight")

    first = 1 if "layers.1.layers.0.weight" in sd else stack(1)
    side = _shape(sd, "features.layers.0.layers.0.weight", 4, source)[-1]
    return "mbf", {"num_features": _shape(sd, "features.layers.2.weight", 2, source)[0],
                   "input_size": _size_from_side(side, source), "width": unit / 64,
                   "blocks": [first, stack(3), stack(5), stack(7)], "scale": wide // (2 * unit)}


def infer_arch(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> tuple[str, dict]:
    """(arch, arch_kwargs) of an arcface_torch-layout state dict, from its key names and tensor shapes."""
    if "layer1.0.bn1.weight" in state_dict and "fc.weight" in state_dict:
        return _infer_iresnet(state_dict, source)
    if "conv_sep.layers.0.weight" in state_dict and "features.layers.2.weight" in state_dict:
        return _infer_mbf(state_dict, source)
    sample = ", ".join(list(state_dict)[:3])
    raise DataError(f"{source}: cannot infer the architecture from keys ({sample}, ...); pass arch= one of "
                    f"{', '.join(MODEL_NAMES)}")


def _family(arch: str) -> str:
    return "iresnet" if arch in IRESNET_LAYERS else arch


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded .pt/.pth object, with any DDP `module.` prefix removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict_backbone"), Mapping):
        obj = obj["state_dict_backbone"]  # arcface_torch's resumable training checkpoint
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise DataError(f"{source}: expected a state dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{source}: state dict entry {bad[0]!r} is not a tensor")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------------------
# Loaders, one per file kind


def _embedder_from_module(model: nn.Module, kind: str, arch: str, arch_kwargs: dict, path: Path,
                         device: torch.device, fingerprint: str) -> Embedder:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return Embedder(model, kind=kind, name=arch, dim=model.num_features, input_size=model.input_size,
                   device=device, fingerprint=fingerprint, path=path, arch=arch, arch_kwargs=arch_kwargs,
                   module=model)


def _load_state_dict(obj: Any, path: Path, arch: str | None, device: torch.device, fingerprint: str,
                             arch_kwargs: dict) -> Embedder:
    source = str(path)
    sd = extract_state_dict(obj, source)
    if arch is None:
        arch, kwargs = infer_arch(sd, source)
    else:
        try:
            found, kwargs = infer_arch(sd, source)
        except DataError:
            found, kwargs = arch, {}
        if _family(found) != _family(arch):
            kwargs = {}  # the keys cannot fit the requested arch; the strict load below names them
    kwargs.update(arch_kwargs)
    try:
        model = get_model(arch, **kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: cannot build {arch!r} with {kwargs}: {exc}") from None
    load_state_dict_strict(model, sd, source)
    return _embedder_from_module(model, "state_dict", arch, kwargs, path, device, fingerprint)


def _probe_dim(forward: Callable[[torch.Tensor], torch.Tensor], input_size: int, device: torch.device,
               source: str) -> int:
    """Embedding size found by running one blank image (for formats without declared shapes)."""
    try:
        with torch.no_grad():
            out = forward(torch.zeros(1, 3, input_size, input_size, device=device))
    except Exception as exc:  # TorchScript errors carry an interpreter traceback: its last line says what failed
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise DataError(f"{source}: model fails on a (1, 3, {input_size}, {input_size}) input: {lines[-1]} (give "
                        "the input size it takes with --input-size)") from None
    if out.dim() != 2 or out.shape[0] != 1:
        raise DataError(f"{source}: model output has shape {tuple(out.shape)}, expected (1, D)")
    return int(out.shape[1])


def _load_torchscript(path: Path, device: torch.device, fingerprint: str, input_size: int) -> Embedder:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch>=2.9 flags jit as deprecated
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise DataError(f"{path}: not a loadable TorchScript archive: {exc}") from None
    dim = _probe_dim(module, input_size, device, str(path))
    return Embedder(module, kind="torchscript", name=path.name, dim=dim, input_size=input_size, device=device,
                   fingerprint=fingerprint, path=path, module=module)


def _expects_raw_pixels(path: Path) -> bool:
    """mxnet-converted insightface models start with Sub and Mul nodes: they normalise 0..255 input themselves."""
    try:
        import onnx
    except ImportError:
        return False
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node[:8]}
    return {"Sub", "Mul"} <= ops


class _OnnxForward:
    """Runs an onnxruntime session on torch batches, honouring a fixed batch size if the model has one."""

    def __init__(self, session: Any, device: torch.device, raw_pixels: bool, path: Path):
        spec = session.get_inputs()[0]
        self.session, self.device, self.raw_pixels, self.path = session, device, raw_pixels, path
        self.input_name, self.output_name = spec.name, session.get_outputs()[0].name
        self.fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw_pixels:
            x = x * 127.5 + 127.5  # undo (x/255-0.5)/0.5: the graph does its own normalisation
        batch = x.detach().cpu().numpy()
        step = self.fixed_batch or len(batch)
        outs = []
        for start in range(0, len(batch), max(step, 1)):
            chunk = batch[start:start + step]
            pad = step - len(chunk)
            if pad:  # a fixed-batch model needs full batches; pad with zeros and drop the extra rows
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            if out.ndim != 2 or out.shape[0] != step:  # never flatten (B, 10, 2) into "embeddings"
                raise DataError(f"{self.path}: ONNX output has shape {tuple(out.shape)} for a batch of {step}; "
                                f"an embedder returns ({step}, D)")
            outs.append(torch.from_numpy(out[:step - pad]))
        return torch.cat(outs).to(self.device, torch.float32)


def _load_onnx(path: Path, device: torch.device, fingerprint: str, input_size: int | None,
               size_hint: int | None = None) -> Embedder:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PipelineError(f"{path}: ONNX models need onnxruntime; install it with "
                            "`pip install ekd-pipeline[onnx]` (or `pip install onnxruntime`)") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise DataError(f"{path}: onnxruntime cannot load the model: {exc}") from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise DataError(f"{path}: ONNX input shape {shape} is not NCHW with 3 channels")
    declared = shape[2] if isinstance(shape[2], int) else None
    if input_size is not None and declared is not None and input_size != declared:
        raise PipelineError(f"{path}: model input is {declared}x{declared}, not input_size={input_size}")
    size = declared or input_size or size_hint or DEFAULT_INPUT_SIZE
    forward = _OnnxForward(session, device, _expects_raw_pixels(path), path)
    out_shape = session.get_outputs()[0].shape
    if out_shape is not None and len(out_shape) != 2:
        raise DataError(f"{path}: ONNX output shape {out_shape} is not (batch, embedding size)")
    dim = out_shape[1] if out_shape is not None and isinstance(out_shape[1], int) else None
    dim = dim or _probe_dim(forward, size, device, str(path))
    return Embedder(forward, kind="onnx", name=path.name, dim=dim, input_size=size, device=device,
                   fingerprint=fingerprint, path=path)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_onnx(path: Path) -> bool:
    """ONNX by extension, or a non-zip protobuf starting with field 1 (ir_version, varint tag 0x08)."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x08" and not zipfile.is_zipfile(path)


def load_embedder(path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu",
                  size_hint: int | None = None, **arch_kwargs: Any) -> Embedder:
    """Load a model from an arcface_torch .pt/.pth, own checkpoint, TorchScript or ONNX file.

    `arch` (one of MODEL_NAMES) and `arch_kwargs` (input_size, width, num_features, fp16, ...) override what
    a state dict's shapes or a checkpoint's metadata say; the weights must still fit strictly. For
    TorchScript/ONNX only `input_size` applies (needed when the file does not declare it); `arch` is ignored.
    `size_hint` (e.g. the data's image size) is the input size of a TorchScript/ONNX file that declares none
    when `input_size` is not given (else 112); other files ignore it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    if arch is not None and arch not in MODEL_NAMES:
        raise PipelineError(f"{path}: unknown arch {arch!r}; choose one of {', '.join(MODEL_NAMES)}")
    device = torch.device(device)
    fingerprint = file_sha256(path)
    if _is_onnx(path) or _is_torchscript(path):
        unusable = sorted(set(arch_kwargs) - {"input_size"})
        if unusable:
            raise PipelineError(f"{path}: {', '.join(unusable)} cannot be applied to a compiled (ONNX/TorchScript)"
                                " model; only input_size can be given")
        if _is_onnx(path):
            return _load_onnx(path, device, fingerprint, arch_kwargs.get("input_size"), size_hint)
        size = arch_kwargs.get("input_size") or size_hint or DEFAULT_INPUT_SIZE
        return _load_torchscript(path, device, fingerprint, size)
    obj = safe_torch_load(path)
    if is_pipeline_checkpoint(obj):
        if arch is not None and arch != obj.get("arch"):
            raise PipelineError(f"{path}: checkpoint holds {obj.get('arch')!r}, not the requested arch {arch!r}")
        model, meta = model_from_checkpoint(obj, str(path), device, overrides=arch_kwargs)
        return _embedder_from_module(model, "checkpoint", meta["arch"], meta["arch_kwargs"], path, device,
                                    fingerprint)
    return _load_state_dict(obj, path, arch, device, fingerprint, arch_kwargs)


def load_ensemble(paths: list[str | os.PathLike], weights: list[float] | None = None, arch: str | None = None,
                  device: str | torch.device = "cpu", per: str = "--model", **arch_kwargs: Any) -> EmbedderEnsemble:
    """Every model file loaded with `load_embedder(path, arch, device, **arch_kwargs)` and refused on NaN/inf
    weights (`finite.check_finite_embedder`: NaN weights give NaN metrics that look like a result), as one
    `models.ensemble.EmbedderEnsemble` (one path: that model). The weights are checked before any file is read."""
    checked_weights(weights, len(paths), per=per)
    members = []
    for path in paths:
        members.append(load_embedder(path, arch=arch, device=device, **arch_kwargs))
        check_finite_embedder(members[-1])
    return EmbedderEnsemble(members, weights, per=per)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: int = DEFAULT_INPUT_SIZE,
                opset: int = 17, metadata: dict[str, str] | None = None) -> Path:
    """Export a backbone to ONNX (input `input` (B, 3, S, S), output `embedding` (B, D), dynamic batch), with
    `metadata` (e.g. onnx_metadata.preprocessing_metadata) as the file's metadata_props."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the legacy path
            # dynamo=False: the torch.export-based exporter needs onnxscript, which is not a dependency.
            torch.onnx.export(
                model, (torch.zeros(1, 3, input_size, input_size, device=device),), str(tmp),
                input_names=["input"], output_names=["embedding"], opset_version=opset, dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            )
            if metadata:
                write_metadata(tmp, metadata)
    finally:
        model.train(was_training)
    return Path(path)
