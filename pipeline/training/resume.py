"""Training checkpoints: everything needed to resume a run exactly, and the run's identity.

The identity is a flat dict of every setting that changes the result (the `TrainConfig` fields but the
machine and run-length knobs, the data's fingerprint, and what the caller adds: KD method and weights,
sampler, cache and pools fingerprints). It is stored in checkpoint.pt and in model.pt; a checkpoint of
another identity is refused with the differing settings named. Resume points are epoch boundaries
(`epochs_done`); the state dict is the place to add a position inside an epoch.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.errors import DataError, PipelineError
from pipeline.io import write_with
from pipeline.models.model_file import load_failure, safe_torch_load

FORMAT = "ekd-pipeline-train-state"
_NOT_RECORDED = object()


def save_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, epochs_done: int, config: dict):
    """Write model, head, optimiser, scheduler, AMP scaler, KD-loss buffers and torch RNG states atomically.

    `config` is the run's identity. Samplers draw from generators seeded by (seed, epoch, rank), so they need
    no saved state.
    """
    state = {
        "format": FORMAT,
        "epochs_done": epochs_done,
        "config": config,
        "trainee": trainee.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "extra_modules": [m.state_dict() for m in extra_modules],
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    write_with(path, lambda handle: torch.save(state, handle))


def _shown(value) -> str:
    if value is _NOT_RECORDED:
        return "(unset)"
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def differences(saved: dict, wanted: dict) -> list[str]:
    """'name saved -> wanted' for every setting whose value differs (or exists on one side only)."""
    names = sorted(set(saved) | set(wanted))
    return [f"{name} {_shown(saved.get(name, _NOT_RECORDED))} -> {_shown(wanted.get(name, _NOT_RECORDED))}"
            for name in names if saved.get(name, _NOT_RECORDED) != wanted.get(name, _NOT_RECORDED)]


def load_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, expected_config: dict) -> int:
    """Restore a checkpoint written by `save_train_state`; returns the number of epochs already done.

    PipelineError naming every differing setting when the checkpoint belongs to another run identity."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which, never guess
        raise PipelineError(f"{path}: cannot read training checkpoint, {load_failure(error)}; delete it to start "
                            "over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this pipeline")
    changed = differences(state.get("config") or {}, expected_config)
    if changed:
        raise PipelineError(
            f"{path}: the checkpoint was written with different settings: {', '.join(changed)}; rerun with its "
            "settings, use another run folder, or --no-resume to start over"
        )
    trainee.load_state_dict(state["trainee"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for module, module_state in zip(extra_modules, state["extra_modules"], strict=True):
        module.load_state_dict(module_state)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["epochs_done"])


def jsonable(cfg) -> dict:
    """A config dataclass as plain JSON values (what checkpoint.pt and model.pt store)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def _config_key(cfg) -> dict:
    """The settings a checkpoint must share with the run resuming it (not the run-length knobs)."""
    key = jsonable(cfg)
    for volatile in ("out_dir", "workers", "resume", "stop_after_epochs", "device", "preload", "monitor",
                     "log_every"):
        key.pop(volatile, None)
    return key


def run_identity(cfg, source, num_classes: int, margin_samples: int | None,
                 settings: dict | None) -> dict:
    """Every setting that changes the trained model (a TrainConfig `cfg`): its result-changing fields, the data (its
    fingerprint, or its size for in-memory sources), the margin's share of the batch and `settings`."""
    identity = _config_key(cfg)
    fingerprint = source.fingerprint() if hasattr(source, "fingerprint") else f"{len(source)} images"
    identity.update(data=fingerprint, num_classes=int(num_classes), margin_samples=margin_samples)
    clash = set(identity) & set(settings or {})
    if clash:
        raise ValueError(f"run settings {sorted(clash)} repeat TrainConfig fields")
    identity.update(json.loads(json.dumps(settings or {}, default=str)))
    return identity


def finished_identity(model_path: Path) -> dict | None:
    """The identity recorded in a finished run's model.pt (None when there is none or it cannot be read)."""
    if not model_path.is_file():
        return None
    try:
        extra = safe_torch_load(model_path).get("extra") or {}
    except (DataError, AttributeError):
        return None
    return extra.get("run") if isinstance(extra, dict) else None
