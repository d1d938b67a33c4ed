"""Every knob of one training run (teacher or student), declared once with its default, help and bounds."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.machine.devices import device_setting
from pipeline.errors import PipelineError
from pipeline.losses.margin import MarginKind
from pipeline.models import Arch
from pipeline.machine.resources import processes_bound
from pipeline.settings import check, setting
from pipeline.training.optim import LRSchedule


def parse_milestones(value) -> tuple[float, ...]:
    """Epochs of the step schedule from '10,15' or a sequence of numbers."""
    if isinstance(value, str):
        value = [x for x in value.split(",") if x.strip()]
    try:
        return tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise PipelineError(f"--lr-milestones: expected comma-separated epochs, got {value!r}") from None


def check_milestones(milestones: tuple[float, ...], epochs: int) -> None:
    """Positive, increasing epochs within the run: a milestone <= 0 would divide the LR from step 0."""
    text = ",".join(f"{m:g}" for m in milestones)
    if not all(math.isfinite(m) and 0 < m <= epochs for m in milestones):
        raise PipelineError(f"--lr-milestones {text}: every milestone must be an epoch in (0, --epochs={epochs}]")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise PipelineError(f"--lr-milestones {text}: milestones must be strictly increasing")


# The largest margin that still leaves a loss to learn from: ArcFace's cos(theta + m) stops being monotonic
# in theta past pi/2 (m = 10 gives loss 0); CosFace's cos(theta) - m puts every target logit below -1 at m >= 2.
MARGIN_LIMITS = {"arcface": (math.pi / 2, "pi/2: cos(theta + m) must stay decreasing in theta"),
                 "cosface": (2.0, "2: cos(theta) - m must stay above -1 for some angle")}


def check_margin(margin: str, m: float | None) -> None:
    limit, reason = MARGIN_LIMITS.get(str(margin), (math.inf, ""))
    if m is not None and m >= limit:
        raise PipelineError(f"--margin-m {m:g} (--margin {margin}): must be < {reason}")


@dataclass
class TrainConfig:
    """One training run. `out_dir`, `arch_kwargs` come from the caller (run folder, backbone shape)."""

    out_dir: Optional[Path] = setting(None, cli=False, identity=False)
    arch: str = setting("r50", "Backbone: r18 r34 r50 r100 r200 (iresnet) or mbf (MobileFaceNet).", choices=Arch)
    arch_kwargs: dict = setting(factory=dict, cli=False)
    epochs: int = setting(20, "Epochs over the training set.", min=1)
    batch_size: int = setting(128, "Images per step per process.", min=1)
    lr: float = setting(0.1, "Base learning rate (SGD).", above=0.0)
    momentum: float = setting(0.9, "SGD momentum.", min=0.0, max=1.0)
    weight_decay: float = setting(5e-4, "Weight decay (not applied to BatchNorm).", min=0.0)
    warmup_epochs: float = setting(0.0, "Linear LR warmup, in epochs.", min=0.0)
    lr_schedule: str = setting("poly", "poly (arcface_torch), step or cosine.", choices=LRSchedule)
    lr_milestones: tuple = setting((), "Comma-separated epochs where the step schedule decays x0.1.",
                                   cli_text=True)
    margin: str = setting("arcface", "Margin head: arcface or cosface.", choices=MarginKind)
    margin_s: float = setting(64.0, "Logit scale s.", above=0.0)
    margin_m: Optional[float] = setting(None, "Margin m (default 0.5 ArcFace, 0.4 CosFace).", min=0.0)
    sample_rate: float = setting(1.0, "Partial-FC class sampling rate (1.0 = full softmax).", above=0.0, max=1.0)
    # not part of the identity, like the number of processes: at sample rate 1 both heads give the same run
    head_parallel: bool = setting(True, "Under torchrun, split the margin head's class rows across the processes "
                                        "(Partial FC v2 style; memory and traffic 1/processes); "
                                        "--no-head-parallel replicates it on every process.", identity=False)
    save_head: bool = setting(False, "When training finishes also write OUT/head.pt: the whole margin head "
                                     "(every class row and its momentum) as one file.", identity=False)
    seed: int = setting(0, "Random seed (runs are deterministic on CPU).", min=0)
    workers: int = setting(2, "DataLoader worker processes decoding images.", min=0,
                           validate=processes_bound, identity=False)
    preload: bool = setting(False, "Decode the whole training set into RAM first (small sets).", identity=False)
    device: str = device_setting(identity=False)
    amp: bool = setting(True, "fp16 autocast on CUDA (ignored on CPU).")
    resume: bool = setting(True, "Continue from OUT/checkpoint.pt when present.", identity=False)
    stop_after_epochs: Optional[int] = setting(None, "Stop after this many epochs of the schedule (resume later).",
                                               min=1, identity=False)
    checkpoint_every: Optional[int] = setting(None, "Also write checkpoint.pt every this many optimiser steps inside "
                                                    "an epoch, so that a rerun continues from the middle of the "
                                                    "epoch exactly (default: at epoch ends only).", min=1,
                                           identity=False)
    monitor: Optional[Path] = setting(None, "After every epoch evaluate on this folder's *.bin files and its "
                                            "monitor.rec (all pairs, TPR@FPR): the per-epoch curves in DVCLive.",
                                      identity=False)
    log_every: int = setting(20, "Log losses and KD diagnostics (gradient norms, critical pairs, thresholds) to "
                                 "DVCLive every this many steps.", min=1, identity=False)

    def __post_init__(self):
        self.lr_milestones = parse_milestones(self.lr_milestones)
        check(self)
        check_milestones(self.lr_milestones, self.epochs)
        check_margin(self.margin, self.margin_m)
