"""Training checkpoints: everything needed to resume a run exactly at an epoch boundary."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

FORMAT = "ekd-pipeline-train-state"


def save_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, epochs_done: int, config: dict):
    """Write model, head, optimiser, scheduler, AMP scaler, KD-loss buffers and torch RNG states atomically.

    Samplers draw from generators seeded by (seed, epoch, rank), so they need no saved state.
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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, expected_config: dict) -> int:
    """Restore a checkpoint written by `save_train_state`; returns the number of epochs already done."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which, never guess
        raise PipelineError(f"{path}: cannot read training checkpoint ({error}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this pipeline")
    if state["config"] != expected_config:
        changed = sorted(k for k in set(state["config"]) | set(expected_config)
                         if state["config"].get(k) != expected_config.get(k))
        raise PipelineError(
            f"{path}: checkpoint was written with different settings ({', '.join(changed)}); "
            "delete it or use --no-resume to start over"
        )
    trainee.load_state_dict(state["trainee"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for module, module_state in zip(extra_modules, state["extra_modules"]):
        module.load_state_dict(module_state)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["epochs_done"])
