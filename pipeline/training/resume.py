"""Training checkpoints: everything needed to resume a run exactly, and the run's identity.

The identity is a flat dict of every setting that changes the result (the `TrainConfig` fields declared part
of the identity, i.e. all but the machine, output and run-length knobs; the data's fingerprint; and what the
caller adds: the KD and sampler settings, by the same declaration, and the cache and pools fingerprints). It is stored in checkpoint.pt and in model.pt; a checkpoint of
another identity is refused with the differing settings named.

A resume point is an epoch boundary (`epochs_done`) or a step inside the next epoch (`epoch_steps` batches
of it done, with `--checkpoint-every`). Besides the model, optimiser, schedule, scaler and the KD modules'
buffers (EKD queue and EMAs, gradient-balance norms), a checkpoint holds what each rank needs to continue
the same streams: its torch RNG states (partial FC draws from them, and under DDP the ranks' draws differ)
and its running sums of the epoch (the epoch's logged means). Batches and flips need no saved state: they
are pure functions of (seed, epoch, rank), and a resumed epoch skips the batches already done (data.py).
A head split across ranks keeps its rows in files of their own, by class index (head_rows.py): the rows
resume on any number of processes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.errors import DataError, PipelineError
from pipeline.storage.io import write_with
from pipeline.models.model_file import load_failure, safe_torch_load
from pipeline.settings import identity as settings_identity
from pipeline.training import ddp
from pipeline.training.head_rows import localise_head, remove_other_rows, strip_head

FORMAT = "ekd-pipeline-train-state"
_NOT_RECORDED = object()


@dataclass
class EpochProgress:
    """How far one rank is into an epoch: batches done, and the running sums behind the epoch's logged means
    (losses; images and seconds for its throughput)."""

    steps: int = 0
    loss: float = 0.0
    margin_loss: float = 0.0
    kd_loss: float = 0.0
    images: int = 0
    seconds: float = 0.0

    def sums(self) -> list[float]:
        return [self.loss, self.margin_loss, self.kd_loss, float(self.images), self.seconds]

    @classmethod
    def from_sums(cls, steps: int, sums: list[float]) -> "EpochProgress":
        loss, margin_loss, kd_loss, images, seconds = sums
        return cls(steps, loss, margin_loss, kd_loss, int(images), seconds)


@dataclass
class ResumePoint:
    """Where a run continues: `epoch` epochs finished, and this rank's progress into the next one."""

    epoch: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)

    def global_step(self, steps_per_epoch: int) -> int:
        """Optimiser steps already done."""
        return self.epoch * steps_per_epoch + self.progress.steps


def _gathered(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(world_size, ...) on the CPU: `x` of every rank, in rank order (on the device for NCCL)."""
    return ddp.all_gather_no_grad(x.to(device)[None]).cpu()


def rank_states(progress: EpochProgress, device: torch.device) -> dict:
    """Every rank's RNG states and epoch sums, stacked in rank order. A collective under DDP: every rank
    calls it at the same step; rank 0 passes the result to `save_train_state`."""
    states = {"epoch_sums": _gathered(torch.tensor(progress.sums(), dtype=torch.float64), device),
              "torch_rng": _gathered(torch.get_rng_state(), device)}
    if device.type == "cuda":
        states["cuda_rng"] = _gathered(torch.cuda.get_rng_state(device), device)
    return states


def save_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, config: dict,
                     ranks: dict, epochs_done: int, epoch_steps: int = 0, steps_per_epoch: int = 0,
                     head_rows: dict | None = None):
    """Write model, head, optimiser, scheduler, AMP scaler, KD-loss buffers and every rank's RNG states and
    epoch sums (`ranks`, from `rank_states`) atomically. `config` is the run's identity; `epoch_steps`
    batches of epoch `epochs_done` are done (0: an epoch boundary), of `steps_per_epoch`. `head_rows`: a
    split head's manifest (head_rows.save_head_rows), whose files hold the head instead."""
    state = {
        "format": FORMAT,
        "epochs_done": epochs_done,
        "epoch_steps": epoch_steps,
        "steps_per_epoch": steps_per_epoch,
        "world_size": int(ranks["torch_rng"].shape[0]),
        "config": config,
        "trainee": trainee.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "extra_modules": [m.state_dict() for m in extra_modules],
        **ranks,
    }
    if head_rows is not None:
        strip_head(state, trainee.head, optimizer, head_rows)
    write_with(path, lambda handle: torch.save(state, handle))
    remove_other_rows(path, head_rows)


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


def load_train_state(path: Path, trainee, optimizer, scheduler, scaler, extra_modules, expected_config: dict,
                     steps_per_epoch: int, device: torch.device) -> ResumePoint:
    """Restore a checkpoint written by `save_train_state`; returns where the run continues.

    PipelineError naming every differing setting when the checkpoint belongs to another run identity, and,
    for a checkpoint inside an epoch, another number of processes (the epoch's batches would differ)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which, never guess
        raise PipelineError(f"{path}: cannot read training checkpoint, {load_failure(error)}; delete it to start "
                            "over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this pipeline")
    check_entries(path, state)
    epoch_steps = int(state.get("epoch_steps", 0))
    changed = differences(state.get("config") or {}, expected_config)
    if epoch_steps and not changed:  # a position inside an epoch means the same batches only on as many ranks
        changed = differences({"world_size": state.get("world_size"), "steps_per_epoch": state.get("steps_per_epoch")},
                              {"world_size": ddp.world_size(), "steps_per_epoch": steps_per_epoch})
        if changed:
            changed[-1] += f" (it stopped after step {epoch_steps} of epoch {int(state['epochs_done']) + 1})"
    if changed:
        raise PipelineError(
            f"{path}: the checkpoint was written with different settings: {', '.join(changed)}; rerun with its "
            "settings, use another run folder, or --no-resume to start over"
        )
    localise_head(path, state, trainee.head, optimizer)  # the rows this run's head holds, from any world size
    check_tensors(path, state, trainee, optimizer)
    try:  # what check_tensors cannot see (e.g. a KD buffer's size) torch's loaders refuse: one line of it
        trainee.load_state_dict(state["trainee"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for module, module_state in zip(extra_modules, state["extra_modules"], strict=True):
            module.load_state_dict(module_state)
        _restore_rng(state, device)
        sums = state.get("epoch_sums")
        progress = EpochProgress.from_sums(epoch_steps, _own_row(sums).tolist()) if epoch_steps else EpochProgress()
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _cannot_resume(path, f"{first[:200]} ({type(error).__name__})")
    return ResumePoint(int(state["epochs_done"]), progress)


# entries a resume reads, and their types (None: older checkpoints may lack it)
_ENTRIES = {"epochs_done": int, "trainee": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
            "extra_modules": list, "torch_rng": torch.Tensor, "epoch_steps": (int, None), "config": (dict, None)}


def _cannot_resume(path: Path, what: str):
    raise PipelineError(f"{path}: cannot resume: {what}; delete it or use --no-resume")


def check_entries(path: Path, state: dict) -> None:
    """Every entry a resume reads present (where required) and of its type; counts not negative."""
    for key, kind in _ENTRIES.items():
        kind, optional = (kind[0], True) if isinstance(kind, tuple) else (kind, False)
        if optional and state.get(key) is None:
            continue
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            found = "missing" if key not in state else f"a {type(state[key]).__name__}"
            _cannot_resume(path, f"entry {key!r} is {found}, expected a {kind.__name__}")
    for key in ("epochs_done", "epoch_steps"):
        if (state.get(key) or 0) < 0:
            _cannot_resume(path, f"entry {key!r} is {state[key]}, expected a count >= 0")


def check_tensors(path: Path, state: dict, trainee, optimizer) -> None:
    """The checkpoint's model and optimiser tensors of this run's shapes (and the model's of its dtypes):
    load_state_dict would cast another dtype silently, and the optimiser's loader checks no shapes at all (a
    momentum buffer of another width would fail at the first step instead)."""
    live = trainee.state_dict()
    for key, saved in state["trainee"].items():
        _check_tensor(path, f"model tensor {key!r}", saved, live.get(key), same_dtype=True)
    groups = state["optimizer"].get("param_groups")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        ids = [i for group in groups for i in group["params"]]
    except (TypeError, KeyError):
        _cannot_resume(path, "the optimiser state has no readable param_groups")
    if len(ids) != len(params):
        _cannot_resume(path, f"the optimiser state holds {len(ids)} parameters, this run's model {len(params)}")
    states = state["optimizer"].get("state") or {}
    for index, param in zip(ids, params):
        for name, saved in (states.get(index) or {}).items():
            if isinstance(saved, torch.Tensor) and saved.dim() > 0:  # a scalar "step" has no parameter shape
                _check_tensor(path, f"optimiser {name} of parameter {index}", saved, param, same_dtype=False)


def _check_tensor(path: Path, what: str, saved, live: torch.Tensor | None, same_dtype: bool) -> None:
    if live is None:  # torch's strict loader names unexpected keys
        return
    if not isinstance(saved, torch.Tensor):
        _cannot_resume(path, f"{what} is a {type(saved).__name__}, not a tensor")
    if saved.shape != live.shape or (same_dtype and saved.dtype != live.dtype):
        _cannot_resume(path, f"{what} is {saved.dtype} {tuple(saved.shape)}, this run's {live.dtype} "
                             f"{tuple(live.shape)} (written by a run of another model?)")


def _own_row(rows: torch.Tensor) -> torch.Tensor:
    """This rank's row of a (world_size, ...) checkpoint entry (rank 0's when the run has another number of
    processes: only at an epoch boundary), as a tensor of its own: torch.set_rng_state reads a view of a
    row at the wrong place (and crashes)."""
    return (rows[ddp.rank()] if rows.shape[0] == ddp.world_size() else rows[0]).clone()


def _restore_rng(state: dict, device: torch.device) -> None:
    """This rank's torch RNG states (older checkpoints hold one CPU state and all CUDA states of rank 0)."""
    cpu = state["torch_rng"]
    torch.set_rng_state(cpu if cpu.dim() == 1 else _own_row(cpu))
    cuda = state.get("cuda_rng")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(_own_row(cuda), device)
    elif isinstance(cuda, (list, tuple)):
        torch.cuda.set_rng_state_all(cuda)


def jsonable(cfg) -> dict:
    """A config dataclass as plain JSON values (what checkpoint.pt and model.pt store)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def run_identity(cfg, source, num_classes: int, margin_samples: int | None,
                 settings: dict | None) -> dict:
    """Every setting that changes the trained model (a TrainConfig `cfg`): its result-changing fields, the data (its
    fingerprint, or its size for in-memory sources), the margin's share of the batch and `settings`."""
    identity = settings_identity(cfg)
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
