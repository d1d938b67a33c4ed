"""This project's model files: a state dict plus the architecture needed to rebuild it.

File layout (torch.save of a plain dict, loadable with weights_only=True):
`{"format": "ekd-pipeline-model", "version": 1, "arch": str, "arch_kwargs": dict, "state_dict": dict,
"extra": dict}`. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import DataError
from pipeline.storage.io import write_with
from pipeline.models import MODEL_NAMES, get_model

FORMAT = "ekd-pipeline-model"
VERSION = 1
_SHOWN_KEYS = 5  # keys listed in a mismatch message before "(+N more)"


CONVERT_ADVICE = ("if you trust the file, load it where it was made and save plain weights, e.g. "
                  "torch.save(model.state_dict(), 'weights.pt')")
_TORCH_ADVICE = ("weights_only", "Weights only", "Check the documentation", "Please file an issue", "WeightsUnpickler")


def load_failure(exc: BaseException) -> str:
    """Why a restricted torch.load failed, in one line and without torch's advice to lift the restriction:
    code the file would run (a pickled global), or the file's damage."""
    text = str(exc)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return f"not a plain state dict: loading it would run code ({code.group(1)}), which is refused; {CONVERT_ADVICE}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not any(mark in line for mark in _TORCH_ADVICE)]
    reason = f"{type(exc).__name__}: {kept[0][:160]}" if kept else type(exc).__name__
    return f"not a torch weights file (corrupt, truncated or another format; {reason})"


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers; anything else becomes a one-line DataError
    that never suggests lifting the restriction."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for corrupt zips, ...
        raise DataError(f"{path}: {load_failure(exc)}") from None


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Load with strict=True, turning any key or shape mismatch into a one-line DataError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if not problems:
        for key, ref in expected.items():
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"key {key} is a {type(value).__name__}, not a tensor")
                break
            if value.shape != ref.shape:
                problems.append(f"key {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
                break
    if problems:
        raise DataError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=True)


def _json_dict(value: Any, what: str) -> dict:
    """A dict that survives JSON (hence also weights_only unpickling)."""
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def save_model(path: str | os.PathLike, model: nn.Module, arch: str, arch_kwargs: Mapping | None = None,
               extra: Mapping | None = None) -> Path:
    """Write `model`'s weights and architecture atomically (temp file + os.replace); returns the path."""
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(MODEL_NAMES)}")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": str(arch),  # plain text: a weights-only load accepts no enum
        "arch_kwargs": _json_dict(arch_kwargs, "arch_kwargs"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _json_dict(extra, "extra"),
    }
    write_with(path, lambda handle: torch.save(payload, handle))
    return path


def is_pipeline_checkpoint(obj: Any) -> bool:
    """True when a loaded object claims to be this project's model file."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def model_from_checkpoint(obj: Mapping, source: str, device: str | torch.device = "cpu",
                          overrides: Mapping | None = None) -> tuple[nn.Module, dict]:
    """Rebuild and strictly load the model of an already-loaded checkpoint dict.

    `overrides` replace stored arch_kwargs (e.g. fp16=True to run a teacher in half precision on CUDA).
    """
    if not is_pipeline_checkpoint(obj):
        raise DataError(f"{source}: not an {FORMAT} file (format={obj.get('format')!r})"
                        if isinstance(obj, Mapping) else f"{source}: not an {FORMAT} file")
    if obj.get("version") != VERSION:
        raise DataError(f"{source}: unsupported {FORMAT} version {obj.get('version')!r} (expected {VERSION})")
    for key, kind in (("arch", str), ("arch_kwargs", Mapping), ("state_dict", Mapping)):
        if not isinstance(obj.get(key), kind):
            raise DataError(f"{source}: key {key!r} missing or not a {kind.__name__}")
    arch, arch_kwargs = obj["arch"], {**obj["arch_kwargs"], **(overrides or {})}
    try:
        model = get_model(arch, **arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: cannot build arch {arch!r} with {arch_kwargs}: {exc}") from None
    load_state_dict_strict(model, obj["state_dict"], source)
    meta = {"format": FORMAT, "version": VERSION, "arch": arch, "arch_kwargs": arch_kwargs,
            "extra": dict(obj.get("extra") or {})}
    return model.to(device).eval(), meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a file written by save_model: `(model in eval mode on device, meta dict)`."""
    return model_from_checkpoint(safe_torch_load(path), str(path), device)
