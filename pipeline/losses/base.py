"""The seam every distillation method plugs into.

A method is one module holding three things:
* a settings mixin, a dataclass whose fields (declared with `pipeline.settings.setting`, names prefixed with
  the method's name) become CLI options and params.yaml keys of `train-student` through `KDConfig`;
* a `DistillMethod` subclass: either a *term*, `forward(student, teacher, labels) -> loss` on the (DDP-gathered)
  batch, weighted by its `weight_field` and calibrated by `--kd-scale`; or a *head* method (`in_head = True`,
  e.g. class-centre distillation) that moves the margin head's class centres with `update_centres` before the
  margin loss is computed and adds no loss of its own;
* what it needs from stage 2 (`needs`: the teacher's thresholds, identity centres or hard pairs), which
  `train-student` loads, checks against the cache and hands to `build` as a `Stage2` mapping.
Registering it is one line in `pipeline/losses/registry.py`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.settings import Choice


class Need(Choice):
    """What a method reads from stage 2 (build-pools)."""

    thresholds = "thresholds"      # thresholds.json: the teacher's exact FPR thresholds
    centres = "centres"            # pools.h5 `centres`: the teacher's normalised identity centres
    hard_pairs = "hard-pairs"      # pools.h5 `neg_pairs`: the teacher's hardest negative pairs


Stage2 = Mapping[str, Any]  # Need value -> what build-pools wrote for it


class DistillMethod(nn.Module):
    """Base of every distillation method (see the module docstring)."""

    name: ClassVar[str]
    settings: ClassVar[type]              # the settings mixin (a dataclass) of this method's options
    weight_field: ClassVar[str | None] = None  # the settings field holding a term's weight; None for head methods
    in_head: ClassVar[bool] = False
    # compares student and teacher coordinate by coordinate (feature L2, cosine), so a teacher of another
    # embedding size is compared through training/targets.py's StudentProjection
    same_dim: ClassVar[bool] = False

    @classmethod
    def needs(cls, config) -> set[str]:
        """The stage-2 outputs this method needs under `config` (a KDConfig)."""
        return set()

    @classmethod
    def build(cls, config, stage2: Stage2) -> "DistillMethod":
        """The method as `config` sets it up, given the stage-2 outputs it declared it needs."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """Numbers from the last step worth logging (DVCLive `kd/<name>/...`)."""
        return {}

    @classmethod
    def stage2_output(cls, stage2: Stage2, need: str) -> Any:
        """What build-pools wrote for `need`; a one-line error when the run was not given --pools."""
        if need not in stage2:
            raise PipelineError(f"--kd {cls.name} needs --pools (the folder written by build-pools: {need})")
        return stage2[need]


class CentreMethod(DistillMethod):
    """A head method: the margin head's class centres get no gradient and follow the teacher instead."""

    in_head = True

    def init_centres(self, centres: torch.Tensor, first_row: int = 0, num_classes: int | None = None) -> None:
        """Set the initial centres in place (default: keep the head's random initialisation); `centres` are the
        head's rows from class `first_row` on, of `num_classes` (default: all of them; a head split across
        ranks holds a slice)."""

    @torch.no_grad()
    def update_centres(self, centres: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                       labels: torch.Tensor) -> None:
        """Move `centres` (C, D), in place, given the gathered batch (before the margin loss uses them)."""
        raise NotImplementedError
